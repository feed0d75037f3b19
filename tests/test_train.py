"""`cifar-ray train`, `evaluate`, `predict` on local Ray with tiny synthetic data."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cifar_ray import rundir
from cifar_ray.cli import main
from helpers import DETERMINISTIC, tiny_spec

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return tiny_spec(tmp_path_factory.mktemp("spec") / "tiny.yaml")


def train(*args):
    result = CliRunner().invoke(main, ["train", *map(str, args)])
    return result


def common(spec, data="synthetic:800"):
    return ["--model", spec, "--data", data, "--batch-size", 64, "--lr", 0.05]


@pytest.fixture(scope="module")
def ddp_run(ray_local, spec, tmp_path_factory):
    """A 2-worker DDP run that later tests evaluate and predict with."""
    out = tmp_path_factory.mktemp("runs") / "ddp"
    result = train(*common(spec), "--epochs", 3, "--workers", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_ddp_two_workers_learns_and_writes_run_dir(ddp_run):
    out, result = ddp_run
    assert "epoch   3/3" in result.output
    rows = rundir.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_val_acc", "final_val_acc", "epochs", "train_seconds",
                "images_per_second", "model", "params"):
        assert key in summary, key
    assert summary["epochs"] == 3 and summary["params"] > 0
    assert summary["best_val_acc"] > 0.3  # chance is 0.1
    assert "test_acc" in summary  # synthetic has a test split
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    ckpts = rundir.checkpoint_dirs(out)
    assert 3 in ckpts and summary["best_epoch"] in ckpts and len(ckpts) <= 2


def test_evaluate_and_predict(ddp_run, tmp_path):
    out, _ = ddp_run
    result = CliRunner().invoke(main, ["evaluate", str(out), "--json"])
    assert result.exit_code == 0, result.output
    ev = json.loads(result.output)
    assert ev["n"] > 0 and 0.3 < ev["accuracy"] <= 1 and len(ev["per_class"]) == 10
    assert sum(map(sum, ev["confusion"])) == ev["n"]
    assert (out / "confusion-val.png").is_file()
    text = CliRunner().invoke(main, ["evaluate", str(out), "--split", "test", "--tta"])
    assert text.exit_code == 0 and "test accuracy" in text.output and "per class" in text.output
    # A separate test set, as people keep one: a test/<class>/ archive, a plain <class>/ folder.
    from cifar_ray.data import load

    ds = load("synthetic:800")
    x, y = ds.splits["test"]
    for layout in ("test/{c}/{i}.png", "{c}/{i}.png"):
        root = tmp_path / layout.split("{")[0].strip("/") / "set"
        for i in [i for c in range(10) for i in (y == c).nonzero()[0][:4]]:  # 4 per class
            path = root / layout.format(c=ds.classes[y[i]], i=i)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(path)
        got = CliRunner().invoke(main, ["evaluate", str(out), "--data", str(root), "--json"])
        assert got.exit_code == 0, got.output
        ev = json.loads(got.output)
        assert ev["n"] == 40 and ev["split"] == ("test" if layout.startswith("test") else "all")
        assert sum(map(sum, ev["confusion"])) == 40 and ev["accuracy"] > 0.3
    (root / ds.classes[0]).rename(root / "not-a-class")
    got = CliRunner().invoke(main, ["evaluate", str(out), "--data", str(root)])
    assert got.exit_code == 2 and "classes not-a-class are not among the checkpoint's" in got.output
    img = tmp_path / "x.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(img)
    pred = CliRunner().invoke(main, ["predict", str(out), str(img), "--top-k", "2", "--json"])
    assert pred.exit_code == 0, pred.output
    top = json.loads(pred.output)[0]["top"]
    assert len(top) == 2 and top[0]["prob"] >= top[1]["prob"] and top[0]["prob"] <= 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    res = CliRunner().invoke(main, ["predict", str(out), str(bad)])
    assert res.exit_code == 2 and "bad.png: cannot decode image" in res.output


def test_out_holding_a_run_is_refused(ddp_run, spec):
    out, _ = ddp_run
    before = (out / "metrics.csv").read_text()
    result = train(*common(spec), "--epochs", 1, "--out", out)
    assert result.exit_code == 2
    assert "holds another run; pass --resume" in result.output
    assert (out / "metrics.csv").read_text() == before


def test_more_workers_than_cpus_fails_fast(ray_local, spec, tmp_path):
    result = train(*common(spec), "--workers", 64, "--out", tmp_path / "big")
    assert result.exit_code == 2 and "CPUs, the Ray cluster has" in result.output
    gpu = train(*common(spec), "--gpu", "--out", tmp_path / "gpu")
    assert gpu.exit_code == 2 and "GPUs, the Ray cluster has 0" in gpu.output


def test_a_spec_file_travels_with_the_run(ray_local, tmp_path, monkeypatch):
    """The workers build the model from the layers in the run's config, not from the file:
    a spec file gone from their view once the driver has read it (as on a node without the
    file) changes nothing, and the saved config reruns without the file."""
    import yaml

    from cifar_ray import train as T

    spec = Path(tiny_spec(tmp_path / "tiny.yaml"))
    plan = T.plan_resources

    def plan_then_lose_the_spec(*args, **kwargs):  # after every check of the driver's
        spec.unlink(missing_ok=True)
        return plan(*args, **kwargs)

    monkeypatch.setattr(T, "plan_resources", plan_then_lose_the_spec)
    out = tmp_path / "run"
    result = train(*common(str(spec), "synthetic:200"), "--epochs", 1,
                   "--set", "scale.max_failures=0", "--out", out)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert saved["name"] == str(spec) and [x["type"] for x in saved["spec"]] == [
        "conv", "maxpool", "conv", "maxpool", "gap"]
    again = train("--config", out / "config.yaml", "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["params"] == \
        json.loads((out / "summary.json").read_text())["params"]


def test_nan_loss_is_reported(ray_local, spec, tmp_path):
    result = train(*common(spec, "synthetic:200"), "--lr", "1e12", "--set",
                   "optim.warmup_epochs=0", "--set", "train.precision=fp32",
                   "--epochs", 2, "--out", tmp_path / "nan")
    assert result.exit_code == 1
    assert re.search(r"error: loss became \S+ at epoch \d+, step \d+/\d+; lower optim.lr",
                     result.output), result.output


@pytest.mark.parametrize("args, match", [
    (["--resume", "nowhere"], "not a run directory"),
    (["--model", "nope", "--data", "synthetic:200"], "unknown model 'nope'"),
    (["--data", "synthetic:200"], "--out DIR is required"),
    (["--data", "synthetic:200", "--set", "train.epoch=2"], "did you mean 'train.epochs'"),
])
def test_bad_train_input(args, match, tmp_path):
    out = tmp_path / "run"
    if "--resume" not in args and "synthetic:200" in args and "is required" not in match:
        args = [*args, "--out", out]
    result = train(*args)
    assert result.exit_code == 2
    assert match in result.output
    assert not out.exists()  # nothing half-written


def test_newest_state_skips_a_checkpoint_cut_short(ddp_run, tmp_path):
    import shutil

    from cifar_ray.checkpoint import newest_state

    out, _ = ddp_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ckpts = rundir.checkpoint_dirs(copy)
    last = ckpts[max(ckpts)] / rundir.STATE_FILE
    last.write_bytes(last.read_bytes()[:1000])  # a copy killed mid-write
    warnings = []
    state = newest_state(copy, echo=warnings.append)
    if len(ckpts) > 1:
        assert state is not None and state["epoch"] < max(ckpts)
    else:
        assert state is None
    assert warnings and f"epoch {max(ckpts)}" in warnings[0]


@pytest.mark.faults
def test_ctrl_c_stops_after_saving_and_resume_equals_uninterrupted(ray_local, spec, tmp_path):
    """A real `cifar-ray train` process (its own Ray) gets SIGINT after epoch 1; it exits 130
    with the finished epochs saved, and --resume (on the tests' Ray) completes the run with
    one row per epoch: bit for bit the rows of the engine alone training the same epochs
    without a stop (same threads), so the driver hands the workers the whole checkpoint
    state (the engine's own resume: test_engine.py, test_faults.py)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from cifar_ray import config as C
    from cifar_ray import engine
    from cifar_ray.data.split import load_split

    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    flags = [*common(spec, "synthetic:1500"), "--set", "optim.schedule=constant",
             "--set", "scale.cpus_per_worker=2"]  # the lr and threads of any length of run
    proc = subprocess.Popen([sys.executable, "-m", "cifar_ray", "train", *map(str, flags),
                             "--epochs", "40", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1/40") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "Resume with: cifar-ray train --resume" in output
    saved = rundir.checkpoint_dirs(out)
    assert saved and min(saved) >= 1
    epochs = max(saved) + 1
    resumed = train("--resume", out, "--epochs", epochs)  # on the tests' Ray
    assert resumed.exit_code == 0, resumed.output
    assert f"epoch {epochs:3d}/{epochs}" in resumed.output
    assert f"epoch {max(saved):3d}/{epochs}" not in resumed.output  # continued, not redone
    rows = rundir.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))

    cfg = C.load_config(str(out / "config.yaml"))
    assert cfg.train.epochs == epochs and cfg.scale.cpus_per_worker == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.scale.cpus_per_worker)
    try:
        alone = engine.fit(cfg, load_split(cfg), device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    for ra, rb in zip(alone, rows, strict=True):
        for key in DETERMINISTIC:
            assert ra[key] == rb[key], (ra["epoch"], key)
