"""`cifar-ray models list|show`, in-process."""

import json

import pytest
import yaml
from click.testing import CliRunner

from cifar_ray.cli import main
from cifar_ray.models import list_models, load_spec, model_info


def run(*args):
    return CliRunner().invoke(main, ["models", *args])


def test_list_shows_every_model_with_its_size():
    result = run("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["name", "params", "description"]
    for name in list_models():
        row = next(l for l in lines if l.startswith(name + " "))
        assert row.split()[1].endswith(("k", "M")) and len(row.split()) > 3
    assert any(l.startswith("resnet18 ") and "11.17M" in l for l in lines)


def test_show_table():
    result = run("show", "seed-vgg")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "conv 512 3x3 valid relu" in out and "512x1x1" in out
    assert "classifier -> 10 logits" in out
    info = model_info("seed-vgg")
    assert f"total: {info['params']:,} params" in out and f"{info['macs']:,} MACs" in out


def test_show_residual_rows_and_overrides():
    result = run("show", "resnet18", "--set", "width=16", "--set", "activation=gelu")
    assert result.exit_code == 0, result.output
    assert "parameters: activation=gelu, width=16" in result.output
    assert "3.sc" in result.output and "conv 32 1x1/2 valid bn" in result.output


def test_show_json_parses():
    result = run("show", "cnn", "--json", "--set", "depth=2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"name", "params", "macs", "layers"} <= set(data)
    assert data == json.loads(json.dumps({**model_info("cnn", depth=2), "recipe": {}}))
    row = data["layers"][0]
    assert set(row) == {"index", "type", "args", "out_shape", "params", "macs"}
    assert data["params"] == sum(r["params"] for r in data["layers"])


def test_a_net_without_batchnorm_carries_a_recipe_it_learns_with():
    """The config's SGD defaults leave nets without BatchNorm at chance: such a model brings
    its own recipe, shown by `models show` and used unless the config sets those keys."""
    from cifar_ray import config as C

    shown = run("show", "cnn", "--set", "batchnorm=false")
    assert "default recipe: optim.name=adamw, optim.lr=0.001" in shown.output
    assert "default recipe: the config's defaults" in run("show", "seed-vgg-bn").output
    assert json.loads(run("show", "seed-vgg-dropout", "--json").output)["recipe"] == \
        {"optim.name": "adamw", "optim.lr": 0.001}
    cfg = C.load_config(None, ["model.name=seed-vgg-dropout"])
    assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 0.001)
    cfg = C.load_config(None, ["model.name=seed-vgg-dropout", "optim.lr=0.0003"])  # --set wins
    assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 0.0003)
    cfg = C.load_config(None, ["model.name=seed-vgg-dropout", "optim.name=sgd"])
    assert (cfg.optim.name, cfg.optim.lr) == ("sgd", 0.001)  # key by key, like every layer
    assert C.load_config(None, ["model.name=seed-vgg-bn"]).optim == C.OptimConfig()
    # A run's config judged by the layers it carries, when the file is gone (another node).
    layers = [{"type": "conv", "filters": 4}, "gap"]
    cfg = C.load_config(None, ["model.name=gone.yaml", f"model.spec={layers}"])
    assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 0.001)


def test_show_spec_file_and_yaml_export(tmp_path):
    result = run("show", "seed-vgg-dropout", "--yaml", "--set", "dropout=0.25")
    assert result.exit_code == 0, result.output
    path = tmp_path / "mine.yaml"
    path.write_text(result.output)
    assert isinstance(yaml.safe_load(result.output), list)
    shown = run("show", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["name"] == str(path)
    assert data["params"] == model_info("seed-vgg-dropout")["params"]
    assert [l["rate"] for l in load_spec(path) if l["type"] == "dropout"] == [0.25] * 4


@pytest.mark.parametrize("args, message", [
    (["show", "vgg19"], "error: unknown model 'vgg19'; registered: seed-small"),
    (["show", "missing.yaml"], "error: missing.yaml: no such spec file"),
    (["show", "cnn", "--set", "depth=9"], "error: model cnn: layer 17 (maxpool 2x2): input"),
    (["show", "cnn", "--set", "dept=2"], "error: model cnn: unknown parameter 'dept'; valid "
                                         "parameters: depth=3"),
    (["show", "cnn", "--set", "depth"], "error: --set 'depth': expected ARG=VALUE"),
    (["show", "seed-vgg", "--set", "activation=swish"],
     "activation must be one of relu, leaky_relu"),
])
def test_errors_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_spec_file_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- {conv: 64}\n- {conv: abc}\n")
    result = run("show", str(path))
    assert result.exit_code == 2
    assert f"error: {path}: layer 1 (conv): filters must be a positive integer" in result.output
