"""The registry and the named models: every model trains a step, counts match Keras's."""

import math
import re

import pytest
import torch
from torch import nn

from cifar_ray.errors import UserError
from cifar_ray.models import create_model, get_spec, list_models, model_info, register
from cifar_ray.models import registry


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name, **overrides) -> nn.Module:
    """The module's structure without allocating or initialising weights (fast)."""
    with torch.device("meta"):
        return create_model(name, **overrides)


def keras_count(convs: list[tuple[int, int]], dense: list[tuple[int, int]], k: int = 3) -> int:
    """Params as Keras's summary reports them: conv (k*k*cin+1)*cout, dense (in+1)*out."""
    return sum((k * k * cin + 1) * cout for cin, cout in convs) + \
        sum((i + 1) * o for i, o in dense)


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_a_step(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([3, 7])).backward()
    grads = [p.grad for p in model.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # model_info counts on the meta device; it must agree with the real module.
    assert model_info(name)["params"] == numel(model)


def test_seed_vgg_matches_keras_param_count():
    # Code block 1: 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5 -> 3 -> 1, Flatten gives 512.
    convs = [(3, 64), (64, 64), (64, 128), (128, 256), (256, 256), (256, 512)]
    dense = [(512, 2000), (2000, 2000), (2000, 10)]
    expected = keras_count(convs, dense)
    assert expected == 7_225_994
    assert numel(meta_model("seed-vgg")) == expected
    assert model_info("seed-vgg")["layers"][-4]["out_shape"] == [512]  # the Flatten


def test_seed_vgg_dropout_matches_keras_param_count():
    convs = [(3, 128), (128, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    dense = [(512, 2000), (2000, 2000), (2000, 10)]
    model = meta_model("seed-vgg-dropout")
    assert numel(model) == keras_count(convs, dense)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.4] * 4  # three after convs, one between the Dense(2000)s


def test_seed_nets_are_faithful_to_keras_defaults():
    for name in ("seed-vgg", "seed-vgg-dropout"):
        model = meta_model(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.padding == (0, 0) and c.kernel_size == (3, 3) and c.bias is not None
                   for c in convs)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        # one activation after each conv and each Dense(2000); none on the logits
        assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == len(convs) + 2


def test_resnet18_size():
    assert model_info("resnet18")["params"] == 11_173_962  # the usual CIFAR ResNet-18
    assert math.isclose(model_info("resnet18")["params"] / 1e6, 11.17, abs_tol=0.01)


def test_vgg_bn_variants_end_at_1x1():
    for name in ("vgg11-bn", "vgg16-bn"):
        layers = model_info(name)["layers"]
        assert layers[-1]["type"] == "classifier" and layers[-2]["out_shape"] == [512]
    assert model_info("vgg16-bn")["params"] > model_info("vgg11-bn")["params"]


def test_seed_vgg_bn_repairs_the_seed_net():
    model = meta_model("seed-vgg-bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.padding == (1, 1) and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)


def test_seed_small_is_small_and_filters_is_a_parameter():
    assert model_info("seed-small")["params"] < 10_000
    wide = meta_model("seed-small", filters=32)
    assert [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)] == [32, 32]


@pytest.mark.parametrize("name", ["seed-vgg", "seed-vgg-dropout", "resnet18", "cnn"])
def test_activation_is_a_parameter(name):
    model = meta_model(name, activation="leaky_relu:0.3")
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.3}
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    gelu = meta_model(name, activation="gelu")
    assert any(isinstance(m, nn.GELU) for m in gelu.modules())


def test_num_classes_sets_the_classifier():
    model = create_model("seed-small", num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(UserError, match="num_classes"):
        create_model("seed-small", num_classes=0)


# ---------------------------------------------------------------- the cnn family

def conv_layers(spec):
    return [l for l in spec if l["type"] == "conv"]


def test_cnn_growing_kernels_and_width():
    kernels = [l["kernel"] for l in conv_layers(get_spec("cnn", depth=3, convs=1,
                                                         kernels="growing"))]
    assert kernels == [3, 5, 7]
    assert {l["kernel"] for l in conv_layers(get_spec("cnn"))} == {3}
    filters = [l["filters"] for l in conv_layers(get_spec("cnn", convs=1, width=0.5))]
    assert filters == [16, 32, 64]


def test_cnn_knobs_change_the_net():
    base = get_spec("cnn")
    no_bn = get_spec("cnn", batchnorm=False)
    assert all(l["batchnorm"] for l in conv_layers(base))
    assert not any(l["batchnorm"] for l in conv_layers(no_bn))
    spec = get_spec("cnn", depth=2, convs=3, dense_layers=2, units=64, dropout=0.3,
                    padding="valid", pool="avg", head="flatten")
    types = [l["type"] for l in spec]
    assert types.count("conv") == 6 and types.count("avgpool") == 2
    assert types.count("dense") == 2 and types.count("dropout") == 4
    assert "flatten" in types and all(l["padding"] == "valid" for l in conv_layers(spec))
    model = create_model("cnn", depth=2, convs=3, padding="valid")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cnn_too_deep_collapses_with_the_layer_named():
    with pytest.raises(UserError, match=r"model cnn: layer \d+ \(maxpool 2x2\): input "
                                        r"\d+x1x1 gives 0x0; use padding: same"):
        model_info("cnn", depth=6)


@pytest.mark.parametrize("overrides, message", [
    ({"kernels": "shrinking"}, "kernels must be fixed or growing"),
    ({"pool": "min"}, "pool must be max or avg"),
    ({"head": "none"}, "head must be gap or flatten"),
    ({"width": 0}, "width and growth must be > 0"),
    ({"convs": 0}, "convs >= 1"),
    ({"dropout": 1.0}, r"\(dropout\): rate must be a number in \[0, 1\)"),
    ({"dropout": -0.1}, r"rate must be a number in \[0, 1\)"),
    ({"activation": "swish"}, "activation must be one of relu, leaky_relu"),
    ({"padding": "full"}, "padding must be valid or same"),
])
def test_cnn_bad_parameters(overrides, message):
    with pytest.raises(UserError, match=message):
        create_model("cnn", **overrides)


# ---------------------------------------------------------------- overrides and names

def test_unknown_override_lists_the_valid_parameters():
    with pytest.raises(UserError, match=r"model seed-vgg: unknown parameter 'depth'; "
                                        r"valid parameters: activation='relu', dropout=0.0$"):
        create_model("seed-vgg", depth=3)


@pytest.mark.parametrize("key, value, what", [
    ("depth", "abc", "an integer"), ("depth", 2.5, "an integer"), ("batchnorm", 1, "true or false"),
    ("width", True, "a number"), ("activation", 3, "a string"), ("width", "1e-400", "a number a float can hold"),
])
def test_override_of_the_wrong_type(key, value, what):
    default = {"depth": 3, "batchnorm": True, "width": 1.0, "activation": "relu"}[key]
    with pytest.raises(UserError, match=re.escape(f"model cnn: parameter {key} must be {what}")) as e:
        create_model("cnn", **{key: value})
    assert f"(default {default!r}), got {value!r}" in str(e.value)


def test_yaml_1_1_exponent_text_is_a_number():
    """PyYAML reads 1e-3 (no dot) as text: a float parameter takes it as the number."""
    assert get_spec("cnn", width="5e-1") == get_spec("cnn", width=0.5)


def test_int_is_accepted_for_a_float_parameter():
    assert get_spec("cnn", width=2) == get_spec("cnn", width=2.0)


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(UserError) as e:
        create_model("vgg19")
    assert "unknown model 'vgg19'" in str(e.value)
    assert all(name in str(e.value) for name in list_models())


def test_missing_spec_file(tmp_path):
    for name in (tmp_path / "net.yaml", "net.yml"):
        with pytest.raises(UserError, match="no such spec file"):
            create_model(str(name))


def test_spec_file_works_wherever_a_name_does(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("- {conv: 8, padding: same}\n- {maxpool: 4}\n- gap\n")
    model = create_model(path)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    info = model_info(str(path))
    assert info["name"] == str(path) and info["params"] == numel(model)
    with pytest.raises(UserError, match="takes no parameters"):
        create_model(path, activation="gelu")


def test_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").write_text("- gap\n")
    assert model_info("resnet18")["params"] == 3 * 10 + 10


def test_register(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._entries()))

    @register("tiny-test")
    def tiny(filters: int = 4):
        """A tiny net.

        More words."""
        return [{"conv": filters}, "gap"]

    assert "tiny-test" in list_models()
    info = model_info("tiny-test", filters=2)
    assert info["description"] == "A tiny net." and info["params"] == 2 * 27 + 2 + 2 * 10 + 10
    with pytest.raises(ValueError, match="registered twice"):
        register("tiny-test")(tiny)
    with pytest.raises(ValueError, match="needs a default"):
        register("no-default")(lambda filters: [])
