"""Ablation spaces: a YAML file that says what a sweep varies, checked against the config
before any trial starts. No Ray imports (tune.py turns a Space into Tune's param_space).

    description: one line shown by `cifar-ray tune --list-spaces`
    base:                      # any config, nested as in a --config file
      model: {name: cnn, args: {depth: 3}}
      train: {epochs: 10}
    grid:                      # every combination of these values
      model.args.depth: [2, 3, 4]
    choice:                    # one value drawn per sample
      model.args.activation: [relu, gelu]
    uniform:    {optim.lr: [0.01, 0.2]}           # [low, high]
    loguniform: {optim.weight_decay: [1.0e-5, 1.0e-3]}   # [low, high], low > 0
    randint:    {model.args.filters: [16, 65]}    # integers in [low, high)
    variants:                  # named sets of overrides (each crossed with the grid)
      - {name: wide, set: {model.args.width: 2.0}, note: "why", reference: 0.41}
    sweep: {samples: 8, seeds: 1, max_epochs: 10, grace: 1, reduction: 3, search: random}

`search: random` (the default) draws the distributions up front, every trial known before any
starts; `search: optuna` lets Optuna's TPE propose each trial from the results so far
(tune.py): it needs distributions only (no grid, no variants), `samples` is its trial count.

Keys are dotted config keys (`cifar-ray train --set` syntax). A variant or value that sets
`model.name` to another model starts that model's `model.args` empty: the base's args
belong to the base's model. The dataset (`data.*`), the resources (`scale.*`) and the time
budget (`train.epochs`, see --max-epochs) are the sweep's, not a trial's: they cannot vary.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cifar_ray import config
from cifar_ray.errors import UserError, shown
from cifar_ray.values import finite_number, is_finite, is_int, typed

SPACE_DIR = Path(__file__).parent / "spaces"
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
TOP_KEYS = ("description", "base", "grid", *DISTRIBUTIONS, "variants", "sweep")
VARIANT_KEYS = ("name", "set", "note", "reference")
MAX_TRIALS = 10_000  # trials of one sweep: the list is built (and every trial checked) first
SEARCHES = ("random", "optuna")


@dataclass(frozen=True)
class Settings:
    """How a sweep runs (the `cifar-ray tune` options); a space's `sweep:` gives defaults."""
    samples: int = 1  # draws from the distributions (each crossed with variants x grid x seeds)
    seeds: int = 1  # seeds per configuration: train.seed = base seed, +1, ...
    max_epochs: int = 0  # epochs of a trial that is never stopped (0 = base train.epochs)
    grace: int = 1  # ASHA: epochs before a trial may be stopped
    reduction: float = 3.0  # ASHA: keep the best 1/reduction at each rung
    concurrent: int = 0  # trials at once (0 = as many as the cluster holds)
    workers_per_trial: int = 1  # 1: the engine in the trial itself; >1: a TorchTrainer (DDP)
    gpus_per_trial: float = 0.0  # 1 worker: a GPU share (0.25 packs 4 on a GPU); >1: = workers
    cpus_per_trial: float = 1.0  # CPUs of a trial's workers together
    search: str = "random"  # random: draws made up front; optuna: TPE proposes each trial


@dataclass(frozen=True)
class Variant:
    name: str
    set: dict  # dotted key -> value
    note: str = ""
    reference: float | None = None  # an accuracy observed elsewhere (e.g. the seed's notes)


@dataclass(frozen=True)
class Space:
    name: str
    source: str  # the file, for messages
    description: str = ""
    base: dict = field(default_factory=dict)  # nested config data (not yet defaulted)
    grid: dict = field(default_factory=dict)  # key -> list of values
    dists: dict = field(default_factory=dict)  # key -> (kind, list)
    variants: tuple = ()
    sweep: dict = field(default_factory=dict)  # defaults for Settings

    def swept_keys(self) -> list[str]:
        """Keys that take different values across trials (variants count as `variant`)."""
        return (["variant"] if self.variants else []) + list(self.grid) + list(self.dists)


# ---------------------------------------------------------------- finding and reading

def builtin_spaces() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPACE_DIR.glob("*.yaml"))}


def space_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    builtin = builtin_spaces()
    if name_or_path in builtin:
        return builtin[name_or_path]
    raise UserError(f"--space {name_or_path}: no such file or built-in space "
                    f"(built-in: {', '.join(builtin)}; see --list-spaces)")


def load_space(name_or_path: str) -> Space:
    path = space_path(name_or_path)
    data = config.read_yaml(path, "space")
    return parse(data, str(path), name=path.stem, folder=path.parent)


def _where(src: str, *parts) -> str:
    return src + ": " + ".".join(str(p) for p in parts)


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise UserError(f"{where}: keys must be dotted config keys, got {shown(key)}")
    config.check_override_key(key, where)
    fixed = key.startswith(("data.", "scale.")) or key == "train.epochs"
    if fixed:
        what = ("--max-epochs sets every trial's time budget" if key == "train.epochs" else
                "the dataset is shared by all trials; set it in base or with --data/--limit"
                if key.startswith("data.") else
                "resources are the sweep's: use --workers-per-trial/--cpus-per-trial/--gpus-per-trial")
        raise UserError(f"{where}: {key} cannot vary across trials ({what})")
    return key


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: must be a mapping of dotted keys to values, got {shown(value)}")
    return value


def _absolute_model(value: Any, folder: Path | None) -> Any:
    """A spec path relative to the working directory or to the space file, made absolute:
    Tune runs each trial in its own folder."""
    if not isinstance(value, str) or not value.endswith((".yaml", ".yml")):
        return value
    for root in (Path.cwd(), folder):
        if root is not None and (root / value).is_file():
            return str((root / value).resolve())
    return value


def parse(data: Any, source: str, name: str = "space", folder: Path | None = None) -> Space:
    """Read a space from YAML data; structure only (see `check` for the values)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a space must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise UserError(f"{source}: unknown key {shown(key)}; a space has {', '.join(TOP_KEYS)}")
    base = data.get("base") or {}
    config.from_dict(base, _where(source, "base"))  # unknown keys and types, named
    if isinstance(base.get("model"), dict) and "name" in base["model"]:
        base = config.merge(base, {"model": {"name": _absolute_model(base["model"]["name"], folder)}})

    grid = {}
    for key, values in _mapping(data.get("grid"), _where(source, "grid")).items():
        where = _where(source, "grid", key)
        _check_key(key, _where(source, "grid"))
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: must be a non-empty list of values, got {shown(values)}")
        grid[key] = [_absolute_model(v, folder) if key == "model.name" else v for v in values]

    dists = {}
    for kind in DISTRIBUTIONS:
        for key, spec in _mapping(data.get(kind), _where(source, kind)).items():
            _check_key(key, _where(source, kind))
            if key in grid or key in dists:
                raise UserError(f"{_where(source, kind, key)}: {key} is swept twice; "
                                "give each key one grid or distribution")
            dists[key] = (kind, _distribution(kind, spec, _where(source, kind, key)))

    variants = _variants(data.get("variants"), source, folder)
    for v in variants:
        for key in v.set:
            if key in grid or key in dists:
                raise UserError(f"{_where(source, 'variants', v.name)}: sets {key}, which is "
                                "also swept; vary a key either in variants or in a grid/distribution")

    sweep = _mapping(data.get("sweep"), _where(source, "sweep"))
    valid = [f.name for f in fields(Settings)]
    for key in sweep:
        if key not in valid:
            raise UserError(f"{_where(source, 'sweep', key)}: unknown option; valid: {', '.join(valid)}")
    if not (grid or dists or variants):
        raise UserError(f"{source}: sweeps nothing; add a grid, a distribution "
                        f"({', '.join(DISTRIBUTIONS)}) or variants")
    if not isinstance(data.get("description") or "", str):
        raise UserError(f"{source}: description must be one line of text, got "
                        f"{shown(data['description'])}")
    return Space(name=name, source=source, description=str(data.get("description") or ""),
                 base=base, grid=grid, dists=dists, variants=tuple(variants), sweep=dict(sweep))


def _distribution(kind: str, spec: Any, where: str) -> list:
    if kind == "choice":
        if not isinstance(spec, list) or not spec:
            raise UserError(f"{where}: must be a non-empty list of values, got {shown(spec)}")
        return spec

    def bad(_=None) -> UserError:
        return UserError(f"{where}: must be [low, high] (two numbers), got {shown(spec)}")

    if not (isinstance(spec, list) and len(spec) == 2):
        raise bad()
    low, high = (x if is_int(x) else finite_number(x, bad) for x in spec)  # ints as they are
    if not low < high:
        raise UserError(f"{where}: low must be < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: loguniform needs low > 0, got {low}")
    if kind == "randint" and not (is_int(low) and is_int(high)):
        raise UserError(f"{where}: randint needs integers [low, high) , got {shown(spec)}")
    if kind == "randint" and not -2**63 <= low < high <= 2**63 - 1:
        raise UserError(f"{where}: randint bounds must fit in 64 bits, got [{low}, {high}]")
    return [low, high]


def _variants(items: Any, source: str, folder: Path | None) -> list[Variant]:
    if items is None:
        return []
    if not isinstance(items, list) or not items:
        raise UserError(f"{source}: variants must be a non-empty list of "
                        "{name: ..., set: {key: value}, note: ..., reference: ...}")
    out, names = [], set()
    for i, item in enumerate(items):
        where = _where(source, "variants", i)
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise UserError(f"{where}: a variant is a mapping with a name, got {shown(item)}")
        where = _where(source, "variants", item["name"])
        for key in item:
            if key not in VARIANT_KEYS:
                raise UserError(f"{where}: unknown key {shown(key)}; a variant has {', '.join(VARIANT_KEYS)}")
        if item["name"] in names:
            raise UserError(f"{where}: the name is used twice; give each variant its own")
        names.add(item["name"])
        sets = {}
        for key, value in _mapping(item.get("set"), where + ".set").items():
            _check_key(key, where + ".set")
            sets[key] = _absolute_model(value, folder) if key == "model.name" else value
        if not isinstance(item.get("note") or "", str):
            raise UserError(f"{where}.note: must be text, got {shown(item['note'])}")
        ref = item.get("reference")
        if ref is not None and not (is_finite(ref) and 0 <= ref <= 1):
            raise UserError(f"{where}.reference: an accuracy in [0, 1], got {shown(ref)}")
        out.append(Variant(item["name"], sets, str(item.get("note") or ""), ref))
    return out


# ---------------------------------------------------------------- trials' configs

def sweep_overrides(settings: Settings, base: dict) -> dict:
    """What the sweep itself fixes in every trial's config."""
    return {"train.epochs": max_epochs(settings, base), "scale.workers": settings.workers_per_trial,
            "scale.gpu": settings.gpus_per_trial > 0}


def max_epochs(settings: Settings, base: dict) -> int:
    return settings.max_epochs or config.from_dict(base).train.epochs


def trial_config(space: Space, settings: Settings, params: dict, where: str = "trial") -> config.Config:
    """A trial's config from its Tune params: base <- variant <- swept keys <- sweep's own."""
    data = space.base
    if "variant" in params:
        data = config.apply(data, next(v for v in space.variants if v.name == params["variant"]).set)
    data = config.apply(data, {k: v for k, v in params.items() if k != "variant"})
    data = config.apply(data, sweep_overrides(settings, space.base))
    return config.from_dict(data, where)


def base_config(space: Space, settings: Settings, where: str) -> config.Config:
    """The sweep's base: the space's base with the sweep's own keys, over its model's default
    recipe (see config.with_model_recipe). Every trial starts from it, so the trials share
    the base's recipe unless the space varies it."""
    data = config.apply(space.base, sweep_overrides(settings, space.base))
    config.from_dict(data, where)
    return config.from_dict(config.with_model_recipe(data), where)


def resolve_settings(space: Space, flags: dict) -> Settings:
    """Settings from defaults <- the space's `sweep:` <- command-line flags (not None)."""
    values = {**space.sweep, **{k: v for k, v in flags.items() if v is not None}}
    out = Settings()
    for f in fields(Settings):
        if f.name in values:
            v = values[f.name]

            def bad(what: str) -> UserError:
                return UserError(f"--{f.name.replace('_', '-')}: must be {what}, got {shown(v)}")

            out = replace(out, **{f.name: typed(type(getattr(out, f.name)), v, bad)})
    if out.search not in SEARCHES:
        raise UserError(f"--search {shown(out.search)}: must be one of {', '.join(SEARCHES)}")
    return out


RESOURCE_STEP = 1e-4  # Ray's resource unit (ray._raylet.RESOURCE_UNIT_SCALING = 10,000)
MAX_RESOURCE = 1e12  # below Ray's own MAX_RESOURCE_QUANTITY


def check_settings(space: Space, s: Settings) -> None:
    """Refuse impossible option combinations (before Ray starts)."""
    epochs = max_epochs(s, space.base)
    for flag, value, low in (("--samples", s.samples, 1), ("--seeds", s.seeds, 1),
                             ("--max-epochs", epochs, 1), ("--grace", s.grace, 1),
                             ("--workers-per-trial", s.workers_per_trial, 1),
                             ("--concurrent", s.concurrent, 0), ("--gpus-per-trial", s.gpus_per_trial, 0),
                             ("--cpus-per-trial", s.cpus_per_trial, 0)):
        if value < low:  # (an int as is: a huge one has no float to format)
            raise UserError(f"{flag} {value if isinstance(value, int) else f'{value:g}'}: "
                            f"must be >= {low}")
    if s.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial {s.cpus_per_trial:g}: must be > 0")
    for flag, value in (("--cpus-per-trial", s.cpus_per_trial), ("--gpus-per-trial", s.gpus_per_trial)):
        steps = value / RESOURCE_STEP  # Ray refuses less than a step, and rounds the rest down
        if value > MAX_RESOURCE or abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
            raise UserError(f"{flag} {value!r}: Ray counts CPUs and GPUs in steps of "
                            f"{RESOURCE_STEP:g} (up to {MAX_RESOURCE:.0e}); give a multiple of "
                            f"{RESOURCE_STEP:g}")
    if epochs > config.MAX_EPOCHS:
        raise UserError(f"--max-epochs {epochs}: must be <= {config.MAX_EPOCHS}")
    if s.grace > epochs:
        raise UserError(f"--grace {s.grace} exceeds --max-epochs {epochs}: ASHA could never "
                        "stop a trial; use a grace <= max epochs")
    if s.reduction <= 1:
        raise UserError(f"--reduction {s.reduction:g}: must be > 1 (ASHA keeps 1/reduction per rung)")
    if s.seeds > 1 and ("train.seed" in space.grid or "train.seed" in space.dists
                        or any("train.seed" in v.set for v in space.variants)):
        raise UserError(f"{space.source}: sweeps train.seed and --seeds {s.seeds} asks for seeds "
                        "too; use one of them")
    w = s.workers_per_trial
    if w > 1 and s.gpus_per_trial not in (0, w):
        raise UserError(f"--gpus-per-trial {s.gpus_per_trial:g} with --workers-per-trial {w}: "
                        f"DDP workers take one whole GPU each; use --gpus-per-trial {w} or 0")
    if w == 1 and s.gpus_per_trial > 1:
        raise UserError(f"--gpus-per-trial {s.gpus_per_trial:g}: one worker uses one GPU; "
                        "use a share <= 1, or --workers-per-trial N for N GPUs")
    if w > 1 and s.cpus_per_trial < w:
        raise UserError(f"--cpus-per-trial {s.cpus_per_trial:g} is less than one CPU for each of "
                        f"{w} workers; use --cpus-per-trial {w} or more")
    if s.search == "optuna":
        _check_optuna(space, s)


# What Optuna's categorical distribution holds (TPE compares choices by value).
_SCALARS = (type(None), bool, int, float, str)


def _check_optuna(space: Space, s: Settings) -> None:
    """TPE proposes values from distributions, one trial at a time: no grid or variants
    (fixed lists to enumerate), no seed repeats, choices of plain values."""
    fixed = [f"grid key {k}" for k in space.grid] + [f"variant {v.name}" for v in space.variants]
    if fixed:
        raise UserError(f"{space.source}: --search optuna proposes values from distributions "
                        f"and cannot enumerate {', '.join(fixed)}; make them choice keys, or "
                        "use --search random")
    if s.seeds > 1:
        raise UserError(f"--seeds {s.seeds} with --search optuna: TPE proposes each configuration "
                        "once; use --search random to repeat configurations over seeds")
    for key, (kind, values) in space.dists.items():
        bad = [v for v in values if not isinstance(v, _SCALARS)] if kind == "choice" else []
        if bad:
            raise UserError(f"{space.source}: choice.{key}: --search optuna takes choices of "
                            f"numbers, words, true/false or null, got {shown(bad[0])}; use "
                            "--search random for lists and mappings")


def points(space: Space, settings: Settings) -> list[dict]:
    """Every trial's params (swept key -> value, `variant` for a variant), in run order:
    samples x variants x grid x seeds. Distributions are drawn here, from a generator seeded
    by the base seed, so a sampled configuration is the same for each of its seeds and a
    rerun draws the same samples."""
    import numpy as np

    first_seed = config.from_dict(space.base).train.seed
    rng = np.random.default_rng(first_seed)
    seeds = [first_seed + i for i in range(settings.seeds)]
    names = [{"variant": v.name} for v in space.variants] or [{}]
    grid = [dict(zip(space.grid, combo)) for combo in itertools.product(*space.grid.values())]
    out = []
    for _ in range(settings.samples):
        drawn = {key: _draw(rng, *space.dists[key]) for key in sorted(space.dists)}
        for n in names:
            for g in grid:
                for seed in seeds:
                    out.append({**n, **g, **drawn,
                                **({"train.seed": seed} if settings.seeds > 1 else {})})
    return out


def _draw(rng, kind: str, spec: list):
    if kind == "choice":
        return spec[int(rng.integers(len(spec)))]
    low, high = spec
    if kind == "randint":
        return int(rng.integers(low, high))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return float(rng.uniform(low, high))


def label(params: dict, seed: bool = True) -> str:
    """A trial's params in words: `variant wide, model.args.depth=4, seed 1` (`seed`: with its
    train.seed, when the sweep sets one); `base` when nothing changes."""
    words = [f"variant {v}" for k, v in params.items() if k == "variant"]
    words += [f"{k}={v}" for k, v in params.items() if k not in ("variant", "train.seed")]
    text = ", ".join(words) or "base"
    return text + (f", seed {params['train.seed']}" if seed and "train.seed" in params else "")


def trial_count(space: Space, settings: Settings) -> int:
    """Trials the sweep runs: samples x variants x grid x seeds (Optuna: samples)."""
    if settings.search == "optuna":
        return settings.samples
    count = settings.samples * max(1, len(space.variants)) * settings.seeds
    for values in space.grid.values():
        count *= len(values)
    return count


@dataclass(frozen=True)
class Plan:
    """A sweep resolved once (see `plan_sweep`): what tune runs, sweepdir records and the report
    compares against."""
    space: Space  # with base = the full base config as run (a nested dict)
    settings: Settings  # with max_epochs filled in
    base: config.Config
    trials: tuple  # (params, Config) of every trial, in run order
    specs: dict  # spec file -> its layers, read here: a trial's node may lack the file

    def trial(self, params: dict, where: str = "trial") -> config.Config:
        """The config of the trial with these Tune params (a spec file's layers included)."""
        cfg = trial_config(self.space, self.settings, params, where)
        if cfg.model.name in self.specs:
            cfg = config.replace(cfg, model__spec=self.specs[cfg.model.name])
        return cfg

    def checked(self, params: dict) -> config.Config:
        """`trial`, its model built on paper too: for a trial the driver did not see (an
        Optuna proposal); a bad one is refused naming the space and the trial."""
        where = f"{self.space.source}: {label(params)}"
        cfg = self.trial(params, where)
        _check_model(cfg, where)
        return cfg


def _check_model(cfg: config.Config, where: str) -> None:
    from cifar_ray.models import model_info

    try:
        model_info(cfg.model.spec or cfg.model.name, **cfg.model.args)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def plan_sweep(space: Space, settings: Settings, overrides: dict | None = None,
               where: str = "--set") -> Plan:
    """The one way from a space, its settings and base overrides (`where` names them in
    messages) to the base config and every trial's config: each setting, config and model
    checked once, before anything is prepared or started. With --search optuna the trials
    are the draws random search would make: TPE proposes from the same space, so a space
    whose draws fail is refused before it runs (a bad proposal later fails its trial alone)."""
    if overrides:
        space = replace(space, base=config.apply(space.base, overrides))
        config.from_dict(space.base, where)
    check_settings(space, settings)
    if settings.samples > 1 and not space.dists:
        raise UserError(f"--samples {settings.samples}: samples are draws from distributions "
                        f"({', '.join(DISTRIBUTIONS)}) and {space.source} has none; "
                        "use --seeds to repeat configurations")
    count = trial_count(space, settings)
    if count > MAX_TRIALS:
        raise UserError(f"{space.source}: {count:,} trials (samples x variants x grid x seeds), "
                        f"more than the {MAX_TRIALS:,} a sweep may run; sweep fewer values")
    settings = replace(settings, max_epochs=max_epochs(settings, space.base))
    base = config.portable(base_config(space, settings, space.source))
    space = replace(space, base=config.to_dict(base))
    specs: dict = {}
    checked: set[str] = set()
    trials = []
    for params in points(space, settings):
        where = f"{space.source}: {label(params)}"
        cfg = trial_config(space, settings, params, where)
        key = repr((cfg.model.name, sorted(cfg.model.args.items())))
        if key not in checked:
            _check_model(cfg, where)
            checked.add(key)
        if Path(cfg.model.name).is_file():
            if cfg.model.name not in specs:
                specs[cfg.model.name] = config.portable(cfg).model.spec
            cfg = config.replace(cfg, model__spec=specs[cfg.model.name])
        trials.append((params, cfg))
    for name in space.dists.get("model.name", ("", []))[1]:  # any that a proposal may name
        if isinstance(name, str) and Path(name).is_file() and name not in specs:
            bare = config.replace(base, model__name=name, model__args={}, model__spec=[])
            specs[name] = config.portable(bare).model.spec
    return Plan(space, settings, base, tuple(trials), specs)


# ---------------------------------------------------------------- the space as resolved

def resolved(space: Space, settings: Settings, base_cfg: config.Config) -> dict:
    """The space as run: base = the full resolved config, sweep = every setting. It is a
    valid space file itself (`--space DIR/space.yaml` reruns it)."""
    out: dict = {"description": space.description, "base": config.to_dict(base_cfg)}
    if space.grid:
        out["grid"] = space.grid
    for key, (kind, spec) in space.dists.items():
        out.setdefault(kind, {})[key] = spec
    if space.variants:
        out["variants"] = [{k: v for k, v in asdict(var).items() if v not in ("", None)}
                           for var in space.variants]
    out["sweep"] = asdict(settings)
    return out


def changes(base: config.Config, cfg: config.Config, skip=("train.seed",)) -> dict:
    """Dotted key -> value for every leaf where `cfg` differs from `base` (model args one
    by one; the args of a replaced model are not listed)."""
    a, b = flatten(config.to_dict(base)), flatten(config.to_dict(cfg))
    return {k: v for k, v in b.items() if (k not in a or a[k] != v) and k not in skip}


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and (v or prefix + k == "model.args"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
