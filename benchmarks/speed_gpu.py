"""Time to accuracy on one GPU: the `speed` recipe (the engine alone, no Ray) and, side by
side on the same GPU and the same train/val split, airbench94 from PyPI.

    python benchmarks/speed_gpu.py --data DATA [--runs 3] [--out DIR] [--budget-s 200]

Both train on the same training split and are scored on the same held-out validation split
(carved from the 50k training images: neither sees the images it is scored on). Times:
`train_s` is the sum of training epochs (GPU synchronised, evaluation excluded); `wall_s` is
the whole call (model build, data-dependent init, per-epoch evaluation); start-up (CUDA
context, cuDNN autotuning) is paid by a warm-up run first, and compile time is reported
apart. Writes DIR/speed_gpu.jsonl (one object per run) and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cifar_ray import config as C
from cifar_ray import engine
from cifar_ray.data.split import load_split

T0 = time.perf_counter()


def log(out: Path, row: dict) -> None:
    row = {"elapsed_s": round(time.perf_counter() - T0, 1), **row}
    print(json.dumps(row), flush=True)
    with open(out / "speed_gpu.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_speed(cfg: C.Config, data, device, label: str) -> dict:
    try:
        return _run_speed(cfg, data, device, label)
    except Exception as e:  # recorded; the other parts still run
        return {"run": label, "seed": cfg.train.seed, "error": f"{type(e).__name__}: {e}"}


def _run_speed(cfg: C.Config, data, device, label: str) -> dict:
    sync(device)
    t0 = time.perf_counter()
    hist = engine.fit(cfg, data, device=device)
    wall = time.perf_counter() - t0
    secs = [h["seconds"] for h in hist]
    return {"run": label, "seed": cfg.train.seed, "compile": cfg.train.compile,
            "epochs": cfg.train.epochs, "train_s": round(sum(secs), 3),
            "first_epoch_s": round(secs[0], 3),
            "steady_epoch_s": round(statistics.median(secs[1:] or secs), 3),
            "wall_s": round(wall, 2), "val_acc_tta": round(hist[-1]["val_acc"], 4),
            "curve": [[round(sum(secs[:i + 1]), 2), round(h["val_acc"], 4)]
                      for i, h in enumerate(hist)],
            "images_per_s": round(statistics.median(h["images_per_s"] for h in hist[1:] or hist))}


def airbench_runs(data, runs: int, out: Path) -> None:
    """airbench94 (pip package) on our split: its loader reads DIR/cifar10/{train,test}.pt,
    so we write our training split as its train set and our validation split as its test."""
    import airbench

    tmp = Path(tempfile.mkdtemp())
    (tmp / "cifar10").mkdir()
    for name, (x, y) in (("train", data.train), ("test", data.val)):
        torch.save({"images": torch.from_numpy(x), "labels": torch.from_numpy(y).long(),
                    "classes": list(data.classes)}, tmp / "cifar10" / f"{name}.pt")
    os.chdir(tmp)  # train94 opens 'cifar10/test.pt' relative to the working directory
    loader = airbench.CifarLoader("cifar10", train=True, batch_size=1024,
                                  aug=dict(flip=True, translate=2), altflip=True)
    test = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    for i in range(-1, runs):  # run -1 is airbench's own warm-up: it stops after one step
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            model = airbench.train94(train_loader=loader, run=i, verbose=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        # Its own table's last row holds its training + TTA time (evaluation excluded).
        rows = [l for l in printed.getvalue().splitlines() if l.startswith("|") and "eval" in l]
        own_s = float(rows[-1].strip("|").split("|")[-1]) if rows else None
        row = {"run": "airbench94" if i >= 0 else "airbench94 warm-up", "seed": i,
               "own_time_s": own_s, "wall_s": round(wall, 2)}
        if model is not None:  # the warm-up returns none
            row["val_acc_tta"] = round(airbench.evaluate(model, test, tta_level=2), 4)
            row["val_acc"] = round(airbench.evaluate(model, test, tta_level=0), 4)
        log(out, row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/speed-gpu"))
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="skip the optional parts (compile) once this much time has passed")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no airbench)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    ap.add_argument("--variant", action="append", default=[],
                    help="'key=value ...': one extra run with these overrides (repeatable)")
    ap.add_argument("--no-extras", dest="extras", action="store_false",
                    help="skip the 12-epoch and torch.compile runs")
    args = ap.parse_args()
    out = Path(args.out).resolve()  # airbench's part changes the working directory
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    cfg = C.load_config("speed", [f"data.source={args.data}", *args.sets])
    data = load_split(cfg)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(out, {"run": "setup", "gpu": name, "torch": torch.__version__,
              "train_images": len(data.train[1]), "val_images": len(data.val[1]),
              "config": C.to_dict(cfg)})

    air = []
    try:
        if device.type != "cuda":
            raise RuntimeError("airbench needs CUDA")
        airbench_runs(data, args.runs, out)
        air = [json.loads(l) for l in open(out / "speed_gpu.jsonl")
               if '"run": "airbench94"' in l]
    except Exception as e:  # recorded, and the rest still runs
        log(out, {"run": "airbench94", "error": f"{type(e).__name__}: {e}"})

    log(out, run_speed(C.replace(cfg, train__epochs=1), data, device, "speed warm-up"))
    speed = []
    for seed in range(args.runs):
        speed.append(run_speed(C.replace(cfg, train__seed=seed), data, device, "speed"))
        log(out, speed[-1])
        if "error" in speed[-1]:
            break

    for variant in args.variant:  # one run each: what a single change does
        log(out, run_speed(C.load_config("speed", [f"data.source={args.data}", *args.sets,
                                                   *variant.split()]),
                           data, device, f"speed + {variant}"))

    longer = []  # how accuracy moves with a little more training
    for seed in range(2 if args.extras else 0):
        longer.append(run_speed(C.replace(cfg, train__seed=seed, train__epochs=12), data,
                                device, "speed 12 epochs"))
        log(out, longer[-1])
        if "error" in longer[-1]:
            break

    compiled = []
    for seed in range(2 if args.extras else 0):  # the first pays for compiling, the second not
        if time.perf_counter() - T0 > args.budget_s:
            log(out, {"run": "speed compiled", "skipped": f"past --budget-s {args.budget_s}"})
            break
        compiled.append(run_speed(C.replace(cfg, train__seed=seed, train__compile=True),
                                  data, device, "speed compiled"))
        log(out, compiled[-1])
        if "error" in compiled[-1]:
            break

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return f"{statistics.mean(vals):.4f}" if vals else "-"

    print("\nsummary (means over runs)")
    print(f"  speed            n={len(speed)}  val acc (TTA) {mean(speed, 'val_acc_tta')}  "
          f"train {mean(speed, 'train_s')} s  wall {mean(speed, 'wall_s')} s")
    print(f"  speed 12 epochs  n={len(longer)}  val acc (TTA) {mean(longer, 'val_acc_tta')}  "
          f"train {mean(longer, 'train_s')} s")
    if compiled:
        print(f"  speed compiled   n={len(compiled)}  val acc (TTA) {mean(compiled, 'val_acc_tta')}"
              f"  train s per run {[r['train_s'] for r in compiled]}  "
              f"steady epoch {[r['steady_epoch_s'] for r in compiled]}")
    print(f"  airbench94       n={len(air)}  val acc (TTA) {mean(air, 'val_acc_tta')}  "
          f"own time {mean(air, 'own_time_s')} s  wall {mean(air, 'wall_s')} s")


if __name__ == "__main__":
    main()
