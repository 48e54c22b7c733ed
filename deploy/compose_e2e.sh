#!/usr/bin/env bash
# End to end on one machine with no image registry: build the CPU image, run compose's cpu profile,
# send OpenAI SDK requests through the router, scale the workers up and down and check that the
# router's DNS discovery follows. Outside the test suite (minutes of image build); its output is
# committed as deploy/compose_e2e.log.
#
#   sudo deploy/compose_e2e.sh [LOG]          # LOG defaults to deploy/compose_e2e.log
#
# Needs root (dockerd), Debian's docker.io, docker-compose and debootstrap (installed when missing),
# and a Python with the `openai` package on the host (PYTHON, default: python3). No registry is
# needed: when no base image can be pulled, one is built with debootstrap from the host's apt mirror,
# and the Python wheels are downloaded on the host (pip as configured there) into the build context.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG=${1:-$ROOT/deploy/compose_e2e.log}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/radixfleet-e2e}
PORT=${ROUTER_PORT:-18000}
BASE_IMAGE=radixfleet-base:bookworm
PROJECT=radixfleet-e2e
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKERD_PID=""

mkdir -p "$WORK"
exec > >(tee "$LOG") 2>&1
step() { printf '\n== %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
compose() { docker-compose -p "$PROJECT" -f "$ROOT/compose.yaml" --profile cpu "$@"; }

cleanup() {
    step "teardown"
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    if [ -n "$DOCKERD_PID" ]; then kill "$DOCKERD_PID" 2>/dev/null || true; wait "$DOCKERD_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

step "machine"
echo "$(uname -srm), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
echo "commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo ' (with local changes)')"

step "tools"
missing=""
command -v dockerd >/dev/null || missing="$missing docker.io"
command -v docker-compose >/dev/null || missing="$missing docker-compose"
command -v debootstrap >/dev/null || missing="$missing debootstrap"
if [ -n "$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; fi
docker-compose version --short

step "dockerd"
if ! docker info >/dev/null 2>&1; then
    # No iptables and no default bridge: this machine's sandbox allows neither; compose's own
    # network and the userland port proxy are enough for 127.0.0.1:$PORT.
    dockerd --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info --format 'docker {{.ServerVersion}}, storage {{.Driver}}'

step "base image"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE already present"
elif timeout 60 docker pull python:3.11-slim-bookworm >/dev/null 2>&1; then
    docker tag python:3.11-slim-bookworm "$BASE_IMAGE"
    echo "pulled python:3.11-slim-bookworm"
else
    echo "no registry reachable: debootstrap Debian bookworm (python3.11, venv, C compiler for Triton)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates \
        bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE"
fi
docker run --rm --network none "$BASE_IMAGE" python3 --version

step "build context and wheelhouse"
CONTEXT=$WORK/context
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
(cd "$ROOT" && git ls-files -co --exclude-standard | grep -v '^deploy/compose_e2e.log$' | tar -c -T - ) | tar -C "$CONTEXT" -x
WHEELS=$CONTEXT/deploy/docker/wheelhouse
mkdir -p "$WHEELS"
"$PYTHON" -m pip download --quiet --progress-bar off --only-binary=:all: -d "$WHEELS" -c "$ROOT/deploy/docker/constraints-cpu.txt" \
    torch -r "$ROOT/deploy/docker/requirements.txt" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"

step "build radixfleet-cpu (offline: --network none, wheels from the context)"
docker build --network none -q -t radixfleet-cpu:latest \
    --build-arg BASE="$BASE_IMAGE" --target cpu \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/app/deploy/docker/wheelhouse "$CONTEXT"
docker run --rm --network none --entrypoint sh radixfleet-cpu:latest -c \
    'echo "user $(id -u), $(python -c "import torch, aiohttp; print(\"torch\", torch.__version__, \"aiohttp\", aiohttp.__version__)")"'

wait_workers() {  # wait until the router's /metrics shows $1 workers, all healthy; print them
    local want=$1
    for _ in $(seq 120); do
        if "$PYTHON" - "$PORT" "$want" <<'PY'
import re, sys, urllib.request
port, want = sys.argv[1], int(sys.argv[2])
try:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
except OSError:
    sys.exit(1)
healthy = dict(re.findall(r'^radixfleet_router_worker_healthy\{worker="([^"]+)"\} (\d+)', text, re.M))
if len(healthy) == want and all(v == "1" for v in healthy.values()):
    print(f"router sees {want} healthy worker(s): {', '.join(sorted(healthy))}")
    sys.exit(0)
sys.exit(1)
PY
        then return 0; fi
        sleep 2
    done
    echo "the router never showed $want healthy workers:"
    curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^radixfleet_router_worker' || true
    return 1
}

sdk_requests() {
    "$PYTHON" - "$PORT" <<'PY'
import sys, openai
client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused", max_retries=2, timeout=120)
print("models:", [m.id for m in client.models.list().data])
system = "You are a terse assistant that answers in one line. " * 6
for i in range(4):
    reply = client.chat.completions.create(model="demo", max_tokens=8, temperature=0,
                                           messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": f"Question {i}: what is a radix tree?"}])
    print(f"chat {i}: finish={reply.choices[0].finish_reason} tokens={reply.usage.completion_tokens} "
          f"cached={reply.usage.prompt_tokens_details.cached_tokens if reply.usage.prompt_tokens_details else 0} "
          f"text={reply.choices[0].message.content!r}")
stream = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=8, stream=True)
print("stream:", repr("".join(chunk.choices[0].text for chunk in stream if chunk.choices)))
PY
}

step "compose up: cpu profile, 1 worker (router waits for it to be healthy)"
export ROUTER_PORT=$PORT OMP_NUM_THREADS=1 HF_CACHE=$WORK/hf-cache
mkdir -p "$HF_CACHE"
compose up -d --no-build --scale cpu-worker=1
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 2; done
compose ps
wait_workers 1

step "OpenAI SDK requests through the router"
sdk_requests

step "scale up: cpu-worker=2"
compose up -d --no-build --no-recreate --scale cpu-worker=2
wait_workers 2
sdk_requests
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^radixfleet_router_(requests_total|workers)[{ ]' || true

step "scale down: cpu-worker=1"
compose up -d --no-build --no-recreate --scale cpu-worker=1
wait_workers 1
sdk_requests

step "router log: discovery"
compose logs --no-color cpu-router | grep -E "DNS|joined|left" || true

step "stop: the containers drain within stop_grace_period"
start=$(date +%s)
compose stop
echo "stopped in $(( $(date +%s) - start )) s"
compose logs --no-color | grep -iE "drain|shutting|shutdown" | tail -8 || true

step "PASS"
