"""The bad-input catalogue: every user-facing entry point fed malformed input, end to end.

Each row of CASES names an entry point and what is wrong with its input, builds that input
under tmp, runs the command in-process (click's CliRunner) and asserts, for every row:
  (a) stderr is one line, `error: ...`, holding the row's needles (the file, flag, key or
      layer at fault and what to do), and no Python exception escaped;
  (b) the exit status is 2 (a UserError, or a flag click refuses);
  (c) nothing changed: the whole tmp tree (inputs, the --out target, the CIFAR_RAY_HOME
      cache) and the shared assets are byte for byte as before: nothing created, nothing
      modified, nothing half-written;
and that neither Ray nor training started (train.init_ray and engine.fit raise here).
A few rows run as real processes to prove the exit status and that no traceback prints;
a hypothesis fuzz closes the module: the config and space parsers either accept an input
or raise UserError, never anything else.

The same inputs are checked at library level beside the code (test_data.py: archives,
pickles, layouts; test_models_spec.py: layer specs; test_space.py: spaces and tune
options; test_engine.py: checkpoints; test_config.py: config keys and values); this
module is the matrix through the command line. Not covered: cluster YAML (cifar_ray never
loads it; test_cluster.py runs Ray's own validator on broken copies), and a path "outside
an allowed tree" (cifar-ray has no such tree: any path the user may read or write is fine).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar_ray import config as C
from cifar_ray import checkpoint, engine
from cifar_ray import space as S
from cifar_ray.cli import main
from cifar_ray.data import archive, load, prepare, sources
from cifar_ray.errors import UserError
from cifar_ray.models import create_model
from helpers import (TINY_SPEC, encode, evil_pickle, fake_batches, official_tarball,
                     random_images, tar_member, tree, write_dir, write_tar, write_zip)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- shared assets

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Good inputs the rows spoil or sit beside: a prepared dataset (a prepared directory
    as --data is read in place, so the cache stays untouched), a spec, a checkpoint of
    that spec (built, not trained), an image, a valid space."""
    root = tmp_path_factory.mktemp("assets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFAR_RAY_HOME", str(root / "unused-cache"))
        data = prepare("synthetic:400", out=root / "data")  # 360 train images: batch 256 fits
        ds = load(str(data))
    spec = root / "tiny.yaml"
    spec.write_text(TINY_SPEC)
    cfg = C.load_config(None, [f"model.name={spec}", f"data.source={data}",
                               "train.batch_size=32", "train.channels_last=false"])
    state = {"format": checkpoint.FORMAT, "epoch": 1, "step": 1,
             "model": create_model(str(spec), len(ds.classes)).state_dict(), "optimizer": {},
             "scaler": None, "ema": None, "lookahead": None, "rng": None,
             "config": C.to_dict(cfg), "classes": list(ds.classes), "mean": list(ds.mean),
             "std": list(ds.std), "history": []}
    run = root / "run"
    ckpt = run / "checkpoints" / "epoch-0001" / "state.pt"
    checkpoint.save_state(state, ckpt)
    image = root / "cat.png"
    image.write_bytes(encode(random_images(1, 0)[0]))
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump({"base": {"model": {"name": str(spec)},
                                              "train": {"epochs": 2, "batch_size": 32}},
                                     "grid": {"optim.lr": [0.05, 0.1]}}))
    return SimpleNamespace(root=root, data=data, spec=spec, state=state, ckpt=ckpt, run=run,
                           image=image, space=space)


@pytest.fixture
def fx(assets, tmp_path):
    """What a row builds its input from: `tmp` for input files, `out` a target that does not
    exist, `marker` a file that code smuggled into an input would create."""
    (tmp_path / "in").mkdir()
    return SimpleNamespace(**vars(assets), tmp=tmp_path / "in", out=tmp_path / "out",
                           marker=tmp_path / "PWNED")


@pytest.fixture(autouse=True)
def _no_ray_no_training(monkeypatch):
    """Every bad input is refused before Ray starts or training begins."""
    from cifar_ray import train

    def started(*args, **kwargs):
        raise AssertionError("bad input got as far as starting Ray or training")

    monkeypatch.setattr(train, "init_ray", started)
    monkeypatch.setattr(engine, "fit", started)


def snapshot(*roots: Path) -> dict:
    """Every file and folder under the roots: kind, mode and a hash of the bytes."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st_ = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
                out[str(p)] = (st_.st_mode, st_.st_size, digest)
    return out


def invoke(args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, needles) -> None:
    """(a) one `error:` line with the needles, nothing else escaped; (b) exit status 2."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("an exception escaped:\n" + "".join(
            traceback.format_exception(result.exception)))
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and result.stdout == "", result.output
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


# ---------------------------------------------------------------- input builders

def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def noise(n: int, seed: int = 0) -> bytes:
    """Random-looking bytes, the same every run."""
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n // 32 + 1))[:n]


def cut(path: Path, at: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * at)])
    return path


def png_bomb(side: int = 30000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (beyond PIL's bomb limit)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


class Sentinel:
    """Pickled, it calls Path.touch(marker) when loaded: code run by unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def alias_bomb(levels: int = 9) -> str:
    """YAML whose aliases make 9**levels items from a few hundred bytes ('billion laughs')."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def with_state(fx, name: str, **changes) -> Path:
    """The good checkpoint with some entries changed (None: removed)."""
    state = {k: v for k, v in {**fx.state, **changes}.items() if v is not None or k not in changes}
    path = fx.tmp / name
    checkpoint.save_state(state, path)
    return path


def space_file(fx, data, name="space.yaml") -> Path:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    return _write(fx.tmp / name, text)


def good_base(fx) -> dict:
    return {"model": {"name": str(fx.spec)}, "train": {"epochs": 2, "batch_size": 32}}


def tune_args(fx, space, *extra):
    return ["tune", "--space", space, "--data", fx.data, "--out", fx.out, *extra]


def train_args(fx, *extra):
    return ["train", "--model", fx.spec, "--data", fx.data, "--out", fx.out, *extra]


def tar_with(fx, member: tarfile.TarInfo, name="evil.tar.gz") -> Path:
    return write_tar(fx.tmp / name, tree()[0], extra=[member])


def zip_with(fx, name: str, mode: int) -> Path:
    path = write_zip(fx.tmp / "evil.zip", tree()[0])
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, b"/etc/passwd")
    return path


def huge_declared_tar(fx) -> Path:
    info = tarfile.TarInfo("cat/0.png")
    info.size = 10**11  # 100 GB declared, 512 bytes present
    return _write(fx.tmp / "huge.tar", info.tobuf(format=tarfile.GNU_FORMAT) + b"x" * 512 + bytes(1024))


def gzip_bomb(fx, monkeypatch) -> Path:
    monkeypatch.setattr(archive, "MIN_EXPANSION_LIMIT", 64 * 1024)  # so 10 MB counts as a bomb
    return _write(fx.tmp / "bomb.tar.gz", gzip.compress(bytes(10 * 1024**2)))


def zip_bomb(fx, monkeypatch) -> Path:
    monkeypatch.setattr(archive, "MIN_EXPANSION_LIMIT", 64 * 1024)
    path = fx.tmp / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/0.png", bytes(10 * 1024**2))
    return path


def evil_cifar_tarball(fx, name: str) -> Path:
    files, _ = fake_batches()
    files["data_batch_1"] = evil_pickle(fx.marker)
    return official_tarball(fx.tmp / name, files)


def evil_cifar_folder(fx, monkeypatch) -> Path:
    """The other files pass as official here: only the one with code in it is refused."""
    files, _ = fake_batches()
    monkeypatch.setattr(sources, "CIFAR10_FILE_MD5",
                        {n: hashlib.md5(b).hexdigest() for n, b in files.items()})
    files["data_batch_2"] = evil_pickle(fx.marker)
    return write_dir(fx.tmp / "cifar-10-batches-py", files)


def bad_prepared(fx, meta: str) -> Path:
    folder = fx.tmp / "prepared"
    folder.mkdir()
    for name in ("train.parquet", "test.parquet"):
        (folder / name).write_bytes((fx.data / name).read_bytes())
    _write(folder / "meta.json", meta)
    return folder


def images(fx, files: dict[str, bytes]) -> Path:
    """A good ImageFolder tree with some files replaced or added."""
    return write_dir(fx.tmp / "imgs", {**tree()[0], **files})


def meta(**changes) -> str:
    """A prepared dataset's meta.json, some fields changed."""
    good = {"format_version": 1, "classes": ["a", "b"], "splits": {}, "mean": [0, 0, 0], "std": [1, 1, 1]}
    return json.dumps({**good, **changes})


def tune_space(fx, *extra, **parts) -> list:
    """`cifar-ray tune` of a space whose base is good, with the given parts."""
    return tune_args(fx, space_file(fx, {"base": good_base(fx), **parts}), *extra)


# A value made of aliases; residuals nested 40 deep; a spec of 9**8 layers from aliases.
ALIAS_VALUE = "train:\n  epochs: &a [" + ", ".join(["x"] * 9) + "]\n  batch_size: [" + ", ".join(["*a"] * 9) + "]\n"
DEEP_RESIDUALS = "- " + "{residual: [" * 40 + "{conv: 3, padding: same}" + "]}" * 40 + "\n"
SPEC_ALIAS_BOMB = "- &l0 act\n" + "".join(
    f"- &l{i} {{residual: [" + ", ".join([f"*l{i - 1}"] * 9) + "]}\n" for i in range(1, 9))
TAG = "!!python/object/apply:os.mkdir [{}]\n"  # creates the marker when loaded unsafely


def damaged_run(fx, name: str, text: str) -> Path:
    """A copy of the good run directory (a checkpoint and config.yaml) with one file spoiled."""
    import shutil

    run = shutil.copytree(fx.run, fx.tmp / "run")
    (run / "config.yaml").write_text(C.dump_yaml(C.from_dict(fx.state["config"])))
    _write(run / name, text)
    return run


def chmod_readonly(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o500)
    return path


def deny_writes(path: Path, monkeypatch) -> Path:
    """`path` as a folder that os.access calls read-only: the not-writable path, for root
    too (whom chmod does not stop)."""
    import cifar_ray.fsutil as fsutil

    path.mkdir(parents=True, exist_ok=True)
    real = os.access
    monkeypatch.setattr(fsutil.os, "access",
                        lambda p, mode, **kw: False if Path(p) == path else real(p, mode, **kw))
    return path


def fifo(path: Path) -> Path:
    """A named pipe at `path`: reading it would wait for a writer for ever."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


# ---------------------------------------------------------------- the catalogue

@dataclass(frozen=True)
class Case:
    id: str
    make: Callable  # (fx) or (fx, monkeypatch) -> the command line, its inputs built
    needles: tuple[str, ...]
    sentinel: bool = False  # the input smuggles code: fx.marker must not appear
    root_skips: bool = False  # relies on file permissions, which root ignores


def case(id, make, *needles, **kw) -> Case:
    return Case(id, make, needles, **kw)


CASES = [
    # -------- data prepare / info: archives and folders
    case("prepare-truncated-tar.gz",
         lambda fx: ["data", "prepare", cut(write_tar(fx.tmp / "t.tar.gz", tree()[0]), 0.5)],
         "t.tar.gz", "truncated or corrupt archive", "download it again"),
    case("prepare-truncated-tar",
         lambda fx: ["data", "prepare", cut(write_tar(fx.tmp / "t.tar", tree()[0], "w"), 0.6)],
         "t.tar", "truncated or corrupt archive"),
    case("prepare-truncated-zip",
         lambda fx: ["data", "prepare", cut(write_zip(fx.tmp / "t.zip", tree()[0]), 0.5)],
         "t.zip", "truncated or corrupt archive"),
    case("prepare-random-bytes-tar.gz",
         lambda fx: ["data", "prepare", _write(fx.tmp / "r.tar.gz", noise(5000))],
         "r.tar.gz", "truncated or corrupt archive"),
    case("prepare-random-bytes-zip", lambda fx: ["data", "prepare", _write(fx.tmp / "r.zip", noise(5000))],
         "r.zip", "truncated or corrupt archive"),
    case("prepare-text-named-tar.gz",
         lambda fx: ["data", "prepare", _write(fx.tmp / "notes.tar.gz", "just text\n" * 50)],
         "notes.tar.gz", "truncated or corrupt archive"),
    case("prepare-gzipped-text-tar.gz",
         lambda fx: ["data", "prepare", _write(fx.tmp / "g.tar.gz", gzip.compress(b"text\n" * 500))],
         "g.tar.gz", "truncated or corrupt archive"),
    case("prepare-empty-tar.gz", lambda fx: ["data", "prepare", _write(fx.tmp / "e.tar.gz", b"")],
         "e.tar.gz", "truncated or corrupt archive"),
    case("prepare-tar-absolute-member",
         lambda fx: ["data", "prepare", tar_with(fx, tar_member("/etc/evil.png", tarfile.REGTYPE))],
         "evil.tar.gz", "'/etc/evil.png'", "absolute path or '..'", "repack"),
    case("prepare-tar-dotdot-member",
         lambda fx: ["data", "prepare", tar_with(fx, tar_member("cat/../../evil.png", tarfile.REGTYPE))],
         "'cat/../../evil.png'", "absolute path or '..'"),
    case("prepare-tar-symlink-member",
         lambda fx: ["data", "prepare", tar_with(fx, tar_member("cat/l.png", tarfile.SYMTYPE, "/etc/passwd"))],
         "'cat/l.png'", "is a link", "repack"),
    case("prepare-tar-hardlink-member",
         lambda fx: ["data", "prepare", tar_with(fx, tar_member("cat/h.png", tarfile.LNKTYPE, "cat/000.png"))],
         "'cat/h.png'", "is a link"),
    case("prepare-tar-device-member",
         lambda fx: ["data", "prepare", tar_with(fx, tar_member("cat/d.png", tarfile.CHRTYPE))],
         "'cat/d.png'", "device or special file"),
    case("prepare-zip-absolute-member",
         lambda fx: ["data", "prepare", zip_with(fx, "/abs/evil.png", 0o100644)],
         "evil.zip", "absolute path or '..'"),
    case("prepare-zip-dotdot-member",
         lambda fx: ["data", "prepare", zip_with(fx, "cat/../../evil.png", 0o100644)],
         "evil.zip", "absolute path or '..'"),
    case("prepare-zip-symlink-member", lambda fx: ["data", "prepare", zip_with(fx, "cat/link.png", 0o120777)],
         "evil.zip", "is a link"),
    case("prepare-tar-huge-declared-size", lambda fx: ["data", "prepare", huge_declared_tar(fx)],
         "huge.tar", "cat/0.png is cut short", "truncated or corrupt archive"),
    case("prepare-gzip-bomb", lambda fx, mp: ["data", "prepare", gzip_bomb(fx, mp)],
         "bomb.tar.gz", "decompression bomb", "refusing it"),
    case("prepare-zip-bomb", lambda fx, mp: ["data", "prepare", zip_bomb(fx, mp)],
         "bomb.zip", "decompression bomb"),
    case("prepare-cifar-tarball-with-code-in-a-pickle",
         lambda fx: ["data", "prepare", evil_cifar_tarball(fx, "cifar-10-python.tar.gz")],
         "cifar-10-python.tar.gz", "MD5", "not unpickled", "download it again", sentinel=True),
    case("prepare-renamed-cifar-tarball-with-code-in-a-pickle",
         lambda fx: ["data", "prepare", evil_cifar_tarball(fx, "mine.tgz")],
         "mine.tgz", "MD5", "not unpickled", sentinel=True),
    case("prepare-cifar-folder-with-code-in-a-pickle",
         lambda fx, mp: ["data", "prepare", evil_cifar_folder(fx, mp)],
         "data_batch_2", "MD5 differs", "not unpickled", sentinel=True),
    case("info-cifar-tarball-with-code-in-a-pickle",
         lambda fx: ["data", "info", evil_cifar_tarball(fx, "cifar-10-python.tar.gz")],
         "cifar-10-python.tar.gz", "not unpickled", sentinel=True),
    case("prepare-image-that-is-not-one",
         lambda fx: ["data", "prepare", images(fx, {"dog/002.png": b"not an image"})],
         "dog/002.png", "cannot decode the image", "replace or remove"),
    case("prepare-truncated-png-in-tree",
         lambda fx: ["data", "prepare", images(fx, {"cat/000.png": tree()[0]["cat/000.png"][:60]})],
         "cat/000.png", "cannot decode the image"),
    case("prepare-png-bomb-in-tree",
         lambda fx: ["data", "prepare", write_zip(fx.tmp / "imgs.zip", {**tree()[0], "cat/big.png": png_bomb()})],
         "cat/big.png", "cannot decode the image", "decompression bomb"),
    case("prepare-image-of-wrong-size",
         lambda fx: ["data", "prepare", images(fx, {"cat/big.png": encode(random_images(1, 1, (40, 50))[0])})],
         "cat/big.png", "40x50, not 32x32", "--resize"),
    case("prepare-layout-one-class",
         lambda fx: ["data", "prepare", write_dir(fx.tmp / "imgs", {"cat/0.png": encode(random_images(1, 0)[0])})],
         "imgs", "need at least 2 <class>/ folders"),
    case("prepare-no-images",
         lambda fx: ["data", "prepare", write_dir(fx.tmp / "imgs", {"readme.txt": b"hi"})],
         "imgs", "no JPEG or PNG images found"),
    case("prepare-unsupported-file-type", lambda fx: ["data", "prepare", _write(fx.tmp / "d.rar", b"Rar!")],
         "d.rar", "not a supported file type"),
    case("prepare-missing-path", lambda fx: ["data", "prepare", fx.tmp / "nope.tar.gz"],
         "nope.tar.gz", "no such file or directory"),
    case("prepare-unknown-source", lambda fx: ["data", "prepare", "imagenet"],
         "imagenet: unknown SOURCE", "SOURCE may be"),
    case("prepare-synthetic-not-a-number", lambda fx: ["data", "prepare", "synthetic:abc"],
         "synthetic:abc", "expected synthetic:N"),
    case("prepare-synthetic-huge", lambda fx: ["data", "prepare", "synthetic:99999999999"],
         "synthetic:99999999999", "<= 1,000,000"),
    case("info-prepared-meta-splits-not-a-mapping",
         lambda fx: ["data", "info", bad_prepared(fx, meta(splits=[1]))],
         "prepared", "not a valid prepared dataset", "prepare it again"),
    case("info-prepared-meta-split-not-a-mapping",
         lambda fx: ["data", "info", bad_prepared(fx, meta(splits={"train": 5}))],
         "not a valid prepared dataset", "split 'train'"),
    case("info-prepared-meta-not-json", lambda fx: ["data", "info", bad_prepared(fx, b"\xff\xfe{")],
         "not a valid prepared dataset", "meta.json"),
    case("info-prepared-meta-a-list", lambda fx: ["data", "info", bad_prepared(fx, "[1]")],
         "not a valid prepared dataset", "format version"),
    case("info-grid-not-png", lambda fx: ["data", "info", "synthetic:50", "--grid", fx.tmp / "g.jpg"],
         "--grid", "g.jpg", ".png"),
    case("info-grid-under-a-file",
         lambda fx: ["data", "info", "synthetic:50", "--grid", _write(fx.tmp / "f", "x") / "g.png"],
         "--grid", "is a file, not a folder"),
    case("prepare-out-is-a-file",
         lambda fx: ["data", "prepare", "synthetic:50", "--out", _write(fx.tmp / "f", "x")],
         "'--out'", "is a file", "data prepare --help"),
    case("prepare-out-under-a-file",
         lambda fx: ["data", "prepare", "synthetic:50", "--out", _write(fx.tmp / "f", "x") / "sub"],
         "--out", "is a file, not a folder"),
    case("prepare-out-holds-something-else",
         lambda fx: ["data", "prepare", "synthetic:50", "--out", _write(fx.tmp / "busy" / "keep.txt", "x").parent],
         "busy", "already exists and holds something else"),
    case("prepare-out-not-writable",
         lambda fx: ["data", "prepare", "synthetic:50", "--out", chmod_readonly(fx.tmp / "ro") / "x"],
         "--out", "not writable", root_skips=True),
    case("prepare-out-denied",
         lambda fx, mp: ["data", "prepare", "synthetic:50", "--out", deny_writes(fx.tmp / "ro", mp) / "x"],
         "--out", "ro is not writable"),
    case("prepare-cache-denied",
         lambda fx, mp: ["data", "prepare", deny_writes(Path(os.environ["CIFAR_RAY_HOME"]), mp) and "synthetic:50"],
         "cache ($CIFAR_RAY_HOME)", "cifar-ray-home is not writable"),

    # -------- config files and --set (train refuses them before anything runs)
    case("set-wrong-type", lambda fx: train_args(fx, "--set", "train.epochs=abc"),
         "--set train.epochs=abc", "train.epochs must be an integer"),
    case("set-unknown-key", lambda fx: train_args(fx, "--set", "optim.lrr=0.1"),
         "unknown config key 'optim.lrr'", "did you mean 'optim.lr'"),
    case("set-a-section", lambda fx: train_args(fx, "--set", "train=3"),
         "train is a section", "train.epochs"),
    case("set-no-equals", lambda fx: train_args(fx, "--set", "train.epochs"),
         "expected KEY=VALUE"),
    case("set-epochs-10**12", lambda fx: train_args(fx, "--set", f"train.epochs={10**12}"),
         "train.epochs must be >= 1 and <= 100000"),
    case("set-batch-size-0", lambda fx: train_args(fx, "--set", "train.batch_size=0"),
         "train.batch_size must be >= 1"),
    case("flag-batch-size--1", lambda fx: train_args(fx, "--batch-size", "-1"),
         "train.batch_size must be >= 1", "got -1"),
    case("set-nan", lambda fx: train_args(fx, "--set", "optim.lr=.nan"),
         "optim.lr must be a finite number"),
    case("set-inf", lambda fx: train_args(fx, "--set", "optim.weight_decay=.inf"),
         "optim.weight_decay must be a finite number"),
    case("set-int-beyond-float", lambda fx: train_args(fx, "--set", f"optim.lr={10**400}"),
         "optim.lr must be a finite number"),
    case("set-negative-seed", lambda fx: train_args(fx, "--set", "data.split_seed=-1"),
         "data.split_seed must be >= 0"),
    case("set-value-nested-too-deep", lambda fx: train_args(fx, "--set", "model.args.depth=" + "[" * 1000),
         "--set model.args.depth=", "nested too deeply"),
    case("set-choice", lambda fx: train_args(fx, "--set", "optim.schedule=linear"),
         "optim.schedule must be one of onecycle | cosine | step | constant"),
    case("flag-wrong-type", lambda fx: train_args(fx, "--epochs", "abc"),
         "'--epochs'", "'abc' is not a valid integer", "train --help"),
    case("flag-workers-0", lambda fx: train_args(fx, "--workers", "0"),
         "scale.workers must be >= 1"),
    case("config-missing", lambda fx: train_args(fx, "--config", fx.tmp / "nope.yaml"),
         "--config", "nope.yaml", "no such file or preset"),
    case("config-a-list", lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "- 1\n- 2\n")),
         "c.yaml", "must be a mapping"),
    case("config-a-scalar", lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "3\n")),
         "c.yaml", "must be a mapping"),
    case("config-binary", lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", noise(300))),
         "c.yaml", "not a UTF-8 text file"),
    case("config-not-yaml",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "train: [unclosed\n")),
         "c.yaml", "not valid YAML at line"),
    case("config-nested-too-deep",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "[" * 1000 + "]" * 1000)),
         "c.yaml", "nested too deeply"),
    case("config-python-tag",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", TAG.format(fx.marker))),
         "c.yaml", "python/object/apply", "plain data only", sentinel=True),
    case("config-bad-date",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "data: {source: 2024-13-45}\n")),
         "c.yaml", "a value YAML cannot build", "month"),
    case("config-alias-bomb",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", alias_bomb() + "\ntrain: {epochs: *a8}\n")),
         "c.yaml", "unknown config key 'a0'"),
    case("config-alias-bomb-as-a-value",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", ALIAS_VALUE)),
         "c.yaml", "train.epochs must be an integer", "..."),
    case("config-unknown-key",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "trian: {epochs: 3}\n")),
         "c.yaml", "unknown config key 'trian'", "did you mean"),
    case("config-wrong-type",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "train: {epochs: 2.5}\n")),
         "c.yaml", "train.epochs must be an integer, got 2.5"),
    case("config-section-not-a-mapping",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "optim: 3\n")),
         "c.yaml", "optim must be a mapping"),
    case("train-batch-larger-than-the-data", lambda fx: train_args(fx, "--batch-size", "100000"),
         "train.batch_size=100000", "training images", "lower the batch size"),
    case("train-limit-larger-than-the-data", lambda fx: train_args(fx, "--limit", "100000"),
         "data.limit=100000", "use a smaller --limit"),
    case("train-missing-out", lambda fx: ["train", "--model", fx.spec, "--data", fx.data],
         "--out DIR is required"),
    case("train-resume-not-a-run", lambda fx: ["train", "--resume", fx.tmp],
         "--resume", "not a run directory"),
    case("train-resume-with-other-flags", lambda fx: ["train", "--resume", fx.run, "--lr", "0.1"],
         "only --epochs may change on resume"),

    # -------- layer specs: models show, --model spec.yaml, --set model.*
    case("show-unknown-model", lambda fx: ["models", "show", "vgg19"],
         "unknown model 'vgg19'", "registered: seed-small"),
    case("show-spec-missing", lambda fx: ["models", "show", fx.tmp / "missing.yaml"],
         "missing.yaml: no such spec file"),
    case("show-spec-unknown-layer", lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- {pool: 2}\n")],
         "n.yaml: layer 0", "unknown layer type 'pool'", "valid types: conv"),
    case("show-spec-wrong-type", lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- {conv: abc}\n")],
         "n.yaml: layer 0 (conv)", "filters must be a positive integer, got 'abc'"),
    case("show-spec-negative-channels",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- {conv: 8}\n- {conv: -8}\n")],
         "n.yaml: layer 1 (conv)", "filters must be a positive integer, got -8"),
    case("show-spec-conv-10**9-filters",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", f"- {{conv: {10**9}}}\n")],
         "n.yaml: layer 0 (conv 1000000000", "parameters, more than the 1,000,000,000"),
    case("show-spec-dense-10**9-units",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", f"- gap\n- {{dense: {10**9}}}\n")],
         "n.yaml: layer 1 (dense 1000000000", "parameters, more than"),
    case("show-spec-huge-feature-map",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- {conv: 100000, padding: same}\n")],
         "n.yaml: layer 0", "100000x32x32", "values per image", "pool earlier"),
    case("show-spec-huge-kernel",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", f"- {{conv: 8, kernel: {10**9 + 1}}}\n")],
         "n.yaml: layer 0", "parameters, more than"),
    case("show-spec-collapses",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- {conv: 8, kernel: 33}\n")],
         "n.yaml: layer 0 (conv 8 33x33 valid relu)", "gives 0x0", "use padding: same"),
    case("show-spec-a-mapping", lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "conv: 8\n")],
         "n.yaml", "a layer spec must be a list of layers, got dict"),
    case("show-spec-empty", lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "")],
         "n.yaml", "must be a list of layers, got NoneType"),
    case("show-spec-binary", lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", noise(200))],
         "n.yaml", "not a UTF-8 text file"),
    case("show-spec-nested-too-deep-yaml",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "[" * 1000 + "]" * 1000)],
         "n.yaml", "nested too deeply"),
    case("show-spec-residuals-nested-too-deep",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", DEEP_RESIDUALS)],
         "n.yaml: layer 0.0.0", "nested more than 16 deep"),
    case("show-spec-alias-bomb",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", SPEC_ALIAS_BOMB)],
         "n.yaml: layer", "more than 10,000 layers"),
    case("show-spec-python-tag",
         lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- " + TAG.format(fx.marker))],
         "n.yaml", "plain data only", sentinel=True),
    case("show-spec-with-parameters", lambda fx: ["models", "show", fx.spec, "--set", "depth=2"],
         "tiny.yaml: a layer-spec file takes no parameters"),
    case("show-param-unknown", lambda fx: ["models", "show", "cnn", "--set", "dept=2"],
         "model cnn: unknown parameter 'dept'", "valid parameters: depth=3"),
    case("show-param-wrong-type", lambda fx: ["models", "show", "cnn", "--set", "depth=abc"],
         "model cnn: parameter depth must be an integer", "got 'abc'"),
    case("show-param-width-10**9", lambda fx: ["models", "show", "cnn", "--set", f"width={10**9}"],
         "model cnn: layer 0 (conv", "parameters, more than"),
    case("show-param-depth-10**8", lambda fx: ["models", "show", "cnn", "--set", f"depth={10**8}"],
         "model cnn", "depth, convs and dense_layers must be <= 64"),
    case("show-param-inf", lambda fx: ["models", "show", "cnn", "--set", "width=.inf"],
         "model cnn: parameter width must be a finite number"),
    case("show-param-float-overflow", lambda fx: ["models", "show", "cnn", "--set", "growth=1e308"],
         "model cnn: block 1", "more filters than a float holds"),
    case("show-param-nested-too-deep", lambda fx: ["models", "show", "cnn", "--set", "depth=" + "[" * 1000],
         "--set depth=", "nested too deeply"),
    case("show-param-no-equals", lambda fx: ["models", "show", "cnn", "--set", "depth"],
         "--set 'depth': expected ARG=VALUE"),
    case("train-bad-spec-refused-before-the-data",
         lambda fx: ["train", "--model", _write(fx.tmp / "n.yaml", "- {conv: 0}\n"), "--data", "synthetic:100",
                     "--out", fx.out],
         "n.yaml: layer 0 (conv)", "filters must be a positive integer"),
    case("train-set-model-name-to-a-bad-spec",
         lambda fx: ["train", "--data", fx.data, "--out", fx.out,
                     "--set", f"model.name={_write(fx.tmp / 'n.yaml', '- {dense: 10}')}"],
         "n.yaml: layer 0 (dense 10 relu)", "put flatten or gap before dense"),
    case("train-set-model-args-of-a-spec", lambda fx: train_args(fx, "--set", "model.args.depth=2"),
         "tiny.yaml: a layer-spec file takes no parameters"),
    case("train-huge-model",
         lambda fx: ["train", "--model", "cnn", "--set", f"model.args.filters={10**6}", "--data", fx.data,
                     "--out", fx.out],
         "model cnn: layer 0", "more than"),

    # -------- spaces and options of `cifar-ray tune` (refused before Ray starts)
    case("tune-space-a-list", lambda fx: tune_args(fx, space_file(fx, "- 1\n")),
         "space.yaml: a space must be a mapping"),
    case("tune-space-a-scalar", lambda fx: tune_args(fx, space_file(fx, "3\n")),
         "space.yaml: a space must be a mapping"),
    case("tune-space-binary", lambda fx: tune_args(fx, _write(fx.tmp / "b.yaml", noise(300))),
         "b.yaml", "not a UTF-8 text file"),
    case("tune-space-nested-too-deep", lambda fx: tune_args(fx, space_file(fx, "[" * 1000 + "]" * 1000)),
         "space.yaml", "nested too deeply"),
    case("tune-space-python-tag",
         lambda fx: tune_args(fx, space_file(fx, TAG.format(fx.marker))),
         "space.yaml", "plain data only", sentinel=True),
    case("tune-space-alias-bomb", lambda fx: tune_args(fx, space_file(fx, alias_bomb() + "\n")),
         "space.yaml", "unknown key 'a0'"),
    case("tune-space-unknown-top-key",
         lambda fx: tune_space(fx, grdi={"optim.lr": [0.1]}),
         "space.yaml: unknown key 'grdi'"),
    case("tune-space-unknown-config-key",
         lambda fx: tune_space(fx, grid={"optim.lrr": [0.1]}),
         "space.yaml: grid", "unknown config key 'optim.lrr'", "did you mean 'optim.lr'"),
    case("tune-space-unknown-key-in-base",
         lambda fx: tune_args(fx, space_file(fx, {"base": {"trian": {"epochs": 2}}, "grid": {"optim.lr": [0.1]}})),
         "space.yaml: base", "unknown config key 'trian'"),
    case("tune-space-grid-empty",
         lambda fx: tune_space(fx, grid={"optim.lr": []}),
         "grid.optim.lr", "must be a non-empty list"),
    case("tune-space-choice-empty",
         lambda fx: tune_space(fx, choice={"optim.lr": []}),
         "choice.optim.lr", "must be a non-empty list"),
    case("tune-space-uniform-one-number",
         lambda fx: tune_space(fx, uniform={"optim.lr": [0.1]}),
         "uniform.optim.lr", "must be [low, high]"),
    case("tune-space-uniform-a-string",
         lambda fx: tune_space(fx, uniform={"optim.lr": "abc"}),
         "uniform.optim.lr", "must be [low, high]", "got 'abc'"),
    case("tune-space-uniform-reversed",
         lambda fx: tune_space(fx, uniform={"optim.lr": [0.2, 0.1]}),
         "uniform.optim.lr", "low must be < high"),
    case("tune-space-uniform-nan",
         lambda fx: tune_args(fx, space_file(fx, "base: {train: {epochs: 2}}\nuniform: {optim.lr: [.nan, 1]}\n")),
         "uniform.optim.lr", "must be [low, high]"),
    case("tune-space-loguniform-zero",
         lambda fx: tune_space(fx, loguniform={"optim.lr": [0, 0.1]}),
         "loguniform needs low > 0"),
    case("tune-space-randint-floats",
         lambda fx: tune_space(fx, randint={"train.seed": [1.5, 3]}),
         "randint needs integers"),
    case("tune-space-randint-beyond-64-bits",
         lambda fx: tune_space(fx, randint={"train.seed": [0, 10**30]}),
         "randint bounds must fit in 64 bits"),
    case("tune-space-draws-the-wrong-type",
         lambda fx: tune_space(fx, uniform={"train.batch_size": [16, 64]}),
         "space.yaml: train.batch_size=", "train.batch_size must be an integer"),
    case("tune-space-varies-the-data",
         lambda fx: tune_space(fx, grid={"data.limit": [100]}),
         "data.limit cannot vary across trials"),
    case("tune-space-variants-not-a-list",
         lambda fx: tune_space(fx, variants={"a": 1}),
         "variants must be a non-empty list"),
    case("tune-space-variant-without-name",
         lambda fx: tune_space(fx, variants=[{"set": {"optim.lr": 0.1}}]),
         "variants.0", "a variant is a mapping with a name"),
    case("tune-space-variant-note-not-text",
         lambda fx: tune_space(fx, variants=[{"name": "a", "note": [1, 2]}]),
         "variants.a.note", "must be text"),
    case("tune-space-description-not-text",
         lambda fx: tune_space(fx, grid={"optim.lr": [0.1]}, description={"a": 1}),
         "description must be one line of text"),
    case("tune-space-reference-out-of-range",
         lambda fx: tune_space(fx, variants=[{"name": "a", "reference": 75}]),
         "variants.a.reference", "an accuracy in [0, 1]"),
    case("tune-space-sweeps-nothing", lambda fx: tune_space(fx),
         "sweeps nothing"),
    case("tune-space-sweep-option-unknown",
         lambda fx: tune_space(fx, grid={"optim.lr": [0.1]}, sweep={"sampels": 2}),
         "sweep.sampels", "unknown option"),
    case("tune-space-sweep-option-wrong-type",
         lambda fx: tune_space(fx, grid={"optim.lr": [0.1]}, sweep={"samples": "x"}),
         "--samples: must be an integer, got 'x'"),
    case("tune-space-too-many-trials",
         lambda fx: tune_space(fx, grid={f"model.args.k{i}": list(range(100)) for i in range(4)}),
         "100,000,000 trials", "more than the 10,000"),
    case("tune-samples-10**9",
         lambda fx: tune_space(fx, "--samples", 10**9, choice={"optim.lr": [0.1, 0.2]}),
         "1,000,000,000 trials"),
    case("tune-max-epochs-10**12", lambda fx: tune_args(fx, fx.space, "--max-epochs", 10**12),
         "--max-epochs 1000000000000: must be <= 100000"),
    case("tune-grace-beyond-max-epochs", lambda fx: tune_args(fx, fx.space, "--grace", 9),
         "--grace 9 exceeds --max-epochs 2"),
    case("tune-reduction-1", lambda fx: tune_args(fx, fx.space, "--reduction", 1),
         "--reduction 1: must be > 1"),
    case("tune-seeds-0", lambda fx: tune_args(fx, fx.space, "--seeds", 0),
         "--seeds 0: must be >= 1"),
    case("tune-set-wrong-type", lambda fx: tune_args(fx, fx.space, "--set", "optim.lr=abc"),
         "optim.lr must be a number"),
    case("tune-a-model-that-collapses",
         lambda fx: tune_space(fx, variants=[{"name": "tiny", "set": {"model.name": "cnn", "model.args.depth": 7}}]),
         "variant tiny", "gives 0x0"),
    case("tune-batch-larger-than-the-data",
         lambda fx: tune_args(fx, fx.space, "--set", "train.batch_size=100000"),
         "train.batch_size=100000", "lower the batch size"),
    case("tune-unknown-space", lambda fx: ["tune", "--space", "nope", "--data", fx.data, "--out", fx.out],
         "--space nope: no such file or built-in space"),
    case("tune-missing-space", lambda fx: ["tune", "--data", fx.data, "--out", fx.out],
         "--space NAME|FILE is required"),
    case("tune-out-unknown-scheme", lambda fx: tune_args(fx, fx.space)[:-1] + ["nosuch://b/x"],
         "--out nosuch://b/x", "unknown storage scheme"),
    case("train-out-bucket-root", lambda fx: ["train", "--data", fx.data, "--out", "s3://bucket"],
         "--out s3://bucket", "s3://bucket/cifar-ray/NAME"),

    # -------- checkpoints for evaluate / predict
    case("predict-checkpoint-truncated",
         lambda fx: ["predict", cut(with_state(fx, "state.pt"), 0.5), fx.image],
         "state.pt", "not a readable cifar-ray checkpoint"),
    case("predict-checkpoint-random-bytes",
         lambda fx: ["predict", _write(fx.tmp / "state.pt", noise(4000)), fx.image],
         "state.pt", "not a readable cifar-ray checkpoint"),
    case("predict-checkpoint-plain-pickle-with-code",
         lambda fx: ["predict", _write(fx.tmp / "state.pt", pickle.dumps(Sentinel(fx.marker))), fx.image],
         "state.pt", "not a readable cifar-ray checkpoint", sentinel=True),
    case("predict-checkpoint-torch-file-with-code",
         lambda fx: ["predict", with_state(fx, "state.pt", model=Sentinel(fx.marker)), fx.image],
         "state.pt", "not a readable cifar-ray checkpoint", "was not an allowed global by default.",
         "never runs code from a checkpoint)", sentinel=True),
    case("evaluate-checkpoint-torch-file-with-code",
         lambda fx: ["evaluate", with_state(fx, "state.pt", classes=Sentinel(fx.marker))],
         "state.pt", "not a readable cifar-ray checkpoint", sentinel=True),
    case("predict-checkpoint-not-ours",
         lambda fx: ["predict", _torch_save(fx.tmp / "state.pt", {"weights": torch.zeros(3)}), fx.image],
         "state.pt: not a cifar-ray checkpoint"),
    case("predict-checkpoint-without-config",
         lambda fx: ["predict", with_state(fx, "state.pt", config=None), fx.image],
         "state.pt: not a valid cifar-ray checkpoint (config is missing)"),
    case("predict-checkpoint-without-classes",
         lambda fx: ["predict", with_state(fx, "state.pt", classes=None), fx.image],
         "(classes is missing)"),
    case("predict-checkpoint-weights-not-tensors",
         lambda fx: ["predict", with_state(fx, "state.pt", model="weights"), fx.image],
         "model must be a mapping of names to tensors"),
    case("predict-checkpoint-std-zero",
         lambda fx: ["predict", with_state(fx, "state.pt", std=[0.0, 0.0, 0.0]), fx.image],
         "std must be 3 positive numbers"),
    case("predict-checkpoint-bad-config",
         lambda fx: ["predict", with_state(fx, "state.pt", config={"train": {"epochs": "x"}}), fx.image],
         "state.pt: config", "train.epochs must be an integer"),
    case("predict-checkpoint-of-another-model",
         lambda fx: ["predict", with_state(fx, "state.pt", config=C.to_dict(C.Config())), fx.image],
         "state.pt: its weights do not fit model seed-vgg-bn", "0.0.weight has shape [16, 3, 3, 3], the model's",
         "changed since"),
    case("predict-checkpoint-other-class-count",
         lambda fx: ["predict", with_state(fx, "state.pt", classes=["a", "b", "c"]), fx.image],
         "state.pt: its weights do not fit", "has shape [10, 32], the model's [3, 32]"),
    case("predict-checkpoint-spec-gone",
         lambda fx: ["predict", with_state(fx, "state.pt", config=C.to_dict(C.load_config(
             None, [f"model.name={fx.tmp / 'gone.yaml'}"]))), fx.image],
         "state.pt: cannot rebuild its model", "gone.yaml: no such spec file"),
    case("predict-checkpoint-missing", lambda fx: ["predict", fx.tmp / "nope", fx.image],
         "nope: no such run directory or checkpoint"),
    case("predict-run-without-checkpoints", lambda fx: ["predict", fx.tmp, fx.image],
         "holds no checkpoint", "train first"),
    case("predict-run-with-a-garbage-metrics-table",
         lambda fx: ["predict", damaged_run(fx, "metrics.csv", "garbage,x\n1,2,3\n"), fx.image],
         "run/metrics.csv: not a metrics table cifar-ray wrote", "train --resume"),
    case("report-run-with-non-numeric-metrics",
         lambda fx: ["report", damaged_run(fx, "metrics.csv", "epoch,val_acc\n1,high\n")],
         "run/metrics.csv: not a metrics table cifar-ray wrote"),
    case("predict-run-with-a-summary-that-is-a-list",
         lambda fx: ["predict", damaged_run(fx, "summary.json", "[1, 2]"), fx.image],
         "run/summary.json: unreadable summary", "train --resume"),
    case("predict-run-with-a-summary-of-wrong-types",
         lambda fx: ["predict", damaged_run(fx, "summary.json", '{"best_epoch": [1]}'), fx.image],
         "run/summary.json: unreadable summary"),
    case("report-run-with-a-summary-of-wrong-types",
         lambda fx: ["report", damaged_run(fx, "summary.json", '{"params": "many"}')],
         "run/summary.json: unreadable summary"),
    case("evaluate-checkpoint-truncated", lambda fx: ["evaluate", cut(with_state(fx, "state.pt"), 0.3)],
         "state.pt", "not a readable cifar-ray checkpoint"),
    case("evaluate-data-missing", lambda fx: ["evaluate", fx.ckpt, "--data", fx.tmp / "nope.tar.gz"],
         "nope.tar.gz: no such file or directory"),

    # -------- images for predict
    case("predict-image-not-an-image",
         lambda fx: ["predict", fx.ckpt, _write(fx.tmp / "x.png", b"not an image")],
         "x.png: cannot decode image", "not an image file", "PNG or JPEG"),
    case("predict-image-truncated-png",
         lambda fx: ["predict", fx.ckpt, _write(fx.tmp / "x.png", fx.image.read_bytes()[:60])],
         "x.png: cannot decode image", "truncated"),
    case("predict-image-truncated-jpeg",
         lambda fx: ["predict", fx.ckpt, _write(fx.tmp / "x.jpg", encode(random_images(1, 3)[0], "JPEG")[:300])],
         "x.jpg: cannot decode image"),
    case("predict-image-bomb", lambda fx: ["predict", fx.ckpt, _write(fx.tmp / "x.png", png_bomb())],
         "x.png: cannot decode image", "decompression bomb"),
    case("predict-image-a-directory", lambda fx: ["predict", fx.ckpt, fx.tmp],
         "is a directory", "give image files"),
    case("predict-image-missing", lambda fx: ["predict", fx.ckpt, fx.tmp / "nope.png"],
         "nope.png: no such image file"),
    case("predict-no-images", lambda fx: ["predict", fx.ckpt],
         "Missing argument 'IMAGE...'"),
    case("predict-top-k-0", lambda fx: ["predict", fx.ckpt, fx.image, "--top-k", "0"],
         "'--top-k'", "0"),

    # -------- output paths
    case("train-out-is-a-file", lambda fx: train_args(fx)[:-1] + [_write(fx.tmp / "f", "x")],
         "--out", "is a file, not a folder"),
    case("train-out-under-a-file", lambda fx: train_args(fx)[:-1] + [_write(fx.tmp / "f", "x") / "run"],
         "--out", "is a file, not a folder"),
    case("train-out-holds-files",
         lambda fx: train_args(fx)[:-1] + [_write(fx.tmp / "busy" / "keep.txt", "x").parent],
         "--out", "busy: holds files cifar-ray did not write (keep.txt)", "choose another folder"),
    case("train-out-not-writable", lambda fx: train_args(fx)[:-1] + [chmod_readonly(fx.tmp / "ro") / "run"],
         "--out", "not writable", root_skips=True),
    case("train-out-denied", lambda fx, mp: train_args(fx)[:-1] + [deny_writes(fx.tmp / "ro", mp) / "run"],
         "--out", "ro is not writable"),
    case("tune-out-denied",
         lambda fx, mp: tune_args(fx, fx.space)[:-1] + [deny_writes(fx.tmp / "ro", mp) / "sweep"],
         "--out", "ro is not writable"),
    case("tune-out-is-a-file", lambda fx: tune_args(fx, fx.space)[:-1] + [_write(fx.tmp / "f", "x")],
         "--out", "is a file, not a folder"),
    case("tune-out-under-a-file",
         lambda fx: tune_args(fx, fx.space)[:-1] + [_write(fx.tmp / "f", "x") / "sweep"],
         "--out", "is a file, not a folder"),
    case("tune-out-holds-files",
         lambda fx: tune_args(fx, fx.space)[:-1] + [_write(fx.tmp / "busy" / "keep.txt", "x").parent],
         "--out", "busy: holds files cifar-ray did not write (keep.txt)"),
    case("report-not-a-run", lambda fx: ["report", fx.tmp],
         "neither a sweep directory", "nor a run directory"),
    case("unknown-command", lambda fx: ["fly"],
         "No such command 'fly'"),

    # -------- what is not a file, not a value, or too big to decode
    case("prepare-a-fifo", lambda fx: ["data", "prepare", fifo(fx.tmp / "data.tar.gz")],
         "data.tar.gz: not a regular file", "not read"),
    case("prepare-a-device", lambda fx: ["data", "prepare", "/dev/zero"],
         "/dev/zero: not a regular file"),
    case("prepare-a-fifo-in-the-image-tree",
         lambda fx: ["data", "prepare", fifo(images(fx, {}) / "cat" / "pipe.png").parents[1]],
         "cat/pipe.png: not a regular file"),
    case("predict-image-a-fifo", lambda fx: ["predict", fx.ckpt, fifo(fx.tmp / "x.png")],
         "x.png: not a regular file"),
    case("predict-image-a-device", lambda fx: ["predict", fx.ckpt, "/dev/zero"],
         "/dev/zero: not a regular file"),
    case("config-a-fifo", lambda fx: train_args(fx, "--config", fifo(fx.tmp / "c.yaml")),
         "c.yaml: not a regular file"),
    case("train-empty-data", lambda fx: ["train", "--model", fx.spec, "--data", "", "--out", fx.out],
         "data.source must be a non-empty string"),
    case("train-empty-model", lambda fx: ["train", "--model", "", "--data", fx.data, "--out", fx.out],
         "model.name must be a non-empty string"),
    case("tune-empty-data", lambda fx: tune_args(fx, fx.space)[:3] + ["--data", "", "--out", fx.out],
         "data.source must be a non-empty string"),
    case("config-duplicate-key",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "train: {epochs: 3}\ntrain: {lr: 1}\n")),
         "c.yaml: the key 'train' is given twice", "at line 2"),
    case("spec-duplicate-key", lambda fx: ["models", "show", _write(fx.tmp / "n.yaml", "- {conv: 8, conv: 16}\n")],
         "n.yaml: the key 'conv' is given twice"),
    case("space-duplicate-key",
         lambda fx: tune_args(fx, space_file(fx, "grid: {optim.lr: [0.1]}\ngrid: {optim.lr: [0.2]}\n")),
         "space.yaml: the key 'grid' is given twice"),
    case("config-number-rounds-to-0",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "optim: {weight_decay: 1.0e-400}\n")),
         "c.yaml: the number 1.0e-400 rounds to 0.0"),
    case("config-number-rounds-to-0-yaml-1.1-string",
         lambda fx: train_args(fx, "--config", _write(fx.tmp / "c.yaml", "optim: {weight_decay: 1e-400}\n")),
         "optim.weight_decay must be a number a float can hold"),
    case("set-number-rounds-to-0", lambda fx: train_args(fx, "--set", "optim.lr=1.0e-999"),
         "--set optim.lr=1.0e-999", "rounds to 0.0"),
    case("set-number-overflows", lambda fx: train_args(fx, "--set", "optim.lr=1e999"),
         "optim.lr must be a number a float can hold"),
    case("tune-cpus-per-trial-below-ray-precision",
         lambda fx: tune_args(fx, fx.space, "--cpus-per-trial", "0.00001"),
         "--cpus-per-trial 1e-05", "steps of 0.0001"),
    case("tune-gpus-per-trial-finer-than-ray",
         lambda fx: tune_args(fx, fx.space, "--gpus-per-trial", "0.33333"),
         "--gpus-per-trial 0.33333", "give a multiple of 0.0001"),
    case("predict-image-over-the-pixel-budget",
         lambda fx: ["predict", fx.ckpt, _write(fx.tmp / "x.png", png_bomb(6000))],
         "x.png: cannot decode image: it is 6000x6000 pixels", "shrink it"),
    case("prepare-image-over-the-pixel-budget",
         lambda fx: ["data", "prepare", images(fx, {"cat/big.png": png_bomb(6000)})],
         "cat/big.png: cannot decode the image: it is 6000x6000 pixels"),
]


def _torch_save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused(row: Case, fx, tmp_path, monkeypatch):
    if row.root_skips and os.geteuid() == 0:
        pytest.skip("file permissions do not bind root")
    nargs = row.make.__code__.co_argcount
    args = row.make(fx) if nargs == 1 else row.make(fx, monkeypatch)
    before = snapshot(tmp_path, fx.root)
    result = invoke(args)
    assert_refused(result, row.needles)
    assert snapshot(tmp_path, fx.root) == before, "the refused command changed files"
    if row.sentinel:
        assert not fx.marker.exists(), "code in the input ran"


def test_the_catalogue_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- the controls

def test_controls_the_good_inputs_work(fx, tmp_path):
    """The rows spoil inputs that work: were these broken, the rows would prove nothing."""
    shown = invoke(["models", "show", fx.spec])
    assert shown.exit_code == 0, shown.output
    group = invoke(["data"])  # a group alone shows its help, not an error line
    assert "Usage:" in group.output and "Commands:" in group.output and "error:" not in group.output
    predicted = invoke(["predict", fx.ckpt, fx.image, "--json"])
    assert predicted.exit_code == 0, predicted.output
    big = _write(fx.tmp / "big.png", encode(random_images(1, 2, (40, 50))[0]))  # resized, not refused
    assert invoke(["predict", fx.ckpt, big]).exit_code == 0
    assert invoke(["predict", with_state(fx, "again.pt"), fx.image]).exit_code == 0
    space = S.load_space(str(fx.space))
    assert len(S.plan_sweep(space, S.resolve_settings(space, {})).trials) == 2
    assert invoke(["data", "prepare", write_dir(fx.tmp / "imgs", tree()[0])]).exit_code == 0
    # A merge key overriding what it merges is not a key given twice.
    merged = _write(fx.tmp / "merge.yaml", "x: &b {epochs: 2, batch_size: 8}\ntrain:\n  <<: *b\n  batch_size: 32\n")
    assert C.read_yaml(merged)["train"] == {"epochs": 2, "batch_size": 32}
    # The sentinels do run code when unpickled without weights_only.
    torch.load(with_state(fx, "evil.pt", model=Sentinel(fx.marker)), weights_only=False)
    assert fx.marker.exists()
    fx.marker.unlink()
    yaml.unsafe_load(f"!!python/object/apply:os.mkdir [{fx.marker}]")
    assert fx.marker.exists()


def test_a_refused_resource_request_leaves_no_run_dir(fx, monkeypatch):
    """More workers than the cluster has is refused after Ray starts (it needs the cluster's
    size) but before the run directory is written."""
    import ray

    from cifar_ray import train

    monkeypatch.setattr(train, "init_ray", lambda **kw: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    before = snapshot(fx.tmp.parent, fx.root)
    result = invoke(train_args(fx, "--workers", "64", "--batch-size", "64"))
    assert_refused(result, ["--workers 64", "the Ray cluster has 2"])
    assert snapshot(fx.tmp.parent, fx.root) == before and not fx.out.exists()


# ---------------------------------------------------------------- real processes

def test_real_processes_exit_2_without_traceback(fx):
    """The exit status and stderr of `python -m cifar_ray` itself, three commands at once
    (each pays the interpreter's and torch's start-up)."""
    commands = {
        "bad-spec": ["models", "show", _write(fx.tmp / "n.yaml", f"- {{conv: {10**9}}}\n")],
        "checkpoint-with-code": ["predict", with_state(fx, "state.pt", model=Sentinel(fx.marker)), fx.image],
        "config-nested-too-deep": ["train", "--config", _write(fx.tmp / "c.yaml", "[" * 1000), "--out", fx.out],
        # torch warns about the pickle protocol before it fails: only our line may show
        "checkpoint-of-another-pickle-protocol": ["predict", _write(fx.tmp / "p.pt", b"\x80garbage" * 50), fx.image],
    }
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "cifar_ray", *map(str, argv)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err and out == "", (name, err)
    assert not fx.marker.exists() and not fx.out.exists()


# ---------------------------------------------------------------- fuzz: parse or UserError

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SECTIONS = [f.split(".")[0] for f in C.valid_keys()]
FIELDS = [f.split(".")[-1] for f in C.valid_keys()]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["relu", "cnn", "synthetic:20", "sgd", "same", "1e-3", "-1"]))
names = st.one_of(st.sampled_from(SECTIONS + FIELDS + ["args", "model.args.depth"]), st.text(max_size=8))
data = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                    st.dictionaries(names, kids, max_size=4)),
                    max_leaves=16)
# Configs shaped like configs: sections of fields, so values reach the type and range checks.
config_like = st.dictionaries(st.sampled_from(SECTIONS + ["bogus"]),
                              st.one_of(st.dictionaries(st.sampled_from(FIELDS + ["bogus"]), data, max_size=5), data),
                              max_size=4)
dotted = st.one_of(st.sampled_from(C.valid_keys() + ["model.args.depth", "model.args.width", "train"]),
                   st.text(max_size=15))
set_items = st.one_of(st.text(max_size=30),
                      st.builds(lambda k, v: f"{k}={v}", dotted,
                                st.one_of(st.text(max_size=15), scalars.map(lambda v: yaml.safe_dump(v).strip()))))


def parses_or_refuses(fn, *args):
    try:
        return fn(*args)
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return None


@FUZZ
@given(items=st.lists(set_items, max_size=4))
def test_fuzz_set_overrides(items):
    cfg = parses_or_refuses(C.load_config, None, items)
    assert cfg is None or isinstance(cfg, C.Config)


@FUZZ
@given(doc=st.one_of(config_like, data), as_text=st.text(max_size=60), raw=st.booleans())
def test_fuzz_config_files(doc, as_text, raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(as_text if raw else yaml.safe_dump(doc))
    cfg = parses_or_refuses(C.load_config, str(path), [])
    assert cfg is None or isinstance(cfg, C.Config)


SWEEPABLE = ["optim.lr", "optim.name", "train.batch_size", "train.seed", "aug.hflip",
             "model.args.depth", "model.name", "data.limit", "train.epochs", "bogus.key"]
numbers = st.one_of(st.integers(-5, 300), st.floats(-1, 2), st.floats(allow_nan=True, allow_infinity=True))
space_like = st.fixed_dictionaries({}, optional={
    "description": scalars,
    "base": st.one_of(config_like, st.just({"model": {"name": "cnn", "args": {"depth": 1, "filters": 4}},
                                            "train": {"epochs": 2}})),
    "grid": st.dictionaries(st.sampled_from(SWEEPABLE), st.one_of(st.lists(scalars, max_size=3), scalars), max_size=3),
    "choice": st.dictionaries(st.sampled_from(SWEEPABLE), st.one_of(st.lists(scalars, max_size=3), scalars), max_size=2),
    "uniform": st.dictionaries(st.sampled_from(SWEEPABLE), st.one_of(st.lists(numbers, max_size=3), data), max_size=2),
    "loguniform": st.dictionaries(st.sampled_from(SWEEPABLE), st.lists(numbers, max_size=3), max_size=2),
    "randint": st.dictionaries(st.sampled_from(SWEEPABLE), st.lists(st.one_of(numbers, st.integers()), max_size=3),
                               max_size=2),
    "variants": st.one_of(data, st.lists(st.fixed_dictionaries(
        {"name": st.one_of(st.text(max_size=5), scalars)},
        optional={"set": st.dictionaries(st.sampled_from(SWEEPABLE), scalars, max_size=2),
                  "note": scalars, "reference": scalars, "bogus": scalars}), max_size=3)),
    "sweep": st.dictionaries(st.sampled_from(["samples", "seeds", "max_epochs", "grace", "reduction", "bogus"]),
                             st.one_of(numbers, scalars), max_size=3),
    "bogus": data,
})


@FUZZ
@given(doc=st.one_of(space_like, data))
def test_fuzz_spaces(doc):
    space = parses_or_refuses(S.parse, doc, "fuzz.yaml")
    if space is None:
        return
    settings_ = parses_or_refuses(S.resolve_settings, space, {})
    if settings_ is not None:
        plan = parses_or_refuses(S.plan_sweep, space, settings_)
        assert plan is None or isinstance(plan.trials, tuple)


# ---------------------------------------------------------------- good inputs, read right

def _modes() -> dict:
    """An image in every mode PIL writes to PNG, and its pixels converted independently
    (numpy, from the mode's definition) to 8-bit RGB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    bits = rng.integers(0, 2, (8, 8)).astype(bool)
    pal = Image.fromarray(rgba[..., :3]).quantize(16)
    palette = np.array(pal.getpalette()[:48], np.uint8).reshape(16, 3)
    gray = rgba[..., 0]
    return {
        "RGB": (Image.fromarray(rgba[..., :3]), rgba[..., :3]),
        "RGBA": (Image.fromarray(rgba), rgba[..., :3]),  # alpha dropped, colour kept
        "L": (Image.fromarray(gray), np.repeat(gray[..., None], 3, 2)),
        "LA": (Image.fromarray(rgba[..., :2], "LA"), np.repeat(gray[..., None], 3, 2)),
        "1": (Image.fromarray(bits), np.repeat(bits[..., None] * np.uint8(255), 3, 2)),
        "P": (pal, palette[np.asarray(pal)]),
        "I;16": (Image.fromarray(gray16),
                 np.repeat(np.rint(gray16 / 257.0).astype(np.uint8)[..., None], 3, 2)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_image_mode_becomes_the_same_8_bit_rgb(mode, tmp_path):
    """Each mode, written as PNG and read back by `data prepare`'s decoder and by
    `predict`'s, equals an independent conversion (PIL's own convert("RGB") clips a 16-bit
    grayscale image at 255: nearly white)."""
    import io as io_

    from cifar_ray.data.decode import open_image
    from cifar_ray.inference import read_image

    image, expected = _modes()[mode]
    path = tmp_path / "x.png"
    image.save(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(path).mode == mode  # the file really holds this mode
    decoded = np.asarray(open_image("x.png", io_.BytesIO(path.read_bytes())))
    assert decoded.dtype == np.uint8 and decoded.shape == (8, 8, 3)
    np.testing.assert_array_equal(decoded, expected)
    big = tmp_path / "y.png"
    image.resize((32, 32), Image.Resampling.NEAREST).save(big)  # predict's size: no resampling
    want = expected.repeat(4, 0).repeat(4, 1)
    np.testing.assert_array_equal(read_image(big), want)


def test_evaluate_on_read_only_storage_prints_accuracy_and_warns(fx, tmp_path):
    """A run on a read-only filesystem (a real tmpfs remounted read-only, which binds root
    too) is evaluated: the accuracy is printed, the confusion PNG is not written and a
    warning says so, exit 0."""
    import shutil
    import subprocess

    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = shutil.copytree(fx.run, disk / "run")
        (run / "config.yaml").write_text(C.dump_yaml(C.from_dict(fx.state["config"])))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = invoke(["evaluate", run])
        assert result.exit_code == 0, result.output
        assert "val accuracy" in result.stdout
        assert result.stderr.startswith("warning: the confusion matrix PNG was not written: ")
        assert "confusion-val.png" in result.stderr and result.stderr.count("\n") == 1
        assert not (run / "confusion-val.png").exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
