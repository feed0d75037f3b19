"""`cifar-ray data prepare|info`, in-process with CliRunner and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cifar_ray.cli import main
from cifar_ray.data import cache_home, load
from cifar_ray.data.synthetic import CLASSES

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, ["data", *map(str, args)])


def png_tree(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_prepare_prints_the_path_and_is_instant_the_second_time(tmp_path):
    src = png_tree(tmp_path / "imgs")
    first = run("prepare", src)
    assert first.exit_code == 0, first.output
    path = Path(first.stdout.strip().splitlines()[-1])
    assert path.parent == cache_home() / "prepared" and (path / "meta.json").is_file()
    assert "2 classes, train 6 images" in first.stderr
    again = run("prepare", src)
    assert again.exit_code == 0 and again.stdout.strip() == str(path)


def test_prepare_out_and_resize(tmp_path):
    src = png_tree(tmp_path / "imgs")
    Image.new("RGB", (40, 50), (10, 20, 30)).save(src / "cat" / "big.png")
    refused = run("prepare", src, "--out", tmp_path / "out")
    assert refused.exit_code == 2
    assert "big.png: image is 40x50, not 32x32" in refused.stderr
    assert not (tmp_path / "out").exists()
    ok = run("prepare", src, "--out", tmp_path / "out", "--resize")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == str(tmp_path / "out")
    x, y = load(str(tmp_path / "out")).splits["train"]
    assert x.shape == (7, 32, 32, 3) and (x == [10, 20, 30]).all(axis=(1, 2, 3)).sum() == 1


def test_errors_are_one_line_with_exit_status_2(tmp_path):
    for args, needle in [
        (("prepare", "imagenet"), "imagenet: unknown SOURCE; SOURCE may be"),
        (("prepare", tmp_path / "missing.zip"), "missing.zip: no such file or directory"),
        (("info", "synthetic:x"), "expected synthetic:N"),
    ]:
        result = run(*args)
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert needle in result.stderr


def test_help_documents_sources_and_conversion():
    text = run("prepare", "--help").output
    for needle in ("cifar10", "synthetic[:N]", "cifar-10-batches-py", ".zip", "meta.json",
                   "grayscale, palette and RGBA", "--resize", "--out"):
        assert needle in text


def test_info_table_json_and_grid(tmp_path):
    result = run("info", "synthetic:100", "--grid", tmp_path / "grid.png")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for cls in CLASSES:
        assert cls in out
    assert "total" in out and "100" in out and "500" in out and "train mean" in out
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.size[0] > 200 and grid.size[1] > 300
    meta = json.loads(run("info", "synthetic:100", "--json").stdout)
    assert meta["classes"] == CLASSES
    assert meta["splits"]["train"]["count"] == 100 and sum(meta["splits"]["test"]["per_class"].values()) == 500
    assert len(meta["mean"]) == 3 and Path(meta["path"]).is_dir()


def test_info_grid_must_be_png(tmp_path):
    result = run("info", "synthetic:20", "--grid", tmp_path / "grid.jpg")
    assert result.exit_code == 2 and "--grid" in result.stderr and ".png" in result.stderr
    assert not (tmp_path / "grid.jpg").exists()


def test_real_subprocess(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.run([sys.executable, "-m", "cifar_ray", "data", "prepare", "synthetic:50", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    ds = load(str(out))
    assert ds.splits["train"][0].shape == (50, 32, 32, 3)
    bad = subprocess.run([sys.executable, "-m", "cifar_ray", "data", "prepare", "nope"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: nope: unknown SOURCE")
