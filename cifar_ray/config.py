"""The typed config: the one contract between the CLI, the engine, Ray Train and Ray Tune.

One frozen dataclass tree. Every field has a default and a comment with its unit. A config
is built from defaults, then a YAML file (`--config`), then dotted overrides (`--set
key.sub=value`), and every step is checked against each field's declaration (its type, a
Literal's choices, a `ranged` field's range; values.py's rules for numbers): an unknown key,
a wrong type or a value out of range is refused, naming the key. `dump_yaml` and
`load_config` round-trip.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cifar_ray import values
from cifar_ray.errors import UserError, quote, shown
from cifar_ray.fsutil import atomic_write, refuse_special

PRESET_DIR = Path(__file__).parent / "presets"


# Upper bounds that only refuse the absurd: a run of 10**12 epochs never ends. Seeds stay in
# [0, 2**32), which every numpy and torch generator takes (numpy refuses negative ones).
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1


def ranged(default, low, high=None, *, below=None):
    """A numeric setting's default and its range, checked with its type: `low <= value`,
    and `value <= high` or `value < below` where given."""
    top = (high, True) if below is None else (below, False)
    return field(default=default, metadata={"range": (low, *top)})


# Each setting is one line: its type (a Literal lists a string's choices), its default
# (with `ranged`, its range too) and a comment with its unit.

@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # any SOURCE of `cifar-ray data prepare` (name, path, archive)
    val_fraction: float = ranged(0.1, 0.0, below=1.0)  # share of each train class held out to validate
    limit: int = ranged(0, 0)  # train on a stratified subset of this many images (0 = all)
    split_seed: int = ranged(0, 0, MAX_SEED)  # seed of the train/val split and the --limit subset


@dataclass(frozen=True)
class ModelConfig:
    name: str = "seed-vgg-bn"  # a registered model name or a path to a layer-spec YAML file
    args: dict = field(default_factory=dict)  # keyword overrides for the model family
    # The layers of the spec file `name` names, read by the driver: every worker builds the
    # model from these, on any node, whether or not the file is there.
    spec: list = field(default_factory=list)  # layer dicts (empty for a registered name)


@dataclass(frozen=True)
class AugConfig:
    crop_pad: int = ranged(4, 0, 16)  # random crop after padding by this many pixels (0 = off)
    pad_mode: Literal["reflect", "zeros"] = "reflect"  # how the crop padding is filled
    hflip: Literal["random", "alternate", "none"] = "random"  # alternate: every other epoch per image
    vflip: bool = False  # random vertical flip
    rotate: float = ranged(0.0, 0.0, 180.0)  # random rotation in [-rotate, +rotate] degrees (0 = off)
    rotate_fill: Literal["black", "reflect", "crop"] = "black"  # crop: zoom in, no corner empty
    cutout: int = ranged(0, 0, 32)  # side of a random square set to zero, pixels (0 = off)


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # the optimiser
    lr: float = ranged(0.05, 0.0)  # peak learning rate at the global batch size below
    momentum: float = ranged(0.9, 0.0, below=1.0)  # SGD momentum / AdamW beta1
    nesterov: bool = True  # Nesterov momentum (sgd only)
    weight_decay: float = ranged(5e-4, 0.0)  # L2 weight decay (decoupled for adamw)
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"  # of the lr, per step
    warmup_epochs: float = ranged(1.0, 0.0, MAX_EPOCHS)  # linear warmup (onecycle: its rise), epochs
    step_every: int = ranged(10, 1)  # step schedule: lr times step_gamma every this many epochs
    step_gamma: float = ranged(0.1, 0.0, 1.0)  # step schedule factor
    label_smoothing: float = ranged(0.0, 0.0, below=1.0)  # cross-entropy label smoothing
    grad_clip: float = ranged(0.0, 0.0)  # clip the global gradient norm to this (0 = off)
    ema_decay: float = ranged(0.0, 0.0, below=1.0)  # moving average of the weights per step (0 = off)
    # Decoupled units (airbench's; sgd only): lr is the step per 1024 images with momentum's
    # gain 1 + 1/(1 - momentum) divided out, weight_decay the shrink per 1024 images whatever
    # the lr; every parameter decays. Then batch size, momentum, lr and weight_decay can be
    # tuned one at a time. Off: lr and weight_decay are PyTorch's own.
    decoupled: bool = False  # use the decoupled units above (sgd only)
    norm_lr_scale: float = ranged(1.0, 0.0)  # lr multiplier for BatchNorm parameters (not decay)
    lookahead_every: int = ranged(0, 0)  # pull the weights to a slow copy every this many steps (0 = off)
    lookahead_decay: float = ranged(0.774, 0.0, 1.0)  # the slow copy's decay at the end; grows as progress**3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = ranged(10, 1, MAX_EPOCHS)  # passes over the training split
    batch_size: int = ranged(256, 1)  # GLOBAL batch, images per step summed over all workers
    eval_batch_size: int = ranged(1024, 1)  # images per evaluation batch, per worker
    seed: int = ranged(0, 0, MAX_SEED)  # seed of init, per-epoch permutation and augmentation
    # auto: bf16 where supported, else fp16 on GPU, else fp32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # autocast dtype
    channels_last: bool = True  # NHWC memory format (faster convs on CPU and GPU)
    compile: bool = False  # torch.compile the model
    tta: bool = False  # evaluate with test-time augmentation (flip + 1-pixel shifts)
    fail_on_nan: bool = True  # stop with a clear error when the loss becomes NaN/inf


@dataclass(frozen=True)
class ScaleConfig:
    workers: int = ranged(1, 1)  # DDP workers (Ray Train)
    gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = ranged(0, 0)  # CPUs reserved per worker (0 = all CPUs / workers, >= 1)
    max_failures: int = ranged(2, 0)  # restarts from the last checkpoint after a worker dies
    placement: Literal["PACK", "STRICT_PACK", "SPREAD"] = "PACK"  # STRICT_PACK: all on one node


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)


# ---------------------------------------------------------------- keys and types

def _fields(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Field name -> (its type, the field)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. `optim.lr`."""
    keys = []
    for name, (tp, _) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def closest_key(key: str) -> str | None:
    match = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    return match[0] if match else None


def _unknown_key(key: str, where: str) -> UserError:
    hint = closest_key(key)
    did = f" (did you mean {hint!r}?)" if hint else ""
    return UserError(
        f"{where}: unknown config key {key!r}{did}; valid keys: {', '.join(valid_keys())}"
    )


def _check_value(key: str, tp: Any, f: dataclasses.Field, value: Any, where: str) -> Any:
    """Return `value` checked against field `f` of type `tp`, or raise a UserError naming `key`."""
    def bad(what: str) -> UserError:
        return UserError(f"{where}: {key} must be {what}, got {shown(value)}")

    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if not isinstance(value, str) or value not in choices:
            raise bad("one of " + " | ".join(choices))
    elif tp in values.TYPES:
        value = values.typed(tp, value, bad)
        if tp is str and not value.strip():
            raise bad("a non-empty string")
    elif tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of names to values")
        return dict(value)
    elif tp is list:
        if not isinstance(value, list):
            raise bad("a list")
        return list(value)
    if "range" in f.metadata:
        lo, hi, hi_inclusive = f.metadata["range"]
        if value < lo or (hi is not None and (value > hi if hi_inclusive else value >= hi)):
            upper = "" if hi is None else (f" and <= {hi}" if hi_inclusive else f" and < {hi}")
            raise bad(f">= {lo}{upper}")
    return value


def _build(cls, data: Any, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        name = prefix.rstrip(".") or "the config"
        raise UserError(f"{where}: {name} must be a mapping of keys to values, got {shown(data)}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(dotted, where)
        tp, f = fields[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where, dotted + ".")
        else:
            kwargs[key] = _check_value(dotted, tp, f, value, where)
    return cls(**kwargs)


# ---------------------------------------------------------------- public API

def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, where: str = "config") -> Config:
    """Build a Config from a (possibly partial) nested dict; missing keys take defaults."""
    return _build(Config, data if data is not None else {}, where)


def merge(base: dict, update: dict) -> dict:
    """Nested dict update; returns a new dict. `model.args` merges key by key too."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """Return a copy of nested `data` with `key` (dotted) set to `value`."""
    head, _, rest = key.partition(".")
    out = dict(data)
    out[head] = set_dotted(out.get(head) or {}, rest, value) if rest else value
    return out


def check_override_key(key: str, where: str) -> None:
    """Refuse a dotted key that names no config field (model.args.* is open)."""
    if key.startswith("model.args.") and len(key) > len("model.args."):
        return
    if key not in valid_keys():
        section = [k for k in valid_keys() if k.startswith(key + ".")]
        if section:
            raise UserError(f"{where}: {key} is a section; set one of its keys: {', '.join(section)}")
        raise _unknown_key(key, where)


def set_flag(item: str) -> str:
    """`--set ITEM` for messages, on one line whatever ITEM holds."""
    return f"--set {item}" if item.isprintable() else f"--set {item!r}"


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, value); the value is read as YAML (1e-3, true, [1, 2])."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
    check_override_key(key, set_flag(item))
    return key, yaml_value(raw, set_flag(item))


class _Meaning(yaml.YAMLError):
    """YAML that parses but would not mean what was written (see _Loader)."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it would silently change: a key given twice in
    one mapping (PyYAML keeps the last) and a number that rounds to 0 or to infinity."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if duplicate:
                raise _Meaning(f"the key {shown(key)} is given twice (a later one would silently "
                               "win)", key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_yaml_float(self, node):
        number = super().construct_yaml_float(node)
        if values.rounds_away(node.value.replace("_", ""), number):
            raise _Meaning(f"the number {node.value} rounds to {number} as a float",
                           node.start_mark)
        return number


_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


def yaml_value(raw: str, where: str) -> Any:
    """A --set value read as YAML (1e-3, true, [1, 2]); text that is not YAML stays text."""
    try:
        return yaml.load(raw, _Loader) if raw.strip() else ""
    except RecursionError:  # PyYAML recurses once per nesting level
        raise UserError(f"{where}: the value is nested too deeply; give a plain value") from None
    except _Meaning as e:
        raise UserError(f"{where}: {e.problem}; write what you mean") from None
    except Exception:  # YAMLError, or a constructor's own (e.g. the date 2024-13-45)
        return raw


def read_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a YAML file (a path or a URI: see storage.py) or raise a UserError naming it."""
    from cifar_ray import storage

    try:
        if storage.is_uri(path):
            text = storage.read_bytes(storage.locate(path), "").decode()
        else:
            refuse_special(path)
            text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: cannot read {what}: not a UTF-8 text file; give a YAML file") from None
    try:
        return yaml.load(text, _Loader)
    except _Meaning as e:
        raise UserError(f"{path}: {e.problem} at line {e.problem_mark.line + 1}; fix the file"
                        ) from None
    except yaml.constructor.ConstructorError as e:  # e.g. !!python/object: plain data only
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(e.problem or "a value YAML cannot build").split())
        raise UserError(f"{path}: {problem}{at}; "
                        "a cifar-ray file holds plain data only") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{at}; fix the file") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise UserError(f"{path}: {what} nested too deeply to read; fix the file") from None
    except Exception as e:  # a constructor's own error, e.g. the date 2024-13-45
        reason = quote(e, 100)
        raise UserError(f"{path}: a value YAML cannot build ({reason}); fix the file") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_path(name_or_path: str) -> Path | str:
    """A preset name (e.g. `speed-cpu`), a path to a YAML config file, or its URI."""
    from cifar_ray import storage

    if storage.is_uri(name_or_path):
        return name_or_path
    p = Path(name_or_path)
    refuse_special(p)
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and preset.is_file():
        return preset
    presets = ", ".join(preset_names()) or "none"
    raise UserError(f"--config {name_or_path}: no such file or preset (presets: {presets})")


def load_config(name_or_path: str | None = None, overrides: typing.Sequence[str] = (),
                base: dict | None = None) -> Config:
    """Defaults <- `base` dict <- YAML file or preset <- `--set` overrides, all checked."""
    data = dict(base or {})
    if name_or_path:
        path = config_path(name_or_path)
        loaded = read_yaml(path, "config")
        if loaded is None:
            loaded = {}
        from_dict(loaded, str(path))  # check the file on its own first: errors name it
        data = merge(data, loaded)
    parsed = [(item, *parse_override(item)) for item in overrides]
    for item, key, value in sorted(parsed, key=lambda p: p[1] != "model.name"):  # see apply
        data = apply(data, {key: value})
        from_dict(data, set_flag(item))
    from_dict(data)
    return from_dict(with_model_recipe(data))


def with_model_recipe(data: dict) -> dict:
    """Config data over its model's default recipe (`models.default_recipe`): a net that the
    defaults cannot train (no BatchNorm) gets keys it can train with, each unless `data`
    sets it. Check `data` first: a model that cannot be built gets no recipe here and is
    refused where it is built, with that place's message."""
    from cifar_ray.models import default_recipe

    model = data.get("model") or {}
    # A run's config carries a spec file's layers (model.spec): judge those, file or no file.
    what = model.get("spec") or model.get("name", ModelConfig.name)
    try:
        recipe = default_recipe(what, **(model.get("args") or {}))
    except UserError:
        return data
    under: dict = {}
    for key, value in recipe.items():
        under = set_dotted(under, key, value)
    return merge(under, data)


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy of `cfg` with dotted keys (given with `__` for `.`) replaced, checked."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        data = set_dotted(data, key.replace("__", "."), value)
    return from_dict(data)


def apply(data: dict, overrides: dict) -> dict:
    """Nested config data with dotted overrides (`--set`, flags, a sweep's keys), model.name
    first. The one rule for a model that changes: a new model.name starts with empty
    model.args and no model.spec (the old model's arguments and layers are not the new
    one's); args given with it apply after."""
    for key in sorted(overrides, key=lambda k: k != "model.name"):
        value = overrides[key]
        if key == "model.name" and value != (data.get("model") or {}).get("name"):
            data = set_dotted(set_dotted(data, "model.args", {}), "model.spec", [])
        data = set_dotted(data, key, value)
    return data


def portable(cfg: Config) -> Config:
    """`cfg` runnable on any node: spec-file and data paths made absolute, and a spec file's
    layers read into `model.spec`, so that workers build the model from the config they are
    sent whether their node has the file or not (and a config whose file is gone still has
    them). A registered model never keeps a spec file's layers."""
    from cifar_ray.models import get_spec, list_models

    changes: dict = {}
    if Path(cfg.model.name).is_file():
        changes["model__name"] = str(Path(cfg.model.name).resolve())
        changes["model__spec"] = get_spec(cfg.model.name, **cfg.model.args)
    elif cfg.model.name in list_models() and cfg.model.spec:
        changes["model__spec"] = []
    if Path(cfg.data.source).exists():
        changes["data__source"] = str(Path(cfg.data.source).resolve())
    return replace(cfg, **changes) if changes else cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write(path, dump_yaml(cfg))
