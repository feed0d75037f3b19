#!/usr/bin/env bash
# One prepared GPU session (no Ray on that machine: the engine runs alone).
# Usage, from the repo root with the JPEG tarball copied to .devdata/:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD CIFAR_RAY_HOME=${CIFAR_RAY_HOME:-/tmp/cifar-ray-home}
DATA=.devdata/cifar10-train-jpeg.tar.gz
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
/usr/bin/time -v python -m cifar_ray data prepare "$DATA" 2>&1 | grep -E "prepared|Elapsed|Maximum resident|/" | tee -a "$OUT/gpu.txt"
python benchmarks/bench_engine.py --data "$DATA" --models resnet18,seed-vgg-bn,seed-vgg-dropout \
    --epochs 8 --batch-size 512 --lr 0.2 | tee "$OUT/engine.jsonl"
python benchmarks/bench_engine.py --data "$DATA" --models resnet18 --epochs 8 --batch-size 512 \
    --lr 0.2 --set train.compile=true | tee -a "$OUT/engine.jsonl"
