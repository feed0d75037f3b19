"""Ray Train (1 worker) vs the engine alone, side by side in one run: training images/s on
the same model, batch, data and thread count; plus the loader+augmentation share of a step.

    python benchmarks/bench_train.py [--data DATA] [--model NAME] [--limit N]
                                     [--settle S] [--measure S]

Prints one JSON object. Steady-state figures: epochs starting within the first `--settle`
seconds of training are dropped; runs last about settle + measure seconds. The measurement
itself is `cifar_ray.bench.ray_vs_engine`, the same one `cifar-ray bench` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from cifar_ray import config as C
from cifar_ray.bench import ray_vs_engine
from cifar_ray.data.split import load_split

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED) if SHARED.exists() else "synthetic:10000")
    ap.add_argument("--model", default="seed-small")
    ap.add_argument("--limit", type=int, default=0, help="train images (0: all)")
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--measure", type=float, default=20.0)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    cfg = C.load_config(None, [f"model.name={args.model}", f"data.source={args.data}",
                               f"data.limit={args.limit}", f"train.batch_size={args.batch_size}"])
    result = ray_vs_engine(cfg, load_split(cfg), threads=os.cpu_count(),
                           settle_s=args.settle, measure_s=args.measure)
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "data": args.data, **result, "ray_vs_engine": result["ratio"]}, indent=2))


if __name__ == "__main__":
    main()
