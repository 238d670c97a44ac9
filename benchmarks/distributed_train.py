"""Training throughput on one process and on N torch.distributed processes (gloo), data and latent parallel.

The same TopK step as `train_throughput.py` (forward with top-k, AuxK when latents are dead, sparse backward,
Adam, decoder projection and renormalisation) on the same random (batch, d) batch, timed on rank 0 between
barriers:

    1 process            the trainer as `saebench train` runs it, torch on all cores
    N processes, data    each rank its batch / N tokens, gradients all-reduced   (latent_shards=1)
    N processes, latent  each rank n / N latents of the whole batch               (latent_shards=N)

The N processes share the machine: each runs torch on cores / N threads, so the ratios say what splitting a
fixed machine costs or gains (on one machine the processes compete for the same cores and memory bandwidth;
across GPUs or nodes each has its own).  Printed: median tok/s over --steps steps (after one warm-up step),
the slowest and fastest step, and the ratio to one process.

    python benchmarks/distributed_train.py [--n 16384] [--k 32] [--d 576] [--batch 4096] [--steps 5]
                                           [--world 2] [--dead-fraction 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saebench.train import TrainConfig, Trainer


def _rank(rank: int, world: int, mode: str, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        init, timeout = f"file://{folder}/init-{mode}", timedelta(hours=1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
    config = TrainConfig(
        n_latents=args.n,
        k=args.k,
        batch_size=args.batch,
        lr=1e-4,
        latent_shards=world if mode == "latent" else 1,
    )
    trainer = Trainer(config, args.d)
    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0))
    trainer.initialize(x[:1024])
    n_dead = int(args.dead_fraction * trainer.model.n_latents)  # of this rank's latents (all, or its shard)
    times = []
    for _ in range(args.steps + 1):
        if n_dead:
            trainer.tokens_since_fired[:n_dead] = trainer.dead_tokens
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        trainer.train_step(x)
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(folder, f"{mode}-{world}.json").write_text(json.dumps(times[1:]))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, mode: str, args: argparse.Namespace, folder: str) -> list[float]:
    """Step times (s) of `world` fresh processes in `mode` ('single', 'data' or 'latent')."""
    mp.start_processes(_rank, args=(world, mode, args, folder), nprocs=world, join=True, start_method="spawn")
    return json.loads(Path(folder, f"{mode}-{world}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=16384, help="latents")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--d", type=int, default=576, help="input width (SmolLM2-135M: 576)")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step (the global batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (medians are printed)")
    parser.add_argument("--world", type=int, default=2, help="processes of the parallel settings")
    parser.add_argument("--dead-fraction", type=float, default=0.0, help="latents kept dead (AuxK runs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        settings = [("1 process", 1, "single")]
        for mode in ("data", "latent"):
            settings.append((f"{args.world} processes, {mode} parallel", args.world, mode))
        rates = {}
        for name, world, mode in settings:
            rates[name] = [args.batch / t for t in measure(world, mode, args, folder)]
    load = f" load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(
        f"n={args.n} k={args.k} d={args.d} batch={args.batch} steps={args.steps} cores={os.cpu_count()} "
        f"dead_fraction={args.dead_fraction}{load}"
    )
    single = statistics.median(rates["1 process"])
    for name, rate in rates.items():
        median = statistics.median(rate)
        print(
            f"{name:30s} {median:10,.0f} tok/s  [{min(rate):,.0f} .. {max(rate):,.0f}]  "
            f"{median / single:5.2f}x one process"
        )


if __name__ == "__main__":
    main()
