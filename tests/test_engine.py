"""The engine alone (no Ray): learning, resume equality, NaN detection, schedules, EMA, TTA,
checkpoint loading safety."""

import math
import pickle

import pytest
import torch
from torch import nn

from cifar_ray import config as C
from cifar_ray import checkpoint, engine, rundir
from cifar_ray.errors import UserError
from cifar_ray.data.split import load_split
from helpers import tiny_spec as write_tiny_spec


@pytest.fixture
def tiny_spec(tmp_path):
    return write_tiny_spec(tmp_path / "tiny.yaml", dropout=0.1)


def make_cfg(spec, *sets):
    return C.load_config(None, [f"model.name={spec}", "data.source=synthetic:600",
                                "train.batch_size=64", "optim.lr=0.05", *sets])


class Capture:
    """Keeps each epoch's checkpoint state through a real save/load round trip."""

    def __init__(self, tmp_path):
        self.tmp, self.states, self.metrics = tmp_path, {}, []

    def progress(self, epoch, step, steps):
        pass

    def epoch_end(self, metrics, state):
        self.metrics.append(metrics)
        if state is not None:
            path = self.tmp / f"epoch-{metrics['epoch']}.pt"
            checkpoint.save_state(state(), path)
            self.states[metrics["epoch"]] = checkpoint.load_state(path)


def test_fit_learns_synthetic(tiny_spec):
    cfg = make_cfg(tiny_spec, "train.epochs=4")
    history = engine.fit(cfg, load_split(cfg), device=torch.device("cpu"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["val_acc"] > 0.35  # 10 classes: chance is 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {h["chance"] for h in history} == {0.1}
    assert not rundir.did_not_learn(history)


def test_a_run_at_chance_says_so(capsys):
    """Two epochs or more that never reach 1.5x chance: the epoch line and the summary say
    the net is not learning; one epoch is too early to tell."""
    from cifar_ray.train import _Console

    stuck = [{"epoch": e, "train_loss": 2.303, "train_acc": 0.1, "val_loss": 2.303,
              "val_acc": 0.104, "lr": 0.05, "images_per_s": 100.0, "seconds": 1.0,
              "chance": 0.1} for e in (1, 2)]
    console = _Console(2, stream=open(__import__("os").devnull, "w"))
    console.epoch(stuck[0], stuck[:1])
    console.epoch(stuck[1], stuck)
    first, second = capsys.readouterr().out.splitlines()
    assert "chance" not in first and "still at chance (0.10): not learning" in second
    assert not rundir.did_not_learn(stuck[:1]) and rundir.did_not_learn(stuck)
    assert not rundir.did_not_learn([{**stuck[0], "val_acc": 0.16}, stuck[1]])
    assert not rundir.did_not_learn([{k: v for k, v in h.items() if k != "chance"} for h in stuck])


def test_resume_equals_uninterrupted(tiny_spec, tmp_path):
    cfg = make_cfg(tiny_spec, "train.epochs=3", "optim.ema_decay=0.9")
    data = load_split(cfg)
    full = Capture(tmp_path)
    engine.fit(cfg, data, device=torch.device("cpu"), reporter=full)
    resumed = Capture(tmp_path / 'r')
    history = engine.fit(cfg, data, device=torch.device("cpu"), resume=full.states[1],
                         reporter=resumed)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for a, b in zip(full.metrics[1:], resumed.metrics):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == b[key], key
    torch.testing.assert_close(full.states[3]["model"], resumed.states[3]["model"], rtol=0, atol=0)


def test_nan_loss_stops_with_epoch_and_step(tiny_spec):
    cfg = make_cfg(tiny_spec, "optim.lr=1e12", "optim.schedule=constant",
                   "optim.warmup_epochs=0", "train.precision=fp32")
    with pytest.raises(engine.NonFiniteLoss, match=r"epoch 1, step \d+/\d+; lower optim.lr"):
        engine.fit(cfg, load_split(cfg), device=torch.device("cpu"))


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step", "constant"])
def test_lr_schedules(schedule):
    o = C.OptimConfig(lr=1.0, schedule=schedule, warmup_epochs=1, step_every=2, step_gamma=0.1)
    lrs = [engine.lr_at(o, s, total_steps=100, steps_per_epoch=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warmup
    assert max(lrs) == pytest.approx(1.0)
    if schedule in ("onecycle", "cosine"):
        assert lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    elif schedule == "step":
        assert lrs[20] == pytest.approx(0.1) and lrs[40] == pytest.approx(0.01)
    else:
        assert lrs[-1] == 1.0


def test_ema_moves_toward_live_weights():
    model = nn.Linear(4, 2)
    ema = engine.EMA(model, decay=0.9)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    gap = (model.weight - ema.shadow["weight"]).abs().sum().item()
    ema.update(model)
    delta = ema.shadow["weight"] - before
    torch.testing.assert_close(delta, torch.full_like(delta, 0.1))
    new_gap = (model.weight - ema.shadow["weight"]).abs().sum().item()
    assert new_gap == pytest.approx(0.9 * gap, rel=1e-5)


def test_tta_of_flip_and_shift_invariant_model_equals_plain():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    x = torch.randn(4, 3, 8, 8)
    views = engine.tta_views(x)
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    # A mean over all pixels is flip-invariant, and almost shift-invariant: compare the
    # flip-only part exactly and the whole TTA closely.
    torch.testing.assert_close(model(views[1]), model(x))
    plain = engine.predict_logits(model, x)
    tta = engine.predict_logits(model, x, tta=True)
    assert tta.shape == plain.shape
    torch.testing.assert_close(tta, plain, atol=0.2, rtol=0)


class Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@pytest.mark.parametrize("payload", ["random", "pickle", "foreign", "truncated", "wrong-format"])
def test_load_state_refuses_bad_checkpoints(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "state.pt"
    if payload == "random":
        path.write_bytes(bytes(range(256)) * 10)
    elif payload == "pickle":
        path.write_bytes(pickle.dumps(Evil()))
    elif payload == "foreign":
        torch.save({"format": 1, "model": Evil()}, path)
    elif payload == "truncated":
        torch.save({"format": 1, "x": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        torch.save({"format": 99}, path)
    with pytest.raises(UserError, match="state.pt"):
        checkpoint.load_state(path)
    assert not (tmp_path / "PWNED").exists()


def test_autocast_choice():
    cpu = torch.device("cpu")
    assert engine.autocast_dtype("fp32", cpu) is None
    assert engine.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert engine.autocast_dtype("auto", cpu) in (None, torch.bfloat16)
    assert math.isfinite(engine.lr_at(C.OptimConfig(warmup_epochs=0), 0, 1, 1))
