"""The speed recipe's parts, each by its behaviour: patch-whitening init, lookahead,
test-time augmentation, decoupled optimizer units, the speed net's layers and the presets.
(EMA, which the recipe also uses: test_engine.py.)"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_ray import config as C
from cifar_ray import engine
from cifar_ray.errors import UserError
from cifar_ray.models import create_model, model_info
from cifar_ray.models.spec import ShiftBatchNorm, Whiten, build_module, parse_spec, summarize
from cifar_ray.data.split import load_split


def correlated_images(n=128, seed=0):
    """Smooth images whose channels are mixed: neighbouring pixels and channels correlate."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=32, mode="bilinear",
                      align_corners=False)
    x = x + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])
    return torch.einsum("ij,njhw->nihw", mix, x)


def patch_moments(out: torch.Tensor) -> torch.Tensor:
    flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).double()
    return flat.T @ flat / len(flat)


# ---------------------------------------------------------------- whitening

def test_whitening_init_makes_patches_white():
    x = correlated_images()
    raw = patch_moments(x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 1, 4, 5, 2, 3)
                        .reshape(len(x), 12, 31, 31))
    assert (raw - torch.eye(12, dtype=raw.dtype)).abs().max() > 0.5  # far from white before
    layer = Whiten(3, 2, eps=1e-8)
    layer.init_from_data(x)
    half = F.conv2d(x, layer.weight[:12])
    assert torch.allclose(patch_moments(half), torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])  # each filter and its negative
    assert not layer.weight.requires_grad and layer.bias.requires_grad


def test_engine_init_from_data_reaches_the_layer_and_stops_there():
    model = create_model("speed", block1=8, block2=8, block3=8)
    before = copy.deepcopy(model.state_dict())
    x = correlated_images(32)
    engine.init_from_data(model, x)
    after = model.state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])  # the whitening filters
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["0.weight"]  # the pass stopped after it: no BN statistics moved
    assert model.training  # mode restored
    again = create_model("speed", block1=8, block2=8, block3=8)
    engine.init_from_data(again, x)
    assert torch.equal(again.state_dict()["0.weight"], after["0.weight"])  # deterministic


def test_fit_whitens_from_training_images():
    cfg = C.load_config("speed-cpu", ["data.source=synthetic:400", "train.epochs=1",
                                      "train.batch_size=64", "model.args.block1=8",
                                      "model.args.block2=8", "model.args.block3=8"])
    data = load_split(cfg)
    hist = engine.fit(cfg, data, device=torch.device("cpu"))
    assert len(hist) == 1 and torch.isfinite(torch.tensor(hist[0]["train_loss"]))


# ---------------------------------------------------------------- lookahead (EMA: test_engine.py)

def test_lookahead_pulls_toward_the_live_weights_and_restarts_from_the_slow_copy():
    model = nn.Linear(3, 2)
    slow0 = model.weight.detach().clone()
    la = engine.Lookahead(model, every=2, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    la.step(model, 1, 10)  # not a lookahead step: nothing happens
    assert torch.equal(model.weight, slow0 + 1) and torch.equal(la.slow["weight"], slow0)
    la.step(model, 2, 10)
    d = 0.5 * (2 / 10) ** 3  # decay grows as progress**3
    expected = slow0 + (1 - d) * 1.0
    assert torch.allclose(la.slow["weight"], expected)
    assert torch.equal(model.weight.detach(), la.slow["weight"])  # live restarts from slow
    with torch.no_grad():
        model.weight.add_(5.0)
    la.step(model, 10, 10)  # the last step: the live weights become the slow ones
    assert torch.allclose(model.weight.detach(), expected)


def test_lookahead_state_resumes(tmp_path):
    cfg = C.load_config("speed-cpu", ["data.source=synthetic:400", "train.epochs=2",
                                      "train.batch_size=64", "model.args.block1=8",
                                      "model.args.block2=8", "model.args.block3=8"])
    data = load_split(cfg)
    states = {}

    class Keep:
        def progress(self, *a):
            pass

        def epoch_end(self, metrics, state):
            states[metrics["epoch"]] = copy.deepcopy(state())  # the live tensors move on

    full = engine.fit(cfg, data, device=torch.device("cpu"), reporter=Keep())
    assert states[1]["lookahead"] is not None
    resumed = engine.fit(cfg, data, device=torch.device("cpu"), resume=states[1])
    assert resumed[-1]["val_acc"] == full[-1]["val_acc"]
    assert resumed[-1]["train_loss"] == pytest.approx(full[-1]["train_loss"], rel=1e-6)


# ---------------------------------------------------------------- test-time augmentation

def test_tta_prediction_does_not_change_when_the_input_is_mirrored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.flip(-1)), atol=1e-3)  # the model cares
        tta, tta_mirrored = (engine.predict_logits(model, v, tta=True) for v in (x, x.flip(-1)))
    assert torch.allclose(tta, tta_mirrored, atol=1e-5)  # its TTA does not


def test_tta_equals_the_plain_prediction_on_images_every_view_leaves_alone():
    torch.manual_seed(0)
    model = create_model("speed", block1=8, block2=8, block3=8).eval()
    x = torch.rand(3, 3, 1, 1).expand(3, 3, 32, 32).contiguous()  # one colour per image
    with torch.no_grad():
        assert torch.allclose(engine.predict_logits(model, x, tta=True), model(x), atol=1e-5)


# ---------------------------------------------------------------- decoupled units

def test_decoupled_units_give_airbench_step_sizes_and_one_decay_for_all():
    cfg = C.load_config("speed")  # lr 11.5, wd 0.0153 per 1024 images, momentum 0.85, batch 1024
    model = create_model("speed")
    opt = engine.build_optimizer(cfg, model)
    unit = 1024 / (1024 * (1 + 1 / 0.15))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs[0] == pytest.approx(11.5 * unit)  # 1.5: weights (and non-norm biases)
    assert lrs[-1] == pytest.approx(11.5 * unit * 64)  # BatchNorm shifts
    for g in opt.param_groups:  # the shrink per step is the same for every group
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.0153 * unit)
    # With zero gradients one step shrinks every parameter by the same factor.
    params = [p for p in model.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    ratios = torch.cat([(p.detach() / b).flatten() for p, b in zip(params, before)])
    assert torch.allclose(ratios, ratios[0].expand_as(ratios)) and ratios[0] < 1


def test_classic_units_keep_two_groups_and_no_decay_on_biases():
    cfg = C.load_config(None, ["model.name=seed-vgg-bn", "optim.weight_decay=0.01"])
    model = create_model("seed-vgg-bn")
    groups = engine.build_optimizer(cfg, model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim <= 1 for p in groups[1]["params"])
    scaled = C.replace(cfg, optim__norm_lr_scale=10.0)
    groups = engine.build_optimizer(scaled, model).param_groups
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 1.0, 10.0]


# ---------------------------------------------------------------- the net and its layers

def test_speed_net_shape_and_layers():
    info = model_info("speed")
    assert 1.9e6 < info["params"] < 2.0e6  # the whitening filters are a buffer, not counted
    shapes = [tuple(r["out_shape"]) for r in info["layers"]]
    assert shapes[0] == (24, 31, 31)  # 2*3*2*2 whitening filters, valid 2x2
    assert (256, 3, 3) in shapes and shapes[-1] == (10,)
    model = create_model("speed")
    bns = [m for m in model.modules() if isinstance(m, ShiftBatchNorm)]
    assert len(bns) == 6 and all([n for n, _ in b.named_parameters()] == ["bias"] for b in bns)
    assert all(torch.equal(b.weight, torch.ones(len(b.weight))) for b in bns)  # a buffer
    assert all(b.momentum == 0.4 and b.eps == 1e-12 for b in bns)
    x = torch.randn(8, 64, 5, 5)  # normalises per channel, then shifts by the bias
    with torch.no_grad():
        bns[0].bias.fill_(0.5)
        ref = F.batch_norm(x, None, None, training=True, eps=1e-12) + 0.5
        assert torch.allclose(bns[0](x), ref, atol=1e-5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    second = convs[1].weight  # 64 -> 64: starts as the identity (dirac)
    x = torch.randn(1, 64, 5, 5)
    assert torch.allclose(F.conv2d(x, second, padding=1), x, atol=1e-6)


@pytest.mark.parametrize("layer, message", [
    ({"whiten": 2, "eps": -1}, "eps must be a positive number"),
    ({"type": "batchnorm", "momentum": 0}, r"momentum must be a number in \(0, 1\]"),
    ({"mul": "x"}, "factor must be a number"),
    ({"conv": 8, "groups": 2, "dirac": True}, "dirac needs groups: 1"),
])
def test_new_layer_arguments_are_checked(layer, message):
    with pytest.raises(UserError, match=message):
        parse_spec([layer, "gap"])


def test_whiten_needs_a_feature_map_and_counts_macs():
    with pytest.raises(UserError, match="needs a CxHxW feature map"):
        build_module(["gap", {"whiten": 2}])
    rows = summarize([{"whiten": 3}, "gap"])["layers"]
    assert rows[0]["out_shape"] == [54, 30, 30]
    assert rows[0]["macs"] == 54 * 30 * 30 * 3 * 3 * 3 and rows[0]["params"] == 54  # bias only


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name, gpu", [("speed", True), ("speed-cpu", False)])
def test_presets_resolve_by_name(name, gpu):
    assert name in C.preset_names()
    cfg = C.load_config(name, ["data.source=synthetic"])
    assert cfg.model.name == "speed" and cfg.scale.gpu is gpu
    assert cfg.aug.hflip == "alternate" and cfg.aug.crop_pad == 2
    assert cfg.optim.decoupled and cfg.optim.lookahead_every > 0 and cfg.train.tta
    assert cfg.optim.label_smoothing > 0
    create_model(cfg.model.name, **cfg.model.args)


def test_speed_cpu_recipe_learns_on_synthetic_data():
    cfg = C.load_config("speed-cpu", ["data.source=synthetic:1200", "train.epochs=3",
                                      "train.batch_size=128", "model.args.block1=16",
                                      "model.args.block2=16", "model.args.block3=32"])
    hist = engine.fit(cfg, load_split(cfg), device=torch.device("cpu"))
    assert hist[-1]["val_acc"] > 0.3  # chance is 0.1
