#!/usr/bin/env bash
# The one-GPU check (bench/gpu_check.py says what it checks) on a machine with one NVIDIA GPU, PyTorch
# and no network. Two steps:
#   bash bench/gpu_check.sh --download      # here, where pip works: the missing packages as wheels in .whl/
#   bash bench/gpu_check.sh [OUT_DIR]       # there, from the repository root (about 5 minutes)
# The wheels (CPython 3.12, manylinux x86-64; < 64 MiB) are the lock's versions of what such an image lacks:
# DeepSpeed (built here: PyPI has only its source), its needs, the wire and log packages, and the
# transformers release the learner is written against. Results: OUT_DIR/gpu_check.json and pytest's log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lock=requirements/cpu.txt
pins() { for n in "$@"; do grep -i -E "^${n}==" "$lock" || { echo "gpu_check: $n not in $lock" >&2; exit 1; }; done; }

if [[ "${1:-}" == "--download" ]]; then
  rm -rf .whl && mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  platforms=()
  for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
    $(pins msgspec pyzmq structlog hjson pydantic pydantic_core annotated-types typing-inspection \
      transformers huggingface_hub tokenizers safetensors einops py-cpuinfo) || exit 1
  python3 -m pip wheel -q --no-deps -w .whl "$(pins deepspeed)" || exit 1
  du -sh .whl && ls .whl
  exit 0
fi

out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# the tests marked gpu (those that need the tiny model are skipped: it is built on first use, minutes)
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_algo_losses.py 2>&1 | tee "$out/pytest_gpu.log"
timeout 420 python3 bench/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
