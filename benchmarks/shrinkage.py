"""Speed of the `shrinkage` metric (issue: activation shrinkage).

On the default model with an SAE of 16,384 latents (the built-in random TopK dictionary, k = 32) and the
default 4,096 tokens, prints:
  - the one-time caches (residuals at the site, downstream's clean and zero-ablated pass, shared with the
    downstream metric; warm if run before);
  - the metric per SAE with delta_ce_refined included (target: under 20 s), and without the two spliced
    passes (encode + refinement only), medians of `--repeats` runs in one process;
  - the values with their controls beside them, and the refinement's convergence.

    python benchmarks/shrinkage.py [--checkpoint builtin:random-topk:n=16384,k=32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from saebench.context import EvalConfig
from saebench.metrics import shrinkage
from saebench.metrics.downstream import reference
from saebench.runner import Checkpoint, RunConfig, Runner
from saebench.summary import format_estimate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default="builtin:random-topk:n=16384,k=32")
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = RunConfig(
        checkpoint="",
        metrics=["shrinkage"],
        eval=EvalConfig(model=args.model),
        out=tempfile.mkdtemp(),
        force=True,
    )
    t0 = time.perf_counter()
    sae, context = Runner(cfg).load(Checkpoint(args.checkpoint, "bench"))
    _ = context.resid, reference(context)
    t_caches = time.perf_counter() - t0
    print(
        f"model {args.model}, layer {context.layer}, SAE {args.checkpoint} ({sae.n_latents} latents, "
        f"k={sae.k}), {torch.get_num_threads()} threads; caches (warm if run before): {t_caches:.1f} s"
    )

    def run(delta_ce: bool):
        params = shrinkage.ShrinkageParams(n_tokens=args.n_tokens, delta_ce=delta_ce)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            t = time.perf_counter()
            result = shrinkage.compute(context, sae, params)
            return time.perf_counter() - t, result

    full = [run(True) for _ in range(args.repeats)]
    refine_only = [run(False) for _ in range(args.repeats)]
    t_full = statistics.median(t for t, _ in full)
    t_refine = statistics.median(t for t, _ in refine_only)
    result = full[-1][1]
    print(
        f"shrinkage on {result.counts['tokens']} tokens ({result.counts['windows']} windows), median of "
        f"{args.repeats}: {t_full:.1f} s with delta_ce_refined (target < 20 s); encode + refinement alone "
        f"{t_refine:.1f} s, the two spliced passes {t_full - t_refine:.1f} s"
    )
    for key, est in result.values.items():
        print(f"  {key}: {format_estimate(est.to_dict())} (n={est.n} {est.unit})")
    print(f"  counts: {result.counts}")
    print(f"  iterations: {result.details['iterations']}")
    print(f"  final projected gradient (relative): {result.details['final_projected_grad_norm']}")


if __name__ == "__main__":
    main()
