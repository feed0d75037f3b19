"""The named models: the seed's nets (faithful Keras transcriptions), the variants a user tries
next, and the parametric `cnn` family that Tune spaces sweep.

Every model is a function from keyword parameters to a layer spec (see spec.py), built from
the same two helpers: `conv` and `walk`, which walks a VGG-style config list (timm's idea:
the architecture is data, one loop builds it).
"""

from __future__ import annotations

from typing import Callable

from cifar_ray.errors import UserError, shown
from cifar_ray.models.registry import register


def conv(filters: int, kernel: int = 3, *, stride: int = 1, padding: str = "valid",
         batchnorm: bool = False, activation: str = "relu") -> dict:
    # BN's shift makes a conv bias redundant, so a conv followed by BN has none.
    return {"type": "conv", "filters": filters, "kernel": kernel, "stride": stride,
            "padding": padding, "bias": not batchnorm, "batchnorm": batchnorm,
            "activation": activation}


def dense(units: int, activation: str = "relu") -> dict:
    return {"type": "dense", "units": units, "activation": activation}


def walk(cfg: list, number: Callable[[int], dict], dropout: float = 0.0) -> list[dict]:
    """A config list -> layers: an int n gives `number(n)` (a conv or a dense layer), "M" a
    2x2 max pool, "D" a dropout of `dropout` (left out at rate 0)."""
    layers = []
    for item in cfg:
        if item == "M":
            layers.append({"type": "maxpool", "size": 2})
        elif item == "D":
            if dropout != 0:  # a bad rate still reaches the spec checks
                layers.append({"type": "dropout", "rate": dropout})
        else:
            layers.append(number(item))
    return layers


# ---------------------------------------------------------------- the seed's nets

# Code block 1 of the notes, Keras defaults: 3x3 valid convs with bias, the activation after
# each Conv/Dense. 32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5 -> 3 -> 1, so Flatten gives 512.
SEED_VGG = [64, 64, "M", 128, 256, "M", 256, 512]
# Code block 2: Dropout(.4) after the first conv of each pair, GAP instead of Flatten.
SEED_VGG_DROPOUT = [128, "D", 128, "M", 128, "D", 256, "M", 256, "D", 512]
SEED_HEAD = [2000, "D", 2000]  # Dense(2000) twice; block 2 has a Dropout between them


@register("seed-small")
def seed_small(filters: int = 1, units: int = 60, activation: str = "relu"):
    """The seed's first ~5-layer nets, reconstructed: the notes give no code for them."""
    # Two 1-filter convs (the bottleneck the author found at step 10: try --set filters=32)
    # and dense layers of 60 units (step 3); 5 weight layers counting the classifier.
    features = walk([filters, "M", filters, "M"], lambda f: conv(f, activation=activation))
    return features + ["flatten"] + walk([units, units], lambda u: dense(u, activation))


# The seed's next step put "Dropout(.2) in three places" of code block 1 without saying where:
# here after each of the two pools and between the Dense(2000) layers (rate 0: none, faithful).
SEED_VGG_DROPS = [64, 64, "M", "D", 128, 256, "M", "D", 256, 512]


@register("seed-vgg")
def seed_vgg(activation: str = "relu", dropout: float = 0.0):
    """The seed's VGG16-like net (code block 1), faithful: valid padding, Flatten, 2x Dense 2000."""
    return (walk(SEED_VGG_DROPS, lambda f: conv(f, activation=activation), dropout) + ["flatten"]
            + walk(SEED_HEAD, lambda u: dense(u, activation), dropout))


@register("seed-vgg-dropout")
def seed_vgg_dropout(activation: str = "relu", dropout: float = 0.4):
    """The seed's best net (code block 2, ~.80), faithful: Dropout .4, GAP, 2x Dense 2000."""
    return (walk(SEED_VGG_DROPOUT, lambda f: conv(f, activation=activation), dropout)
            + ["gap"] + walk(SEED_HEAD, lambda u: dense(u, activation), dropout))


@register("seed-vgg-bn")
def seed_vgg_bn(activation: str = "relu", dropout: float = 0.0):
    """seed-vgg repaired: padding same, BatchNorm, a third pool, GAP, 2x Dense 2000."""
    features = walk(SEED_VGG + ["M"], lambda f: conv(f, padding="same", batchnorm=True,
                                                     activation=activation))
    return features + ["gap"] + walk(SEED_HEAD, lambda u: dense(u, activation), dropout)


# ---------------------------------------------------------------- classic nets, CIFAR-sized

# Five 2x2 pools take 32x32 to 1x1, so the classifier sees 512 features.
VGG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(depth: int, activation: str) -> list:
    return walk(VGG[depth], lambda f: conv(f, padding="same", batchnorm=True,
                                           activation=activation)) + ["flatten"]


@register("vgg11-bn")
def vgg11_bn(activation: str = "relu"):
    """VGG11 with BatchNorm for 32x32 inputs, one linear classifier."""
    return vgg(11, activation)


@register("vgg16-bn")
def vgg16_bn(activation: str = "relu"):
    """VGG16 with BatchNorm for 32x32 inputs, one linear classifier."""
    return vgg(16, activation)


def basic_block(filters: int, stride: int, activation: str) -> dict:
    """Two 3x3 convs; the registry's builder adds a 1x1 shortcut when the shape changes."""
    return {"type": "residual", "activation": activation, "body": [
        conv(filters, stride=stride, padding="same", batchnorm=True, activation=activation),
        conv(filters, padding="same", batchnorm=True, activation="identity"),
    ]}


@register("resnet18")
def resnet18(activation: str = "relu", width: int = 64):
    """ResNet-18 for CIFAR: 3x3 stem, no max pool, 4 stages of 2 basic blocks, GAP."""
    layers = [conv(width, padding="same", batchnorm=True, activation=activation)]
    for stage in range(4):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1  # halve the size entering stages 2-4
            layers.append(basic_block(width * 2 ** stage, stride, activation))
    return layers + ["gap"]


# ---------------------------------------------------------------- the family for Tune

def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"model cnn: {message}")


MAX_REPEAT = 64  # blocks, convs per block, dense layers of the cnn family


@register("cnn")
def cnn(depth: int = 3, width: float = 1.0, filters: int = 32, growth: float = 2.0,
        convs: int = 2, kernel: int = 3, kernels: str = "fixed", padding: str = "same",
        batchnorm: bool = True, activation: str = "relu", pool: str = "max",
        dropout: float = 0.0, dense_layers: int = 1, units: int = 256, head: str = "gap"):
    """A VGG-style family for ablations: blocks of convs + pool, then dense layers.

    depth: conv blocks, each `convs` convs then a 2x2 `pool` (max | avg) and, when dropout
    is not 0, a dropout; block i has round(filters * width * growth**i) filters and a
    kernel of `kernel` (kernels: fixed) or kernel + 2i (kernels: growing, 3 -> 5 -> 7, the
    seed-journey space's step s15-growing-kernels). Then `head` (gap | flatten) and `dense_layers` dense layers of
    round(units * width) units, each followed by the dropout.
    """
    _need(depth >= 0 and convs >= 1 and dense_layers >= 0,
          "depth and dense_layers must be >= 0, convs >= 1")
    # Five pools take 32x32 to 1x1: far deeper nets only collapse, after building their list.
    _need(max(depth, convs, dense_layers) <= MAX_REPEAT,
          f"depth, convs and dense_layers must be <= {MAX_REPEAT}")
    _need(width > 0 and growth > 0, "width and growth must be > 0")
    _need(kernels in ("fixed", "growing"), f"kernels must be fixed or growing, got {shown(kernels)}")
    _need(pool in ("max", "avg"), f"pool must be max or avg, got {shown(pool)}")
    _need(head in ("gap", "flatten"), f"head must be gap or flatten, got {shown(head)}")
    # A rate of 0 adds no layer; any other rate is left for the spec checks to judge.
    drop = [{"type": "dropout", "rate": dropout}] if dropout != 0 else []
    layers = []
    for i in range(depth):
        try:
            n = max(1, round(filters * width * growth ** i))
        except OverflowError:  # the size check of the spec then names the layer
            raise UserError(f"model cnn: block {i} would have more filters than a float "
                            "holds; use a smaller width, filters or growth") from None
        k = kernel + 2 * i if kernels == "growing" else kernel
        layers += [conv(n, k, padding=padding, batchnorm=batchnorm, activation=activation)
                   for _ in range(convs)]
        layers += [{"type": f"{pool}pool", "size": 2}] + drop
    layers.append(head)
    for _ in range(dense_layers):
        layers += [dense(max(1, round(units * width)), activation)] + drop
    return layers


# ---------------------------------------------------------------- the speed recipe's net

def _speed_block(filters: int, activation: str, bn: dict) -> list:
    """conv -> 2x2 max pool -> BN -> act -> conv -> BN -> act: pooling right after the first
    conv halves the cost of everything after it. Convs start as (partial) identities."""
    def c(n):
        return {**conv(n, padding="same", activation="identity"), "bias": False, "dirac": True}
    return [c(filters), {"type": "maxpool", "size": 2}, bn, {"type": "act", "activation": activation},
            c(filters), bn, {"type": "act", "activation": activation}]


@register("speed")
def speed(block1: int = 64, block2: int = 256, block3: int = 256, whiten: int = 2,
          activation: str = "gelu", bn_momentum: float = 0.4, logit_scale: float = 1 / 9):
    """The speed recipe's net (airbench94's design): patch whitening, 3 conv blocks, max pool."""
    # whiten kxk (2*3*k*k frozen filters from the data, 32 -> 31) -> act, then three blocks
    # 31 -> 15 -> 7 -> 3, a global max pool and a scaled linear classifier. BatchNorm learns
    # only its shift (gamma stays 1) and keeps a short memory (PyTorch momentum 0.4): its
    # running statistics follow the weights, which change fast at this learning rate.
    bn = {"type": "batchnorm", "momentum": bn_momentum, "eps": 1e-12, "scale": False}
    layers = [{"type": "whiten", "kernel": whiten}, {"type": "act", "activation": activation}]
    for filters in (block1, block2, block3):
        layers += _speed_block(filters, activation, bn)
    # Scaling the features by logit_scale scales the logits the same way (up to the bias).
    return layers + ["gmp", {"type": "mul", "factor": logit_scale}]
