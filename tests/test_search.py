"""`tune --search optuna` (Optuna's TPE through Ray Tune's OptunaSearch) and `--time-budget`,
on synthetic data: TPE's proposals follow the results it is told, a bad proposal fails its
trial alone, the budget ends a sweep that `--resume` continues, and a resumed sweep keeps
the searcher's state (its proposals go on where they stopped)."""

import csv
import glob
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cifar_ray import config as C
from cifar_ray import space as S
from cifar_ray import sweepdir as D
from cifar_ray.cli import main
from helpers import SWEEP_BASE



@pytest.fixture(autouse=True)
def _optuna(request):
    if "without_optuna" not in request.node.name:
        pytest.importorskip("optuna")


def write_space(path: Path, **data) -> str:
    path.write_text(yaml.safe_dump({"base": SWEEP_BASE, **data}, sort_keys=False))
    return str(path)


def tune(*args):
    return CliRunner().invoke(main, ["tune", *map(str, args)])


def read_trials(out: Path) -> dict[str, dict]:
    with open(out / "trials.csv", newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def searcher(space_file: str, **flags):
    """The searcher `tune` builds for the space, ready to propose (as Tune sets it up)."""
    from cifar_ray import tune as TU

    space = S.load_space(space_file)
    settings = S.resolve_settings(space, {"search": "optuna", **flags})
    base = S.base_config(space, settings, space.source)
    search = TU._search(space, [], settings, base)
    alg = search["search_alg"]
    alg.set_search_properties("val_acc", "max", search["param_space"])
    return alg


def propose(alg, n: int, score=None) -> list[dict]:
    """n proposals, each told its score (`score(params)`) before the next is asked for."""
    out = []
    for i in range(n):
        params = alg.suggest(f"t{i}")["trial"]
        out.append(params)
        if score is not None:
            alg.on_trial_complete(f"t{i}", {"val_acc": score(params), "training_iteration": 1})
    return out


def saved_study(out: Path):
    """The Optuna study as Tune last saved it with the experiment (one file per driver
    session, named by its start time)."""
    path = sorted(glob.glob(str(out / "tune-*" / "searcher-state-*.pkl")))[-1]
    with open(path, "rb") as f:
        state = pickle.load(f)
    return state["_ot_study"], state["_ot_trials"]


# ---------------------------------------------------------------- the searcher itself

def test_tpe_proposals_follow_the_results(tmp_path):
    """Same seed, two opposite scores: the first 10 proposals (TPE's random start) agree;
    after them each searcher moves to where its own scores are high. A random sampler in
    disguise would propose the same whatever it is told."""
    space = write_space(tmp_path / "s.yaml", loguniform={"optim.lr": [0.001, 1.0]},
                        choice={"model.args.activation": ["relu", "gelu", "silu"]})
    low = propose(searcher(space), 30, score=lambda p: -math.log(p["optim.lr"]))
    high = propose(searcher(space), 30, score=lambda p: math.log(p["optim.lr"]))
    assert low[:10] == high[:10]
    assert low[10:] != high[10:]

    def mean_log_lr(ps):
        return sum(math.log10(p["optim.lr"]) for p in ps) / len(ps)

    # log10 lr of the random start: -1.0 on average here; then about -2.6 and -0.7.
    assert mean_log_lr(low[10:]) < mean_log_lr(low[:10]) - 1
    assert mean_log_lr(high[10:]) > mean_log_lr(low[10:]) + 1.5
    # Seeded by the base config's train.seed: the same seed proposes the same, another not.
    assert propose(searcher(space), 10) == low[:10]
    other = write_space(tmp_path / "o.yaml", loguniform={"optim.lr": [0.001, 1.0]},
                        choice={"model.args.activation": ["relu", "gelu", "silu"]})
    data = yaml.safe_load(Path(other).read_text())
    data["base"] = C.merge(data["base"], {"train": {"seed": 7}})
    Path(other).write_text(yaml.safe_dump(data))
    assert propose(searcher(other), 10) != low[:10]


@pytest.mark.parametrize("space,flags,message", [
    ({"grid": {"model.args.depth": [2, 3]}, "choice": {"optim.lr": [0.1, 0.2]}}, [],
     "--search optuna proposes values from distributions and cannot enumerate grid key "
     "model.args.depth"),
    ({"variants": [{"name": "wide", "set": {"model.args.width": 2.0}}],
      "choice": {"optim.lr": [0.1, 0.2]}}, [], "cannot enumerate variant wide"),
    ({"grid": {"optim.lr": [0.1, 0.2]}}, [], "cannot enumerate grid key optim.lr"),
    ({"choice": {"optim.lr": [0.1, 0.2]}}, ["--seeds", 2],
     "--seeds 2 with --search optuna: TPE proposes each configuration once"),
    ({"choice": {"model.args.channels": [[8, 16], [16, 32]]}}, [],
     "choice.model.args.channels: --search optuna takes choices of numbers, words"),
])
def test_what_tpe_cannot_search_is_refused_in_one_line(tmp_path, space, flags, message):
    path = write_space(tmp_path / "s.yaml", **space)
    r = tune("--space", path, "--data", "synthetic:200", "--search", "optuna", *flags,
             "--out", tmp_path / "o")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: ") and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_search_optuna_without_optuna_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna: ImportError
    path = write_space(tmp_path / "s.yaml", choice={"optim.lr": [0.1, 0.2]})
    r = tune("--space", path, "--data", "synthetic:200", "--search", "optuna", "--out",
             tmp_path / "o")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("error: --search optuna needs Optuna: pip install optuna")
    assert not (tmp_path / "o").exists()


def test_a_bad_search_in_the_space_file_is_refused(tmp_path):
    path = write_space(tmp_path / "s.yaml", choice={"optim.lr": [0.1, 0.2]},
                       sweep={"search": "bayes"})
    r = tune("--space", path, "--data", "synthetic:200", "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert r.output == "error: --search 'bayes': must be one of random, optuna\n"


@pytest.mark.ray
def test_a_proposal_that_cannot_run_fails_its_trial_with_the_reason(ray_local, tmp_path,
                                                                     monkeypatch):
    """The driver checks every trial of a random sweep before any starts; a TPE proposal
    arrives one at a time, so its trial checks it and reports why it cannot run."""
    import numpy as np
    import ray

    from cifar_ray import storage
    from cifar_ray import tune as TU

    path = write_space(tmp_path / "s.yaml", choice={"model.args.depth": [2, 9],
                                                     "train.batch_size": [32, 5000]})
    from cifar_ray.data.split import Split

    space = S.load_space(path)
    settings = S.resolve_settings(space, {"search": "optuna"})
    base = S.base_config(space, settings, path)  # (plan_sweep would refuse the bad draws)
    plan = S.Plan(replace(space, base=C.to_dict(base)), settings, base, (), {})
    none = (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))
    data = Split(train=(np.zeros((200, 32, 32, 3), np.uint8), np.zeros(200, np.int64)),
                 val=none, classes=["a", "b"], mean=(0.5,) * 3, std=(0.25,) * 3)
    shared = TU.Shared(ray.put(data), plan, storage.locate(str(tmp_path / "sweep")))
    reported = []
    monkeypatch.setattr(TU.tune, "report", lambda metrics, **kw: reported.append(metrics))
    monkeypatch.setattr(TU, "_run_engine", lambda cfg, shared: reported.append("ran"))
    for params in ({"model.args.depth": 9, "train.batch_size": 32},
                   {"model.args.depth": 2, "train.batch_size": 5000},
                   {"model.args.depth": 2, "train.batch_size": 32}):
        TU.run_trial({"trial": params}, shared)
    collapsed, too_big, ran = reported
    assert collapsed["error"].startswith(f"{path}: model.args.depth=9, train.batch_size=32: ")
    assert math.isnan(collapsed["val_acc"])
    assert too_big["error"] == (f"{path}: model.args.depth=2, train.batch_size=5000: "
                                "train.batch_size=5000: each of 1 worker(s) gets 200 training "
                                "images, fewer than its batch of 5000; lower the batch size or "
                                "use more data")
    assert ran == "ran"


# ---------------------------------------------------------------- sweeps with a budget

def _driver(args: list, tmp: Path, fault: str) -> subprocess.CompletedProcess:
    """`cifar-ray tune ...` in its own process and its own local Ray, with a fault point
    (cifar_ray/faults.py) that holds one trial at a known epoch until the process ends."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="crs-"), RAY_USAGE_STATS_ENABLED="0",
               CIFAR_RAY_FAULT=fault, CIFAR_RAY_FAULT_DIR=str(tmp))
    try:
        return subprocess.run([sys.executable, "-m", "cifar_ray", "tune", *map(str, args)],
                              env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def _epochs(out: Path, trial_id: str) -> list[int]:
    rows = pq.read_table(out / "results.parquet").to_pylist()
    return [r["epoch"] for r in rows if r["trial_id"] == trial_id]


@pytest.mark.ray
def test_a_time_budget_ends_the_sweep_and_resume_continues_it(ray_local, tmp_path):
    """Two trials at once: one runs its 3 epochs, the other is held after epoch 1 (a fault
    point) until the 25 s budget ends the sweep: the finished one keeps its results, the
    held one stops at its last epoch, the report says the budget ended it. `--resume` with
    a new budget continues the held trial from epoch 1 and leaves the finished one alone."""
    space = write_space(tmp_path / "s.yaml", variants=[
        {"name": "fast"}, {"name": "held", "set": {"optim.lr": 0.05}}])
    out = tmp_path / "sweep"
    r = _driver(["--space", space, "--data", "synthetic:400", "--concurrent", 2, "--grace", 3,
                 "--time-budget", "25s", "--out", out], tmp_path, "trial-epoch:lr=0.05:epoch=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "time budget 25s spent: stopping 1 running trial and starting no more" in r.stdout
    assert (f"the time budget 25s ended the sweep with 1 of 2 trials unfinished; continue "
            f"with: cifar-ray tune --resume {out} --time-budget DURATION") in r.stdout
    assert r.stderr == ""
    trials = {t["variant"]: t for t in read_trials(out).values()}
    fast, held = trials["fast"], trials["held"]
    assert (fast["status"], fast["epochs"]) == ("done", "3")
    assert (held["status"], held["epochs"]) == ("incomplete", "1")
    report = (out / "report.md").read_text()
    assert "**The time budget (25s) ended this sweep**" in report
    assert yaml.safe_load((out / "budget.json").read_text())["ended"] is True
    before = pq.read_table(out / "results.parquet").to_pylist()

    r = tune("--resume", out, "--time-budget", "10m")
    assert r.exit_code == 0, r.output
    assert "time budget 10m" in r.output and "spent" not in r.output
    trials = {t["variant"]: t for t in read_trials(out).values()}
    assert {v: (t["status"], t["epochs"]) for v, t in trials.items()} == {
        "fast": ("done", "3"), "held": ("done", "3")}
    assert _epochs(out, held["trial_id"]) == [1, 2, 3]  # continued: epoch 1 trained once
    after = pq.read_table(out / "results.parquet").to_pylist()
    fast_rows = [r for r in after if r["trial_id"] == fast["trial_id"]]
    assert fast_rows == [r for r in before if r["trial_id"] == fast["trial_id"]]
    assert "time budget" not in (out / "report.md").read_text()
    assert yaml.safe_load((out / "budget.json").read_text()) == {"seconds": 600.0, "text": "10m"}


@pytest.mark.ray
def test_optuna_sweep_resumed_after_its_budget_keeps_the_searchers_state(ray_local, tmp_path):
    """One trial at a time; the first proposal is held after epoch 2 until the budget ends
    the sweep, before the searcher proposed the others. Resumed, the sweep's three trials
    are the searcher's first three proposals, in order: a searcher that had lost its state
    would propose its first one again. The saved study holds every trial with the result
    it ended on, the held one included."""
    space = write_space(tmp_path / "s.yaml", choice={"optim.lr": [0.05, 0.1, 0.2],
                                                     "model.args.filters": [8, 16]})
    expected = propose(searcher(space), 3)
    out = tmp_path / "sweep"
    r = _driver(["--space", space, "--data", "synthetic:400", "--search", "optuna",
                 "--samples", 3, "--concurrent", 1, "--grace", 3, "--time-budget", "15s",
                 "--out", out], tmp_path, f"trial-epoch:lr={expected[0]['optim.lr']}:epoch=2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ended the sweep with 3 of 3 trials unfinished" in r.stdout
    assert r.stdout.startswith("cost: 3 draws of the space")
    trials = read_trials(out)
    assert len(trials) == 1
    (first,) = trials.values()
    assert first["status"] == "incomplete"
    assert {k: first[k] for k in expected[0]} == {k: str(v) for k, v in expected[0].items()}
    assert "Search: Optuna's TPE" in (out / "report.md").read_text()

    r = tune("--resume", out, "--time-budget", "5m")
    assert r.exit_code == 0, r.output
    trials = read_trials(out)
    study, by_trial = saved_study(out)
    assert len(trials) == 3 and list(by_trial) == [first["trial_id"], *list(by_trial)[1:]]
    proposed = [{k: v for k, v in by_trial[tid].params.items()} for tid in by_trial]
    assert proposed == [{f"trial/{k}": v for k, v in e.items()} for e in expected]
    for tid, ot in by_trial.items():
        params = yaml.safe_load((D.experiment_dir(out) / tid / "params.json").read_text())["trial"]
        assert {f"trial/{k}": v for k, v in params.items()} == ot.params
        told = study.trials[ot.number]
        assert trials[tid]["status"] in ("done", "stopped") and told.state.name == "COMPLETE"
        rows = pq.read_table(out / "results.parquet").to_pylist()
        assert told.value == pytest.approx([r["val_acc"] for r in rows if r["trial_id"] == tid][-1])
    assert _epochs(out, first["trial_id"]) == [1, 2, 3]
