"""What the object store costs on a multi-node cluster: the prepared arrays that the driver
puts once, read by a task on another node (copied between object stores) and on the
driver's node (read in place). A Ray cluster of three nodes on this machine (head without
CPUs + two 1-CPU nodes, all on 127.0.0.1, `ray.cluster_utils.Cluster`), stopped by its
handle. Prints one JSON line.

    python benchmarks/bench_multinode.py --data DATA [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

from cifar_ray import config as C
from cifar_ray.data.split import load_split
from cifar_ray.train import loopback


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared dataset (any DATA source)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as OnNode

    arrays = load_split(C.from_dict({"data": {"source": args.data}}))
    mb = arrays.nbytes / 2**20
    tmp = tempfile.mkdtemp(prefix="crb-")
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(f"{tmp}/ray")
    store = int(mb * 2**20 * 2.5)
    with loopback():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "temp_dir": f"{tmp}/ray",
            "include_dashboard": False, "object_store_memory": store})
        nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                  object_store_memory=store) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        def read(data) -> float:  # the argument is fetched before the task starts
            t0 = time.perf_counter()
            n = data.nbytes if data is not None else 0  # touches every array's header
            return time.perf_counter() - t0 + 0 * n

        def timed(node_id, ref) -> float:
            t0 = time.perf_counter()
            ray.get(read.options(scheduling_strategy=OnNode(node_id, soft=False)).remote(ref))
            return time.perf_counter() - t0

        head = ray.get_runtime_context().get_node_id()
        for node_id in [head, *(n.node_id for n in nodes)]:  # start each node's worker first
            timed(node_id, None)
        out = {"bench": "object-store-across-nodes", "data": args.data, "mb": round(mb, 1),
               "machine": platform.node(), "cpus": os.cpu_count()}
        t0 = time.perf_counter()
        ref = ray.put(arrays)
        out["put_s"] = round(time.perf_counter() - t0, 3)
        out["same_node_s"] = [round(timed(head, ref), 3) for _ in range(args.repeat)]
        first = [round(timed(n.node_id, ref), 3) for n in nodes]  # a copy to each node
        out["other_node_first_s"] = first
        out["other_node_again_s"] = [round(timed(nodes[0].node_id, ref), 3)
                                     for _ in range(args.repeat)]
        out["other_node_mb_per_s"] = round(mb / max(first), 1)
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
