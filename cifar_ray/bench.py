"""`cifar-ray bench`: three measurements, each taken side by side in one run and printed as
a ratio. A benchmark, not a test: it asserts nothing about time.

1. loader   our device-resident loader + batched augmentation vs torchvision's `DataLoader`
            + `transforms.v2` doing the same augmentation (translate with reflect padding,
            random mirror, normalise) on the same images: images/s, ours / theirs.
2. ray      training images/s of Ray Train (1 worker) vs the engine alone, same model,
            data, batch and threads; steady state (Ray's start-up and the epochs of the first
            10 s of training, while Ray's own actors still start, are left out; ~30 s runs):
            Ray / engine, the engine timed before and after Ray. Skipped where Ray is not
            installed.
3. speed    time-to-accuracy of the `speed-cpu` preset (`speed` on a GPU): the validation
            curve against cumulative training seconds, and the time at which each target
            accuracy is first reached, as a share of the target's time budget.

Figures on a shared machine move with its load: compare ratios, and rerun before quoting.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cifar_ray.config import AugConfig, Config, load_config, replace
from cifar_ray.data.loader import DeviceLoader

# Time-to-accuracy targets: accuracy -> training-time budget in seconds (CPU: a laptop-sized
# run; GPU: airbench94's 0.94 in 3.8 s).
TARGETS = {"cpu": {0.80: 120.0, 0.90: 900.0}, "cuda": {0.94: 3.8}}


def machine(device: torch.device) -> dict:
    info = {"date": datetime.date.today().isoformat(), "platform": platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. loader + augmentation

class ArrayDataset(torch.utils.data.Dataset):
    """uint8 (N,H,W,3) images + labels, one CHW uint8 tensor per item, through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1)
        return self.transform(x), int(self.labels[i])


def torchvision_loader(images, labels, *, batch_size, mean, std, pad, workers, device):
    """The usual torchvision pipeline doing our augmentation: per image, in worker processes."""
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.RandomCrop(images.shape[1], padding=pad, padding_mode="reflect"),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
    return torch.utils.data.DataLoader(
        ArrayDataset(images, labels, transform), batch_size=batch_size, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda")


def _rate(batches, device: torch.device, max_images: int) -> float:
    """Images/s of an iterable of (x, y) batches, from the first batch on (start-up excluded),
    each batch landing on `device`."""
    it = iter(batches)
    next(it)
    seen, t0 = 0, time.perf_counter()
    for x, _ in it:
        x = x.to(device, non_blocking=True)
        seen += len(x)
        if seen >= max_images:
            break
    _sync(device)
    return seen / (time.perf_counter() - t0)


def loader_vs_torchvision(images, labels, mean, std, device: torch.device, *,
                          batch_size: int = 512, pad: int = 2, max_images: int = 20480) -> dict:
    """Images/s of ours vs torchvision (its best of 0 and cpu_count workers); ratio ours/theirs."""
    aug = AugConfig(crop_pad=pad, pad_mode="reflect", hflip="random")
    ours_loader = DeviceLoader(images, labels, batch_size=batch_size, device=device, mean=mean,
                               std=std, aug=aug, shuffle=True, drop_last=True)
    ours = 0.0
    for epoch in range(2):  # the best of two epochs: the first pays for allocations
        ours_loader.set_epoch(epoch)
        ours = max(ours, _rate(ours_loader, device, len(labels)))
    theirs = {}
    for workers in sorted({0, os.cpu_count() or 1}):
        dl = torchvision_loader(images, labels, batch_size=batch_size, mean=mean, std=std,
                                pad=pad, workers=workers, device=device)
        theirs[workers] = _rate(dl, device, max_images)
    best = max(theirs, key=theirs.get)
    return {"augmentation": f"translate {pad} (reflect) + random mirror + normalise",
            "batch_size": batch_size, "images": len(labels),
            "ours_images_per_s": round(ours), "torchvision_images_per_s": round(theirs[best]),
            "torchvision_workers": best,
            "torchvision_by_workers": {str(k): round(v) for k, v in theirs.items()},
            "ratio": round(ours / theirs[best], 2)}


# ---------------------------------------------------------------- 2. Ray Train vs the engine

def ray_vs_engine(cfg: Config, data, threads: int | None = None, settle_s: float = 10.0,
                  measure_s: float = 20.0, max_epochs: int = 1000) -> dict:
    """Steady-state training images/s of the engine alone and of Ray Train (1 worker) on the
    same config and data; plus the loader+augmentation share of a training epoch.

    Steady state: the epochs that start `settle_s` seconds or more into training (Ray's own
    actors are still starting during the first seconds); the run has as many epochs as
    make about `settle_s + measure_s` seconds, at most `max_epochs` (`cfg.train.epochs` is
    replaced)."""
    from cifar_ray import engine, rundir
    from cifar_ray.train import run

    threads = threads or os.cpu_count() or 1
    cfg = replace(cfg, scale__workers=1, scale__gpu=False, scale__cpus_per_worker=threads)
    torch.set_num_threads(threads)

    loader = DeviceLoader(*data.train, batch_size=cfg.train.batch_size, device="cpu",
                          mean=data.mean, std=data.std, aug=cfg.aug, seed=0)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    loader_s = time.perf_counter() - t0

    probe = engine.fit(replace(cfg, train__epochs=1), data, device=torch.device("cpu"))
    epochs = max(2, min(max_epochs, math.ceil((settle_s + measure_s) / probe[0]["seconds"])))
    cfg = replace(cfg, train__epochs=epochs)

    def steady(hist):
        started = [sum(float(r["seconds"]) for r in hist[:i]) for i in range(len(hist))]
        rows = [r for r, t in zip(hist, started) if t >= settle_s] or hist[-1:]
        return sum(float(r["images_per_s"]) for r in rows) / len(rows)

    # engine, Ray, engine again: the engine's figure is the mean of the runs either side of
    # Ray's, so a machine whose load drifts during the bench biases the ratio less.
    t0 = time.perf_counter()
    alone = engine.fit(cfg, data, device=torch.device("cpu"))
    alone_wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        summary = run(cfg, Path(tmp) / "run", echo=lambda *a: None)  # its epoch lines muted
        ray_hist = rundir.read_metrics(Path(tmp) / "run" / "metrics.csv")
    again = engine.fit(cfg, data, device=torch.device("cpu"))

    engine_ips, ray_ips = (steady(alone) + steady(again)) / 2, steady(ray_hist)
    epoch_s = sum(r["seconds"] for r in alone[1:] or alone) / len(alone[1:] or alone)
    return {
        "model": cfg.model.name, "train_images": len(data.train[1]),
        "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, "threads": threads,
        "settle_s": settle_s,
        "engine_images_per_s": round(engine_ips, 1), "ray_train_images_per_s": round(ray_ips, 1),
        "engine_runs_images_per_s": [round(steady(alone), 1), round(steady(again), 1)],
        "ratio": round(ray_ips / engine_ips, 3),
        "loader_epoch_s": round(loader_s, 3), "train_epoch_s": round(epoch_s, 3),
        "loader_share_of_step": round(loader_s / epoch_s, 4),
        "engine_wall_s": round(alone_wall, 1), "ray_wall_s": round(summary["wall_seconds"], 1),
    }


# ---------------------------------------------------------------- 3. time to accuracy

class _Curve:
    """Collects (epoch, cumulative training seconds, val acc) as the run goes; prints them."""

    def __init__(self, echo):
        self.rows, self.total, self.echo = [], 0.0, echo

    def progress(self, epoch, step, steps):
        pass

    def epoch_end(self, metrics, state):
        self.total += metrics["seconds"]
        row = {"epoch": metrics["epoch"], "train_s": round(self.total, 2),
               "val_acc": round(metrics["val_acc"], 4),
               "eval_s": round(metrics["eval_seconds"], 2),
               "images_per_s": round(metrics["images_per_s"])}
        self.rows.append(row)
        if self.echo:
            self.echo(f"  epoch {row['epoch']:>3}  {row['train_s']:8.1f} s  val acc "
                      f"{row['val_acc']:.4f}  ({row['images_per_s']:,} img/s)")


def time_to_accuracy(cfg: Config, data, device: torch.device, targets: dict,
                     echo=None) -> dict:
    """Train `cfg` with the engine alone; the validation curve against cumulative training
    seconds (evaluation and start-up excluded), and for each target accuracy the training
    time at the end of the first epoch that reached it, also as a share of its budget."""
    from cifar_ray import engine

    if device.type == "cuda":  # CUDA context and cuDNN autotuning are start-up, not training
        engine.fit(replace(cfg, train__epochs=1), data, device=device)
    curve = _Curve(echo)
    t0 = time.perf_counter()
    engine.fit(cfg, data, device=device, reporter=curve)
    wall = time.perf_counter() - t0
    reached = {}
    for acc, budget in targets.items():
        hit = next((r for r in curve.rows if r["val_acc"] >= acc), None)
        reached[f"{acc:.2f}"] = {
            "budget_s": budget, "train_s": hit["train_s"] if hit else None,
            "ratio": round(hit["train_s"] / budget, 3) if hit else None}
    return {"model": cfg.model.name, "epochs": cfg.train.epochs,
            "train_images": len(data.train[1]), "val_images": len(data.val[1]),
            "train_s": curve.rows[-1]["train_s"] if curve.rows else 0.0,
            "wall_s": round(wall, 1), "final_val_acc": curve.rows[-1]["val_acc"],
            "curve": curve.rows, "targets": reached}


# ---------------------------------------------------------------- the command

def run_bench(data_source: str | None, *, quick: bool = False, device: str | None = None,
              only: tuple[str, ...] = (), echo=print) -> dict:
    """Run the measurements and return them as a dict; `echo` prints as they come."""
    from cifar_ray.data.split import load_split

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts = set(only) or {"loader", "ray", "speed"}
    source = data_source or ("synthetic:1200" if quick else "synthetic")
    preset = "speed" if dev.type == "cuda" else "speed-cpu"
    result = {"machine": machine(dev), "data": source, "quick": quick}
    echo(f"cifar-ray bench  {result['machine']['date']}  {platform.machine()}, "
         f"{os.cpu_count()} cores, torch {torch.__version__}, {dev.type}"
         f"{' (' + result['machine']['gpu'] + ')' if dev.type == 'cuda' else ''}  data {source}")
    base = load_config(preset, [f"data.source={source}"])
    data = load_split(base)

    if "loader" in parts:
        r = loader_vs_torchvision(*data.train, data.mean, data.std, dev,
                                  batch_size=256 if quick else 512,
                                  max_images=1024 if quick else 20480)
        result["loader"] = r
        echo(f"loader+aug  ours {r['ours_images_per_s']:,} img/s  vs  torchvision DataLoader+v2 "
             f"({r['torchvision_workers']} workers) {r['torchvision_images_per_s']:,} img/s  "
             f"ratio {r['ratio']:.2f}x")

    if "ray" in parts:
        try:
            import ray  # noqa: F401
        except ImportError:
            result["ray"] = {"skipped": "ray is not installed"}
            echo("train       Ray Train vs engine: skipped (ray is not installed)")
        else:
            sets = [f"data.source={source}", "model.name=seed-small", "train.batch_size=256"]
            cfg = load_config(None, sets)
            r = ray_vs_engine(cfg, load_split(cfg),  # the split Ray's run loads
                              **({"settle_s": 0.5, "measure_s": 1.0, "max_epochs": 3} if quick else {}))
            result["ray"] = r
            echo(f"train       Ray Train (1 worker) {r['ray_train_images_per_s']:,.0f} img/s  vs  "
                 f"engine alone {r['engine_images_per_s']:,.0f} img/s  ratio {r['ratio']:.3f}x  "
                 f"({r['model']}, steady state)")

    if "speed" in parts:
        sets = ["train.epochs=2", "train.eval_batch_size=500"] if quick else []
        cfg = load_config(preset, [f"data.source={source}", *sets])
        echo(f"speed       {preset}: time to accuracy ({cfg.train.epochs} epochs, "
             f"{len(data.train[1])} train / {len(data.val[1])} held-out val images)")
        r = time_to_accuracy(cfg, data, dev, TARGETS[dev.type], echo=echo)
        r["preset"] = preset
        result["speed"] = r
        for acc, t in r["targets"].items():
            if t["train_s"] is None:
                echo(f"  val {acc}: not reached (final {r['final_val_acc']:.4f} after "
                     f"{r['train_s']:.1f} s; budget {t['budget_s']:g} s)")
            else:
                echo(f"  val {acc}: reached at {t['train_s']:.1f} s of training; budget "
                     f"{t['budget_s']:g} s: ratio {t['ratio']:.2f}x")
    return result
