"""Ray Train (1 worker) vs the engine alone, side by side in one run: training images/s on
the same model, batch, data and thread count; plus the loader+augmentation share of a step.

    python benchmarks/bench_train.py [--data DATA] [--model NAME] [--limit N] [--epochs E]

Prints one JSON object. Steady-state figures: the first epoch (warm-up) is dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from cifar_ray import config as C
from cifar_ray import engine
from cifar_ray.data.loader import DeviceLoader
from cifar_ray.train import load_split, run, to_split

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-train-jpeg.tar.gz"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED) if SHARED.exists() else "synthetic:10000")
    ap.add_argument("--model", default="seed-small")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    threads = os.cpu_count()
    cfg = C.load_config(None, [f"model.name={args.model}", f"data.source={args.data}",
                               f"data.limit={args.limit}", f"train.epochs={args.epochs}",
                               f"train.batch_size={args.batch_size}", "scale.workers=1",
                               f"scale.cpus_per_worker={threads}"])
    torch.set_num_threads(threads)
    data = to_split(load_split(cfg))

    # Loader + augmentation alone, one epoch, same batches as training.
    loader = DeviceLoader(*data.train, batch_size=args.batch_size, device="cpu", mean=data.mean,
                          std=data.std, aug=cfg.aug, seed=0)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    loader_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    alone = engine.fit(cfg, data, device=torch.device("cpu"))
    alone_wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(cfg, Path(tmp) / "run", echo=lambda *a: None)
        from cifar_ray import rundir
        ray_hist = rundir.read_metrics(Path(tmp) / "run" / "metrics.csv")

    def steady(hist):
        rows = hist[1:] or hist
        return sum(r["images_per_s"] for r in rows) / len(rows)

    engine_ips, ray_ips = steady(alone), steady(ray_hist)
    step_s = sum(r["seconds"] for r in alone[1:] or alone) / len(alone[1:] or alone)
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "data": args.data, "model": args.model, "train_images": len(data.train[1]),
        "batch_size": args.batch_size, "epochs": args.epochs, "threads": threads,
        "engine_images_per_s": round(engine_ips, 1), "ray_train_images_per_s": round(ray_ips, 1),
        "ray_vs_engine": round(ray_ips / engine_ips, 3),
        "loader_epoch_s": round(loader_s, 3), "train_epoch_s": round(step_s, 3),
        "loader_share_of_step": round(loader_s / step_s, 4),
        "engine_wall_s": round(alone_wall, 1), "ray_wall_s": round(summary["wall_seconds"], 1),
    }, indent=2))


if __name__ == "__main__":
    main()
