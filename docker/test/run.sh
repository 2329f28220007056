#!/usr/bin/env bash
# `make docker-test`: build both images and run the whole system in containers through the demo batch
# and an API job, on a host without Docker Hub (Debian's docker.io, a debootstrapped base image).
#
#   1. setup     docker.io, debootstrap, docker-compose (apt), dockerd, the local Debian image (cached)
#   2. images    local/python:3.11-bookworm, ipab/test-services:test (Redis, PostgreSQL, SeaweedFS),
#                ipab/control-plane:test (no torch: checked), ipab/worker:test-cpu (CPU torch)
#   3. inputs    the tiny model set and the demo's photos and manifest, written on the host
#   4. up        docker/test/compose.yaml: services, schema, API, beat, reconciler, one CPU worker
#   5. batch     `ipab submit` in the control-plane container; every image in S3 with its SQL sha256
#   6. api       a key from `ipab keys create`; upload, POST /v1/jobs, poll, fetch the image
#   7. down      containers removed; the images and dockerd stay (the next run is warm)
#
# Needs root (apt, dockerd) and the repository's .venv (the Makefile target builds it).
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$PWD
PY=$REPO/.venv/bin/python
DOCKER=/usr/bin/docker  # Debian's client; another `docker` earlier on PATH may be a stub
export IPAB_TEST_DIR=$REPO/build/docker-test
LOGS=$IPAB_TEST_DIR/logs
DEBIAN_IMAGE=local/debian:bookworm
PYTHON_IMAGE=local/python:3.11-bookworm
TORCH_CPU_WHEEL=${TORCH_CPU_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
APT_MIRROR=${APT_MIRROR:-http://deb.debian.org/debian}
API=http://127.0.0.1:11080
S3=http://127.0.0.1:11333
JOBS_PER_REFERENCE=4
STEPS=2
COMPOSE=(docker-compose --project-name ipab-test --file docker/test/compose.yaml)
export DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1

T0=$SECONDS
PHASE_START=$SECONDS
PHASE=""
phase() {  # phase NAME: ends the previous phase (printing its time) and starts NAME
    [ -z "$PHASE" ] || printf '== %-8s %4d s\n' "$PHASE" $((SECONDS - PHASE_START))
    PHASE=$1
    PHASE_START=$SECONDS
}

compose() { "${COMPOSE[@]}" "$@"; }
cli() { compose run --rm -T cli "$@" 2>>"$LOGS/cli.log"; }  # a one-off control-plane container; stdout is its output

on_exit() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "docker-test FAILED in phase '$PHASE' (logs under $LOGS)" >&2
        tail -n 20 "$LOGS/cli.log" >&2 2>/dev/null || true
        [ -x /usr/bin/docker-compose ] && compose logs --no-color --tail=30 api beat reconciler worker >&2 2>/dev/null || true
    fi
    [ -x /usr/bin/docker-compose ] && compose --profile cli down --volumes --remove-orphans >/dev/null 2>&1 || true
    exit $rc
}
trap on_exit EXIT

build() {  # build TAG DOCKERFILE CONTEXT [ARGS...]: logs go to $LOGS/TAG.log
    local tag=$1 file=$2 context=$3 log
    shift 3
    log=$LOGS/${tag//[:\/]/_}.log
    if ! $DOCKER build --network host --progress plain -t "$tag" -f "$file" "$@" "$context" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        return 1
    fi
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retries COMMAND every second
    local timeout_s=$1 what=$2
    shift 2
    for _ in $(seq "$timeout_s"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "$what did not come up within $timeout_s s" >&2
    return 1
}

mkdir -p "$LOGS"

# 1. Setup: the tools, the daemon, the base image (debootstrap only when it is missing).
phase setup
if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/sbin/debootstrap ] || [ ! -x /usr/bin/docker-compose ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap docker-compose >"$LOGS/apt.log" 2>&1
fi
if ! $DOCKER info >/dev/null 2>&1; then
    # No bridge and no iptables (containers use the host's network); it outlives this run.
    nohup /usr/sbin/dockerd --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none \
        >"$LOGS/dockerd.log" 2>&1 &
    wait_for 30 dockerd $DOCKER info
fi
if ! $DOCKER image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$rootfs" "$APT_MIRROR" >"$LOGS/debootstrap.log"
    tar -C "$rootfs" -c . | $DOCKER import - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

# 2. Images. The base trusts this host's extra CAs (pip reaches PyPI through a proxy that has its own).
phase images
base_ctx=$IPAB_TEST_DIR/base-context
rm -rf "$base_ctx" && mkdir -p "$base_ctx/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$base_ctx/ca-certificates/" 2>/dev/null || true
build "$PYTHON_IMAGE" docker/Dockerfile.base "$base_ctx" --build-arg DEBIAN=$DEBIAN_IMAGE
build ipab/test-services:test docker/Dockerfile.test-services . --build-arg BASE=$PYTHON_IMAGE
build ipab/control-plane:test docker/Dockerfile.scheduler . --build-arg BASE=$PYTHON_IMAGE
if $DOCKER run --rm --network host ipab/control-plane:test python -c "import torch" 2>/dev/null; then
    echo "the control-plane image imports torch: it must not carry it" >&2
    exit 1
fi
# The worker takes the CPU wheel from docker/wheels/ (no multi-GB CUDA download).
rm -f docker/wheels/*.whl
if [ -f "$TORCH_CPU_WHEEL" ]; then ln "$TORCH_CPU_WHEEL" docker/wheels/ 2>/dev/null || cp "$TORCH_CPU_WHEEL" docker/wheels/; fi
build ipab/worker:test-cpu docker/Dockerfile.worker . --build-arg BASE=$PYTHON_IMAGE --build-arg TORCH_FLAVOR=cpu
$DOCKER run --rm --network host ipab/worker:test-cpu python -c "import torch; assert not torch.cuda.is_available()"
$DOCKER images --format '   {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'local/|ipab/'

# 3. Inputs, on the host: the tiny model set (kept between runs: same seed, same bytes) and the demo's files.
phase inputs
if [ ! -f "$IPAB_TEST_DIR/models/model-set.toml" ]; then
    "$PY" -m devkit synth "$IPAB_TEST_DIR/models" >"$LOGS/synth.log" 2>&1
fi
chmod -R a+rX "$IPAB_TEST_DIR/models"  # the containers run as uid 1000; safetensors files are written 0600
rm -rf "$IPAB_TEST_DIR/inputs"
"$PY" -m devkit docker-check inputs "$IPAB_TEST_DIR/inputs" --jobs-per-reference $JOBS_PER_REFERENCE

# 4. Up: services first, the schema once, then the ipab processes.
phase up
compose --profile cli down --volumes --remove-orphans >/dev/null 2>&1 || true  # a previous run's leftovers
compose up -d redis postgres s3 2>>"$LOGS/compose.log"
wait_for 60 "Redis" $DOCKER exec ipab-test_redis_1 redis-cli -p 11379 ping
wait_for 60 "PostgreSQL" $DOCKER exec ipab-test_postgres_1 pg_isready -h 127.0.0.1 -p 11432
"$PY" -m devkit docker-check wait-s3 --s3 $S3
cli ipab db upgrade >/dev/null
compose up -d api beat reconciler worker 2>>"$LOGS/compose.log"
wait_for 60 "the API" curl -sf $API/readyz
wait_for 120 "the worker" cli celery -A ipab.celery_cli:app inspect ping

# 5. The demo batch, submitted from the control-plane container.
phase batch
expect=$((3 * JOBS_PER_REFERENCE))
cli ipab submit "$IPAB_TEST_DIR/inputs/manifest.jsonl" --batch docker-demo \
    --set width=64 --set height=64 --set steps=$STEPS >/dev/null
timeout 240 "${COMPOSE[@]}" run --rm -T cli ipab status docker-demo --watch --interval 1 >/dev/null 2>>"$LOGS/cli.log"
cli ipab results docker-demo | "$PY" -m devkit docker-check outputs --s3 $S3 --expect $expect

# 6. An API job, with a key made in the control-plane container.
phase api
key=$(cli ipab keys create --tenant docker-test | tail -n 1)
"$PY" -m devkit docker-check api-job --api $API --key "$key" --reference "$IPAB_TEST_DIR/inputs/references/astronaut.png"

# 7. Down (the EXIT trap removes the containers on failure too).
phase down
compose --profile cli down --volumes --remove-orphans >/dev/null 2>&1
phase ""
echo "docker-test passed in $((SECONDS - T0)) s"
