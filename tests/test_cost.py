"""The cost of a sweep known before it runs (cifar_ray/cost.py), `tune --dry-run`, the
durations of `--time-budget`, and the status table that lists every running trial."""

import math
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from cifar_ray import config as C
from cifar_ray import cost
from cifar_ray.cli import main
from cifar_ray.errors import UserError
from helpers import SWEEP_BASE


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize("text,seconds", [("45s", 45), ("90m", 5400), ("2h", 7200),
                                          ("1h30m", 5400), ("1.5h", 5400), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert cost.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["90", "", "2d", "h", "-5m", "0s", "1h 30m", "5m3", "m5",
                                  "99999999h"])
def test_bad_durations_are_one_line_naming_the_flag(text):
    with pytest.raises(UserError, match=r"^--time-budget .*(unit|more than 0)"):
        cost.parse_duration(text)


def test_a_bad_time_budget_stops_tune_before_anything_starts(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"base": SWEEP_BASE, "grid": {"optim.lr": [0.1, 0.2]}}))
    r = CliRunner().invoke(main, ["tune", "--space", str(space), "--data", "synthetic:200",
                                  "--time-budget", "ten minutes", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("error: --time-budget 'ten minutes': give a duration with a unit")
    assert not (tmp_path / "o").exists()


def test_format_duration():
    assert [cost.format_duration(s) for s in (0, 4.24, 42.4, 185, 7800)] == [
        "0.0s", "4.2s", "42s", "3m05s", "2h10m"]


# ---------------------------------------------------------------- the estimate

def test_asha_epochs_follow_the_rungs_ray_places():
    """The average epochs of a trial under ASHA, against the rungs of Ray's own scheduler:
    every trial runs to the first rung, 1/reduction of them to each next one."""
    from ray.tune.schedulers import ASHAScheduler

    for max_t, grace, rf in ((10, 1, 3), (5, 1, 3), (3, 2, 2), (20, 2, 4), (6, 6, 3)):
        rungs = sorted(m for m, _ in ASHAScheduler(max_t=max_t, grace_period=grace,
                                                   reduction_factor=rf)._brackets[0]._rungs)
        expected, kept, start = 0.0, 1.0, 0
        for m in rungs:
            stop = min(max_t, math.ceil(m))
            expected += kept * (stop - start)
            kept, start = kept / rf, stop
        expected += kept * (max_t - start)
        assert cost.asha_epochs(max_t, grace, rf) == pytest.approx(expected)
    assert cost.asha_epochs(10, 1, 3) == pytest.approx(1 + 2 / 3 + 6 / 9 + 1 / 27)
    assert cost.asha_epochs(3, 3, 3) == 3  # grace = max epochs: ASHA stops nothing


def test_seconds_per_image_on_the_line_through_the_probes():
    probes = [cost.Probed(10_000_000, 0.001), cost.Probed(110_000_000, 0.011)]
    assert cost.seconds_per_image(probes, 60_000_000) == pytest.approx(0.006)
    assert cost.seconds_per_image(probes, 10_000_000) == pytest.approx(0.001)
    # One model measured: time in proportion to MACs.
    assert cost.seconds_per_image(probes[:1], 20_000_000) == pytest.approx(0.002)
    # The light one measured slower (noise): no trend; the slower rate for everyone.
    noisy = [cost.Probed(10, 0.004), cost.Probed(20, 0.003)]
    assert cost.seconds_per_image(noisy, 15) == 0.004


def _estimate(gpu=False, spi=0.3):
    trials = [("depth=4, width=2", 4_000_000_000), ("depth=2", 20_000_000), ("depth=3", 250_000_000)]
    probes = [cost.Probed(20_000_000, spi / 100), cost.Probed(4_000_000_000, spi)]
    return cost.estimate(trials, probes, n_train=45_000, n_val=5_000, max_epochs=10, grace=1,
                         reduction=3, slots=2, gpu=gpu, where="1 CPU")


def test_estimate_totals_names_the_heaviest_and_warns_a_long_cpu_sweep():
    est = _estimate()
    heavy = est.trials[0]
    assert heavy.epoch_s == pytest.approx(0.3 * (45_000 + 5_000 / 3))
    assert est.most_s == pytest.approx(sum(t.epoch_s for t in est.trials) * 10 / 2)
    assert est.typical_s == pytest.approx(est.most_s * cost.asha_epochs(10, 1, 3) / 10)
    lines = est.lines()
    assert lines[0].startswith("cost: 3 trials x up to 10 epochs x 45,000 training + 5,000 "
                               "validation images, 2 trials at once on 1 CPU each")
    heaviest = next(ln for ln in lines if ln.strip().startswith("heaviest:"))
    assert heaviest.index("depth=4, width=2") < heaviest.index("depth=3") < heaviest.index("depth=2")
    assert "4,000.0M MACs/image" in heaviest and "3h53m an epoch" in heaviest
    assert lines[-1].startswith("warning: ~") and "on CPU" in lines[-1]
    for advice in ("--limit", "--max-epochs", "GPU"):
        assert advice in lines[-1]
    # The same sweep on GPUs, or 1000x faster: no warning.
    assert not any(ln.startswith("warning") for ln in _estimate(gpu=True).lines())
    assert not any(ln.startswith("warning") for ln in _estimate(spi=0.0001).lines())


def test_the_probe_trains_the_model_with_the_engine(monkeypatch):
    """The probe is the engine's own loop on random images: a warm-up epoch and a
    measured one of PROBE_STEPS batches (at most CPU_PROBE_BATCH images on a CPU)."""
    from cifar_ray import engine

    seen = []
    real_fit = engine.fit

    def fit(cfg, split, **kw):
        seen.append((cfg.train.epochs, cfg.train.batch_size, len(split.train[1])))
        return real_fit(cfg, split, **kw)

    monkeypatch.setattr(engine, "fit", fit)
    cfg = C.from_dict({**SWEEP_BASE, "train": {"epochs": 30, "batch_size": 256}})
    spi = cost.probe(cfg)
    assert math.isfinite(spi) and spi > 0
    assert seen == [(2, cost.CPU_PROBE_BATCH, cost.CPU_PROBE_BATCH * cost.PROBE_STEPS)]
    assert cost.macs(cfg) > 0


# ---------------------------------------------------------------- the status table

def test_the_table_lists_every_running_trial_from_its_start(tmp_path, capsys, monkeypatch):
    """A trial that has not finished an epoch is listed with its time so far, as is one
    that has; pending and finished trials are counted, not listed."""
    from cifar_ray import storage
    from cifar_ray import tune as TU

    clock = [1000.0]
    monkeypatch.setattr(TU, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    progress = TU._Progress(storage.locate(str(tmp_path)), max_epochs=3)
    progress.setup()

    def trial(tid, status, result=None, depth=2):
        return SimpleNamespace(trial_id=tid, status=status, last_result=result or {},
                               config={"trial": {"model.args.depth": depth}})

    slow = trial("slow_00000", "RUNNING", depth=4)
    fast = trial("fast_00001", "RUNNING", {"epoch": 2, "val_acc": 0.5})
    waiting = trial("wait_00002", "PENDING")
    progress.on_trial_start(0, [], slow)
    clock[0] += 30
    progress.on_trial_start(0, [], fast)
    clock[0] += 11 * 60 + 5
    progress.table([slow, fast, waiting])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[11m35s] 2 running, 1 pending, 0 done")
    assert len(out) == 3
    assert out[1].split()[:3] == ["running", "slow_00000", "11m35s"]
    assert "epoch 1/3 not done yet" in out[1] and "model.args.depth=4" in out[1]
    assert out[2].split()[:3] == ["running", "fast_00001", "11m05s"]
    assert "epoch 2/3  val acc 0.5000" in out[2]


# ---------------------------------------------------------------- tune --dry-run

@pytest.mark.ray
def test_dry_run_prints_the_cost_and_writes_nothing(ray_local, tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"base": SWEEP_BASE, "grid": {
        "model.args.filters": [8, 16, 32], "model.args.depth": [2, 3]}}))
    out = tmp_path / "sweep"
    r = CliRunner().invoke(main, ["tune", "--space", str(space), "--data", "synthetic:400",
                                  "--dry-run", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("cost: 6 trials x up to 3 epochs x 360 training + 40 validation")
    assert lines[1].startswith("  measured here: ") and lines[1].count("images/s") == 2
    assert lines[2].startswith("  estimate: at most ")
    # The heaviest first: 32 filters, 3 blocks.
    assert lines[3].startswith("  heaviest: model.args.depth=3, model.args.filters=32 (")
    assert len(lines) == 4  # nothing else: no sweep
    assert not out.exists()
    # Without --out as well.
    r = CliRunner().invoke(main, ["tune", "--space", str(space), "--data", "synthetic:400",
                                  "--dry-run"])
    assert r.exit_code == 0 and r.output.startswith("cost: 6 trials"), r.output


def test_dry_run_does_not_resume(tmp_path):
    r = CliRunner().invoke(main, ["tune", "--resume", str(tmp_path), "--dry-run"])
    assert r.exit_code == 2 and r.output.startswith("error: --dry-run estimates a new sweep")
