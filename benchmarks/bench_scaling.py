"""Scaling DDP: what a second worker on a second node buys, measured on one machine, and a
model of 1-16 GPUs on the node types cluster/ offers (BENCHMARKS.md, "Scaling").

    python benchmarks/bench_scaling.py measure [--models seed-small,seed-vgg-bn,resnet18]
    python benchmarks/bench_scaling.py model     # the modelled table, arithmetic included

measure: a Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`: a head
without CPUs, two 1-CPU nodes, all on 127.0.0.1, stopped by its handle). For each model,
(1) `cifar-ray train`'s own run (train.run) with 1 worker and with 2 workers on the two
nodes, same global batch: training images/s of the steady epochs; (2) the all-reduce's
share of a DDP step: two Ray actors on the two nodes join a gloo process group and time
steps of DistributedDataParallel with gradient sync and without (`no_sync()`). Prints one
JSON line per model.

model: the same two quantities for 1-16 GPUs per run, from each model's parameters and
MACs (models.model_info), the GPUs' peak bf16 rates, the links' bandwidths and an
all-reduce that does not overlap the backward pass (the cautious end; DDP overlaps some).
Prints a markdown table and the assumptions.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import tempfile
import time

MODELS = ("seed-small", "seed-vgg-bn", "resnet18")


# ---------------------------------------------------------------- measured

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rank:
    """One DDP process of the all-reduce probe (a Ray actor pinned to a node)."""

    def __init__(self, rank: int, world: int, port: int, model: str, batch: int):
        import torch
        import torch.distributed as dist

        from cifar_ray.models import create_model

        torch.set_num_threads(1)
        torch.manual_seed(0)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        self.model = torch.nn.parallel.DistributedDataParallel(create_model(model, num_classes=10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x = torch.randn(batch, 3, 32, 32)
        self.y = torch.randint(0, 10, (batch,))

    def _step(self) -> None:
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()

    def allreduce(self, n: int) -> float:
        """Seconds of one all-reduce of the model's gradient bytes alone (a flat fp32 buffer)."""
        import torch
        import torch.distributed as dist

        flat = torch.ones(sum(p.numel() for p in self.model.parameters()))
        dist.all_reduce(flat)
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(flat)
        return (time.perf_counter() - t0) / n

    def steps(self, n: int, sync: bool) -> float:
        import contextlib

        t0 = time.perf_counter()
        for _ in range(n):
            with contextlib.nullcontext() if sync else self.model.no_sync():
                self._step()
        return (time.perf_counter() - t0) / n


def allreduce_share(nodes, model: str, batch: int, steps: int) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as OnNode

    port = _free_port()
    Rank = ray.remote(num_cpus=1)(_Rank)
    ranks = [Rank.options(scheduling_strategy=OnNode(n.node_id, soft=False))
             .remote(i, 2, port, model, batch) for i, n in enumerate(nodes)]
    ray.get([r.steps.remote(2, True) for r in ranks])  # warm up, both ways
    ray.get([r.steps.remote(1, False) for r in ranks])
    synced = max(ray.get([r.steps.remote(steps, True) for r in ranks]))
    local = max(ray.get([r.steps.remote(steps, False) for r in ranks]))
    alone = max(ray.get([r.allreduce.remote(steps) for r in ranks]))
    for r in ranks:
        ray.kill(r)
    # exposed: what a step loses to the sync (DDP overlaps its all-reduces with the backward
    # pass); alone: the all-reduce of the gradient bytes by itself, against a local step
    return {"step_s_synced": round(synced, 4), "step_s_no_sync": round(local, 4),
            "allreduce_s": round(alone, 4),
            "allreduce_share_exposed": round(max(0.0, 1 - local / synced), 3),
            "allreduce_share_alone": round(alone / (alone + local), 3)}


def images_per_s(model: str, workers: int, batch: int, images: int, epochs: int,
                 out: str) -> float:
    from cifar_ray import config, rundir, train

    cfg = config.load_config(None, [f"model.name={model}", f"data.source=synthetic:{images}",
                                    f"train.epochs={epochs}", f"train.batch_size={batch}",
                                    f"scale.workers={workers}", "scale.cpus_per_worker=1",
                                    "scale.placement=SPREAD", "train.precision=fp32"])
    with contextlib.redirect_stdout(io.StringIO()):  # its epoch lines
        train.run(cfg, out, echo=lambda *a: None)
    rows = rundir.read_metrics(os.path.join(out, "metrics.csv"))[1:]  # the first epoch warms
    return sum(r["images_per_s"] for r in rows) / len(rows)


def measure(args) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    from cifar_ray.models import model_info
    from cifar_ray.train import loopback

    tmp = tempfile.mkdtemp(prefix="crs-")
    os.makedirs(f"{tmp}/ray")
    with loopback():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "temp_dir": f"{tmp}/ray",
            "include_dashboard": False, "object_store_memory": 200 * 2**20})
        nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                  object_store_memory=200 * 2**20) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    try:
        for model in args.models.split(","):
            info = model_info(model)
            batch = args.batch
            out = {"bench": "scaling", "model": model, "params": info["params"],
                   "grad_mb": round(info["params"] * 4 / 2**20, 2), "macs": info["macs"],
                   "machine": platform.node(), "cpus": os.cpu_count(), "global_batch": batch}
            for w in () if args.probe_only else (1, 2):
                run_dir = f"{tmp}/{model}-{w}"
                out[f"images_per_s_{w}w"] = round(images_per_s(model, w, batch, args.images,
                                                                args.epochs, run_dir), 1)
                shutil.rmtree(run_dir, ignore_errors=True)
            if not args.probe_only:
                out["speedup_2w"] = round(out["images_per_s_2w"] / out["images_per_s_1w"], 2)
            out.update(allreduce_share(nodes, model, batch // 2, args.steps))
            print(json.dumps(out), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- modelled

# Peak dense bf16 tensor rates (TFLOPS) and the rate the engine reached on the H200 for
# these nets (BENCHMARKS.md "Engine on one GPU": resnet18 49,295 img/s x 3.33 GFLOP = 164
# TFLOPS, seed-vgg-bn 96,903 x 1.51 = 147: ~16% of the H200's 989). The same share of each
# GPU's peak is assumed.
GPUS = {"A10G": 70.0, "L4": 121.0}
H200_PEAK, SHARE = 989.0, 0.16
STEP_FLOOR_S = 1.0e-3  # launch-bound floor of a training step (kernels, optimiser)
# Links (GB/s, one direction, what NCCL's ring sees): PCIe Gen4 between the GPUs of one
# node (no NVLink on g5.12xlarge or g2-standard-48; through the host: ~12 GB/s); the
# network of 4-GPU nodes (g5.12xlarge 40 Gb/s, g2-standard-48 50 Gb/s) and of 1-GPU nodes
# (g5.xlarge up to 10 Gb/s, g2-standard-8 16 Gb/s).
LINKS = {"A10G": {"pcie": 12.0, "net4": 5.0, "net1": 1.25},
         "L4": {"pcie": 12.0, "net4": 6.25, "net1": 2.0}}
HOP_S = {"pcie": 10e-6, "net": 30e-6}  # latency per ring step


def placement(n: int) -> str:
    """Where cluster/'s jobs put n DDP workers: 2-3 on 1-GPU nodes (g5.xlarge, g2-standard-8),
    4 and more on 4-GPU nodes (jobs/train_ddp.py asks 11 CPUs per worker from 4 workers on)."""
    if n == 1:
        return "one GPU"
    if n < 4:
        return "net1"  # between 1-GPU nodes
    return "pcie" if n == 4 else "net4"  # inside one 4-GPU node, or between them


def step_model(params: int, macs: int, gpu: str, n: int, global_batch: int) -> dict:
    """One DDP step of `n` GPUs placed as `placement` says, on a fixed global batch
    (cifar-ray splits train.batch_size across workers)."""
    rate = GPUS[gpu] * SHARE * 1e12  # FLOP/s the engine gets
    compute = max(STEP_FLOOR_S, global_batch / n * macs * 2 * 3 / rate)  # fwd + bwd = 3x fwd
    grad = params * 4  # fp32 gradients (AMP keeps the master weights and grads in fp32)
    where = placement(n)
    comm = 0.0
    if n > 1:  # ring all-reduce: 2(n-1)/n of the gradient through the link, 2(n-1) hops
        hop = HOP_S["pcie" if where == "pcie" else "net"]
        comm = 2 * (n - 1) / n * grad / (LINKS[gpu][where] * 1e9) + 2 * (n - 1) * hop
    step = compute + comm
    return {"compute_ms": compute * 1e3, "comm_ms": comm * 1e3, "img_s": global_batch / step}


def model_table(args) -> None:
    from cifar_ray.models import model_info

    counts = (1, 2, 4, 8, 16)
    print(f"Global batch {args.batch}; placed as cluster/'s jobs place them: 2 GPUs on two "
          "1-GPU nodes, 4 in one 4-GPU node (PCIe), 8 and 16 on 2 and 4 such nodes.\n")
    print("| model | GPU | " + " | ".join(f"{n} GPU img/s (eff.)" for n in counts)
          + " | all-reduce share at 2 / 4 / 8 |")
    print("|---|---|" + "---|" * (len(counts) + 1))
    for model in args.models.split(","):
        info = model_info(model)
        for gpu in GPUS:
            rows = {n: step_model(info["params"], info["macs"], gpu, n, args.batch)
                    for n in counts}
            one = rows[1]["img_s"]
            cells = [f"{r['img_s']:,.0f} ({r['img_s'] / (n * one):.0%})" for n, r in rows.items()]
            share = [rows[n]["comm_ms"] / (rows[n]["comm_ms"] + rows[n]["compute_ms"])
                     for n in (2, 4, 8)]
            print(f"| {model} | {gpu} | " + " | ".join(cells)
                  + f" | {' / '.join(f'{x:.0%}' for x in share)} |")
    print(f"\nAssumptions: engine at {SHARE:.0%} of peak bf16 ({', '.join(f'{g} {t:g}' for g, t in GPUS.items())} "
          f"TFLOPS; measured share on the H200), step floor {STEP_FLOOR_S * 1e3:g} ms, "
          f"links {json.dumps(LINKS)} GB/s, hop latency {json.dumps(HOP_S)} s, no overlap.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--models", default=",".join(MODELS))
    m.add_argument("--images", type=int, default=1024, help="synthetic training images")
    m.add_argument("--epochs", type=int, default=3)
    m.add_argument("--batch", type=int, default=64, help="global batch")
    m.add_argument("--steps", type=int, default=5, help="timed steps of the all-reduce probe")
    m.add_argument("--probe-only", action="store_true", help="the all-reduce probe alone")
    t = sub.add_parser("model")
    t.add_argument("--models", default=",".join(MODELS))
    t.add_argument("--batch", type=int, default=512, help="global batch")
    args = ap.parse_args()
    measure(args) if args.what == "measure" else model_table(args)


if __name__ == "__main__":
    main()
