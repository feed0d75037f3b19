"""Ray Tune wrapper: a sweep is one Tune experiment over the trials of a space (space.py),
with ASHA stopping weak trials on validation accuracy, epochs as the time unit.

How a trial runs. Every trial is a Tune function (`run_trial`) that reports each epoch's
metrics with a checkpoint and, when resumed, continues from its last checkpoint.
- One worker per trial (the default): the function runs the engine itself, on its CPU
  threads or its GPU share. A TorchTrainer here would add a worker group that only starts
  and stops (~20 s a trial on a laptop) and a second process per trial, for no DDP at all.
- `--workers-per-trial N > 1`: the function builds a TorchTrainer (train.make_trainer) whose
  N DDP workers take whole GPUs (or CPUs), with TuneReportCallback forwarding each report to
  Tune (Ray Train v2 refuses a TorchTrainer given to the Tuner directly: this is its supported
  pattern). The function itself holds no CPU and concurrency is capped, so trial
  drivers can never hold the CPUs their own workers wait for.

Data. The driver loads and splits the dataset once and puts it in the object store once;
`tune.with_parameters` hands every trial a reference to that one copy. Images are stored
NCHW, the layout the device loader keeps, so a CPU trial reads them in place (no copy per
trial) and a GPU trial uploads them once.

Resume. Tune keeps the experiment under DIR/tune-XXXXXX; `--resume DIR` restores it: finished
trials stay finished, trials that were running restart from their last checkpoint, pending
ones start. ASHA's rung records are saved beside it, so its decisions carry over too, and
so is the searcher's state (Tune saves it with the experiment): Optuna's study, with every
trial it proposed and every result it was told, continues where it stopped.

Search. `random` (the default): every trial's params are drawn up front (space.points) and
handed to Tune as a grid of trials. `optuna`: Ray Tune's OptunaSearch (TPE, seeded by the
base config's train.seed) proposes each trial from the space's distributions, told every
finished trial's last validation accuracy (ASHA's stops included); the trial checks the
config it was given and fails alone, with the reason, if a draw cannot be built.

Time budget. `--time-budget` ends the sweep the way Ctrl-C does: Tune's own stop signal
(SIGUSR1) saves the experiment with the running trials unfinished, so `--resume` continues
them from their last checkpoint, with a new budget or none. (Tune's time_budget_s would mark
them finished and save its spent budget with the experiment: a resumed sweep could
continue neither.) DIR/budget.json records the budget and whether it ended the sweep.


Storage. DIR may be a URI (s3://, gs://, ...; see storage.py): Tune and the trials write
the experiment and checkpoints there themselves; the driver writes space.yaml and
status.json straight to it, and the tables and report in a local stage it then uploads.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from cifar_ray import checkpoint, cost, faults, rundir, storage, sweepdir, track, train
from cifar_ray.config import Config
from cifar_ray.data.split import check_batch, load_split
from cifar_ray.errors import UserError
from cifar_ray.fsutil import is_out_of_space, out_of_space
from cifar_ray.space import Plan, Settings, Space, label, plan_sweep, resolved

# The Tune function of a multi-worker trial only waits on its TorchTrainer: it holds no CPU,
# so trial drivers can never take the CPUs their own workers need (nested Tune + Train
# deadlocks when trial drivers hold every CPU), and the concurrency cap keeps every running
# trial's workers within the cluster. (A 0.1 CPU share would keep 2 workers x 1 CPU off a
# 2-CPU machine.)
# Ray wants a non-empty reservation, so the driver reserves the memory it does use.
TRIAL_DRIVER = {"cpu": 0, "memory": 256 * 1024**2}
ASHA_FILE = "asha.json"  # inside Tune's experiment folder: the scheduler's rung records
TABLE_EVERY_S = 20.0  # seconds between progress tables
PROBE_TIMEOUT_S = 300.0  # the cost probe's wait for a node with a trial's resources


@dataclass(frozen=True)
class Shared:
    """What every trial reads, put in the object store once (with_parameters)."""
    data: object  # ObjectRef of the split (a multi-worker trial hands it on)
    plan: Plan  # the sweep as resolved (without its list of trials: params come from Tune)
    sweep: storage.Location


# ---------------------------------------------------------------- inside a trial

class _EpochReporter:
    """Engine -> Tune: each epoch's metrics with a checkpoint (state.pt + epoch.json)."""

    def __init__(self, lr: float):
        self.lr = lr  # names the trial at the test fault point
        self.node_id = ray.get_runtime_context().get_node_id()  # trials.csv shows it

    def progress(self, epoch, step, steps):
        pass

    def epoch_end(self, metrics, state):
        with checkpoint.written(state(), metrics["epoch"]) as tmp:
            tune.report({**metrics, "node_id": self.node_id},
                        checkpoint=tune.Checkpoint.from_directory(tmp))
        faults.point("trial-epoch", lr=self.lr, epoch=metrics["epoch"])


class _ToTune(TuneReportCallback):
    """TuneReportCallback that lets a failed run's last report through Tune's metric check
    (a NaN loss reports only {"error": ...}): the trial is then shown as failed."""

    def after_report(self, run_context, metrics, checkpoint):
        if "error" in metrics[0]:
            metrics = [{**metrics[0], "val_acc": float("nan")}]
        super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict, shared: Shared) -> None:
    """The Tune function of one trial (see the module docstring)."""
    try:
        cfg = _trial_config(config["trial"], shared)
    except UserError as e:  # a proposal that cannot run: the trial fails with the reason
        tune.report({"error": str(e), "val_acc": float("nan")})
        return
    if shared.plan.settings.workers_per_trial > 1:
        _run_trainer(cfg, shared)
    else:
        _run_engine(cfg, shared)


def _trial_config(params: dict, shared: Shared) -> Config:
    """The trial's config. The driver checked every trial of a random sweep; a proposed one
    is checked here, the same way."""
    plan, s = shared.plan, shared.plan.settings
    if s.search != "optuna":
        return plan.trial(params)
    cfg = plan.checked(params)
    check_batch(cfg, ray.get(shared.data).n_train, s.workers_per_trial,
                f"{plan.space.source}: {label(params)}: train.batch_size")
    return cfg


def _run_engine(cfg: Config, shared: Shared) -> None:
    import torch

    from cifar_ray import engine

    torch.set_num_threads(max(1, int(shared.plan.settings.cpus_per_trial)))
    resume = checkpoint.restored(tune.get_checkpoint())
    try:
        engine.fit(cfg, ray.get(shared.data), device=engine.pick_device(cfg.scale.gpu),
                   resume=resume, reporter=_EpochReporter(cfg.optim.lr))
    except (engine.NonFiniteLoss, UserError) as e:
        # Deterministic failures: report the reason and end, rather than let Tune retry.
        tune.report({"error": str(e), "val_acc": float("nan")})


def _run_trainer(cfg: Config, shared: Shared) -> None:
    s = shared.plan.settings
    trial_id = tune.get_context().get_trial_id()
    res = train.Resources(s.workers_per_trial, worker_cpus(s), s.gpus_per_trial > 0)
    # Same name and storage on --resume: Ray Train continues from the run's last checkpoint.
    trainer = train.make_trainer(cfg, shared.data, res, shared.sweep.sub(sweepdir.TRAIN_DIR),
                             f"train-{trial_id}", callbacks=[_ToTune()])
    trainer.run_config.failure_config.controller_failure_limit = 1  # fail, don't hang
    trainer.fit()


# ---------------------------------------------------------------- the driver's helpers

class _ASHA(ASHAScheduler):
    """ASHA whose rung records survive a killed driver (Ray does not save a scheduler's
    state): written into Tune's experiment folder `experiment` on every change, read back
    on --resume (the scheduler itself comes back from Tune's tuner.pkl)."""

    def __init__(self, experiment: storage.Location, **kwargs):
        super().__init__(**kwargs)
        self._experiment = experiment
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            try:
                saved = json.loads(storage.read_bytes(self._experiment, ASHA_FILE))
            except (UserError, ValueError):
                saved = []
            for bracket, rungs in zip(self._brackets, saved):
                for (_, recorded), (_, old) in zip(bracket._rungs, rungs):
                    recorded.update(old)

    def _save(self) -> None:
        rungs = [[[m, recorded] for m, recorded in b._rungs] for b in self._brackets]
        try:
            storage.write(self._experiment, ASHA_FILE, json.dumps(rungs))
        except UserError:  # a store that failed once must not stop the sweep: the next
            pass  # result writes the records again

    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save()


def _trial_dirname(trial) -> str:
    return trial.trial_id


class _Progress(tune.Callback):
    """The driver's output: one line per trial that ends, a table every TABLE_EVERY_S (with
    every running trial and how long it has run, first epoch or not), and DIR/status.json
    (done / stopped / failed) kept up to date."""

    def __init__(self, sweep: storage.Location, max_epochs: int):
        self.sweep, self.max_epochs = sweep, max_epochs

    def setup(self, **info):
        self.t0 = self.last_table = time.monotonic()
        try:
            self.status = json.loads(storage.read_bytes(self.sweep, sweepdir.STATUS_FILE))
        except (UserError, ValueError):
            self.status = {}
        self.best: dict = {}  # trial id -> best val acc so far
        self.started: dict = {}  # trial id -> when it (re)started, time.monotonic()

    def _say(self, line: str) -> None:
        print(line, flush=True)

    def _label(self, trial) -> str:
        return label(trial.config.get("trial", {}))

    def _end(self, trial, state: str, reason: str = "") -> None:
        self.status[trial.trial_id] = {"status": state, **({"reason": reason} if reason else {})}
        try:
            storage.write(self.sweep, sweepdir.STATUS_FILE, sweepdir.status_text(self.status))
        except UserError as e:  # the report still reads each trial's own results
            self._say(f"warning: {e}")
        r = trial.last_result or {}
        epochs = r.get("epoch", 0)
        if state == "failed":
            what = reason
        else:
            best = self.best.get(trial.trial_id, float("nan"))
            what = f"val acc {r.get('val_acc', float('nan')):.4f} (best {best:.4f}), {epochs}/{self.max_epochs} epochs"
            if state == "stopped":
                what += ", stopped by ASHA"
            chance = r.get("chance")
            if chance is not None and epochs >= 2 and not best >= rundir.LEARNED * chance:
                what += f", did not learn (never above {rundir.LEARNED:g}x chance)"
        self._say(f"{state:<8} {trial.trial_id}  {self._label(trial)}: {what}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        acc = result.get("val_acc")
        if isinstance(acc, float) and math.isfinite(acc):
            self.best[trial.trial_id] = max(acc, self.best.get(trial.trial_id, -1.0))

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if "error" in r:
            self._end(trial, "failed", r["error"])
        else:
            self._end(trial, "done" if r.get("epoch", 0) >= self.max_epochs else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = sweepdir._error_reason(Path(trial.local_path)) if trial.local_path else ""
        self._end(trial, "failed", reason or "the trial crashed (see its error.txt)")

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_table >= TABLE_EVERY_S:
            self.table(trials)

    def on_experiment_end(self, trials, **info):
        self.table(trials)

    def table(self, trials) -> None:
        self.last_table = time.monotonic()
        counts = {"running": 0, "pending": 0, "done": 0, "stopped": 0, "failed": 0}
        running = []
        for t in trials:
            known = self.status.get(t.trial_id, {}).get("status")
            if known in counts:
                counts[known] += 1
            elif t.status == "RUNNING":
                counts["running"] += 1
                running.append(t)
            elif t.status in ("PENDING", "PAUSED"):
                counts["pending"] += 1
        elapsed = int(time.monotonic() - self.t0)
        line = f"[{elapsed // 60}m{elapsed % 60:02d}s] " + ", ".join(f"{v} {k}" for k, v in counts.items())
        if self.best:
            tid = max(self.best, key=self.best.get)
            best = next((self._label(t) for t in trials if t.trial_id == tid), "")
            line += f" | best val acc {self.best[tid]:.4f} ({tid}: {best})"
        self._say(line)
        now = time.monotonic()
        for t in running:
            r = t.last_result or {}
            took = cost.format_duration(now - self.started.get(t.trial_id, self.t0))
            where = (f"epoch {r['epoch']}/{self.max_epochs}  val acc "
                     f"{r.get('val_acc', float('nan')):.4f}" if "epoch" in r else
                     f"epoch 1/{self.max_epochs} not done yet")
            self._say(f"  running  {t.trial_id}  {took:>6}  {where}  {self._label(t)}")




class _Budget(tune.Callback):
    """Ends the sweep once its time budget is spent, counted from the first step: Tune's
    stop signal saves the experiment with the unfinished trials resumable (see the module
    docstring). The budget is read from DIR/budget.json at setup, not kept in the callback,
    because a resumed sweep gets its callbacks back from Tune's saved tuner: the new
    --time-budget (or none) is the one the driver wrote for this run."""

    def __init__(self, sweep: storage.Location):
        self.sweep = sweep

    def setup(self, **info):
        self.budget = read_budget(self.sweep)
        self.t0 = None

    def on_step_begin(self, iteration, trials, **info):
        if self.t0 is None:
            self.t0 = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        b = self.budget
        if b.get("seconds") is None or b.get("ended") or time.monotonic() - self.t0 < b["seconds"]:
            return
        b["ended"] = True
        running = sum(t.status == "RUNNING" for t in trials)
        print(f"time budget {b['text']} spent: stopping {running} running trial"
              f"{'s' * (running != 1)} and starting no more", flush=True)
        try:
            storage.write(self.sweep, sweepdir.BUDGET_FILE, json.dumps(b))
        except UserError as e:
            print(f"warning: {e}", flush=True)
        signal.raise_signal(signal.SIGUSR1)  # Tune's handler: stop, save, return from fit


def read_budget(sweep: storage.Location) -> dict:
    try:
        data = json.loads(storage.read_bytes(sweep, sweepdir.BUDGET_FILE))
    except (UserError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def worker_cpus(s: Settings) -> int:
    """CPUs (and threads) of each DDP worker of a multi-worker trial."""
    return max(1, int(s.cpus_per_trial // s.workers_per_trial))


@dataclass(frozen=True)
class Placement:
    resources: dict  # of each trial's Tune function
    concurrent: int | None  # max_concurrent_trials


def place(settings: Settings, check: bool = True) -> Placement:
    """Each trial's resources and the concurrency cap; refuses a trial larger than the
    cluster (Ray would wait for it forever)."""
    s = settings
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    multi = s.workers_per_trial > 1
    need_cpu = s.workers_per_trial * worker_cpus(s) if multi else s.cpus_per_trial
    need_gpu = float(s.workers_per_trial) if multi and s.gpus_per_trial else s.gpus_per_trial
    if check:
        if need_gpu > gpus:
            raise UserError(f"--gpus-per-trial {s.gpus_per_trial:g}: a trial needs {need_gpu:g} "
                            f"GPUs, the Ray cluster has {gpus:g}; use fewer, or add GPU nodes")
        if need_cpu > cpus:
            raise UserError(f"--cpus-per-trial {s.cpus_per_trial:g}: a trial needs {need_cpu:g} "
                            f"CPUs, the Ray cluster has {cpus:g}; use fewer")
        if not multi and not any(n["Resources"].get("CPU", 0) >= need_cpu
                                 and n["Resources"].get("GPU", 0) >= need_gpu
                                 for n in ray.nodes() if n.get("Alive")):
            raise UserError(f"no node of the Ray cluster has {need_cpu:g} CPUs and {need_gpu:g} "
                            "GPUs for one trial; lower --cpus-per-trial/--gpus-per-trial")
    if not multi:
        return Placement({"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}, s.concurrent or None)
    fit = int(cpus // need_cpu) if cpus else 1
    if need_gpu:
        fit = min(fit, int(gpus // need_gpu))
    return Placement(dict(TRIAL_DRIVER), max(1, min(s.concurrent or fit, fit)))


def check_state_api() -> None:
    """Refuse multi-worker trials on a Ray cluster without the State API (see _run)."""
    import ray
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        # This driver's cluster by its address: left to itself the State API refuses to pick
        # one when other Rays run on the same machine.
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, timeout=30,
                    raise_on_missing_output=False)
    except RayStateApiException:
        raise UserError("--workers-per-trial: the Ray cluster has no dashboard (State API), "
                        "which Ray Train needs to free each finished trial's workers; start "
                        "Ray with its dashboard (ray start --head --include-dashboard=true)"
                        ) from None


def _quiet(verbose: bool) -> None:
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
    if not verbose:
        for name in ("ray.tune", "ray.train", "ray.air", "optuna"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# ---------------------------------------------------------------- the driver

def run(plan: Plan | None, out: str | Path | None, *, resume: bool = False,
        overwrite: bool = False, check_resources: bool = True, verbose: bool = False,
        echo=print, mlflow: str | None = None, time_budget: str | None = None,
        dry_run: bool = False) -> sweepdir.Sweep | None:
    """Run the sweep `plan` (see space.plan_sweep) into `out` (a path or URI), or with `resume`
    continue the one there (plan None); write the tables and the report; return the sweep
    as read back. `mlflow`: a tracking URI (see track.py); `time_budget` (`90m`) ends the
    sweep when spent, resumable; `dry_run` prints the cost estimate only, writing nothing
    and returning None."""
    budget = None
    if time_budget is not None:
        budget = {"seconds": cost.parse_duration(time_budget), "text": time_budget}
        if threading.current_thread() is not threading.main_thread():
            raise UserError("--time-budget: the sweep must run on the main thread (Tune stops "
                            "it with a signal)")
    if dry_run:
        return _run(plan, None, None, check_resources, verbose, echo)
    loc = storage.locate(out, "--resume" if resume else "--out")
    storage.exists(loc)  # an unreachable store fails now, before the data and Ray
    tracking = track.SweepTracking(loc, mlflow, resume, echo)  # MLflow's server is asked now
    with storage.claimed(loc), storage.Stage(loc) as stage, tracking:  # one writer per folder
        experiment = None
        if resume:
            if not storage.exists(loc, sweepdir.SPACE_FILE):
                raise UserError(f"--resume {loc.text}: not a sweep directory (no {sweepdir.SPACE_FILE})")
            stage.pull()
            space, settings, _ = sweepdir.load_space(stage.local)
            plan = plan_sweep(space, settings)
            exp = sweepdir.experiment_dir(stage.local)
            if exp is None or not (exp / "tuner.pkl").is_file():
                raise UserError(f"--resume {loc.text}: the sweep never started (no "
                                f"{sweepdir.TUNE_PREFIX}*/tuner.pkl); run it again with --overwrite")
            experiment = loc.sub(exp.name)
        else:  # before the data is prepared and Ray starts
            storage.check_new(loc, overwrite, sweepdir.SWEEP, f"--resume {loc.text}",
                              keep=(plan.base.data.source,))
        return _run(plan, stage, experiment, check_resources, verbose, echo, tracking, budget)


def _run(plan: Plan, stage: storage.Stage | None, experiment: storage.Location | None,
         check_resources: bool, verbose: bool, echo, tracking: track.SweepTracking | None = None,
         budget: dict | None = None) -> sweepdir.Sweep | None:
    """The sweep into `stage.loc`: a new one, or with `experiment` (Tune's folder of the
    sweep) the continuation of an interrupted one; without a stage, the cost estimate only."""
    from cifar_ray.report import publish

    loc, resume, dry_run = stage and stage.loc, experiment is not None, stage is None
    settings, base = plan.settings, plan.base
    if settings.search == "optuna":
        _need_optuna()
    split = load_split(base, nchw=True)  # a CPU trial reads the device loader's layout in place
    n_train, n_val = split.n_train, len(split.val[1])
    for params, cfg in plan.trials:  # every trial's batch against the data, before Ray starts
        check_batch(cfg, n_train, settings.workers_per_trial,
                    f"{plan.space.source}: {label(params)}: train.batch_size")
    started_ray = not ray.is_initialized()
    _quiet(verbose)
    # A multi-worker trial's TorchTrainer reserves its workers' CPUs in a placement group that
    # Ray Train frees once its cleaner sees, through the State API (served by the dashboard),
    # that the trial's controller is gone: without it each finished or stopped trial kept its
    # CPUs and the sweep stalled once they ran out.
    train.init_ray(verbose=verbose, dashboard=settings.workers_per_trial > 1)
    try:
        p = place(settings, check_resources)
        if not resume:
            configs = [(label(params), cfg) for params, cfg in plan.trials]
            for line in _cost(configs, settings, n_train, n_val, p):
                echo(line)
        if dry_run:
            return None
        if settings.workers_per_trial > 1 and check_resources:
            check_state_api()
        train.check_shared(loc, echo)
        if not resume:
            storage.make_new(loc)
            storage.write(loc, sweepdir.SPACE_FILE, _yaml(resolved(plan.space, settings, base)))
        # this run's budget (a resumed sweep's earlier one is over): _Budget reads it
        storage.write(loc, sweepdir.BUDGET_FILE, json.dumps(budget or {}))
        tracking.start(plan)
        how = (f"Optuna TPE proposing {settings.samples} trials" if settings.search == "optuna"
               else f"{len(plan.trials)} trials")
        echo(f"sweep {plan.space.name}: {how}, up to {base.train.epochs} epochs each "
             f"(ASHA: grace {settings.grace}, reduction {settings.reduction:g})"
             + (f", time budget {budget['text']}" if budget else "")
             + f"; {'resuming' if resume else 'writing'} {loc.text}")
        shared = Shared(ray.put(split), replace(plan, trials=()), loc)
        del split  # the object store holds the one copy now
        trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), p.resources)
        tuner = _tuner(trainable, plan.space, [params for params, _ in plan.trials], settings,
                       base, loc, p, experiment)
        tuner.fit()
        stage.pull()  # Tune's results, as it left them in the store
        sw = publish(stage)
        tracking.finish(stage.local, sw)
        return sw
    except Exception as e:  # Tune's own writes (experiment state, trial results) on a full disk
        if is_out_of_space(e):
            raise out_of_space(loc.text, then=f" and continue with: cifar-ray tune --resume "
                               f"{loc.text}") from None
        if _out_of_memory(e):
            # Ray's memory monitor killed a trial's actor as it started: Tune's controller does
            # not handle that and stops the sweep. Its state is on disk: the sweep resumes.
            raise UserError(f"{loc.text}: the sweep stopped because Ray killed trial workers when "
                            "the machine ran low on memory; finished trials are kept: free some "
                            f"memory and continue with: cifar-ray tune --resume {loc.text}") from None
        raise
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()


def _out_of_memory(error: BaseException | None) -> bool:
    """Whether `error` (or what it wraps) is Ray's memory monitor killing workers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.OutOfMemoryError) or \
                "killed due to the node running low on memory" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _need_optuna() -> None:
    try:
        importlib.import_module("optuna")
    except ImportError:
        raise UserError("--search optuna needs Optuna: pip install optuna (or install "
                        "cifar-ray with its tracking extra: pip install -e \".[track]\")") from None


def _domain(kind: str, spec: list):
    """A space's distribution as Tune's: what OptunaSearch turns into Optuna's."""
    if kind == "choice":
        return tune.choice(spec)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform,
            "randint": tune.randint}[kind](*spec)


def _search(space: Space, trials: list[dict], settings: Settings, base: Config) -> dict:
    """The Tuner's param_space and the TuneConfig arguments of the search."""
    if settings.search != "optuna":
        return {"param_space": {"trial": tune.grid_search(trials)}}
    from ray.tune.search.optuna import OptunaSearch

    space_ = {key: _domain(kind, spec) for key, (kind, spec) in space.dists.items()}
    return {"param_space": {"trial": space_}, "search_alg": OptunaSearch(seed=base.train.seed),
            "num_samples": settings.samples}


def _cost(configs: list[tuple[str, Config]], s: Settings, n_train: int, n_val: int,
          p: Placement) -> list[str]:
    """The cost estimate's lines, probed on a node of the cluster with a trial's resources."""
    sized = [(name, cfg, cost.macs(cfg)) for name, cfg in configs]
    light, heavy = min(sized, key=lambda t: t[2]), max(sized, key=lambda t: t[2])
    multi, gpu = s.workers_per_trial > 1, s.gpus_per_trial > 0
    threads = worker_cpus(s) if multi else max(1, int(s.cpus_per_trial))
    task = ray.remote(cost.probe).options(num_cpus=threads,
                                          num_gpus=(1 if multi else s.gpus_per_trial) if gpu else 0)
    refs = {m: task.remote(cfg, gpu, threads, s.workers_per_trial)
            for _, cfg, m in (light, heavy)}
    try:
        probes = [cost.Probed(m, sec) for m, sec in zip(refs, ray.get(list(refs.values()),
                                                                        timeout=PROBE_TIMEOUT_S))]
    except ray.exceptions.GetTimeoutError:
        for ref in refs.values():
            ray.cancel(ref, force=True)
        return [f"cost: not estimated (no node took the probe within {PROBE_TIMEOUT_S:.0f} s)"]
    total = ray.cluster_resources()
    slots = p.concurrent or max(1, min(int(total.get("CPU", 0) // s.cpus_per_trial),
                                       int(total.get("GPU", 0) // s.gpus_per_trial) if gpu
                                       else len(configs)))
    where = (f"{s.workers_per_trial} workers x {threads} CPU" if multi else
             f"{s.cpus_per_trial:g} CPU") + (f" + {s.gpus_per_trial:g} GPU" if gpu else "")
    est = cost.estimate([(name, m) for name, _, m in sized], probes, n_train=n_train,
                        n_val=n_val, max_epochs=s.max_epochs, grace=s.grace,
                        reduction=s.reduction, slots=min(slots, len(configs)),
                        workers=s.workers_per_trial, gpu=gpu, where=where)
    return est.lines(proposed=s.search == "optuna")


def _tuner(trainable, space: Space, trials: list[dict], settings: Settings,
           base: Config, sweep: storage.Location, p: Placement,
           experiment: storage.Location | None):
    if experiment is not None:
        return tune.Tuner.restore(experiment.path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False,
                                  storage_filesystem=experiment.fs if experiment.remote else None)
    name = sweepdir.TUNE_PREFIX + secrets.token_hex(3)
    scheduler = _ASHA(sweep.sub(name), time_attr="epoch", max_t=base.train.epochs,
                      grace_period=settings.grace, reduction_factor=settings.reduction)
    search = _search(space, trials, settings, base)
    return tune.Tuner(
        trainable,
        param_space=search.pop("param_space"),
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=p.concurrent, **search,
                                    trial_dirname_creator=_trial_dirname,
                                    # Reusing a multi-worker trial's actor fails: Tune waits 2 s
                                    # for the trial's thread, still in TorchTrainer.fit's teardown,
                                    # and errors the next trial ("reset_config() ...").
                                    reuse_actors=settings.workers_per_trial == 1),
        run_config=tune.RunConfig(
            name=name, **sweep.ray_storage(), verbose=0,
            callbacks=[_Progress(sweep, base.train.epochs), _Budget(sweep),
                       track.TrialLogger(sweep)],
            failure_config=tune.FailureConfig(max_failures=base.scale.max_failures),
            # The best checkpoint by val accuracy; Tune keeps the latest one too.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1,
                                                    checkpoint_score_attribute="val_acc",
                                                    checkpoint_score_order="max")),
    )


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
