"""The model registry: named models are functions from keyword parameters to a layer spec.

    @register("seed-vgg", description="...")
    def seed_vgg(activation="relu"): return [...]

    create_model("seed-vgg", num_classes=10, activation="leaky_relu")
    create_model("my-net.yaml")          # a layer-spec file works wherever a name does

A model's parameters are its function's keyword arguments: overrides are checked against
that signature (unknown names are refused, listing the valid ones) and against the type of
each default, so `--set depth=abc` fails before anything is built.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from cifar_ray import values
from cifar_ray.errors import UserError, shown
from cifar_ray.models.spec import build_module, has_batchnorm, load_spec, parse_spec, summarize

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., list]
    description: str

    def params(self) -> dict[str, Any]:
        """Parameter name -> default."""
        return {k: p.default for k, p in inspect.signature(self.fn).parameters.items()}


_REGISTRY: dict[str, Entry] = {}


def register(name: str, description: str | None = None):
    """Decorator: register `fn(**params) -> spec` under `name` (description: its docstring's
    first line unless given)."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        for pname, p in inspect.signature(fn).parameters.items():
            if p.default is inspect.Parameter.empty:  # `models show NAME` must work bare
                raise ValueError(f"model {name!r}: parameter {pname!r} needs a default")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Entry(name, fn, description or (doc[0] if doc else ""))
        return fn
    return deco


def _entries() -> dict[str, Entry]:
    from cifar_ray.models import zoo  # noqa: F401  (importing it registers the named models)

    return _REGISTRY


def list_models() -> list[str]:
    """Registered names, in registration order (the seed's nets first)."""
    return list(_entries())


def get_entry(name: str) -> Entry:
    entries = _entries()
    if name not in entries:
        raise UserError(f"unknown model {shown(name)}; registered: {', '.join(entries)} "
                        f"(or give the path of a layer-spec .yaml file)")
    return entries[name]


def _check_override(entry: Entry, key: str, value: Any) -> Any:
    params = entry.params()
    if key not in params:
        valid = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "none"
        raise UserError(f"model {entry.name}: unknown parameter {shown(key)}; valid parameters: {valid}")
    default = params[key]
    tp = type(default)

    def bad(what: str) -> UserError:
        return UserError(f"model {entry.name}: parameter {key} must be {what} "
                         f"(default {default!r}), got {shown(value)}")

    if tp in values.TYPES:
        return values.typed(tp, value, bad)
    if default is not None and not isinstance(value, tp):
        raise bad(f"of type {tp.__name__}")
    return value


@dataclass(frozen=True)
class Resolved:
    name: str
    description: str
    spec: list  # canonical layers, defaults filled in
    source: str  # prefix for messages: "model cnn" or the file path


def lookup(name_or_path: str | Path | list, **overrides) -> Resolved:
    """A registered name (with overrides), a spec file (an existing file wins) or a spec's
    layers themselves (a list, as a run's config carries them: `model.spec`) -> its spec."""
    if isinstance(name_or_path, list):
        if overrides:
            raise UserError(f"model.spec: a layer spec takes no parameters (got "
                            f"{', '.join(overrides)}); edit the layers instead")
        return Resolved("layer spec", "layer spec", parse_spec(name_or_path, "model.spec"),
                        "model.spec")
    text = str(name_or_path)
    if Path(text).is_file():
        if overrides:
            raise UserError(f"{text}: a layer-spec file takes no parameters (got "
                            f"{', '.join(overrides)}); edit the file instead")
        return Resolved(text, f"layer spec {Path(text).name}", load_spec(text), text)
    if text.endswith(SPEC_SUFFIXES):
        raise UserError(f"{text}: no such spec file")
    entry = get_entry(text)
    kwargs = {k: _check_override(entry, k, v) for k, v in overrides.items()}
    source = f"model {entry.name}"
    return Resolved(entry.name, entry.description, parse_spec(entry.fn(**kwargs), source), source)


# The config's defaults (SGD, lr 0.05, one-cycle) train nets with BatchNorm. Nets without it
# stay at chance under them on real CIFAR-10 images (train loss 2.303 for every epoch): too
# large a step for an unnormalised net. Adam at the seed's own 1e-3 trains every one of them
# (BENCHMARKS.md, "Recipes"), so a net without BatchNorm starts from this recipe instead.
NO_NORM_RECIPE = {"optim.name": "adamw", "optim.lr": 0.001}


def default_recipe(name_or_path: str | Path, **overrides) -> dict:
    """Config keys (dotted) that this model trains with unless the config sets them: {} for
    nets with BatchNorm, NO_NORM_RECIPE for nets without (a spec file too)."""
    return {} if has_batchnorm(lookup(name_or_path, **overrides).spec) else dict(NO_NORM_RECIPE)


def get_spec(name_or_path: str | Path | list, **overrides) -> list[dict]:
    """The canonical layer spec of a model or spec file (e.g. to save and edit)."""
    return lookup(name_or_path, **overrides).spec


def create_model(name_or_path: str | Path | list, num_classes: int = 10, **overrides) -> nn.Module:
    """Build a model (a registered name or a spec-file path); its output is logits."""
    r = lookup(name_or_path, **overrides)
    return build_module(r.spec, num_classes, source=r.source)


def model_info(name_or_path: str | Path | list, num_classes: int = 10, **overrides) -> dict:
    """{name, description, params, macs, layers}: per-layer output shape, params and MACs
    per image (see `spec.summarize`), computed without allocating weights."""
    r = lookup(name_or_path, **overrides)
    return {"name": r.name, "description": r.description,
            **summarize(r.spec, num_classes, source=r.source)}
