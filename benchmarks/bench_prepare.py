"""Time `prepare` of an ImageFolder tarball against a plain one-process PIL loop.

    python benchmarks/bench_prepare.py [SOURCE] [--repeat N]

SOURCE defaults to $JPEG_TGZ: the 50,000 CIFAR-10 training images as 32x32 JPEGs in one
tar.gz (`train/<class>/NNNN.jpg`; BENCHMARKS.md, "Data preparation"). Each phase runs
in a fresh subprocess, so its peak RSS and its imports are its own; all phases run side by
side in one invocation, so a busy machine slows them alike. Phases:
  import       `import torchvision.io` (prepare pays it once per process, for large sets)
  prepare      cold: a fresh, empty cache (torchvision already imported: see `import`)
  cached       prepare again: the content hash finds the prepared directory
  load         the prepared Parquet files -> numpy arrays
  baseline     tarfile + PIL, one process: read, decode, stack (the thing to beat)
and, on the archive's images already in memory, the decoders side by side (`decoders`):
  PIL, one process | torchvision batched, one process | PIL, worker pool | torchvision, worker pool
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT = os.environ.get("JPEG_TGZ")


def phase(name: str, source: str, home: str) -> dict:
    os.environ["CIFAR_RAY_HOME"] = home
    from cifar_ray import data

    if name in ("prepare", "cached"):
        import torchvision.io  # noqa: F401  (timed on its own in the `import` phase)
    cpu0, t0 = time.process_time(), time.perf_counter()
    if name == "import":
        import torchvision.io  # noqa: F401,F811
    elif name in ("prepare", "cached"):
        data.prepare(source)
    elif name == "load":
        ds = data.load(source)
        assert ds.splits["train"][0].shape[1:] == (32, 32, 3)
    elif name == "baseline":
        baseline(source)
    elif name == "decoders":
        return decoders(source)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu0 + children.ru_utime + children.ru_stime
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, children.ru_maxrss) / 1024
    return {"wall": wall, "cpu": cpu, "rss_mb": rss}


def baseline(source: str):
    """What one would write first: tarfile + PIL in one process."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    images = []
    with tarfile.open(source, "r:*") as tf:
        for member in tf:
            if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                blob = tf.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
    return np.stack(images)


def decoders(source: str) -> dict:
    """Seconds to decode the archive's images (read into memory first) four ways."""
    from pathlib import Path

    import torchvision.io  # noqa: F401

    from cifar_ray.data import archive, decode, sources

    raw = Path(source).read_bytes()
    items = [(name, blob) for name, blob in archive.tar_entries(Path(source), raw)
             if blob is not None and name.lower().endswith(sources.IMAGE_SUFFIXES)]
    pil_only = decode._torchvision_decoder

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    out = {"images": len(items)}
    out["PIL, 1 process"] = timed(lambda: [decode._decode_pil(n, b, False) for n, b in items])
    out["torchvision, 1 process"] = timed(lambda: decode._decode_chunk(items, False, True))
    decode._torchvision_decoder = lambda: None
    out["PIL, pool"] = timed(lambda: decode.decode_images(iter(items)))
    decode._torchvision_decoder = pil_only
    out["torchvision, pool"] = timed(lambda: decode.decode_images(iter(items)))
    return out


def run(name: str, source: str, home: str) -> dict:
    out = subprocess.run([sys.executable, __file__, source, "--phase", name, "--home", home],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?" if DEFAULT else None, default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=3, help="runs per phase; the median is shown")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.source, args.home)))
        return

    results = {n: [] for n in ("import", "prepare", "cached", "load", "baseline", "decoders")}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as home:  # a fresh cache: prepare is cold
            for name in results:
                results[name].append(run(name, args.source, home))
    median = {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in results.items()}
    spread = {n: (min(r["wall"] for r in runs), max(r["wall"] for r in runs))
              for n, runs in results.items() if n != "decoders"}
    decode = median.pop("decoders")
    base = median["baseline"]["wall"]
    print(f"source: {args.source}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"median of {args.repeat} (wall min-max in brackets)")
    print(f"{'phase':<10}{'wall s':>9}{'(min-max)':>14}{'cpu s':>8}{'peak RSS MB':>13}{'vs baseline':>13}")
    for name, m in median.items():
        lo, hi = spread[name]
        print(f"{name:<10}{m['wall']:>9.2f}{f'({lo:.2f}-{hi:.2f})':>14}{m['cpu']:>8.2f}"
              f"{m['rss_mb']:>13.0f}{base / m['wall']:>12.1f}x")
    print(f"decoding {decode.pop('images'):.0f} images already in memory, s:")
    for name, seconds in decode.items():
        print(f"  {name:<24}{seconds:>6.2f}")


if __name__ == "__main__":
    main()
