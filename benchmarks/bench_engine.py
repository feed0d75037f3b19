"""The engine alone (no Ray) on one device: images/s and accuracy per epoch for a few
models on the same data split. Runs where Ray is not installed (e.g. a bare GPU box).

    python benchmarks/bench_engine.py --data DATA [--device cuda] [--models resnet18,seed-vgg-bn]
        [--epochs 10] [--batch-size 512] [--set key=value ...]

Prints one JSON line per model; training seconds exclude data loading and model build.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from cifar_ray import config as C
from cifar_ray import engine
from cifar_ray.data.split import load_split


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet18,seed-vgg-bn")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    base = C.load_config(None, [f"data.source={args.data}"])
    data = load_split(base)
    load_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    for model in args.models.split(","):
        cfg = C.load_config(None, [f"data.source={args.data}", f"model.name={model}",
                                   f"train.epochs={args.epochs}",
                                   f"train.batch_size={args.batch_size}", f"optim.lr={args.lr}",
                                   "optim.label_smoothing=0.1", *args.sets])
        t0 = time.perf_counter()
        hist = engine.fit(cfg, data, device=device)
        wall = time.perf_counter() - t0
        print(json.dumps({
            "model": model, "device": name, "torch": torch.__version__,
            "train_images": len(data.train[1]), "val_images": len(data.val[1]),
            "epochs": args.epochs, "batch_size": args.batch_size, "load_s": round(load_s, 2),
            "wall_s": round(wall, 1), "train_s": round(sum(h["seconds"] for h in hist), 1),
            "images_per_s_steady": round(sum(h["images_per_s"] for h in hist[1:]) /
                                         max(1, len(hist) - 1), 0),
            "val_acc": [round(h["val_acc"], 4) for h in hist],
            "sets": args.sets,
        }), flush=True)


if __name__ == "__main__":
    main()
