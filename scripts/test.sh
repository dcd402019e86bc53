#!/usr/bin/env bash
# The whole test suite: environment, lint, format check, type check, tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/ensure_venv.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/ruff check async_vapo tests bench studies
.venv/bin/ruff format --check async_vapo tests bench studies
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
