"""The GPU preflight (cifar_ray/preflight.py): its verdict on what each GPU worker reports,
and its refusal on a node that Ray says has a GPU where CUDA is absent (this machine, with
Ray told num_gpus=1) for `cifar-ray train --gpu` and the GPU job entrypoints of jobs/:
one `error:` line naming the node and the fix, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cifar_ray.preflight import gpu_text, problem

REPO = Path(__file__).resolve().parents[1]

GOOD = {"node": "10.0.1.7", "host": "ip-10-0-1-7", "torch": "2.14.1+cu128", "cuda_build": "12.8",
        "visible": "0", "driver": "570.172.08", "driver_cuda": "12.8", "gpu": "NVIDIA A10G",
        "available": True, "error": None}


def test_a_matching_stack_passes():
    assert problem(GOOD) is None
    # CUDA's minor-version compatibility: a 12.8 build on a 12.4-era driver runs.
    assert problem({**GOOD, "driver": "550.90.07", "driver_cuda": "12.4"}) is None
    assert gpu_text(GOOD) == ("10.0.1.7 (ip-10-0-1-7): NVIDIA A10G, driver 570.172.08 (CUDA 12.8), "
                              "torch 2.14.1+cu128 (CUDA 12.8)")


@pytest.mark.parametrize("change,words", [
    # PyPI's default torch (a CUDA 13 build) on the 570 driver of the GCP image family
    ({"torch": "2.14.1+cu130", "cuda_build": "13.0", "available": False},
     ["driver 570.172.08 supports CUDA up to 12.8", "built for CUDA 13.0", "constraints.txt"]),
    # Ray's default AWS AMI: a CUDA 11.x-era driver
    ({"driver": "460.73.01", "driver_cuda": "11.2", "available": False},
     ["supports CUDA up to 11.2", "built for CUDA 12.8"]),
    ({"driver": None, "driver_cuda": None, "gpu": None, "available": False},
     ["no NVIDIA driver answers", "CUDA_VISIBLE_DEVICES=0", "without --gpu"]),
    ({"torch": "2.14.1+cpu", "cuda_build": None, "available": False}, ["CPU-only build"]),
    ({"error": "CUDA error: no kernel image is available for execution on the device"},
     ["no kernel image", "NVIDIA A10G"]),
    ({"available": False}, ["CUDA is not available", "driver 570.172.08"]),
])
def test_a_mismatch_is_named(change, words):
    why = problem({**GOOD, **change})
    assert why and "\n" not in why
    for w in words:
        assert w in why, (w, why)


# Runs in a fresh Python with its own Ray (told it has one GPU; this machine has no CUDA
# driver), its own temp dir and HOME (Ray writes ~/.ray/auth_token): each case's exit code,
# stdout and stderr as JSON.
SIMULATED_GPU_NODE = r"""
import contextlib, io, json, runpy, sys
import ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         _node_ip_address="127.0.0.1", _temp_dir=sys.argv[2])
from cifar_ray.cli import main
out = sys.argv[1] + "/storage"
cases = {
    "train": lambda: main(["train", "--gpu", "--model", "cnn", "--data", "synthetic:600",
                           "--batch-size", "64", "--epochs", "1", "--out", out + "/direct"]),
    "train_ddp": lambda: runpy.run_path("jobs/train_ddp.py", run_name="__main__"),
    "seed_journey": lambda: runpy.run_path("jobs/seed_journey.py", run_name="__main__"),
}
argv = {"train_ddp": ["train_ddp.py", "--workers", "1", "--cpus-per-worker", "1", "--storage", out,
                      "--name", "r1"],
        "seed_journey": ["seed_journey.py", "--storage", out, "--name", "s1"]}
results = {}
for name, case in cases.items():
    sys.argv = argv.get(name, ["cifar-ray"])
    o, e = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            case()
        except SystemExit as done:
            code = done.code
    results[name] = {"code": code, "out": o.getvalue(), "err": e.getvalue()}
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_gpu_node_without_cuda_is_refused(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0",
           "CIFAR_RAY_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "jobs")}
    env.pop("RAY_ADDRESS", None)
    env.pop("CIFAR_RAY_STORAGE", None)
    ray_tmp = tempfile.mkdtemp(prefix="cr-")  # Ray's socket paths must stay short
    try:
        done = subprocess.run([sys.executable, "-c", SIMULATED_GPU_NODE, str(tmp_path), ray_tmp],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(line[0][len("RESULTS "):])
    for name, r in results.items():
        assert r["code"] == 2, (name, r)
        errors = [x for x in r["err"].splitlines() if x.startswith("error:")]
        assert len(errors) == 1, (name, r["err"])
        assert re.match(r"error: GPU preflight failed on node [\d.]+ \(\S+\): ", errors[0]), errors
        assert "no NVIDIA driver answers" in errors[0] and "without --gpu" in errors[0]
        # each GPU worker's report comes first: torch and its CUDA build, the driver, the GPU
        assert re.search(r"GPU preflight: [\d.]+ \(\S+\): no GPU, no NVIDIA driver, torch ", r["out"])
    assert "torch" in results["train"]["out"] and "no NVIDIA driver" in results["train"]["out"]
    assert not (tmp_path / "storage" / "direct").exists()  # nothing written
    written = [p for p in (tmp_path / "storage").rglob("*")] if (tmp_path / "storage").exists() else []
    assert written == [] or all(p.is_dir() for p in written), written  # the jobs wrote nothing
