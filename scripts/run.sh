#!/usr/bin/env bash
# The main job: the embedded default (built-in task + tiny model, on CPU) unless arguments say otherwise.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure_venv.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m async_vapo.launch "$@"
