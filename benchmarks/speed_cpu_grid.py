"""Sizing `speed-cpu` with a GPU's help: the accuracy a CPU-sized variant of the speed
recipe reaches does not depend on the hardware, so a GPU can try many variants in the time
the 2-core CPU trains one. Each row: the variant, its MACs per image, the val accuracy
(TTA) after each epoch. The CPU time of a variant is then images x MACs / (the CPU's
measured MACs/s): see BENCHMARKS.md "Speed".

    python benchmarks/speed_cpu_grid.py --data DATA [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from cifar_ray import config as C
from cifar_ray import engine
from cifar_ray.models import model_info
from cifar_ray.data.split import load_split

# (block1, block2, block3, epochs, batch size, extra overrides)
GRID = [
    (32, 64, 128, 2, 256, ()),
    (32, 64, 128, 3, 256, ()),
    (32, 64, 128, 3, 128, ()),
    (24, 64, 128, 3, 256, ()),
    (16, 64, 128, 3, 256, ()),
    (16, 64, 128, 4, 256, ()),
    (16, 48, 96, 4, 256, ()),
    (32, 64, 128, 3, 256, ("optim.label_smoothing=0.1",)),
    (32, 64, 128, 16, 256, ()),
    (32, 128, 256, 10, 512, ()),
    (64, 128, 256, 10, 512, ()),
    (48, 192, 192, 10, 512, ()),
    (64, 128, 256, 16, 512, ()),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/speed-grid"))
    ap.add_argument("--limit-rows", type=int, default=len(GRID))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    base = C.load_config("speed-cpu", [f"data.source={args.data}", *args.sets])
    data = load_split(base)
    t00 = time.perf_counter()
    for b1, b2, b3, epochs, batch, extra in GRID[:args.limit_rows]:
        sets = [f"model.args.block1={b1}", f"model.args.block2={b2}", f"model.args.block3={b3}",
                f"train.epochs={epochs}", f"train.batch_size={batch}",
                f"optim.warmup_epochs={0.23 * epochs:.2f}", *extra]  # rise for 23% of the run
        cfg = C.load_config("speed-cpu", [f"data.source={args.data}", *args.sets, *sets])
        t0 = time.perf_counter()
        hist = engine.fit(cfg, data, device=device)
        row = {"widths": [b1, b2, b3], "epochs": epochs, "batch_size": batch,
               "extra": list(extra), "macs": model_info("speed", block1=b1, block2=b2,
                                                        block3=b3)["macs"],
               "val_acc": [round(h["val_acc"], 4) for h in hist],
               "wall_s": round(time.perf_counter() - t0, 1),
               "elapsed_s": round(time.perf_counter() - t00, 1)}
        print(json.dumps(row), flush=True)
        with open(out / "speed_cpu_grid.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
