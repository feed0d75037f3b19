"""What a sweep will cost, known before it runs, and the durations of `tune --time-budget`.

The estimate: a trial's training time is its model's multiply-accumulates per image (the
registry counts them on paper, models.model_info) x images x epochs, turned into seconds
by a short probe on this cluster. The probe trains the heaviest and the lightest model of
the sweep for a few batches of random images with the engine's own loop (one warm-up
epoch, one measured); the seconds per image of any other model are read off the straight
line through those two points (per-image overheads included, which MACs alone miss).
Validation costs a third of training per image (a forward pass, no backward).

No Ray here: tune.py runs `probe` on a node of the cluster with a trial's resources.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from cifar_ray.config import Config, replace
from cifar_ray.errors import UserError, shown

PROBE_STEPS = 2  # batches in the measured epoch (and in the warm-up epoch before it)
CPU_PROBE_BATCH = 32  # a CPU's seconds per image hardly change with the batch; a GPU's do
EVAL_SHARE = 1 / 3  # seconds of a validation image / seconds of a training image
WARN_CPU_HOURS = 3.0  # a CPU sweep estimated longer than this gets advice
WORST = 3  # trials named as the most expensive


# ---------------------------------------------------------------- durations

_UNIT_S = {"s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smh])")


def parse_duration(text: str, flag: str = "--time-budget") -> float:
    """Seconds of `45s`, `90m`, `2h` or `1h30m`."""
    value = str(text).strip().lower()
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise UserError(f"{flag} {shown(text)}: give a duration with a unit, e.g. 45s, 90m, "
                        "2h or 1h30m")
    seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not 0 < seconds < 10 * 365 * 86400:
        raise UserError(f"{flag} {shown(text)}: must be more than 0 and less than ten years")
    return seconds


def format_duration(seconds: float) -> str:
    """`4.2s`, `42s`, `3m05s`, `2h10m`: the shape a person reads at a glance."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ---------------------------------------------------------------- the probe

def macs(cfg: Config) -> int:
    """Multiply-accumulates of one forward pass of one image through the config's model."""
    from cifar_ray.models import model_info

    return int(model_info(cfg.model.spec or cfg.model.name, **cfg.model.args)["macs"])


def probe(cfg: Config, gpu: bool = False, threads: int = 1, workers: int = 1) -> float:
    """Seconds per training image of `cfg`'s model here: the engine's loop on random images,
    PROBE_STEPS batches of one worker's batch (CPU: at most CPU_PROBE_BATCH), one warm-up
    epoch and one measured."""
    import numpy as np
    import torch

    from cifar_ray import engine
    from cifar_ray.data.split import Split

    torch.set_num_threads(max(1, threads))
    device = engine.pick_device(gpu)
    batch = max(1, cfg.train.batch_size // max(1, workers))
    if device.type == "cpu":
        batch = min(batch, CPU_PROBE_BATCH)
    n = batch * PROBE_STEPS
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10
    none = (images[:0], labels[:0])
    split = Split(train=(images, labels), val=none, classes=[str(i) for i in range(10)],
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    cfg = replace(cfg, train__epochs=2, train__batch_size=batch, train__fail_on_nan=False)
    t0 = time.perf_counter()
    history = engine.fit(cfg, split, device=device)
    measured = history[-1]["seconds"]
    if not measured > 0:  # a clock too coarse for so short an epoch
        measured = (time.perf_counter() - t0) / 2
    return measured / n


# ---------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class Probed:
    macs: int
    seconds_per_image: float  # training, one trial alone


def seconds_per_image(probes: list[Probed], m: int) -> float:
    """Training seconds per image of a model of `m` MACs: the line through the probes
    (one probe: proportional to MACs)."""
    lo, hi = min(probes, key=lambda p: p.macs), max(probes, key=lambda p: p.macs)
    if hi.macs == lo.macs:
        return hi.seconds_per_image * (m / hi.macs if hi.macs else 1.0)
    slope = (hi.seconds_per_image - lo.seconds_per_image) / (hi.macs - lo.macs)
    if slope <= 0:  # the light one measured slower (noise, fixed costs): no trend to follow
        return max(lo.seconds_per_image, hi.seconds_per_image)
    return max(lo.seconds_per_image + slope * (m - lo.macs), 1e-9)


def asha_epochs(max_epochs: int, grace: int, reduction: float) -> float:
    """Epochs of an average trial when ASHA keeps 1/reduction of the trials at each of its
    rungs (epochs grace x reduction^k, as Ray's ASHA places them)."""
    rungs = int(math.log(max_epochs / grace) / math.log(reduction) + 1)
    total, kept, start = 0.0, 1.0, 0
    for k in range(rungs):
        stop = min(max_epochs, math.ceil(grace * reduction**k))
        total += kept * (stop - start)
        kept, start = kept / reduction, stop
    return total + kept * (max_epochs - start)


@dataclass(frozen=True)
class Trial:
    label: str
    macs: int
    epoch_s: float  # one epoch (train + validation), the trial alone


@dataclass(frozen=True)
class Estimate:
    trials: list[Trial]
    probes: list[Probed]
    n_train: int
    n_val: int
    max_epochs: int
    asha_epochs: float
    slots: int  # trials at once
    gpu: bool
    where: str  # what a trial runs on, e.g. "1 CPU"

    @property
    def most_s(self) -> float:
        """Wall seconds if ASHA stopped no trial."""
        return sum(t.epoch_s for t in self.trials) * self.max_epochs / self.slots

    @property
    def typical_s(self) -> float:
        """Wall seconds if ASHA stops as many as it plans to."""
        return sum(t.epoch_s for t in self.trials) * self.asha_epochs / self.slots

    def lines(self, proposed: bool = False) -> list[str]:
        """What `tune` prints before the first trial."""
        def h(s: float) -> str:
            return f"{s / 3600:.2f} h" if s >= 600 else format_duration(s)

        rates = "; ".join(f"{p.macs / 1e6:,.1f}M MACs/image: {1 / p.seconds_per_image:,.0f} "
                          "images/s" for p in sorted(self.probes, key=lambda p: p.macs))
        kind = "draws of the space (TPE proposes from the same space)" if proposed else "trials"
        out = [f"cost: {len(self.trials)} {kind} x up to {self.max_epochs} epochs x "
               f"{self.n_train:,} training + {self.n_val:,} validation images, "
               f"{self.slots} trial{'s' * (self.slots != 1)} at once on {self.where} each",
               f"  measured here: {rates}",
               f"  estimate: at most {h(self.most_s)} (no trial stopped early); "
               f"~{h(self.typical_s)} if ASHA stops as planned ({self.asha_epochs:.1f} "
               "epochs a trial on average)"]
        worst = sorted(self.trials, key=lambda t: -t.macs)[:WORST]
        out.append("  heaviest: " + "; ".join(
            f"{t.label} ({t.macs / 1e6:,.1f}M MACs/image, {format_duration(t.epoch_s)} an epoch)"
            for t in worst))
        if not self.gpu and self.typical_s > WARN_CPU_HOURS * 3600:
            out.append(f"warning: ~{self.typical_s / 3600:.1f} h on CPU; make it shorter with "
                       "--limit (fewer images), --max-epochs or --samples, or run it on a GPU "
                       "(--gpus-per-trial)")
        return out


def estimate(trials: list[tuple[str, int]], probes: list[Probed], *, n_train: int, n_val: int,
             max_epochs: int, grace: int, reduction: float, slots: int, workers: int = 1,
             gpu: bool = False, where: str = "1 CPU") -> Estimate:
    """`trials`: (label, MACs per image) of every trial; `probes`: measured on this cluster."""
    out = []
    for label, m in trials:
        per = seconds_per_image(probes, m) / max(1, workers)  # DDP: each worker a share
        out.append(Trial(label, m, per * (n_train + EVAL_SHARE * n_val)))
    return Estimate(out, probes, n_train, n_val, max_epochs,
                    asha_epochs(max_epochs, grace, reduction), max(1, slots), gpu, where)
