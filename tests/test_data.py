"""The data pipeline: sources -> prepared Parquet store -> arrays, and the splits.

Every fixture is built here, tiny (tens of images), in every supported format."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar_ray.data import (
    Dataset,
    cache_home,
    channel_stats,
    load,
    prepare,
    stratified_subset,
    train_val_split,
)
from cifar_ray.data import archive, decode, sources, store, synthetic
from cifar_ray.errors import UserError
from helpers import (CLASS_NAMES, encode, evil_pickle, fake_batches, official_tarball,
                     random_images, tar_member, tree, write_dir, write_tar, write_zip)

SHARED_TGZ = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-train-jpeg.tar.gz"


# ---------------------------------------------------------------- fixture builders

def write_source(kind: str, tmp: Path, files: dict[str, bytes]) -> Path:
    if kind == "dir":
        return write_dir(tmp / "images", files)
    if kind == "zip":
        return write_zip(tmp / "images.zip", files)
    mode = {"tar": "w", "tar.gz": "w:gz", "tgz": "w:gz"}[kind]
    return write_tar(tmp / f"images.{kind}", files, mode)


def expected_split(pixels: dict[str, np.ndarray], classes, prefix=""):
    """What a split should hold: images sorted by path, labels by sorted class name."""
    names = sorted(n for n in pixels if n.startswith(prefix))
    x = np.stack([pixels[n] for n in names])
    y = np.array([sorted(classes).index(n[len(prefix):].split("/")[0]) for n in names])
    return x, y


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def nothing_prepared(home: Path):
    prepared = home / "prepared"
    assert not prepared.exists() or list(prepared.iterdir()) == []


# ---------------------------------------------------------------- ImageFolder

@pytest.mark.parametrize("kind", ["dir", "tar", "tar.gz", "tgz", "zip"])
@pytest.mark.parametrize("two_splits", [False, True])
def test_png_round_trip_is_exact(kind, two_splits, tmp_path):
    files, pixels = tree(two_splits=two_splits)
    ds = load(str(write_source(kind, tmp_path, files)))
    assert ds.classes == ["cat", "dog", "frog"]
    assert set(ds.splits) == ({"train", "test"} if two_splits else {"train"})
    for split, (x, y) in ds.splits.items():
        ex, ey = expected_split(pixels, ds.classes, f"{split}/" if two_splits else "")
        assert x.dtype == np.uint8 and x.shape == (12, 32, 32, 3)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    assert ds.meta["splits"]["train"]["per_class"] == {"cat": 4, "dog": 4, "frog": 4}
    assert ds.path.parent == cache_home() / "prepared"


def test_same_tree_in_any_container_gives_the_same_dataset(tmp_path):
    files, _ = tree(two_splits=True)
    loaded = [load(str(write_source(kind, tmp_path, files))) for kind in ("dir", "tar.gz", "zip")]
    for ds in loaded[1:]:
        for split in ("train", "test"):
            np.testing.assert_array_equal(ds.splits[split][0], loaded[0].splits[split][0])
            np.testing.assert_array_equal(ds.splits[split][1], loaded[0].splits[split][1])


def test_jpeg_decodes_like_pil(tmp_path):
    files, _ = tree(fmt="JPEG")
    ds = load(str(write_source("tar.gz", tmp_path, files)))
    x, _ = ds.splits["train"]
    names = sorted(files)
    pil = np.stack([np.asarray(Image.open(io.BytesIO(files[n])).convert("RGB")) for n in names])
    np.testing.assert_array_equal(x, pil)


def test_wrapper_folder_hidden_and_other_files(tmp_path):
    files, pixels = tree()
    files = {f"mydata/{n}": b for n, b in files.items()}
    files["mydata/README.txt"] = b"hello"
    files["mydata/cat/._000.png"] = b"macOS resource fork, not an image"
    files["__MACOSX/mydata/cat/._000.png"] = b"neither"
    ds = load(str(write_source("zip", tmp_path, files)))
    np.testing.assert_array_equal(ds.splits["train"][0], expected_split(pixels, ds.classes)[0])
    assert ds.meta["skipped_files"] == 1


def test_grayscale_rgba_palette_become_rgb(tmp_path):
    img = random_images(1, 5)[0]
    files = {}
    for mode in ("L", "RGBA", "P", "LA"):
        files[f"{mode.lower()}/a.png"] = encode(img, "PNG", mode)
        files[f"{mode.lower()}/b.jpg" if mode == "L" else f"{mode.lower()}/b.png"] = encode(img, "JPEG" if mode == "L" else "PNG", mode)
    ds = load(str(write_dir(tmp_path / "modes", files)))
    x, y = ds.splits["train"]
    assert x.shape == (8, 32, 32, 3)
    for i, name in enumerate(sorted(files)):
        want = np.asarray(Image.open(io.BytesIO(files[name])).convert("RGB"))
        np.testing.assert_array_equal(x[i], want, err_msg=name)


def test_resize_converts_other_sizes(tmp_path):
    files, _ = tree(per_class=2)
    files["cat/big.png"] = encode(np.full((48, 64, 3), 200, np.uint8))
    src = write_dir(tmp_path / "sizes", files)
    with pytest.raises(UserError) as e:
        prepare(str(src))
    one_line_error(e, "big.png", "64x48", "not 32x32", "--resize")
    nothing_prepared(cache_home())
    ds = load(str(prepare(str(src), resize=True)))
    x, y = ds.splits["train"]
    assert x.shape == (7, 32, 32, 3)
    np.testing.assert_array_equal(x[sorted(files).index("cat/big.png")], np.full((32, 32, 3), 200, np.uint8))


def test_resize_is_part_of_the_cache_key(tmp_path):
    src = str(write_dir(tmp_path / "d", tree()[0]))
    assert prepare(src) != prepare(src, resize=True)


# ---------------------------------------------------------------- the prepared store

def test_cache_hit_returns_the_same_path_without_decoding(tmp_path, monkeypatch):
    src = str(write_source("tar.gz", tmp_path, tree()[0]))
    first = prepare(src)
    monkeypatch.setattr(sources, "decode_images", _must_not_run)
    assert prepare(src) == first
    assert load(src).path == first


def _must_not_run(*args, **kwargs):
    raise AssertionError("decoded again despite a cache hit")


def test_cache_key_follows_content_not_location(tmp_path):
    files, _ = tree()
    a = prepare(str(write_dir(tmp_path / "a", files)))
    b = prepare(str(write_dir(tmp_path / "b", files)))
    assert a == b
    files["cat/000.png"] = encode(random_images(1, 99)[0])
    assert prepare(str(write_dir(tmp_path / "c", files))) != a


def test_prepared_layout_and_meta(tmp_path):
    import pyarrow.parquet as pq

    path = prepare(str(write_source("dir", tmp_path, tree(two_splits=True)[0])), tmp_path / "out")
    assert path == tmp_path / "out"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "test.parquet", "train.parquet"]
    schema = pq.read_schema(path / "train.parquet")
    assert str(schema.field("image").type) == "fixed_size_binary[3072]"
    assert str(schema.field("label").type) in ("int16", "int64")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "frog"]
    assert meta["splits"]["test"]["count"] == 12
    assert meta["content_hash"].startswith("sha256:")
    assert meta["format_version"] == store.FORMAT_VERSION
    assert "ImageFolder directory" in meta["source"]
    ds = load(str(path))
    x = ds.splits["train"][0]
    mean, std = ds.mean, ds.std
    np.testing.assert_allclose(mean, (x / 255.0).reshape(-1, 3).mean(0), atol=1e-6)
    np.testing.assert_allclose(std, (x / 255.0).reshape(-1, 3).std(0), atol=1e-6)
    assert isinstance(ds, Dataset) and ds.path == path


def test_out_dir_reuse_and_conflict(tmp_path):
    out = tmp_path / "out"
    a = str(write_dir(tmp_path / "a", tree()[0]))
    assert prepare(a, out) == out
    assert prepare(a, out) == out  # same dataset: returned as is
    with pytest.raises(UserError) as e:
        prepare("synthetic:20", out)
    one_line_error(e, str(out), "already exists")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(UserError):
        prepare(a, tmp_path / "junk")
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert prepare(a, tmp_path / "empty") == tmp_path / "empty"


def test_prepared_dir_is_a_source(tmp_path):
    path = prepare("synthetic:30")
    assert prepare(str(path)) == path
    copy = prepare(str(path), tmp_path / "copy")
    np.testing.assert_array_equal(load(str(copy)).splits["train"][0], load(str(path)).splits["train"][0])
    (path / "test.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError) as e:
        load(str(path))
    one_line_error(e, str(path), "not a valid prepared dataset", "prepare it again")


def test_stale_format_version_is_refused(tmp_path):
    path = prepare("synthetic:30", tmp_path / "old")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(UserError) as e:
        load(str(path))
    one_line_error(e, "format version 0")


@pytest.mark.parametrize("use_out", [False, True])
def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch, use_out):
    src = str(write_source("dir", tmp_path, tree(two_splits=True)[0]))
    real = store._write_split
    calls = []

    def write_then_interrupt(*args):
        calls.append(args[0])
        real(*args)  # the first split lands on disk (in the temp folder) ...
        raise KeyboardInterrupt  # ... then Ctrl-C

    monkeypatch.setattr(store, "_write_split", write_then_interrupt)
    out = tmp_path / "outs" / "out" if use_out else None
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out)
    assert calls
    nothing_prepared(cache_home())
    assert not out or list(out.parent.iterdir()) == []  # no dataset, no temp folder
    monkeypatch.setattr(store, "_write_split", real)
    assert load(src).splits["test"][0].shape == (12, 32, 32, 3)  # and it works afterwards


def test_channel_stats_are_exact():
    x = random_images(300, 3)
    mean, std = channel_stats(x)
    f = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, f.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, f.std(0), atol=1e-6)


def test_cache_home(monkeypatch, tmp_path):
    assert cache_home() == Path(os.environ["CIFAR_RAY_HOME"])
    monkeypatch.delenv("CIFAR_RAY_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_home() == tmp_path / ".cache" / "cifar-ray"


# ---------------------------------------------------------------- decoding in worker processes

def test_large_sets_decode_in_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "CHUNK", 8)  # 3 classes x 10 images = 4 chunks: the pool path
    files, pixels = tree(per_class=10)
    files.update({n.replace(".png", ".jpg"): encode(p, "JPEG") for n, p in pixels.items()})
    ds = load(str(write_source("tar", tmp_path, files)))
    x = ds.splits["train"][0]
    names = sorted(files)
    want = np.stack([np.asarray(Image.open(io.BytesIO(files[n])).convert("RGB")) for n in names])
    np.testing.assert_array_equal(x, want)


def test_a_bad_image_in_a_worker_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "CHUNK", 4)
    files, _ = tree(per_class=6)
    files["frog/002.png"] = b"\x89PNG garbage"
    with pytest.raises(UserError) as e:
        prepare(str(write_source("tgz", tmp_path, files)))
    one_line_error(e, "images.tgz:frog/002.png", "cannot decode")
    nothing_prepared(cache_home())


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_balanced_and_shaped():
    a, b = synthetic.generate(200, 50), synthetic.generate(200, 50)
    for split in ("train", "test"):
        assert a[split][0].tobytes() == b[split][0].tobytes()
        np.testing.assert_array_equal(a[split][1], b[split][1])
    x, y = a["train"]
    assert x.shape == (200, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [20] * 10
    assert not np.array_equal(a["test"][0][:10], x[:10])
    # More train images leave the test split unchanged.
    np.testing.assert_array_equal(synthetic.generate(300, 50)["test"][0], a["test"][0])


def test_synthetic_source_and_cache():
    ds = load("synthetic")
    assert ds.classes == synthetic.CLASSES
    assert ds.splits["train"][0].shape == (2000, 32, 32, 3)
    assert ds.splits["test"][0].shape == (500, 32, 32, 3)
    assert load("synthetic:100").splits["train"][0].shape == (100, 32, 32, 3)
    assert prepare("synthetic") == ds.path


def _power_spectrum(x):
    gray = x.astype(np.float64).mean(-1)
    gray -= gray.mean((1, 2), keepdims=True)
    return np.log1p(np.abs(np.fft.fft2(gray)) ** 2).reshape(len(x), -1)


def _nearest_class_mean(train, y_train, test):
    means = np.stack([train[y_train == c].mean(0) for c in range(10)])
    return ((test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)


def test_synthetic_is_learnable_but_not_from_single_pixels():
    data = synthetic.generate(1000, 500)
    (x, y), (xt, yt) = data["train"], data["test"]
    # A shift- and phase-invariant feature (what a CNN's filters can learn) separates classes ...
    acc = (_nearest_class_mean(_power_spectrum(x), y, _power_spectrum(xt)) == yt).mean()
    assert acc > 0.8
    # ... while the raw pixels carry next to nothing: class-mean images are alike.
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64)  # noqa: E731
    assert (_nearest_class_mean(flat(x), y, flat(xt)) == yt).mean() < 0.25


# ---------------------------------------------------------------- official CIFAR-10 (faked)

def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def check_official(ds, arrays):
    assert ds.classes == CLASS_NAMES
    xs = np.concatenate([arrays[n][0] for n in sources.CIFAR10_TRAIN])
    ys = np.concatenate([arrays[n][1] for n in sources.CIFAR10_TRAIN])
    np.testing.assert_array_equal(ds.splits["train"][0], xs)
    np.testing.assert_array_equal(ds.splits["train"][1], ys)
    np.testing.assert_array_equal(ds.splits["test"][0], arrays["test_batch"][0])
    assert ds.meta["content_hash"] == f"md5:{sources.CIFAR10_TGZ_MD5}"


def test_official_constants_match_torchvision():
    from torchvision.datasets import CIFAR10

    assert sources.CIFAR10_URL == CIFAR10.url
    assert sources.CIFAR10_TGZ == CIFAR10.filename
    assert sources.CIFAR10_TGZ_MD5 == CIFAR10.tgz_md5
    assert [n for n, _ in CIFAR10.train_list] == list(sources.CIFAR10_TRAIN)
    assert [n for n, _ in CIFAR10.test_list] == list(sources.CIFAR10_TEST)
    listed = dict(CIFAR10.train_list + CIFAR10.test_list)
    listed[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    assert listed == sources.CIFAR10_FILE_MD5


def test_official_tarball_and_folder(tmp_path, monkeypatch):
    files, arrays = fake_batches()
    tgz = official_tarball(tmp_path / "cifar-10-python.tar.gz", files)
    monkeypatch.setattr(sources, "CIFAR10_TGZ_MD5", md5(tgz.read_bytes()))
    monkeypatch.setattr(sources, "CIFAR10_FILE_MD5", {n: md5(b) for n, b in files.items()})
    from_tgz = load(str(tgz))
    check_official(from_tgz, arrays)
    folder = write_dir(tmp_path / "x" / "cifar-10-batches-py", files)
    # The extracted folder holds the same images: it finds the same cache entry.
    assert prepare(str(folder)) == from_tgz.path
    shutil_rmtree(from_tgz.path)
    check_official(load(str(folder)), arrays)
    assert prepare(str(folder.parent)) == from_tgz.path  # its parent folder works too


def shutil_rmtree(path):
    import shutil

    shutil.rmtree(path)


def test_evil_pickle_fixture_really_runs_code(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(evil_pickle(marker))
    assert marker.exists()


def test_tampered_batch_file_is_refused_before_unpickling(tmp_path, monkeypatch):
    files, _ = fake_batches()
    monkeypatch.setattr(sources, "CIFAR10_FILE_MD5", {n: md5(b) for n, b in files.items()})
    marker = tmp_path / "pwned"
    files["data_batch_3"] = evil_pickle(marker)
    folder = write_dir(tmp_path / "cifar-10-batches-py", files)
    with pytest.raises(UserError) as e:
        prepare(str(folder))
    one_line_error(e, "data_batch_3", "MD5 differs", "download")
    assert not marker.exists()
    nothing_prepared(cache_home())


def test_tampered_tarball_is_refused_before_unpickling(tmp_path, monkeypatch):
    files, _ = fake_batches()
    good = official_tarball(tmp_path / "good.tar.gz", files)
    monkeypatch.setattr(sources, "CIFAR10_TGZ_MD5", md5(good.read_bytes()))
    marker = tmp_path / "pwned"
    files["data_batch_1"] = evil_pickle(marker)
    for name in ("cifar-10-python.tar.gz", "renamed.tgz"):
        bad = official_tarball(tmp_path / name, files)
        with pytest.raises(UserError) as e:
            prepare(str(bad))
        one_line_error(e, str(bad), "MD5", "differs from the official", "download it again")
    assert not marker.exists()
    nothing_prepared(cache_home())


def test_cifar10_download_offline_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as e:
        prepare("cifar10")
    one_line_error(e, "cifar10: cannot download", sources.CIFAR10_URL, "name resolution",
                   "pass its path as SOURCE")
    downloads = cache_home() / "downloads"
    assert not downloads.exists() or list(downloads.iterdir()) == []
    nothing_prepared(cache_home())


def test_cifar10_download_goes_through_torchvision_and_is_cached(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    files, arrays = fake_batches()
    tgz = official_tarball(tmp_path / "served.tar.gz", files)
    monkeypatch.setattr(sources, "CIFAR10_TGZ_MD5", md5(tgz.read_bytes()))
    fetched = []

    def fake_download(url, root, filename, md5):
        assert (url, filename, md5) == (sources.CIFAR10_URL, sources.CIFAR10_TGZ, sources.CIFAR10_TGZ_MD5)
        fetched.append(url)
        (Path(root) / filename).write_bytes(tgz.read_bytes())

    monkeypatch.setattr(tvu, "download_url", fake_download)
    check_official(load("cifar10"), arrays)
    assert (cache_home() / "downloads" / sources.CIFAR10_TGZ).read_bytes() == tgz.read_bytes()
    load("cifar10")
    assert len(fetched) == 1


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("member, what", [
    (tar_member("/etc/evil.png", tarfile.REGTYPE), "absolute path or '..'"),
    (tar_member("cat/../../evil.png", tarfile.REGTYPE), "absolute path or '..'"),
    (tar_member("cat/link.png", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (tar_member("cat/hard.png", tarfile.LNKTYPE, "cat/000.png"), "is a link"),
    (tar_member("cat/dev.png", tarfile.CHRTYPE), "device or special file"),
    (tar_member("cat/fifo.png", tarfile.FIFOTYPE), "device or special file"),
])
def test_unsafe_tar_members_are_refused(tmp_path, member, what):
    path = write_tar(tmp_path / "evil.tar.gz", tree()[0], extra=[member])
    with pytest.raises(UserError) as e:
        prepare(str(path))
    one_line_error(e, str(path), repr(member.name), what, "repack")
    nothing_prepared(cache_home())


@pytest.mark.parametrize("name, mode, what", [
    ("/abs/evil.png", 0o100644, "absolute path or '..'"),
    ("cat/../../evil.png", 0o100644, "absolute path or '..'"),
    ("C:/evil.png", 0o100644, "absolute path or '..'"),
    ("cat/link.png", 0o120777, "is a link"),
    ("cat/dev.png", 0o020644, "device or special file"),
])
def test_unsafe_zip_members_are_refused(tmp_path, name, mode, what):
    path = write_zip(tmp_path / "evil.zip", tree()[0])
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, b"/etc/passwd")
    with pytest.raises(UserError) as e:
        prepare(str(path))
    one_line_error(e, str(path), what)
    nothing_prepared(cache_home())


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_truncated_archive(tmp_path, kind):
    path = write_source(kind, tmp_path, tree()[0])
    data = path.read_bytes()
    cuts = [len(data) // 2, len(data) - 700]
    if kind == "tar":  # cut right before a header: tarfile alone would call that a clean end
        with tarfile.open(path) as tf:
            cuts = [len(data) // 2, tf.getmembers()[-1].offset]
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(UserError) as e:
            prepare(str(path))
        one_line_error(e, str(path), "truncated or corrupt archive")
    nothing_prepared(cache_home())


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("deep", [False, True])
def test_every_tar_format_reads_alike(tmp_path, fmt, deep):
    """ustar, GNU and pax archives, with names beyond a header's 100 characters (a ustar
    prefix, a GNU long name, a pax path) and a pax global header as `git archive` writes:
    the same members, the same images."""
    files, pixels = tree(per_class=3)
    wrapper = f"{'d' * 70}/{'e' * 70}/" if deep else ""  # > 100 characters: beyond a plain name field
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=fmt,
                      pax_headers={"comment": "x" * 40} if fmt == tarfile.PAX_FORMAT else None) as tf:
        for cls in ("cat", "dog", "frog"):
            tf.addfile(tar_member(f"{wrapper}{cls}", tarfile.DIRTYPE))
        for name, blob in files.items():
            info = tarfile.TarInfo(wrapper + name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    entries = list(archive.tar_entries(path, path.read_bytes()))
    assert entries == [(f"{wrapper}{c}/", None) for c in ("cat", "dog", "frog")] + \
        [(wrapper + n, b) for n, b in files.items()]
    x, y = load(str(path)).splits["train"]
    np.testing.assert_array_equal(x, expected_split(pixels, ["cat", "dog", "frog"])[0])


def test_corrupt_archives(tmp_path):
    tar = write_source("tar", tmp_path, tree()[0])
    with tarfile.open(tar) as tf:
        second = tf.getmembers()[1].offset
    data = bytearray(tar.read_bytes())
    data[second + 3] ^= 0x01  # a letter of the second member's name: its header checksum fails
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        prepare(str(tar))
    one_line_error(e, str(tar), "truncated or corrupt archive")

    tgz = write_source("tgz", tmp_path, tree()[0])
    data = bytearray(tgz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tgz.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        prepare(str(tgz))
    one_line_error(e, "truncated or corrupt archive")
    zpath = tmp_path / "stored.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
        for name, blob in tree()[0].items():
            zf.writestr(name, blob)
    data = bytearray(zpath.read_bytes())
    data[200] ^= 0xFF  # inside the first member's bytes: its CRC no longer matches
    zpath.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        prepare(str(zpath))
    one_line_error(e, str(zpath), "truncated or corrupt archive")


def test_undecodable_image_is_named(tmp_path):
    files, _ = tree()
    files["dog/002.png"] = b"not an image at all"
    for kind in ("dir", "zip"):
        src = write_source(kind, tmp_path, files)
        with pytest.raises(UserError) as e:
            prepare(str(src))
        where = f"{src}/dog/002.png" if kind == "dir" else f"{src}:dog/002.png"
        one_line_error(e, where, "cannot decode the image", "replace or remove")
    nothing_prepared(cache_home())


def test_small_image_named_without_resize(tmp_path):
    files, _ = tree()
    files["cat/small.jpg"] = encode(random_images(1, 1, (16, 16))[0], "JPEG")
    with pytest.raises(UserError) as e:
        prepare(str(write_source("tar.gz", tmp_path, files)))
    one_line_error(e, "cat/small.jpg", "16x16", "--resize")


@pytest.mark.parametrize("layout, needle", [
    ({"cat/0.png"}, "found 1 class folder(s) (cat); need at least 2"),
    ({"cat/0.png", "dog/"}, "class folder train/dog has no images"),
    ({"train/cat/0.png", "train/dog/0.png", "test/cat/0.png", "test/dog/"}, "class folder test/dog has no images"),
    ({"train/cat/0.png", "train/dog/0.png", "test/cat/0.png", "test/cow/0.png"},
     "train and test have different classes (only in train: dog; only in test: cow)"),
    ({"test/cat/0.png"}, "found 1 class folder(s) (cat); need at least 2"),
    ({"cat/0.png", "dog/x/0.png"}, "images must all sit at <class>/<image>"),
    ({"readme.txt"}, "no JPEG or PNG images found"),
])
def test_bad_layouts(tmp_path, layout, needle):
    img = encode(random_images(1, 0)[0])
    for kind in ("dir", "tar"):
        root = tmp_path / kind
        if kind == "dir":
            for name in layout:
                if name.endswith("/"):
                    (root / name).mkdir(parents=True)
                else:
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    (root / name).write_bytes(img)
            src = root
        else:
            src = write_tar(tmp_path / "layout.tar", {n: img for n in layout if not n.endswith("/")}, "w",
                            extra=[tar_member(n, tarfile.DIRTYPE) for n in layout if n.endswith("/")])
        with pytest.raises(UserError) as e:
            prepare(str(src))
        one_line_error(e, str(src), needle)
    nothing_prepared(cache_home())


@pytest.mark.parametrize("kind", ["dir", "tar.gz"])
def test_a_test_only_tree_is_a_test_split(tmp_path, kind):
    """A separate test set (test/<class>/...) prepares as a test split alone: evaluate reads
    it; training refuses it with one line."""
    files, pixels = tree(two_splits=True)
    files = {n: b for n, b in files.items() if n.startswith("test/")}
    ds = load(str(write_source(kind, tmp_path, files)))
    assert set(ds.splits) == {"test"} and ds.classes == ["cat", "dog", "frog"]
    x, y = expected_split(pixels, ds.classes, "test/")
    assert np.array_equal(ds.splits["test"][0], x) and np.array_equal(ds.splits["test"][1], y)
    assert ds.mean == tuple(channel_stats(x)[0])  # its own statistics: there is no train split

    from cifar_ray import config as C
    from cifar_ray.data.split import load_split

    with pytest.raises(UserError) as e:
        load_split(C.load_config(None, [f"data.source={ds.path}"]))
    one_line_error(e, "holds only a test split, nothing to train on")


@pytest.mark.parametrize("spec, needle", [
    ("imagenet", "imagenet: unknown SOURCE; SOURCE may be cifar10"),
    ("synthetic:abc", "expected synthetic:N"),
    ("synthetic:3", "expected synthetic:N"),
    ("no/such/dir", "no/such/dir: no such file or directory"),
    ("missing.tar.gz", "missing.tar.gz: no such file or directory"),
])
def test_unknown_or_missing_source(spec, needle):
    with pytest.raises(UserError) as e:
        prepare(spec)
    one_line_error(e, needle)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.rar"
    path.write_bytes(b"Rar!")
    with pytest.raises(UserError) as e:
        prepare(str(path))
    one_line_error(e, str(path), "not a supported file type", "SOURCE may be")


# ---------------------------------------------------------------- splits

def test_train_val_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 140])
    rng = np.random.default_rng(1)
    labels = rng.permutation(labels)
    train, val = train_val_split(labels, 0.1, seed=0)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert len(val) == 95
    np.testing.assert_array_equal(np.bincount(labels[val]), [5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    again = train_val_split(labels, 0.1, seed=0)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(train_val_split(labels, 0.1, seed=1)[1], val)
    assert len(train_val_split(labels, 0.0)[1]) == 0
    with pytest.raises(ValueError):
        train_val_split(labels, 1.0)


def test_small_val_fraction_still_gets_images():
    labels = np.repeat(np.arange(10), 5)  # 0.1 of 5 rounds to 0 per class, yet 5 overall
    _, val = train_val_split(labels, 0.1)
    assert len(val) == 5 and len(set(labels[val])) == 5


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=2, max_size=8), n=st.integers(0, 400),
       seed=st.integers(0, 3))
def test_stratified_subset_keeps_proportions(counts, n, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    idx = stratified_subset(labels, n, seed)
    assert idx.dtype == np.int64 and len(idx) == min(n, len(labels))
    assert len(np.unique(idx)) == len(idx)
    got = np.bincount(labels[idx], minlength=len(counts))
    want = np.array(counts) * len(idx) / len(labels)
    assert np.all(np.abs(got - want) < 1 + 1e-9)
    np.testing.assert_array_equal(stratified_subset(labels, n, seed), idx)


# ---------------------------------------------------------------- the real thing, when present

@pytest.mark.skipif(not SHARED_TGZ.exists(), reason="../shared/data/cifar10-train-jpeg.tar.gz not here")
def test_shared_cifar10_jpeg_tarball(monkeypatch):
    """The real archive (git-archive style: it opens with a pax global header) lists its
    50,000 images in order, and a sample of it decodes in worker processes exactly as PIL
    does. Preparing all of it is benchmarks/bench_prepare.py's job: too slow for a unit test."""
    files = [(n, b) for n, b in archive.tar_entries(SHARED_TGZ, SHARED_TGZ.read_bytes()) if b is not None]
    assert len(files) == 50000 and files[0][0] == "train/airplane/0000.jpg"
    sample = files[::100]
    monkeypatch.setattr(decode, "CHUNK", 128)  # 500 images: the worker-process path
    x = decode.decode_images(iter(sample))
    np.testing.assert_array_equal(x, [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in sample])
    mean, std = channel_stats(x)
    np.testing.assert_allclose(mean, (0.491, 0.482, 0.447), atol=0.03)
    np.testing.assert_allclose(std, (0.245, 0.243, 0.261), atol=0.03)
