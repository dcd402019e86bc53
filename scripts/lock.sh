#!/usr/bin/env bash
# Refreshes requirements/cpu.txt, the lock scripts/ensure_venv.sh installs on CPU machines: resolves the
# unpinned CPU extras of pyproject.toml in a scratch venv (torch's CPU build first, from PyTorch's CPU
# index), drops the packages that must not be there, and writes what was installed. Run the test suite on
# the result before committing it. Needs CPython 3.11 on x86-64 (the lock's platform).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
torch_index=${ASYNC_VAPO_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$py" -m venv "$scratch/venv"
pip=("$scratch/venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q)
"${pip[@]}" --no-deps --index-url "$torch_index" --timeout 15 --retries 1 torch==2.13.0+cpu \
  || "${pip[@]}" --no-deps torch==2.13.0
"${pip[@]}" ".[cpu,test,tracking,datasets]"
{
  echo "# The tested CPU environment (CPython 3.11, x86-64 Linux), installed by scripts/ensure_venv.sh with --no-deps."
  echo "# torch is not here: it comes first, from PyTorch's CPU wheel index (torch==2.13.0+cpu)."
  echo "# Refresh: bash scripts/lock.sh (resolves the unpinned extras in a scratch venv and rewrites this file)."
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -vE "^(async.vapo|torch|torchvision|torchaudio|torchcodec)[=@ ]"
} > requirements/cpu.txt
echo "requirements/cpu.txt: $(grep -vc '^#' requirements/cpu.txt) packages" >&2
