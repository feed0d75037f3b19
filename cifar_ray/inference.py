"""Evaluate and predict with a trained checkpoint (no Ray: runs anywhere torch does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cifar_ray.config import Config, from_dict
from cifar_ray import checkpoint, engine, rundir
from cifar_ray.errors import UserError
from cifar_ray.fsutil import refuse_special


def load_checkpoint(target: str | Path, which: str = "best", device="cpu"):
    """(state, config, model) from a run directory, checkpoint folder or state.pt."""
    path = rundir.resolve_checkpoint(target, which)
    state = checkpoint.load_state(path)
    cfg, model = model_from_state(state, device, where=str(path))
    return path, state, cfg, model


def model_from_state(state: dict, device: torch.device | str = "cpu", ema: bool = True,
                     where: str = "checkpoint"):
    """Rebuild (config, model in eval mode) from a checkpoint state (see load_state);
    `where` names the checkpoint in messages."""
    cfg = from_dict(state["config"], f"{where}: config")
    try:
        model = engine.make_model(cfg, len(state["classes"]), torch.device(device))
    except UserError as e:  # e.g. the spec file it was trained from is gone or changed
        raise UserError(f"{where}: cannot rebuild its model: {e}") from None
    weights = state["ema"] if ema and state.get("ema") else state["model"]
    problem = _weights_problem(model.state_dict(), weights)
    if problem:
        raise UserError(f"{where}: its weights do not fit model {cfg.model.name} ({problem}); "
                        "the checkpoint is damaged or the model changed since it was trained")
    model.load_state_dict(weights)
    return cfg, model.eval()


def _weights_problem(own: dict, weights: dict) -> str | None:
    """The first difference between a model's state dict and checkpoint weights, or None."""
    for key, tensor in own.items():
        if key not in weights:
            return f"{key} is missing"
        if tuple(weights[key].shape) != tuple(tensor.shape):
            return (f"{key} has shape {list(weights[key].shape)}, the model's "
                    f"{list(tensor.shape)}")
    extra = [key for key in weights if key not in own]
    return f"{extra[0]} is not in the model" if extra else None


def split_arrays(cfg: Config, data: str, split: str | None, own: bool):
    """(dataset, split name, (images, labels)) of DATA. `val` is the run's own held-out
    split; with no --split, the run's own data gives `val` and other data its test split,
    or all of it when it has one split only (a plain <class>/<image> folder)."""
    from cifar_ray.data import load, train_val_split

    ds = load(data)
    if split is None:
        split = "val" if own else ("test" if "test" in ds.splits else "all")
    if split == "all":
        return ds, split, ds.splits["train"]
    if split == "test":
        if "test" not in ds.splits:
            raise UserError(f"--data {data}: has no test split; use --split val")
        return ds, split, ds.splits["test"]
    if "train" not in ds.splits:
        raise UserError(f"--data {data}: holds only a test split; use --split test (or no --split)")
    images, labels = ds.splits["train"]
    if split == "train":
        return ds, split, (images, labels)
    _, val_idx = train_val_split(labels, cfg.data.val_fraction, cfg.data.split_seed)
    if len(val_idx) == 0:
        raise UserError(f"{data}: the run used data.val_fraction=0, so it has no validation split")
    return ds, split, (images[val_idx], labels[val_idx])


def evaluate_checkpoint(target: str | Path, data: str | None = None, split: str | None = None,
                        tta: bool = False, which: str = "best") -> dict:
    """Accuracy, per-class accuracy and confusion matrix of a checkpoint on a split (see
    `split_arrays` for the default)."""
    from cifar_ray.data.loader import DeviceLoader

    path, state, cfg, model = load_checkpoint(target, which)
    own = data is None or data == cfg.data.source
    data = data or cfg.data.source
    ds, split, (images, labels) = split_arrays(cfg, data, split, own)
    classes = list(state["classes"])
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise UserError(f"--data {data}: its classes {', '.join(unknown)} are not among the "
                        f"checkpoint's ({', '.join(classes)}); evaluate on images of the classes "
                        "the model was trained on")
    # By name: a separate test folder lists its classes in its own (sorted) order.
    labels = np.array([classes.index(c) for c in ds.classes], np.int64)[labels]
    device = torch.device("cpu")
    loader = DeviceLoader(images, labels, batch_size=cfg.train.eval_batch_size, device=device,
                          mean=tuple(state["mean"]), std=tuple(state["std"]), aug=None,
                          shuffle=False, drop_last=False, channels_last=cfg.train.channels_last)
    amp = engine.autocast_dtype(cfg.train.precision, device)
    ev = engine.evaluate(model, loader, device, amp, len(classes), tta)
    conf = ev["confusion"]
    per_class = {c: float(conf[i, i] / conf[i].sum()) for i, c in enumerate(classes) if conf[i].sum()}
    return {"checkpoint": str(path), "split": split, "n": ev["n"], "accuracy": ev["acc"],
            "loss": ev["loss"], "tta": tta, "per_class": per_class,
            "classes": classes, "confusion": conf.tolist()}


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 (32,32,3) RGB; other sizes are resized (antialiased)."""
    from PIL import Image

    from cifar_ray.data.decode import open_image

    if Path(path).is_dir():
        raise UserError(f"{path}: is a directory; give image files (PNG or JPEG)")
    refuse_special(path)
    if not Path(path).exists():
        raise UserError(f"{path}: no such image file")
    im = open_image(str(path), path, "cannot decode image", "give a PNG or JPEG file")
    if im.size != (32, 32):
        im = im.resize((32, 32), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def predict(target: str | Path, images: list[str], top_k: int = 3, tta: bool = False,
            which: str = "best") -> list[dict]:
    """Top-k classes with probabilities for each image file."""
    _, state, cfg, model = load_checkpoint(target, which)
    batch = np.stack([read_image(p) for p in images])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(state["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(state["std"]).view(1, 3, 1, 1)
    x = (x - mean) / std
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        probs = engine.predict_logits(model, x, tta).softmax(1)
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=1)
    classes = state["classes"]
    return [{"image": str(p), "top": [{"class": classes[j], "prob": float(v)}
                                      for v, j in zip(top.values[i].tolist(),
                                                      top.indices[i].tolist())]}
            for i, p in enumerate(images)]
