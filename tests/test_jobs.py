"""jobs/ without Ray: where results go, the cifar-ray command each entrypoint composes
(--dry-run), the smoke spaces, and the runtime environments against pyproject.toml.
(tests/test_jobs_e2e.py runs the training job and a sweep job for real on a local head.)"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
ENTRYPOINTS = sorted(p.name for p in JOBS.glob("*.py") if p.name != "jobkit.py")


@pytest.fixture
def jobs(monkeypatch):
    """The jobs/ folder importable as the entrypoints see it (`import jobkit`)."""
    monkeypatch.syspath_prepend(str(JOBS))
    for name in ("CIFAR_RAY_STORAGE", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)
    import jobkit

    return jobkit


def run_entrypoint(monkeypatch, script: str, *argv: str) -> int:
    """Run jobs/SCRIPT as `python jobs/SCRIPT ARGV...` would; return its exit status."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(JOBS / script), run_name="__main__")
    return done.value.code


def dry_run(monkeypatch, capsys, script: str, *argv: str) -> list[str]:
    """The cifar-ray command line an entrypoint would run, as a list of words."""
    code = run_entrypoint(monkeypatch, script, *argv, "--dry-run")
    out, err = capsys.readouterr()
    assert code == 0, err
    line = out.strip().splitlines()[-1]
    assert line.startswith("$ cifar-ray ")
    return shlex.split(line[2:])[1:]


def opt(cmd: list[str], flag: str) -> str:
    return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]  # the last occurrence wins, as in click


# ---------------------------------------------------------------- storage and names

def test_storage_root(jobs, monkeypatch, tmp_path):
    assert jobs.storage_root() == str(Path("~/cifar-ray-runs").expanduser())
    monkeypatch.setenv("CIFAR_RAY_STORAGE", "s3://bucket/prefix/")
    assert jobs.storage_root() == "s3://bucket/prefix"
    assert jobs.storage_root("gs://b") == "gs://b"  # --storage wins over the variable
    monkeypatch.chdir(tmp_path)
    assert jobs.storage_root("rel/dir") == str(tmp_path / "rel" / "dir")  # absolute
    assert jobs.join("s3://b/p", "runs", "x") == "s3://b/p/runs/x"
    assert jobs.join(str(tmp_path), "runs", "x") == str(tmp_path / "runs" / "x")


def test_placeholder_storage_is_refused(jobs, monkeypatch):
    monkeypatch.setenv("CIFAR_RAY_STORAGE", "s3://CHANGE-ME/cifar-ray")
    with pytest.raises(jobs.JobError, match="still the placeholder.*--storage"):
        jobs.storage_root()


def test_job_name(jobs, monkeypatch):
    assert jobs.job_name("my-run_1.2", "train") == "my-run_1.2"
    with pytest.raises(jobs.JobError, match="--name"):
        jobs.job_name("../etc", "train")
    assert re.fullmatch(r"train-\d{8}-\d{6}", jobs.job_name(None, "train"))
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "sub-7"}}))
    assert jobs.job_name(None, "train") == "sub-7"  # inside a Ray job: its submission id


def test_check_writable(jobs, tmp_path):
    jobs.check_writable(str(tmp_path / "new" / "storage"))
    assert list((tmp_path / "new" / "storage").iterdir()) == []  # the marker is gone
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(jobs.JobError) as e:
        jobs.check_writable(str(blocker / "storage"))
    assert "is not writable from this node" in str(e.value) and "\n" not in str(e.value)


def test_finish_checks_that_results_arrived(jobs, tmp_path, capsys):
    out = tmp_path / "runs" / "r1"
    out.mkdir(parents=True)
    assert jobs.finish(str(out), "summary.json", 0) == 1
    assert "did not reach the run storage" in capsys.readouterr().err
    (out / "summary.json").write_text("{}")
    assert jobs.finish(str(out), "summary.json", 0) == 0
    assert f"results: {out}" in capsys.readouterr().out
    assert jobs.finish(str(out), "summary.json", 3) == 3


def test_fetch_hint(jobs):
    assert jobs.fetch_hint("s3://b/p/sweeps/x") == "aws s3 sync s3://b/p/sweeps/x ./x"
    assert jobs.fetch_hint("gs://b/p/runs/y") == "gcloud storage rsync --recursive gs://b/p/runs/y ./y"


# ---------------------------------------------------------------- the commands

def test_train_ddp_on_gpus(jobs, monkeypatch, capsys):
    cmd = dry_run(monkeypatch, capsys, "train_ddp.py", "--storage", "s3://b/p", "--name", "r1",
                  "--workers", "8", "--set", "optim.lr=0.2")
    assert cmd[0] == "train"
    assert opt(cmd, "--workers") == "8" and "--gpu" in cmd and "--cpu" not in cmd
    assert "--no-resource-check" in cmd  # the autoscaler adds the GPU nodes
    assert opt(cmd, "--out") == "s3://b/p/runs/r1"
    assert opt(cmd, "--data") == "cifar10" and opt(cmd, "--model") == "resnet18"
    assert cmd[-2:] == ["--set", "optim.lr=0.2"]  # other options pass through, last
    sets = [cmd[i + 1] for i, w in enumerate(cmd) if w == "--set"]
    assert "scale.cpus_per_worker=11" in sets and "scale.placement=PACK" in sets  # whole 4-GPU nodes
    two = dry_run(monkeypatch, capsys, "train_ddp.py", "--storage", "s3://b/p", "--workers", "2",
                  "--placement", "STRICT_PACK")
    sets = [two[i + 1] for i, w in enumerate(two) if w == "--set"]
    assert "scale.cpus_per_worker=3" in sets and "scale.placement=STRICT_PACK" in sets


def test_train_ddp_smoke(jobs, monkeypatch, capsys, tmp_path):
    cmd = dry_run(monkeypatch, capsys, "train_ddp.py", "--smoke", "--storage", str(tmp_path), "--name", "s")
    assert "--cpu" in cmd and "--no-resource-check" not in cmd
    assert opt(cmd, "--workers") == "1" and opt(cmd, "--epochs") == "1"
    assert opt(cmd, "--data").startswith("synthetic:")
    assert opt(cmd, "--out") == str(tmp_path / "runs" / "s")
    gpu = dry_run(monkeypatch, capsys, "train_ddp.py", "--smoke", "--gpu", "--workers", "2", "--storage", str(tmp_path))
    assert "--gpu" in gpu and opt(gpu, "--workers") == "2"  # a quick check of a GPU cluster


def test_train_ddp_resume(jobs, monkeypatch, capsys, tmp_path):
    cmd = dry_run(monkeypatch, capsys, "train_ddp.py", "--resume", "--name", "r1", "--epochs", "40",
                  "--storage", str(tmp_path))
    assert cmd == ["train", "--resume", str(tmp_path / "runs" / "r1"), "--epochs", "40"]


@pytest.mark.parametrize("script,space", [("seed_journey.py", "seed-journey"),
                                          ("ablate_architecture.py", "architecture"),
                                          ("ablate_augmentation.py", "augmentation")])
def test_sweep_commands(jobs, monkeypatch, capsys, tmp_path, script, space):
    cmd = dry_run(monkeypatch, capsys, script, "--storage", "gs://b/p", "--name", "n", "--seeds", "3")
    assert cmd[:3] == ["tune", "--space", space]
    assert opt(cmd, "--gpus-per-trial") == "0.25" and "--no-resource-check" in cmd
    assert opt(cmd, "--out") == "gs://b/p/sweeps/n" and cmd[-2:] == ["--seeds", "3"]
    cpu = dry_run(monkeypatch, capsys, script, "--storage", "gs://b/p", "--gpus-per-trial", "0")
    assert opt(cpu, "--gpus-per-trial") == "0" and "--no-resource-check" not in cpu
    smoke = dry_run(monkeypatch, capsys, script, "--smoke", "--storage", str(tmp_path), "--name", "s")
    assert opt(smoke, "--max-epochs") == "1" and opt(smoke, "--gpus-per-trial") == "0"
    assert opt(smoke, "--out") == str(tmp_path / "sweeps" / "s")
    assert not Path(opt(smoke, "--space")).exists()  # the smoke space file is cleaned up


def test_bad_input_is_one_line(jobs, monkeypatch, capsys):
    assert run_entrypoint(monkeypatch, "train_ddp.py", "--resume") == 2
    assert capsys.readouterr().err.strip() == "error: --resume needs --name NAME (the run to continue)"


@pytest.mark.parametrize("space,keep,trials", [("seed-journey", ["s01-five-layers", "s10-many-filters"], 2),
                                               ("augmentation", ["none", "rotate-crop"], 2),
                                               ("architecture", None, 2)])
def test_smoke_spaces_are_valid_and_small(jobs, tmp_path, space, keep, trials):
    from cifar_ray import space as S

    data = jobs.smoke_space(space, keep)
    path = tmp_path / f"{space}.yaml"
    path.write_text(yaml.safe_dump(data))
    parsed = S.load_space(str(path))
    if keep:
        assert [v.name for v in parsed.variants] == keep
    assert all(len(v) <= 2 for v in parsed.grid.values())
    assert all(len(spec) <= 2 for kind, spec in parsed.dists.values() if kind == "choice")
    samples = 2 if space == "architecture" else 1
    settings = S.resolve_settings(parsed, {"samples": samples, "max_epochs": 1, "grace": 1,
                                           "concurrent": 2, "gpus_per_trial": 0.0})
    checked = S.plan_sweep(parsed, settings)  # every trial's config and model build
    assert len(checked.trials) == trials


def test_smoke_space_unknown_variant(jobs):
    with pytest.raises(jobs.JobError, match="no variant nope"):
        jobs.smoke_space("seed-journey", ["nope"])


# ---------------------------------------------------------------- runtime environments

def _project_dependencies() -> dict[str, str]:
    """pyproject.toml's dependencies without Ray (the image has it): name -> specifier."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {r.name.lower(): r.specifier for r in reqs if r.name != "ray"}


CONSTRAINTS = REPO / "cluster" / "constraints.txt"
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


def _pins() -> list[str]:
    return [line.strip() for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_constraints_pin_every_dependency_exactly():
    """cluster/constraints.txt: one exact version per package, every dependency of
    pyproject.toml among them (a version it allows), torch as the CUDA 12.8 build of the
    index the configs give pip, and the same version CI tests (the local part aside)."""
    import torch
    from packaging.requirements import Requirement
    from packaging.version import Version

    reqs = [Requirement(p) for p in _pins()]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs)
    version = {r.name.lower(): Version(next(iter(r.specifier)).version) for r in reqs}
    assert len(version) == len(reqs)  # no package twice
    for name, spec in _project_dependencies().items():
        assert name in version, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert spec.contains(version[name].public), (name, spec, version[name])
    assert version["torch"].local == version["torchvision"].local == TORCH_INDEX.rsplit("/", 1)[1]
    assert version["torch"].public == Version(torch.__version__).public  # what CI tests


def test_every_cluster_installs_the_constraints():
    """The setup commands of the `ray up` configs install with the constraints file and
    PyTorch's index; jobs/runtime_env.yaml and kuberay/rayjob.yaml list exactly its pins;
    Ray's own RuntimeEnv accepts both (pip options, the setup timeout)."""
    from ray.runtime_env import RuntimeEnv

    for config in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        setup = " ".join(yaml.safe_load((REPO / "cluster" / config).read_text())["setup_commands"])
        assert "-c ~/cifar-ray/cluster/constraints.txt ~/cifar-ray" in setup, config
        assert f"--extra-index-url {TORCH_INDEX}" in setup, config
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    job_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    for e in (env, job_env):
        assert e["pip"]["packages"] == _pins()
        assert e["pip"]["pip_install_options"] == ["--extra-index-url", TORCH_INDEX]
        assert e["config"]["setup_timeout_seconds"] >= 1200  # a PyTorch download fits
        checked = RuntimeEnv(**{k: v for k, v in e.items() if k != "working_dir"})
        assert checked.pip_config()["packages"] == _pins()


def test_runtime_env_for_the_clusters():
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert env["env_vars"]["CIFAR_RAY_STORAGE"].startswith("s3://CHANGE-ME")  # refused until set
    assert ".git" in env["excludes"]
    local = yaml.safe_load((JOBS / "runtime_env.local.yaml").read_text())
    for config in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        rsync = yaml.safe_load((REPO / "cluster" / config).read_text())["rsync_exclude"]
        assert rsync == env["excludes"] == local["excludes"], config


# Planted in a copy of the repository: what a checkout in use may hold and no job needs.
PLANTED = {"data/cifar-10-python.tar.gz": 3_000_000, "data/prepared/train.parquet": 2_000_000,
           ".hypothesis/examples/abc/x": 1000, "runs/first/checkpoints/epoch-0001/state.pt": 2_000_000,
           "sweeps/journey/trials.csv": 1000, ".pytest_cache/v/cache/x": 100,
           "cifar_ray/__pycache__/cli.cpython-311.pyc": 10_000, ".venv/lib/torch.so": 4_000_000,
           ".cache/cifar-ray/x.parquet": 1_000_000, "cifar_ray.egg-info/PKG-INFO": 100,
           "jobs/__pycache__/jobkit.cpython-311.pyc": 1000}


@pytest.mark.parametrize("gitignore", [True, False], ids=["with-.gitignore", "excludes-alone"])
def test_what_a_job_uploads(tmp_path, gitignore):
    """Ray's own packaging code (what `ray job submit --working-dir .` runs) on a copy of
    the repository with data, run, sweep and cache folders planted: none of them goes, nor
    do the published reports (docs/); every other tracked file does (cifar_ray/data/ is
    code), and the zip stays small. Also with
    Ray told to ignore .gitignore: the excludes alone keep them out."""
    import subprocess
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    tree = tmp_path / "checkout"
    for name in tracked:
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((REPO / name).read_bytes())
    for name, size in PLANTED.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x" * size)
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    zipped = tmp_path / "pkg.zip"
    create_package(str(tree), zipped, include_gitignore=gitignore, excludes=env["excludes"])
    names = set(zipfile.ZipFile(zipped).namelist())
    went = [p for p in PLANTED if p in names]
    assert went == [], f"uploaded: {went}"
    code = {n for n in tracked if (REPO / n).is_file() and not n.startswith("docs/")}
    assert code <= names and not any(n.startswith("docs/") for n in names)
    assert any(n.startswith("cifar_ray/data/") for n in names)
    assert zipped.stat().st_size < 2_000_000, zipped.stat().st_size


def test_local_runtime_env_installs_nothing():
    env = yaml.safe_load((JOBS / "runtime_env.local.yaml").read_text())
    assert env["working_dir"] == "."
    assert "pip" not in env and "conda" not in env and "uv" not in env  # works offline
    assert "CIFAR_RAY_STORAGE" not in env.get("env_vars", {})


def test_readme_shows_a_submit_line_per_job():
    text = (JOBS / "README.md").read_text()
    for script in ENTRYPOINTS:
        assert re.search(rf"ray job submit [^\n]*(\\\n[^\n]*)*python jobs/{script}", text), script
    for command in ("ray job logs", "--follow", "ray job stop", "ray job status"):
        assert command in text
