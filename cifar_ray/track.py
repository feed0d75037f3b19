"""Experiment tracking beside the run and sweep folders.

TensorBoard: every train run writes event files into its folder with the tags Ray Tune's
TBXLoggerCallback gives each trial of a sweep (`ray/tune/val_acc`, ... one step per epoch),
so `tensorboard --logdir DIR` shows runs and trials side by side.

MLflow, when a tracking URI is given (`--mlflow URI` or CIFAR_RAY_MLFLOW): one MLflow run per
train run, and per sweep a parent run whose children are its trials (Ray's
MLflowLoggerCallback, fed by the Tune driver), in an experiment named after the run's or
sweep's folder. Params: the resolved config, flattened (a trial's swept keys first);
metrics: each epoch's, as steps; artifacts at the end: summary.json and curves.png (run) or
report.md and its PNGs (sweep). The folder records where it logs (mlflow.json), so that
--resume continues the same MLflow runs.

MLflow is optional (the `track` extra), imported only when a URI is given. The server is asked
once before anything runs: one that does not answer is bad input. One that stops answering
later costs the tracking only: one warning, and the run or sweep goes on without it."""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import time
from pathlib import Path

from ray.tune.logger import LoggerCallback

from cifar_ray.config import Config, to_dict
from cifar_ray import rundir, storage
from cifar_ray.errors import UserError

ENV = "CIFAR_RAY_MLFLOW"  # the tracking URI when --mlflow is not given
RECORD = "mlflow.json"  # in a run or sweep folder: {tracking_uri, experiment_id, run_id}
INSTALL = 'pip install -e ".[track]" in the cifar-ray clone (or: pip install mlflow-skinny)'
TB_PREFIX = "ray/tune/"  # the tags of Tune's TBXLoggerCallback
METRICS = rundir.METRIC_COLUMNS  # what an epoch reports: tracked for runs and trials alike
# A tracking server that stops answering costs a few seconds once, not minutes of retries;
# no "View run" line per MLflow run ended (one per trial): the driver says where it logs.
_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def epoch_metrics(result: dict) -> dict[str, float]:
    """The finite numbers among an epoch's metrics (a NaN val loss is left out)."""
    return {k: float(result[k]) for k in METRICS
            if isinstance(result.get(k), (int, float)) and not isinstance(result[k], bool)
            and math.isfinite(result[k])}


def params(cfg: Config, first: dict | None = None) -> dict[str, str]:
    """The config flattened to dotted keys (the keys of `first` first), as MLflow params."""
    from cifar_ray.space import flatten

    flat = {**(first or {}), **flatten(to_dict(cfg))}
    text = {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
            for k, v in flat.items()}
    return {k: v[:6000] for k, v in text.items()}  # MLflow's longest param value


def _reason(e: BaseException) -> str:
    """A short why from MLflow's exception (its text quotes the whole HTTP exchange)."""
    text = str(e)
    for pattern, shown in ((r"\[Errno -?\d+\] ([^'\")]+)", r"\1"), (r"error code (\d+)", r"HTTP \1"),
                           (r"(Read timed out)", "no answer in time")):
        m = re.search(pattern, text)
        if m:
            return m.expand(shown).strip()
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def _read_record(loc: storage.Location) -> dict | None:
    try:
        return json.loads(storage.read_bytes(loc, RECORD))
    except (UserError, ValueError):
        return None


class MLflow:
    """MLflow's client for one tracking URI, asked once when made (a server that does not
    answer is a UserError). After that a call that fails warns once and turns the tracking
    off: the caller goes on without it."""

    def __init__(self, uri: str, where: str, echo=print,
                 hint: str = "start it (mlflow server ...) or give another tracking URI"):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError(f"{where}: MLflow is not installed; run: {INSTALL}") from None
        for key, value in _ENV.items():
            os.environ.setdefault(key, value)
        self.uri, self.echo, self.alive = uri, echo, True
        self.client = MlflowClient(uri)
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            raise UserError(f"{where}: the MLflow tracking server does not answer "
                            f"({_reason(e)}); {hint}") from None

    def __call__(self, method: str, *args, **kwargs):
        """`client.method(...)`, or None once tracking is off."""
        if not self.alive:
            return None
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as e:
            self.off(e)
            return None

    def off(self, e: BaseException) -> None:
        if self.alive:
            self.alive = False
            self.echo(f"warning: MLflow at {self.uri} stopped answering ({_reason(e)}); "
                      "going on without tracking")

    def experiment(self, name: str) -> str | None:
        """The id of the experiment `name`, created (or restored from deleted) if need be."""
        exp = self("get_experiment_by_name", name)
        if exp is None and self.alive:
            self("create_experiment", name)
            exp = self("get_experiment_by_name", name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            self("restore_experiment", exp.experiment_id)
        return exp.experiment_id if exp is not None else None

    def open_run(self, record: dict | None, name: str, values: dict, tags: dict) -> dict | None:
        """The MLflow run that `record` names, running again, if it is on this server and
        still there; else a new run in the experiment `name` with `values` as params.
        Returns the record to keep (None once tracking is off)."""
        if record and record.get("tracking_uri") == self.uri and self.has_run(record["run_id"]):
            self("update_run", record["run_id"], status="RUNNING")
        else:
            exp = self.experiment(name)
            run = self("create_run", exp, run_name=name, tags=tags) if exp else None
            if run is None:
                return None
            self.log_params(run.info.run_id, values)
            record = {"tracking_uri": self.uri, "experiment_id": exp, "experiment": name,
                      "run_id": run.info.run_id}
        self.echo(f"MLflow: experiment {record['experiment']}, run {record['run_id']} at {self.uri}")
        return record

    def has_run(self, run_id: str) -> bool:
        """Whether the run is there and not deleted (a server that fails: tracking off)."""
        try:
            return self.alive and self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                self.off(e)
            return False

    def log_params(self, run_id: str, values: dict) -> None:
        from mlflow.entities import Param

        self("log_batch", run_id, params=[Param(k, v) for k, v in values.items()])

    def log_epoch(self, run_id: str, result: dict) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(result["epoch"])
        self("log_batch", run_id, metrics=[Metric(k, v, now, step)
                                           for k, v in epoch_metrics(result).items()])

    def end(self, run_id: str, files: list[Path], status: str) -> None:
        for path in files:
            if path.is_file():
                self("log_artifact", run_id, str(path))
        self("set_terminated", run_id, status)


def _status(error: str | None) -> str:
    return "FINISHED" if not error else "KILLED" if error == "interrupted" else "FAILED"


def _tracking_uri(given: str | None, record: dict | None) -> str | None:
    """--mlflow, else CIFAR_RAY_MLFLOW, else (on resume) where the folder logged before."""
    return given or os.environ.get(ENV) or (record or {}).get("tracking_uri") or None


def _open(loc: storage.Location, given: str | None, resume: bool, echo) -> tuple:
    """(MLflow client or None, the folder's record or None), the server asked now."""
    record = _read_record(loc) if resume else None
    uri = _tracking_uri(given, record)
    if not uri:
        return None, None
    if given or os.environ.get(ENV):
        return MLflow(uri, f"--mlflow {uri}", echo=echo), record
    # a resumed run or sweep goes on logging where it did
    return MLflow(uri, f"{loc.flag} {loc.text}: MLflow at {uri}, where it logged before", echo,
                  f"start it (mlflow server ...), or delete {RECORD} from the folder to go on "
                  "without tracking"), record


class RunTracking:
    """A train run's tracking, fed by the driver (train.py): TensorBoard events in the run
    folder, and one MLflow run when a tracking URI is given. Made before anything runs (the
    server is asked then); `start` once the folder is there, `epoch` per epoch, `finish` at
    the end; leaving the `with` block on an exception marks the MLflow run failed."""

    def __init__(self, loc: storage.Location, mlflow: str | None = None, resume: bool = False,
                 echo=print):
        self.loc, self.writer, self.run_id = loc, None, None
        self.mlflow, self.record = _open(loc, mlflow, resume, echo)

    def start(self, stage: storage.Stage, cfg: Config) -> None:
        from tensorboardX import SummaryWriter

        self.stage = stage
        try:
            self.writer = SummaryWriter(str(stage.local), flush_secs=30)
        except OSError as e:
            self._lost(e)
        if self.mlflow is not None:
            name = posixpath.basename(self.loc.path)
            record = self.mlflow.open_run(self.record, name, params(cfg), {"cifar_ray.dir": self.loc.text})
            if record is not None:
                self.run_id = record["run_id"]
                from cifar_ray.fsutil import atomic_write

                atomic_write(stage.local / RECORD, json.dumps(record, indent=1))

    def _events(self, write) -> None:
        """`write(writer)` to the TensorBoard file: a failure (a full disk) costs the events,
        never the run or the error it is already ending with (one warning, then no more)."""
        if self.writer is None:
            return
        try:
            write(self.writer)
        except OSError as e:
            self._lost(e)

    def _lost(self, error: OSError) -> None:
        self.writer = None
        print(f"warning: TensorBoard events of {self.loc.text} are no longer written: "
              f"{error.strerror or error}", flush=True)

    def _add_epoch(self, writer, metrics: dict) -> None:
        for key, value in epoch_metrics(metrics).items():
            writer.add_scalar(TB_PREFIX + key, value, global_step=int(metrics["epoch"]))
        writer.flush()  # whole before the stage is pushed

    def epoch(self, metrics: dict) -> None:
        self._events(lambda w: self._add_epoch(w, metrics))
        if self.run_id:
            self.mlflow.log_epoch(self.run_id, metrics)

    def _close(self) -> None:
        self._events(lambda w: w.close())
        self.writer = None

    def finish(self, summary: dict) -> None:
        self._close()
        if self.run_id:
            out = self.stage.local
            self.mlflow.end(self.run_id, [out / "summary.json", out / "curves.png"],
                            _status(summary.get("error")))
            self.run_id = None

    def __enter__(self) -> "RunTracking":
        return self

    def __exit__(self, kind, error, tb) -> None:
        self._close()
        if self.run_id and error is not None:
            self.mlflow("set_terminated", self.run_id,
                        "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


# ---------------------------------------------------------------- sweeps

_SWEEPS: dict[str, "SweepTracking"] = {}  # sweep location -> its tracking, while it runs


class SweepTracking:
    """A sweep's MLflow tracking, on the Tune driver (tune.py): a parent run for the sweep
    (`start`, once the folder is there), a child run per trial (TrialLogger, a Tune
    callback), the report on the parent at the end (`finish`). Trials' TensorBoard files are
    Tune's own (TBXLoggerCallback)."""

    def __init__(self, loc: storage.Location, mlflow: str | None = None, resume: bool = False,
                 echo=print):
        self.loc, self.run_id = loc, None
        self.mlflow, self.record = _open(loc, mlflow, resume, echo)

    def start(self, plan) -> None:
        """The sweep's parent run, for `plan` (space.Plan) as it runs."""
        if self.mlflow is None:
            return
        self.plan = plan
        name = posixpath.basename(self.loc.path)
        self.record = self.mlflow.open_run(self.record, name, params(plan.base),
                                           {"cifar_ray.dir": self.loc.text})
        if self.record is not None:
            self.run_id = self.record["run_id"]
            try:
                storage.write(self.loc, RECORD, json.dumps(self.record, indent=1))
            except UserError as e:
                self.mlflow.echo(f"warning: {e}")
            _SWEEPS[self.loc.text] = self

    def finish(self, folder: Path, sw) -> None:
        """The report and its PNGs (in `folder`, the sweep's local stage) on the parent run
        of `sw` (sweepdir.Sweep), killed if trials are left."""
        if self.run_id:
            left = sw.planned > sum(t.status != "incomplete" for t in sw.trials)
            files = [folder / "report.md", *sorted(folder.glob("*.png"))]
            self.mlflow.end(self.run_id, files, "KILLED" if left else "FINISHED")
            self.run_id = None

    def trials(self):
        """The MLflowLoggerCallback that logs each trial as a child of the sweep's run."""
        return _trials_callback(self)

    def __enter__(self) -> "SweepTracking":
        return self

    def __exit__(self, kind, error, tb) -> None:
        _SWEEPS.pop(self.loc.text, None)
        if self.run_id and error is not None:
            self.mlflow("set_terminated", self.run_id,
                        "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def _trials_callback(tracking: SweepTracking):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    mlflow, record = tracking.mlflow, tracking.record

    class Trials(MLflowLoggerCallback):
        """Ray's MLflow callback, with a trial's resolved config as params (swept keys first),
        its epoch metrics at step = epoch, and a resumed trial continuing its MLflow run."""

        def log_trial_start(self, trial):
            if trial in self._trial_runs:
                return
            found = mlflow("search_runs", [record["experiment_id"]], max_results=1, filter_string=(
                f"tags.trial_id = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{record['run_id']}'"))
            if found:
                self._trial_runs[trial] = found[0].info.run_id
                mlflow("update_run", found[0].info.run_id, status="RUNNING")
                return
            run = self.mlflow_util.start_run(run_name=trial.trial_id,
                                             tags={**self.tags, "trial_id": trial.trial_id})
            self._trial_runs[trial] = run.info.run_id
            swept = trial.config.get("trial", {})
            cfg = tracking.plan.trial(swept)
            mlflow.log_params(run.info.run_id, params(cfg, first=swept))

        def log_trial_result(self, iteration, trial, result):
            if trial in self._trial_runs and "epoch" in result:
                mlflow.log_epoch(self._trial_runs[trial], result)

        def log_trial_end(self, trial, failed=False):
            if trial not in self._trial_runs:
                return
            error = (trial.last_result or {}).get("error")
            if error:
                mlflow("set_tag", self._trial_runs[trial], "error", str(error)[:5000])
            super().log_trial_end(trial, failed=failed or bool(error))

    return Trials(tracking_uri=mlflow.uri, experiment_name=record["experiment"],
                  tags={"mlflow.parentRunId": record["run_id"]})


class TrialLogger(LoggerCallback):
    """The Tune callback that logs each trial to MLflow while its sweep's tracking is on.
    Tune keeps its callbacks with the experiment and restores them on --resume, so this one
    holds only the sweep's location and finds the driver's tracking (if any) at setup; a
    failing call turns the tracking off, never the sweep."""

    def __init__(self, sweep: storage.Location):
        self.sweep, self.tracking, self.inner = sweep.text, None, None

    def __getstate__(self):
        return {"sweep": self.sweep, "tracking": None, "inner": None}

    def _call(self, method: str, *args, **kwargs) -> None:
        if self.inner is None or not self.tracking.mlflow.alive:
            return
        try:
            getattr(self.inner, method)(*args, **kwargs)
        except Exception as e:
            self.tracking.mlflow.off(e)

    def setup(self, *args, **kwargs):
        self.tracking, self.inner = _SWEEPS.get(self.sweep), None
        if self.tracking is not None:
            try:
                self.inner = self.tracking.trials()
            except Exception as e:
                self.tracking.mlflow.off(e)
        self._call("setup", *args, **kwargs)

    def log_trial_start(self, trial):
        self._call("log_trial_start", trial)

    def log_trial_result(self, iteration, trial, result):
        self._call("log_trial_result", iteration, trial, result)

    def log_trial_end(self, trial, failed=False):
        self._call("log_trial_end", trial, failed=failed)
