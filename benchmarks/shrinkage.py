"""Speed of the `shrinkage` metric (issue: activation shrinkage).

On the default model with an SAE of 16,384 latents (the built-in random TopK dictionary, k = 32) and the
default 4,096 tokens, prints:
  - the one-time caches (residuals at the site, downstream's clean and zero-ablated pass, shared with the
    downstream metric; warm if run before);
  - the metric per SAE with delta_ce_refined included (target: under 20 s), run alone and after downstream
    (whose spliced pass of the encoder's reconstruction it shares, leaving one spliced pass of its own), and
    without the spliced passes (encode + refinement only), medians of `--repeats` runs in one process;
  - the floor: the matmul FLOPs (encoder, spliced passes) over the matmul rate measured in the process;
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
from saebench.metrics.downstream import reconstruction_ce_kl, reference
from saebench.runner import Checkpoint, RunConfig, Runner
from saebench.summary import format_estimate


def floor_seconds(context, sae, n_windows: int) -> dict[str, float]:
    """Matmul FLOPs over the float32 matmul rate measured now: the encoder (tokens x d x n_latents) and one
    spliced pass (the blocks above the site on whole windows, the head on positions 1..ctx-2); the
    refinement (float64, small) and attention scores are not counted."""
    model, layer = context.model, context.layer
    ctx = context.windows.shape[1]
    block_flops = 2 * sum(p.numel() for p in model.family.blocks[layer + 1 :].parameters() if p.ndim == 2)
    head_flops = 2 * model.family.head.weight.numel()
    a, w = torch.randn(4096, sae.d_in), torch.randn(4 * sae.d_in, sae.d_in)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    rate = 2 * a.shape[0] * w.numel() / best
    spliced = n_windows * (ctx * block_flops + (ctx - 2) * head_flops)
    encode = n_windows * (ctx - 1) * 2 * sae.d_in * sae.n_latents
    return {"rate": rate / 1e9, "encode": encode / rate, "pass": spliced / rate}


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

    def run(delta_ce: bool, fresh: bool = True):
        """One run of the metric; `fresh`: the SAE's shared pieces (its reconstructions and the encoder's
        spliced pass) are dropped first, as for a metric that runs alone."""
        if fresh:
            context.forget(sae)
        params = shrinkage.ShrinkageParams(n_tokens=args.n_tokens, delta_ce=delta_ce)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            t = time.perf_counter()
            result = shrinkage.compute(context, sae, params)
            return time.perf_counter() - t, result

    full = [run(True) for _ in range(args.repeats)]
    refine_only = [run(False) for _ in range(args.repeats)]
    shared = []
    for _ in range(args.repeats):  # after downstream: the encoder's spliced pass is already there
        context.forget(sae)
        reconstruction_ce_kl(context, sae, full[-1][1].counts["windows"])  # the windows shrinkage reads
        shared.append(run(True, fresh=False))
    t_full = statistics.median(t for t, _ in full)
    t_refine = statistics.median(t for t, _ in refine_only)
    t_shared = statistics.median(t for t, _ in shared)
    result = full[-1][1]
    same = all(result.values[k].value == shared[-1][1].values[k].value for k in result.values)
    print(
        f"shrinkage on {result.counts['tokens']} tokens ({result.counts['windows']} windows), median of "
        f"{args.repeats}: {t_full:.1f} s alone with delta_ce_refined (target < 20 s) = encode + refinement "
        f"{t_refine:.1f} s + the two spliced passes {t_full - t_refine:.1f} s; after downstream (its spliced "
        f"pass of the encoder's reconstruction shared) {t_shared:.1f} s, values "
        + ("identical" if same else "DIFFER")
    )
    floor = floor_seconds(context, sae, result.counts["windows"])
    alone, after = floor["encode"] + 2 * floor["pass"], floor["encode"] + floor["pass"]
    print(
        f"floor (matmul FLOPs at the rate measured now, {floor['rate']:.0f} GFLOP/s): encode "
        f"{floor['encode']:.1f} s, one spliced pass {floor['pass']:.1f} s (the blocks above the site, the "
        f"head); alone {alone:.1f} s ({t_full / alone:.2f}x), after downstream {after:.1f} s "
        f"({t_shared / after:.2f}x)"
    )
    for key, est in result.values.items():
        print(f"  {key}: {format_estimate(est.to_dict())} (n={est.n} {est.unit})")
    print(f"  counts: {result.counts}")
    print(f"  iterations: {result.details['iterations']}")
    print(f"  final projected gradient (relative): {result.details['final_projected_grad_norm']}")


if __name__ == "__main__":
    main()
