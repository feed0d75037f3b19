"""Curves and tables a person looks at: matplotlib PNGs, markdown tables."""

from __future__ import annotations

import io
from pathlib import Path

from cifar_ray.fsutil import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write(path, buf.getvalue())


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Train vs validation accuracy and loss per epoch, as the seed's author plotted them."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label, style in (("train", "train", "-"), ("val", "validation", "--")):
        ax_acc.plot(epochs, [h.get(f"{key}_acc") for h in history], style, marker="o", label=label)
        ax_loss.plot(epochs, [h.get(f"{key}_loss") for h in history], style, marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(confusion, classes: list[str], path: Path, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(confusion[i][j]), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)
