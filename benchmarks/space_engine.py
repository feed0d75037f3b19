"""A space's configurations trained one after another with the engine alone (no Ray, no
ASHA: every configuration runs every epoch), for a machine that has a GPU but no Ray.

    python benchmarks/space_engine.py --space seed-journey --data DATA [--limit N]
        [--max-epochs E] [--only NAME,NAME] [--gpu] [--out DIR]

Each configuration is the trial `cifar-ray tune` would build (the space's base, the variant,
the sweep's epochs), on the same seeded train/val split. Writes DIR/space_engine.jsonl (one
object per configuration, as it finishes) and DIR/space_engine.md: a table in the sweep
report's form (configuration, what it changes, the variant's reference, best validation
accuracy and its epoch, final train accuracy, training seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cifar_ray import engine, rundir
from cifar_ray import space as S
from cifar_ray.data.split import load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=0, help="stratified training subset (0 = all)")
    ap.add_argument("--max-epochs", type=int, default=0, help="0: the space's train.epochs")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", default="space-engine")
    a = ap.parse_args()

    space = S.load_space(a.space)
    settings = S.resolve_settings(space, {"max_epochs": a.max_epochs or None, "samples": 1})
    plan = S.plan_sweep(space, settings, {"data.source": a.data, "data.limit": a.limit,
                                    "train.precision": "auto"})  # as `tune` runs it
    space, settings, base = plan.space, plan.settings, plan.base
    only = set(filter(None, a.only.split(",")))
    trials = [(p, cfg) for p, cfg in plan.trials if not only or p.get("variant") in only]
    device = torch.device("cuda" if a.gpu else "cpu")
    data = load_split(base)
    refs = {v.name: v.reference for v in space.variants}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for params, cfg in trials:
        t0 = time.perf_counter()
        hist = engine.fit(cfg, data, device=device)
        best = max(hist, key=lambda h: h["val_acc"])
        row = {"configuration": S.label(params),
               "changes": S.changes(base, cfg), "reference": refs.get(params.get("variant")),
               "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
               "final_train_acc": hist[-1]["train_acc"], "epochs": len(hist),
               "did_not_learn": rundir.did_not_learn(hist), "train_s": sum(h["seconds"] for h in hist),
               "wall_s": time.perf_counter() - t0, "device": str(device)}
        rows.append(row)
        with open(out / "space_engine.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)
    lines = [f"# {space.name} with the engine alone", "",
             f"Data `{a.data}`" + (f" (limit {a.limit})" if a.limit else "") + f", {settings.max_epochs or base.train.epochs} "
             f"epochs each, device {device}" + (f" ({torch.cuda.get_device_name()})" if a.gpu else "") + ".", "",
             "| configuration | changes from base | reference | best val acc | at epoch | final train acc | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        changes = ", ".join(f"{k.removeprefix('model.args.')}={v}" for k, v in r["changes"].items())
        ref = "" if r["reference"] is None else f"{r['reference']:.3f}"
        acc = f"{r['best_val_acc']:.4f}" + (" (did not learn)" if r["did_not_learn"] else "")
        lines.append(f"| {r['configuration']} | {changes or 'no change'} | {ref} | {acc} | "
                     f"{r['best_epoch']} | {r['final_train_acc']:.4f} | {r['train_s']:.1f} |")
    (out / "space_engine.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
