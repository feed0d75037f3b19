"""GPU preflight: before a GPU run does any work, each of its GPU workers reports what it
would train with (torch, the CUDA version torch was built for, the NVIDIA driver and the
GPU), and a node where that cannot work stops the run with one line naming the node and
the fix.

Why: Ray counts a node's GPUs without asking CUDA, so a node whose driver is older than
torch's CUDA build (or that has no driver at all) still gets GPU workers, and the run dies
later in NCCL's constructor with a traceback. A CUDA 12.x build runs on any 12.x-era
driver (CUDA's minor-version compatibility); a CUDA 13 build needs a 13.x driver (580+).

The probes run as Ray tasks inside a placement group of the run's own bundles and
strategy, so the autoscaler starts the nodes the run will use, and each probe sees the
GPUs Ray gives a worker (CUDA_VISIBLE_DEVICES). Nothing here writes a file.
"""

from __future__ import annotations

import os
import socket

from cifar_ray.errors import UserError

FIX_DRIVER = ("use a node image whose NVIDIA driver supports that CUDA version, or install the "
              "torch build for the driver's CUDA (cluster/constraints.txt pins the one the "
              "cluster configs use)")


def probe() -> dict:
    """What this process would train with (runs on a GPU worker; never raises)."""
    import ray
    import torch

    report = {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
              "torch": torch.__version__, "cuda_build": torch.version.cuda,
              "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "driver": None,
              "driver_cuda": None, "gpu": None, "available": False, "error": None}
    try:  # the driver, through the NVML copy Ray itself uses to count GPUs
        import ray._private.thirdparty.pynvml as nvml

        nvml.nvmlInit()
        try:
            report["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
            cuda = nvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12080 for CUDA 12.8
            report["driver_cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
            if nvml.nvmlDeviceGetCount():
                report["gpu"] = _text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(0)))
        finally:
            nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver (or no NVML): reported as such
        pass
    try:
        report["available"] = torch.cuda.is_available()
        if report["available"]:
            report["gpu"] = torch.cuda.get_device_name(0)
            (torch.ones(8, device="cuda") * 2).sum().item()  # a kernel runs on this GPU
    except Exception as e:  # noqa: BLE001 - e.g. no kernel image for this GPU
        report["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return report


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2]) if text else ()


def problem(r: dict) -> str | None:
    """Why the worker of report `r` cannot train on its GPU (None: it can)."""
    build, driver_cuda = _version(r["cuda_build"]), _version(r["driver_cuda"])
    if r["cuda_build"] is None:
        return (f"torch {r['torch']} is a CPU-only build; install the CUDA build pinned in "
                "cluster/constraints.txt")
    if driver_cuda and build and driver_cuda[0] < build[0]:
        return (f"NVIDIA driver {r['driver']} supports CUDA up to {r['driver_cuda']}, but torch "
                f"{r['torch']} is built for CUDA {r['cuda_build']}: {FIX_DRIVER}")
    if r["error"]:
        return f"CUDA fails on {r['gpu'] or 'the GPU'} ({r['error']}): {FIX_DRIVER}"
    if not r["available"]:
        if r["driver"] is None:
            return (f"Ray gave this worker a GPU (CUDA_VISIBLE_DEVICES={r['visible']}) but CUDA is "
                    f"not available to torch {r['torch']} and no NVIDIA driver answers; use a GPU "
                    "node image with the NVIDIA driver (cluster/README.md), or run without --gpu")
        return (f"CUDA is not available to torch {r['torch']} (CUDA {r['cuda_build']}) with driver "
                f"{r['driver']} (CUDA {r['driver_cuda']}), CUDA_VISIBLE_DEVICES={r['visible']}: "
                f"{FIX_DRIVER}")
    return None


def gpu_text(r: dict) -> str:
    driver = f"driver {r['driver']} (CUDA {r['driver_cuda']})" if r["driver"] else "no NVIDIA driver"
    return (f"{r['node']} ({r['host']}): {r['gpu'] or 'no GPU'}, {driver}, "
            f"torch {r['torch']} (CUDA {r['cuda_build'] or 'none'})")


def check_gpus(bundles: list[dict], strategy: str = "PACK", echo=print) -> list[dict]:
    """Probe every GPU bundle of a run on the connected Ray cluster (waiting, like the run
    would, for an autoscaler to add nodes); raise UserError on the first unusable node."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    echo(f"GPU preflight: {len(bundles)} worker(s) {bundles[0]} ({strategy}); an autoscaler "
         "may be starting nodes")
    pg = placement_group(bundles, strategy=strategy)
    try:
        ray.get(pg.ready())
        task = ray.remote(probe)
        reports = ray.get([
            task.options(num_cpus=0, num_gpus=b.get("GPU", 0), scheduling_strategy=(
                PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)))
            .remote() for i, b in enumerate(bundles)])
    finally:
        remove_placement_group(pg)
    address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    for r in reports:  # the node as Ray lists it: its address, then its host name
        r["node"] = address.get(r["node"], r["node"])
        echo(f"GPU preflight: {gpu_text(r)}")
        why = problem(r)
        if why:
            raise UserError(f"GPU preflight failed on node {r['node']} ({r['host']}): {why}")
    return reports
