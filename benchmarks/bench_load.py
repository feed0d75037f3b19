"""Load: a sweep of many small trials on local Ray (BENCHMARKS.md, "Load").

    python benchmarks/bench_load.py [--trials 32] [--sizes 1000,8000] [--cpus 4] [--epochs 1]
        [--contrast]

For each dataset size (synthetic images) one sweep of N one-CPU trials (a grid over the
learning rate, ASHA's grace = all epochs so none is stopped), `--cpus` logical CPUs so that
many run at once. Sampled every 0.2 s while it runs: the summed PSS of this process and all
of Ray's (shared pages, the object store's included, split among the processes that map
them), the machine's used memory (MemTotal - MemAvailable: other users' processes count
too) and the object store's bytes in use. If every trial copied the dataset, the PSS peak
would grow by (trials at once + 1) x the dataset between the two sizes; shared through the
object store it grows by about one dataset. `--contrast` adds a sweep of the largest size
with the images stored NHWC, so that each trial makes its own NCHW copy: what a copy per
trial costs, measured the same way. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import PeakMemory  # noqa: E402

from cifar_ray import space as S  # noqa: E402
from cifar_ray import tune as TU  # noqa: E402
from cifar_ray.train import init_local  # noqa: E402

MODEL = {"name": "cnn", "args": {"depth": 2, "filters": 16, "convs": 1, "dense_layers": 0}}


def _machine_used() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = lambda key: int(info[key].split()[0]) * 1024  # noqa: E731
    return kb("MemTotal") - kb("MemAvailable")


def _store_used() -> int:
    """Bytes in Ray's object store (a private API: a benchmark, not the product, uses it)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


class Sampler(PeakMemory):
    """PeakMemory's PSS peak (`.peak`), plus the peaks of the machine's used memory and of
    the object store."""

    def __init__(self):
        super().__init__()
        self.machine = self.store = 0
        self.error = None

    def _sample(self) -> int:
        self.machine = max(self.machine, _machine_used())
        try:
            self.store = max(self.store, _store_used())
        except Exception as e:  # the store is briefly unreachable while Ray starts/stops
            self.error = repr(e)
        return super()._sample()


def sweep(images: int, trials: int, epochs: int, copied: bool = False) -> dict:
    lrs = [round(0.02 + 0.005 * i, 4) for i in range(trials)]
    space = S.parse({"base": {"data": {"source": f"synthetic:{images}"}, "model": MODEL,
                              # eval batches of 100: activations that do not grow with the data
                              "train": {"epochs": epochs, "batch_size": 64,
                                        "eval_batch_size": 100}},
                     "grid": {"optim.lr": lrs}}, "bench-load")
    settings = S.resolve_settings(space, {"grace": epochs, "cpus_per_trial": 1})
    from cifar_ray.data.split import load_split
    from cifar_ray import config as C

    dataset = load_split(C.from_dict(space.base)).nbytes  # prepares the cache before the clock
    shared = TU.load_split
    if copied:  # the contrast: NHWC in the store, so each trial makes its own NCHW copy
        TU.load_split = lambda cfg, **_: shared(cfg, nchw=False)
    with tempfile.TemporaryDirectory() as tmp, Sampler() as s:
        t0 = time.perf_counter()
        sw = TU.run(S.plan_sweep(space, settings), Path(tmp) / "sweep", echo=lambda *a: None)
        wall = time.perf_counter() - t0
    TU.load_split = shared
    done = sum(t.status == "done" for t in sw.trials)
    mb = lambda b: round(b / 2**20)  # noqa: E731
    return {"images": images, "layout": "nhwc_copied" if copied else "nchw_shared",
            "dataset_mb": round(dataset / 2**20, 1), "trials_done": done,
            "wall_s": round(wall, 1), "peak_pss_mb": mb(s.peak),
            "peak_machine_used_mb": mb(s.machine), "peak_object_store_mb": round(s.store / 2**20, 1),
            **({"store_error": s.error} if s.error else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--sizes", default="1000,8000", help="synthetic images per sweep")
    ap.add_argument("--cpus", type=int, default=4, help="Ray's logical CPUs = trials at once")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--contrast", action="store_true",
                    help="also the largest size with a copy per trial (NHWC in the store)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    init_local(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
               logging_level="WARNING")
    sizes = [int(n) for n in args.sizes.split(",")]
    runs = [sweep(n, args.trials, args.epochs) for n in sizes]
    small, big = runs[0], runs[-1]
    if args.contrast:
        runs.append(sweep(sizes[-1], args.trials, args.epochs, copied=True))
    ray.shutdown()
    extra_data = big["dataset_mb"] - small["dataset_mb"]
    result = {"bench": "load", "trials": args.trials, "trials_at_once": args.cpus,
              "epochs": args.epochs, "runs": runs,
              "pss_growth_per_dataset_growth": round((big["peak_pss_mb"] - small["peak_pss_mb"])
                                                     / extra_data, 2) if extra_data else None,
              "if_copied_per_trial": args.cpus + 1,
              **({"copied_minus_shared_pss_mb": runs[-1]["peak_pss_mb"] - big["peak_pss_mb"]}
                 if args.contrast else {}),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                         f"{round(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30)} GiB",
              "load_average": round(os.getloadavg()[0], 1),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
