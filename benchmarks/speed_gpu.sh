#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("Speed") in one command on a GPU machine: `speed`
# with the engine alone (no Ray there) and airbench94 from PyPI side by side, then `cifar-ray bench`.
# From the repo root, with .devdata/ (the JPEG tarball) and .whl/ (airbench's wheel) carried:
#   OUT=/some/dir bash benchmarks/speed_gpu.sh [speed_gpu.py options]   (SKIP_BENCH=1: no bench)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site CIFAR_RAY_HOME=${CIFAR_RAY_HOME:-/tmp/cifar-ray-home}
DATA=.devdata/cifar10-train-jpeg.tar.gz
OUT=${OUT:-/tmp/speed-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m cifar_ray data prepare "$DATA" 2>&1 | tail -1
python3 benchmarks/speed_gpu.py --data "$DATA" --runs 3 --out "$OUT" "$@" 2>&1 \
    | grep -v '"config"' | tee "$OUT/speed_gpu.log"
[ -n "${SKIP_BENCH:-}" ] && exit 0
python3 -m cifar_ray bench --data "$DATA" --only loader --only speed --json \
    > "$OUT/bench.json" 2> "$OUT/bench.log"
cat "$OUT/bench.log"
