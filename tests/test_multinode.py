"""cifar-ray on a real Ray cluster of several nodes, all on this machine: a head with no CPUs
and two 1-CPU worker nodes (`ray.cluster_utils.Cluster`; each node its own raylet, object
store and worker processes), every node on 127.0.0.1, Ray's files in a private temp dir, and
the cluster stopped by its own handle (never a machine-wide `ray stop`). The drivers are
real `cifar-ray` processes that join it through RAY_ADDRESS, as `ray job submit` would.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cifar_ray import rundir
from cifar_ray.train import loopback
from helpers import DETERMINISTIC, TINY_SPEC

LOOPBACK = "127.0.0.1"
RUN = ["--data", "synthetic:400", "--batch-size", 64, "--lr", 0.05, "--epochs", 2,
       "--workers", 2, "--set", "scale.cpus_per_worker=1"]


class Nodes:
    """The test cluster and what the tests need of it."""

    def __init__(self, tmp: str):
        from ray.cluster_utils import Cluster

        self.tmp = tmp
        os.makedirs(f"{tmp}/ray")  # Ray's default temp dir under RAY_TMPDIR
        with loopback():
            self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
                "num_cpus": 0, "node_ip_address": LOOPBACK, "temp_dir": f"{tmp}/ray",
                "include_dashboard": False})
        assert self.cluster.address.startswith(LOOPBACK + ":"), self.cluster.address
        self.workers = [self.add() for _ in range(2)]

    def add(self):
        with loopback():
            node = self.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        self.cluster.wait_for_nodes()
        return node

    def holding(self, pid: int):
        """The worker node whose raylet started process `pid` (Ray workers are its children)."""
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return next(n for n in self.workers
                    if n.all_processes["raylet"][0].process.pid == ppid)

    def lose(self, node) -> None:
        """The node gone at once, as a preempted machine: every process of it killed."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def env(self, fault: str = "", fault_dir: Path | None = None) -> dict:
        env = {**os.environ, "RAY_ADDRESS": self.cluster.address, "RAY_TMPDIR": self.tmp,
               "RAY_USAGE_STATS_ENABLED": "0"}
        if fault:
            env.update(CIFAR_RAY_FAULT=fault, CIFAR_RAY_FAULT_DIR=str(fault_dir))
        return env


@pytest.fixture(scope="module")
def nodes():
    pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="crm-")  # short: Ray's socket paths live under it
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = tmp  # Ray's address file goes here, not into /tmp/ray
    os.environ.pop("RAY_ADDRESS", None)
    cluster = None
    try:
        cluster = Nodes(tmp)
        yield cluster
    finally:
        if cluster is not None:
            cluster.cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPEC)
    return str(path)


def cli(args: list, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "cifar_ray", *map(str, args)], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def wait_for_pid(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the driver ended before anything reached {path.stem}"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    pytest.fail(f"nothing reached {path.stem} in {timeout:.0f} s")


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The reference: the same run on a local Ray that `cifar-ray train` starts itself."""
    tmp = tmp_path_factory.mktemp("one-node")
    (tmp / "tiny.yaml").write_text(TINY_SPEC)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cro-")
    try:
        log = tmp / "log.txt"
        out = finish(cli(["train", "--model", tmp / "tiny.yaml", *RUN, "--out", tmp / "run"],
                         env, log), log)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert "epoch   2/2" in out, out
    return tmp / "run"


@pytest.mark.ray
def test_a_local_run_listens_on_loopback_and_says_where_it_ran(one_node):
    summary = json.loads((one_node / "summary.json").read_text())
    workers = summary["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert {w["node_ip"] for w in workers} == {LOOPBACK}  # not the machine's interface
    assert len({w["node_id"] for w in workers}) == 1 and workers[0]["node_id"]
    assert {w["device"] for w in workers} == {"cpu"} and "gpu" not in workers[0]


@pytest.mark.ray
def test_ddp_across_nodes_survives_a_lost_node_and_matches_one_node(nodes, one_node, spec,
                                                                    tmp_path):
    """Two workers on two nodes (the head has no CPU); the node of rank 1 is killed in the
    middle of epoch 2 and a new node joins: Ray Train restarts the group from the epoch-1
    checkpoint, the run ends with one row per epoch, and its metrics are the one-node run's."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    driver = cli(["train", "--model", spec, *RUN, "--out", out],
                 nodes.env("train-step:rank=1:epoch=2:step=1", tmp_path), log)
    try:
        lost = nodes.holding(wait_for_pid(tmp_path / "train-step.pid", driver))
        nodes.lose(lost)
        nodes.workers.append(nodes.add())  # the replacement
    except BaseException:
        driver.kill()
        raise
    text = finish(driver, log)
    assert driver.returncode == 0, text
    rows = rundir.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    ref = rundir.read_metrics(one_node / "metrics.csv")
    for row, want in zip(rows, ref):
        for key in DETERMINISTIC:
            assert row[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (key, row, want)
    workers = json.loads((out / "summary.json").read_text())["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2  # one worker per node: gloo between nodes
    assert lost.node_id not in {w["node_id"] for w in workers}
    assert {w["node_ip"] for w in workers} == {LOOPBACK}


@pytest.mark.ray
def test_a_sweep_loses_no_trial_with_a_node(nodes, spec, tmp_path):
    """Two trials at once, one per node; the node of one is killed after its epoch 1 and a
    new node joins: the trial restarts from its checkpoint there, both trials run every
    epoch, and trials.csv says on which node each ran."""
    import csv

    space = tmp_path / "space.yaml"
    space.write_text(f"base: {{model: {{name: {spec}}}, train: {{epochs: 2, batch_size: 64}}}}\n"
                     "grid: {optim.lr: [0.04, 0.05]}\n")
    out, log = tmp_path / "sweep", tmp_path / "log.txt"
    driver = cli(["tune", "--space", space, "--data", "synthetic:400", "--grace", 2,
                  "--cpus-per-trial", 1, "--concurrent", 2, "--out", out],
                 nodes.env("trial-epoch:lr=0.05:epoch=1", tmp_path), log)
    try:
        lost = nodes.holding(wait_for_pid(tmp_path / "trial-epoch.pid", driver))
        nodes.lose(lost)
        nodes.workers.append(nodes.add())
    except BaseException:
        driver.kill()
        raise
    text = finish(driver, log)
    assert driver.returncode == 0, text
    with open(out / "trials.csv", newline="") as f:
        trials = {row["optim.lr"]: row for row in csv.DictReader(f)}
    assert set(trials) == {"0.04", "0.05"}
    assert [(t["status"], t["epochs"]) for t in trials.values()] == [("done", "2")] * 2
    assert trials["0.05"]["node_id"] not in ("", lost.node_id)
    assert all(len(t["node_id"]) == 56 for t in trials.values())


@pytest.mark.ray
def test_a_run_folder_another_node_does_not_see_is_refused(nodes, spec, tmp_path):
    """A node whose view of the run folder's parent is its own (a private mount namespace
    with an empty tmpfs there, as a machine with its own disk): refused with one line before
    anything is written, naming the folder and suggesting a bucket."""
    private = tmp_path / "private"
    private.mkdir()
    join = ("import signal, sys, ray._private.node as N, ray._private.parameter as P; "
            "from cifar_ray.train import loopback\n"
            "with loopback(): N.Node(P.RayParams(gcs_address=sys.argv[1], node_ip_address="
            "'127.0.0.1', num_cpus=0, min_worker_port=0, max_worker_port=0, node_manager_port=0,"
            " include_log_monitor=False, object_store_memory=100 * 2**20), head=False)\n"
            "signal.pause()")
    start = (f"mount -t tmpfs none {private} && exec {sys.executable} -c \"$0\" "
             f"{nodes.cluster.address}")
    before = len(nodes.cluster.global_state._live_node_ids())
    blind = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", start,
                              join], env=nodes.env(),
                             stdout=open(tmp_path / "blind.txt", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(nodes.cluster.global_state._live_node_ids()) == before:
            if blind.poll() is not None:
                pytest.skip("no node with a private mount namespace here (unshare needs "
                            "CAP_SYS_ADMIN): " + (tmp_path / "blind.txt").read_text()[-300:])
            assert time.monotonic() < deadline, "the blind node never joined"
            time.sleep(0.5)
        log = tmp_path / "log.txt"
        driver = cli(["train", "--model", spec, *RUN, "--out", private / "run"], nodes.env(), log)
        text = finish(driver, log)
        assert driver.returncode == 2, text
        assert text.strip().splitlines()[-1].startswith(
            f"error: --out {private / 'run'}: a folder that 1 of the Ray cluster's 4 nodes"), text
        assert "do not see" in text and "s3://" in text and "Traceback" not in text
        assert not (private / "run").exists() and list(private.iterdir()) == []
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the node's processes, all in its group
            try:
                os.killpg(blind.pid, sig)
                blind.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                pass


# ---------------------------------------------------------------- no Ray needed

def test_the_config_carries_a_spec_files_layers(spec, tmp_path):
    """What a worker on another node builds from: the layers, read once by the driver."""
    import torch

    from cifar_ray import config as C
    from cifar_ray import engine

    cfg = C.portable(C.load_config(overrides=[f"model.name={spec}"]))
    assert cfg.model.name == spec and len(cfg.model.spec) == 5
    Path(spec).unlink()  # a node without the file
    model = engine.make_model(cfg, 10, torch.device("cpu"))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # a registered name in place of the file: the file's layers are not this model's
    named = C.portable(C.replace(cfg, model__name="seed-small"))
    assert named.model.spec == []
    # a --model or a sweep's variant naming another model starts without the base's layers
    data = C.apply(C.to_dict(cfg), {"model.name": "cnn"})
    assert data["model"]["spec"] == [] and data["model"]["args"] == {}


# ---------------------------------------------------------------- autoscaling from zero

@pytest.mark.ray
def test_the_smoke_job_scales_the_local_cluster_from_zero_and_back(tmp_path):
    """cluster/local.yaml on Ray's fake_multinode provider: the smoke DDP job (2 workers)
    submitted with `ray job submit` to a head without CPUs; the autoscaler adds two worker
    nodes, the job succeeds, and the nodes are gone after the idle timeout. (The test's copy
    of the config: a free port, a 6 s idle timeout, and no 4-slot types, which would take
    both workers on one node.)"""
    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes

    from helpers import RAY, free_ports

    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics = free_ports(7)
    conf = yaml.safe_load(Path("cluster/local.yaml").read_text())
    conf["provider"]["gcs_address"] = f"{LOOPBACK}:{gcs}"
    conf["idle_timeout_minutes"] = 0.1
    for name in ("gpu-4x-spot", "gpu-4x-ondemand"):
        conf["available_node_types"][name]["max_workers"] = 0
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(conf))
    ray_tmp = tempfile.mkdtemp(prefix="cra-")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_FAKE_CLUSTER": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_TMPDIR": ray_tmp,
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "CIFAR_RAY_STORAGE": str(tmp_path / "storage"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs}",
         "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--autoscaling-config={tmp_path / 'local.yaml'}",
         f"--temp-dir={ray_tmp}/ray"], env=env, stdout=open(tmp_path / "head.txt", "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{dash}"

    def workers() -> int:
        try:
            return sum(1 for n in list_nodes(address=api, raise_on_missing_output=False)
                       if n.state == "ALIVE" and not n.is_head_node)
        except Exception:  # the dashboard not up yet
            return -1

    try:
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", api], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (tmp_path / "head.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the head never served jobs"
            time.sleep(2)
        assert workers() == 0  # from zero
        submit = [RAY, "job", "submit", "--address", api, "--submission-id", "smoke",
                  "--no-wait", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.local.yaml",
                  "--", "python", "jobs/train_ddp.py", "--smoke", "--workers", "2", "--cpu",
                  "--no-resource-check"]
        t0 = time.monotonic()
        while (sent := subprocess.run(submit, env=env, capture_output=True, text=True)).returncode:
            assert "No available agent" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
            assert time.monotonic() - t0 < 120, "the head's job agent never came up"
            time.sleep(2)  # the head's agent starts after its job server
        t0 = time.monotonic()
        client = JobSubmissionClient(api)
        most, up_s, busy, gone = 0, None, None, None  # seconds since submit

        def watch() -> None:
            nonlocal most, up_s, busy, gone
            n, now = workers(), time.monotonic() - t0
            most = max(most, n)
            if n >= 2:
                up_s = now if up_s is None else up_s
                busy, gone = now, None
            elif n == 0 and busy is not None and gone is None:
                gone = now

        while (status := client.get_job_status("smoke")) not in (
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            watch()
            assert time.monotonic() - t0 < 400, "the job did not end"
            time.sleep(1)
        text = client.get_job_logs("smoke")
        assert status == JobStatus.SUCCEEDED, text[-4000:]
        ended = time.monotonic() - t0
        while gone is None:
            watch()
            assert time.monotonic() - t0 - ended < 120, "the idle nodes were not removed"
            time.sleep(1)
        # the two nodes the job asked for came up; in one CI run of many the autoscaler
        # launched 4 (the job still ran on 2 nodes, below), so more is not a failure
        assert most >= 2, text[-2000:]
        print(f"\nautoscaling: {most} worker nodes at most, 2 up {up_s:.0f} s after submit; the "
              f"job ended at {ended:.0f} s; all gone at {gone:.0f} s ({gone - busy:.0f} s after "
              "they were last seen)")
        # what the job leaves in its storage: the whole run folder of a 2-worker DDP run
        run = next((tmp_path / "storage").rglob("summary.json")).parent
        assert f"results: {run}" in text
        summary = json.loads((run / "summary.json").read_text())
        assert len({w["node_id"] for w in summary["workers"]}) == 2
        assert summary["epochs"] == 1 and summary["model"] == "cnn"
        assert 0.0 <= summary["final_val_acc"] <= 1.0
        for name in ("config.yaml", "metrics.csv", "curves.png"):
            assert (run / name).is_file(), name
        assert (run / summary["last_checkpoint"]).is_file()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["scale"]["workers"] == 2 and config["scale"]["gpu"] is False
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
