"""Time the probes metric on the real default model: the one-time activation pass, then one checkpoint on
warm caches, split into SAE encoding and fitting, against the encoding floor.

The checkpoint is a random TopK SAE (timing does not depend on what the latents mean).  The encode floor is
tokens x n_latents x d_model x 2 FLOP at the torch.matmul rate measured here.  The full 61-task activation
pass runs the model on ~1.3 M tokens (tens of CPU minutes); --tasks picks a few:

    python benchmarks/probes_suite.py --tasks 21_headline_istrump,158_code_C
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from saebench.context import EvalConfig, EvalContext
from saebench.data.task_activations import site_task_activations
from saebench.data.tasks import discover_tasks, select_tasks
from saebench.metrics.probes import ProbesParams
from saebench.metrics.probes import compute as probes
from saebench.sae.sae import SAE


def random_topk_sae(d: int, n: int, k: int, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAE(W_dec.T.clone(), torch.zeros(n), W_dec, torch.zeros(d), activation="topk", k=k)


def matmul_rate(d: int, n: int, tokens: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of (tokens, d) @ (d, n) in float32, median of `repeats`."""
    a, b = torch.randn(tokens, d), torch.randn(d, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * tokens * d * n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="all", help="task names or tags, comma-separated, or all")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=None, help="default: about 3/4 depth")
    parser.add_argument("--n-latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--fit-dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    context = EvalContext(EvalConfig(model=args.model, layer=args.layer, cache_dir=args.cache_dir))
    tasks = select_tasks(discover_tasks(), args.tasks)
    print(f"model {args.model}, layer {context.layer}, d_model {context.model.d_model}, {len(tasks)} tasks, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip

    start = time.perf_counter()
    tokens = {}
    for task in tasks:
        t0 = time.perf_counter()
        acts = site_task_activations(context.site, task)
        tokens[task.name] = (int(acts.offsets[-1]), acts.n_examples, task.pool)
        print(f"  {task.name}: {acts.n_examples} examples, {tokens[task.name][0]} tokens, "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    first_pass = time.perf_counter() - start
    total_tokens = sum(t for t, _, _ in tokens.values())
    print(f"activation pass (first call; cached tasks load in well under a second): {first_pass:.1f} s for "
          f"{total_tokens} tokens ({total_tokens / first_pass:.0f} tok/s)")  # fmt: skip

    sae = random_topk_sae(context.model.d_model, args.n_latents, args.k)
    params = ProbesParams(tasks=args.tasks, fit_dtype=args.fit_dtype)
    start = time.perf_counter()
    result = probes(context, sae, params)
    total = time.perf_counter() - start
    timing = result.details["timing"]
    print(f"checkpoint on warm caches ({args.n_latents} latents, TopK k={args.k}, fit {args.fit_dtype}): "
          f"{total:.1f} s total")  # fmt: skip
    for name, seconds in timing.items():
        print(f"  {name:15s} {seconds:7.2f} s  ({seconds / total:5.1%})")

    rate = matmul_rate(context.model.d_model, args.n_latents)
    encoded = sum(t if pool != "last" else n for t, n, pool in tokens.values())
    floor = encoded * args.n_latents * context.model.d_model * 2 / rate
    print(f"encode floor: {encoded} tokens x {args.n_latents} x {context.model.d_model} x 2 FLOP at "
          f"{rate / 1e9:.1f} GFLOP/s (torch.matmul) = {floor:.2f} s; encode took "
          f"{timing['encode_s'] / floor:.2f}x the floor")  # fmt: skip
    print(f"whole checkpoint: {total / floor:.2f}x the encode floor (target <= 1.5x)")
    values = {k: dataclasses.asdict(v) for k, v in result.values.items()}
    for name, v in values.items():
        print(f"{name}: {v['value']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}] over {v['n']} {v['unit']}")


if __name__ == "__main__":
    main()
