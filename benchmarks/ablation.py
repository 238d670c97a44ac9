"""Speed of the `ablation` metric (issue: ablation sparsity), against the naive way.

On the default model with an SAE of 16,384 latents (the built-in random TopK dictionary, k = 32), with the
default parameters (64 positions x up to 32 latents, 8 + 8 controls per position, T = 16), prints:
  - the metric's wall time (target: under 2 minutes), split into planning (sampling, encoding, the
    contributions), the model above the site (time inside the seam's `UpperCache`: the clean run of the
    windows and the edited suffixes on cached keys/values) and scoring (the rest: the LM head on the
    logit differences, median, L1, L2), measured in one pass;
  - the naive way, timed on the first `--naive-positions` positions' continuations in the same process and
    extrapolated per continuation: a full forward of the whole window per ablation (hooked at the site),
    full logits minus the clean window's, median-centred and reduced densely; and the seam without KV
    reuse (whole windows above the site, reduced in chunks) to show what the reuse alone buys;
  - the values, each beside its controls.

Timings on a shared 2-core machine vary 2-4x between runs: the figures are medians of `--repeats` runs, and
the comparisons are ratios measured side by side.

    python benchmarks/ablation.py [--checkpoint builtin:random-topk:n=16384,k=32] [--repeats 3]
                                  [--positions 64] [--naive-positions 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from saebench.context import EvalConfig
from saebench.metrics import ablation
from saebench.model.batched import UpperCache, median_centred_norms
from saebench.runner import Checkpoint, RunConfig, Runner
from saebench.summary import format_estimate

NAIVE_BATCH = 8  # windows per naive forward: full logits for 8 x 64 positions are ~100 MB


def naive_effects(context, a: ablation.AblationPlan, n: int, n_future: int) -> dict[str, torch.Tensor]:
    """(median, l1, l2) of the first n ablations, each rerunning its whole window through the full model."""
    model, layer = context.model, context.layer
    block = model.family.blocks[layer]
    state = {"rows": None}

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        if state["rows"] is not None:
            h = h.clone()
            rows, t, deltas = state["rows"]
            h[rows, t] += deltas.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = block.register_forward_hook(hook)
    parts = []
    try:
        with torch.inference_mode():
            for lo in range(0, n, NAIVE_BATCH):
                w, t = a.windows[lo : min(lo + NAIVE_BATCH, n)], a.starts[lo : min(lo + NAIVE_BATCH, n)]
                ids = torch.from_numpy(context.windows[w.numpy()]).to(context.device)
                state["rows"] = None
                clean = model.hf_model(input_ids=ids, use_cache=False).logits.float()
                state["rows"] = (torch.arange(len(w)), t, a.deltas[lo : lo + len(w)])
                edited = model.hf_model(input_ids=ids, use_cache=False).logits.float()
                steps = t[:, None] + torch.arange(n_future)
                rows = torch.arange(len(w))[:, None]
                diff = (edited - clean)[rows, steps]
                parts.append(median_centred_norms(diff.reshape(-1, diff.shape[-1])))
    finally:
        handle.remove()
    return {k: torch.cat([p[k] for p in parts]).reshape(n, n_future) for k in parts[0]}


class ModelTimer:
    """Seconds spent in the blocks above the site (the clean cache and the edited suffixes), by wrapping the
    seam's `UpperCache` methods: the rest of `effects` is scoring (LM head, median, L1, L2)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self._init, self._suffix = UpperCache.__init__, UpperCache._suffix_final

        def wrap(fn):
            def timed_call(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t0

            return timed_call

        UpperCache.__init__, UpperCache._suffix_final = wrap(self._init), wrap(self._suffix)
        return self

    def __exit__(self, *exc):
        UpperCache.__init__, UpperCache._suffix_final = self._init, self._suffix


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default="builtin:random-topk:n=16384,k=32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--positions", type=int, default=64, help="n_positions of the metric")
    p.add_argument("--naive-positions", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = RunConfig(
        checkpoint="",
        metrics=["ablation"],
        eval=EvalConfig(model=args.model),
        out=tempfile.mkdtemp(),
        force=True,
    )
    t0 = time.perf_counter()
    sae, context = Runner(cfg).load(Checkpoint(args.checkpoint, "bench"))
    _ = context.resid
    t_load = time.perf_counter() - t0
    print(
        f"model {args.model}, layer {context.layer}, SAE {args.checkpoint} ({sae.n_latents} latents, "
        f"k={sae.k}), {torch.get_num_threads()} threads; load + residuals (warm if cached): {t_load:.1f} s"
    )
    params = ablation.AblationParams(n_positions=args.positions)

    t_plan, a = timed(lambda: ablation.plan(context, sae, params), args.repeats)
    splits = []
    for _ in range(args.repeats):
        with ModelTimer() as timer:
            t0 = time.perf_counter()
            norms = ablation.effects(context, a, params, progress=False)
            splits.append((time.perf_counter() - t0, timer.seconds))
    t_effects = statistics.median(t for t, _ in splits)
    t_model = statistics.median(m for _, m in splits)
    t_metric, result = timed(lambda: ablation.compute(context, sae, params), 1)
    n = len(a.windows)
    V = context.model.vocab_size
    print(f"{a.n_positions} positions, {n} continuations x T={params.n_future} positions x V={V}")
    print(
        f"ours (median of {args.repeats}): plan {t_plan:.1f} s + model {t_model:.1f} s + scoring "
        f"{t_effects - t_model:.1f} s = {t_plan + t_effects:.1f} s; the metric end to end {t_metric:.1f} s "
        "(target < 120 s at 64 positions)"
    )

    # the naive ways on the first positions' continuations, per continuation
    m = int((a.position < args.naive_positions).sum())
    sub = a._replace(**{f: getattr(a, f)[:m] for f in ("windows", "starts", "deltas")})
    t_naive, dense = timed(lambda: naive_effects(context, sub, m, params.n_future), args.repeats)
    t_rerun, _ = timed(
        lambda: ablation.effects(context, sub, params, reuse=False, progress=False), args.repeats
    )
    t_ours_sub, _ = timed(lambda: ablation.effects(context, sub, params, progress=False), args.repeats)
    err = max(float((dense[k] - norms[k][:m]).abs().max() / norms[k][:m].abs().max()) for k in ("l1", "l2"))
    per = {name: t / m * 1e3 for name, t in (("naive", t_naive), ("rerun", t_rerun), ("ours", t_ours_sub))}
    print(
        f"per continuation ({m} continuations of {args.naive_positions} positions, same process): "
        f"naive full-window forward {per['naive']:.1f} ms, whole windows above the site (seam, no KV reuse) "
        f"{per['rerun']:.1f} ms, ours {per['ours']:.1f} ms; all {n}: naive ~{per['naive'] * n / 1e3:.0f} s"
    )
    whole = t_effects / (per["naive"] * n / 1e3)
    print(
        f"ratio ours / naive {per['ours'] / per['naive']:.3f} (whole run: {whole:.3f}), ours / no-reuse "
        f"{per['ours'] / per['rerun']:.3f}; naive vs ours, max relative difference in L1 and L2: {err:.1e}"
    )
    for key, est in result.values.items():
        print(f"  {key}: {format_estimate(est.to_dict())} (n={est.n} {est.unit})")
    print(f"  counts: {result.counts}")
    print(f"  quantiles: {result.details['quantiles']}")


if __name__ == "__main__":
    main()
