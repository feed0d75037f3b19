"""`cifar-ray bench`: each measurement's parts by their behaviour, and the command printing
every ratio (`--quick`, synthetic data; the parts without Ray in one run, Ray's in another).
No assertion is about time."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cifar_ray import config as C
from cifar_ray.bench import loader_vs_torchvision, time_to_accuracy, torchvision_loader
from cifar_ray.cli import main
from cifar_ray.data.loader import DeviceLoader
from cifar_ray.data.split import load_split

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def candidate_views(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every translate-by-up-to-`pad` (reflect) view of a CHW image, mirrored or not."""
    padded = F.pad(img[None].float(), (pad,) * 4, mode="reflect")[0]
    views = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            v = padded[:, dy:dy + 32, dx:dx + 32]
            views += [v, v.flip(-1)]
    return views


@pytest.mark.parametrize("which", ["ours", "torchvision"])
def test_both_pipelines_apply_the_same_augmentation(which):
    x, y = images(16)
    y = np.arange(16)  # labels identify the source image
    if which == "ours":
        aug = C.AugConfig(crop_pad=2, pad_mode="reflect", hflip="random")
        batches = DeviceLoader(x, y, batch_size=16, device="cpu", mean=MEAN, std=STD, aug=aug)
    else:
        batches = torchvision_loader(x, y, batch_size=16, mean=MEAN, std=STD, pad=2, workers=0,
                                     device=torch.device("cpu"))
    out, labels = next(iter(batches))
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pixels = (out.float() * std + mean) * 255  # back to 0..255
    moved = 0
    for img, label in zip(pixels, labels):
        source = torch.from_numpy(x[int(label)]).permute(2, 0, 1)
        views = candidate_views(source, 2)
        assert any(torch.allclose(img, v, atol=1e-2) for v in views)
        moved += not torch.allclose(img, source.float(), atol=1e-2)
    assert moved > 0


def test_loader_comparison_reports_both_rates_and_their_ratio():
    x, y = images(600)
    r = loader_vs_torchvision(x, y, MEAN, STD, torch.device("cpu"), batch_size=100,
                              max_images=300)
    assert r["ours_images_per_s"] > 0 and r["torchvision_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["ours_images_per_s"] / r["torchvision_images_per_s"],
                                       rel=0.01)
    assert set(r["torchvision_by_workers"]) == {"0", str(os.cpu_count())}


def test_time_to_accuracy_gives_the_curve_and_each_target():
    cfg = C.load_config("speed-cpu", ["data.source=synthetic:600", "train.epochs=2",
                                      "train.batch_size=64", "model.args.block1=8",
                                      "model.args.block2=8", "model.args.block3=8"])
    r = time_to_accuracy(cfg, load_split(cfg), torch.device("cpu"),
                         {0.0: 100.0, 1.01: 1.0})
    assert [row["epoch"] for row in r["curve"]] == [1, 2]
    assert 0 < r["curve"][0]["train_s"] < r["curve"][1]["train_s"] == r["train_s"]
    reached, never = r["targets"]["0.00"], r["targets"]["1.01"]
    assert reached["train_s"] == r["curve"][0]["train_s"]
    assert reached["ratio"] == pytest.approx(reached["train_s"] / 100.0, abs=1e-3)
    assert never["train_s"] is None and never["ratio"] is None


def test_bench_json_without_ray():
    """The loader and speed parts: their figures as JSON on stdout, their lines on stderr."""
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "loader", "--only",
                                       "speed", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # progress went to stderr
    assert data["loader"]["ratio"] > 0 and "ray" not in data
    assert data["speed"]["preset"] == "speed-cpu" and len(data["speed"]["curve"]) == 2
    assert set(data["speed"]["targets"]) == {"0.80", "0.90"}
    lines = result.stderr.splitlines()
    loader = next(l for l in lines if l.startswith("loader+aug"))
    assert "ratio" in loader and "torchvision" in loader
    targets = [l for l in lines if l.strip().startswith("val 0.")]
    assert len(targets) == 2 and all("ratio" in l or "not reached" in l for l in targets)
    assert "epoch" in result.stderr  # the validation curve


@pytest.mark.ray
def test_bench_ray_prints_its_ratio(ray_local):
    """The Ray part (a real Ray Train run beside the engine alone), printed as a ratio."""
    result = CliRunner().invoke(main, ["bench", "--quick", "--only", "ray"])
    assert result.exit_code == 0, result.output
    train = next(l for l in result.stdout.splitlines() if l.startswith("train "))
    assert "ratio" in train and "Ray Train" in train and "engine alone" in train
