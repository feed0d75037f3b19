"""Random search against Optuna's TPE on one space: the same trial count, data, epochs and
ASHA, each search repeated with several seeds; best validation accuracy against trials run.

    python benchmarks/search.py --space architecture --data DATA --limit 4000 \
        --max-epochs 5 --samples 30 --reps 3 --out bench-search

Each sweep is one `cifar-ray tune` run (one after another, never two at once), seed r of
repetition r (`--set train.seed=r`: random search's draws, TPE's sampler and every trial's
init; the train/val split stays the same). Trials are counted in the order they were
proposed: trial ids for random search (its draws are made up front), the Optuna study's
order for TPE. Writes DIR/<search>-<r>/ (the sweeps) and DIR/search.md: the mean and the
range over repetitions of the best validation accuracy after k trials.
"""

from __future__ import annotations

import argparse
import csv
import glob
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(args, search: str, rep: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "cifar_ray", "tune", "--space", args.space, "--data", args.data,
           "--limit", str(args.limit), "--max-epochs", str(args.max_epochs), "--samples",
           str(args.samples), "--search", search, "--set", f"train.seed={rep}", "--out", str(out)]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def curve(sweep: Path, search: str) -> list[float]:
    """Best val acc after 1, 2, ... trials, in proposal order."""
    with open(sweep / "trials.csv", newline="") as f:
        best = {r["trial_id"]: float(r["best_val_acc"] or 0) for r in csv.DictReader(f)}
    if search == "optuna":
        state = pickle.load(open(sorted(glob.glob(str(sweep / "tune-*" / "searcher-state-*.pkl")))[-1], "rb"))
        order = list(state["_ot_trials"])  # trial id -> Optuna trial, in proposal order
    else:
        order = sorted(best)
    out, top = [], 0.0
    for tid in order:
        top = max(top, best.get(tid, 0.0))
        out.append(top)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="architecture")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--max-epochs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench-search")
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[list[float]]] = {"random": [], "optuna": []}
    for rep in range(a.reps):
        for search in curves:
            sweep = root / f"{search}-{rep}"
            if not (sweep / "trials.csv").is_file():
                took = run(a, search, rep, sweep)
                print(f"{search} seed {rep}: {took:.0f} s", flush=True)
            curves[search].append(curve(sweep, search))
    marks = sorted({k for k in (1, 5, 10, 15, 20, 25, 30, 40, 50) if k <= a.samples} | {a.samples})
    lines = [f"Best val acc after k trials (mean over {a.reps} seeds, [min, max]); "
             f"`{a.space}`, {a.limit} images, {a.max_epochs} epochs, {a.samples} trials.", "",
             "| search | " + " | ".join(f"k={k}" for k in marks) + " |",
             "|---|" + "---|" * len(marks)]
    for search, runs in curves.items():
        cells = []
        for k in marks:
            vals = [c[min(k, len(c)) - 1] for c in runs]
            cells.append(f"{statistics.mean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]")
        lines.append(f"| {search} | " + " | ".join(cells) + " |")
    (root / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
