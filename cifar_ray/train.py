"""Ray Train wrapper: runs the engine in DDP workers of a `TorchTrainer` and keeps the run
directory (see rundir.py) up to date from the driver.

The driver loads the prepared dataset once, splits it, and puts the arrays in Ray's object
store; every worker reads that one copy. Rank 0 sends progress and epoch metrics to the
driver through a small Ray queue, so the driver prints a progress bar and one line per
epoch and rewrites metrics.csv as the run goes. Checkpoints go through `ray.train.report`
into DIR/checkpoints/epoch-NNNN/; Ray restores the latest one when a worker dies
(FailureConfig) and when the same run directory is trained again (--resume).

DIR may be a URI (s3://, gs://, ...; see storage.py): Ray Train writes the checkpoints there
itself, and the driver writes its files into a local stage and uploads each as it changes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_ray import checkpoint, faults, rundir, storage
from cifar_ray.config import Config, ScaleConfig, from_dict, portable, save_config, to_dict
from cifar_ray.data.split import Split, check_batch, load_split
from cifar_ray.errors import UserError
from cifar_ray.fsutil import is_out_of_space, out_of_space

RUN_NAME = rundir.CHECKPOINTS  # Ray's experiment folder inside the run directory
LOOPBACK = "127.0.0.1"  # where a local Ray listens: nothing of it on the machine's network
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-machine mode (see init_local)


# ---------------------------------------------------------------- inside each worker

class _RayReporter:
    """Engine → Ray: epoch ends become `ray.train.report` (+ checkpoint on rank 0)."""

    def __init__(self, queue, rank: int, node_id: str = ""):
        self.queue, self.rank, self.node_id = queue, rank, node_id
        self._last_put = 0.0

    def _put(self, item) -> None:
        if self.queue is not None and self.rank == 0:
            try:
                self.queue.put_nowait(item)
            except Exception:  # a full or vanished queue must never stop training
                pass

    def progress(self, epoch, step, steps):
        faults.point("train-step", rank=self.rank, epoch=epoch + 1, step=step)
        now = time.monotonic()
        if now - self._last_put > 0.5 or step == steps:
            self._last_put = now
            self._put(("progress", epoch, step, steps))

    def error(self, message: str) -> None:
        self._put(("error", message))

    def worker(self, info: dict) -> None:
        """Where this rank runs (every rank sends it, once per start of the group)."""
        try:
            self.queue.put_nowait(("worker", info))
        except Exception:
            pass

    def epoch_end(self, metrics, state):
        import ray.train

        name = f"epoch-{metrics['epoch']:04d}"
        reported = {**metrics, "node_id": self.node_id}  # a sweep's trials.csv shows it
        if state is None:
            ray.train.report(reported, checkpoint=None, checkpoint_dir_name=name)
        else:
            with checkpoint.written(state(), metrics["epoch"]) as tmp:
                ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=name)
        self._put(("epoch", metrics))


def train_loop_per_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs: fetch the shared arrays, resume from
    Ray's latest checkpoint if there is one, and hand over to the engine."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from cifar_ray import engine

    torch.set_num_threads(loop_config["threads"])
    cfg = from_dict(loop_config["config"], "run config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    split = ray.get(loop_config["data"])
    # Ray's latest checkpoint; if it is damaged, the newest readable one below
    resume = checkpoint.restored(ray.train.get_checkpoint(), echo=lambda m: print(m, flush=True))
    # On --resume the driver sends the newest complete checkpoint on disk: Ray's own
    # snapshot can lag one epoch behind when the previous driver was stopped mid-report.
    if loop_config.get("resume") is not None:
        newest = ray.get(loop_config["resume"])
        if resume is None or newest["epoch"] > resume["epoch"]:
            resume = newest
    # Ray registers a checkpoint once it has polled every worker's report of it (every 2 s):
    # after a worker died just past a report, a newer complete checkpoint is on disk.
    if loop_config.get("checkpoints"):
        newest = checkpoint.newest_in(Path(loop_config["checkpoints"]),
                                      resume["epoch"] if resume else 0)
        resume = newest or resume
    device = ray.train.torch.get_device()
    where = worker_info(rank, device)
    reporter = _RayReporter(loop_config.get("queue"), rank, where["node_id"])
    if reporter.queue is not None:
        reporter.worker(where)
    try:
        engine.fit(cfg, split, device=device, rank=rank,
                   world_size=world, wrap=ray.train.torch.prepare_model, resume=resume,
                   reporter=reporter)
    except engine.NonFiniteLoss as e:
        # Every rank raises at the same step (the check is collective), so every rank
        # reports once more: the run ends normally and the driver shows the reason.
        reporter.error(str(e))
        ray.train.report({"error": str(e)}, checkpoint=None)


def worker_info(rank: int, device) -> dict:
    """{rank, node_id, node_ip, device[, gpu]}: where a worker (or a trial) runs."""
    import ray
    import torch

    info = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------- the driver

def _followed(queue, running):
    """The workers' queue items as they come, until `running()` is false and the queue is
    drained: one blocking get per item, or per second when idle (cheaper for the queue actor
    than polling; BENCHMARKS.md, "Speed")."""
    from ray.util.queue import Empty

    while True:
        alive = running()
        try:
            yield queue.get(timeout=1.0)
        except Empty:  # nothing for 1 s; once the run has ended, nothing more will come
            if not alive:
                return
        except Exception:  # a lost queue actor: progress lines stop, the run goes on
            if not alive:
                return
            time.sleep(1.0)


@dataclass(frozen=True)
class Resources:
    workers: int
    cpus_per_worker: int
    gpu: bool


def init_ray(num_cpus: int | None = None, verbose: bool = False, dashboard: bool = False) -> None:
    """Connect to RAY_ADDRESS if set, else start a private local instance on 127.0.0.1, with
    Ray's dashboard only when `dashboard` (it also serves the State API, see tune.py).

    Workers' and Ray's own log lines reach the terminal only with `verbose`: the driver
    prints progress itself, and a worker's error comes back with `fit()`'s exception."""
    import logging

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster on 127.0.0.1 (all its nodes on this machine): Ray would resolve the
        # address to the machine's network address, where it does not listen.
        if address.split("://")[-1].startswith((LOOPBACK, "localhost")):
            from ray._private import ray_constants

            os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
        check_cluster(address)
        fault_env = faults.env()  # tests only
        ray.init(address=address, log_to_driver=verbose,
                 **({"runtime_env": {"env_vars": fault_env}} if fault_env else {}))
    else:
        # Ray's default for a cluster it starts is token authentication, announced with a
        # WARNING on every start: the default is what we want, the line is not.
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = auth.level
        auth.setLevel(logging.INFO if verbose else logging.ERROR)
        try:
            init_local(num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=verbose,
                       logging_level="INFO" if verbose else "WARNING")
        finally:
            auth.setLevel(level)


def init_local(**kwargs) -> None:
    """`ray.init(address="local", **kwargs)` listening on 127.0.0.1 only (see `loopback`).
    The process stays in Ray's single-machine mode afterwards: its Ray clients (the State
    API, ...) would otherwise turn 127.0.0.1 into the machine's address too."""
    import ray
    from ray._private import ray_constants

    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs)


@contextlib.contextmanager
def loopback():
    """While Ray starts nodes in this block (the tests' clusters), they listen on 127.0.0.1
    only: nothing of a local Ray on the machine's network. Ray turns a loopback node address
    into the machine's unless it is in its single-machine mode, which one variable turns on
    (read by the processes Ray starts, and by this one's Ray at import: its copy is set too)."""
    from ray._private import ray_constants

    saved = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved[0]


def _sees(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_shared(loc: storage.Location, echo=print) -> None:
    """On a Ray cluster of several nodes, refuse a folder on the local disk that another
    node does not see: Ray's workers write checkpoints into it on their own nodes. A marker
    file written here is looked for by a task pinned to each other node."""
    import ray
    from pyarrow import fs as pafs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as OnNode

    here = ray.get_runtime_context().get_node_id()
    others = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()
              if n.get("Alive") and n["NodeID"] != here}
    if not others or not isinstance(loc.fs, pafs.LocalFileSystem):
        return
    folder = Path(loc.path)
    while not folder.is_dir():
        folder = folder.parent
    token = secrets.token_hex(8)
    marker = folder / f".cifar-ray-shared-{token}"
    try:
        marker.write_text(token)
    except OSError:
        return  # an unwritable folder is refused by make_new, with its reason
    try:
        look = ray.remote(num_cpus=0)(_sees)
        refs = {look.options(scheduling_strategy=OnNode(n, soft=False)).remote(str(marker), token): n
                for n in others}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=60)
        blind = [others[refs[r]] for r in done if not ray.get(r)]
    finally:
        marker.unlink(missing_ok=True)
    if late:
        echo(f"warning: {len(late)} node(s) did not answer whether they see {loc.text}")
    if blind:
        raise UserError(f"{loc.flag} {loc.text}: a folder that {len(blind)} of the Ray cluster's "
                        f"{len(others) + 1} nodes do not see ({', '.join(sorted(set(blind)))}), "
                        "but every node writes checkpoints into it; give a bucket "
                        "(s3://BUCKET/PREFIX, gs://BUCKET/PREFIX) or a folder all nodes mount")


PROBE_S = 10.0  # seconds a cluster has to answer check_cluster


def check_cluster(address: str) -> None:
    """Refuse, within seconds, a RAY_ADDRESS where nothing listens or whose cluster wants a
    token we do not have: ray.init would retry for a minute or more, logging every try."""
    import socket

    import ray._raylet
    from ray.exceptions import AuthenticationError

    if address in ("auto", "local") or "://" in address:
        return  # found by Ray itself, or a Ray Client address: Ray's own errors are clear
    where = f"RAY_ADDRESS={address}"
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{where}: expected HOST:PORT of the cluster's head (`ray start --head` "
                        "prints it), or unset RAY_ADDRESS to train on a local Ray")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except OSError as e:
        raise UserError(f"{where}: nothing answers there ({e.strerror or e}); start the cluster "
                        "(ray start --head), correct RAY_ADDRESS, or unset it to train on a "
                        "local Ray") from None
    outcome: dict = {}

    def probe():
        try:
            ray._raylet.GcsClient(address=address)
            outcome["ok"] = True
        except BaseException as e:  # surfaced below
            outcome["error"] = e

    with _stderr_to_devnull():  # Ray's C++ client logs each refused try on stderr itself
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(PROBE_S)
    if isinstance(outcome.get("error"), AuthenticationError):
        raise UserError(f"{where}: the cluster wants an authentication token this machine does "
                        "not have; copy the head's token (ray get-auth-token, on the head) to "
                        "~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at it, and set "
                        "RAY_AUTH_MODE=token")
    if not outcome:
        raise UserError(f"{where}: no Ray cluster answered within {PROBE_S:.0f} s (is it a Ray "
                        "head's GCS port?); correct RAY_ADDRESS, or unset it to train on a "
                        "local Ray")


class _stderr_to_devnull:
    """File descriptor 2 sent to /dev/null while the block runs (C++ libraries write there
    directly, past Python's sys.stderr)."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def plan_resources(scale: ScaleConfig, check: bool = True) -> Resources:
    """Size the workers from the cluster, and refuse (before starting) a run the cluster
    cannot hold: Ray would otherwise wait for resources forever."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 0)), int(total.get("GPU", 0))
    workers = scale.workers
    per_worker = scale.cpus_per_worker or max(1, cpus // workers)
    if check:
        if scale.gpu and workers > gpus:
            raise UserError(f"--workers {workers} --gpu needs {workers} GPUs, the Ray cluster has "
                            f"{gpus}; use fewer workers, drop --gpu, or add GPU nodes")
        if workers * per_worker > cpus:
            raise UserError(f"--workers {workers} x {per_worker} CPUs needs {workers * per_worker} "
                            f"CPUs, the Ray cluster has {cpus}; use fewer workers or set "
                            "scale.cpus_per_worker lower")
    return Resources(workers, per_worker, scale.gpu)


def bundles(res: Resources) -> list[dict]:
    """The workers' resource bundles, as Ray Train asks for them."""
    return [{"CPU": res.cpus_per_worker, **({"GPU": 1} if res.gpu else {})}] * res.workers


def make_trainer(cfg: Config, data_ref, res: Resources, where: storage.Location, name: str,
                 queue=None, callbacks=None, resume=None):
    """The TorchTrainer of one run (train and tune both build theirs here), its checkpoints
    in `where`/`name`. `resume`: an object ref of a checkpoint state to start from when
    Ray's own is older or absent."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "data": data_ref, "queue": queue,
                           "threads": res.cpus_per_worker, "resume": resume,
                           # read by the workers when local (a bucket: Ray's checkpoint only)
                           "checkpoints": None if where.remote else str(Path(where.path) / name)},
        torch_config=TorchConfig(backend="nccl" if res.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpu,
                                     resources_per_worker=bundles(res)[0],
                                     placement_strategy=cfg.scale.placement),
        run_config=RunConfig(
            name=name, **where.ray_storage(), callbacks=callbacks,
            # Keep the best checkpoint by val accuracy; Ray always keeps the latest too.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_acc",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class _Console:
    """The driver's output: a progress bar on a terminal, one line per epoch always."""

    def __init__(self, epochs: int, stream=None):
        # sys.stderr when the console is made, not when this module was imported (a test's
        # captured stream then, closed since)
        self.epochs, self.stream = epochs, stream or sys.stderr
        self.tty = self.stream.isatty()

    def progress(self, epoch: int, step: int, steps: int) -> None:
        if not self.tty:
            return
        width = 30
        done = int(width * step / max(steps, 1))
        self.stream.write(f"\repoch {epoch + 1}/{self.epochs} [{'#' * done}{'.' * (width - done)}]"
                          f" {step}/{steps}")
        self.stream.flush()

    def epoch(self, m: dict, history: list[dict]) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        line = (f"epoch {m['epoch']:>3}/{self.epochs}  train loss {m['train_loss']:.4f} "
                f"acc {m['train_acc']:.4f}  val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}  "
                f"lr {m['lr']:.4g}  {m['images_per_s']:.0f} img/s  {m['seconds']:.1f}s")
        if "test_acc" in m:
            line += f"  test acc {m['test_acc']:.4f}"
        if rundir.did_not_learn(history):
            line += (f"  [still at chance ({m['chance']:.2f}): not learning; try another "
                     "recipe, e.g. --set optim.name=adamw --lr 0.001]")
        print(line, flush=True)


def check_run_dir(out: storage.Location, resume: bool, overwrite: bool, keep=()) -> None:
    """Refuse a run directory that cannot take the run, touching nothing. `keep`: paths
    that --overwrite must not delete (the --data source)."""
    if resume:
        if not storage.exists(out, "config.yaml"):
            raise UserError(f"--resume {out.text}: not a run directory (no config.yaml)")
        return
    storage.check_new(out, overwrite, rundir.RUN, "--resume", keep)


def run(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False,
        check_resources: bool = True, verbose: bool = False, echo=print,
        mlflow: str | None = None) -> dict:
    """Train `cfg` into run directory `out` (a path or URI) on Ray Train; return the
    summary. `mlflow`: a tracking URI (see track.py)."""
    from cifar_ray.models import model_info
    from cifar_ray.track import RunTracking

    loc = storage.locate(out, "--resume" if resume else "--out")
    storage.exists(loc)  # an unreachable store fails now, before the data and Ray
    tracking = RunTracking(loc, mlflow, resume, echo)  # MLflow's server is asked now too
    cfg = portable(cfg)
    # Bad input fails before the data is prepared, Ray starts or DIR is written: the model
    # (again below with the data's classes), DIR, the batch size against the data, the cluster.
    model = cfg.model.spec or cfg.model.name
    # A spec file on the driver is checked as the file, so that its errors name it.
    model_info(cfg.model.name if Path(cfg.model.name).is_file() else model, **cfg.model.args)
    with storage.claimed(loc):  # one writer per folder, from here to the end
        check_run_dir(loc, resume, overwrite, keep=(cfg.data.source,))
        split = load_split(cfg)
        info = model_info(model, num_classes=len(split.classes), **cfg.model.args)
        check_batch(cfg, split.n_train, cfg.scale.workers)
        with storage.Stage(loc) as stage, tracking:
            newest = resume_from(stage, cfg, echo) if resume else None
            data = [split]  # _run moves it into Ray's object store: one copy, not two
            del split
            return _run(cfg, data, info, stage, newest, resume, check_resources, verbose, echo,
                        tracking)


def resume_from(stage: storage.Stage, cfg: Config, echo=print) -> dict | None:
    """The newest readable checkpoint of the run in `stage` (None: it has none yet), after
    the checks of a resume: a run whose checkpoints are all unreadable, or `cfg` asking for
    fewer epochs than that checkpoint has done, is refused. Ray's own record of the
    checkpoints is made to agree with what is readable (see repair_ray_record)."""
    stage.pull()
    ckpts = rundir.checkpoint_dirs(stage.local)
    newest = checkpoint.newest_state(stage.local, echo, stage.fetch)
    if newest is None:
        if ckpts:
            raise UserError(f"--resume {stage.loc.text}: none of its {len(ckpts)} checkpoints "
                            "can be read; start the run again with --overwrite")
        repair_ray_record(stage, set())
        return None
    done = newest["epoch"]
    if done < max(ckpts, default=0):
        echo(f"resuming from epoch {done}, the newest checkpoint that can be read")
    if cfg.train.epochs < done:
        raise UserError(f"--epochs {cfg.train.epochs}: the run in {stage.loc.text} has trained "
                        f"{done} epochs already; give --epochs {done} or more, or leave it out")
    repair_ray_record(stage, {d.name for e, d in ckpts.items() if e <= done})
    return newest


RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


def repair_ray_record(stage: storage.Stage, good: set[str]) -> None:
    """Make Ray Train's record of the run's checkpoints name only folders in `good`: Ray
    refuses to start when it names a folder that is gone, hands its latest one to the
    workers even when that one is damaged, and cannot read a record cut short by a full
    disk. Entries for other folders are dropped; a record that cannot be read is removed
    (the workers then start from the checkpoint the driver sends)."""
    import json

    rel = f"{RUN_NAME}/{RAY_RECORD}"
    path = stage.local / rel
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        results = record["checkpoint_results"]
        order = dict(zip((r["checkpoint_dir_name"] for r in results),
                         record["checkpoint_report_indices"]))
        latest = record["latest_checkpoint_result"]
        pending = list(zip(record["pending_training_results"], record["pending_validation_specs"]))
        if set(order) <= good and (latest is None or latest["checkpoint_dir_name"] in good):
            return
        kept = [r for r in results if r["checkpoint_dir_name"] in good]
        record["checkpoint_results"] = kept
        record["checkpoint_report_indices"] = [order[r["checkpoint_dir_name"]] for r in kept]
        record["latest_checkpoint_result"] = max(
            kept, key=lambda r: order[r["checkpoint_dir_name"]]) if kept else None
        pending = [(r, v) for r, v in pending if r["checkpoint_dir_name"] in good]
        record["pending_training_results"] = [r for r, _ in pending]
        record["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            record[key] = [n for n in record.get(key, []) if n in good]
        storage.write(stage.loc, rel, json.dumps(record))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        storage.remove(stage.loc.sub(rel))


def _run(cfg: Config, data: list[Split], info: dict, stage: storage.Stage, newest: dict | None,
         resume: bool, check_resources: bool, verbose: bool, echo, tracking) -> dict:
    """The Ray part of `run`: start the trainer, follow it, write the run's files. `newest`:
    the checkpoint a resumed run continues from."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    out = stage.local  # the run directory, or its local stage when it is a URI
    started_ray = not ray.is_initialized()
    init_ray(verbose=verbose)
    res = plan_resources(cfg.scale, check_resources)
    check_shared(stage.loc, echo)
    if res.gpu:  # each GPU worker's torch, CUDA and driver, before anything is written
        from cifar_ray.preflight import check_gpus

        check_gpus(bundles(res), cfg.scale.placement, echo)
    if not resume:  # after every check (run): a refusal writes nothing
        storage.make_new(stage.loc)
    save_config(cfg, out / "config.yaml")
    tracking.start(stage, cfg)
    stage.push()
    history: dict[int, dict] = {}
    resume_ref = None
    if newest is not None:
        history = {row["epoch"]: row for row in newest["history"]}
        resume_ref = ray.put(newest)
        del newest
    console = _Console(cfg.train.epochs)
    # On the driver's node: the workers' node may be lost, and the queue with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer = make_trainer(cfg, ray.put(data.pop()), res, stage.loc, RUN_NAME, queue=queue,
                           resume=resume_ref)
    outcome: dict = {}

    def _fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # surfaced in the main thread
            outcome["error"] = e

    t0 = time.perf_counter()
    thread = threading.Thread(target=_fit, daemon=True)
    thread.start()
    error = None
    workers: dict[int, dict] = {}  # rank -> where it runs (after a restart: where it went)
    try:
        for item in _followed(queue, thread.is_alive):
            if item[0] == "progress":
                console.progress(*item[1:])
            elif item[0] == "error":
                error = item[1]
            elif item[0] == "worker":
                workers[item[1]["rank"]] = item[1]
            else:
                history[item[1]["epoch"]] = item[1]
                rows = [history[k] for k in sorted(history)]
                rundir.write_metrics(rows, out / "metrics.csv")
                tracking.epoch(item[1])
                try:
                    stage.push()
                except UserError as e:  # the store may be back by the next epoch
                    echo(f"warning: {e}")
                console.epoch(item[1], rows)
        thread.join()
    except KeyboardInterrupt:
        echo(f"\ninterrupted: stopping workers; the last finished epoch is saved. "
             f"Resume with: cifar-ray train --resume {stage.loc.text}")
        if started_ray:
            ray.shutdown()
        thread.join(timeout=30)
        error = "interrupted"
    wall = time.perf_counter() - t0
    if "error" in outcome and error is None:
        if is_out_of_space(outcome["error"]):  # Ray's copy of a checkpoint, most likely
            if started_ray:
                ray.shutdown()
            # what the next checkpoint needs: about what the largest one before it took
            sizes = [(d / rundir.STATE_FILE).stat().st_size
                     for d in rundir.checkpoint_dirs(out).values()]
            raise out_of_space(stage.loc.text, max(sizes, default=None), then=" and continue the run with: "
                               f"cifar-ray train --resume {stage.loc.text}") from None
        bad_input = worker_user_error(outcome["error"])
        if bad_input is not None:  # e.g. a spec file a worker's node does not have
            if started_ray:
                ray.shutdown()
            if not resume and not history:
                storage.remove(stage.loc)  # nothing trained: leave no run folder behind
            raise UserError(f"a training worker refused the run: {bad_input}") from None
        raise RuntimeError(f"training failed: {outcome['error']}") from outcome["error"]
    summary = finish_run(stage, cfg, info, wall, [workers[r] for r in sorted(workers)])
    if started_ray and ray.is_initialized():
        ray.shutdown()
    if error:
        summary["error"] = error
    tracking.finish(summary)
    return summary


def worker_user_error(error: BaseException) -> UserError | None:
    """The UserError (bad input, one line) a worker raised, where Ray Train's failure carries
    one: it wraps each worker's exception with its traceback text."""
    for failure in getattr(error, "worker_failures", {}).values():
        failure = getattr(failure, "_base_exc", failure)
        if isinstance(failure, UserError):
            return failure
    return None


def finish_run(stage: storage.Stage, cfg: Config, info: dict, wall_seconds: float,
               workers: list[dict]) -> dict:
    """Write metrics.csv, curves.png and summary.json from the newest checkpoint's history
    (the authority: it survives driver restarts and worker failures); `workers`: where
    each rank ran last."""
    from cifar_ray.report import plot_curves

    stage.pull()  # the checkpoints as Ray left them
    out = stage.local
    newest = checkpoint.newest_state(out, lambda *a: None, stage.fetch)
    history = newest["history"] if newest else []
    if not history:
        return {"epochs": 0}
    ckpts = {e: d for e, d in rundir.checkpoint_dirs(out).items() if e <= newest["epoch"]}
    rundir.write_metrics(history, out / "metrics.csv")
    plot_curves(history, out / "curves.png", title=f"{cfg.model.name}")
    best_ep = rundir.best_epoch(history, set(ckpts))
    val = [h["val_acc"] for h in history]
    last = history[-1]
    train_seconds = sum(h["seconds"] for h in history)
    summary = {
        "model": cfg.model.name, "params": info["params"], "epochs": len(history),
        "epochs_planned": cfg.train.epochs,
        "best_val_acc": float(np.nanmax(val)) if np.isfinite(val).any() else None,
        "final_val_acc": last["val_acc"], "final_train_acc": last["train_acc"],
        "train_seconds": train_seconds, "wall_seconds": wall_seconds,
        "images_per_second": float(np.mean([h["images_per_s"] for h in history])),
        "best_epoch": best_ep, "last_epoch": max(ckpts),
        "best_checkpoint": str(ckpts[best_ep].relative_to(out) / rundir.STATE_FILE),
        "last_checkpoint": str(ckpts[max(ckpts)].relative_to(out) / rundir.STATE_FILE),
        "workers": workers,
    }
    if "test_acc" in last:
        summary["test_acc"] = last["test_acc"]
    summary["did_not_learn"] = rundir.did_not_learn(history)
    rundir.write_summary(out, summary)
    stage.push()
    return summary
