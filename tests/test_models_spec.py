"""Layer specs: both forms, shapes, MACs, files, and every kind of bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cifar_ray.errors import UserError
from cifar_ray.models import (build_module, create_model, dump_spec, get_spec, list_models,
                              load_spec, parse_spec, summarize)
from cifar_ray.models import spec as spec_module
from cifar_ray.models.spec import build

SPECS_DIR = __import__("pathlib").Path(__file__).parents[1] / "cifar_ray" / "models" / "specs"


def numel(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- forms and order

def test_shorthand_and_canonical_forms_are_the_same_layers():
    short = [{"conv": 64, "kernel": 5, "padding": "same"}, {"maxpool": 2}, {"dropout": 0.4},
             "batchnorm", {"gap": None}, {"dense": 100, "activation": "gelu"}, {"act": "tanh"}]
    canonical = [{"type": "conv", "filters": 64, "kernel": 5, "padding": "same"},
                 {"type": "maxpool", "size": 2}, {"type": "dropout", "rate": 0.4},
                 {"type": "batchnorm"}, {"type": "gap"},
                 {"type": "dense", "units": 100, "activation": "gelu"},
                 {"type": "act", "activation": "tanh"}]
    assert parse_spec(short) == parse_spec(canonical)
    conv = parse_spec(short)[0]
    assert conv == {"type": "conv", "filters": 64, "kernel": 5, "stride": 1, "padding": "same",
                    "groups": 1, "bias": True, "batchnorm": False, "activation": "relu",
                    "dirac": False}


def test_defaults_follow_keras():
    conv = parse_spec([{"conv": 8}])[0]
    assert conv["padding"] == "valid" and conv["bias"] and conv["kernel"] == 3
    pool = build_module([{"maxpool": 3}])[0]
    assert pool.kernel_size == 3 and pool.stride == 3  # stride defaults to the size


def test_batchnorm_comes_before_the_activation():
    block = build_module([{"conv": 8, "batchnorm": True, "activation": "elu"}])[0]
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ELU]
    dense = build_module(["flatten", {"dense": 4, "batchnorm": True}])[1]
    assert [type(m) for m in dense] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]


def test_activations():
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}
    for name, cls in acts.items():
        assert isinstance(build_module([{"act": name}])[0], cls)
    assert build_module([{"act": "leaky_relu"}])[0].negative_slope == 0.01  # PyTorch's default
    assert build_module([{"act": "leaky_relu:0.3"}])[0].negative_slope == 0.3  # Keras's
    identity = build_module([{"conv": 4, "activation": "identity"}])[0]
    assert isinstance(identity, nn.Conv2d)


def test_classifier_outputs_logits_and_flattens_a_feature_map():
    model, rows = build([{"conv": 4}], num_classes=7)
    assert [r["type"] for r in rows] == ["conv", "flatten", "classifier"]
    assert isinstance(model[-1], nn.Linear) and model[-1].in_features == 4 * 30 * 30
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and not torch.allclose(out.sum(1), torch.ones(2))  # no softmax


def test_residual_shortcuts():
    same = build_module([{"conv": 8, "padding": "same"},
                        {"residual": [{"conv": 8, "padding": "same"}]}])[1]
    assert isinstance(same.shortcut, nn.Identity)
    down = build_module([{"residual": [{"conv": 16, "stride": 2, "padding": "same",
                                       "batchnorm": True}]}])[0]
    conv, bn = down.shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
    assert isinstance(bn, nn.BatchNorm2d)
    no_bn = build_module([{"residual": [{"conv": 16, "padding": "same"}]}])[0]
    assert isinstance(no_bn.shortcut, nn.Conv2d) and no_bn.shortcut.bias is not None
    assert no_bn(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32, 32)
    # 10 -> 5 -> 3 in the body; a 1x1 conv with stride 4 gives ceil(10 / 4) = 3 too
    twice = {"conv": 4, "stride": 2, "padding": "same"}
    model = build_module([{"residual": [twice, twice]}], in_shape=(3, 10, 10))
    assert model[0].shortcut.stride == (4, 4)
    assert model(torch.randn(2, 3, 10, 10)).shape == (2, 10)


# ---------------------------------------------------------------- counts

def test_macs_of_a_tiny_spec_by_hand():
    spec = [{"conv": 8, "kernel": 3},                       # 3x32x32 -> 8x30x30
            {"maxpool": 2},                                 # -> 8x15x15
            {"conv": 4, "kernel": 1, "stride": 2},          # -> 4x8x8
            {"conv": 4, "kernel": 3, "padding": "same", "groups": 2},  # 4x8x8, 2 in per group
            "flatten", {"dense": 16}]                       # 256 -> 16, then 16 -> 10
    info = summarize(spec)
    hand = [8 * 30 * 30 * 3 * 3 * 3, 0, 4 * 8 * 8 * 8 * 1 * 1, 4 * 8 * 8 * 2 * 3 * 3, 0,
            256 * 16, 16 * 10]
    assert [r["macs"] for r in info["layers"]] == hand
    assert info["macs"] == sum(hand) == 205_312
    params = [8 * 27 + 8, 0, 4 * 8 + 4, 4 * 2 * 9 + 4, 0, 256 * 16 + 16, 16 * 10 + 10]
    assert [r["params"] for r in info["layers"]] == params
    assert info["params"] == numel(build_module(spec))


def test_residual_macs_include_the_shortcut():
    info = summarize([{"residual": [{"conv": 8, "kernel": 1, "stride": 2, "bias": False}]}])
    row = info["layers"][0]
    assert row["shortcut"]["macs"] == 8 * 16 * 16 * 3
    assert row["macs"] == 2 * 8 * 16 * 16 * 3 and row["body"][0]["out_shape"] == [8, 16, 16]


# Random small specs: the shape the builder tracks is the shape the module produces.
# (The shorthand's type is its first key, so the dicts are built in order, not by
# st.fixed_dictionaries.)
conv = st.builds(lambda f, k, s, p, bn: {"conv": f, "kernel": k, "stride": s, "padding": p,
                                         "batchnorm": bn},
                 st.integers(1, 6), st.sampled_from([1, 3, 5]), st.integers(1, 2),
                 st.sampled_from(["valid", "same"]), st.booleans())
same_conv = st.builds(lambda f, s: {"conv": f, "stride": s, "padding": "same"},
                      st.integers(1, 6), st.integers(1, 2))
layer = st.one_of(
    conv,
    st.builds(lambda k: {"maxpool": k}, st.integers(1, 3)),
    st.builds(lambda k, s: {"avgpool": k, "stride": s}, st.integers(1, 3), st.integers(1, 3)),
    st.just("batchnorm"), st.just({"dropout": 0.1}), st.just({"act": "silu"}),
    st.builds(lambda body: {"residual": body}, st.lists(same_conv, min_size=1, max_size=2)),
)
tail = st.sampled_from([[], ["gap"], ["gmp", {"dense": 5}], ["flatten", "batchnorm"]])


@settings(max_examples=30, deadline=None)
@given(st.lists(layer, max_size=6), tail)
def test_tracked_shapes_match_the_module(body, end):
    spec = body + end
    try:
        model, rows = build(spec, num_classes=3)
    except UserError as e:  # the only refusal these layers can earn: an empty feature map
        assert "gives" in str(e) and "use padding: same or fewer pools" in str(e)
        return
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    for module, row in zip(model, rows):
        x = module(x)
        assert list(x.shape[1:]) == row["out_shape"], row
    assert x.shape == (2, 3)


def test_every_layer_type_has_one_builder():
    assert set(spec_module.BUILDERS) | {"residual"} == set(spec_module.LAYERS)


def test_a_new_layer_type_is_an_entry_in_each_table(monkeypatch):
    monkeypatch.setitem(spec_module.LAYERS, "scale", {"by": ("number", 2.0)})
    monkeypatch.setitem(spec_module.BUILDERS, "scale",
                        lambda layer, shape, label: ([spec_module.Mul(layer["by"])], shape, 0))
    model, rows = build(["gap", {"type": "scale", "by": 3}, "scale"], num_classes=2)
    assert [r["type"] for r in rows] == ["gap", "scale", "scale", "classifier"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model[2](model[1](model[0](x))), 6 * x.mean((2, 3)))


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("name", list_models())
def test_spec_files_round_trip(tmp_path, name):
    spec = get_spec(name)
    dump_spec(spec, tmp_path / "a.yaml")
    loaded = load_spec(tmp_path / "a.yaml")
    assert loaded == spec
    dump_spec(loaded, tmp_path / "b.yaml")
    assert load_spec(tmp_path / "b.yaml") == loaded
    assert summarize(loaded)["params"] == summarize(spec)["params"]


def test_shipped_example_spec(tmp_path):
    path = SPECS_DIR / "small-resnet.yaml"
    spec = load_spec(path)
    assert [l["type"] for l in spec].count("residual") == 2
    model = create_model(str(path))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    dump_spec(spec, tmp_path / "copy.yaml")
    assert numel(create_model(str(tmp_path / "copy.yaml"))) == numel(model)


# ---------------------------------------------------------------- bad input

BAD = [
    # 32 -> 30 -> 28 -> 14 -> 12 -> 6 -> 4 -> 2 -> nothing
    ([{"conv": 8}, {"conv": 8}, {"maxpool": 2}, {"conv": 8}, {"maxpool": 2}, {"conv": 8},
      {"maxpool": 2}, {"conv": 8}],
     r"^layer 7 \(conv 8 3x3 valid relu\): input 8x2x2 gives 0x0; use padding: same or "
     r"fewer pools$"),
    ([{"maxpool": 64}], r"layer 0 \(maxpool 64x64\): input 3x32x32 gives 0x0"),
    ([{"conv": 8, "kernel": 33}], r"layer 0 \(conv 8 33x33 valid relu\): input 3x32x32 gives"),
    ([{"kernel": 3, "conv": 8}], r"layer 0: unknown layer type 'kernel'.*; in the shorthand "
                                 r"the first key is the type"),
    ([{"pool": 2}], r"layer 0: unknown layer type 'pool'; valid types: conv, maxpool, avgpool, "
                    r"batchnorm, act, dropout, gap, gmp, flatten, dense, residual"),
    ([{"type": "conv", "filter": 8}], r"layer 0 \(conv\): unknown argument 'filter'; valid "
                                      r"arguments: filters, kernel, stride, padding"),
    ([{"type": "conv", "kernel": 3}], r"layer 0 \(conv\): missing argument 'filters'; valid "
                                      r"arguments: filters, kernel"),
    (["dense"], r"layer 0 \(dense\): missing argument 'units'"),
    ([{"conv": 0}], r"layer 0 \(conv\): filters must be a positive integer, got 0"),
    ([{"conv": 8, "kernel": -1}], r"kernel must be a positive integer, got -1"),
    ([{"conv": 8, "stride": 0}], r"stride must be a positive integer, got 0"),
    ([{"maxpool": 0}], r"layer 0 \(maxpool\): size must be a positive integer, got 0"),
    (["flatten", {"dense": -5}], r"layer 1 \(dense\): units must be a positive integer"),
    ([{"conv": "abc"}], r"filters must be a positive integer, got 'abc'"),
    ([{"conv": 8.0}], r"filters must be a positive integer, got 8.0"),
    ([{"conv": True}], r"filters must be a positive integer, got True"),
    ([{"conv": 8, "bias": "yes"}], r"bias must be true or false, got 'yes'"),
    ([{"conv": 8, "padding": "full"}], r"padding must be valid or same, got 'full'"),
    ([{"dropout": 1.0}], r"layer 0 \(dropout\): rate must be a number in \[0, 1\), got 1.0"),
    ([{"dropout": -0.1}], r"rate must be a number in \[0, 1\), got -0.1"),
    ([{"dropout": "0.5"}], r"rate must be a number in \[0, 1\)"),
    ([{"conv": 8, "activation": "swish"}],
     r"activation must be one of relu, leaky_relu, gelu, elu, silu, tanh, sigmoid, identity"),
    ([{"act": "leaky_relu:abc"}], r"activation must be one of"),
    ([{"act": "relu:0.1"}], r"activation must be one of"),
    ([{"conv": 8, "kernel": 4, "padding": "same"}], r"padding: same needs an odd kernel"),
    ([{"conv": 8, "groups": 2}], r"groups 2 must divide the input channels \(3\)"),
    ([{"gap": 3}], r"layer 0 \(gap\): takes no value, got 3; write just gap"),
    ([{"conv": 8, "filters": 16}], r"filters given twice"),
    ([{"type": ["conv"]}], r"layer 0: unknown layer type \['conv'\]"),
    ([{1: 2}], r"layer 0: expected a mapping"),
    ([5], r"layer 0: expected a mapping like \{type: conv, filters: 64\} or a layer name"),
    ([{}], r"layer 0: expected a mapping"),
    ([{"dense": 10}], r"layer 0 \(dense 10 relu\): input is a 3x32x32 feature map; put "
                      r"flatten or gap before dense"),
    (["gap", {"conv": 8}], r"layer 1 \(conv 8 3x3 valid relu\): needs a CxHxW feature map"),
    ([{"residual": []}], r"layer 0 \(residual\): body must be a non-empty list of layers"),
    ([{"residual": [{"conv": 8, "stride": 2}]}],
     r"layer 0 \(residual relu\): its body maps 3x32x32 to 8x15x15, which no strided 1x1 "
     r"shortcut can match; use padding: same in the body"),
    ([{"residual": ["gap"]}], r"its body must end with a CxHxW feature map"),
    ([{"residual": [{"conv": 8, "padding": "same"}, {"cnv": 8}]}],
     r"layer 0.1: unknown layer type 'cnv'"),
    ({"conv": 8}, r"spec: a layer spec must be a list of layers, got dict"),
]


@pytest.mark.parametrize("spec, message", BAD)
def test_bad_specs_are_refused_with_one_clear_line(spec, message):
    with pytest.raises(UserError, match=message) as e:
        build_module(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("conv: 8\n", r"a layer spec must be a list of layers, got dict"),
    ("", r"a layer spec must be a list of layers, got NoneType"),
    ("- {conv: 8\n", r"not valid YAML at line \d+"),
    ("- {conv: 8, kernel: 3}\n- {conv: 8, kernel: big}\n",
     r"net.yaml: layer 1 \(conv\): kernel must be a positive integer, got 'big'"),
])
def test_bad_spec_files(tmp_path, text, message):
    path = tmp_path / "net.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_spec(path)
    assert str(path) in str(e.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(UserError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
