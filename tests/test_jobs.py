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
    checked = S.check(parsed, settings)  # every trial's config and model build
    assert (checked if isinstance(checked, int) else len(checked)) == trials


def test_smoke_space_unknown_variant(jobs):
    with pytest.raises(jobs.JobError, match="no variant nope"):
        jobs.smoke_space("seed-journey", ["nope"])


# ---------------------------------------------------------------- runtime environments

def _project_dependencies() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if not d.startswith("ray")]


def test_runtime_env_installs_the_project_dependencies():
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert env["pip"]["packages"] == _project_dependencies()
    assert env["env_vars"]["CIFAR_RAY_STORAGE"].startswith("s3://CHANGE-ME")  # refused until set
    assert ".git/" in env["excludes"]


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
