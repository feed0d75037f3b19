"""`cifar-ray tune` and `report` on local Ray with tiny synthetic data: ASHA stops weak trials,
a NaN trial fails alone, the sweep directory is consistent. (A sweep whose driver is killed
and resumed: test_faults.py.)"""

import csv
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cifar_ray import config as C
from cifar_ray import rundir
from cifar_ray import sweepdir as D
from cifar_ray.cli import main
from helpers import SWEEP_BASE

pytestmark = pytest.mark.ray

DATA = "synthetic:800"  # 0.2-0.4 after 2 epochs, 0.3-0.75 after 3 with SWEEP_BASE; ~1 s an epoch


def write_space(path: Path, **data) -> str:
    path.write_text(yaml.safe_dump({"base": SWEEP_BASE, **data}))
    return str(path)


def tune(*args):
    return CliRunner().invoke(main, ["tune", *map(str, args)])


def read_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(ray_local, tmp_path_factory):
    """Good, frozen (lr 0: stays at chance) and NaN variants, two seeds each, two at a time.
    ASHA's one rung is epoch 2; the frozen trials start after a good one has passed it, so
    both are stopped there (the good ones may stop each other: seeds differ)."""
    tmp = tmp_path_factory.mktemp("sweep")
    space = write_space(tmp / "space.yaml", variants=[
        {"name": "good"},
        {"name": "frozen", "set": {"optim.lr": 0.0}, "reference": 0.5, "note": "no learning"},
        {"name": "nan", "set": {"optim.lr": 1.0e12, "optim.warmup_epochs": 0.0,
                                "train.precision": "fp32"}},
    ])
    out = tmp / "out"
    result = tune("--space", space, "--data", DATA, "--seeds", 2, "--concurrent", 2,
                  "--grace", 2, "--reduction", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_asha_stops_weak_trials_and_a_failed_trial_does_not_stop_the_sweep(sweep):
    out, output = sweep
    trials = {(t["variant"], t["train.seed"]): t for t in read_trials(out)}
    assert len(trials) == 6 and len({t["trial_id"] for t in trials.values()}) == 6
    goods = [trials[("good", seed)] for seed in "01"]
    assert any(g["status"] == "done" and g["epochs"] == "3" for g in goods)
    for seed in "01":
        good, frozen, nan = (trials[(v, seed)] for v in ("good", "frozen", "nan"))
        # Twice chance at least: ASHA may stop a slow seed at epoch 2 (0.23 measured there).
        assert good["status"] in ("done", "stopped") and float(good["best_val_acc"]) > 0.2
        assert frozen["status"] == "stopped" and frozen["stopped_early"] == "True"
        assert frozen["epochs"] == "2" and float(frozen["best_val_acc"]) < 0.2  # chance: 0.1
        assert nan["status"] == "failed" and nan["epochs"] == "0"
        assert "loss became nan at epoch 1" in nan["reason"]
    stopped = [t for t in trials.values() if t["stopped_early"] == "True"]
    assert all(t["epochs"] == "2" for t in stopped)
    # One line per trial that ends, with its fate; a table at the end.
    assert output.count("stopped by ASHA") >= len(stopped)
    assert output.count("\nfailed ") == 2 and "loss became nan" in output
    assert "2 failed" in output and "best val acc" in output


def test_results_trials_and_best_config_agree(sweep):
    out, _ = sweep
    trials = read_trials(out)
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert {"trial_id", "variant", "train.seed", "epoch", "val_acc", "train_acc"} <= set(rows[0])
    for t in trials:
        mine = [r for r in rows if r["trial_id"] == t["trial_id"]]
        assert [r["epoch"] for r in mine] == list(range(1, int(t["epochs"]) + 1))
        assert all(r["variant"] == t["variant"] and str(r["train.seed"]) == t["train.seed"]
                   for r in mine)
        if mine:
            assert max(r["val_acc"] for r in mine) == pytest.approx(float(t["best_val_acc"]))
            assert (out / t["checkpoint"]).is_file()  # the best checkpoint, kept
    # Ranked best first; best.yaml is the top trial's config and `train --config` takes it.
    accs = [float(t["best_val_acc"]) for t in trials if t["best_val_acc"]]
    assert accs == sorted(accs, reverse=True)
    best = C.load_config(str(out / "best.yaml"))
    assert best.optim.lr == 0.1 and best.train.seed == int(trials[0]["train.seed"])
    assert best.train.epochs == 3 and best.data.source == DATA
    assert best.model.args == SWEEP_BASE["model"]["args"]
    space = yaml.safe_load((out / "space.yaml").read_text())
    assert space["sweep"]["seeds"] == 2 and space["base"]["data"]["source"] == DATA


def test_report_ranks_compares_with_noise_and_plots(sweep):
    out, _ = sweep
    (out / "report.md").unlink()
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    # Means use full runs only, and ASHA's choice of which "good" seed it stops depends on
    # which trial reports first: the noise section needs two full runs of one configuration.
    full = [t for t in read_trials(out) if t["variant"] == "good" and t["status"] == "done"]
    assert "## Configurations against seed noise" in text
    assert ("Seed-to-seed noise" in text) == (len(full) >= 2)
    assert ("the noise is unknown" in text) == (len(full) < 2)
    # lr 0 stays at chance: "did not learn" (never 1.5x chance in its 2 epochs), not "worse".
    frozen = next(line for line in text.splitlines() if line.startswith("| variant frozen"))
    stuck = [t for t in read_trials(out) if t["variant"] == "frozen"
             and float(t["best_val_acc"]) < 0.15]
    assert ("| did not learn |" in frozen) == (len(stuck) == 2)
    assert "| 0.500 |" in frozen  # its reference
    if stuck:
        assert f"{len(stuck)} did not learn (never above 1.5x chance)" in text
        assert "did not learn, stopped by ASHA at epoch 2" in text
        assert "left out of the means" in text
    nan = next(line for line in text.splitlines() if line.startswith("| variant nan"))
    assert "| failed |" in nan
    assert "stopped by ASHA at epoch" in text and "failed: loss became nan" in text
    for png in ("val-curves.png", "top-curves.png", "factor-variant.png"):
        assert f"]({png})" in text and (out / png).stat().st_size > 5000


def test_report_of_a_hand_damaged_sweep(sweep, tmp_path):
    """Result lines that are not result rows are skipped; a params.json that is not Tune's
    stops the report with one line naming it, before anything is written."""
    out, _ = sweep
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    trial_dirs = sorted(p.parent for p in copy.glob(f"{D.TUNE_PREFIX}*/*/params.json"))
    results = trial_dirs[0] / "result.json"
    results.write_text(results.read_text() + '[1, 2]\n7\n{"epoch": "x", "val_acc": 9}\n'
                       '{"epoch": true}\n{"epoch": 2, "val_acc": "high", "checkpoint_path": 3}\n')
    result = CliRunner().invoke(main, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.md").is_file()

    (copy / "report.md").unlink()
    for text in ("[1]", '{"trial": "x"}', "{torn"):
        (trial_dirs[1] / "params.json").write_text(text)
        result = CliRunner().invoke(main, ["report", str(copy)])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "params.json: " in lines[0]
        assert "move its trial folder out of the sweep" in lines[0]
        assert not (copy / "report.md").exists()


def test_report_of_a_run_dir(tmp_path):
    run = tmp_path / "run"
    C.save_config(C.Config(), run / "config.yaml")
    history = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 * e, "val_loss": 2.1 / e,
                "val_acc": 0.25 * e, "lr": 0.1, "images_per_s": 100.0, "seconds": 1.0}
               for e in (1, 2, 3)]
    rundir.write_metrics(history, run / "metrics.csv")
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    text = (run / "report.md").read_text()
    assert "| best val acc | 0.7500 (epoch 3) |" in text and "curves.png" in text
    assert (run / "curves.png").is_file()


def test_resources_beyond_the_cluster_fail_before_any_trial(ray_local, tmp_path):
    space = write_space(tmp_path / "space.yaml", grid={"optim.lr": [0.1]})
    for flags, match in ((["--cpus-per-trial", 64], "a trial needs 64 CPUs, the Ray cluster has 4"),
                         (["--gpus-per-trial", 0.5], "a trial needs 0.5 GPUs, the Ray cluster has 0"),
                         (["--workers-per-trial", 4, "--cpus-per-trial", 8],
                          "a trial needs 8 CPUs")):
        result = tune("--space", space, "--data", "synthetic:200", *flags, "--out", tmp_path / "o")
        assert result.exit_code == 2, result.output
        assert match in result.output
        assert not (tmp_path / "o").exists()


def test_workers_killed_for_memory_stop_the_sweep_with_one_line(ray_local, tmp_path, monkeypatch):
    """Ray's memory monitor killing a trial's actor as it starts makes Tune's controller raise
    (it does not handle that): the sweep ends with one line and the resume command."""
    from cifar_ray import tune as tune_mod

    class Fit:
        def fit(self):
            raise RuntimeError("Caught unexpected exception: 2 worker(s) were killed due to "
                               "the node running low on memory. Memory on the node ...")

    monkeypatch.setattr(tune_mod, "_tuner", lambda *a, **k: Fit())
    out = tmp_path / "out"
    result = tune("--space", write_space(tmp_path / "s.yaml", variants=[{"name": "a"}]),
                  "--data", DATA, "--out", out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "ran low on memory" in lines[-1]
    assert f"cifar-ray tune --resume {out}" in lines[-1]
    assert not tune_mod._out_of_memory(RuntimeError("some other failure"))


def test_out_holding_a_sweep_is_refused(sweep):
    out, _ = sweep
    result = tune("--space", out / "space.yaml", "--out", out)
    assert result.exit_code == 2 and "holds another sweep; pass --resume" in result.output


def test_multi_worker_trials_run_as_torch_trainers(ray_local, tmp_path):
    """Three 2-worker trials, two at a time: the third runs on the CPUs a finished trial
    freed (its actor is not reused, its placement group is removed), and none is left."""
    import _thread
    import threading

    space = write_space(tmp_path / "space.yaml", grid={"optim.lr": [0.1, 0.05, 0.02]})
    out = tmp_path / "out"
    # A regression would leave the third trial waiting for CPUs forever: interrupt the sweep.
    watchdog = threading.Timer(300, _thread.interrupt_main)
    watchdog.start()
    try:
        result = tune("--space", space, "--data", DATA, "--max-epochs", 1,
                      "--workers-per-trial", 2, "--cpus-per-trial", 2, "--out", out)
    finally:
        watchdog.cancel()
    assert result.exit_code == 0, result.output
    trials = read_trials(out)
    assert [t["status"] for t in trials] == ["done"] * 3, result.output
    for trial in trials:
        assert trial["epochs"] == "1" and trial["best_val_acc"]
        # Ray Train's checkpoints of the trial's own TorchTrainer run.
        assert trial["checkpoint"].startswith(f"{D.TRAIN_DIR}/train-{trial['trial_id']}/")
        assert (out / trial["checkpoint"]).is_file()
    for _ in range(60):  # Ray Train's cleaner removes the last trials' groups within seconds
        live = [g for g in ray_local.util.placement_group_table().values()
                if g["state"] != "REMOVED"]
        if not live:
            break
        time.sleep(0.5)
    assert not live


def test_multi_worker_trials_need_the_state_api(ray_local, tmp_path, monkeypatch):
    import ray.util.state
    from ray.util.state.exception import ServerUnavailable

    def unavailable(*args, **kwargs):
        raise ServerUnavailable("Failed to connect to API server.")

    monkeypatch.setattr(ray.util.state, "list_actors", unavailable)
    space = write_space(tmp_path / "space.yaml", grid={"optim.lr": [0.1]})
    out = tmp_path / "out"
    result = tune("--space", space, "--data", DATA, "--max-epochs", 1, "--workers-per-trial", 2,
                  "--cpus-per-trial", 2, "--out", out)
    assert result.exit_code == 2, result.output
    assert "no dashboard (State API)" in result.output and "--include-dashboard" in result.output
    assert not out.exists()


def test_plan_packs_gpu_shares_and_gives_ddp_trials_whole_gpus(monkeypatch):
    """Resources of a trial on a (simulated) 2-node cluster of 8 CPUs + 2 GPUs each."""
    import ray

    from cifar_ray import space as S
    from cifar_ray import tune as TU

    node = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    monkeypatch.setattr(ray, "nodes", lambda: [node, node])
    shared = TU.place(S.Settings(gpus_per_trial=0.25, cpus_per_trial=2))
    assert shared.resources == {"cpu": 2, "gpu": 0.25} and shared.concurrent is None
    ddp = TU.place(S.Settings(workers_per_trial=2, gpus_per_trial=2, cpus_per_trial=4))
    assert ddp.resources["cpu"] == 0 and "gpu" not in ddp.resources
    assert ddp.concurrent == 2  # 4 GPUs / 2 per trial; the trial drivers hold no CPU
    assert TU.place(S.Settings(workers_per_trial=2, cpus_per_trial=6)).concurrent == 2  # 16 // 6
    with pytest.raises(Exception, match="no node of the Ray cluster has 10 CPUs"):
        TU.place(S.Settings(cpus_per_trial=10))
