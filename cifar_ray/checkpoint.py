"""Checkpoint files: one `state.pt` per checkpoint folder, written whole or not at all, read
back with `weights_only=True` and checked before anything uses it. No Ray imports: the
Ray wrappers hand Ray the folders these functions fill and read.

    save_state(state, path)          torch.save, atomically
    load_state(path) -> dict         refuses foreign objects and damaged or foreign files
    written(state, epoch) -> folder  a temporary checkpoint folder (state.pt + epoch.json)
    restored(checkpoint) -> dict     the state of a Ray Checkpoint (anything with as_directory)
    newest_in(folder) -> dict        the newest readable epoch-NNNN/state.pt below folder
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import torch

from cifar_ray import rundir
from cifar_ray.errors import UserError, quote
from cifar_ray.fsutil import atomic_write
from cifar_ray.values import is_finite, is_int

FORMAT = 1  # bump when the checkpoint layout changes


def save_state(state: dict, path) -> None:
    """torch.save into memory, then an atomic write: a kill never leaves half a file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_state(path) -> dict:
    """Load a checkpoint with `weights_only=True`: foreign objects are refused, never run."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: ours says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # unpickling errors, truncated zip, foreign globals
        # torch's text for a foreign object opens with how to load it anyway (unsafely);
        # what matters is its last part, the object it refused.
        refused = re.search(r"WeightsUnpickler error: (.*?\.)(\s|$)", str(e))
        reason = (f"{refused[1]} cifar-ray reads tensors and plain data only and never runs "
                  "code from a checkpoint" if refused else quote(e))
        raise UserError(f"{path}: not a readable cifar-ray checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a cifar-ray checkpoint (format {FORMAT} expected)")
    problem = _state_problem(state)
    if problem:
        raise UserError(f"{path}: not a valid cifar-ray checkpoint ({problem}); it is damaged "
                        "or was not written by cifar-ray: use another one")
    return state


def _state_problem(state: dict) -> str | None:
    """What is wrong with the parts of a checkpoint that evaluate, predict and resume read."""
    def numbers(v, n):
        return isinstance(v, (list, tuple)) and len(v) == n and all(map(is_finite, v))

    def weights(v):
        return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                           for k, t in v.items())

    checks = [
        ("epoch", lambda v: is_int(v) and v >= 0, "an epoch number"),
        ("config", lambda v: isinstance(v, dict), "a config mapping"),
        ("classes", lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
         "a list of class names"),
        ("mean", lambda v: numbers(v, 3), "3 numbers"),
        ("std", lambda v: numbers(v, 3) and all(x > 0 for x in v), "3 positive numbers"),
        ("model", weights, "a mapping of names to tensors"),
        ("history", lambda v: isinstance(v, list), "a list of epochs"),
    ]
    for key, ok, what in checks:
        if key not in state:
            return f"{key} is missing"
        if not ok(state[key]):
            return f"{key} must be {what}"
    if state.get("ema") is not None and not weights(state["ema"]):
        return "ema must be a mapping of names to tensors"
    return None


@contextlib.contextmanager
def written(state: dict, epoch: int):
    """A temporary checkpoint folder holding `state` (state.pt) and its epoch (epoch.json),
    for Ray to copy into the run's storage; removed when the block ends."""
    with tempfile.TemporaryDirectory() as tmp:
        save_state(state, Path(tmp) / rundir.STATE_FILE)
        atomic_write(Path(tmp) / rundir.EPOCH_FILE, json.dumps({"epoch": epoch}))
        yield tmp


def restored(checkpoint, echo=print) -> dict | None:
    """The state in a Ray checkpoint (None: none given, or it cannot be read: a warning)."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.as_directory() as d:
            return load_state(Path(d) / rundir.STATE_FILE)
    except UserError as e:  # damaged after Ray recorded it: the caller looks further
        echo(f"warning: Ray's latest checkpoint is unreadable: {e}")
        return None


def newest_in(folder: Path, newer_than: int = 0, echo=print, fetch=Path) -> dict | None:
    """The newest checkpoint after epoch `newer_than` among folder's epoch-NNNN/state.pt
    (Ray Train's experiment folder) that loads; a copy cut short by a kill is skipped.
    `fetch`: a storage stage's, when `folder` is in one (a checkpoint is downloaded when read)."""
    ckpts = rundir.epoch_dirs(Path(folder))
    for epoch in sorted((e for e in ckpts if e > newer_than), reverse=True):
        try:
            return load_state(fetch(ckpts[epoch] / rundir.STATE_FILE))
        except UserError as e:
            echo(f"warning: skipping checkpoint of epoch {epoch}: {e}")
    return None


def newest_state(run: Path, echo=print, fetch=Path) -> dict | None:
    """The newest readable checkpoint of run directory `run` (see newest_in)."""
    return newest_in(Path(run) / rundir.CHECKPOINTS, echo=echo, fetch=fetch)
