"""Speed of `saebench run` for core + downstream (issue: the spine).

On the default model with 16k evaluation tokens and an SAE of 16,384 latents (the built-in random TopK
dictionary, k=32), prints:
  - the one-time cost of the caches (residuals at the site, clean and zero-ablated pass);
  - core + downstream for a second checkpoint on warm caches (target: under 60 s);
  - downstream per SAE against the naive way, three full forward passes (clean, spliced, zero-ablated)
    timed on a slice of the same windows in the same process (target ratio: at most 0.35);
  - peak memory (RSS), and the largest per-SAE array held.

    python benchmarks/spine.py [--n-tokens 16384] [--naive-windows 64] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from saebench.context import EvalConfig
from saebench.metrics.downstream import reference
from saebench.metrics.registry import get_metric
from saebench.runner import Checkpoint, RunConfig, Runner

NAIVE_BATCH = 8  # windows per full pass: full logits for 8 x 64 positions are ~100 MB


def naive_downstream(context, sae, n_windows: int) -> float:
    """Seconds per window for three full forward passes with a hook at the site."""
    model, layer = context.model, context.layer
    block = model.family.blocks[layer]
    ids = torch.from_numpy(context.windows[:n_windows]).to(context.device)
    mode = {"replace": None}

    def hook(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        if mode["replace"] is not None:
            h = h.clone()
            h[:, 1:] = mode["replace"](h[:, 1:])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, n_windows, NAIVE_BATCH):
                batch = ids[start : start + NAIVE_BATCH]
                for replace in (None, lambda h: sae(h), torch.zeros_like):
                    mode["replace"] = replace
                    logits = model.hf_model(input_ids=batch, use_cache=False).logits
                    torch.log_softmax(logits[:, 1:-1].float(), -1)
        return (time.perf_counter() - t0) / n_windows
    finally:
        handle.remove()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-tokens", type=int, default=16384)
    p.add_argument("--n-latents", type=int, default=16384)
    p.add_argument("--naive-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    out = tempfile.mkdtemp(prefix="saebench-bench-")
    cfg = RunConfig(
        checkpoint="",
        metrics=["core", "downstream"],
        eval=EvalConfig(model=args.model, n_tokens=args.n_tokens),
        out=out,
        force=True,
    )
    runner = Runner(cfg)
    ckpt = Checkpoint(f"builtin:random-topk:n={args.n_latents},k=32", "bench")

    t0 = time.perf_counter()
    sae, context = runner.load(ckpt)
    _ = context.resid, reference(context)
    t_caches = time.perf_counter() - t0
    n_windows, tokens = len(context.windows), len(context.windows) * (context.config.ctx - 1)
    print(
        f"model {args.model}, layer {context.layer}, {n_windows} windows x {context.config.ctx} = "
        f"{tokens} tokens, "
        f"SAE {sae.n_latents} latents k={sae.k}, {torch.get_num_threads()} threads"
    )
    print(f"caches (model load, windows, residuals, clean + zero pass; warm if run before): {t_caches:.1f} s")

    # a second checkpoint on warm caches: a different random dictionary
    ckpt2 = Checkpoint(f"builtin:random-topk:n={args.n_latents},k=32,fit_tokens=16383", "bench2")
    t0 = time.perf_counter()
    sae2, context2 = runner.load(ckpt2)
    t_load = time.perf_counter() - t0
    timings = {}
    for name in ("core", "downstream"):
        metric = get_metric(name)
        t0 = time.perf_counter()
        metric.compute(context2, sae2, metric.params())
        timings[name] = time.perf_counter() - t0
    total = t_load + sum(timings.values())
    print(
        f"second checkpoint, warm caches: load {t_load:.1f} s + core {timings['core']:.1f} s + downstream "
        f"{timings['downstream']:.1f} s = {total:.1f} s  (target < 60 s)"
    )

    context2.forget(sae2)
    t0 = time.perf_counter()
    get_metric("downstream").compute(context2, sae2, get_metric("downstream").params())
    ours = (time.perf_counter() - t0) / n_windows
    naive = naive_downstream(context2, sae2, min(args.naive_windows, n_windows))
    print(
        f"downstream per window: ours {ours * 1e3:.1f} ms (SAE encode included), naive 3 full passes "
        f"{naive * 1e3:.1f} ms -> ratio {ours / naive:.3f}  (target <= 0.35)"
    )

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x_hat_mb = tokens * sae.d_in * 4 / 2**20
    dense_mb = tokens * sae.n_latents * 4 / 2**20
    print(
        f"peak RSS {rss:.0f} MB; per-SAE reconstruction kept: {x_hat_mb:.0f} MB (tokens x d); a dense "
        f"tokens x latents array would be {dense_mb:.0f} MB and is never built (chunks of 512 tokens)"
    )


if __name__ == "__main__":
    main()
