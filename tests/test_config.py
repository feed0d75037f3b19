"""The typed config: defaults, YAML files, --set overrides, errors, round trip."""

import dataclasses

import pytest
import yaml

from cifar_ray import config as C
from cifar_ray.errors import UserError


def test_defaults_are_frozen_and_documented():
    cfg = C.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    assert "optim.lr" in C.valid_keys() and "model.args" in C.valid_keys()
    # every leaf field carries a comment in the source (units, choices)
    src = open(C.__file__).read()
    for key in C.valid_keys():
        name = key.split(".")[-1]
        line = next(l for l in src.splitlines() if l.strip().startswith(f"{name}:"))
        assert "#" in line, f"{key} has no comment"


def test_file_then_set_then_roundtrip(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\nmodel:\n  name: cnn\n  args: {depth: 2}\n")
    cfg = C.load_config(str(path), ["optim.lr=1e-3", "model.args.width=2", "aug.hflip=none",
                                    "train.tta=true"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 1e-3
    assert cfg.model.args == {"depth": 2, "width": 2}
    assert cfg.aug.hflip == "none" and cfg.train.tta is True
    dumped = tmp_path / "dumped.yaml"
    C.save_config(cfg, dumped)
    assert C.load_config(str(dumped)) == cfg


def test_int_accepted_for_float_but_not_bool():
    assert C.load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(UserError, match="optim.lr must be a number"):
        C.load_config(None, ["optim.lr=true"])


@pytest.mark.parametrize("item, match", [
    ("optim.lrr=0.1", r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\).*valid keys"),
    ("train.epochs=abc", "train.epochs must be an integer"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("optim.schedule=linear", "one of onecycle | cosine | step | constant"),
    ("data.val_fraction=1.0", "data.val_fraction must be >= 0.0 and < 1.0"),
    ("optim.lr=.nan", "finite"),
    ("noequals", "expected KEY=VALUE"),
    ("train=3", "train is a section; set one of its keys: train.epochs"),
    ("model.args=5", "model.args must be a mapping"),
])
def test_bad_overrides(item, match):
    with pytest.raises(UserError, match=match):
        C.load_config(None, [item])


def test_bad_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        C.load_config(str(bad_yaml))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(UserError, match=r"unknown.yaml: unknown config key 'trian'.*did you mean"):
        C.load_config(str(unknown))
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        C.load_config(str(not_mapping))
    with pytest.raises(UserError, match="no such file or preset"):
        C.load_config(str(tmp_path / "missing.yaml"))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert C.load_config(str(empty)) == C.Config()


def test_dump_is_plain_yaml():
    data = yaml.safe_load(C.dump_yaml(C.Config()))
    assert set(data) == {"data", "model", "aug", "optim", "train", "scale"}
    assert C.from_dict(data) == C.Config()


@pytest.mark.parametrize("key, choices", [
    ("aug.hflip", "random | alternate | none"), ("optim.schedule", "onecycle | cosine | step | constant"),
    ("train.precision", "auto | bf16 | fp16 | fp32"), ("scale.placement", "PACK | STRICT_PACK | SPREAD"),
])
def test_choices_are_read_from_the_field_declaration(key, choices):
    for value in ("nope", 3, ""):
        with pytest.raises(UserError, match=f"{key} must be one of {choices}, got "):
            C.from_dict(C.set_dotted({}, key, value))


def test_every_range_is_declared_with_its_field_and_checked():
    """Each ranged setting refuses the value just outside its declaration, names it, and
    takes its own bound where that is inclusive."""
    ranged = {}
    for section in dataclasses.fields(C.Config):
        for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                    else getattr(C, section.type)):
            if "range" in f.metadata:
                ranged[f"{section.name}.{f.name}"] = (type(f.default), *f.metadata["range"])
    assert {"train.epochs", "data.val_fraction", "optim.momentum", "aug.cutout"} <= set(ranged)
    for key, (tp, low, high, inclusive) in ranged.items():
        step = 1 if tp is int else 1e-9
        with pytest.raises(UserError, match=f"{key} must be >= {low}"):
            C.from_dict(C.set_dotted({}, key, low - step))
        assert C.from_dict(C.set_dotted({}, key, low)) is not None
        if high is not None:
            with pytest.raises(UserError, match=f"{key} must be >= {low} and {'<=' if inclusive else '<'} {high}"):
                C.from_dict(C.set_dotted({}, key, high + step if inclusive else high))


def test_one_rule_for_numbers_in_every_reader():
    """PyYAML (YAML 1.1) reads 1e-3 as text: the config, a model's parameters, a layer spec
    and a space all take such text as the number; other text is no number anywhere; a bool
    is never one; inf and nan are refused."""
    from cifar_ray import space as S
    from cifar_ray.models import get_spec
    from cifar_ray.models.spec import parse_spec

    assert C.from_dict({"optim": {"lr": "1e-3"}}).optim.lr == 1e-3
    assert C.from_dict({"optim": {"lr": "2.5E+1"}}).optim.lr == 25.0
    assert get_spec("cnn", width="5e-1") == get_spec("cnn", width=0.5)
    assert parse_spec([{"mul": "1e-3"}])[0]["factor"] == 1e-3
    assert parse_spec([{"dropout": "1e-1"}])[0]["rate"] == 0.1
    assert S._distribution("loguniform", ["1e-5", "1e-3"], "w") == [1e-5, 1e-3]
    for text in ("0.5", "abc", "1e", True):
        with pytest.raises(UserError, match=f"optim.lr must be a number, got {text!r}"):
            C.from_dict({"optim": {"lr": text}})
        with pytest.raises(UserError, match="factor must be a number"):
            parse_spec([{"mul": text}])
        with pytest.raises(UserError, match="parameter width must be a number"):
            get_spec("cnn", width=text)
        with pytest.raises(UserError, match=r"must be \[low, high\] \(two numbers\)"):
            S._distribution("uniform", [text, 1.0], "w")
    for bad in (float("inf"), float("nan"), 10**400, "1e999", "1e-400"):
        with pytest.raises(UserError, match="optim.lr must be a (finite )?number"):
            C.from_dict({"optim": {"lr": bad}})
        with pytest.raises(UserError, match="factor must be a (finite )?number"):
            parse_spec([{"mul": bad}])


def test_a_new_model_starts_without_the_old_models_args():
    """One rule for --model/--set model.name and a sweep's model.name: the old model's args
    and layers are not the new one's (`--config speed-cpu --model cnn` builds a cnn); args
    given with the new name apply, in whatever order they come."""
    from cifar_ray.models import model_info

    cfg = C.load_config("speed-cpu", ["model.args.depth=2", "model.name=cnn"])
    assert cfg.model.name == "cnn" and cfg.model.args == {"depth": 2}
    assert model_info(cfg.model.name, **cfg.model.args)["params"] > 0
    assert cfg.optim.lr == C.load_config("speed-cpu").optim.lr  # the rest of the preset stays
    same = C.load_config("speed-cpu", ["model.name=speed"])  # the same model keeps its args
    assert same.model.args == C.load_config("speed-cpu").model.args
    assert C.apply({"model": {"name": "cnn", "args": {"depth": 2}, "spec": [{"conv": 8}]}},
                   {"model.name": "seed-small"})["model"] == {"name": "seed-small", "args": {},
                                                              "spec": []}
