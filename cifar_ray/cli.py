"""The `cifar-ray` command line: each command turns its options into a config and calls the
library. Bad input surfaces as a `UserError`, printed as one line with exit status 2."""

from __future__ import annotations

import sys

import click

from cifar_ray import __version__
from cifar_ray.errors import UserError


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _Group(click.Group):
    """A click group that prints a UserError, or a bad option or argument that click
    itself refuses, as one line on stderr and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo("error: " + " ".join(str(e).splitlines()), err=True)  # one line, always
            sys.exit(2)
        except click.UsageError as e:
            if isinstance(e, _NO_ARGS_IS_HELP):  # `cifar-ray data` alone: click prints the help
                raise
            path = e.ctx.command_path if e.ctx is not None else ctx.command_path
            message = " ".join(e.format_message().split())
            click.echo(f"error: {message} (see {path} --help)", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cifar-ray")
def main():
    """Train CNNs on CIFAR-10 with Ray Train and run ablations with Ray Tune + ASHA."""


def _config_from_options(config, sets, flags: dict, base: dict | None = None):
    """--config, then --set, then explicit flags (the most specific wins)."""
    from cifar_ray.config import load_config

    overrides = list(sets) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_config(config, overrides, base=base)


_MLFLOW = click.option("--mlflow", metavar="URI", envvar="CIFAR_RAY_MLFLOW", show_envvar=True,
                       help="Log to this MLflow tracking server (needs the `track` extra).")


@main.command()
@click.option("--model", help="Registered model name (see `cifar-ray models list`) or a layer-spec YAML file.")
@click.option("--data", help="Dataset: any SOURCE of `cifar-ray data prepare` (synthetic, cifar10, a folder or archive, a prepared dir).")
@click.option("--epochs", type=int, help="Epochs to train (with --resume: may be raised).")
@click.option("--batch-size", type=int, help="GLOBAL batch size: split evenly across the --workers (each gets batch/workers).")
@click.option("--lr", type=float, help="Peak learning rate for the global batch size.")
@click.option("--workers", type=int, help="DDP workers (Ray Train). Default 1.")
@click.option("--gpu/--cpu", default=None, help="One GPU per worker, or CPU only (default: CPU).")
@click.option("--limit", type=int, help="Train on a stratified subset of this many images (quick local debugging).")
@click.option("--seed", type=int, help="Seed of init, shuffling and augmentation.")
@click.option("--config", "config", help="Config YAML file or preset name.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set optim.lr=0.1 (repeatable).")
@click.option("--out", help="Run directory to create: a path, or a URI such as s3://BUCKET/PREFIX or gs://BUCKET/PREFIX.")
@click.option("--resume", help="Continue the run in this directory (a path or URI).")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds.")
@click.option("--no-resource-check", is_flag=True, help="Start even if the Ray cluster lacks the CPUs/GPUs now (an autoscaler will add them).")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's and the workers' log lines.")
@_MLFLOW
def train(model, data, epochs, batch_size, lr, workers, gpu, limit, seed, config, sets, out,
          resume, overwrite, no_resource_check, verbose, mlflow):
    """Train a model on Ray Train (DDP); checkpoints, curves and a summary go to --out.

    Ray runs locally unless RAY_ADDRESS names a cluster."""
    from cifar_ray import storage
    from cifar_ray.config import read_yaml
    from cifar_ray.train import run

    flags = {"model.name": model, "data.source": data, "train.epochs": epochs,
             "train.batch_size": batch_size, "optim.lr": lr, "scale.workers": workers,
             "scale.gpu": None if gpu is None else str(gpu).lower(), "data.limit": limit,
             "train.seed": seed}
    if resume:
        loc = storage.locate(resume, "--resume")
        if out and storage.locate(out, "--out").text != loc.text:
            raise UserError("give either --out or --resume, not both")
        changed = [k for k, v in flags.items() if v is not None and k != "train.epochs"]
        if changed or config or sets:
            raise UserError(f"--resume {resume}: only --epochs may change on resume "
                            f"(got {', '.join(changed) or '--config/--set'})")
        if not storage.exists(loc, "config.yaml"):
            raise UserError(f"--resume {resume}: not a run directory (no config.yaml)")
        saved = read_yaml(loc.sub("config.yaml").text, "run config")
        cfg = _config_from_options(None, (), {"train.epochs": epochs}, base=saved)
        out = loc.text
    else:
        if not out:
            raise UserError("--out DIR is required (the run directory to create)")
        cfg = _config_from_options(config, sets, flags)
    summary = run(cfg, out, resume=bool(resume), overwrite=overwrite,
                  check_resources=not no_resource_check, verbose=verbose, mlflow=mlflow)
    if summary.get("error"):
        click.echo(f"error: {summary['error']}", err=True)
        sys.exit(130 if summary["error"] == "interrupted" else 1)
    click.echo(f"best val acc {summary.get('best_val_acc') or 0:.4f} (epoch {summary.get('best_epoch')}), "
               f"{summary.get('train_seconds', 0):.1f}s training; run: {storage.locate(out).text}")


@main.command()
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.option("--data", help="Dataset (default: the one the run trained on).")
@click.option("--split", type=click.Choice(["test", "val", "train"]),
              help="Default: val on the run's own data; on other --data its test split, "
                   "or all of it when it has no splits (a plain <class>/<image> folder).")
@click.option("--tta", is_flag=True, help="Test-time augmentation (flip + 1-pixel shifts).")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which checkpoint of a run directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(target, data, split, tta, which, as_json):
    """Accuracy, per-class accuracy and confusion matrix of a trained model."""
    import json

    from cifar_ray import storage
    from cifar_ray.inference import evaluate_checkpoint

    with storage.local_copy(target) as (run, stage):
        result = evaluate_checkpoint(run, data, split, tta, which)
        result["checkpoint"] = stage.shown(result["checkpoint"])
        if run.is_dir() and (run / "config.yaml").is_file():
            from cifar_ray.report import plot_confusion

            split = result["split"]
            png = run / f"confusion-{split}.png"
            try:  # a run on read-only storage is still evaluated: only the picture is lost
                plot_confusion(result["confusion"], result["classes"], png,
                               title=f"{split}: accuracy {result['accuracy']:.4f}")
                stage.push()
                result["confusion_png"] = stage.shown(png)
            except UserError as e:
                click.echo(f"warning: the confusion matrix PNG was not written: {e}", err=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['split']} accuracy {result['accuracy']:.4f} on {result['n']} images"
               f"{' (TTA)' if tta else ''}  [{result['checkpoint']}]")
    width = max(len(c) for c in result["classes"])
    click.echo("per class:")
    for c, acc in result["per_class"].items():
        click.echo(f"  {c:<{width}}  {acc:.4f}")
    click.echo("confusion (rows: true, columns: predicted):")
    for c, row in zip(result["classes"], result["confusion"]):
        click.echo(f"  {c:<{width}} " + " ".join(f"{v:>5}" for v in row))
    if "confusion_png" in result:
        click.echo(f"wrote {result['confusion_png']}")


@main.command()
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--top-k", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--tta", is_flag=True, help="Test-time augmentation.")
@click.option("--json", "as_json", is_flag=True)
def predict(target, images, top_k, tta, as_json):
    """Top-k classes with probabilities for image files (resized to 32x32 if needed)."""
    import json

    from cifar_ray import storage
    from cifar_ray.inference import predict as run_predict

    with storage.local_copy(target) as (run, _):
        results = run_predict(run, list(images), top_k, tta)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
        click.echo(f"{r['image']}: {tops}")


@main.command("tune")
@click.option("--space", "space_name", metavar="NAME|FILE", help="A built-in space (see --list-spaces) or a space YAML file.")
@click.option("--data", help="Dataset for every trial (any SOURCE of `cifar-ray data prepare`); prepared and loaded once.")
@click.option("--samples", type=int, help="Draws from the space's distributions (each crossed with its variants, grid and seeds); with --search optuna, the number of trials.")
@click.option("--search", type=click.Choice(["random", "optuna"]), help="random (default): draws made up front; optuna: "
              "Optuna's TPE proposes each trial from the results so far (distributions only; needs optuna).")
@click.option("--time-budget", metavar="DURATION", help="Stop the sweep when this is spent (45s, 90m, 2h): running trials stop "
              "at their last epoch, no more start; --resume DIR continues it (with a new --time-budget or none).")
@click.option("--dry-run", is_flag=True, help="Print the estimated cost of the sweep on this cluster and exit; writes nothing.")
@click.option("--seeds", type=int, help="Seeds per configuration; the report then tells real differences from seed noise.")
@click.option("--max-epochs", type=int, help="Epochs of a trial ASHA never stops (default: the space's base train.epochs).")
@click.option("--grace", type=int, help="ASHA: epochs every trial runs before it may be stopped (default 1).")
@click.option("--reduction", type=float, help="ASHA: at each rung keep the best 1/R of trials (default 3).")
@click.option("--concurrent", type=int, help="Trials at once (default: as many as the cluster's CPUs/GPUs hold).")
@click.option("--workers-per-trial", type=int, help="1 (default): each trial runs the engine in its own process, no "
              "Ray Train overhead. N > 1: each trial is a TorchTrainer with N DDP workers.")
@click.option("--gpus-per-trial", type=float, help="One worker: a GPU share (0.25 packs 4 trials on a GPU). N workers: N (one whole GPU each).")
@click.option("--cpus-per-trial", type=float, help="CPUs of a trial (all its workers together; default 1).")
@click.option("--limit", type=int, help="Train every trial on a stratified subset of this many images.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a key of the space's base config (repeatable).")
@click.option("--out", help="Sweep directory to create: a path (on a multi-node cluster, one every node "
              "shares) or a URI such as s3://BUCKET/PREFIX or gs://BUCKET/PREFIX.")
@click.option("--resume", help="Continue the interrupted sweep in this directory (a path or URI).")
@click.option("--overwrite", is_flag=True, help="Replace what --out holds.")
@click.option("--list-spaces", is_flag=True, help="List the built-in spaces and exit.")
@click.option("--no-resource-check", is_flag=True, help="Start even if the cluster lacks a trial's CPUs/GPUs now (an autoscaler will add them).")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's and the trials' log lines.")
@_MLFLOW
def tune_cmd(space_name, data, samples, search, time_budget, dry_run, seeds, max_epochs, grace,
             reduction, concurrent, workers_per_trial, gpus_per_trial, cpus_per_trial, limit,
             sets, out, resume, overwrite, list_spaces, no_resource_check, verbose, mlflow):
    """Run an ablation sweep on Ray Tune with ASHA early stopping; tables, the best config
    and a report go to --out.

    Each trial trains one configuration of the space (validated, every trial, before any
    starts) and reports validation accuracy per epoch; ASHA stops the weak ones early. With
    one worker per trial the trial runs the engine directly (a TorchTrainer would cost ~20 s
    of worker start/stop per trial and buy nothing); with --workers-per-trial N it builds a
    TorchTrainer with N DDP workers. All trials read one copy of the data in Ray's object
    store. Ctrl-C or a killed driver: `cifar-ray tune --resume DIR` continues.

    Before the first trial it prints what the sweep will cost here (MACs per image of each
    trial's model x images x epochs, timed by a short probe on the cluster); --dry-run
    prints only that."""
    from cifar_ray import space as sweep_space
    from cifar_ray import storage
    from cifar_ray.config import parse_override

    if list_spaces:
        for name, path in sweep_space.builtin_spaces().items():
            click.echo(f"{name:<14} {sweep_space.load_space(str(path)).description}")
        return
    if time_budget is not None:
        from cifar_ray.cost import parse_duration

        parse_duration(time_budget)  # a bad one fails now, before anything starts
    flags = {"samples": samples, "search": search, "seeds": seeds, "max_epochs": max_epochs, "grace": grace,
             "reduction": reduction, "concurrent": concurrent,
             "workers_per_trial": workers_per_trial, "gpus_per_trial": gpus_per_trial,
             "cpus_per_trial": cpus_per_trial}
    if resume:
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        given += [f for f, v in (("--space", space_name), ("--data", data), ("--limit", limit),
                                 ("--set", sets), ("--overwrite", overwrite)) if v]
        if dry_run:
            raise UserError(f"--dry-run estimates a new sweep before it starts; --resume "
                            f"{resume} continues one that started (use one of them)")
        if given:
            raise UserError(f"--resume {resume}: a resumed sweep keeps its space and options "
                            f"(got {', '.join(given)})")
        if out and storage.locate(out, "--out").text != storage.locate(resume, "--resume").text:
            raise UserError("give either --out or --resume, not both")
        plan, out = None, resume
    else:
        if not space_name:
            raise UserError("--space NAME|FILE is required (see cifar-ray tune --list-spaces)")
        if not out and not dry_run:
            raise UserError("--out DIR is required (the sweep directory to create)")
        space = sweep_space.load_space(space_name)
        if data is None and "source" not in (space.base.get("data") or {}):
            raise UserError("--data DATA is required (or set data.source in the space's base)")
        overrides = dict(parse_override(item) for item in sets)
        overrides.update((k, v) for k, v in (("data.source", data), ("data.limit", limit))
                         if v is not None)
        plan = sweep_space.plan_sweep(space, sweep_space.resolve_settings(space, flags), overrides,
                                where="--data/--limit/--set")
    _run_sweep(plan, out, bool(resume), overwrite, not no_resource_check, verbose, mlflow,
               time_budget, dry_run)


def _run_sweep(plan, out, resume, overwrite, check_resources, verbose, mlflow=None,
               time_budget=None, dry_run=False):
    from cifar_ray import tune

    sw = tune.run(plan, out, resume=resume, overwrite=overwrite,
                  check_resources=check_resources, verbose=verbose, echo=click.echo,
                  mlflow=mlflow, time_budget=time_budget, dry_run=dry_run)
    if sw is None:  # --dry-run
        return
    _echo_summary(sw)
    unfinished = sw.planned - sum(t.status != "incomplete" for t in sw.trials)
    if unfinished > 0 and sw.budget.get("ended"):
        click.echo(f"the time budget {sw.budget.get('text')} ended the sweep with {unfinished} of "
                   f"{sw.planned} trials unfinished; continue with: cifar-ray tune --resume "
                   f"{sw.shown()} --time-budget DURATION")
    elif unfinished > 0:
        click.echo(f"error: sweep interrupted with {unfinished} of {sw.planned} trials unfinished; "
                   f"continue with: cifar-ray tune --resume {sw.shown()}", err=True)
        sys.exit(1)


def _echo_summary(sw) -> None:
    from cifar_ray.sweepdir import best_trial
    from cifar_ray.report import trial_label

    best = best_trial(sw)
    counts = {s: sum(t.status == s for t in sw.trials) for s in ("done", "stopped", "failed")}
    click.echo(f"{sw.planned} trials: {counts['done']} done, {counts['stopped']} stopped by "
               f"ASHA, {counts['failed']} failed"
               + (f", {sw.planned - sum(counts.values())} unfinished" if sw.planned > sum(counts.values()) else ""))
    if best is not None:
        click.echo(f"best val acc {best.best_val_acc:.4f}: {best.trial_id} ({trial_label(best)}); "
                   f"config: {sw.shown('best.yaml')}")
    click.echo(f"report: {sw.shown('report.md')}")


@main.command()
@click.argument("target", metavar="SWEEP_DIR|RUN_DIR")
def report(target):
    """Write report.md (ranked trials, seed noise, curves, one plot per swept key) for a
    sweep directory, or report.md with curves for a run directory. Either may be a URI
    (s3://, gs://, ...): the report is written there."""
    from cifar_ray import rundir, storage, sweepdir
    from cifar_ray.report import publish, run_report

    loc = storage.locate(target)
    if not any(storage.exists(loc, name) for name in (sweepdir.SPACE_FILE, "config.yaml", rundir.CHECKPOINTS)):
        raise UserError(f"{target}: neither a sweep directory (space.yaml) nor a run "
                        "directory (config.yaml)")
    with storage.Stage(loc) as stage:
        stage.pull()
        if sweepdir.is_sweep(stage.local):
            _echo_summary(publish(stage))
        else:
            path = run_report(stage.local)
            stage.push()
            click.echo(f"report: {stage.shown(path)}")


@main.command()
@click.option("--data", help="Dataset for every measurement (default: synthetic data).")
@click.option("--quick", is_flag=True, help="Small synthetic run that prints every ratio (CI).")
@click.option("--only", type=click.Choice(["loader", "ray", "speed"]), multiple=True,
              help="Run only this measurement (repeatable).")
@click.option("--gpu/--cpu", default=None, help="Device (default: the GPU when there is one).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (progress goes to stderr).")
def bench(data, quick, only, gpu, as_json):
    """Side-by-side speed ratios: loader vs torchvision, Ray Train vs engine, time to accuracy."""
    import json

    from cifar_ray.bench import run_bench

    device = None if gpu is None else ("cuda" if gpu else "cpu")
    echo = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    result = run_bench(data, quick=quick, device=device, only=only, echo=echo)
    if as_json:
        click.echo(json.dumps(result, indent=2))


def _register_commands():
    from cifar_ray.data.cli import data
    from cifar_ray.models.cli import models

    main.add_command(data)
    main.add_command(models)


_register_commands()
