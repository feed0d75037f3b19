"""Sweeps on local Ray, measured side by side in one run (BENCHMARKS.md, "Sweeps").

    python benchmarks/bench_tune.py overhead [--data DATA] [--trials 8] [--epochs 2] [--limit 5000]
    python benchmarks/bench_tune.py memory [--data DATA] [--trials 8] [--limit 20000]
        [--batch-size 128]

overhead: the same N trials (a grid over the learning rate, ASHA's grace = all epochs, so
none is stopped) run back to back by the engine alone in this process, then by
`cifar-ray tune` one at a time with all CPUs each (pure overhead), then with one CPU each
and as many at once as there are CPUs. Wall times include loading the data; Ray is started
before the clock. Prints one JSON object.

memory: peak memory (the sum of PSS over this process and all of Ray's, sampled every
0.2 s) during a sweep of one one-epoch trial and a sweep of N such trials at once (N
logical CPUs),
with the images shared NCHW (ours: a CPU trial reads the object store copy in place) and,
for contrast, NHWC (each trial makes its own NCHW copy). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from cifar_ray import config as C
from cifar_ray import space as S
from cifar_ray import tune as TU
from cifar_ray.train import init_local

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
MODEL = {"name": "cnn", "args": {"depth": 2, "filters": 16, "convs": 1, "dense_layers": 0}}


def space_of(args, lrs, epochs: int, batch: int) -> S.Space:
    return S.parse({"base": {"data": {"source": args.data, "limit": args.limit}, "model": MODEL,
                             "train": {"epochs": epochs, "batch_size": batch}},
                    "grid": {"optim.lr": lrs}}, "bench")


def sweep(space: S.Space, **flags) -> float:
    settings = S.resolve_settings(space, {"grace": space.base["train"]["epochs"], **flags})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        TU.run(S.plan_sweep(space, settings), Path(tmp) / "sweep", echo=lambda *a: None)
        return time.perf_counter() - t0


def overhead(args) -> dict:
    import ray
    import torch

    from cifar_ray import engine
    from cifar_ray.data.split import load_split

    lrs = [round(0.02 + 0.01 * i, 3) for i in range(args.trials)]
    space = space_of(args, lrs, args.epochs, 256)
    cpus = os.cpu_count()
    t0 = time.perf_counter()
    torch.set_num_threads(cpus)
    base = C.from_dict(space.base)
    split = load_split(base)
    for lr in lrs:
        engine.fit(C.replace(base, optim__lr=lr), split, device=torch.device("cpu"))
    alone = time.perf_counter() - t0
    init_local(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
               logging_level="WARNING")
    serial = sweep(space, concurrent=1, cpus_per_trial=cpus)
    packed = sweep(space, cpus_per_trial=1)
    ray.shutdown()
    return {"bench": "tune-overhead", "trials": args.trials, "epochs": args.epochs,
            "data": args.data, "limit": args.limit, "train_images": len(split.train[1]),
            "batch_size": 256, "cpus": cpus, "engine_alone_s": round(alone, 1),
            "tune_one_at_a_time_s": round(serial, 1), "ratio_one_at_a_time": round(serial / alone, 2),
            "tune_packed_s": round(packed, 1), "ratio_packed": round(packed / alone, 2)}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages (the object store) split among users."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak of the summed PSS of this process and its descendants (Ray's processes and the
    trials), sampled in a thread (Linux /proc)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        return sum(_pss(pid) for pid in _descendants(os.getpid()))

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def memory(args) -> dict:
    import ray

    lrs = [round(0.02 + 0.01 * i, 3) for i in range(args.trials)]
    init_local(num_cpus=args.trials, include_dashboard=False,
               log_to_driver=False, logging_level="WARNING")
    out = {"bench": "tune-memory", "trials": args.trials, "data": args.data, "limit": args.limit,
           "batch_size": args.batch_size}
    with PeakMemory() as idle:
        time.sleep(2)
    out["ray_idle_mb"] = round(idle.peak / 2**20)
    shared = TU.load_split
    for layout, nchw in (("nchw_shared", True), ("nhwc_copied", False)):
        # the driver's choice of layout for the object store
        TU.load_split = lambda cfg, nchw=nchw, **_: shared(cfg, nchw=nchw)
        for n in (1, args.trials):  # one trial, then n at once
            with PeakMemory() as m:
                seconds = sweep(space_of(args, lrs[:n], 1, args.batch_size), cpus_per_trial=1)
            out[f"{layout}_{n}_at_once_peak_mb"] = round(m.peak / 2**20)
            out[f"{layout}_{n}_at_once_s"] = round(seconds, 1)
    TU.load_split = shared
    split = shared(C.from_dict(space_of(args, lrs, 1, args.batch_size).base))
    out["dataset_mb"] = round(split.nbytes / 2**20)
    n = args.trials
    for layout in ("nchw_shared", "nhwc_copied"):
        extra = out[f"{layout}_{n}_at_once_peak_mb"] - out[f"{layout}_1_at_once_peak_mb"]
        out[f"{layout}_mb_per_extra_trial"] = round(extra / (n - 1))
    ray.shutdown()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "memory"])
    ap.add_argument("--data", default=str(SHARED.resolve()) if SHARED.exists() else "synthetic:20000")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    if not args.limit:
        args.limit = 5000 if args.what == "overhead" else 20000
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result = overhead(args) if args.what == "overhead" else memory(args)
    result.update(machine=f"{platform.machine()} {os.cpu_count()} CPUs, "
                          f"{round(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30)} GiB")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
