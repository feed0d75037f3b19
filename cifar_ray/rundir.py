"""The run directory: what `cifar-ray train --out DIR` leaves behind, and how to read it back.

    DIR/config.yaml      the resolved config (feed it to `cifar-ray train --config`)
    DIR/metrics.csv      one row per epoch
    DIR/curves.png       train vs val accuracy and loss
    DIR/summary.json     best/final accuracy, epochs, speed, model, checkpoints
    DIR/checkpoints/     Ray Train's storage: epoch-NNNN/state.pt (last and best kept)

No Ray imports: evaluate and predict read runs without starting Ray.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from cifar_ray.errors import UserError
from cifar_ray.fsutil import atomic_write
from cifar_ray.storage import Kind
from cifar_ray.values import is_int, is_number

CHECKPOINTS = "checkpoints"
# What a run folder may hold (train, evaluate and report write it): --overwrite replaces
# such a folder and no other; ".*.tmp" are the temp files of a killed write (fsutil).
RUN = Kind("run", ("config.yaml", CHECKPOINTS),
           ("config.yaml", "metrics.csv", "curves.png", "summary.json", "report.md",
            "confusion-*.png", CHECKPOINTS, ".*.tmp", "events.out.tfevents.*", "mlflow.json"))
STATE_FILE = "state.pt"
EPOCH_FILE = "epoch.json"  # beside state.pt: {"epoch": N}, read without torch (checkpoint.py)
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")

SUMMARY_NUMBERS = ("params", "epochs", "epochs_planned", "best_val_acc", "final_val_acc",
                   "final_train_acc", "train_seconds", "wall_seconds", "images_per_second",
                   "best_epoch", "last_epoch", "test_acc")
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                  "images_per_s", "seconds", "eval_seconds", "test_acc", "chance"]


LEARNED = 1.5  # a run has learned once its val accuracy reaches this many times chance


def did_not_learn(history: list[dict]) -> bool:
    """Two epochs or more and no validation accuracy at LEARNED x chance (1/classes, which
    the engine records every epoch; a history without that record is not judged). Such a
    net is not learning: usually a recipe it cannot train with (models.default_recipe).
    One epoch is too early to tell: a net without BatchNorm can sit at chance for one."""
    chance = history[-1].get("chance") if history else None
    return (chance is not None and len(history) >= 2
            and not any(h.get("val_acc", 0) >= LEARNED * chance for h in history))  # NaN: no


def checkpoint_dirs(run: Path) -> dict[int, Path]:
    """Epoch -> checkpoint folder, for every complete checkpoint in the run."""
    return epoch_dirs(Path(run) / CHECKPOINTS)


def epoch_dirs(root: Path) -> dict[int, Path]:
    """Epoch -> folder, for every epoch-NNNN/state.pt in Ray Train's experiment folder."""
    found = {}
    if root.is_dir():
        for d in root.iterdir():
            m = _EPOCH_DIR.match(d.name)
            if m and (d / STATE_FILE).is_file():
                found[int(m.group(1))] = d
    return dict(sorted(found.items()))


def write_metrics(history: list[dict], path: Path) -> None:
    extra = sorted({k for row in history for k in row} - set(METRIC_COLUMNS))
    columns = [c for c in METRIC_COLUMNS if any(c in row for row in history)] + extra
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv as one dict per epoch: `epoch` an int, every other cell a float."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        out = []
        for row in rows:
            parsed = {k: int(v) if k == "epoch" else float(v)
                      for k, v in row.items() if v != ""}
            if not isinstance(parsed.get("epoch"), int):
                raise ValueError("a row without an epoch")
            out.append(parsed)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as e:
        # TypeError: a row longer or shorter than the header (DictReader fills in None)
        raise UserError(f"{path}: not a metrics table cifar-ray wrote ({e.__class__.__name__}); delete "
                        f"it and rerun `cifar-ray train --resume {path.parent}` to rewrite it") from None
    return out


def read_summary(run: Path) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    numbers_ok = isinstance(summary, dict) and all(
        summary.get(k) is None or is_number(summary[k]) for k in SUMMARY_NUMBERS)
    if not numbers_ok or not (summary.get("best_epoch") is None or is_int(summary["best_epoch"])):
        raise UserError(f"{path}: unreadable summary; delete it and rerun "
                        f"`cifar-ray train --resume {run}` to rewrite it")
    return summary


def best_epoch(history: list[dict], available: set[int]) -> int | None:
    """The epoch with the highest val accuracy among those with a checkpoint."""
    scored = [(h.get("val_acc", float("nan")), h["epoch"]) for h in history
              if h["epoch"] in available]
    scored = [(acc if acc == acc else -1.0, ep) for acc, ep in scored]
    return max(scored)[1] if scored else (max(available) if available else None)


def resolve_checkpoint(target: str | Path, which: str = "best") -> Path:
    """A run directory (its best or last checkpoint), a checkpoint folder, or a state.pt."""
    path = Path(target)
    if path.is_file():
        return path
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    if not path.is_dir():
        raise UserError(f"{target}: no such run directory or checkpoint")
    ckpts = checkpoint_dirs(path)
    if not ckpts:
        raise UserError(f"{target}: holds no checkpoint; train first (cifar-ray train --out {target})")
    if which == "last":
        return ckpts[max(ckpts)] / STATE_FILE
    summary = read_summary(path)
    best = summary.get("best_epoch")
    if best not in ckpts:
        history = read_metrics(path / "metrics.csv") if (path / "metrics.csv").is_file() else []
        best = best_epoch(history, set(ckpts)) or max(ckpts)
    return ckpts[best] / STATE_FILE


def write_summary(run: Path, summary: dict) -> None:
    atomic_write(run / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
