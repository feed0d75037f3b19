"""`cifar-ray models ...` (list, show)."""

from __future__ import annotations

import json

import click

from cifar_ray.errors import UserError


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _table(rows: list[tuple], align: str) -> str:
    """Plain-text columns; `align` has one of '<' or '>' per column."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(align))]
    return "\n".join("  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()
                     for r in rows)


def _parse_sets(items: tuple[str, ...]) -> dict:
    """`arg=value` pairs -> overrides; values read as YAML (3, 0.5, true, leaky_relu)."""
    from cifar_ray.config import set_flag, yaml_value

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected ARG=VALUE, e.g. --set activation=gelu")
        out[key.strip()] = yaml_value(raw, set_flag(item))
    return out


@click.group()
def models():
    """List and inspect models and layer specs."""


@models.command("list")
def list_cmd():
    """Registered models: name, parameter count, description."""
    from cifar_ray.models.registry import get_entry, list_models, model_info

    rows = [("name", "params", "description")]
    for name in list_models():
        rows.append((name, _human(model_info(name)["params"]), get_entry(name).description))
    click.echo(_table(rows, "<><"))
    click.echo("\nParameters: cifar-ray models show NAME; a layer-spec .yaml path works "
               "wherever a name does.")


def _layer_rows(layers: list[dict], prefix: str = "") -> list[tuple]:
    from cifar_ray.models.spec import layer_text

    rows = []
    for r in layers:
        text = layer_text({"type": r["type"], **r["args"]})
        if r["type"] == "residual":
            text += " + " + ("identity" if r["shortcut"] is None else "1x1 conv shortcut")
        shape = "x".join(map(str, r["out_shape"]))
        rows.append((f"{prefix}{r['index']}", ("  " * prefix.count(".")) + text, shape,
                     f"{r['params']:,}", f"{r['macs']:,}"))
        if r["type"] == "residual":
            rows += _layer_rows(r["body"], f"{prefix}{r['index']}.")
            if r["shortcut"]:
                rows += _layer_rows([{**r["shortcut"], "index": "sc"}], f"{prefix}{r['index']}.")
    return rows


@models.command("show")
@click.argument("model", metavar="NAME|SPEC.yaml")
@click.option("--set", "sets", multiple=True, metavar="ARG=VALUE",
              help="Model parameter, e.g. --set activation=leaky_relu (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--yaml", "as_yaml", is_flag=True,
              help="Print the layer spec as YAML: a starting point for your own spec file.")
def show(model, sets, as_json, as_yaml):
    """Layers with output shape, params and MACs per image, and the totals.

    MACs count multiply-accumulates of conv and dense layers (the classifier included);
    BatchNorm, pooling, activations and residual adds count 0."""
    from cifar_ray.models.registry import (default_recipe, get_entry, get_spec, list_models,
                                           model_info)
    from cifar_ray.models.spec import spec_yaml

    overrides = _parse_sets(sets)
    if as_yaml:
        click.echo(spec_yaml(get_spec(model, **overrides)), nl=False)
        return
    info = model_info(model, **overrides)
    info["recipe"] = default_recipe(model, **overrides)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['name']}: {info['description']}")
    if info["name"] in list_models():
        params = get_entry(info["name"]).params()
        now = {**params, **overrides}
        click.echo("parameters: " + ", ".join(f"{k}={v}" for k, v in now.items()))
    rows = [("#", "layer", "output", "params", "MACs")] + _layer_rows(info["layers"])
    click.echo(_table(rows, "<<<>>"))
    click.echo(f"total: {info['params']:,} params ({_human(info['params'])}), "
               f"{info['macs']:,} MACs per image ({_human(info['macs'])})")
    recipe = ", ".join(f"{k}={v}" for k, v in info["recipe"].items())
    click.echo(f"default recipe: {recipe} (no BatchNorm: the config's SGD defaults leave it at "
               "chance; --config/--set/flags override)" if recipe else
               "default recipe: the config's defaults (sgd, lr 0.05, onecycle)")
