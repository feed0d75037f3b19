"""A network as data: a list of layers, checked, then walked once into an `nn.Module`.

A layer is a mapping. The canonical form names its type under `type`:

    {type: conv, filters: 64, kernel: 3, padding: same, batchnorm: true}

The shorthand puts the type as the FIRST key, whose value is the layer's main argument
(`MAIN_ARG`); a layer with no required argument may also be a bare string:

    {conv: 64, kernel: 3, padding: same, batchnorm: true}
    {maxpool: 2}   {dropout: 0.4}   {dense: 2000}   gap

`parse_spec` turns either form into the canonical form with every default filled in; the
builder only ever sees that. The builder tracks the (C, H, W) shape through the list and
refuses, before any training, a layer whose output would be empty, naming the layer. A
final `Linear(features, num_classes)` producing logits is always appended (a 4-D feature map
is flattened first), so a spec describes the body of the network only.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cifar_ray.errors import UserError, shown
from cifar_ray.values import finite_number, is_int

IN_SHAPE = (3, 32, 32)  # CIFAR images: channels, height, width

# Limits far beyond any CIFAR network (resnet18: 11M parameters, its largest feature map
# 64x32x32 = 65k values per image). They stop a typo such as `conv: 1000000000` before a
# single weight is allocated, and a spec that YAML aliases blow up to billions of layers.
MAX_PARAMS = 1_000_000_000  # parameters of the whole model (4 GB of float32 weights)
MAX_VALUES = 2**24  # values of one layer's output per image (64 MB of float32)
MAX_LAYERS = 10_000  # layers of a spec, those in residual bodies included
MAX_NESTING = 16  # residual bodies inside residual bodies

# ---------------------------------------------------------------- activations

# leaky_relu takes PyTorch's slope 0.01; write `leaky_relu:0.3` for Keras's LeakyReLU default.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
ACTIVATION_HELP = ", ".join(ACTIVATIONS) + " (leaky_relu:SLOPE for another slope)"


def _parse_activation(name: Any) -> tuple[str, float | None] | None:
    """`relu` -> ('relu', None); `leaky_relu:0.3` -> ('leaky_relu', 0.3); bad -> None."""
    if not isinstance(name, str):
        return None
    base, sep, arg = name.partition(":")
    if base not in ACTIVATIONS or (sep and base != "leaky_relu"):
        return None
    if not sep:
        return base, None
    try:
        slope = float(arg)
    except ValueError:
        return None
    return (base, slope) if math.isfinite(slope) else None


def make_activation(name: str) -> nn.Module:
    parsed = _parse_activation(name)
    if parsed is None:
        raise UserError(f"unknown activation {shown(name)}; valid: {ACTIVATION_HELP}")
    base, slope = parsed
    return nn.LeakyReLU(slope) if slope is not None else ACTIVATIONS[base]()


# ---------------------------------------------------------------- the layer table

REQUIRED = object()  # marks an argument without a default

# type -> {argument: (kind, default)}. The kinds are checked by `_check_arg`; each type's
# module is made by its builder in BUILDERS (below, beside the builders).
LAYERS: dict[str, dict[str, tuple[str, Any]]] = {
    "conv": {
        "filters": ("count", REQUIRED),
        "kernel": ("count", 3),
        "stride": ("count", 1),
        "padding": ("padding", "valid"),  # Keras's default: no padding
        "groups": ("count", 1),
        "bias": ("bool", True),
        "batchnorm": ("bool", False),  # conv -> BN -> activation
        "activation": ("activation", "relu"),
        "dirac": ("bool", False),  # start the first min(in, out) filters as the identity
    },
    "maxpool": {"size": ("count", 2), "stride": ("count_or_null", None)},  # stride null = size
    "avgpool": {"size": ("count", 2), "stride": ("count_or_null", None)},
    # momentum as PyTorch's (weight of the new batch); scale: false keeps gamma at 1 (shift only)
    "batchnorm": {"momentum": ("fraction", 0.1), "eps": ("positive", 1e-5), "scale": ("bool", True)},
    "act": {"activation": ("activation", "relu")},
    "dropout": {"rate": ("rate", REQUIRED)},
    "gap": {},  # global average pool: CxHxW -> C
    "gmp": {},  # global max pool: CxHxW -> C
    "flatten": {},
    "dense": {
        "units": ("count", REQUIRED),
        "bias": ("bool", True),
        "batchnorm": ("bool", False),  # dense -> BN -> activation
        "activation": ("activation", "relu"),
    },
    # body: a list of layers. Shortcut: identity, or a 1x1 conv (+BN if the body has BN)
    # when the body changes the shape. The activation is applied after the add.
    "residual": {"body": ("layers", REQUIRED), "activation": ("activation", "relu")},
    # A frozen kxk conv set from the data (see `Whiten`): 2*C*k*k filters, valid padding.
    "whiten": {"kernel": ("count", 2), "eps": ("positive", 5e-4)},
    "mul": {"factor": ("number", REQUIRED)},  # multiply by a constant (e.g. scale the logits)
}
MAIN_ARG = {"conv": "filters", "maxpool": "size", "avgpool": "size", "act": "activation",
            "dropout": "rate", "dense": "units", "residual": "body", "whiten": "kernel",
            "mul": "factor"}
LAYER_TYPES = ", ".join(LAYERS)


def _check_arg(kind: str, value: Any, where: str) -> Any:
    """Return `value` if it is of `kind`, else raise a UserError saying what is expected."""
    def bad(what: str) -> UserError:
        return UserError(f"{where} must be {what}, got {shown(value)}")

    if kind == "count" or (kind == "count_or_null" and value is not None):
        if not is_int(value) or value < 1:
            raise bad("a positive integer")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "padding":
        if value not in ("valid", "same"):
            raise bad("valid or same")
    elif kind == "activation":
        if _parse_activation(value) is None:
            raise bad(f"one of {ACTIVATION_HELP}")
    elif kind == "rate":
        value = finite_number(value, lambda _: bad("a number in [0, 1)"))
        if not 0 <= value < 1:
            raise bad("a number in [0, 1)")
    elif kind in ("fraction", "positive", "number"):
        value = finite_number(value, bad)
        if kind == "fraction" and not 0 < value <= 1:
            raise bad("a number in (0, 1]")
        if kind == "positive" and value <= 0:
            raise bad("a positive number")
    elif kind == "layers":
        if not isinstance(value, list) or not value:
            raise bad("a non-empty list of layers")
    return value


# ---------------------------------------------------------------- parse_spec / compact

def _canonical_dict(item: Any, where: str) -> dict:
    """Either accepted form -> {type: ..., args...} (not yet checked against the table)."""
    if isinstance(item, str):
        return {"type": item}
    if not isinstance(item, dict) or not item or not all(isinstance(k, str) for k in item):
        raise UserError(f"{where}: expected a mapping like {{type: conv, filters: 64}} or a "
                        f"layer name like gap, got {shown(item)}")
    if "type" in item:
        return dict(item)
    # Shorthand: the first key is the type, its value the main argument.
    kind, main = next(iter(item.items()))
    out = {"type": kind, **{k: v for k, v in item.items() if k != kind}}
    if main is not None and kind in MAIN_ARG:
        if MAIN_ARG[kind] in out:
            raise UserError(f"{where} ({kind}): {MAIN_ARG[kind]} given twice")
        out[MAIN_ARG[kind]] = main
    elif main is not None and kind in LAYERS:
        raise UserError(f"{where} ({kind}): takes no value, got {shown(main)}; write just {kind}")
    return out


def normalize_layer(item: Any, at: str, _seen: list | None = None, _depth: int = 0) -> dict:
    """One layer in either form -> canonical dict, all arguments checked and filled in.

    `at` names the layer in messages, e.g. `spec.yaml: layer 3`. `_seen` counts the layers
    of the whole spec: YAML aliases can make a small file name billions of them."""
    seen = _seen if _seen is not None else [0]
    seen[0] += 1
    if seen[0] > MAX_LAYERS:
        raise UserError(f"{at}: the spec has more than {MAX_LAYERS:,} layers (nested ones "
                        "included); write a smaller network")
    layer = _canonical_dict(item, at)
    kind = layer.pop("type")
    if not isinstance(kind, str) or kind not in LAYERS:
        hint = ("; in the shorthand the first key is the type" if not isinstance(item, str)
                and "type" not in item and any(k in LAYERS for k in item) else "")
        raise UserError(f"{at}: unknown layer type {shown(kind)}; valid types: {LAYER_TYPES}{hint}")
    table = LAYERS[kind]
    label = f"{at} ({kind})"
    valid = ", ".join(table) or "none"
    for key in layer:
        if key not in table:
            raise UserError(f"{label}: unknown argument {shown(key)}; valid arguments: {valid}")
    out = {"type": kind}
    for key, (arg_kind, default) in table.items():
        if key not in layer:
            if default is REQUIRED:
                raise UserError(f"{label}: missing argument {key!r}; valid arguments: {valid}")
            out[key] = default
            continue
        value = _check_arg(arg_kind, layer[key], f"{label}: {key}")
        if arg_kind == "layers":
            if _depth >= MAX_NESTING:
                raise UserError(f"{label}: residual bodies nested more than {MAX_NESTING} deep; "
                                "flatten the spec")
            value = _normalize_list(value, f"{at}.", seen, _depth + 1)
        out[key] = value
    if kind == "conv" and out["padding"] == "same" and out["kernel"] % 2 == 0:
        raise UserError(f"{label}: padding: same needs an odd kernel, got {out['kernel']}")
    if kind == "conv" and out["dirac"] and out["groups"] > 1:
        raise UserError(f"{label}: dirac needs groups: 1")
    return out


def _normalize_list(items: list, prefix: str, seen: list | None = None,
                    depth: int = 0) -> list[dict]:
    seen = seen if seen is not None else [0]
    return [normalize_layer(item, f"{prefix}{i}", seen, depth) for i, item in enumerate(items)]


def _prefix(source: str | None) -> str:
    return f"{source}: layer " if source else "layer "


def parse_spec(spec: Any, source: str | None = None) -> list[dict]:
    """Check a spec and return it in canonical form with every default filled in.

    `source` (a file or model name) prefixes messages: `spec.yaml: layer 3 (conv): ...`."""
    if not isinstance(spec, list):
        raise UserError(f"{source or 'spec'}: a layer spec must be a list of layers, "
                        f"got {type(spec).__name__}; see `cifar-ray models show seed-vgg --yaml`")
    return _normalize_list(spec, _prefix(source))


def compact(spec: list[dict]) -> list[dict]:
    """Canonical layers without the arguments that equal their defaults (for writing files)."""
    out = []
    for layer in spec:
        table = LAYERS[layer["type"]]
        short = {"type": layer["type"]}
        for key, value in layer.items():
            if key == "type" or table[key][1] == value:
                continue
            short[key] = compact(value) if table[key][0] == "layers" else value
        out.append(short)
    return out


def layer_text(layer: dict) -> str:
    """One short line for tables and messages, e.g. `conv 64 3x3 same bn relu`."""
    kind = layer["type"]
    if kind == "conv":
        k, s = layer["kernel"], layer["stride"]
        text = f"conv {layer['filters']} {k}x{k}{f'/{s}' if s > 1 else ''} {layer['padding']}"
        if layer["groups"] > 1:
            text += f" g{layer['groups']}"
    elif kind in ("maxpool", "avgpool"):
        k, s = layer["size"], layer["stride"] or layer["size"]
        text = f"{kind} {k}x{k}{f'/{s}' if s != k else ''}"
    elif kind == "dense":
        text = f"dense {layer['units']}"
    elif kind == "dropout":
        text = f"dropout {layer['rate']:g}"
    elif kind == "classifier":
        text = f"classifier -> {layer['units']} logits"
    elif kind == "whiten":
        text = f"whiten {layer['kernel']}x{layer['kernel']} (frozen)"
    elif kind == "mul":
        text = f"mul {layer['factor']:g}"
    elif kind == "batchnorm" and not layer.get("scale", True):
        text = "batchnorm (shift only)"
    else:
        text = kind
    if layer.get("batchnorm") is True:
        text += " bn"
    if "activation" in layer and layer["activation"] != "identity":
        text += f" {layer['activation']}"
    return text


# ---------------------------------------------------------------- the builder

class Residual(nn.Module):
    """act(body(x) + shortcut(x))."""

    def __init__(self, body: nn.Module, shortcut: nn.Module, act: nn.Module):
        super().__init__()
        self.body, self.shortcut, self.act = body, shortcut, act

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class Whiten(nn.Module):
    """Patch whitening: a kxk conv whose filters are the eigenvectors of the training data's
    patch covariance, each divided by the square root of its eigenvalue (+ eps), and each
    also negated (2*C*k*k filters: the activation after it is not odd, so both signs matter).
    Its outputs start decorrelated with unit variance, which the first layers would otherwise
    spend many steps learning. The filters are a buffer (never trained); the bias trains.

    Until `init_from_data` sees images the filters are a plain conv's random init."""

    def __init__(self, channels: int, kernel: int, eps: float):
        super().__init__()
        self.eps = eps
        weight = torch.empty(2 * channels * kernel * kernel, channels, kernel, kernel)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        self.register_buffer("weight", weight)
        self.bias = nn.Parameter(torch.zeros(len(weight)))

    def forward(self, x):
        # Bias added apart: autograd then needs no convolution backward at all (the input
        # and the filters take no gradient), only a sum for the bias.
        return F.conv2d(x, self.weight) + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Set the filters from a batch of (normalized) images x (N,C,H,W)."""
        c, k = x.shape[1], self.weight.shape[-1]
        # Every kxk patch as a row of C*k*k values, in the conv weight's (C, k, k) order.
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # N,C,H',W',k,k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        cov = (patches.T @ patches / len(patches)).double().cpu()
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending; columns are vectors
        filters = (eigenvectors / (eigenvalues + self.eps).sqrt()).T.flip(0)  # largest first
        filters = filters.reshape(-1, c, k, k).to(self.weight)
        self.weight.copy_(torch.cat([filters, -filters]))


class ShiftBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with its scale fixed at 1: only the shift is learned (2-D or 4-D input).

    The scale stays in the state dict as a buffer of ones (never trained, not counted as a
    parameter): the batch-norm kernels then run their usual path, whose backward computes
    no gradient for it (a shift with no scale at all has no CUDA backward)."""

    def __init__(self, num_features: int, eps: float, momentum: float):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        ones = self.weight.detach()
        del self.weight
        self.register_buffer("weight", ones)

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()}-D")


class Mul(nn.Module):
    """Multiply by a constant."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def has_batchnorm(layers: list[dict]) -> bool:
    """Whether a canonical spec normalises anywhere (a batchnorm layer or flag, residuals too)."""
    return any(l["type"] == "batchnorm" or l.get("batchnorm") is True
               or (l["type"] == "residual" and has_batchnorm(l["body"])) for l in layers)


def _row(index, layer: dict, shape, module: nn.Module, macs: int) -> dict:
    args = {k: v for k, v in layer.items() if k not in ("type", "body")}
    return {"index": index, "type": layer["type"], "args": args, "out_shape": list(shape),
            "params": _count(module), "macs": macs}


def _check_size(label: str, params: int, out: Sequence[int]) -> None:
    """Refuse a layer beyond the limits, before its module (and weights) exist."""
    if params > MAX_PARAMS:
        raise UserError(f"{label}: {params:,} parameters, more than the {MAX_PARAMS:,} a model "
                        "may have; use fewer filters or units")
    values = math.prod(out)
    if values > MAX_VALUES:
        raise UserError(f"{label}: output {_fmt(out)} is {values:,} values per image, more than "
                        f"{MAX_VALUES:,}; use fewer filters or pool earlier")


def _map(shape, label: str) -> tuple[int, int, int]:
    """The input of a layer that needs a feature map, or a UserError naming it."""
    if len(shape) != 3:
        raise UserError(f"{label}: needs a CxHxW feature map, but its input is a flat vector "
                        f"of {shape[0]}; move it before flatten/gap/dense")
    return shape


# ---- one builder per layer type (BUILDERS below): a canonical layer at an input shape ->
# (modules, output shape, MACs per image). The layer's batchnorm flag and activation are
# appended after them by `_build_layer`.

def _conv(layer: dict, shape, label: str):
    c, h, w = _map(shape, label)
    k, s, g = layer["kernel"], layer["stride"], layer["groups"]
    if c % g or layer["filters"] % g:
        raise UserError(f"{label}: groups {g} must divide the input channels ({c}) and filters "
                        f"({layer['filters']})")
    pad = k // 2 if layer["padding"] == "same" else 0  # odd kernel: gives ceil(H / stride)
    out = (layer["filters"], (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1)
    _check_size(label, layer["filters"] * (c // g) * k * k + layer["filters"] * layer["bias"], out)
    conv = nn.Conv2d(c, layer["filters"], k, s, pad, groups=g, bias=layer["bias"])
    if layer.get("dirac"):  # the first min(in, out) filters pass their input channel through
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:min(c, layer["filters"])])
    return [conv], out, out[0] * out[1] * out[2] * (c // g) * k * k


def _pool(layer: dict, shape, label: str):
    c, h, w = _map(shape, label)
    k, s = layer["size"], layer["stride"] or layer["size"]
    pool = nn.MaxPool2d if layer["type"] == "maxpool" else nn.AvgPool2d
    return [pool(k, s)], (c, (h - k) // s + 1, (w - k) // s + 1), 0


def _whiten(layer: dict, shape, label: str):
    c, h, w = _map(shape, label)
    k = layer["kernel"]
    out = (2 * c * k * k, h - k + 1, w - k + 1)
    _check_size(label, out[0] * (c * k * k + 1), out)
    if min(out) < 1:
        return [], out, 0  # refused by the caller, naming the shapes
    return [Whiten(c, k, layer["eps"])], out, out[0] * out[1] * out[2] * c * k * k


def _batchnorm(layer: dict, shape, label: str):
    if layer["scale"]:
        bn = (nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d)(
            shape[0], eps=layer["eps"], momentum=layer["momentum"])
    else:  # gamma fixed at 1: only the shift beta is learned
        bn = ShiftBatchNorm(shape[0], eps=layer["eps"], momentum=layer["momentum"])
    return [bn], shape, 0


def _global_pool(layer: dict, shape, label: str):
    c, _, _ = _map(shape, label)
    pool = nn.AdaptiveAvgPool2d if layer["type"] == "gap" else nn.AdaptiveMaxPool2d
    return [pool(1), nn.Flatten()], (c,), 0


def _flatten(layer: dict, shape, label: str):  # a no-op on a vector, as Keras's Flatten
    if len(shape) != 3:
        return [], shape, 0
    return [nn.Flatten()], (shape[0] * shape[1] * shape[2],), 0


def _dense(layer: dict, shape, label: str):
    if len(shape) == 3:
        raise UserError(f"{label}: input is a {_fmt(shape)} feature map; put flatten or gap "
                        f"before dense")
    units = layer["units"]
    _check_size(label, shape[0] * units + units * layer["bias"], (units,))
    return [nn.Linear(shape[0], units, bias=layer["bias"])], (units,), shape[0] * units


# Layer type -> its builder. A new layer type: its arguments in LAYERS, a builder here.
# (residual, which holds layers of its own, is built by `_build_residual`.)
BUILDERS = {
    "conv": _conv,
    "maxpool": _pool,
    "avgpool": _pool,
    "whiten": _whiten,
    "batchnorm": _batchnorm,
    "mul": lambda layer, shape, label: ([Mul(layer["factor"])], shape, 0),
    "act": lambda layer, shape, label: ([], shape, 0),  # the activation alone, appended below
    "dropout": lambda layer, shape, label: ([nn.Dropout(layer["rate"])], shape, 0),
    "gap": _global_pool,
    "gmp": _global_pool,
    "flatten": _flatten,
    "dense": _dense,
}


def _build_layer(layer: dict, shape: tuple, at: str):
    """One canonical layer at input `shape` -> (module, output shape, MACs, extra row keys).

    `at` names it in messages (`model x: layer 5.1`)."""
    label = f"{at} ({layer_text(layer)})"
    if layer["type"] == "residual":
        return _build_residual(layer, shape, at, label)
    parts, out, macs = BUILDERS[layer["type"]](layer, shape, label)
    if min(out) < 1:
        raise UserError(f"{label}: input {_fmt(shape)} gives {_fmt(max(0, d) for d in out[1:])}; "
                        f"use padding: same or fewer pools")
    if layer.get("batchnorm"):
        parts.append((nn.BatchNorm2d if len(out) == 3 else nn.BatchNorm1d)(out[0]))
    if "activation" in layer and layer["activation"] != "identity":
        parts.append(make_activation(layer["activation"]))  # after BN, when there is one
    module = parts[0] if len(parts) == 1 else nn.Sequential(*parts)
    return module, out, macs, {}


def _build_residual(layer: dict, shape: tuple, at: str, label: str):
    body, out, rows = _build_list(layer["body"], _map(shape, label), f"{at}.")
    if len(out) != 3:
        raise UserError(f"{label}: its body must end with a CxHxW feature map, got a flat "
                        f"vector of {out[0]}; remove flatten/gap/dense from the body")
    shortcut, sc_row = nn.Identity(), None
    if out != shape:
        # A 1x1 conv with stride s gives ceil(H / s): it matches a body of strided
        # same-padded convs (ceil(ceil(H / a) / b) = ceil(H / ab)), not a valid-padded one.
        stride = next((s for s in range(1, shape[1] + 1)
                       if (-(-shape[1] // s), -(-shape[2] // s)) == out[1:]), None)
        if stride is None:
            raise UserError(f"{label}: its body maps {_fmt(shape)} to {_fmt(out)}, which no "
                            f"strided 1x1 shortcut can match; use padding: same in the body")
        bn = has_batchnorm(layer["body"])
        sc = {"type": "conv", "filters": out[0], "kernel": 1, "stride": stride,
              "padding": "valid", "groups": 1, "bias": not bn, "batchnorm": bn,
              "activation": "identity"}
        shortcut, sc_out, sc_macs, _ = _build_layer(sc, shape, f"{at} shortcut")
        sc_row = _row("shortcut", sc, sc_out, shortcut, sc_macs)
    module = Residual(body, shortcut, make_activation(layer["activation"]))
    macs = sum(r["macs"] for r in rows) + (sc_row["macs"] if sc_row else 0)
    return module, out, macs, {"body": rows, "shortcut": sc_row}


def _build_list(layers: list[dict], shape: tuple, prefix: str):
    modules, rows = [], []
    for i, layer in enumerate(layers):
        module, shape, macs, extra = _build_layer(layer, shape, f"{prefix}{i}")
        modules.append(module)
        rows.append({**_row(i, layer, shape, module, macs), **extra})
    return nn.Sequential(*modules), shape, rows


def build(spec: Any, num_classes: int = 10, in_shape: Sequence[int] = IN_SHAPE,
          source: str | None = None) -> tuple[nn.Sequential, list[dict]]:
    """Spec -> (module producing logits, one summary row per layer + the classifier).

    Every row: {index, type, args, out_shape, params, macs}; a residual row adds `body`
    (rows of its layers) and `shortcut` (a row, or None for the identity)."""
    if not is_int(num_classes) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    layers = parse_spec(spec, source)
    body, shape, rows = _build_list(layers, tuple(in_shape), _prefix(source))
    modules = list(body)
    if len(shape) == 3:  # the classifier takes a vector, as after Keras's Flatten
        flat = (shape[0] * shape[1] * shape[2],)
        modules.append(nn.Flatten())
        rows.append(_row(len(rows), {"type": "flatten"}, flat, modules[-1], 0))
        shape = flat
    _check_size(f"{_prefix(source)}{len(rows)} (classifier -> {num_classes} logits)",
                (shape[0] + 1) * num_classes, (num_classes,))
    modules.append(nn.Linear(shape[0], num_classes))
    rows.append(_row(len(rows), {"type": "classifier", "units": num_classes}, (num_classes,),
                     modules[-1], shape[0] * num_classes))
    total = sum(r["params"] for r in rows)
    if total > MAX_PARAMS:
        big = max(rows, key=lambda r: r["params"])
        raise UserError(f"{source or 'spec'}: {total:,} parameters, more than the "
                        f"{MAX_PARAMS:,} a model may have (layer {big['index']} holds "
                        f"{big['params']:,}); use fewer filters or units")
    return nn.Sequential(*modules), rows


def build_module(spec: Any, num_classes: int = 10, in_shape: Sequence[int] = IN_SHAPE,
                source: str | None = None) -> nn.Sequential:
    """Spec -> `nn.Sequential` whose output is (batch, num_classes) logits."""
    summarize(spec, num_classes, in_shape, source)  # sizes checked before any weight exists
    return build(spec, num_classes, in_shape, source)[0]


def summarize(spec: Any, num_classes: int = 10, in_shape: Sequence[int] = IN_SHAPE,
              source: str | None = None) -> dict:
    """{params, macs, layers} per image, without allocating weights (meta device).

    MACs count conv (Cout*Hout*Wout*Cin*k*k/groups) and dense/classifier (in*out)
    multiply-accumulates; BN, pooling, activations and the residual add count 0."""
    with torch.device("meta"):
        _, rows = build(spec, num_classes, in_shape, source)
    return {"params": sum(r["params"] for r in rows), "macs": sum(r["macs"] for r in rows),
            "layers": rows}


# ---------------------------------------------------------------- files

def load_spec(path: str | os.PathLike) -> list[dict]:
    """Read and check a layer-spec YAML file; returns the canonical, defaults-filled list."""
    from cifar_ray.config import read_yaml  # the one place YAML read errors are worded

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such spec file")
    return parse_spec(read_yaml(path, "spec"), str(path))


def dump_spec(spec: Any, path: str | os.PathLike) -> None:
    """Write a spec as YAML in canonical form, defaults left out (atomic)."""
    from cifar_ray.fsutil import atomic_write

    atomic_write(path, spec_yaml(spec))


def spec_yaml(spec: Any) -> str:
    text = yaml.safe_dump(compact(parse_spec(spec)), sort_keys=False, default_flow_style=None)
    return "# cifar-ray layer spec; inspect with: cifar-ray models show THIS_FILE\n" + text
