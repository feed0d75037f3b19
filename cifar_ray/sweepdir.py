"""The sweep directory: what `cifar-ray tune --out DIR` leaves behind, and how to read it back.

    DIR/space.yaml       the space as resolved: full base config + every sweep setting
                         (a space file itself: `--space DIR/space.yaml` reruns the sweep)
    DIR/status.json      trial id -> done | stopped | failed (+ reason), kept by the driver
    DIR/budget.json      the last run's --time-budget ({} without one), "ended": true once
                         it stopped the sweep
    DIR/results.parquet  one row per trial-epoch: trial_id, every swept key, the metrics
    DIR/trials.csv       one row per trial: swept keys, best val acc, epochs, stopped early,
                         checkpoint (relative to DIR)
    DIR/best.yaml        the best trial's config (`cifar-ray train --config DIR/best.yaml`)
    DIR/report.md        ranked table, seed noise, curves (`cifar-ray report DIR` rewrites it)
    DIR/tune-XXXXXX/     Ray Tune's experiment (a unique name, see `experiment_dir`):
                         <trial id>/ with result.json, checkpoint_NNNNNN/state.pt (+ epoch.json)
    DIR/train/           Ray Train's runs of multi-worker trials: train-<trial id>/epoch-NNNN/

Reading needs no Ray: `cifar-ray report` works on a copied sweep directory, and on a local
stage of one in a bucket (storage.Stage: `location` is then the URI to show).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cifar_ray import config
from cifar_ray import rundir
from cifar_ray.errors import UserError, quote
from cifar_ray.fsutil import atomic_write
from cifar_ray.rundir import EPOCH_FILE, METRIC_COLUMNS, STATE_FILE
from cifar_ray.space import (Settings, Space, base_config, changes, parse, resolve_settings,
                             trial_config, trial_count)
from cifar_ray.storage import Kind
from cifar_ray.values import is_finite, is_int, is_number

SPACE_FILE = "space.yaml"
STATUS_FILE = "status.json"
BUDGET_FILE = "budget.json"
TUNE_PREFIX = "tune-"  # DIR/tune-<6 hex>: Ray Tune's experiment
TRAIN_DIR = "train"
# What a sweep folder may hold: --overwrite replaces such a folder and no other.
SWEEP = Kind("sweep", (SPACE_FILE,),
             (SPACE_FILE, STATUS_FILE, BUDGET_FILE, "results.parquet", "trials.csv", "best.yaml",
              "report.md", "*.png", "tune", TUNE_PREFIX + "*", TRAIN_DIR, ".*.tmp", "mlflow.json"))
# Tune's trial id (<run>_NNNNN, or 8 hex digits when a searcher proposes), + a suffix
_TRIAL_DIR = re.compile(r"^(.+_\d{5}|[0-9a-f]{8})(?:_[0-9a-f]{4})?$")


def is_sweep(path: Path) -> bool:
    return (Path(path) / SPACE_FILE).is_file()


@dataclass
class Trial:
    trial_id: str
    params: dict  # the trial's swept key -> value (+ variant, train.seed with --seeds)
    config: config.Config
    history: list[dict]  # one dict per epoch, in order, each epoch once
    status: str  # done | stopped | failed | incomplete
    reason: str = ""
    checkpoint: str = ""  # best checkpoint's state.pt, relative to the sweep dir
    changes: dict = field(default_factory=dict)  # dotted key -> value, vs the base (no seed)
    node_id: str = ""  # the Ray node of its latest epoch (a bad node: a cluster of failures)

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def best_val_acc(self) -> float | None:
        vals = [h["val_acc"] for h in self.history if is_finite(h.get("val_acc"))]
        return max(vals) if vals else None

    @property
    def best_epoch(self) -> int | None:
        scored = [(h["val_acc"], h["epoch"]) for h in self.history if is_finite(h.get("val_acc"))]
        return max(scored)[1] if scored else None

    @property
    def did_not_learn(self) -> bool:
        return rundir.did_not_learn(self.history)

    @property
    def seed(self) -> int:
        return self.config.train.seed


def _epoch(x) -> bool:
    return is_int(x) and x >= 1


@dataclass
class Sweep:
    path: Path
    space: Space
    settings: Settings
    base: config.Config  # the base config as run
    trials: list[Trial]  # those that started (have a folder)
    planned: int = 0  # trials the sweep will run in all
    location: str = ""  # the sweep's path or URI, as shown to the user (default: path)
    budget: dict = field(default_factory=dict)  # DIR/budget.json: {seconds, text, ended}

    def shown(self, *parts: str) -> str:
        from cifar_ray.storage import join

        return join(self.location or str(Path(self.path).resolve()), *parts)

    @property
    def max_epochs(self) -> int:
        return self.base.train.epochs


# ---------------------------------------------------------------- reading

def load_space(sweep: Path) -> tuple[Space, Settings, config.Config]:
    path = Path(sweep) / SPACE_FILE
    if not path.is_file():
        raise UserError(f"{sweep}: not a sweep directory (no {SPACE_FILE})")
    space = parse(config.read_yaml(path, "space"), str(path), name=Path(sweep).resolve().name)
    settings = resolve_settings(space, {})
    return space, settings, base_config(space, settings, str(path))


def experiment_dir(sweep: Path) -> Path | None:
    """Ray Tune's experiment folder of the sweep. Its name is unique per sweep because Tune
    stages driver files under <Ray session>/artifacts/<second>/<name>: two sweeps on one
    cluster that start in the same second would otherwise share that folder."""
    found = sorted(p for p in Path(sweep).glob("tune*")
                   if p.is_dir() and (p.name == "tune" or p.name.startswith(TUNE_PREFIX)))
    return found[0] if found else None


def read_status(sweep: Path, name: str = STATUS_FILE) -> dict:
    path = Path(sweep) / name
    try:
        status = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return status if isinstance(status, dict) else {}


def status_text(status: dict) -> str:
    return json.dumps(status, indent=1, sort_keys=True) + "\n"


def _read_rows(path: Path) -> list[dict]:
    """Tune's result.json: one JSON object per line; a torn last line (a killed driver) is
    skipped, and so is any line that is not a result row (hand-edited or damaged)."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and ("epoch" not in row or _epoch(row["epoch"])):
                rows.append(row)
    return rows


def _read_params(path: Path) -> dict:
    """The trial's point of the space, from Tune's params.json."""
    fix = "restore it, or move its trial folder out of the sweep"
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); {fix}") from None
    trial = params.get("trial", {}) if isinstance(params, dict) else None
    if not isinstance(trial, dict):
        raise UserError(f"{path}: not the params.json Tune wrote (no 'trial' mapping); {fix}")
    return trial


def _checkpoints(sweep: Path, trial_dir: Path, rows: list[dict]) -> dict[int, Path]:
    """Epoch -> state.pt of every checkpoint still on disk (Tune's, or Ray Train's for
    multi-worker trials, whose paths come with the reported metrics)."""
    found = {}
    for d in trial_dir.glob("checkpoint_*"):
        try:
            epoch = json.loads((d / EPOCH_FILE).read_text())["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _epoch(epoch) and (d / STATE_FILE).is_file():
            found[epoch] = d / STATE_FILE
    for row in rows:
        path = row.get("checkpoint_path")
        if isinstance(path, str) and path and "epoch" in row:
            # Where Ray Train wrote it; else the same folder below this sweep (a copy, or
            # a local stage of a bucket, where the reported path is the bucket's).
            for ckpt in (Path(path), sweep / TRAIN_DIR / path.rsplit(f"/{TRAIN_DIR}/", 1)[-1]):
                if (ckpt / STATE_FILE).is_file():
                    found[row["epoch"]] = ckpt / STATE_FILE
                    break
    return found


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _error_reason(trial_dir: Path) -> str:
    """The last line of Tune's error.txt (the exception), for trials that crashed."""
    err = trial_dir / "error.txt"
    if not err.is_file():
        return ""
    lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    return quote(lines[-1], 300) if lines else "error"


def _trial_dirs(root: Path) -> dict[str, list[Path]]:
    """Trial id -> its folders, oldest first. A folder is named by its trial id; when a
    resumed sweep restarts a trial that Tune had not yet recorded as started, Tune gives it
    a second folder `<id>_<4 hex>` (the first may hold an unrecorded partial run)."""
    out: dict[str, list[Path]] = {}
    for d in sorted(root.iterdir(), key=lambda p: (len(p.name), p.name)) if root.is_dir() else []:
        if (d / "params.json").is_file():
            m = _TRIAL_DIR.match(d.name)
            out.setdefault(m.group(1) if m else d.name, []).append(d)
    return out


def read_sweep(sweep: Path, location: str = "") -> Sweep:
    sweep = Path(sweep)
    space, settings, base = load_space(sweep)
    status = read_status(sweep)
    trials = []
    for trial_id, dirs in sorted(_trial_dirs(experiment_dir(sweep) or sweep / "none").items()):
        params = _read_params(dirs[-1] / "params.json")
        rows = [r for d in dirs for r in _read_rows(d / "result.json")]  # later runs win
        by_epoch = {r["epoch"]: r for r in rows if "epoch" in r and "error" not in r}
        history = [{k: by_epoch[e][k] for k in METRIC_COLUMNS if is_number(by_epoch[e].get(k))}
                   for e in sorted(by_epoch)]
        errors = [str(r["error"]) for r in rows if "error" in r]
        known = status.get(trial_id, {})
        crashed = _error_reason(dirs[-1])
        if errors:
            state, reason = "failed", errors[-1]
        elif known.get("status") in ("done", "stopped", "failed"):
            state, reason = known["status"], known.get("reason", "")
        elif crashed:
            state, reason = "failed", crashed
        else:
            state, reason = ("done" if len(history) >= base.train.epochs else "incomplete"), ""
        cfg = trial_config(space, settings, params, f"{dirs[-1]}/params.json")
        nodes = [r["node_id"] for r in rows if isinstance(r.get("node_id"), str)]
        trial = Trial(trial_id, params, cfg, history, state, reason,
                      changes=changes(base, cfg), node_id=nodes[-1] if nodes else "")
        ckpts = {}
        for d in dirs:
            ckpts.update(_checkpoints(sweep, d, rows))
        best = trial.best_epoch
        pick = best if best in ckpts else (max(ckpts) if ckpts else None)
        if pick is not None:
            trial.checkpoint = _relative(ckpts[pick], sweep)
        trials.append(trial)
    return Sweep(sweep, space, settings, base, trials, trial_count(space, settings), location,
                 read_status(sweep, BUDGET_FILE))


# ---------------------------------------------------------------- writing the tables

def swept_columns(sw: Sweep) -> list[str]:
    """The keys that vary across the sweep's trials, in the space's order."""
    keys = [k for k in sw.space.swept_keys()]
    if sw.settings.seeds > 1:
        keys.append("train.seed")
    return keys


def _param(trial: Trial, key: str):
    if key == "train.seed":
        return trial.seed
    return trial.params.get(key)


def ranked(sw: Sweep) -> list[Trial]:
    """Trials by best val accuracy, best first; failed and empty ones last."""
    return sorted(sw.trials, key=lambda t: (t.best_val_acc is None, -(t.best_val_acc or 0),
                                            t.trial_id))


def _column(values: list):
    """A column pyarrow can hold: values of mixed kinds (numbers and words) become text."""
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) > 1 and not kinds <= {int, float}:
        return [None if v is None else str(v) for v in values]
    if kinds and not kinds <= {int, float, str, bool}:
        return [None if v is None else json.dumps(v) for v in values]
    return values


def write_results(sw: Sweep) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = swept_columns(sw)
    rows = [{"trial_id": t.trial_id, **{k: _param(t, k) for k in keys}, **h}
            for t in sw.trials for h in t.history]
    columns = ["trial_id", *keys, *METRIC_COLUMNS]
    table = pa.table({c: _column([r.get(c) for r in rows]) for c in columns})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(sw.path / "results.parquet", buf.getvalue())


def trial_rows(sw: Sweep) -> list[dict]:
    keys = swept_columns(sw)
    out = []
    for t in ranked(sw):
        acc = t.best_val_acc
        out.append({"trial_id": t.trial_id, **{k: _param(t, k) for k in keys},
                    "best_val_acc": "" if acc is None else round(acc, 6),
                    "best_epoch": t.best_epoch or "", "epochs": t.epochs,
                    "max_epochs": sw.max_epochs, "status": t.status,
                    "stopped_early": t.status == "stopped", "reason": t.reason,
                    "checkpoint": t.checkpoint, "node_id": t.node_id})
    return out


def write_trials(sw: Sweep) -> None:
    rows = trial_rows(sw)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                             for k, v in row.items()})
    atomic_write(sw.path / "trials.csv", buf.getvalue())


def best_trial(sw: Sweep) -> Trial | None:
    ok = [t for t in ranked(sw) if t.best_val_acc is not None and t.status != "failed"]
    return ok[0] if ok else None


def write_best(sw: Sweep) -> Trial | None:
    """The best trial's config, ready for `cifar-ray train --config`."""
    best = best_trial(sw)
    if best is not None:
        header = (f"# best trial {best.trial_id} of sweep {sw.shown()}: val acc "
                  f"{best.best_val_acc:.4f} at epoch {best.best_epoch}\n")
        atomic_write(sw.path / "best.yaml", header + config.dump_yaml(best.config))
    return best


def write_tables(sw: Sweep) -> None:
    write_results(sw)
    write_trials(sw)
    write_best(sw)
