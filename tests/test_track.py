"""Experiment tracking: MLflow against a real `mlflow server` (a SQLite store and an artifact
folder in a temp dir, on a free port of 127.0.0.1), read back through MLflow's client;
TensorBoard event files read back with TensorBoard's reader. Bad input first: the `track`
extra missing, a server that does not answer or refuses."""

import csv
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cifar_ray import config as C
from cifar_ray import rundir, storage, track
from cifar_ray import space as S
from cifar_ray import sweepdir as D
from cifar_ray.cli import main
from helpers import SWEEP_BASE, free_ports, tiny_spec

DATA = "synthetic:400"


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def free_port() -> int:
    return free_ports(1)[0]


class Server:
    """`mlflow server` in its own process group (it starts a worker process), on 127.0.0.1."""

    def __init__(self, folder: Path):
        pytest.importorskip("mlflow")
        pytest.importorskip("flask", reason="`mlflow server` needs the full mlflow package")
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1", "--backend-store-uri",
                 f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                 str(folder / "artifacts")],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    pytest.fail("mlflow server did not start:\n" + self.log.read_text()[-3000:])
                time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its group: the server and its worker
        self.proc.wait()

    def runs(self, experiment: str) -> list:
        exp = self.client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment}"
        return self.client.search_runs([exp.experiment_id])

    def steps(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def artifacts(self, run_id: str) -> set[str]:
        return {a.path for a in self.client.list_artifacts(run_id)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow"))
    yield s
    s.kill()


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return tiny_spec(tmp_path_factory.mktemp("spec") / "tiny.yaml")


def train_args(spec, out, epochs=2):
    return ["train", "--model", spec, "--data", DATA, "--batch-size", 64, "--lr", 0.05,
            "--epochs", epochs, "--out", out]


# ---------------------------------------------------------------- bad input, before any run

def _no_mlflow(monkeypatch):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError


def test_mlflow_without_the_extra_says_what_to_install(monkeypatch, tmp_path, spec):
    _no_mlflow(monkeypatch)
    for args in (train_args(spec, tmp_path / "run"),
                 ["tune", "--space", "architecture", "--data", DATA, "--out", tmp_path / "sweep"]):
        result = cli(*args, "--mlflow", "http://127.0.0.1:9")
        assert result.exit_code == 2, result.output
        assert result.output == ('error: --mlflow http://127.0.0.1:9: MLflow is not installed; '
                                 f'run: {track.INSTALL}\n')
    assert not any(tmp_path.iterdir())


class _Refuses(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(403, "Forbidden")

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_that_does_not_answer_or_refuses_is_one_line(monkeypatch, tmp_path, spec):
    pytest.importorskip("mlflow")
    monkeypatch.delenv(track.ENV, raising=False)
    refuses = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=refuses.serve_forever, daemon=True).start()
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        for uri, reason in ((down, "Connection refused"), (f"http://127.0.0.1:{refuses.server_port}", "HTTP 403")):
            result = cli(*train_args(spec, tmp_path / "run"), "--mlflow", uri)
            assert result.exit_code == 2, result.output
            assert result.output == (f"error: --mlflow {uri}: the MLflow tracking server does not "
                                     f"answer ({reason}); start it (mlflow server ...) or give "
                                     "another tracking URI\n")
        monkeypatch.setenv(track.ENV, down)  # the variable, as the flag
        result = cli("tune", "--space", "architecture", "--data", DATA, "--out", tmp_path / "sweep")
        assert result.exit_code == 2 and f"error: --mlflow {down}: the MLflow tracking server does not answer" in result.output
        assert not any(tmp_path.iterdir())
        # A run that logged somewhere goes on logging there when resumed: that server is asked.
        run = tmp_path / "old"
        run.mkdir()
        C.save_config(C.load_config(None, [f"model.name={spec}", f"data.source={DATA}"]), run / "config.yaml")
        (run / track.RECORD).write_text(json.dumps({"tracking_uri": down, "run_id": "x"}))
        monkeypatch.delenv(track.ENV)
        result = cli("train", "--resume", run)
        assert result.exit_code == 2
        assert result.output == (f"error: --resume {run}: MLflow at {down}, where it logged before: "
                                 "the MLflow tracking server does not answer (Connection refused); "
                                 "start it (mlflow server ...), or delete mlflow.json from the "
                                 "folder to go on without tracking\n")
    finally:
        refuses.shutdown()


def test_a_disk_that_refuses_the_events_costs_the_events_not_the_run(tmp_path, capsys):
    """TensorBoard's writer failing (a full disk) is one warning; the run goes on, and the
    error a run is already ending with (out of space) is not replaced by the writer's."""
    loc = storage.locate(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()

    class Full:
        def add_scalar(self, *a, **k):
            raise OSError(28, "No space left on device")

        flush = close = add_scalar

    with pytest.raises(RuntimeError, match="the run's own error"):
        with track.RunTracking(loc) as tracking:
            with storage.Stage(loc) as stage:
                tracking.start(stage, C.Config())
            tracking.writer = Full()
            row = {"epoch": 1, "train_loss": 1.0, "val_acc": 0.5}
            tracking.epoch(row)  # warns, does not raise
            tracking.epoch({**row, "epoch": 2})  # no second warning: the events are off
            raise RuntimeError("the run's own error")
    out = capsys.readouterr().out
    assert out.count("warning: TensorBoard events of") == 1 and "No space left" in out


def test_a_failing_tracking_call_costs_the_tracking_not_the_sweep(capsys):
    """TrialLogger, Tune's callback: whatever MLflow raises is one warning, then silence."""
    class Dead:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("[Errno 111] Connection refused")
            return fail

    mlflow = track.MLflow.__new__(track.MLflow)
    mlflow.uri, mlflow.echo, mlflow.alive = "http://example:5000", print, True
    tracking = type("T", (), {"mlflow": mlflow, "trials": lambda self: Dead()})()
    from cifar_ray import storage

    loc = storage.locate("/tmp/some-sweep")
    track._SWEEPS[loc.text] = tracking
    try:
        logger = track.TrialLogger(loc)
        logger.setup()
        for _ in range(3):
            logger.log_trial_start(object())
            logger.log_trial_result(1, object(), {"epoch": 1})
    finally:
        track._SWEEPS.pop(loc.text)
    assert capsys.readouterr().out == ("warning: MLflow at http://example:5000 stopped answering "
                                       "(Connection refused); going on without tracking\n")
    assert not mlflow.alive


# ---------------------------------------------------------------- runs and sweeps

@pytest.mark.ray
def test_train_logs_one_mlflow_run_and_tensorboard_events_and_resume_continues_them(
        ray_local, server, spec, tmp_path, monkeypatch):
    monkeypatch.delenv(track.ENV, raising=False)
    out = tmp_path / "train-tracked"
    first = cli(*train_args(spec, out, epochs=1), "--mlflow", server.uri)
    assert first.exit_code == 0, first.output
    # --resume goes on logging into the same MLflow run (recorded in the folder)
    result = cli("train", "--resume", out, "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert "warning" not in first.output + result.output
    rows = rundir.read_metrics(out / "metrics.csv")
    [run] = server.runs("train-tracked")
    assert run.info.status == "FINISHED" and run.info.run_name == "train-tracked"
    assert json.loads((out / track.RECORD).read_text())["run_id"] == run.info.run_id
    p = run.data.params
    assert p["model.name"] == spec and p["optim.lr"] == "0.05"
    assert p["data.source"] == DATA and p["train.batch_size"] == "64"
    for key in ("val_acc", "train_loss", "lr"):
        assert server.steps(run.info.run_id, key) == [(r["epoch"], pytest.approx(r[key])) for r in rows]
    assert server.artifacts(run.info.run_id) == {"summary.json", "curves.png"}
    # TensorBoard: Tune's tags, one step per epoch, over the two event files of the two starts
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    scalars = tensorboard_scalars(out)
    for key in ("val_acc", "train_acc", "val_loss", "epoch"):
        assert scalars[f"ray/tune/{key}"] == [(r["epoch"], pytest.approx(r[key])) for r in rows]


@pytest.mark.ray
def test_a_server_killed_mid_run_costs_only_the_tracking(ray_local, spec, tmp_path, monkeypatch):
    monkeypatch.delenv(track.ENV, raising=False)
    doomed = Server(tmp_path)
    epoch = track.RunTracking.epoch

    def then_kill(self, metrics):
        epoch(self, metrics)
        if metrics["epoch"] == 1:
            doomed.kill()

    monkeypatch.setattr(track.RunTracking, "epoch", then_kill)
    out = tmp_path / "run"
    try:
        result = cli(*train_args(spec, out, epochs=3), "--mlflow", doomed.uri)
    finally:
        doomed.kill()
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: MLflow at {doomed.uri} stopped answering") == 1
    assert result.stderr == ""  # nothing of MLflow's or urllib3's retries
    assert [r["epoch"] for r in rundir.read_metrics(out / "metrics.csv")] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and (out / "curves.png").is_file()
    assert (out / summary["last_checkpoint"]).is_file()
    assert [s for s, _ in tensorboard_scalars(out)["ray/tune/val_acc"]] == [1, 2, 3]


@pytest.mark.ray
def test_a_sweep_is_a_parent_run_with_one_child_per_trial(ray_local, server, tmp_path, monkeypatch):
    monkeypatch.delenv(track.ENV, raising=False)
    space = tmp_path / "space.yaml"
    base = {**SWEEP_BASE, "train": {**SWEEP_BASE["train"], "epochs": 2}}
    nan = {"optim.lr": 1.0e12, "train.precision": "fp32"}  # fails in its first epoch
    space.write_text(yaml.safe_dump({"base": base, "grid": {"model.args.filters": [8, 16]},
                                     "variants": [{"name": "ok"}, {"name": "nan", "set": nan}]}))
    out = tmp_path / "sweep-tracked"
    result = cli("tune", "--space", space, "--data", DATA, "--grace", 2, "--out", out,
                 "--mlflow", server.uri)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    runs = server.runs("sweep-tracked")
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert parent.info.status == "FINISHED" and parent.data.params["train.epochs"] == "2"
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs and server.artifacts(parent.info.run_id) == {"report.md", *pngs}
    with open(out / "trials.csv", newline="") as f:
        trials = {t["trial_id"]: t for t in csv.DictReader(f)}
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert set(children) == set(trials) and len(trials) == 4
    for trial_id, child in children.items():
        t, p = trials[trial_id], child.data.params
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert p["variant"] == t["variant"] and p["model.args.filters"] == t["model.args.filters"]
        assert p["model.args.depth"] == "2" and p["train.epochs"] == "2" and p["data.source"] == DATA
        if t["variant"] == "nan":
            assert child.info.status == "FAILED" and p["optim.lr"] == "1000000000000.0"
            assert "loss became nan at epoch 1" in child.data.tags["error"]
            continue
        assert child.info.status == "FINISHED" and p["optim.lr"] == "0.1"
        mine = sorted((r["epoch"], r["val_acc"]) for r in rows if r["trial_id"] == trial_id)
        assert [e for e, _ in mine] == [1, 2]
        assert server.steps(child.info.run_id, "val_acc") == [(e, pytest.approx(v)) for e, v in mine]
        # Tune's own TensorBoard files for the trial: the tags a train run writes too
        [folder] = out.glob(f"tune-*/{trial_id}")
        assert tensorboard_scalars(folder)["ray/tune/val_acc"] == [(e, pytest.approx(v)) for e, v in mine]
    # --resume logs into the same parent; a trial that starts again continues its own run
    again = cli("tune", "--resume", out)
    assert again.exit_code == 0, again.output
    assert f"MLflow: experiment sweep-tracked, run {parent.info.run_id}" in again.output
    assert len(server.runs("sweep-tracked")) == 5
    space, settings, _ = D.load_space(out)
    with track.SweepTracking(storage.locate(out), resume=True) as tracking:
        tracking.start(S.plan_sweep(space, settings))
        logger = tracking.trials()
        logger.setup()
        trial_id = sorted(children)[0]
        trial = type("Trial", (), {"trial_id": trial_id, "config": {"trial": {}}})()
        logger.log_trial_start(trial)
        assert logger._trial_runs[trial] == children[trial_id].info.run_id
        tracking.finish(out, D.read_sweep(out))
    assert len(server.runs("sweep-tracked")) == 5
