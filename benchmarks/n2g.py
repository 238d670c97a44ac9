"""Speed of the `n2g` metric (issue: N2G explanations).

On the default model with a 16,384-latent TopK SAE (by default the built-in random dictionary, k = 32),
`--latents` sampled latents (target: 64 in under 4 minutes on warm caches), prints:
  - the one-time caches (build and score pools' residuals at the site; warm if run before);
  - the metric's wall time and its share in the model (re-runs to the site), the trie (build, prediction),
    scoring and explanation reconstruction (spliced runs);
  - forward passes and tokens of the re-runs against the fewest the search needs given its answers
    (L* and L* - 1 tested, the anchor, the L* saliency variants on the suffix's cached keys), and how
    many of them ran as full reruns and how many on cached keys;
  - the values with the token and random baselines beside them.

    python benchmarks/n2g.py [--checkpoint builtin:random-topk:n=16384,k=32] [--latents 64]
        [--n-build-tokens 32768] [--n-score-tokens 32768] [--search bracket]   (the metric's defaults)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from saebench.context import EvalConfig
from saebench.metrics.n2g import N2GParams
from saebench.metrics.n2g import compute as n2g
from saebench.runner import Checkpoint, RunConfig, Runner
from saebench.summary import format_estimate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default="builtin:random-topk:n=16384,k=32")
    p.add_argument("--latents", type=int, default=64)
    p.add_argument("--n-build-tokens", type=int, default=N2GParams.n_build_tokens)
    p.add_argument("--n-score-tokens", type=int, default=N2GParams.n_score_tokens)
    p.add_argument("--search", default="bracket")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = RunConfig(
        checkpoint="", metrics=["core"], eval=EvalConfig(model=args.model), out=tempfile.mkdtemp(), force=True
    )
    params = N2GParams(
        n_latents=args.latents,
        n_build_tokens=args.n_build_tokens,
        n_score_tokens=args.n_score_tokens,
        search=args.search,
    )
    t0 = time.perf_counter()
    sae, context = Runner(cfg).load(Checkpoint(args.checkpoint, "bench"))
    site, ctx = context.site, context.config.ctx
    for split, n_tokens, start in (
        ("train", params.n_build_tokens, params.build_start),
        ("eval", params.n_score_tokens, context.config.n_windows),
    ):
        site.resid(split, -(-n_tokens // (ctx - 1)), start)
    print(
        f"model {args.model}, layer {context.layer}, SAE {args.checkpoint} ({sae.n_latents} latents, "
        f"k={sae.k}), {torch.get_num_threads()} threads; pools' caches (warm if run before): "
        f"{time.perf_counter() - t0:.1f} s"
    )

    model = context.model
    calls = {"forwards": 0, "padded_tokens": 0}
    to_site = model.to_site

    def counted(ids, layer):
        calls["forwards"] += 1
        calls["padded_tokens"] += ids.numel()
        return to_site(ids, layer)

    model.to_site = counted
    t = time.perf_counter()
    result = n2g(context, sae, params)
    wall = time.perf_counter() - t
    model.to_site = to_site

    c, s = result.counts, result.details["seconds"]
    search = result.details["search"]
    print(f"n2g, {c['latents_sampled']} latents, search {search}: {wall:.1f} s (target < 240 s)")
    shares = {k: v for k, v in s.items() if k != "total"}
    print("  time: " + ", ".join(f"{k} {v:.1f} s ({v / wall:.0%})" for k, v in shares.items()))
    kv = sum(v for k, v in result.details["reruns"]["tokens"].items() if k in ("base", "saliency"))
    print(
        f"  re-runs: {c['rerun_sequences']} sequences, {c['rerun_tokens']} tokens; fewest the search needs: "
        f"{c['fewest_sequences']} sequences, {c['fewest_tokens']} tokens "
        f"(x{c['rerun_tokens'] / max(c['fewest_tokens'], 1):.2f} tokens)"
    )
    print(
        f"  of which full reruns (suffix search, anchors): {calls['forwards']} forward passes to the site, "
        f"{c['rerun_tokens'] - kv} tokens, {calls['padded_tokens']} padded; suffixes and saliency variants "
        f"on cached keys: {kv} tokens"
    )
    print(f"  by phase: {result.details['reruns']}")
    print(f"  minimal suffix length quantiles: {result.details['suffix_length_quantiles']}")
    for key, est in result.values.items():
        print(f"  {key}: {format_estimate(est.to_dict())} (n={est.n} {est.unit})")
    print(f"  counts: {c}")
    for row in result.details["latents"][:8]:
        print(f"  latent {row['latent']}: f1 {row['f1']:.2f}  {row['explanation'][:80]}")


if __name__ == "__main__":
    main()
