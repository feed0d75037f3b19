"""Fault-injection points for the tests (tests/test_faults.py); inert unless the test sets
CIFAR_RAY_FAULT. Not part of the CLI.

    CIFAR_RAY_FAULT="POINT:key=value:key=value"   e.g. "train-step:rank=1:epoch=2:step=6"
    CIFAR_RAY_FAULT_DIR=/some/folder

The first process that reaches `point(POINT, **where)` with every given key equal (compared
as text; `hit=N` means the Nth such call in that process) creates DIR/POINT.pid holding its
PID and then sleeps, so the test kills it at a known place instead of sleeping and hoping.
The file is created exclusively: a process restarted after the kill passes the point. A
point nobody kills resumes after FAULT_WAIT_S seconds with an error, so a broken test
fails instead of hanging.

Points: train-step (rank, epoch, step: a training step of a Ray Train worker, every few
steps), trial-epoch (lr, epoch: a single-worker Tune trial, its epoch's checkpoint
reported), atomic-write (name: fsutil.atomic_write, the data written, not yet renamed),
atomic-dir (name: fsutil.atomic_dir, the folder filled, not yet renamed), claimed (name:
fsutil.claimed, a run or sweep folder just claimed by this process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_WAIT_S = 300.0
ENV = ("CIFAR_RAY_FAULT", "CIFAR_RAY_FAULT_DIR")
_hits: dict[str, int] = {}


def point(point_name: str, /, **where) -> None:
    spec = os.environ.get("CIFAR_RAY_FAULT")
    if not spec:
        return
    want_name, *pairs = spec.split(":")
    want = dict(p.split("=", 1) for p in pairs)
    if want_name != point_name:
        return
    hit = want.pop("hit", None)
    if any(str(where.get(k)) != v for k, v in want.items()):
        return
    _hits[point_name] = _hits.get(point_name, 0) + 1
    if hit is not None and _hits[point_name] != int(hit):
        return
    folder = Path(os.environ.get("CIFAR_RAY_FAULT_DIR", "."))
    try:
        fd = os.open(folder / f"{point_name}.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # fired already, in this run's earlier life
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(FAULT_WAIT_S)
    raise RuntimeError(f"fault point {point_name} was not killed within {FAULT_WAIT_S:.0f} s")


def env() -> dict:
    """The fault variables this process has (none outside tests): a driver joining a running
    Ray cluster hands them to its workers (their environment is the cluster's, not ours)."""
    return {k: os.environ[k] for k in ENV if k in os.environ}
