"""ablation: are a latent's downstream effects sparse? (METRICS.md; the issue's definition where they differ)

At `n_positions` seeded scored positions t of the evaluation windows, with 1 <= t <= ctx - T (T = n_future),
for each active latent j at t (at most `max_latents`, the largest):

    c_j      = decode(codes, state) - decode(codes with z_j = 0, state)     raw-space contribution at t
    x'_t     = x_t - c_j                     the true residual, at position t only: the SAE's error stays in
    D[s, v]  = logits'[s, v] - logits[s, v]  s = t .. t+T-1, the whole vocabulary V
    u        = concat_s (D[s, :] - median_v D[s, :])       a uniform shift of a row changes no probability
    sparsity = (||u||_1 / ||u||_2)^2 / (T V)               in [1/(T V), 1]; lower is sparser

`ablation_sparsity` is the mean over (position, latent) pairs, its interval resamples positions.  Controls,
ablated at the same positions (`n_control` per position, each matched to one of the position's ablated
latents drawn with the seed, and paired: the i-th random and i-th residual control share the match):

    random    x'_t = x_t - ||c_j|| g / ||g||,                 g ~ N(0, I_d)
    residual  x'_t = x_t - sign(x_t,i) ||c_j|| e_i,           channel i uniform: one standard-basis
                                                              direction, moved ||c_j|| towards zero

so the leaderboard can say whether latents have sparser effects than the residual basis.  An ablation with
no effect at all (u = 0: the score is 0/0) is counted and left out of the means.

Cost: an edit at t leaves positions < t unchanged, so only positions t..t+T-1 run above the site, on the
clean keys/values of the earlier positions (`UpperCache.run_edits`); the ablations of many positions share a
batch, and logit differences are reduced to (median, L1, L2) per row, `head_chunk` rows at a time, in one
reused buffer (the median by exact selection, `median_centred_norms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.context import EvalContext
from saebench.metrics.registry import Metric, MetricResult, register
from saebench.metrics.stats import ratio_estimate
from saebench.model.batched import UpperCache, cache_above_site, median_centred_norms
from saebench.sae.sae import SAE, Encoded, SparseCodes

#: ablation kinds, in the order of the values
KINDS = ("latent", "random", "residual")
LATENT, RANDOM, RESIDUAL = range(3)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: bytes of the head's output buffer: wider than the seam's default chunk, as the (rows, d) x (d, V) product
#: runs ~15% faster here at 512+ rows than at 256
HEAD_BYTES = 1 << 27


@dataclass
class AblationParams:
    #: positions t drawn (with the seed) from the scored positions 1..ctx - n_future of the evaluation windows
    n_positions: int = 64
    #: T: positions t..t+T-1 whose logit differences are scored
    n_future: int = 16
    #: at most this many active latents ablated per position, the largest activations first
    max_latents: int = 32
    #: controls per position and kind (random direction, residual channel), each with the norm of one of
    #: the position's ablated contributions
    n_control: int = 8
    #: continuations (window, t, edit) per forward above the site
    batch: int = 256

    def __post_init__(self):
        for name in ("n_positions", "n_future", "max_latents", "n_control", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"ablation: {name} must be >= 1, got {getattr(self, name)}")


class AblationPlan(NamedTuple):
    """The continuations to run: ablation b edits window `windows[b]` at position `starts[b]` by deltas[b]."""

    #: (B,) evaluation window of each ablation
    windows: torch.Tensor
    #: (B,) the edited position t
    starts: torch.Tensor
    #: (B, d) the edit added to the residual at t (minus the ablated contribution)
    deltas: torch.Tensor
    #: (B,) LATENT, RANDOM or RESIDUAL
    kind: torch.Tensor
    #: (B,) index of the sampled position (0..P-1) the ablation belongs to
    position: torch.Tensor
    #: (B,) the ablated latent, or for a control the latent whose contribution's norm it matches
    latent: torch.Tensor
    #: (B,) the residual channel of a RESIDUAL control, else -1
    channel: torch.Tensor
    #: (B,) the latent's activation at t (of the matched latent for controls)
    activation: torch.Tensor
    #: positions sampled (P) and how many of them had no active latent (no ablation, no control)
    n_positions: int
    n_empty: int


def effect_sparsity(l1: torch.Tensor, l2: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(||u||_1 / ||u||_2)^2 / (T V) from per-row norms of the median-centred rows, l1, l2 (..., T).

    float64; NaN where every row is zero (an ablation without effect).
    """
    l1, l2 = l1.double(), l2.double()
    total_l1, total_sq = l1.sum(-1), l2.square().sum(-1)
    score = total_l1.square() / total_sq / (l1.shape[-1] * vocab_size)
    return score.masked_fill(total_sq == 0, float("nan"))


def sample_positions(mask: np.ndarray, n_future: int, n: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """(windows, t) of n distinct scored positions with 1 <= t <= ctx - n_future, sorted by (t, window).

    mask: (W, ctx - 1), scored positions 1..; fewer than n eligible positions gives all of them.
    """
    ctx = mask.shape[1] + 1
    if ctx - n_future < 1:
        raise ValueError(f"ablation: n_future={n_future} leaves no position t with t + n_future <= ctx={ctx}")
    eligible = np.flatnonzero(mask[:, : ctx - n_future])
    rng = np.random.default_rng(seed)
    picked = rng.choice(eligible, size=min(n, eligible.size), replace=False)
    windows, t = np.divmod(picked, ctx - n_future)
    order = np.lexsort((windows, t))
    return windows[order], t[order] + 1


def contributions(sae: SAE, encoded: Encoded, latents: torch.Tensor) -> torch.Tensor:
    """Raw-space contributions (P, m, d) of latents (P, m) at P encoded tokens: x_hat - x_hat with z_j = 0.

    A latent that is not active at its token (or the padding id -1) contributes exactly zero.
    """
    codes, state = encoded
    n, m = latents.shape
    rows = torch.arange(n, device=latents.device).repeat_interleave(m)
    indices, values = codes.indices[rows], codes.values[rows]
    values = values.masked_fill(indices == latents.reshape(-1, 1), 0)
    full = sae.decode_codes(codes, state)[rows]
    without = sae.decode_codes(SparseCodes(indices, values), state.select(rows))
    return (full - without).reshape(n, m, -1)


def largest_active(codes: SparseCodes, max_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token the ids (P, m) and activations of its at most `max_latents` largest active latents.

    m = min(max_latents, codes' width); slots beyond a token's active count have id -1 and activation 0.
    """
    m = min(max_latents, codes.values.shape[1])
    ranked = codes.values.masked_fill(codes.values == 0, -torch.inf)
    top, slot = ranked.topk(m, dim=-1)
    active = torch.isfinite(top)
    ids = codes.indices.gather(1, slot).masked_fill(~active, -1)
    return ids, top.masked_fill(~active, 0)


@torch.inference_mode()
def plan(context: EvalContext, sae: SAE, params: AblationParams) -> AblationPlan:
    """Sample the positions, encode them, and build every ablation and control (see the module docstring)."""
    seeds = np.random.SeedSequence([context.config.seed, 0xAB1A7E]).spawn(3)
    win, t = sample_positions(context.mask, params.n_future, params.n_positions, seeds[0])
    device = context.device
    x = torch.from_numpy(np.array(context.resid[win, t])).to(device, sae.W_enc.dtype)
    encoded = sae.encode_codes(x)
    ids, acts = largest_active(encoded.codes, params.max_latents)
    contrib = contributions(sae, encoded, ids)  # (P, m, d)
    n_pos, m, d = contrib.shape
    norms = contrib.norm(dim=-1)  # (P, m)
    counts = (ids >= 0).sum(1)
    has = counts > 0

    # controls: the i-th random and i-th residual control of a position match the norm of one of its latents
    rng = np.random.default_rng(seeds[1])
    k = params.n_control
    match = np.floor(rng.random((n_pos, k)) * np.maximum(counts.cpu().numpy(), 1)[:, None]).astype(np.int64)
    match = torch.from_numpy(match).to(device)
    channel = torch.from_numpy(rng.integers(0, d, size=(n_pos, k))).to(device)
    g = torch.randn(n_pos, k, d, generator=torch.Generator().manual_seed(int(seeds[2].generate_state(1)[0])))
    g = g.to(device, contrib.dtype)
    matched = norms.gather(1, match)  # (P, k)
    random_deltas = -g / g.norm(dim=-1, keepdim=True) * matched[..., None]
    sign = torch.where(x.gather(1, channel) < 0, -1.0, 1.0).to(contrib.dtype)
    residual_deltas = torch.zeros(n_pos, k, d, dtype=contrib.dtype, device=device)
    residual_deltas.scatter_(2, channel[..., None], (-sign * matched)[..., None])

    parts = []
    positions = torch.arange(n_pos, device=device)
    for p in range(n_pos):
        if not has[p]:
            continue
        j = int(counts[p])
        parts.append(
            (
                torch.cat([-contrib[p, :j], random_deltas[p], residual_deltas[p]]),
                torch.cat([torch.full((j,), LATENT), torch.full((k,), RANDOM), torch.full((k,), RESIDUAL)]),
                torch.cat([ids[p, :j], ids[p, match[p]], ids[p, match[p]]]),
                torch.cat([torch.full((j + k,), -1, device=device), channel[p]]),
                torch.cat([acts[p, :j], acts[p, match[p]], acts[p, match[p]]]),
                positions[p].expand(j + 2 * k),
            )
        )
    if not parts:
        raise ValueError("ablation: no sampled position has an active latent")
    deltas, kind, latent, chan, act, position = (torch.cat(c) for c in zip(*parts, strict=True))
    win_t, t_t = torch.from_numpy(win).to(device), torch.from_numpy(t).to(device)
    return AblationPlan(
        windows=win_t[position],
        starts=t_t[position],
        deltas=deltas,
        kind=kind.to(device),
        position=position,
        latent=latent,
        channel=chan,
        activation=act.double(),
        n_positions=n_pos,
        n_empty=int((~has).sum()),
    )


def head_chunk(vocab_size: int) -> int:
    """Rows of logit differences per head pass: a HEAD_BYTES float32 buffer (682 rows of a 49k vocabulary)."""
    return max(1, HEAD_BYTES // (4 * vocab_size))


def upper_cache(
    context: EvalContext, windows: torch.Tensor, *, reuse: bool = True
) -> tuple[UpperCache, torch.Tensor]:
    """The clean run above the site of the distinct `windows`, and each window's row in it."""
    distinct, rows = torch.unique(windows.cpu(), return_inverse=True)
    resid = torch.from_numpy(np.array(context.resid[distinct.numpy()]))
    model = context.model
    with torch.inference_mode():
        cache = cache_above_site(model, resid.to(context.device, model.dtype), context.layer, reuse=reuse)
    return cache, rows.to(context.device)


def effects(
    context: EvalContext,
    ablations: AblationPlan,
    params: AblationParams,
    *,
    reuse: bool = True,
    progress=True,
) -> dict[str, torch.Tensor]:
    """Per ablation and scored position: median, L1 and L2 of the median-centred logit difference (B, T)."""
    cache, rows = upper_cache(context, ablations.windows, reuse=reuse)
    parts = []
    n, step = len(rows), params.batch
    with torch.inference_mode():
        batches = tqdm(
            range(0, n, step), desc="ablation", leave=False, disable=not progress, dynamic_ncols=True
        )
        for lo in batches:
            parts.append(
                cache.run_edits(
                    rows[lo : lo + step],
                    ablations.starts[lo : lo + step],
                    ablations.deltas[lo : lo + step],
                    n_positions=params.n_future,
                    output="logit_diff",
                    reduce=partial(median_centred_norms, overwrite=True),
                    batch=step,
                    chunk=head_chunk(context.model.vocab_size),
                )
            )
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def compute(context: EvalContext, sae: SAE, params: AblationParams) -> MetricResult:
    ablations = plan(context, sae, params)
    norms = effects(context, ablations, params)
    score = effect_sparsity(norms["l1"], norms["l2"], context.model.vocab_size).cpu().numpy()
    kind, position = ablations.kind.cpu().numpy(), ablations.position.cpu().numpy()
    seed, values, quantiles = context.config.seed, {}, {}
    for code, name in enumerate(KINDS):
        ok = (kind == code) & np.isfinite(score)
        sums = np.bincount(position[ok], score[ok], minlength=ablations.n_positions)
        n = np.bincount(position[ok], minlength=ablations.n_positions).astype(np.float64)
        keep = n > 0
        key = "ablation_sparsity" if code == LATENT else f"ablation_sparsity_{name}"
        values[key] = ratio_estimate(sums[keep], n[keep], "positions", seed)
        qs = np.quantile(score[ok], QUANTILES).tolist() if ok.any() else [None] * len(QUANTILES)
        quantiles[name] = dict(zip(map(str, QUANTILES), qs, strict=True))
    latent = (kind == LATENT) & np.isfinite(score)
    order = np.flatnonzero(latent)[np.argsort(score[latent])]

    def pair(b: int) -> dict:
        return {
            "latent": int(ablations.latent[b]),
            "window": int(ablations.windows[b]),
            "t": int(ablations.starts[b]),
            "activation": float(ablations.activation[b]),
            "sparsity": float(score[b]),
        }

    counts = {
        "positions": ablations.n_positions - ablations.n_empty,
        "positions_without_active_latents": ablations.n_empty,
        **{f"{name}_ablations": int((kind == code).sum()) for code, name in enumerate(KINDS)},
        "ablations_without_effect": int((~np.isfinite(score)).sum()),
        "distinct_latents": int(np.unique(ablations.latent.cpu().numpy()[kind == LATENT]).size),
        "vocab_size": context.model.vocab_size,
    }
    details = {
        "quantiles": quantiles,
        "sparsest": [pair(b) for b in order[:10]],
        "densest": [pair(b) for b in order[::-1][:10]],
        "definition": {
            "positions": "scored positions 1..ctx - n_future of the evaluation windows, drawn with the seed",
            "ablation": "x_t - (decode(codes) - decode(codes with z_j = 0)) at t only; SAE error stays in",
            "score": "(||u||_1 / ||u||_2)^2 / (T V), u = logit differences at t..t+T-1, each row minus its "
            "(lower) median",
            "random": "x_t - ||c_j|| g / ||g||, g ~ N(0, I)",
            "residual": "x_t - sign(x_t,i) ||c_j|| e_i, channel i uniform",
            "matched": "each control takes the norm of a latent ablation at its position drawn uniformly",
        },
    }
    return MetricResult(values=values, counts=counts, details=details)


register(
    Metric(
        name="ablation",
        version=1,
        description="sparsity of the logit effects of ablating single latents, beside random and "
        "residual-channel controls (ablation_sparsity)",
        compute=compute,
        params=AblationParams,
        headline=("ablation_sparsity", "ablation_sparsity_random", "ablation_sparsity_residual"),
        lower_is_better=frozenset({"ablation_sparsity"}),
    )
)
