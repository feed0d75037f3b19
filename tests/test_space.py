"""Spaces: parsing, validation of every trial before any starts, trial configs, seed noise.
No Ray here: the CLI errors below all happen before Ray would start."""

from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from cifar_ray import space as S
from cifar_ray.cli import main
from cifar_ray.errors import UserError
from cifar_ray.report import noise


def write_space(tmp_path, data, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return str(path)


def checked(tmp_path, data, **flags):
    space = S.load_space(write_space(tmp_path, data))
    return [params for params, _ in S.plan_sweep(space, S.resolve_settings(space, flags)).trials]


BASE = {"model": {"name": "cnn", "args": {"depth": 2, "filters": 8}}, "train": {"epochs": 3}}


@pytest.mark.parametrize("name", sorted(S.builtin_spaces()))
def test_builtin_space_validates_every_trial(name):
    space = S.load_space(name)
    settings = S.resolve_settings(space, {})
    plan = S.plan_sweep(space, settings)
    assert len(plan.trials) >= 5 and space.description
    # The resolved form (what a sweep saves as DIR/space.yaml) is a space that yields the
    # same trials, with the same configs.
    resolved = S.resolved(plan.space, plan.settings, plan.base)
    again = S.parse(yaml.safe_load(yaml.safe_dump(resolved)), "resolved")
    assert S.plan_sweep(again, S.resolve_settings(again, {})).trials == plan.trials


def test_builtin_spaces_cover_the_knobs_the_seed_turned():
    arch = S.load_space("architecture")
    for knob in ("depth", "width", "filters", "dense_layers", "activation", "kernels",
                 "dropout", "batchnorm"):
        assert f"model.args.{knob}" in arch.dists
    assert set(arch.dists["model.args.activation"][1]) == {"relu", "leaky_relu", "gelu"}
    aug = {v.name: v.set for v in S.load_space("augmentation").variants}
    assert {"none", "hflip", "hflip+vflip", "crop", "cutout"} <= set(aug)
    assert {aug[n]["aug.rotate_fill"] for n in aug if "aug.rotate_fill" in aug[n]} == \
        {"black", "reflect", "crop"}
    sizes = {v.set["train.batch_size"]: v.set["optim.lr"] for v in S.load_space("batch-size").variants}
    assert min(sizes) == 128 and max(sizes) == 2048
    assert sizes[2048] / sizes[256] == pytest.approx(8)  # lr scaled with the batch
    journey = S.load_space("seed-journey").variants
    refs = {v.name: v.reference for v in journey if v.reference is not None}
    assert refs["s01-five-layers"] == 0.375 and refs["s20-code-block-2"] == 0.80
    assert all(v.note for v in journey)


def test_list_spaces_cli():
    result = CliRunner().invoke(main, ["tune", "--list-spaces"])
    assert result.exit_code == 0
    for name in S.builtin_spaces():
        assert name in result.output


def test_trial_config_layers_base_variant_grid_and_sweep(tmp_path):
    space = S.load_space(write_space(tmp_path, {
        "base": {**BASE, "optim": {"lr": 0.1}},
        "grid": {"model.args.depth": [2, 3]},
        "variants": [{"name": "plain"},
                     {"name": "vgg", "set": {"model.name": "seed-vgg", "optim.lr": 0.01}}]}))
    settings = S.resolve_settings(space, {"seeds": 2, "max_epochs": 5})
    trials = S.points(space, settings)
    assert len(trials) == 2 * 2 * 2
    cfg = S.trial_config(space, settings, {"variant": "plain", "model.args.depth": 3,
                                           "train.seed": 1})
    assert cfg.model.args == {"depth": 3, "filters": 8} and cfg.optim.lr == 0.1
    assert cfg.train.seed == 1 and cfg.train.epochs == 5  # the sweep's budget
    # Another model does not inherit the base model's args.
    vgg = S.trial_config(space, settings, {"variant": "vgg"})
    assert vgg.model.name == "seed-vgg" and vgg.model.args == {} and vgg.optim.lr == 0.01


def test_samples_are_drawn_once_per_configuration_and_repeatably(tmp_path):
    data = {"base": BASE, "uniform": {"optim.lr": [0.01, 0.2]},
            "loguniform": {"optim.weight_decay": ["1e-5", "1e-3"]},
            "randint": {"model.args.filters": [4, 9]},
            "choice": {"model.args.activation": ["relu", "gelu"]}}
    space = S.load_space(write_space(tmp_path, data))
    settings = S.resolve_settings(space, {"samples": 4, "seeds": 3})
    trials = S.points(space, settings)
    assert len(trials) == 12 and trials == S.points(space, settings)
    for i in range(0, 12, 3):  # the seeds of one sample share its values
        group = trials[i:i + 3]
        assert [t["train.seed"] for t in group] == [0, 1, 2]
        assert len({repr({k: v for k, v in t.items() if k != "train.seed"}) for t in group}) == 1
    for t in trials:
        assert 0.01 <= t["optim.lr"] <= 0.2 and 1e-5 <= t["optim.weight_decay"] <= 1e-3
        assert t["model.args.filters"] in range(4, 9) and isinstance(t["model.args.filters"], int)


@pytest.mark.parametrize("data, match", [
    ({"base": BASE, "grid": {"model.arg.depth": [2]}},
     "space.yaml: grid: unknown config key 'model.arg.depth' (did you mean 'model.args"),
    ({"base": BASE, "grid": {"optim.lrr": [0.1]}}, "(did you mean 'optim.lr'?)"),
    ({"base": BASE, "variants": [{"name": "a", "set": {"aug.hfilp": "none"}}]},
     "variants.a.set: unknown config key 'aug.hfilp' (did you mean 'aug.hflip'?)"),
    ({"base": {"optim": {"lrate": 1}}, "grid": {"optim.lr": [0.1]}},
     "space.yaml: base: unknown config key 'optim.lrate' (did you mean 'optim.lr'?)"),
    ({"base": BASE, "grid": {"model.args.depth": []}},
     "grid.model.args.depth: must be a non-empty list of values"),
    ({"base": BASE, "grid": {}}, "sweeps nothing"),
    ({"base": BASE, "uniform": {"optim.lr": [0.2, 0.1]}},
     "uniform.optim.lr: low must be < high, got [0.2, 0.1]"),
    ({"base": BASE, "uniform": {"optim.lr": [0.1]}}, "must be [low, high] (two numbers)"),
    ({"base": BASE, "loguniform": {"optim.lr": [0, 0.1]}}, "loguniform needs low > 0"),
    ({"base": BASE, "randint": {"model.args.depth": [1.5, 3]}}, "randint needs integers"),
    ({"base": BASE, "choice": {"model.args.activation": []}}, "must be a non-empty list"),
    ({"base": BASE, "grid": {"optim.lr": [0.1]}, "uniform": {"optim.lr": [0.1, 0.2]}},
     "optim.lr is swept twice"),
    ({"base": BASE, "grid": {"data.limit": [100]}}, "data.limit cannot vary across trials"),
    ({"base": BASE, "grid": {"train.epochs": [2, 4]}}, "--max-epochs sets every trial's"),
    ({"base": BASE, "variants": [{"name": "a"}, {"name": "a"}]}, "the name is used twice"),
    ({"base": BASE, "variants": [{"name": "a", "sett": {}}]}, "unknown key 'sett'"),
    ({"base": BASE, "variants": [{"name": "a", "reference": 75}]}, "an accuracy in [0, 1]"),
    ({"base": BASE, "grid": {"optim.lr": [0.1]}, "variants": [{"name": "a", "set": {"optim.lr": 1}}]},
     "also swept"),
    ({"base": BASE, "grdi": {"optim.lr": [0.1]}}, "unknown key 'grdi'"),
    ({"base": BASE, "grid": {"optim.lr": [0.1, -1.0]}}, "optim.lr=-1.0: optim.lr must be >= 0"),
    ({"base": BASE, "grid": {"model.args.dept": [2]}},
     "model.args.dept=2: model cnn: unknown parameter 'dept'"),
    ({"base": BASE, "variants": [{"name": "tiny", "set": {"model.args.depth": 6,
                                                          "model.args.padding": "valid"}}]},
     "variant tiny: "),
])
def test_bad_space_is_refused_naming_the_key(tmp_path, data, match):
    with pytest.raises(UserError) as e:
        checked(tmp_path, data)
    assert match in str(e.value)


@pytest.mark.parametrize("flags, match", [
    ({"grace": 4}, "--grace 4 exceeds --max-epochs 3"),
    ({"grace": 5, "max_epochs": 2}, "--grace 5 exceeds --max-epochs 2"),
    ({"reduction": 1.0}, "--reduction 1: must be > 1"),
    ({"samples": 3}, "--samples 3: samples are draws from distributions"),
    ({"seeds": 0}, "--seeds 0: must be >= 1"),
    ({"gpus_per_trial": 2.0}, "one worker uses one GPU"),
    ({"workers_per_trial": 2, "gpus_per_trial": 0.5, "cpus_per_trial": 2},
     "DDP workers take one whole GPU each; use --gpus-per-trial 2"),
    ({"workers_per_trial": 3, "cpus_per_trial": 2}, "less than one CPU for each of 3 workers"),
    ({"cpus_per_trial": 0}, "--cpus-per-trial 0"),
])
def test_bad_options_are_refused(tmp_path, flags, match):
    with pytest.raises(UserError) as e:
        checked(tmp_path, {"base": BASE, "grid": {"optim.lr": [0.1]}}, **flags)
    assert match in str(e.value)


def test_seeds_and_swept_seed_conflict(tmp_path):
    with pytest.raises(UserError, match="sweeps train.seed and --seeds 2"):
        checked(tmp_path, {"base": BASE, "grid": {"train.seed": [0, 1]}}, seeds=2)


@pytest.mark.parametrize("args, match", [
    (["--space", "nope"], "--space nope: no such file or built-in space"),
    (["--space", "BAD", "--grace", "9"], "--grace 9 exceeds --max-epochs 3"),
    (["--space", "BAD", "--set", "optim.lr=abc"], "optim.lr must be a number"),
    (["--space", "UNKNOWN"], "did you mean 'optim.lr'"),
    (["--space", "BAD", "--resume", "x"], "a resumed sweep keeps its space and options"),
    (["--data", "synthetic:200"], "--space NAME|FILE is required"),
])
def test_bad_tune_cli_input_fails_before_anything_runs(tmp_path, args, match):
    good = write_space(tmp_path, {"base": BASE, "grid": {"optim.lr": [0.1]}}, "good.yaml")
    unknown = write_space(tmp_path, {"base": BASE, "grid": {"optim.lrr": [0.1]}}, "unknown.yaml")
    args = [{"BAD": good, "UNKNOWN": unknown}.get(a, a) for a in args]
    out = tmp_path / "sweep"
    if "--resume" not in args:
        args += ["--out", str(out)]
    if "--data" not in args:
        args += ["--data", "synthetic:200"]
    result = CliRunner().invoke(main, ["tune", *args])
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not out.exists()  # nothing half-written


def test_report_of_nothing_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a sweep directory" in result.output


# ---------------------------------------------------------------- seed noise

def fake_sweep(groups: dict[str, list[float]]):
    """A stand-in for sweepdir.Sweep: one trial per (variant, seed) with the given accuracy."""
    trials = []
    for name, accs in groups.items():
        for seed, acc in enumerate(accs):
            trials.append(SimpleNamespace(
                params={"variant": name, "train.seed": seed}, status="done", best_val_acc=acc,
                changes={} if name == "base" else {"optim.lr": name}, did_not_learn=acc < 0.15))
    variants = [SimpleNamespace(name=n, reference=None) for n in groups]
    return SimpleNamespace(trials=trials, space=SimpleNamespace(variants=variants))


def test_a_small_win_within_seed_noise_is_not_a_finding():
    nz = noise(fake_sweep({"base": [0.800, 0.812, 0.791],
                           "tiny-win": [0.803, 0.815, 0.794],  # +0.3 points
                           "real-win": [0.850, 0.861, 0.842],
                           "real-loss": [0.700, 0.712, 0.690]}))
    verdicts = {g.label: nz.verdict(g) for g in nz.groups}
    assert verdicts == {"variant base": "base", "variant tiny-win": "within noise",
                        "variant real-win": "better, beyond noise",
                        "variant real-loss": "worse, beyond noise"}
    tiny = next(g for g in nz.groups if g.label == "variant tiny-win")
    d, half = nz.delta(tiny)
    assert d == pytest.approx(0.003) and half > abs(d)
    assert nz.df == 8 and 0.005 < nz.sd < 0.02
    assert nz.half_width(tiny) == pytest.approx(2.306 * nz.sd / 3 ** 0.5)


def test_trials_that_never_left_chance_did_not_learn():
    nz = noise(fake_sweep({"base": [0.800, 0.812], "stuck": [0.100, 0.104], "win": [0.850, 0.861]}))
    verdicts = {g.label: nz.verdict(g) for g in nz.groups}
    assert verdicts["variant stuck"] == "did not learn"
    assert verdicts["variant win"] == "better, beyond noise"
    stuck = next(g for g in nz.groups if g.label == "variant stuck")
    assert stuck.values == [] and nz.df == 2  # not pooled: that spread is no seed noise


def test_the_base_is_the_spaces_base_not_the_first_trial():
    nz = noise(fake_sweep({"first": [0.80, 0.81], "second": [0.90, 0.91]}))
    assert nz.base is None
    assert {nz.verdict(g) for g in nz.groups} == {"no base to compare"}
    assert nz.delta(nz.groups[1])[1] is None


def test_one_seed_means_noise_unknown():
    nz = noise(fake_sweep({"base": [0.80], "other": [0.90]}))
    assert nz.sd is None
    assert nz.verdict(nz.groups[1]) == "noise unknown (1 seed)"
