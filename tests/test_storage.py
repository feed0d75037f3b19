"""Runs and sweeps in a store given by URI: the storage module on file:// URIs (fast), bad
locations refused with one line, and train / resume / evaluate / tune / report against a
local S3 server (moto) speaking the real S3 protocol to pyarrow's S3FileSystem."""

import csv
import io
import json
import logging

import pyarrow.fs as pafs
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from cifar_ray import config as C
from cifar_ray import storage
from cifar_ray.cli import main
from cifar_ray.errors import UserError

MODEL = ["--model", "cnn", "--set", "model.args.depth=1", "--set", "model.args.filters=8",
         "--set", "model.args.dense_layers=0", "--batch-size", "32", "--lr", "0.05"]
SPACE = {"base": {"model": {"name": "cnn", "args": {"depth": 1, "filters": 8, "dense_layers": 0}},
                  "train": {"epochs": 1, "batch_size": 32}, "optim": {"lr": 0.05}},
         "grid": {"optim.lr": [0.05, 0.1]}}


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


# ---------------------------------------------------------------- the module, on file://

def test_locate_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = storage.locate("runs/a", "--out")
    assert local.text == local.path == str(tmp_path / "runs" / "a") and not local.remote
    uri = storage.locate(f"file://{tmp_path}/runs/b/", "--out")
    assert uri.remote and uri.text == f"file://{tmp_path}/runs/b" and uri.path == str(tmp_path / "runs/b")
    s3 = storage.locate("s3://bkt/p/q/?endpoint_override=127.0.0.1:9&scheme=http")
    assert s3.path == "bkt/p/q" and s3.fs.type_name == "s3"
    # Parts go before the query, which pyarrow reads as the filesystem's options.
    assert s3.sub("x", "y.csv").text == "s3://bkt/p/q/x/y.csv?endpoint_override=127.0.0.1:9&scheme=http"
    assert s3.sub("x").path == "bkt/p/q/x" and s3.parent().path == "bkt/p"
    assert s3.ray_storage() == {"storage_path": "bkt/p/q", "storage_filesystem": s3.fs}
    assert local.ray_storage() == {"storage_path": local.path}


@pytest.mark.parametrize("uri, match", [
    ("foo://b/x", "--out foo://b/x: unknown storage scheme foo://; use a local path or a URI"),
    ("s3://bucket", "--out s3://bucket: give a folder inside the bucket, e.g. s3://bucket/cifar-ray/NAME"),
    ("gs://bucket/", "give a folder inside the bucket, e.g. gs://bucket/cifar-ray/NAME"),
    ("s3://b/x?colour=red", "--out s3://b/x?colour=red: Unexpected query parameter"),
])
def test_bad_locations_are_one_line(uri, match):
    with pytest.raises(UserError) as e:
        storage.locate(uri, "--out")
    assert match in str(e.value) and "\n" not in str(e.value)


def test_stage_pulls_lazily_and_pushes_what_changed(tmp_path):
    root = tmp_path / "store" / "run"
    (root / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (root / "checkpoints" / "epoch-0001" / "state.pt").write_bytes(b"weights")
    (root / "metrics.csv").write_text("epoch\n1\n")
    loc = storage.locate(f"file://{root}", "--out")
    with storage.Stage(loc) as stage:
        assert stage.local.name == "run" and stage.local != root
        stage.pull()
        state = stage.local / "checkpoints" / "epoch-0001" / "state.pt"
        assert state.read_bytes() == b"" and (stage.local / "metrics.csv").read_text() == "epoch\n1\n"
        assert stage.fetch(state).read_bytes() == b"weights"
        assert stage.shown(state) == f"file://{root}/checkpoints/epoch-0001/state.pt"
        (stage.local / "summary.json").write_text("{}")
        stage.push()
        assert (root / "summary.json").read_text() == "{}"
        (root / "metrics.csv").write_text("changed by someone else\n")
        stage.push()  # metrics.csv did not change here: not uploaded over theirs
        assert (root / "metrics.csv").read_text() == "changed by someone else\n"
        tmp = stage.local
    assert not tmp.exists()
    assert sorted(storage.files(loc)) == ["checkpoints/epoch-0001/state.pt", "metrics.csv",
                                          "summary.json"]
    # A message about a file of the stage names it as it is in the store.
    with pytest.raises(UserError) as e:
        with storage.Stage(loc) as stage:
            raise UserError(f"{stage.local / 'space.yaml'}: not valid YAML; fix the file")
    assert str(e.value) == f"file://{root}/space.yaml: not valid YAML; fix the file"
    storage.remove(loc)
    assert storage.is_empty(loc) and storage.files(loc) == []


@pytest.mark.parametrize("args, match", [
    (["train", "--data", "synthetic:64", "--out", "foo://b/x"], "error: --out foo://b/x: unknown storage scheme foo://"),
    (["train", "--data", "synthetic:64", "--out", "s3://bucket"], "error: --out s3://bucket: give a folder inside the bucket"),
    (["tune", "--space", "augmentation", "--data", "synthetic:64", "--out", "gs://bucket"], "error: --out gs://bucket: give a folder"),
    (["train", "--resume", "file:///nonexistent/run"], "error: --resume file:///nonexistent/run: not a run directory (no config.yaml)"),
    (["tune", "--resume", "file:///nonexistent/sweep"], "error: --resume file:///nonexistent/sweep: not a sweep directory (no space.yaml)"),
    (["report", "file:///nonexistent/x"], "error: file:///nonexistent/x: neither a sweep directory"),
    (["evaluate", "file:///nonexistent/x"], "error: file:///nonexistent/x: no such run directory or checkpoint"),
])
def test_bad_locations_on_the_command_line(args, match):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(match) and result.output.count("\n") == 1, result.output


def test_unreachable_store_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    uri = "s3://bkt/runs/x?endpoint_override=127.0.0.1:1&scheme=http"  # nothing listens there
    result = cli("train", "--data", "synthetic:64", "--out", uri)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: --out {uri}: cannot read the storage (")
    assert "Could not connect" in result.output and "credentials" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bkt/... either


# ---------------------------------------------------------------- a real S3 protocol (moto)

@pytest.fixture(scope="module")
def s3():
    """A local S3 server with an empty bucket; yields a function giving URIs in it.

    The URIs carry the (fake) keys: the filesystem built from one goes to Ray's workers
    with them, and the server refuses unsigned requests that overwrite a key. (On a real
    cluster the keys come from the nodes' environment or cloud role instead.)"""
    server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    pafs.S3FileSystem(access_key="testing", secret_key="testing", scheme="http",
                      endpoint_override=f"{host}:{port}", allow_bucket_creation=True).create_dir("runs")
    yield lambda path: f"s3://testing:testing@runs/{path}?endpoint_override={host}:{port}&scheme=http"
    srv.stop()


def read(uri: str, name: str) -> bytes:
    return storage.read_bytes(storage.locate(uri), name)


@pytest.fixture(scope="module")
def s3_run(ray_local, s3, tmp_path_factory):
    """One epoch into the bucket, then --resume to two: later tests read the run."""
    cwd = tmp_path_factory.mktemp("cwd")
    uri = s3("cifar/run-1")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        first = cli("train", *MODEL, "--data", "synthetic:64", "--epochs", 1, "--out", uri)
        assert first.exit_code == 0, first.output
        after_one = read(uri, "metrics.csv").decode()
        resumed = cli("train", "--resume", uri, "--epochs", 2)
        assert resumed.exit_code == 0, resumed.output
    return uri, first.output, resumed.output, after_one, cwd


@pytest.mark.ray
def test_train_to_s3_writes_the_run_dir_in_the_bucket(s3_run):
    uri, first, resumed, after_one, cwd = s3_run
    assert first.rstrip().endswith(f"run: {uri}")
    assert [ln for ln in after_one.splitlines()][1].startswith("1,")
    assert list(cwd.iterdir()) == []  # nothing landed locally
    names = storage.files(storage.locate(uri))
    for name in ("config.yaml", "metrics.csv", "curves.png", "summary.json"):
        assert name in names, names
    assert "checkpoints/epoch-0002/state.pt" in names
    assert any(n.startswith("events.out.tfevents.") for n in names)  # TensorBoard's, uploaded too
    # --resume continued from epoch 1 (one new epoch line) to the raised total.
    assert "epoch   2/2" in resumed and "epoch   1/2" not in resumed
    rows = list(csv.DictReader(io.StringIO(read(uri, "metrics.csv").decode())))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    summary = json.loads(read(uri, "summary.json"))
    assert summary["epochs"] == 2 and summary["last_checkpoint"] in names
    assert summary["best_checkpoint"] in names
    assert yaml.safe_load(read(uri, "config.yaml"))["train"]["epochs"] == 2


@pytest.mark.ray
def test_evaluate_predict_and_report_read_the_run_in_the_bucket(s3_run, tmp_path):
    uri = s3_run[0]
    ev = cli("evaluate", uri, "--json")
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.output)
    assert result["n"] > 0 and result["checkpoint"] in {
        storage.join(uri, f"checkpoints/epoch-000{e}/state.pt") for e in (1, 2)}
    assert result["confusion_png"] == storage.join(uri, "confusion-val.png")
    assert read(uri, "confusion-val.png")[:4] == b"\x89PNG"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "x.png")
    pred = cli("predict", storage.join(uri, "checkpoints/epoch-0002"), tmp_path / "x.png", "--json")
    assert pred.exit_code == 0, pred.output
    assert len(json.loads(pred.output)[0]["top"]) == 3
    rep = cli("report", uri)
    assert rep.exit_code == 0 and rep.output.strip() == f"report: {storage.join(uri, 'report.md')}"
    assert "# Run report: run-1" in read(uri, "report.md").decode()


@pytest.mark.ray
def test_out_holding_a_run_in_the_bucket_is_refused(s3_run):
    uri = s3_run[0]
    before = read(uri, "metrics.csv")
    result = cli("train", *MODEL, "--data", "synthetic:64", "--out", uri)
    assert result.exit_code == 2
    assert result.output == (f"error: --out {uri}: holds another run; pass --resume to continue "
                             "it, --overwrite to replace it, or choose another folder\n")
    assert read(uri, "metrics.csv") == before


@pytest.mark.ray
def test_tune_to_s3_and_report_it(ray_local, s3, tmp_path, monkeypatch):
    tmp_path = tmp_path / "cwd"
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    uri = s3("cifar/sweep-1")
    result = cli("tune", "--space", tmp_path / "space.yaml", "--data", "synthetic:64",
                 "--concurrent", 2, "--out", uri)
    assert result.exit_code == 0, result.output
    assert f"config: {storage.join(uri, 'best.yaml')}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # nothing else local
    names = storage.files(storage.locate(uri))
    for name in ("space.yaml", "status.json", "results.parquet", "trials.csv", "best.yaml",
                 "report.md", "val-curves.png"):
        assert name in names, names
    trials = list(csv.DictReader(io.StringIO(read(uri, "trials.csv").decode())))
    assert len(trials) == 2 and all(t["status"] == "done" for t in trials)
    assert all(t["checkpoint"] in names for t in trials)  # the best checkpoints, in the bucket
    assert any(n.endswith("/asha.json") for n in names)
    assert f"cifar-ray train --config {storage.join(uri, 'best.yaml')}" in read(uri, "report.md").decode()
    assert C.load_config(storage.join(uri, "best.yaml")).optim.lr in (0.05, 0.1)  # --config URI

    # `report` on the bucket rewrites the report there.
    storage.locate(uri).fs.delete_file(storage.locate(uri).sub("report.md").path)
    rep = cli("report", uri)
    assert rep.exit_code == 0, rep.output
    assert "2 trials: 2 done" in rep.output
    assert "## Trials, best first" in read(uri, "report.md").decode()

    # --resume of the finished sweep restores Tune's experiment from the bucket.
    again = cli("tune", "--resume", uri)
    assert again.exit_code == 0, again.output
    assert "resuming " + uri in again.output and "2 trials: 2 done" in again.output

    # --out on it without --overwrite: refused, the sweep untouched.
    refused = cli("tune", "--space", tmp_path / "space.yaml", "--data", "synthetic:64", "--out", uri)
    assert refused.exit_code == 2 and f"--out {uri}: holds another sweep" in refused.output
    assert "trials.csv" in storage.files(storage.locate(uri))
