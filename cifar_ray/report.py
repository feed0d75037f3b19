"""Curves and tables a person looks at: matplotlib PNGs, markdown tables."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cifar_ray import rundir
from cifar_ray.fsutil import atomic_write
from cifar_ray.values import is_number


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


# ---------------------------------------------------------------- sweeps

# 97.5% quantiles of Student's t for 1..30 degrees of freedom (two-sided 95% intervals).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df


@dataclass
class Group:
    """One configuration (a trial's params without the seed) and its seeds' accuracies.
    Only seeds that ran every epoch count: a trial ASHA stopped had a shorter budget, so its
    accuracy says "worse at a rung", not how good the configuration is."""
    label: str
    params: dict
    values: list[float]  # best val acc of each seed that ran all epochs and learned
    trials: list = field(default_factory=list)
    reference: float | None = None
    changes: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else float("nan")


@dataclass
class Noise:
    """Seed-to-seed noise pooled over all configurations, and each one's verdict vs base."""
    groups: list[Group]
    base: Group | None
    sd: float | None  # pooled standard deviation of one seed's accuracy (None: 1 seed each)
    df: int

    def half_width(self, g: Group) -> float | None:
        """95% interval half-width of a configuration's mean."""
        return None if self.sd is None or not g.values else t975(self.df) * self.sd / math.sqrt(len(g.values))

    def delta(self, g: Group) -> tuple[float, float | None]:
        """(mean - base mean, 95% half-width of that difference or None)."""
        d = g.mean - self.base.mean if self.base is not None else float("nan")
        if self.sd is None or not g.values or self.base is None or not self.base.values:
            return d, None
        return d, t975(self.df) * self.sd * math.sqrt(1 / len(g.values) + 1 / len(self.base.values))

    def verdict(self, g: Group) -> str:
        if g.trials and all(t.did_not_learn for t in g.trials):
            return "did not learn" + (" (the base)" if g is self.base else "")
        if g is self.base:
            return "base" if g.values else "base (no full run)"
        if not g.values:
            stopped = sum(t.status == "stopped" for t in g.trials)
            if stopped:
                return f"stopped by ASHA ({stopped}/{len(g.trials)} seeds)"
            return "failed" if all(t.status == "failed" for t in g.trials) else "no result"
        if self.base is None or not self.base.values:
            return "no base to compare"
        d, half = self.delta(g)
        if half is None:
            return "noise unknown (1 seed)"
        if abs(d) <= half:
            return "within noise"
        return "better, beyond noise" if d > 0 else "worse, beyond noise"


def noise(sw) -> Noise:
    """Group the sweep's trials into configurations; pool their seeds' variance."""
    refs = {v.name: v.reference for v in sw.space.variants}
    groups: dict[str, Group] = {}
    for t in sw.trials:
        params = {k: v for k, v in t.params.items() if k != "train.seed"}
        key = json.dumps(params, sort_keys=True, default=str)
        g = groups.get(key)
        if g is None:
            from cifar_ray.space import label

            g = groups[key] = Group(label(params), params, [],
                                    reference=refs.get(params.get("variant")),
                                    changes=dict(t.changes))
        g.trials.append(t)
        if t.status == "done" and t.best_val_acc is not None and not t.did_not_learn:
            g.values.append(t.best_val_acc)
    listed = list(groups.values())
    # The space's base configuration itself, when the sweep ran it (a random draw seldom does).
    base = next((g for g in listed if not g.changes), None)
    df = sum(len(g.values) - 1 for g in listed if len(g.values) > 1)
    ss = sum(sum((v - g.mean) ** 2 for v in g.values) for g in listed if len(g.values) > 1)
    return Noise(listed, base, math.sqrt(ss / df) if df else None, df)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe_changes(changes: dict) -> str:
    """`depth=4, aug.hflip=random` (model args by their own name), or `(base)`."""
    return ", ".join(f"{k.removeprefix('model.args.')}={_fmt(v)}" for k, v in changes.items()) or "no change"


def trial_label(t) -> str:
    """The trial's params in words, with its seed when the sweep varies seeds."""
    from cifar_ray.space import label

    return label(t.params)


def _epoch_ticks(ax, epochs: list[int]) -> None:
    if 0 < len(epochs) <= 15:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)


def plot_sweep_curves(sw, ranked: list, path: Path) -> None:
    """Validation accuracy per epoch of every trial, best first in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    shown = [t for t in ranked if t.history]
    for i, t in enumerate(shown):
        style = "--" if t.status == "stopped" else ("-" if t.status == "done" else ":")
        ax.plot([h["epoch"] for h in t.history], [h.get("val_acc") for h in t.history], style,
                marker="o", markersize=3, alpha=0.9 if i < 8 else 0.35,
                label=f"{t.trial_id} {trial_label(t)}"[:60] if i < 12 else None)
    ax.set(xlabel="epoch", ylabel="validation accuracy",
           title="validation accuracy (dashed: stopped by ASHA)")
    _epoch_ticks(ax, sorted({h["epoch"] for t in shown for h in t.history}))
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def plot_top_curves(ranked: list, path: Path, top: int = 3) -> None:
    """Train vs validation accuracy of the best trials: the over/underfitting picture."""
    plt = _pyplot()
    best = [t for t in ranked if t.history][:top] or ranked[:1]
    fig, axes = plt.subplots(1, max(1, len(best)), figsize=(4.5 * max(1, len(best)), 3.8),
                             squeeze=False, sharey=True)
    for ax, t in zip(axes[0], best):
        epochs = [h["epoch"] for h in t.history]
        ax.plot(epochs, [h.get("train_acc") for h in t.history], "-", marker="o", label="train")
        ax.plot(epochs, [h.get("val_acc") for h in t.history], "--", marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel="accuracy", title=f"{t.trial_id}\n{trial_label(t)}"[:70])
        _epoch_ticks(ax, epochs)
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_factor(sw, key: str, path: Path) -> None:
    """Best val accuracy against one swept key's values: each trial a dot (hollow: stopped
    by ASHA), the mean per value a dash, a variant's reference a red x."""
    plt = _pyplot()
    points, stuck = [], []
    for t in sw.trials:
        if t.status == "failed" or t.best_val_acc is None:
            continue
        value = t.seed if key == "train.seed" else t.params.get(key)
        (stuck if t.did_not_learn else points).append((value, t.best_val_acc, t.status == "stopped"))
    numeric = all(is_number(v) for v, _, _ in points)
    values = sorted({v for v, _, _ in points + stuck}, key=float) if numeric else \
        list(dict.fromkeys(v for v, _, _ in points + stuck))
    pos = {v: i for i, v in enumerate(values)}
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(values) + 2), 3.8))
    means = [sum(a for v, a, _ in points if v == x) / n if (n := sum(v == x for v, _, _ in points))
             else float("nan") for x in values]
    ax.plot(range(len(values)), means, "_", color="#555555", markersize=40, mew=2,
            label="mean (learned trials)" if stuck else "mean")
    for v, acc, stopped in points:
        ax.plot(pos[v], acc, "o", color="#1f4e79", fillstyle="none" if stopped else "full")
    if stuck:  # out of the means: their accuracy is the recipe's failure, not the factor's
        ax.plot([pos[v] for v, _, _ in stuck], [a for _, a, _ in stuck], "x", color="#999999",
                label="did not learn")
        points += stuck
    if key == "variant":  # the accuracy each variant's `reference` reports, beside ours
        refs = {v.name: v.reference for v in sw.space.variants}
        marks = [(pos[x], refs[x]) for x in values if refs.get(x) is not None]
        if marks:
            ax.plot(*zip(*marks), "x", color="#c0392b", markersize=9, label="reference")
            points += [(None, r, False) for _, r in marks]  # keep them inside the y range
    ax.set_xticks(range(len(values)), [_fmt(v) for v in values],
                  rotation=30 if len(values) > 4 else 0, ha="right" if len(values) > 4 else "center")
    ax.set_xlim(-0.6, len(values) - 0.4)
    lo = min((a for _, a, _ in points), default=0.0)
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max((a for _, a, _ in points), default=1.0) + 0.03))
    ax.set(xlabel=key, ylabel="best validation accuracy", title=f"{key}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def _pct(x) -> str:
    return "" if x is None or x != x else f"{x:.4f}"


def _status(t, max_epochs: int) -> str:
    if t.status == "failed":
        return f"failed: {t.reason}"[:160].replace("|", "/")
    stuck = "did not learn, " if t.did_not_learn else ""
    if t.status == "stopped":
        return f"{stuck}stopped by ASHA at epoch {t.epochs}"
    return stuck + {"done": "done", "incomplete": "incomplete (resume the sweep)"}.get(t.status, t.status)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def sweep_report(sw) -> Path:
    """DIR/report.md with its PNGs: the ranked trials, the configurations against seed
    noise, curves and one plot per swept key."""
    from cifar_ray.sweepdir import best_trial, ranked

    out = Path(sw.path)
    order = ranked(sw)
    nz = noise(sw)
    E = sw.max_epochs
    counts = {s: sum(t.status == s for t in sw.trials) for s in ("done", "stopped", "failed", "incomplete")}
    counts["incomplete"] += sw.planned - len(sw.trials)  # never started
    stuck = sum(t.did_not_learn for t in sw.trials)
    lines = [f"# Sweep report: {out.name}", ""]
    if sw.space.description:
        lines += [sw.space.description, ""]
    st = sw.settings
    lines += [f"{max(sw.planned, len(sw.trials))} trials: {counts['done']} ran all {E} epochs, {counts['stopped']} "
              f"stopped early by ASHA, {counts['failed']} failed"
              + (f"; {stuck} did not learn (never above {rundir.LEARNED:g}x chance)" if stuck else "")
              + (f", {counts['incomplete']} incomplete (`cifar-ray tune --resume {sw.shown()}`)"
                 if counts["incomplete"] else "")
              + f". ASHA on validation accuracy: grace {st.grace} epoch{'s' * (st.grace != 1)}, reduction {st.reduction:g}; "
              f"{st.seeds} seed(s) per configuration. Data: `{sw.base.data.source}`"
              + (f" (limit {sw.base.data.limit})" if sw.base.data.limit else "") + ".", ""]
    if sw.settings.search == "optuna":
        lines += [f"Search: Optuna's TPE proposed each trial from the results before it "
                  f"(seed {sw.base.train.seed}).", ""]
    if sw.budget.get("ended"):
        lines += [f"**The time budget ({sw.budget.get('text', '?')}) ended this sweep**: the trials "
                  "running then stopped at their last finished epoch and no more started; "
                  f"`cifar-ray tune --resume {sw.shown()} --time-budget DURATION` continues it.", ""]
    best = best_trial(sw)
    if best is not None:
        lines += [f"**Best: {best.best_val_acc:.4f}** validation accuracy, trial `{best.trial_id}` "
                  f"({trial_label(best)}: {describe_changes(best.changes)}), epoch {best.best_epoch}. "
                  "Its config: "
                  f"`best.yaml` (`cifar-ray train --config {sw.shown('best.yaml')}`).", ""]

    lines += ["## Configurations against seed noise", ""]
    if nz.groups:
        lines += [(f"Base for the differences: **{nz.base.label}**, the space's base configuration. "
                   if nz.base is not None else
                   "No trial ran the space's base configuration unchanged, so no differences "
                   "are computed (a space of random draws seldom does; to compare against it, "
                   "add a variant that sets nothing: `- {name: base}`). ")
                  + ("Trials that did not learn (never above "
                     f"{rundir.LEARNED:g}x chance: a recipe the net cannot train with, not a "
                     "measure of the configuration) are left out of the means. " if stuck else "") + (
                      f"Seed-to-seed noise: one seed's accuracy varies with a standard deviation of "
                      f"{nz.sd:.4f} (pooled over {nz.df} degrees of freedom); intervals are 95%, "
                      "and a difference counts only when it is larger than its interval. Only "
                      "trials that ran every epoch count (ASHA's stops are shown as such)."
                      if nz.sd is not None else
                      "No configuration has two seeds that ran every epoch, so the noise is "
                      "unknown: differences of a point or less may be luck. Rerun with `--seeds 3` "
                      "(and `--grace` = `--max-epochs` so that ASHA stops no seed) to tell."), ""]
        rows = []
        for g in sorted(nz.groups, key=lambda g: -g.mean if g.values else 1.0):
            half = nz.half_width(g)
            mean = "" if not g.values else (f"{g.mean:.4f} ± {half:.4f}" if half is not None
                                            else f"{g.mean:.4f}")
            d, dh = nz.delta(g) if g.values and nz.base is not None and nz.base.values else (float("nan"), None)
            delta = "" if d != d or g is nz.base else (f"{d * 100:+.2f} ± {dh * 100:.2f}" if dh is not None
                                                       else f"{d * 100:+.2f}")
            row = [g.label, describe_changes(g.changes), f"{len(g.values)}/{len(g.trials)}", mean,
                   delta, nz.verdict(g)]
            if any(x.reference is not None for x in nz.groups):
                row.append("" if g.reference is None else
                           f"{g.reference:.3f}" + (f" (ours {g.mean - g.reference:+.3f})" if g.values else ""))
            rows.append(row)
        header = ["configuration", "changes from base", "full runs", "val acc (mean ± 95%)",
                  "Δ vs base (points)", "verdict"]
        if any(x.reference is not None for x in nz.groups):
            header.append("reference")
        lines += _md_table(header, rows) + [""]

    lines += ["## Trials, best first", ""]
    rows = []
    ref_col = any(v.reference is not None for v in sw.space.variants)
    refs = {v.name: v.reference for v in sw.space.variants}
    for i, t in enumerate(order, 1):
        params = t.params
        row = [i, f"`{t.trial_id}`", describe_changes(t.changes), t.seed, _pct(t.best_val_acc),
               t.best_epoch or "", f"{t.epochs}/{E}", _status(t, E)]
        if ref_col:
            ref = refs.get(params.get("variant"))
            row.append("" if ref is None else f"{ref:.3f}")
        rows.append(row)
    header = ["#", "trial", "changes from base", "seed", "best val acc", "at epoch", "epochs",
              "status"] + (["reference"] if ref_col else [])
    lines += _md_table(header, rows) + [""]

    if any(t.history for t in sw.trials):
        plot_sweep_curves(sw, order, out / "val-curves.png")
        plot_top_curves(order, out / "top-curves.png")
        lines += ["## Curves", "", "![validation accuracy of every trial](val-curves.png)", "",
                  "Train vs validation accuracy of the best trials:", "",
                  "![train vs validation, best trials](top-curves.png)", ""]
        keys = sw.space.swept_keys()
        if keys:
            lines += ["## Factors", "", "Best validation accuracy against each swept key "
                      "(dots: trials, hollow = stopped by ASHA; dashes: means; red x: a variant's "
                      "reference"
                      + ("; grey x: trials that did not learn, left out of the means" if stuck else "")
                      + ").", ""]
            for key in keys:
                name = f"factor-{key.replace('/', '_')}.png"
                plot_factor(sw, key, out / name)
                lines += [f"![{key}]({name})", ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path


def publish(stage):
    """Read the sweep in `stage` (a storage.Stage, already pulled), write its tables and
    report and upload them; return the sweep (sweepdir.Sweep)."""
    from cifar_ray import sweepdir

    sw = sweepdir.read_sweep(stage.local, location=stage.loc.text)
    sweepdir.write_tables(sw)
    sweep_report(sw)
    stage.push()
    return sw


def run_report(run: Path) -> Path:
    """report.md for a single run directory: the summary, the config's headline, curves."""
    from cifar_ray.config import Config, load_config

    run = Path(run)
    summary = rundir.read_summary(run)
    history = rundir.read_metrics(run / "metrics.csv") if (run / "metrics.csv").is_file() else []
    if not history:
        from cifar_ray.errors import UserError

        raise UserError(f"{run}: no metrics.csv; train first (cifar-ray train --out {run})")
    cfg = load_config(str(run / "config.yaml")) if (run / "config.yaml").is_file() else Config()
    plot_curves(history, run / "curves.png", title=cfg.model.name)
    val = [h.get("val_acc", float("nan")) for h in history]
    best_i = max(range(len(val)), key=lambda i: val[i] if val[i] == val[i] else -1)
    last = history[-1]
    lines = [f"# Run report: {run.name}", "",
             f"Model `{cfg.model.name}`" + (f" ({summary['params']:,} params)" if summary.get("params") is not None else "")
             + f", {len(history)}/{cfg.train.epochs} epochs, global batch {cfg.train.batch_size}, "
             f"{cfg.optim.name} lr {cfg.optim.lr:g} ({cfg.optim.schedule}), data `{cfg.data.source}`.", ""]
    rows = [["best val acc", f"{val[best_i]:.4f} (epoch {history[best_i]['epoch']})"],
            ["final val acc", _pct(last.get("val_acc"))],
            ["final train acc", _pct(last.get("train_acc"))],
            ["train - val gap", _pct(last.get("train_acc", float("nan")) - last.get("val_acc", float("nan")))]]
    if "test_acc" in summary:
        rows.append(["test acc", _pct(summary["test_acc"])])
    if summary.get("train_seconds") is not None:
        rows.append(["training time", f"{summary['train_seconds']:.1f} s"])
    lines += _md_table(["", ""], rows) + ["", "![train vs validation](curves.png)", ""]
    path = run / "report.md"
    atomic_write(path, "\n".join(lines))
    return path
