"""What a sweep left running overnight on preemptible machines meets, on CPU with tiny data:
a DDP worker killed mid-epoch, a `tune` driver killed mid-sweep, SIGKILL in the middle of a
write; determinism of the metrics; a 12-trial sweep on one data copy.

Real processes are killed at known places: cifar_ray.faults makes the process that reaches
a named point write its PID to a file and wait, the test kills that PID. `pytest -m faults`
runs these alone (2.5-4 minutes on the shared 2-core VM)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cifar_ray import rundir
from cifar_ray import sweepdir as D
from cifar_ray.cli import main
from helpers import SWEEP_BASE, TINY_SPEC, tiny_spec

pytestmark = pytest.mark.faults

AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# ---------------------------------------------------------------- processes (Linux /proc)

def _procs() -> dict[int, tuple[int, str, str]]:
    """PID -> (parent PID, state, command line) of every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        out[int(stat.parent.name)] = (int(fields[1]), fields[0], cmd)
    return out


def _tree(root: int) -> dict[int, str]:
    """PID -> command line of the descendants of `root`."""
    procs, found, todo = _procs(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, cmd) in procs.items():
            if ppid == parent:
                found[pid] = cmd
                todo.append(pid)
    return found


def _alive(pids: dict[int, str]) -> dict[int, str]:
    """Those of `pids` still running as the same program (not a zombie, not a reused PID)."""
    procs = _procs()
    return {pid: cmd for pid, cmd in pids.items()
            if pid in procs and procs[pid][1] != "Z" and procs[pid][2] == cmd}


def _kill(pids: dict[int, str]) -> None:
    for pid in _alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env(tmp: Path, fault: str = "") -> dict:
    """A subprocess's environment: its own local Ray (temp files under a short private path:
    Ray's socket paths must stay short), and a fault point if given."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="crf-")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if fault:
        env.update(CIFAR_RAY_FAULT=fault, CIFAR_RAY_FAULT_DIR=str(tmp))
    return env


def _wait_for_pid(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> int:
    """The PID a fault point wrote, once the process that reached it is waiting there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the process ended before it reached {path.stem}"
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    pytest.fail(f"nothing reached {path.stem} in {timeout:.0f} s")


def _kill_at(point: str, proc: subprocess.Popen, tmp: Path, env: dict) -> None:
    """Wait until `proc` waits at fault `point`, then SIGKILL it and drop its Ray temp dir."""
    try:
        assert _wait_for_pid(tmp / f"{point}.pid", proc) == proc.pid
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def _run_cli(args: list, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "cifar_ray", *map(str, args)], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture
def spec(tmp_path):
    return tiny_spec(tmp_path / "tiny.yaml")


# ---------------------------------------------------------------- 1. a DDP worker dies

@pytest.mark.ray
def test_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(spec, tmp_path):
    """Rank 1 of a 2-worker run is SIGKILLed at step 6 of epoch 2 (11 steps an epoch); Ray
    restarts the worker group from epoch 1's checkpoint and the run finishes all 3 epochs,
    one metrics row each, epoch 1 trained once."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    env = _env(tmp_path, "train-step:rank=1:epoch=2:step=6")
    proc = _run_cli(["train", "--model", spec, "--data", "synthetic:800", "--batch-size", 64,
                     "--lr", 0.05, "--workers", 2, "--epochs", 3,
                     "--set", "scale.cpus_per_worker=1", "--out", out], env, log)
    ray_procs = {}
    try:
        pid = _wait_for_pid(tmp_path / "train-step.pid", proc)
        ray_procs = _tree(proc.pid)
        assert "RayTrainWorker" in ray_procs.get(pid, ""), ray_procs.get(pid)
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=240)
    finally:
        proc.kill()
        _kill(ray_procs)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    output = log.read_text()
    assert proc.returncode == 0, output
    assert f"Worker PID: {pid}" in output  # Ray saw the worker die
    # Restarted from epoch 1's checkpoint (not from scratch): epoch 1 ran once.
    assert output.count("epoch   1/3") == 1 and "epoch   3/3" in output, output
    rows = rundir.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["best_val_acc"] > 0.2  # chance: 0.1


# ---------------------------------------------------------------- 2. the tune driver dies

def _wait_for_midway(out: Path, driver: subprocess.Popen, pid_file: Path,
                     timeout: float = 240.0):
    """(finished trial ids, running trial ids with a checkpoint) once a trial has finished
    and the last one waits at its fault point with its epoch-2 checkpoint reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        finished = set(D.read_status(out))
        exp = D.experiment_dir(out)
        running = {d.name for d in (exp.iterdir() if exp else ())
                   if d.name not in finished and any(d.glob("checkpoint_*/epoch.json"))}
        if finished and running and pid_file.exists():
            time.sleep(3.0)  # let Tune record the checkpoint in its experiment state
            return finished, running
        time.sleep(0.2)
    pytest.fail("no trial finished in time")


def _epochs_reported(out: Path, trial_id: str) -> list[int]:
    path = D.experiment_dir(out) / trial_id / "result.json"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.ray
def test_killed_tune_driver_leaves_no_ray_behind_and_resumes_every_trial_once(ray_local, tmp_path):
    """`cifar-ray tune` (its own local Ray) is SIGKILLed once a trial has finished and another
    has a checkpoint. Ray's processes die with it (the two agents soon after: stopped here);
    `tune --resume` on another Ray keeps the finished trials as they were, continues the
    others, and lists every trial once."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": SWEEP_BASE,
                                     "grid": {"optim.lr": [0.1, 0.05, 0.08, 0.12]}}))
    out, log = tmp_path / "sweep", tmp_path / "tune.log"
    env = _env(tmp_path, "trial-epoch:lr=0.12:epoch=2")  # the last trial waits there
    driver = _run_cli(["tune", "--space", space, "--data", "synthetic:800", "--concurrent", 2,
                       "--grace", 3, "--out", out], env, log)
    ray_procs = {}
    try:
        finished, running = _wait_for_midway(out, driver, tmp_path / "trial-epoch.pid")
        ray_procs = _tree(driver.pid)
        before = {t: (D.experiment_dir(out) / t / "result.json").read_bytes() for t in finished}
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and set(_alive(ray_procs).values()) - set(AGENTS):
            time.sleep(0.2)
        left = _alive(ray_procs)
    finally:
        driver.kill()
        _kill(ray_procs)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    print(f"{len(ray_procs)} Ray processes; {len(left)} left 20 s after the kill (stopped "
          f"here): {sorted(set(left.values()))}")
    assert any("gcs_server" in c for c in ray_procs.values()), ray_procs  # it started its own
    assert set(left.values()) <= set(AGENTS), left  # GCS, raylet, trial workers: gone
    assert not _alive(ray_procs)
    assert not (out / "trials.csv").exists()  # the driver never got to the end

    result = CliRunner().invoke(main, ["tune", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    trials = D.read_sweep(out).trials
    assert sorted(t.trial_id for t in trials) == sorted({t.trial_id for t in trials})
    assert len(trials) == 4 and all(t.status == "done" and t.epochs == 3 for t in trials), \
        [(t.trial_id, t.status, t.epochs) for t in trials] + [result.output]
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 1 + 4
    rows = pq.read_table(out / "results.parquet").to_pylist()
    for t in trials:
        assert sorted(r["epoch"] for r in rows if r["trial_id"] == t.trial_id) == [1, 2, 3]
    for t, data in before.items():  # finished trials were not run again
        assert (D.experiment_dir(out) / t / "result.json").read_bytes() == data
    for t in running:  # continued from their checkpoint, not from scratch
        assert _epochs_reported(out, t).count(1) == 1, t


# ---------------------------------------------------------------- 3. SIGKILL mid-write

def test_prepare_killed_mid_write_leaves_the_cache_without_the_dataset(tmp_path, _isolated_home):
    """`data prepare` is SIGKILLed with every file written but the folder not yet renamed
    into the cache: the cache holds no dataset (only a hidden temp folder), and preparing
    again works and clears that leftover once it is old."""
    from cifar_ray.data import load, read_meta

    env = _env(tmp_path, "atomic-dir")
    proc = _run_cli(["data", "prepare", "synthetic:3000"], env, tmp_path / "prepare.log")
    _kill_at("atomic-dir", proc, tmp_path, env)
    cache = _isolated_home / "prepared"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    (leftover,) = cache.glob(".*.tmp")
    assert (leftover / "meta.json").is_file()  # killed after the files, before the rename
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    ds = load("synthetic:3000")
    assert len(ds.splits["train"][1]) == 3000 and read_meta(ds.path)["splits"]["train"]["count"] == 3000
    assert not leftover.exists()


@pytest.mark.parametrize("what", ["checkpoint", "metrics"])
def test_write_killed_before_the_rename_keeps_the_previous_file(what, tmp_path):
    """A process SIGKILLed between writing a new checkpoint/metrics.csv and renaming it over
    the old one leaves the old one, complete; the new bytes sit in a hidden temp file."""
    import torch

    from cifar_ray import checkpoint

    folder = tmp_path / "run"
    folder.mkdir()
    row = {"epoch": 1, "train_loss": 2.0, "val_acc": 0.2}
    if what == "checkpoint":
        path = folder / "state.pt"
        checkpoint.save_state({"format": checkpoint.FORMAT, "epoch": 1, "w": torch.ones(10)}, path)
        code = ("import sys, torch; from cifar_ray.checkpoint import save_state; "
                "save_state({'format': 1, 'epoch': 2, 'w': torch.zeros(2_000_000)}, sys.argv[1])")
    else:
        path = folder / "metrics.csv"
        rundir.write_metrics([row], path)
        code = ("import sys; from cifar_ray.rundir import write_metrics; write_metrics("
                "[{'epoch': 1, 'train_loss': 2.0, 'val_acc': 0.2}, "
                "{'epoch': 2, 'train_loss': 1.0, 'val_acc': 0.5}], sys.argv[1])")
    env = _env(tmp_path, f"atomic-write:name={path.name}")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env)
    _kill_at("atomic-write", proc, tmp_path, env)
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == [path.name]
    (temp,) = folder.glob(f".{path.name}.*.tmp")
    if what == "checkpoint":
        assert torch.load(path, weights_only=True)["epoch"] == 1
        assert torch.load(temp, weights_only=True)["epoch"] == 2  # the new one was written in full
    else:
        assert rundir.read_metrics(path) == [row]
        assert len(rundir.read_metrics(temp)) == 2


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Files and folders written atomically get what open()/mkdir() would give (temp files
    are private, 0600/0700, and used to keep that mode after the rename)."""
    from cifar_ray.fsutil import atomic_dir, atomic_write

    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    atomic_write(tmp_path / "atomic.txt", "x")
    with atomic_dir(tmp_path / "atomic") as d:
        (d / "f").write_text("y")

    def mode(name):
        return (tmp_path / name).stat().st_mode & 0o777

    assert mode("atomic.txt") == mode("plain.txt") and mode("atomic") == mode("plain")


# ---------------------------------------------------------------- 4. determinism

def test_same_seed_same_metrics_and_resume_equals_uninterrupted(tmp_path):
    """On CPU, with every random part on (crop, flip, cutout, dropout; label smoothing,
    EMA, lookahead, onecycle): two runs give bit-identical metrics and weights;
    a run resumed from its epoch-1 checkpoint (saved and loaded from disk) continues
    bit-identically. Identical needs the same thread count: with another, float sums are
    split differently, and the metrics agree to about 1e-5 (1e-4 asserted)."""
    import torch

    from cifar_ray import config as C
    from cifar_ray import checkpoint, engine
    from cifar_ray.data.split import load_split

    spec = tiny_spec(tmp_path / "dropout.yaml", dropout=0.2)
    cfg = C.load_config(None, [f"model.name={spec}", "data.source=synthetic:600",
                               "train.batch_size=64", "optim.lr=0.05", "train.epochs=2",
                               "aug.crop_pad=2", "aug.hflip=random", "aug.cutout=8",
                               "optim.label_smoothing=0.1", "optim.ema_decay=0.9",
                               "optim.lookahead_every=5", "train.precision=fp32"])
    data = load_split(cfg)
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")

    class Capture:
        def __init__(self, name):
            self.name, self.states, self.metrics = name, {}, []

        def progress(self, *a):
            pass

        def epoch_end(self, metrics, state):
            self.metrics.append({k: metrics[k] for k in keys})
            path = tmp_path / f"{self.name}-{metrics['epoch']}.pt"
            checkpoint.save_state(state(), path)
            self.states[metrics["epoch"]] = checkpoint.load_state(path)

    def fit(name, threads=1, resume=None):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            run = Capture(name)
            engine.fit(cfg, data, device=torch.device("cpu"), resume=resume, reporter=run)
            return run
        finally:
            torch.set_num_threads(before)

    a, b = fit("a"), fit("b")
    assert a.metrics == b.metrics
    torch.testing.assert_close(a.states[2]["model"], b.states[2]["model"], rtol=0, atol=0)
    resumed = fit("r", resume=a.states[1])
    assert resumed.metrics == a.metrics[1:]
    torch.testing.assert_close(resumed.states[2]["model"], a.states[2]["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed.states[2]["ema"], a.states[2]["ema"], rtol=0, atol=0)
    two = fit("t", threads=2)
    for x, y in zip(a.metrics, two.metrics):
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=1e-4), k


# ---------------------------------------------------------------- 6. load

def _pss_of_tree() -> int:
    """Summed proportional set size of this process and its descendants (Ray's processes
    and the trials): shared pages, the object store's included, counted once overall."""
    total = 0
    for pid in [os.getpid(), *_tree(os.getpid())]:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@pytest.mark.ray
@pytest.mark.slow
def test_a_12_trial_sweep_finishes_on_one_copy_of_the_data(ray_local, tmp_path):
    """12 one-epoch trials, 4 at once, on local Ray: every one finishes and is listed once;
    peak memory (summed PSS) stays that of a few trial processes, not of 12. The data is shared: a
    trial's loader trains from the object store's copy in place (same memory, read-only),
    never from a copy of its own."""
    lrs = [round(0.02 + 0.01 * i, 4) for i in range(12)]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": {**SWEEP_BASE, "train": {"epochs": 1,
                                                                      "batch_size": 64}},
                                     "grid": {"optim.lr": lrs}}))
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _pss_of_tree())
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        result = CliRunner().invoke(main, ["tune", "--space", str(space), "--data",
                                           "synthetic:1000", "--grace", 1,
                                           "--out", str(tmp_path / "sweep")])
    finally:
        stop.set()
        sampler.join()
    wall = time.monotonic() - t0
    assert result.exit_code == 0, result.output
    trials = D.read_sweep(tmp_path / "sweep").trials
    assert len({t.trial_id for t in trials}) == 12
    assert all(t.status == "done" and t.epochs == 1 for t in trials)
    print(f"12 trials: {wall:.0f} s, peak PSS {peak[0] / 2**30:.1f} GiB")
    assert peak[0] < 8 * 2**30  # Ray + 4 trial processes (~4.5 GiB), not 12

    @ray_local.remote
    def loader_memory(shared: list) -> dict:
        from cifar_ray.data.loader import DeviceLoader

        split = ray_local.get(shared[0])
        loader = DeviceLoader(*split.train, batch_size=32, device="cpu", mean=split.mean,
                              std=split.std, shuffle=True)
        return {"same_memory": loader.images.data_ptr() == split.train[0].ctypes.data,
                "writeable": split.train[0].flags.writeable}

    from cifar_ray import config as C
    from cifar_ray.data.split import load_split

    split = load_split(C.from_dict({"data": {"source": "synthetic:1000"}}), nchw=True)
    assert split.train[0].shape[1:] == (3, 32, 32)
    seen = ray_local.get(loader_memory.remote([ray_local.put(split)]))
    assert seen == {"same_memory": True, "writeable": False}


# ---------------------------------------------------------------- 7. what real machines have

def test_one_folder_one_writer(tmp_path):
    """While a real `cifar-ray train` process holds its --out (it waits at the fault point
    just after claiming it), a second train into that folder, a tune into it and a --resume
    of it are each refused with one line naming the holder's PID; once the holder is
    SIGKILLed its claim is gone with it (the kernel drops the lock), no stale lock left to
    clear."""
    from cifar_ray import storage
    from cifar_ray.fsutil import claimed

    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    from cifar_ray import config as C

    out = tmp_path / "run"  # an earlier run, replaced by the holder
    C.save_config(C.load_config(None, [f"model.name={spec}", "data.source=synthetic:200"]),
                  out / "config.yaml")
    env = _env(tmp_path, "claimed")
    holder = _run_cli(["train", "--model", spec, "--data", "synthetic:200", "--out", out,
                       "--overwrite"], env, tmp_path / "holder.log")
    try:
        assert _wait_for_pid(tmp_path / "claimed.pid", holder) == holder.pid
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump({"base": SWEEP_BASE, "grid": {"optim.lr": [0.1]}}))
        for argv in (["train", "--model", spec, "--data", "synthetic:200", "--out", out,
                      "--overwrite"],
                     ["train", "--resume", out],
                     ["tune", "--space", space, "--data", "synthetic:200", "--out", out]):
            result = CliRunner().invoke(main, [str(a) for a in argv])
            assert result.exit_code == 2, result.output
            assert result.stderr.count("\n") == 1, result.stderr
            assert "another cifar-ray is writing this folder" in result.stderr
            assert f"PID {holder.pid} " in result.stderr, result.stderr
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert storage.entries(storage.locate(out)) == ["config.yaml"]  # and the killed holder's lock
    with claimed(out, "--out"):  # free again
        pass


def test_overwrite_replaces_only_what_cifar_ray_wrote(tmp_path, monkeypatch):
    """--overwrite empties a folder of a run or sweep, keeping the lock it holds; a folder
    with anything else is refused, and so is one holding the current directory."""
    from cifar_ray import rundir, storage
    from cifar_ray import sweepdir as D

    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "curves.png", "confusion-val.png",
                 ".metrics.csv.x1.tmp", "checkpoints/epoch-0001/state.pt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    loc = storage.locate(run, "--out")
    storage.check_new(loc, True, rundir.RUN, "--resume")  # ours: allowed
    with pytest.raises(Exception, match="holds another run; pass --resume"):
        storage.check_new(loc, False, rundir.RUN, "--resume")
    with pytest.raises(Exception, match="holds files cifar-ray did not write"):
        storage.check_new(loc, True, D.SWEEP, "--resume")  # not a sweep's files
    monkeypatch.chdir(run / "checkpoints")
    with pytest.raises(Exception, match=f"the folder holds {run / 'checkpoints'}, which must not"):
        storage.check_new(loc, True, rundir.RUN, "--resume")
    monkeypatch.chdir(tmp_path)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(Exception) as refused:
        storage.check_new(loc, True, rundir.RUN, "--resume")
    assert "did not write (notes.txt)" in str(refused.value) and "--overwrite" not in str(refused.value)
    (run / "notes.txt").unlink()
    from cifar_ray.fsutil import LOCK, claimed

    with claimed(run, "--out"):
        storage.make_new(loc)
        assert sorted(p.name for p in run.iterdir()) == [LOCK]
    assert run.is_dir() and not any(run.iterdir())


def _fill(folder: Path, leave: int) -> Path:
    """A file that takes all the free space of `folder`'s filesystem but `leave` bytes."""
    fd, ballast = tempfile.mkstemp(dir=folder, prefix="ballast-")
    try:
        os.posix_fallocate(fd, 0, max(1, shutil.disk_usage(folder).free - leave))
    finally:
        os.close(fd)  # an open file keeps its space after the unlink
    return Path(ballast)


@pytest.mark.ray
def test_full_disk_then_damaged_checkpoints_resume(ray_local, tmp_path):
    """On a real 20 MB tmpfs: a run whose next checkpoint does not fit ends with one error
    line naming the folder and the bytes, exit 2. Once space is freed, with the newest
    checkpoint then garbage and Ray's record of the checkpoints naming it and a folder that
    is gone, --resume says which checkpoint it skips and why, continues from the newest
    readable one, and finishes. A --resume asking for fewer epochs than done is refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        spec = tmp_path / "tiny.yaml"
        spec.write_text(TINY_SPEC)
        run = disk / "run"
        common = ["--model", spec, "--data", "synthetic:400", "--batch-size", 64, "--lr", 0.05,
                  "--set", "scale.max_failures=0"]
        first = CliRunner().invoke(main, ["train", *map(str, common), "--epochs", "1",
                                          "--out", str(run)])
        assert first.exit_code == 0, first.output
        size = (run / "checkpoints/epoch-0001/state.pt").stat().st_size
        ballast = _fill(disk, size // 2)  # room for the small files, not for a checkpoint
        full = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "3"])
        assert full.exit_code == 2, full.output
        assert full.stderr.count("\n") == 1 and "Traceback" not in full.stderr, full.stderr
        assert f"error: {run}: no space left on the device" in full.stderr, full.stderr
        assert "bytes" in full.stderr and f"cifar-ray train --resume {run}" in full.stderr
        more = _fill(disk, 0)
        for argv in (["data", "info", "synthetic:50", "--grid", disk / "grid.png"],
                     ["data", "prepare", "synthetic:2000", "--out", disk / "prepared"]):
            result = CliRunner().invoke(main, [str(a) for a in argv])
            assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
            assert "no space left on the device" in result.stderr, result.stderr
            assert not (disk / "grid.png").exists() and not (disk / "prepared").exists()
        more.unlink()
        ballast.unlink()

        # The newest checkpoint damaged after Ray recorded it, and a recorded one deleted.
        ckpts = run / "checkpoints"
        record = json.loads((ckpts / "checkpoint_manager_snapshot.json").read_text())
        (entry,) = record["checkpoint_results"]
        for name in ("epoch-0002", "epoch-0003"):
            record["checkpoint_results"].append({**entry, "checkpoint_dir_name": name})
            record["checkpoint_report_indices"].append(len(record["checkpoint_report_indices"]))
        record["latest_checkpoint_result"] = record["checkpoint_results"][-1]
        (ckpts / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
        (ckpts / "epoch-0002").mkdir(exist_ok=True)
        (ckpts / "epoch-0002/state.pt").write_bytes(b"\x80garbage" * 100)
        back = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "2"])
        assert back.exit_code == 0, back.output
        assert "skipping checkpoint of epoch 2" in back.output
        assert "resuming from epoch 1, the newest checkpoint that can be read" in back.output
        assert [r["epoch"] for r in rundir.read_metrics(run / "metrics.csv")] == [1, 2]
        assert json.loads((run / "summary.json").read_text())["epochs"] == 2

        fewer = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "1"])
        assert fewer.exit_code == 2 and "has trained 2 epochs already" in fewer.stderr
        assert "epochs: 2" in (run / "config.yaml").read_text()  # not rewritten
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_an_unreachable_or_locked_cluster_is_one_line_within_seconds(tmp_path):
    """RAY_ADDRESS naming a closed port, and a real cluster that wants a token this client
    lacks: each is one error line naming the address and what to do, within seconds (Ray's
    own client retried for a minute or more, logging every try), and no --out left."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    port, head_tmp = _free_port(), tempfile.mkdtemp(prefix="crf-")
    token = tmp_path / "cluster-token"
    token.write_text(os.urandom(16).hex())
    head_env = {**_env(tmp_path), "RAY_TMPDIR": head_tmp, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token)}
    ray_bin = Path(sys.executable).with_name("ray")
    try:
        subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                       env=head_env, check=True, capture_output=True, timeout=120)
        closed = _free_port()
        runs = {}
        for name, address in (("closed", f"127.0.0.1:{closed}"), ("locked", f"127.0.0.1:{port}")):
            env = {**_env(tmp_path), "RAY_ADDRESS": address}
            argv = ["train", "--model", spec, "--data", "synthetic:200", "--batch-size", 32,
                    "--out", tmp_path / name]
            runs[name] = subprocess.Popen([sys.executable, "-m", "cifar_ray", *map(str, argv)],
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
        errors = {}
        for name, proc in runs.items():
            out, errors[name] = proc.communicate(timeout=120)
            assert proc.returncode == 2, (name, errors[name])
            assert errors[name].count("\n") == 1 and out == "", errors[name]
            assert not (tmp_path / name).exists(), name
        assert errors["closed"].startswith(f"error: RAY_ADDRESS=127.0.0.1:{closed}: nothing "
                                           "answers there"), errors["closed"]
        assert errors["locked"].startswith(f"error: RAY_ADDRESS=127.0.0.1:{port}: the cluster "
                                           "wants an authentication token"), errors["locked"]
        assert "RAY_AUTH_MODE=token" in errors["locked"]
    finally:
        for pid, (_, _, cmd) in _procs().items():
            if head_tmp in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(head_tmp, ignore_errors=True)
