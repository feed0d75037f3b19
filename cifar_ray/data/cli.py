"""`cifar-ray data ...` (prepare, info)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import click

from cifar_ray.errors import UserError
from cifar_ray.fsutil import atomic_write, check_writable_dir


@click.group()
def data():
    """Prepare and inspect datasets."""


@data.command("prepare")
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write the prepared dataset here instead of the cache.")
@click.option("--resize", is_flag=True,
              help="Convert images that are not 32x32 (shorter side scaled to 32, centre "
                   "cropped) instead of refusing them.")
def prepare_cmd(source, out, resize):
    """Decode SOURCE once into a prepared dataset (Parquet) and print its directory.

    \b
    SOURCE is one of:
      cifar10            the official cifar-10-python.tar.gz, downloaded into the
                         cache once and MD5-checked
      FILE.tar.gz | DIR  a local copy of that tarball, or its extracted
                         cifar-10-batches-py/ folder (each file MD5-checked)
      DIR | FILE.tar | FILE.tar.gz | FILE.tgz | FILE.zip
                         an ImageFolder of JPEG/PNG images: <class>/<image> (one
                         split, train) or train/<class>/... and test/<class>/...
      synthetic[:N]      a seeded, learnable 10-class set for smoke tests
                         (N train images, default 2000, + 500 test)
      DIR                a dataset prepared earlier (holds meta.json)

    Images must be 32x32 (see --resize); grayscale, palette and RGBA images are
    converted to RGB (alpha is dropped). Archive members with absolute paths, '..',
    links or devices are refused. The result goes to $CIFAR_RAY_HOME/prepared/<hash>/
    (default ~/.cache/cifar-ray), keyed by the source's content: preparing the same
    source again is instant.
    """
    from cifar_ray.data import prepare, read_meta

    start = time.perf_counter()
    path = prepare(source, out, resize=resize)
    meta = read_meta(path)
    counts = ", ".join(f"{name} {info['count']}" for name, info in meta["splits"].items())
    skipped = f"; skipped {meta['skipped_files']} non-image files" if meta.get("skipped_files") else ""
    click.echo(f"{len(meta['classes'])} classes, {counts} images{skipped} "
               f"({time.perf_counter() - start:.1f} s)", err=True)
    click.echo(str(path))


@data.command("info")
@click.argument("source", metavar="DATA")
@click.option("--json", "as_json", is_flag=True, help="Print meta.json (and the path) as JSON.")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG grid of sample train (else test) images, one row per class.")
def info_cmd(source, as_json, grid):
    """Show splits, images per class and mean/std of DATA (any SOURCE of `prepare`)."""
    from cifar_ray.data import prepare, read_meta

    if grid is not None:  # before the data is prepared: a bad --grid leaves nothing behind
        _check_grid(grid)
    path = prepare(source)
    meta = read_meta(path)
    if grid is not None:
        _write_grid(source, grid)
    if as_json:
        click.echo(json.dumps({"path": str(path), **meta}, indent=1))
        return
    splits = meta["splits"]
    width = max(len(c) for c in meta["classes"] + ["class"])
    lines = [f"path    {path}", f"source  {meta['source']}", ""]
    lines.append(f"{'class':<{width}}" + "".join(f"{name:>9}" for name in splits))
    for c in meta["classes"]:
        lines.append(f"{c:<{width}}" + "".join(f"{info['per_class'][c]:>9}" for info in splits.values()))
    lines.append(f"{'total':<{width}}" + "".join(f"{info['count']:>9}" for info in splits.values()))
    of = "train" if "train" in splits else "test "
    lines += ["", f"{of} mean (0-1, RGB)  " + "  ".join(f"{v:.4f}" for v in meta["mean"]),
              f"{of} std  (0-1, RGB)  " + "  ".join(f"{v:.4f}" for v in meta["std"])]
    if grid is not None:
        lines.append(f"grid    {grid}")
    click.echo("\n".join(lines))


def _check_grid(out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise UserError(f"--grid {out}: the grid is a PNG image; give a file name ending in .png")
    check_writable_dir(out.parent, "--grid", out)


def _write_grid(source: str, out: Path, per_class: int = 8) -> None:
    """A mosaic of the first `per_class` train images of each class, labelled by row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cifar_ray.data import load

    _check_grid(out)
    ds = load(source)
    split = "train" if "train" in ds.splits else "test"
    x, y = ds.splits[split]
    pad = 2
    tile = 32 + pad
    mosaic = np.full((len(ds.classes) * tile + pad, per_class * tile + pad, 3), 255, np.uint8)
    for row in range(len(ds.classes)):
        for col, i in enumerate(np.flatnonzero(y == row)[:per_class]):
            mosaic[pad + row * tile:(row + 1) * tile, pad + col * tile:(col + 1) * tile] = x[i]
    fig, ax = plt.subplots(figsize=(1 + per_class * 0.6, 0.4 + len(ds.classes) * 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + row * tile + 16 for row in range(len(ds.classes))], ds.classes)
    ax.set_xticks([])
    ax.set_title(f"{source}: {split} samples", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write(out, buf.getvalue())
