"""Job: one DDP training run across N GPU workers (`cifar-ray train`), into the run storage.

    python jobs/train_ddp.py [--workers 4] [--model resnet18] [--epochs 30] [--data cifar10]
    python jobs/train_ddp.py --smoke [--workers 2] [--gpu]      # seconds, tiny generated data
    python jobs/train_ddp.py --name NAME --resume [--epochs 40]  # continue STORAGE/runs/NAME

Each worker takes one whole GPU and --cpus-per-worker CPUs; the autoscaler adds GPU nodes
until all workers fit (so the up-front resource check of `cifar-ray train` is skipped).
A worker lost with its spot node is restarted from the last epoch's checkpoint.
"""

from __future__ import annotations

import jobkit

# CPUs per worker from 4 workers on: more than a 1-GPU node of cluster/ has (4 on AWS, 8 on
# GCP, 7 in a KubeRay pod), and 4 x 11 fit a 4-GPU node (48 vCPUs; 44 in a KubeRay pod), so
# Ray's autoscaler starts whole 4-GPU nodes (tests/test_cluster.py asks its scheduler).
WHOLE_NODE_CPUS = 11


def body(argv: list[str] | None = None) -> int:
    p = jobkit.base_parser("A DDP training run of cifar-ray on the Ray cluster.")
    p.add_argument("--workers", type=int, help="DDP workers, one GPU each (default 4; smoke 1)")
    p.add_argument("--model", help="model name or layer-spec YAML (default resnet18; smoke cnn)")
    p.add_argument("--epochs", type=int, help="epochs (default 30; smoke 1)")
    p.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                   help="one GPU per worker (the default, except with --smoke)")
    p.add_argument("--cpu", dest="gpu", action="store_false", help="CPU workers only")
    p.add_argument("--cpus-per-worker", type=int,
                   help="CPUs per worker (default: 3 below 4 workers, which fits a 4-vCPU 1-GPU "
                        "node; 11 from 4 workers, which only the 4-GPU nodes hold, 4 per node)")
    p.add_argument("--placement", choices=["PACK", "STRICT_PACK", "SPREAD"], default="PACK",
                   help="Ray's placement of the workers (default PACK; STRICT_PACK: one node)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run STORAGE/runs/NAME (needs --name; only --epochs may change)")
    args, extra = p.parse_known_args(argv)

    root = jobkit.storage_root(args.storage)
    if args.resume and not args.name:
        raise jobkit.JobError("--resume needs --name NAME (the run to continue)")
    out = jobkit.join(root, "runs", jobkit.job_name(args.name, "train"))
    if args.resume:
        cmd = ["train", "--resume", out] + (["--epochs", args.epochs] if args.epochs else [])
    else:
        smoke = args.smoke
        gpu = (not smoke) if args.gpu is None else args.gpu
        workers = args.workers or (1 if smoke else 4)
        model = args.model or ("cnn" if smoke else "resnet18")
        cpus = 1 if smoke else args.cpus_per_worker or (WHOLE_NODE_CPUS if workers >= 4 else 3)
        bundles = [{"CPU": cpus, "GPU": 1}] * workers
        cmd = ["train", "--model", model,
               "--data", args.data or (jobkit.SMOKE_DATA if smoke else "cifar10"),
               "--epochs", args.epochs or (1 if smoke else 30),
               "--workers", workers, "--gpu" if gpu else "--cpu",
               "--set", f"scale.cpus_per_worker={cpus}", "--set", f"scale.placement={args.placement}",
               "--out", out]
        if smoke:
            cmd += ["--batch-size", 64]
            if not args.model:
                cmd += ["--set", "model.args.width=0.5"]  # a 100k-parameter net
        if gpu:
            cmd.append("--no-resource-check")  # an autoscaler adds the GPU nodes
    cmd += extra
    if not args.dry_run:
        jobkit.check_writable(root)
        if not args.resume and gpu:
            jobkit.gpu_preflight(bundles, args.placement)
    code = jobkit.run(jobkit.cifar_ray(cmd), dry_run=args.dry_run)
    return code if args.dry_run else jobkit.finish(out, "summary.json", code)


if __name__ == "__main__":
    jobkit.main(body)
