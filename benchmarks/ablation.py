"""Speed of the `ablation` metric (issue: ablation sparsity), against the naive way.

On the default model with an SAE of 16,384 latents (the built-in random TopK dictionary, k = 32), with the
default parameters (64 positions x up to 32 latents, 8 + 8 controls per position, T = 16), prints:
  - the metric's wall time (target: under 2 minutes), split into planning (sampling, encoding, the
    contributions), the model above the site (time inside the seam's `UpperCache`: the clean run of the
    windows, the edited suffixes on cached keys/values) and scoring (the LM head's product W (h' - h), and
    the median, L1, L2 of each row), measured in one pass;
  - the floor: the matmul FLOPs of that work over the matmul rate measured in the same process, and how far
    above it the run is;
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


class PhaseTimer:
    """Seconds inside the parts of `effects`, by wrapping them: the clean run above the site (`UpperCache`'s
    constructor: every block's keys and values), the edited suffixes on cached keys (`_suffix_final`) and the
    reduction (median, L1, L2: `median_centred_norms`).  The rest of `effects` is the LM head's product
    W (h' - h) and the bookkeeping."""

    PARTS = {"clean": (UpperCache, "__init__"), "suffix": (UpperCache, "_suffix_final")}

    def __init__(self):
        self.seconds = dict.fromkeys([*self.PARTS, "reduce"], 0.0)

    def _wrap(self, name, fn):
        def timed_call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed_call

    def __enter__(self):
        self._saved = {name: getattr(owner, attr) for name, (owner, attr) in self.PARTS.items()}
        for name, (owner, attr) in self.PARTS.items():
            setattr(owner, attr, self._wrap(name, self._saved[name]))
        self._reduce = ablation.median_centred_norms
        ablation.median_centred_norms = self._wrap("reduce", self._reduce)
        return self

    def __exit__(self, *exc):
        for name, (owner, attr) in self.PARTS.items():
            setattr(owner, attr, self._saved[name])
        ablation.median_centred_norms = self._reduce


def matmul_rate(rows: int, d_in: int, d_out: int, repeats: int = 5) -> float:
    """FLOP/s of a float32 (rows, d_in) x (d_in, d_out) product here, the best of `repeats`."""
    a, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    out = torch.empty(rows, d_out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, w.t(), out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * d_in * d_out / best


def floor_seconds(context, a: ablation.AblationPlan, params) -> dict[str, float]:
    """The matmul work of `effects` (FLOPs of the blocks' and the head's weights; attention scores, norms and
    the reduction not counted) over the matmul rate measured now: the run's cost at this machine's peak."""
    model, layer = context.model, context.layer
    blocks = model.family.blocks[layer + 1 :]
    block_flops = 2 * sum(p.numel() for p in blocks.parameters() if p.ndim == 2)  # per token row
    head = model.family.head.weight
    rows = len(a.windows) * params.n_future
    clean_rows = len(torch.unique(a.windows)) * context.windows.shape[1]
    mlp = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    block_rate = matmul_rate(4096, mlp[-1].in_features, mlp[-1].out_features)
    head_rate = matmul_rate(ablation.head_chunk(model.vocab_size), head.shape[1], head.shape[0])
    return {
        "clean": clean_rows * block_flops / block_rate,
        "suffix": rows * block_flops / block_rate,
        "head": rows * 2 * head.numel() / head_rate,
        "tflop": (clean_rows + rows) * block_flops / 1e12 + rows * 2 * head.numel() / 1e12,
        "block_rate": block_rate / 1e9,
        "head_rate": head_rate / 1e9,
    }


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
        with PhaseTimer() as timer:
            t0 = time.perf_counter()
            norms = ablation.effects(context, a, params, progress=False)
            splits.append({"effects": time.perf_counter() - t0, **timer.seconds})
    split = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    split["head"] = split["effects"] - split["clean"] - split["suffix"] - split["reduce"]
    t_effects = split["effects"]
    floor = floor_seconds(context, a, params)
    t_metric, result = timed(lambda: ablation.compute(context, sae, params), 1)
    n = len(a.windows)
    V = context.model.vocab_size
    print(f"{a.n_positions} positions, {n} continuations x T={params.n_future} positions x V={V}")
    model_s, scoring_s = split["clean"] + split["suffix"], split["head"] + split["reduce"]
    print(
        f"ours (median of {args.repeats}): plan {t_plan:.1f} s + model {model_s:.1f} s (clean run above the "
        f"site {split['clean']:.1f} s, edited suffixes {split['suffix']:.1f} s) + scoring {scoring_s:.1f} s "
        f"(head W (h' - h) {split['head']:.1f} s, median/L1/L2 {split['reduce']:.1f} s) = "
        f"{t_plan + t_effects:.1f} s; the metric end to end {t_metric:.1f} s (target < 120 s at 64 positions)"
    )
    total_floor = floor["clean"] + floor["suffix"] + floor["head"]
    print(
        f"floor: {floor['tflop']:.2f} TFLOP of matmuls at the rates measured now ({floor['block_rate']:.0f} "
        f"GFLOP/s for the blocks' shapes, {floor['head_rate']:.0f} for the head's) = {total_floor:.1f} s "
        f"(clean {floor['clean']:.1f}, suffixes {floor['suffix']:.1f}, head {floor['head']:.1f}); "
        f"model + scoring is {t_effects / total_floor:.2f}x the floor (model "
        f"{model_s / (floor['clean'] + floor['suffix']):.2f}x, head {split['head'] / floor['head']:.2f}x)"
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
