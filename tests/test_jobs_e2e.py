"""End to end: a real Ray head on 127.0.0.1 (dashboard + job server, token auth), a sweep job
of jobs/ submitted in smoke mode with the `ray job submit` CLI, its results checked in the
run storage, `cifar-ray report` run on the sweep. The other two sweep jobs run the same code
with other arguments: test_jobs.py checks their commands and smoke spaces without Ray; the
DDP training job is submitted to the autoscaling cluster of test_multinode.py.

The head is private to this module: its own temp dir (so no `ray_current_cluster` file or
session is left where other tests' Ray looks), its own free ports, its own token, and it is
stopped by its process (SIGTERM to `ray start --block`, then its process group and every
process it started), never by name. The dashboard and job server listen on 127.0.0.1 only;
Ray itself swaps a loopback node address for the machine's own for GCS and the raylet (by
design, so that other nodes could join), which the token protects.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from helpers import RAY, free_ports

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")]

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 420  # generous: the machine may be shared and busy


# ---------------------------------------------------------------- the private head

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below `pid` (start time guards against reuse)."""
    tree, out, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            started = _start_time(child)
            if started is not None:
                out[child] = started
                todo.append(child)
    return out


class Head:
    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"
        self.token_path = root / "token"
        self.token_path.write_text(os.urandom(24).hex())
        self.storage = root / "storage"
        (self.gcs_port, self.dashboard_port, client, agent_http, agent_grpc, runtime_env,
         metrics, node_manager, object_manager) = free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = self._env(root)
        self.log = root / "ray-start.log"
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent_http}",
               f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--num-cpus=6", f"--object-store-memory={300 * 1024**2}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=root,
                                         start_new_session=True)

    def _env(self, root: Path) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update({
            # Token auth as on the cloud clusters of cluster/: the head and every client use
            # this private token; the user's ~/.ray/auth_token is never read or written.
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops it at once
            "CIFAR_RAY_HOME": str(root / "cache"),  # the prepared-data cache of the jobs
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        env.pop("CIFAR_RAY_STORAGE", None)
        return env

    def wait_ready(self, timeout: float = 240) -> None:
        """Until `ray start` has written its address file (its last step before it blocks)
        and the job server answers."""
        deadline = time.monotonic() + timeout
        address_file = self.temp_dir / "ray_current_cluster"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_tail()}")
            if address_file.is_file() and self.ray("job", "list", check=False, timeout=30).returncode == 0:
                self.gcs_address = address_file.read_text().strip()
                return
            time.sleep(2)
        raise RuntimeError(f"the head was not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def ray(self, *args, check: bool = True, timeout: float = JOB_TIMEOUT_S, env: dict | None = None):
        args = list(args)
        if args[0] == "job":
            args[2:2] = ["--address", self.address]
        result = subprocess.run([RAY, *args], env=env or self.env, capture_output=True, text=True,
                                timeout=timeout, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
        return result

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its processes), then SIGKILL to its
        process group and to anything it started that is still alive."""
        if self.proc.poll() is None:
            below = _descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        else:
            below = {}
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, started in below.items():
            if _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head(request):
    # A short path: Ray's unix sockets live under the temp dir (limit ~107 characters).
    root = Path(tempfile.mkdtemp(prefix="crj-", dir="/tmp"))
    h = Head(root)
    request.addfinalizer(lambda: (h.stop(), shutil.rmtree(root, ignore_errors=True)))
    h.wait_ready()
    return h


# Entrypoints of jobs/ in smoke mode: (script, extra arguments), in lanes that run side by
# side, each lane one job after the other. Sweeps would share a lane: two `cifar-ray tune`
# drivers that start in the same second on one head share Ray Tune's staging folder
# (session/artifacts/<second>/tune) and mix their trials.
JOBS = {  # the DDP smoke job runs in test_multinode.py, on the autoscaling cluster
    "smoke-seed-journey": ("seed_journey.py", []),
}
LANES = [["smoke-seed-journey"]]


def submit_cmd(head: Head, name: str, script: str, *args: str) -> list[str]:
    return [RAY, "job", "submit", "--address", head.address, "--working-dir", str(REPO),
            "--runtime-env", str(REPO / "jobs" / "runtime_env.local.yaml"),
            "--submission-id", name, "--",
            "python", f"jobs/{script}", "--smoke", "--storage", str(head.storage), *args]


class Submitted:
    """`ray job submit` (the CLI, which follows the logs until the job ends) of every job,
    lane by lane in background threads; `result(name)` waits for one."""

    def __init__(self, head: Head):
        self.head = head
        self.results: dict[str, tuple[int, str]] = {}
        self.done = {name: threading.Event() for name in JOBS}
        self.threads = [threading.Thread(target=self._lane, args=(lane,), daemon=True)
                        for lane in LANES]
        for t in self.threads:
            t.start()

    def _lane(self, lane: list[str]) -> None:
        for name in lane:
            script, args = JOBS[name]
            try:
                r = subprocess.run(submit_cmd(self.head, name, script, *args), env=self.head.env,
                                   cwd=REPO, text=True, capture_output=True, timeout=JOB_TIMEOUT_S)
                self.results[name] = (r.returncode, r.stdout + r.stderr)
            except subprocess.TimeoutExpired as e:
                self.head.ray("job", "stop", name, check=False, timeout=60)
                self.results[name] = (-1, f"timed out after {JOB_TIMEOUT_S}s\n{e.stdout or ''}")
            finally:
                self.done[name].set()

    def result(self, name: str) -> tuple[int, str]:
        self.done[name].wait(timeout=JOB_TIMEOUT_S * len(JOBS))
        return self.results.get(name, (-1, "no result: the lane did not finish"))


@pytest.fixture(scope="module")
def submitted(head):
    return Submitted(head)


def finished(head: Head, returncode: int, output: str, name: str) -> str:
    """Fail showing the job's logs unless `ray job submit` exited 0 and `ray job status`
    says it succeeded. Returns what `ray job submit` printed."""
    status = head.ray("job", "status", name, check=False, timeout=60)
    said = status.stdout + status.stderr
    if returncode != 0 or f"job '{name}' succeeded" not in said.lower():
        logs = head.ray("job", "logs", name, check=False, timeout=60)
        pytest.fail(f"job {name} did not succeed (ray job submit exit {returncode}):\n"
                    f"{said.strip()}\n--- ray job logs {name} ---\n{logs.stdout[-8000:]}"
                    f"{logs.stderr[-2000:]}\n--- ray job submit ---\n{output[-4000:]}",
                    pytrace=False)
    return output


# ---------------------------------------------------------------- the tests

def test_head_refuses_a_client_without_the_token(head):
    env = {**head.env, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN_PATH")
    result = head.ray("job", "list", check=False, timeout=60, env=env)
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert "401" in said or "unauthorized" in said.lower(), said[-2000:]


def test_head_advertises_itself_only_in_its_temp_dir(head):
    """Ray's default temp dir, where `ray.init()` of other tests looks, never names this head."""
    assert head.gcs_address.endswith(f":{head.gcs_port}")
    from ray._common.utils import get_ray_address_file

    default = Path(get_ray_address_file(None))  # /tmp/ray/ray_current_cluster
    assert not default.is_file() or default.read_text().strip() != head.gcs_address


SWEEPS = {  # job -> (column of trials.csv, the values its trials must show)
    "smoke-seed-journey": ("variant", {"s01-five-layers", "s10-many-filters"}),
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_sweep_job(head, submitted, name, tmp_path):
    output = finished(head, *submitted.result(name), name)
    sweep = head.storage / "sweeps" / name
    assert f"results: {sweep}" in output
    with open(sweep / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    column, values = SWEEPS[name]
    assert {t[column] for t in trials} == values
    assert all(t["status"] == "done" and float(t["best_val_acc"]) >= 0 for t in trials), trials
    # `cifar-ray report` works on the results as fetched from the storage (a copy).
    copy = tmp_path / name
    shutil.copytree(sweep, copy)
    (copy / "report.md").unlink()
    result = subprocess.run([sys.executable, "-m", "cifar_ray", "report", str(copy)],
                            capture_output=True, text=True, timeout=120, env=head.env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (copy / "report.md").read_text()
    assert f"# Sweep report: {name}" in report
    for t in trials:
        assert t["trial_id"] in report


def test_a_failing_job_fails_showing_its_logs(head):
    """A job given the placeholder storage fails: `ray job submit` exits 1, and the test
    failure that `finished` reports carries the job's own error line from its logs."""
    name = "smoke-bad-storage"
    cmd = submit_cmd(head, name, "train_ddp.py") + ["--storage", "s3://CHANGE-ME/runs"]
    r = subprocess.run(cmd, env=head.env, cwd=REPO, text=True, capture_output=True,
                       timeout=JOB_TIMEOUT_S)
    assert r.returncode == 1, r.stdout[-4000:]
    with pytest.raises(pytest.fail.Exception) as failure:
        finished(head, r.returncode, r.stdout + r.stderr, name)
    shown = str(failure.value)
    assert f"job {name} did not succeed" in shown and f"--- ray job logs {name} ---" in shown
    assert "error: run storage 's3://CHANGE-ME/runs' is still the placeholder" in shown
