#!/usr/bin/env bash
# A fresh machine that is not this one: the README's set-up, run where pip sees only the public index.
#
#   sudo bash bench/fresh_machine.sh --torch-wheels DIR [--skip-run] [--skip-images] [--skip-gpu]
#
# Needs root and Docker's engine (Debian: apt-get install docker.io debootstrap; dockerd is started here
# if it is not running). Not in the test suite. What it does, printing the seconds of every stage:
#   1. base: a Debian bookworm root from Debian's packages (debootstrap, CPython 3.11, a compiler, libnuma),
#      with nothing of this machine but its CA bundle (so pip reaches the public index, and nothing else
#      a wheelhouse or pip config of this machine would give), loaded with `docker import`;
#   2. the user's machine: a container of that base on a clean clone of HEAD runs the README's
#      `bash scripts/run.sh` for the embedded default's first steps (train.total_steps=3, evaluation off,
#      algo.value_pretrain_steps=3) and reports the install's stages, the import check and the run;
#   3. the images: docker/Dockerfile.cpu built on the base and run for the same three steps;
#      docker/Dockerfile.gpu built on the base (torch's and vLLM's CUDA wheels bring their CUDA libraries;
#      building proves the install resolves, running needs a GPU). Sizes and build seconds.
# PyTorch's CPU index stands in: DIR holds the CPU torch wheel (e.g. `pip download torch==2.13.0+cpu
# --index-url https://download.pytorch.org/whl/cpu -d DIR`), served as a PEP 503 index on the Docker bridge
# and passed to the set-up as ASYNC_VAPO_TORCH_INDEX, the way a user's machine reaches PyTorch's index.
# Everything else comes from the public index. The last line is one JSON object with every figure.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels="" run_it=1 images=1 gpu=1
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
    --skip-run) run_it=0; shift ;;
    --skip-images) images=0; shift ;;
    --skip-gpu) gpu=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$wheels" ] && ls "$wheels"/torch-2.13.0+cpu-*.whl >/dev/null || {
  echo "--torch-wheels DIR must hold torch-2.13.0+cpu-*.whl" >&2; exit 2; }
work=${FRESH_MACHINE_DIR:-/var/tmp/async_vapo_fresh}
mkdir -p "$work"
declare -A fig
t() { local name=$1; shift; local t0=$SECONDS; "$@"; fig[$name]=$((SECONDS - t0)); echo "[fresh_machine] $name: ${fig[$name]}s" >&2; }

if ! docker info >/dev/null 2>&1; then
  (dockerd >"$work/dockerd.log" 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
bridge=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)
[ -n "$bridge" ] || { echo "no address on docker0" >&2; exit 1; }

# PyTorch's CPU index, stood in for by DIR (a PEP 503 page per project)
index="$work/torch-index"
rm -rf "$index" && mkdir -p "$index/simple/torch"
cp "$wheels"/torch-2.13.0+cpu-*.whl "$index/simple/torch/"
(cd "$index/simple/torch" && for f in *.whl; do echo "<a href=\"$f\">$f</a>"; done > index.html)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
(cd "$index" && exec python3 -m http.server "$port" --bind "$bridge" >"$work/index.log" 2>&1) &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
torch_index="http://$bridge:$port/simple"

# 1. the base: Debian's packages only, plus this machine's CA bundle
base_root="$work/bookworm"
make_base() {
  rm -rf "$base_root"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-dev,python3-pip,build-essential,libnuma1,procps,tini,ca-certificates,git \
    bookworm "$base_root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1
  cp /etc/ssl/certs/ca-certificates.crt "$base_root/etc/ssl/certs/ca-certificates.crt"
  ln -sf python3 "$base_root/usr/bin/python"
  tar -C "$base_root" -c . | docker import - async-vapo-base:bookworm >/dev/null
}
if [ -n "${FRESH_MACHINE_REBUILD:-}" ] || ! docker image inspect async-vapo-base:bookworm >/dev/null 2>&1; then
  t base make_base
fi

# 2. the README's set-up on a user's machine (a clean clone: what the user gets)
src="$work/src"
rm -rf "$src" && git clone -q "$root" "$src"
steps=(--output-dir /tmp/run train.total_steps=3 train.eval_every=0 algo.value_pretrain_steps=3)
if [ "$run_it" = 1 ]; then
  t user_setup_and_run docker run --rm --shm-size 4g -e ASYNC_VAPO_TORCH_INDEX="$torch_index" \
    -e PIP_TRUSTED_HOST="$bridge" -v "$src:/src:ro" async-vapo-base:bookworm \
    bash -c "cp -r /src /home/user && cd /home/user && bash scripts/run.sh ${steps[*]} \
      && test -f /tmp/run/checkpoints/latest && echo '[fresh_machine] trained 3 steps'" \
    2>&1 | tee "$work/user.log" | grep -E "ensure_venv|fresh_machine|training finished|Error|error" || true
  fig[user_import_check]=$(grep -c "import check: .* passed" "$work/user.log" || true)
  fig[user_trained]=$(grep -c "trained 3 steps" "$work/user.log" || true)
  for s in torch dependencies package; do
    fig[user_install_$s]=$(sed -n "s/.*\[ensure_venv\] $s: \([0-9]*\)s.*/\1/p" "$work/user.log" | head -1)
  done
fi

# 3. the images, on the same base
size() { docker image inspect "$1" -f '{{.Size}}' | awk '{printf "%.0f", $1 / 2^20}'; }
if [ "$images" = 1 ]; then
  t cpu_image_build docker build -q --network host -f "$src/docker/Dockerfile.cpu" -t async-vapo:cpu \
    --build-arg BASE=async-vapo-base:bookworm --build-arg ASYNC_VAPO_TORCH_INDEX="$torch_index" \
    --build-arg PIP_TRUSTED_HOST="$bridge" "$src" >/dev/null
  fig[cpu_image_mb]=$(size async-vapo:cpu)
  t cpu_image_run docker run --rm --shm-size 4g async-vapo:cpu "${steps[@]}" >"$work/cpu_image.log" 2>&1
  fig[cpu_image_trained]=$(grep -c "training finished" "$work/cpu_image.log" || true)
  if [ "$gpu" = 1 ]; then
    t gpu_image_build docker build -q --network host -f "$src/docker/Dockerfile.gpu" -t async-vapo:gpu \
      --build-arg BASE=async-vapo-base:bookworm "$src" >/dev/null
    fig[gpu_image_mb]=$(size async-vapo:gpu)
  fi
fi
json="{"
for k in "${!fig[@]}"; do json+="\"$k\": ${fig[$k]:-null}, "; done
echo "${json%, }}"
