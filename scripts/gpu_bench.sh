#!/usr/bin/env bash
# The GPU benchmarks in one go, within 10 minutes on a bare GPU machine (docs/PERFORMANCE.md, "GPU path"):
#
#   PYTHONUNBUFFERED=1 bash scripts/gpu_bench.sh 2>&1 | tee $OUT/gpu_bench.log
#
# 1. the machine: nvidia-smi, CPU, Python, torch, /dev/shm (the decode workers pass batches through it);
# 2. installs the wheels carried in .whl/ (packages the machine lacks: open_clip_torch, faiss-cpu, fastapi,
#    uvicorn, pydantic, ...) into /tmp/site, puts it and this checkout on PYTHONPATH (no pip install of the
#    project: `lookalike` runs as `python -m indexer.cli`), and checks that everything imports;
# 3. scripts/bench_index.py --device cuda: images/s of a plain open_clip fp32 loop vs `lookalike index`,
#    GPU utilisation while indexing, and the rate of decoding alone, on Magento photos and CIFAR-10;
# 4. scripts/bench_query.py: the server on loopback, latency and queries/s with 1, 4 and 16 clients.
#
# Code: .whl/src.tar when present (see below; made with
#   git archive -o .whl/src.tar HEAD indexer server scripts data/labels pyproject.toml && git rev-parse HEAD >.whl/src.commit),
# else the working tree.
# Photos come from $LOOKALIKE_DATASETS: .whl/data when it exists (magento/images/**/*.jpg and
# cifar10/test.tar.gz copied there, git-ignored, never committed), else ../shared/datasets.
# Logs and JSON go to $OUT (default out/gpu-bench): machine.txt, bench_index.log/.json,
# bench_query.log/.json. Each step has a time limit (seconds; environment variables below), so a hang
# still leaves the logs of the steps before it.
#
# Settings (environment): DEVICE (cuda), IMAGES (2000 per set), INDEX_ARGS (extra bench_index.py
# arguments), QUERY_ARGS (bench_query.py arguments; default "--queries 50 --seconds 5"), PYTHON (python3),
# WHEELS (.whl), SITE (/tmp/site), INDEX_TIMEOUT (300), QUERY_TIMEOUT (170).
# A dry run on a machine without a GPU (the project's venv, nothing installed):
#   DEVICE=cpu IMAGES=24 QUERY_ARGS="--quick --model test-tiny --seconds 1" PYTHON=.venv/bin/python \
#     WHEELS=/nonexistent bash scripts/gpu_bench.sh
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/out/gpu-bench}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-2000}
INDEX_ARGS=${INDEX_ARGS:-}
QUERY_ARGS=${QUERY_ARGS:---queries 50 --seconds 5}
INDEX_TIMEOUT=${INDEX_TIMEOUT:-300}
QUERY_TIMEOUT=${QUERY_TIMEOUT:-170}
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
if [ -n "${LOOKALIKE_DATASETS:-}" ]; then
    LOOKALIKE_DATASETS=$(cd "$LOOKALIKE_DATASETS" && pwd) || exit 1
    export LOOKALIKE_DATASETS
elif [ -d "$WHEELS/data" ]; then
    export LOOKALIKE_DATASETS="$WHEELS/data"
fi
# A committed snapshot of the code (git archive of a commit, with the commit id in src.commit) runs
# instead of the working tree when there is one: the figures then belong to that commit, whatever
# half-finished edits the working tree held when it was copied to the machine.
SRC_TAR=${SRC_TAR:-$WHEELS/src.tar}
CODE="working tree $ROOT"
if [ -f "$SRC_TAR" ]; then
    src=/tmp/lookalike-src
    rm -rf "$src" && mkdir -p "$src" && tar xf "$SRC_TAR" -C "$src" || { echo "error: cannot unpack $SRC_TAR"; exit 1; }
    CODE="commit $(cat "${SRC_TAR%.tar}.commit" 2>/dev/null || echo unknown) (from $SRC_TAR)"
    ROOT=$src
    cd "$ROOT"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
START=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - START )) s] $*"; }
status=0

stamp "machine"
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    grep -m1 "model name" /proc/cpuinfo
    echo "cores: $(nproc)"
    free -g | head -2
    df -h /dev/shm | tail -1
    "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    echo "datasets: ${LOOKALIKE_DATASETS:-../shared/datasets}"
    echo "code: $CODE"
} 2>&1 | tee "$OUT/machine.txt"
# DataLoader workers hand batches (256 x 3 x 224 x 224 fp32 = 154 MB) over /dev/shm: a small one
# (some containers give 64 MB) makes them die with "bus error"
shm_kb=$(df -k /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')
if [ -n "$shm_kb" ] && [ "$shm_kb" -lt 4194304 ] && [ "$(id -u)" = 0 ]; then
    mount -o remount,size=16G /dev/shm && echo "/dev/shm enlarged to 16G" | tee -a "$OUT/machine.txt"
fi

stamp "install"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "error: installing the wheels from $WHEELS failed"; exit 1; }
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in $WHEELS: using $PYTHON's own packages"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c 'import open_clip, faiss, fastapi, uvicorn, pydantic, pydantic_settings, multipart, prometheus_client
import indexer.cli, server.app
print("imports ok: open_clip", open_clip.__version__, "faiss", faiss.__version__, "fastapi", fastapi.__version__)' \
    || { echo "error: the project does not import"; exit 1; }

# run NAME TIMEOUT SCRIPT ARGS...: stderr (progress) to $OUT/NAME.log and the terminal, stdout (the
# tables and the JSON line) to both after the run; the JSON line alone to $OUT/NAME.json
run() {
    local name=$1 limit=$2
    shift 2
    stamp "$name: $*"
    timeout --kill-after=10 "$limit" "$PYTHON" "$@" --json >"$OUT/$name.stdout" 2> >(tee "$OUT/$name.log" >&2)
    local rc=$?
    sleep 0.5  # let tee finish
    grep -v '^{' "$OUT/$name.stdout" | tee -a "$OUT/$name.log"
    grep '^{' "$OUT/$name.stdout" | tail -1 >"$OUT/$name.json"
    rm -f "$OUT/$name.stdout"
    [ -s "$OUT/$name.json" ] || rm -f "$OUT/$name.json"
    if [ $rc -ne 0 ]; then
        echo "error: $name exited with $rc$([ $rc = 124 ] && echo " (over its $limit s)")" | tee -a "$OUT/$name.log"
        status=1
    fi
}

# shellcheck disable=SC2086  # INDEX_ARGS and QUERY_ARGS are word lists
run bench_index "$INDEX_TIMEOUT" scripts/bench_index.py --device "$DEVICE" --images "$IMAGES" $INDEX_ARGS
# shellcheck disable=SC2086
run bench_query "$QUERY_TIMEOUT" scripts/bench_query.py --device "$DEVICE" $QUERY_ARGS

stamp "done (status $status)"
ls -la "$OUT"
exit $status
