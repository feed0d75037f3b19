"""What the job entrypoints in jobs/ share: where a job's results go, how it runs the
`cifar-ray` command line, and the tiny "smoke" versions of the sweeps.

A job's entrypoint runs on the cluster's head node, in Ray's copy of the uploaded working
directory, which Ray deletes once no job uses it: so every result goes to the run storage,
never to the working directory.

    run storage   --storage URI, else $CIFAR_RAY_STORAGE, else ~/cifar-ray-runs
    a training    STORAGE/runs/NAME      (the run directory of `cifar-ray train`)
    a sweep       STORAGE/sweeps/NAME    (the sweep directory of `cifar-ray tune`)
    NAME          --name, else the job's submission id (`ray job submit --submission-id`)

On a cluster of more than one node the storage must be shared by every node (an s3:// or
gs:// bucket, or one NFS path mounted everywhere): Ray Train's workers write checkpoints
into it from their own nodes. A URI goes to `cifar-ray` as it is (cifar_ray/storage.py);
`cifar-ray report URI` then reads and rewrites the results in the bucket itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cifar_ray import storage

STORAGE_ENV = "CIFAR_RAY_STORAGE"
DEFAULT_STORAGE = "~/cifar-ray-runs"
PLACEHOLDER = "CHANGE-ME"  # the bucket placeholder of jobs/runtime_env.yaml
SMOKE_DATA = "synthetic:300"  # 300 generated training images: seconds per epoch on a CPU
is_uri = storage.is_uri
join = storage.join


class JobError(Exception):
    """Bad input or an unusable storage: printed as one line, exit status 2."""


# ---------------------------------------------------------------- where results go

def storage_root(explicit: str | None = None) -> str:
    """The run storage: an absolute local path or a URI (s3://, gs://, ...)."""
    value = (explicit or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE).strip()
    if PLACEHOLDER.lower() in value.lower():
        raise JobError(f"run storage {value!r} is still the placeholder: put your bucket in "
                       f"jobs/runtime_env.yaml ({STORAGE_ENV}) or pass --storage s3://BUCKET/PREFIX")
    if is_uri(value):
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def job_name(explicit: str | None, prefix: str) -> str:
    """--name, else the Ray job's submission id, else PREFIX-<UTC time> (outside a job)."""
    if explicit:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", explicit):
            raise JobError(f"--name {explicit!r}: use letters, digits, '.', '_' and '-' only")
        return explicit
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            submission = json.loads(config).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            submission = None
        if submission:
            return submission
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def check_writable(root: str) -> None:
    """Write and delete a marker under `root`: a wrong bucket or a missing permission fails
    here, in seconds, instead of after the first epoch."""
    try:
        marker = storage.locate(join(root, f".write-test-{uuid.uuid4().hex[:12]}"))
        marker.fs.create_dir(marker.parent().path, recursive=True)
        with marker.fs.open_output_stream(marker.path) as f:
            f.write(b"ok\n")
        marker.fs.delete_file(marker.path)
    except Exception as e:  # noqa: BLE001 - any failure means: this node cannot write there
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(f"run storage {root} is not writable from this node ({first}); check "
                       f"--storage / {STORAGE_ENV} and the node's cloud role") from None


def exists(location: str) -> bool:
    return storage.exists(storage.locate(location))


def fetch_hint(location: str) -> str:
    """The command that copies results from the storage to this machine."""
    local = "./" + location.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if location.startswith("s3://"):
        return f"aws s3 sync {location} {local}"
    if location.startswith("gs://"):
        return f"gcloud storage rsync --recursive {location} {local}"
    return f"ray rsync-down CLUSTER.yaml {location} {local}   (or read it in place on the head)"


# ---------------------------------------------------------------- running cifar-ray

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description,
        epilog="Any other option is passed to the cifar-ray command as it is.")
    p.add_argument("--smoke", action="store_true",
                   help=f"a check of about a minute on tiny generated data ({SMOKE_DATA}), on CPU")
    p.add_argument("--data", help="dataset (any SOURCE of `cifar-ray data prepare`; default cifar10)")
    p.add_argument("--storage", help=f"run storage: s3://BUCKET/PREFIX, gs://..., or a shared path "
                                     f"(default ${STORAGE_ENV}, else {DEFAULT_STORAGE})")
    p.add_argument("--name", help="results go to STORAGE/runs|sweeps/NAME (default: the job's submission id)")
    p.add_argument("--dry-run", action="store_true", help="print the cifar-ray command and stop")
    return p


def cifar_ray(args: list[str]) -> list[str]:
    """The command line of `cifar-ray ARGS`, run by this Python so that the job's runtime
    environment (the uploaded working directory first on PYTHONPATH) is the one used."""
    return [sys.executable, "-m", "cifar_ray", *map(str, args)]


def run(argv: list[str], dry_run: bool = False) -> int:
    shown = "cifar-ray " + shlex.join(argv[3:])
    print(f"$ {shown}", flush=True)
    if dry_run:
        return 0
    return subprocess.run(argv).returncode


def gpu_preflight(bundles: list[dict], strategy: str = "PACK") -> None:
    """Before a GPU job does any work: every GPU worker of it reports torch, its CUDA build,
    the driver and the GPU (cifar_ray/preflight.py); a node where CUDA cannot work stops the
    job with one line naming it. Runs on the job's Ray cluster, in the bundles and placement
    the job will ask for, so the autoscaler starts the nodes the job then uses."""
    import ray

    from cifar_ray.errors import UserError
    from cifar_ray.preflight import check_gpus

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False,
                 logging_level="WARNING")
    try:
        check_gpus(bundles, strategy, echo=lambda line: print(line, flush=True))
    except UserError as e:
        raise JobError(str(e)) from None
    finally:
        if started:
            ray.shutdown()


def main(body) -> None:
    """Run an entrypoint body, turning a JobError into one line and exit status 2."""
    try:
        sys.exit(body())
    except JobError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def finish(out: str, required: str, code: int) -> int:
    """After cifar-ray: make sure its results reached the storage, say where they are."""
    if code != 0:
        print(f"error: cifar-ray exited with status {code}; partial results, if any: {out}",
              file=sys.stderr, flush=True)
        return code
    if not exists(join(out, required)):
        print(f"error: cifar-ray finished but {join(out, required)} is missing: the results did "
              "not reach the run storage", file=sys.stderr, flush=True)
        return 1
    print(f"results: {out}")
    print(f"report: cifar-ray report {out}"
          + ("   (from any machine that can read the bucket)" if is_uri(out) else "   (on the head)"))
    print(f"a local copy: {fetch_hint(out)}", flush=True)
    return 0


# ---------------------------------------------------------------- sweeps

def smoke_space(name: str, keep_variants: list[str] | None = None) -> dict:
    """A built-in ablation space cut down for a smoke test: the chosen variants (else the
    first two) and the first two values of each grid or choice. (Epochs, samples and
    concurrency are the sweep's options, set on the command line.)"""
    import yaml

    import cifar_ray

    path = Path(cifar_ray.__file__).parent / "spaces" / f"{name}.yaml"
    if not path.is_file():
        raise JobError(f"no built-in space {name!r} in {path.parent}")
    data = yaml.safe_load(path.read_text())
    if data.get("variants"):
        by_name = {v["name"]: v for v in data["variants"]}
        keep = keep_variants or list(by_name)[:2]
        missing = [v for v in keep if v not in by_name]
        if missing:
            raise JobError(f"space {name}: no variant {', '.join(missing)} (has {', '.join(by_name)})")
        data["variants"] = [by_name[v] for v in keep]
    for kind in ("grid", "choice"):
        for key, values in (data.get(kind) or {}).items():
            data[kind][key] = values[:2]
    data["description"] = f"smoke test of {name}: {data.get('description', '')}"
    return data


def sweep_body(space: str, description: str, smoke_variants: list[str] | None = None,
               smoke_samples: int = 1, argv: list[str] | None = None) -> int:
    """A `cifar-ray tune` job over a built-in space, into STORAGE/sweeps/NAME."""
    p = base_parser(description)
    p.add_argument("--gpus-per-trial", type=float, default=0.25,
                   help="GPU share of each trial (default 0.25: four small nets per GPU; 0 = CPU)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs of each trial (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep STORAGE/sweeps/NAME (needs --name)")
    args, extra = p.parse_known_args(argv)
    root = storage_root(args.storage)
    if args.resume and not args.name:
        raise JobError("--resume needs --name NAME (the sweep to continue)")
    out = join(root, "sweeps", job_name(args.name, space))
    smoke_dir = None
    if args.resume:
        cmd = ["tune", "--resume", out]
    elif args.smoke:
        import yaml

        smoke_dir = tempfile.mkdtemp(prefix="cifar-ray-smoke-")
        space_file = Path(smoke_dir) / f"{space}-smoke.yaml"
        space_file.write_text(yaml.safe_dump(smoke_space(space, smoke_variants), sort_keys=False))
        cmd = ["tune", "--space", space_file, "--data", args.data or SMOKE_DATA,
               "--samples", smoke_samples, "--seeds", 1, "--max-epochs", 1, "--grace", 1,
               "--concurrent", 2, "--cpus-per-trial", 1, "--gpus-per-trial", 0,
               "--set", "train.batch_size=64", "--out", out]
    else:
        cmd = ["tune", "--space", space, "--data", args.data or "cifar10",
               "--gpus-per-trial", f"{args.gpus_per_trial:g}",
               "--cpus-per-trial", f"{args.cpus_per_trial:g}",
               "--out", out]
        if args.gpus_per_trial:
            cmd.append("--no-resource-check")  # an autoscaler adds the GPU nodes
    cmd += extra
    try:
        if not args.dry_run:
            check_writable(root)
            if args.gpus_per_trial and not (args.smoke or args.resume):
                gpu_preflight([{"CPU": args.cpus_per_trial, "GPU": args.gpus_per_trial}])
        code = run(cifar_ray(cmd), dry_run=args.dry_run)
    finally:
        if smoke_dir:
            shutil.rmtree(smoke_dir, ignore_errors=True)
    return code if args.dry_run else finish(out, "trials.csv", code)
