"""n2g: how well short token patterns explain latents (Neuron-to-Graph, the improved variant of Gao et al.).

Pools: build windows = the corpus's `train` split, windows `build_start..` (by default the first ones, which
the trainer's stream also reads: the build only needs text the score never sees), and score windows = the
`eval` split's windows after the evaluation set (`start = n_windows` of the context), so they are disjoint
from core's.  Both pools' residuals are cached like the evaluation set's.

Latents: `n_latents` drawn with the seed among those active on at least `min_build` scored build tokens and
`min_score` scored held-out tokens.  Per latent, records = its `n_top` top-activating build tokens and
`n_random` random other active ones.  Per record ending at token t with activation a (contexts are the
window's tokens 1..t; every re-run is BOS + tokens, run to the site only, batched over all records of all
latents and the random baseline's directions):

  1. minimal suffix: the shortest L <= L_max = min(t, max_suffix) with act(BOS + last L tokens) >= 0.5 a,
     else L_max (a record capped at max_suffix < t that still falls short is counted in `records_capped`).
     `search = "bracket"`: lengths 1, 2, 4, ... until one passes, then bisection between the last failing
     and the first passing length, so the result L is tested passing and L - 1 tested failing (activation
     is close to monotone in L).  `search = "exhaustive"` runs every length.  L_max is not tested: it is
     the answer when nothing shorter passes.  A capped record is never anchored (its suffix was cut).
  2. anchor: act(BOS + filler + suffix) < 0.5 a marks the pattern `^` (it starts a context).
  3. saliency_i = 1 - act(suffix with token i := filler) / act(suffix); tokens below 0.5 become `*`;
     leading `*` of a free pattern are dropped.
  4. the pattern goes into the latent's trie with value a (a leaf keeps the largest).

Predict and score (held-out scored tokens; a_max = the largest record activation of the latent):
fires = act >= 0.5 a_max, predicted = prediction >= 0.5 a_max; precision = |fires & predicted| / |predicted|
(0 when nothing is predicted), recall = |fires & predicted| / |fires|, f1 = 2pr / (p + r) (0 when p = r = 0).
Means over latents that fire at least once held out, bootstrap over latents.

Baselines: `token` (prediction = the latent's mean activation on the current token id over scored build
tokens) and `random` (r = min(n_random_directions, m) random unit directions r_i in SAE space,
act = relu(u . r_i - tau_i) with tau_i set so that it fires on the same share of scored build tokens as
sampled latent i; the same build and score).

Cost: every re-run goes to the site only, all records of all latents and directions batched together by
length (padding near `MAX_PADDING`).  The saliency variants of a suffix differ from it from the replaced
token on, so with `reuse_keys` the suffixes of one length run once keeping their keys (`token_cache`) and
the variant replacing token k runs positions k + 1.. only: L (L + 1) / 2 tokens for a suffix of length L
instead of L (L + 1), still quadratic, hence the cap.

Explanation reconstruction (sampled latents): s_j = c_j * prediction_j with c_j = sum(p a) / sum(p^2) over
scored build tokens.  With C = x_hat - x_hat(sampled latents zeroed) and C_s = x_hat(simulations) - the same:
expl_fvu = sum ||C - C_s||^2 / sum ||C - mean C||^2 over scored held-out tokens, and
expl_kl_recovered = 1 - sum KL(p(x_hat) || p(x_hat with simulations)) / sum KL(p(x_hat) || p(zeroed)), summed
over held-out positions where a sampled latent is active or predicted active (x_hat spliced in at every
scored position, as downstream does), on the first `n_kl_windows` score windows.  The token baseline's
simulation is scored the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from saebench.context import EvalContext
from saebench.metrics.n2g_patterns import WILDCARD, Pattern, Trie, predict
from saebench.metrics.registry import Estimate, Metric, MetricResult, Plot, register
from saebench.metrics.stats import mean_estimate, ratio_estimate
from saebench.model.batched import run_from_site, site_residuals, token_cache, token_deltas
from saebench.model.scoring import CHUNK
from saebench.sae.sae import SAE, SparseCodes

SEARCHES = ("bracket", "exhaustive")
#: re-runs are batched by length so that padding stays near this share of their tokens
MAX_PADDING = 0.125


@dataclass
class N2GParams:
    #: latents explained (drawn with the seed among those that qualify)
    n_latents: int = 64
    #: top-activating records per latent
    n_top: int = 10
    #: random other active records per latent
    n_random: int = 10
    #: scored build tokens (train split) the records come from
    n_build_tokens: int = 32768
    #: scored held-out tokens (eval split, after the evaluation set) the explanations are scored on
    n_score_tokens: int = 32768
    #: first train-split window of the build pool
    build_start: int = 0
    #: a latent qualifies with at least this many active build tokens ...
    min_build: int = 20
    #: ... and at least this many active held-out tokens
    min_score: int = 5
    #: minimal-suffix search: "bracket" (doubling, then bisection) or "exhaustive" (every length)
    search: str = "bracket"
    #: longest suffix searched: a record whose activation needs more context keeps its last max_suffix
    #: tokens (counted as `records_capped`); re-run cost grows as the square of the suffix length
    max_suffix: int = 16
    #: random directions of the `random` baseline, thresholded to the first sampled latents' firing rates
    n_random_directions: int = 16
    #: saliency variants rerun only the positions from the replaced token on, on the cached keys of the
    #: suffix's earlier positions (equal to full reruns up to float rounding); False: full reruns
    reuse_keys: bool = True
    #: text of the one token put before a suffix (anchoring) and in place of a token (saliency)
    filler: str = ","
    #: fraction of a record's activation the minimal suffix and the anchor test must keep
    keep: float = 0.5
    #: tokens of lower saliency become the wildcard `*`
    saliency: float = 0.5
    #: score windows whose spliced runs give expl_kl_recovered (from the first)
    n_kl_windows: int = 32
    #: windows per spliced run
    kl_batch: int = 8

    def __post_init__(self):
        for name in (
            "n_latents",
            "n_build_tokens",
            "n_score_tokens",
            "n_kl_windows",
            "kl_batch",
            "max_suffix",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"n2g: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_top", "n_random", "build_start", "min_build", "min_score", "n_random_directions"):
            if getattr(self, name) < 0:
                raise ValueError(f"n2g: {name} must be >= 0, got {getattr(self, name)}")
        if self.n_top + self.n_random < 1:
            raise ValueError("n2g: n_top + n_random must be at least 1")
        if self.search not in SEARCHES:
            raise ValueError(f"n2g: search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        for name in ("keep", "saliency"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"n2g: {name} is a fraction in (0, 1), got {getattr(self, name)}")


# --- features: sampled latents and random directions, as functions of raw residual rows ---------------------


class Features:
    """Columns 0..m-1: the SAE's sampled latents; m..m+r-1: random directions (relu(u . r - tau))."""

    def __init__(self, sae: SAE, latents: np.ndarray, directions: torch.Tensor, thresholds: torch.Tensor):
        self.sae, self.latents = sae, torch.as_tensor(latents, dtype=torch.long)
        self.directions, self.thresholds = directions, thresholds
        self.m = len(latents)

    def rows(self, x: torch.Tensor, which: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Activation of feature which[r] at raw residual row x[r]: (R,) float64."""
        sae, out = self.sae, torch.zeros(len(x), dtype=torch.float64)
        x = x.to(sae.W_enc.device, sae.W_enc.dtype)
        which = which.to(torch.long)
        scratch = sae.scratch(min(chunk, max(len(x), 1)))
        with torch.inference_mode():
            for lo in range(0, len(x), chunk):
                xs, ws = x[lo : lo + chunk], which[lo : lo + chunk]
                is_latent = ws < self.m
                if is_latent.any():
                    rows = torch.nonzero(is_latent).squeeze(1)
                    codes = sae.encode_codes(xs[rows], scratch).codes
                    target = self.latents.to(codes.indices.device)[ws[rows]]
                    hit = codes.indices == target[:, None]
                    out[lo + rows] = (codes.values * hit).sum(1).double().cpu()
                if (~is_latent).any():
                    rows = torch.nonzero(~is_latent).squeeze(1)
                    u, _ = sae.normalization.apply(xs[rows])
                    k = ws[rows] - self.m
                    proj = (u.double() * self.directions[k].to(u.device).double()).sum(1)
                    out[lo + rows] = torch.relu(proj - self.thresholds[k].to(u.device)).cpu()
        return out


class Pool(NamedTuple):
    """One pool of windows at the site and the SAE on it."""

    windows: np.ndarray
    #: (n_windows, ctx) scored positions (False at 0 and at separators)
    scored: np.ndarray
    #: codes of every position 1.. (flattened (n_windows * (ctx - 1), m)) and their input states
    codes: SparseCodes
    state: object
    #: per latent, scored active positions
    counts: np.ndarray
    resid: np.ndarray


def sae_digest(sae: SAE) -> str:
    """sha256 of everything the SAE's encoder and decoder compute with: its tensors and its settings."""
    h = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr((sae.activation, sae.k, dataclasses.asdict(sae.normalization))).encode())
    return h.hexdigest()


def _score_start(context: EvalContext) -> int:
    """First window of the score pool: the held-out split's windows right after the evaluation set."""
    return context.config.eval_start + context.config.n_windows


def _pool_windows(context: EvalContext, n_tokens: int) -> int:
    return math.ceil(n_tokens / (context.site.config.ctx - 1))


def _pools(context: EvalContext, params: N2GParams) -> tuple[tuple[str, int, int], tuple[str, int, int]]:
    """(split, tokens, first window) of the build pool and of the score pool."""
    build = ("train", params.n_build_tokens, params.build_start)
    return build, ("eval", params.n_score_tokens, _score_start(context))


def prepare(context: EvalContext, params: N2GParams) -> None:
    """The pools' residuals, the same for every SAE (`Metric.prepare`)."""
    for split, n_tokens, start in _pools(context, params):
        context.site.resid(split, _pool_windows(context, n_tokens), start)


def _pool(context: EvalContext, sae: SAE, split: str, n_tokens: int, start: int) -> Pool:
    """The pool's windows, residuals and the SAE's codes at positions 1.. of each window.

    The codes are cached beside the residuals, keyed by the SAE's digest (`sae_digest`), so that `saebench
    explain` after a run (or a second run) does not encode the pool again; the input states are recomputed
    from the residuals (no matmul)."""
    site, ctx = context.site, context.site.config.ctx
    n_windows = _pool_windows(context, n_tokens)
    windows, resid = site.windows(split, n_windows, start), site.resid(split, n_windows, start)
    scored = np.zeros(windows.shape, dtype=bool)
    scored[:, 1:] = site.scored(windows)
    store = site.store(
        f"n2g-codes-{site.split(split)}",
        {"n_windows": n_windows, "start": start, "sae": sae_digest(sae), "dtype": str(sae.W_enc.dtype)},
    )
    batch = max(1, 2048 // (ctx - 1))
    cached = store.has("indices", "values")
    parts, states = [], []
    scratch = None if cached else sae.scratch(batch * (ctx - 1))
    with torch.inference_mode():
        for lo in range(0, n_windows, batch):
            x = torch.from_numpy(np.array(resid[lo : lo + batch, 1:])).reshape(-1, resid.shape[-1])
            x = x.to(sae.W_enc.device, sae.W_enc.dtype)
            if cached:
                states.append(sae.normalization.apply(x)[1].to("cpu"))
                continue
            enc = sae.encode_codes(x, scratch)
            parts.append(SparseCodes(enc.codes.indices.cpu(), enc.codes.values.cpu()))
            states.append(enc.state.to("cpu"))
    if cached:
        codes = SparseCodes(
            torch.from_numpy(store.load("indices", mmap=False).astype(np.int64)),
            torch.from_numpy(store.load("values", mmap=False)),
        )
    else:
        codes = SparseCodes.cat(parts)
        store.save("indices", codes.indices.numpy().astype(np.int32))
        store.save("values", codes.values.numpy())
    state = type(states[0]).cat(states)
    keep = torch.from_numpy(scored[:, 1:].reshape(-1))
    active = (codes.values != 0) & keep[:, None]
    counts = torch.bincount(codes.indices[active], minlength=sae.n_latents).numpy()
    return Pool(windows, scored, codes, state, counts, resid)


def _dense(pool: Pool, latents: np.ndarray, n_latents: int) -> np.ndarray:
    """Activations (n_windows, ctx, m) float64 of the chosen latents (0 at unscored positions)."""
    col = torch.full((n_latents,), -1, dtype=torch.long)
    col[torch.as_tensor(latents)] = torch.arange(len(latents))
    c = col[pool.codes.indices]
    rows, slots = torch.nonzero((c >= 0) & (pool.codes.values != 0), as_tuple=True)
    flat = torch.zeros(pool.codes.indices.shape[0], len(latents), dtype=torch.float64)
    flat[rows, c[rows, slots]] = pool.codes.values[rows, slots].double()
    n_windows, ctx = pool.windows.shape
    out = np.zeros((n_windows, ctx, len(latents)))
    out[:, 1:] = flat.numpy().reshape(n_windows, ctx - 1, -1)
    return out * pool.scored[..., None]


def _projections(sae: SAE, pool: Pool, directions: torch.Tensor) -> np.ndarray:
    """u . r_i (n_windows, ctx, m) float64 at every position 1.. (0 at position 0)."""
    resid = pool.resid
    n_windows, ctx = pool.windows.shape
    out = np.zeros((n_windows, ctx, len(directions)))
    batch = max(1, 4096 // ctx)
    with torch.inference_mode():
        for lo in range(0, n_windows, batch):
            x = torch.from_numpy(np.array(resid[lo : lo + batch, 1:])).to(sae.W_enc.device, sae.W_enc.dtype)
            u, _ = sae.normalization.apply(x.reshape(-1, x.shape[-1]))
            proj = u.double() @ directions.to(u.device).double().T
            out[lo : lo + batch, 1:] = proj.reshape(len(x), ctx - 1, -1).cpu().numpy()
    return out


# --- records and the build ----------------------------------------------------------------------------------


class Records(NamedTuple):
    feature: np.ndarray  # (R,) column of `Features`
    window: np.ndarray
    t: np.ndarray
    act: np.ndarray


def _records(acts: np.ndarray, n_top: int, n_random: int, rng: np.random.Generator) -> Records:
    """Per column of acts (n_windows, ctx, F): the n_top largest and n_random other active positions."""
    n_windows, ctx, n_features = acts.shape
    feature, window, pos, value = [], [], [], []
    for j in range(n_features):
        a = acts[:, :, j].reshape(-1)
        active = np.flatnonzero(a > 0)
        top = active[np.argsort(-a[active], kind="stable")[:n_top]]
        rest = np.setdiff1d(active, top)
        pick = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
        chosen = np.concatenate([top, np.sort(pick)]).astype(np.int64)
        feature.append(np.full(len(chosen), j))
        window.append(chosen // ctx)
        pos.append(chosen % ctx)
        value.append(a[chosen])
    cat = np.concatenate
    return Records(cat(feature).astype(np.int64), cat(window), cat(pos), cat(value))


@dataclass
class RunLog:
    """Re-runs to the site, by phase: sequences and tokens."""

    sequences: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, phase: str, seqs: list[list[int]]) -> None:
        self.count(phase, len(seqs), sum(len(s) for s in seqs))

    def count(self, phase: str, sequences: int, tokens: int) -> None:
        self.sequences[phase] = self.sequences.get(phase, 0) + sequences
        self.tokens[phase] = self.tokens.get(phase, 0) + tokens


class ReRuns:
    """The model re-runs of the build, to the site only, and the features read off at the last tokens."""

    def __init__(self, context: EvalContext, features: Features, log: RunLog, reuse_keys: bool = True):
        self.model, self.layer, self.features, self.log = context.model, context.layer, features, log
        self.reuse_keys = reuse_keys

    def last(self, seqs: list[list[int]], which: np.ndarray, phase: str) -> np.ndarray:
        """Feature which[i] at the last token of sequence i, each sequence run on its own (batched)."""
        if not seqs:
            return np.zeros(0)
        self.log.add(phase, seqs)
        began = time.perf_counter()
        with torch.inference_mode():
            rows = site_residuals(self.model, seqs, self.layer, "last", max_padding=MAX_PADDING).values
        self.log.seconds += time.perf_counter() - began
        return self.features.rows(rows, torch.as_tensor(which)).numpy()

    def saliency(self, ids: torch.Tensor, which: np.ndarray, filler: int) -> tuple[np.ndarray, np.ndarray]:
        """For sequences ids (R, 1 + L) (BOS + suffix): the feature at the last token, (R,), and with suffix
        token k replaced by the filler, (R, L).  The sequences run once, keeping their keys; the variant
        replacing token k runs positions k + 1.. only, on the cached keys of the earlier ones."""
        n, length = ids.shape[0], ids.shape[1] - 1
        if not self.reuse_keys:
            seqs = [row.tolist() for row in ids]
            variants = [s[: k + 1] + [filler] + s[k + 2 :] for s in seqs for k in range(length)]
            base = self.last(seqs, which, "base")
            replaced = self.last(variants, np.repeat(which, length), "saliency").reshape(n, length)
            return base, replaced
        replaced = np.zeros((n, length))
        began = time.perf_counter()
        with torch.inference_mode():
            cache = token_cache(self.model, ids, self.layer)
            base = cache.final[:, -1]
            rows = torch.arange(n)
            for k in range(length):
                at = torch.full((n,), k + 1)
                deltas = token_deltas(self.model, ids[:, k + 1], torch.full((n,), filler))
                h = cache.run_edits(rows, at, deltas, n_positions=length - k, output="final")[:, -1]
                replaced[:, k] = self.features.rows(h, torch.as_tensor(which)).numpy()
        self.log.seconds += time.perf_counter() - began
        self.log.count("base", n, n * (length + 1))
        self.log.count("saliency", n * length, n * length * (length + 1) // 2)
        return self.features.rows(base, torch.as_tensor(which)).numpy(), replaced


class Built(NamedTuple):
    patterns: list[Pattern | None]  # per record (None: a free pattern of wildcards only)
    length: np.ndarray  # minimal suffix length per record
    capped: np.ndarray  # records whose last max_suffix tokens keep less than `keep` of the activation


def build(
    records: Records, windows: np.ndarray, bos: int, filler: int, reruns: ReRuns, params: N2GParams
) -> Built:
    """Steps 1-3 for every record at once: one batched run per search round, one for the anchors, and per
    suffix length one run of the suffixes whose keys the saliency variants reuse."""
    act = reruns.last
    n = len(records.t)
    ctxs = [windows[w, 1 : t + 1].tolist() for w, t in zip(records.window, records.t, strict=True)]
    full = np.minimum(records.t, params.max_suffix).astype(np.int64)  # taken as passing (see `capped`)
    need = params.keep * records.act

    def suffix(i: int, length: int) -> list[int]:
        return [bos] + ctxs[i][len(ctxs[i]) - length :]

    lo = np.zeros(n, dtype=np.int64)  # longest length known to fail
    hi = full.copy()  # shortest length known to pass
    if params.search == "exhaustive":
        cases = [(i, k) for i in range(n) for k in range(1, int(full[i]))]
        got = act([suffix(i, k) for i, k in cases], records.feature[[i for i, _ in cases]], "suffix")
        for (i, k), a in zip(cases, got, strict=True):
            if a >= need[i] and k < hi[i]:
                hi[i] = k
    else:
        probe = np.ones(n, dtype=np.int64)  # doubling phase while probe < hi
        doubling = probe < hi
        while True:
            tests = []
            for i in range(n):
                if doubling[i]:
                    tests.append((i, int(probe[i])))
                elif hi[i] - lo[i] > 1:
                    tests.append((i, int((lo[i] + hi[i]) // 2)))
            if not tests:
                break
            got = act([suffix(i, k) for i, k in tests], records.feature[[i for i, _ in tests]], "suffix")
            for (i, k), a in zip(tests, got, strict=True):
                if a >= need[i]:
                    hi[i] = k
                    doubling[i] = False
                else:
                    lo[i] = k
                    if doubling[i]:
                        probe[i] = 2 * k
                        doubling[i] = probe[i] < hi[i]
    # anchors: one batched run; the suffix's own activation and its saliencies: per suffix length
    suffixes = [ctxs[i][len(ctxs[i]) - int(hi[i]) :] for i in range(n)]
    anchored_act = act([[bos, filler] + s for s in suffixes], records.feature, "anchor")
    base, replaced = np.zeros(n), [np.zeros(0)] * n
    for length in np.unique(hi):
        group = np.flatnonzero(hi == length)
        ids = torch.tensor([[bos] + suffixes[i] for i in group], dtype=torch.long)
        b, r = reruns.saliency(ids, records.feature[group], filler)
        base[group] = b
        for row, i in enumerate(group):
            replaced[i] = r[row]
    patterns: list[Pattern | None] = []
    capped = np.zeros(n, dtype=bool)
    for i in range(n):
        s = suffixes[i]
        capped[i] = hi[i] < records.t[i] and base[i] < need[i]
        anchored = bool(anchored_act[i] < need[i]) and not capped[i]  # a cut context does not start there
        salient = 1 - replaced[i] / base[i] if base[i] > 0 else np.ones(len(s))
        tokens = [tok if sal >= params.saliency else WILDCARD for tok, sal in zip(s, salient, strict=True)]
        if not anchored:
            while tokens and tokens[0] == WILDCARD:
                tokens.pop(0)
        if not anchored and not tokens:
            patterns.append(None)
        else:
            patterns.append(Pattern(tuple(int(t) for t in tokens), anchored, float(records.act[i])))
    return Built(patterns, hi, capped)


def fewest_runs(lengths: np.ndarray, reuse_keys: bool = True) -> tuple[int, int]:
    """Sequences and tokens any search needs given the answers: L* and L*-1 tested, the anchor, and the L*
    saliency variants (on the cached keys of the suffix's earlier positions with `reuse_keys`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    seqs = (lengths > 1) + 1 + 1 + lengths
    saliency = lengths * (lengths + 1) // 2 if reuse_keys else lengths * (lengths + 1)
    tokens = (lengths + 1) + np.where(lengths > 1, lengths, 0) + (lengths + 2) + saliency
    return int(seqs.sum()), int(tokens.sum())


# --- scoring ------------------------------------------------------------------------------------------------


class Scores(NamedTuple):
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    #: fires at least once held out
    scored: np.ndarray
    fires: np.ndarray
    predicted: np.ndarray
    hits: np.ndarray


def score(acts: np.ndarray, preds: np.ndarray, a_max: np.ndarray, mask: np.ndarray) -> Scores:
    """Precision, recall and f1 per column of acts/preds (..., F) over positions where mask (...) holds."""
    threshold = 0.5 * np.asarray(a_max, dtype=np.float64)
    keep = mask[..., None]
    fires = (acts >= threshold) & keep
    predicted = (preds >= threshold) & keep
    axes = tuple(range(acts.ndim - 1))
    hits = (fires & predicted).sum(axes)
    n_fire, n_pred = fires.sum(axes), predicted.sum(axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, hits / np.maximum(n_pred, 1), 0.0)
        recall = np.where(n_fire > 0, hits / np.maximum(n_fire, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return Scores(precision, recall, f1, n_fire > 0, n_fire, n_pred, hits)


def token_means(windows: np.ndarray, acts: np.ndarray, mask: np.ndarray, vocab: int) -> np.ndarray:
    """(vocab, F): mean activation of each column on each token id over the masked positions."""
    ids = windows[mask]
    count = np.bincount(ids, minlength=vocab).astype(np.float64)
    sums = np.stack(
        [np.bincount(ids, weights=acts[..., j][mask], minlength=vocab) for j in range(acts.shape[-1])], 1
    )
    return sums / np.maximum(count, 1)[:, None]


def simulation_scale(preds: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """c per column = sum(p a) / sum(p^2) (0 where p is 0 everywhere), over the leading axes."""
    axes = tuple(range(acts.ndim - 1))
    num, den = (preds * acts).sum(axes), (preds * preds).sum(axes)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


# --- explanation reconstruction -----------------------------------------------------------------------------


def _edited_codes(codes: SparseCodes, latents: torch.Tensor, values: torch.Tensor | None) -> SparseCodes:
    """Codes with the chosen latents' entries zeroed, and `values` (tokens, m) for them appended (if any)."""
    hit = torch.isin(codes.indices, latents.to(codes.indices.device))
    kept = codes.values.masked_fill(hit, 0)
    if values is None:
        return SparseCodes(codes.indices, kept)
    extra = latents.to(codes.indices.device).expand(len(codes.indices), -1)
    return SparseCodes(torch.cat([codes.indices, extra], 1), torch.cat([kept, values.to(kept.dtype)], 1))


def reconstruction(
    context: EvalContext,
    sae: SAE,
    pool: Pool,
    latents: np.ndarray,
    simulations: dict[str, np.ndarray],
    interesting: dict[str, np.ndarray],
    params: N2GParams,
) -> dict[str, dict[str, np.ndarray]]:
    """Per simulation (n_windows, ctx, m): per-window FVU sums and KL sums (see the module docstring)."""
    model, layer, device = context.model, context.layer, context.device
    n_windows, ctx = pool.windows.shape
    d = pool.resid.shape[-1]
    lat = torch.as_tensor(latents, dtype=torch.long)
    per = ctx - 1
    out = {
        name: {"err": np.zeros(n_windows), "kl": np.zeros(n_windows), "kl_zero": np.zeros(n_windows)}
        for name in simulations
    }
    spread_sq, spread_vec, spread_n = np.zeros(n_windows), np.zeros((n_windows, d)), np.zeros(n_windows)
    n_kl = min(params.n_kl_windows, n_windows)
    for lo in range(0, n_windows, params.kl_batch):
        hi = min(lo + params.kl_batch, n_windows)
        rows = slice(lo * per, hi * per)
        codes, state = pool.codes.select(rows), pool.state.select(rows)
        codes = SparseCodes(codes.indices.to(device), codes.values.to(device))
        state = state.to(device)
        keep = torch.from_numpy(pool.scored[lo:hi, 1:]).to(device)
        with torch.inference_mode():
            x_hat = sae.decode_codes(codes, state).double()
            x_zero = sae.decode_codes(_edited_codes(codes, lat, None), state).double()
            contrib = (x_hat - x_zero).reshape(hi - lo, per, d) * keep[..., None]
            spread_sq[lo:hi] = contrib.pow(2).sum((1, 2)).cpu().numpy()
            spread_vec[lo:hi] = contrib.sum(1).cpu().numpy()
            spread_n[lo:hi] = keep.sum(1).cpu().numpy()
            h = where = None
            if lo < n_kl:
                h = torch.from_numpy(np.array(pool.resid[lo:hi])).to(device, model.dtype)
                where = {
                    name: torch.from_numpy(interesting[name][lo:hi, 1:]).to(device) & keep
                    for name in simulations
                }
                either = torch.stack(list(where.values())).any(0)
                clean = _final(model, layer, h, x_hat, keep)[either]
                zero = _final(model, layer, h, x_zero, keep)[either]
            for name, sim in simulations.items():
                values = torch.from_numpy(sim[lo:hi, 1:].reshape(-1, len(latents))).to(device)
                x_sim = sae.decode_codes(_edited_codes(codes, lat, values), state).double()
                err = ((x_hat - x_sim).reshape(hi - lo, per, d).pow(2).sum(-1) * keep).sum(1)
                out[name]["err"][lo:hi] = err.cpu().numpy()
                if h is not None:
                    window = torch.nonzero(either)[:, 0]
                    sim_final = _final(model, layer, h, x_sim, keep)[either]
                    kl, kl_zero = _kl_sums(
                        model, clean, (sim_final, zero), where[name][either], window, hi - lo
                    )
                    out[name]["kl"][lo:hi], out[name]["kl_zero"][lo:hi] = kl, kl_zero
    mu = spread_vec.sum(0) / max(spread_n.sum(), 1)
    spread = spread_sq - 2 * spread_vec @ mu + spread_n * (mu @ mu)
    for name in out:
        out[name]["spread"] = spread
        out[name]["n_kl"] = np.array([n_kl])
    return out


def _final(model, layer: int, h: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Final hidden (b, ctx - 1, d) at positions 1.. of windows h (b, ctx, d), x (b * (ctx-1), d) spliced in
    where keep."""
    b, ctx, d = h.shape
    spliced = h.clone()
    spliced[:, 1:][keep] = x.reshape(b, ctx - 1, d).to(h.dtype)[keep]
    return run_from_site(model, h, layer, replacement=spliced, positions=slice(1, None), output="final")


def _kl_sums(
    model, p_final: torch.Tensor, q_finals: tuple[torch.Tensor, ...], where: torch.Tensor, window, n: int
) -> list[np.ndarray]:
    """Per q: per window (n,), the sum of KL(p || q) over the rows (final hidden states) where `where`;
    row i belongs to window[i].  The head runs only on the rows summed, `CHUNK` rows at a time."""
    sums = [torch.zeros(n, dtype=torch.float64) for _ in q_finals]
    rows = torch.nonzero(where)[:, 0]
    for lo in range(0, len(rows), CHUNK):
        r = rows[lo : lo + CHUNK]
        p_log = torch.log_softmax(model.logits(p_final[r]).double(), -1)
        p = p_log.exp()
        for total, q_final in zip(sums, q_finals, strict=True):
            q_log = torch.log_softmax(model.logits(q_final[r]).double(), -1)
            total.index_add_(0, window[r].cpu(), (p * (p_log - q_log)).sum(-1).cpu())
    return [t.numpy() for t in sums]


# --- the metric ---------------------------------------------------------------------------------------------


def _filler_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"n2g: filler {text!r} must be one token, the tokenizer gives {ids}")
    return int(ids[0])


def _decoder(tokenizer) -> Callable[[int], str]:
    return lambda t: tokenizer.decode([int(t)])


def _explain(builds: Built, features: np.ndarray, n: int) -> list[Trie]:
    tries = [Trie() for _ in range(n)]
    for j, p in zip(features, builds.patterns, strict=True):
        if p is not None:
            tries[int(j)].insert(p)
    return tries


def _one_minus(est: Estimate) -> Estimate:
    lo = None if est.hi is None else 1 - est.hi
    hi = None if est.lo is None else 1 - est.lo
    return Estimate(1 - est.value, lo, hi, est.n, est.unit)


class Explained(NamedTuple):
    """Records, patterns and predictions of every column of `Features`."""

    records: Records
    built: Built
    tries: list[Trie]
    #: (n_windows, ctx, columns) predictions on the score pool, and on the build pool for the first m columns
    pred_score: np.ndarray
    pred_build: np.ndarray
    #: (columns,) the largest record activation
    a_max: np.ndarray
    log: RunLog


def _explain_columns(
    context: EvalContext,
    features: Features,
    build_pool: Pool,
    score_pool: Pool,
    build_acts: np.ndarray,
    params: N2GParams,
    rng: np.random.Generator,
    timing: dict,
) -> Explained:
    """Records from the build pool, the batched re-runs and the tries, and both pools' predictions."""
    model = context.model
    columns = build_acts.shape[-1]
    records = _records(build_acts, params.n_top, params.n_random, rng)
    log = RunLog()
    t0 = time.perf_counter()
    filler = _filler_id(model.tokenizer, params.filler)
    reruns = ReRuns(context, features, log, params.reuse_keys)
    built = build(records, build_pool.windows, model.bos_id, filler, reruns, params)
    timing["model"] = log.seconds
    timing["build_other"] = time.perf_counter() - t0 - log.seconds

    t0 = time.perf_counter()
    tries = _explain(built, records.feature, columns)
    starts = [model.bos_id, model.eos_id]
    pred_score = predict(tries, score_pool.windows, starts)
    pred_build = predict(tries[: features.m], build_pool.windows, starts)
    timing["trie"] = time.perf_counter() - t0
    a_max = np.zeros(columns)
    np.maximum.at(a_max, records.feature, records.act)
    return Explained(records, built, tries, pred_score, pred_build, a_max, log)


def _latent_rows(latents: np.ndarray, ex: Explained, scores: Scores, token: Scores, decode) -> list[dict]:
    """Per sampled latent: its explanation as text and its held-out scores, beside the token lookup's."""
    rows = []
    for i, j in enumerate(np.asarray(latents).tolist()):
        pats = sorted(ex.tries[i].patterns(), key=lambda p: -p.value)
        rows.append(
            {
                "latent": int(j),
                "explanation": " | ".join(p.text(decode) for p in pats),
                "n_patterns": len(pats),
                "a_max": float(ex.a_max[i]),
                "precision": float(scores.precision[i]),
                "recall": float(scores.recall[i]),
                "f1": float(scores.f1[i]),
                "scored": bool(scores.scored[i]),
                "precision_token": float(token.precision[i]),
                "recall_token": float(token.recall[i]),
            }
        )
    return rows


def explain_latents(context: EvalContext, sae: SAE, latents, params: N2GParams | None = None) -> list[dict]:
    """N2G explanations of the chosen latents only (no random directions, no reconstruction): per latent
    the row `compute` reports in details["latents"] (its records' random draws differ from the metric's),
    plus `active_score` of `score_tokens`: where it is active on the held-out pool."""
    params = params or N2GParams()
    latents = np.asarray(sorted(set(int(j) for j in latents)), dtype=np.int64)
    if len(latents) and (latents.min() < 0 or latents.max() >= sae.n_latents):
        raise ValueError(f"latents must lie in 0..{sae.n_latents - 1}, got {latents.tolist()}")
    rng = np.random.default_rng(context.config.seed)
    build_pool, score_pool = (_pool(context, sae, *pool) for pool in _pools(context, params))
    build_acts = _dense(build_pool, latents, sae.n_latents)
    score_acts = _dense(score_pool, latents, sae.n_latents)
    empty = torch.zeros(0, sae.d_in, dtype=torch.float64)
    features = Features(sae, latents, empty, torch.zeros(0, dtype=torch.float64))
    ex = _explain_columns(context, features, build_pool, score_pool, build_acts, params, rng, {})
    scores = score(score_acts, ex.pred_score, ex.a_max, score_pool.scored)
    vocab = context.model.vocab_size
    means = token_means(build_pool.windows, build_acts, build_pool.scored, vocab)
    pred_token = means[score_pool.windows] * score_pool.scored[..., None]
    token = score(score_acts, pred_token, ex.a_max, score_pool.scored)
    rows = _latent_rows(latents, ex, scores, token, _decoder(context.model.tokenizer))
    n_scored = int(score_pool.scored.sum())
    for i, row in enumerate(rows):
        row["active_score"] = int(score_pool.counts[latents[i]])
        row["score_tokens"] = n_scored
    return rows


def compute(context: EvalContext, sae: SAE, params: N2GParams) -> MetricResult:
    timing = {"encode": 0.0, "model": 0.0, "trie": 0.0, "scoring": 0.0, "reconstruction": 0.0}
    began = time.perf_counter()
    seed = context.config.seed
    rng = np.random.default_rng(seed)
    model, tokenizer = context.model, context.model.tokenizer
    build_pool, score_pool = (_pool(context, sae, *pool) for pool in _pools(context, params))
    timing["encode"] = time.perf_counter() - began

    alive = (build_pool.counts > 0) | (score_pool.counts > 0)
    qualified = np.flatnonzero(
        (build_pool.counts >= max(params.min_build, 1)) & (score_pool.counts >= params.min_score)
    )
    if len(qualified) == 0:
        raise ValueError(
            f"n2g: no latent is active on {params.min_build}+ build and {params.min_score}+ held-out tokens; "
            "enlarge n_build_tokens / n_score_tokens or lower min_build / min_score"
        )
    latents = np.sort(rng.choice(qualified, size=min(params.n_latents, len(qualified)), replace=False))
    m = len(latents)

    # random directions, thresholded to fire on the first sampled latents' shares of scored build tokens
    r = min(params.n_random_directions, m)
    g = torch.Generator().manual_seed(seed + 1)
    directions = torch.randn(r, sae.d_in, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    build_proj = _projections(sae, build_pool, directions)
    n_scored_build = int(build_pool.scored.sum())
    rate = build_pool.counts[latents] / n_scored_build
    thresholds = torch.tensor(
        [np.quantile(build_proj[..., i][build_pool.scored], 1 - rate[i]) for i in range(r)],
        dtype=torch.float64,
    )
    features = Features(sae, latents, directions, thresholds)

    def random_acts(proj: np.ndarray, pool: Pool) -> np.ndarray:
        return np.maximum(proj - thresholds.numpy(), 0) * pool.scored[..., None]

    build_acts = np.concatenate(
        [_dense(build_pool, latents, sae.n_latents), random_acts(build_proj, build_pool)], -1
    )
    del build_proj
    score_acts = np.concatenate(
        [
            _dense(score_pool, latents, sae.n_latents),
            random_acts(_projections(sae, score_pool, directions), score_pool),
        ],
        -1,
    )

    ex = _explain_columns(context, features, build_pool, score_pool, build_acts, params, rng, timing)
    records, built, tries, pred_score, pred_build, a_max, log = ex

    t0 = time.perf_counter()
    means = token_means(build_pool.windows, build_acts[..., :m], build_pool.scored, model.vocab_size)
    pred_token = means[score_pool.windows] * score_pool.scored[..., None]
    sae_scores = score(score_acts[..., :m], pred_score[..., :m], a_max[:m], score_pool.scored)
    random_scores = score(score_acts[..., m:], pred_score[..., m:], a_max[m:], score_pool.scored)
    token_scores = score(score_acts[..., :m], pred_token, a_max[:m], score_pool.scored)
    timing["scoring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    c_n2g = simulation_scale(pred_build * build_pool.scored[..., None], build_acts[..., :m])
    pred_token_build = means[build_pool.windows] * build_pool.scored[..., None]
    c_token = simulation_scale(pred_token_build, build_acts[..., :m])
    true = score_acts[..., :m]
    sims = {"n2g": c_n2g * pred_score[..., :m], "token": c_token * pred_token}
    interesting = {
        "n2g": ((true > 0) | (pred_score[..., :m] > 0)).any(-1),
        "token": ((true > 0) | (pred_token > 0)).any(-1),
    }
    recon = reconstruction(context, sae, score_pool, latents, sims, interesting, params)
    timing["reconstruction"] = time.perf_counter() - t0

    if not sae_scores.scored.any() or not random_scores.scored.any():
        raise ValueError(
            "n2g: no sampled latent (or no random direction) reaches half its largest build activation on "
            "the held-out tokens; enlarge n_score_tokens"
        )

    def mean_over(values: np.ndarray, keep: np.ndarray) -> Estimate:
        return mean_estimate(values[keep], "latents", seed)

    values: dict[str, Estimate] = {}
    for suffix, s in (("", sae_scores), ("_token", token_scores), ("_random", random_scores)):
        for name in ("precision", "recall", "f1"):
            values[f"n2g_{name}{suffix}"] = mean_over(getattr(s, name), s.scored)
    n_kl = int(recon["n2g"]["n_kl"][0])
    for name, suffix in (("n2g", ""), ("token", "_token")):
        r = recon[name]
        values[f"expl_fvu{suffix}"] = ratio_estimate(r["err"], r["spread"], "windows", seed)
        kl_ratio = ratio_estimate(r["kl"][:n_kl], r["kl_zero"][:n_kl], "windows", seed)
        values[f"expl_kl_recovered{suffix}"] = _one_minus(kl_ratio)

    per_latent = _latent_rows(latents, ex, sae_scores, token_scores, _decoder(tokenizer))
    for row, c in zip(per_latent, c_n2g, strict=True):
        row["c"] = float(c)
    fewest_seqs, fewest_tokens = fewest_runs(built.length, params.reuse_keys)
    n_patterns = [len(t.patterns()) for t in tries]
    is_latent = records.feature < m
    lengths = {
        kind: {str(q): float(np.quantile(built.length[sel], q)) for q in (0.5, 0.9, 1.0)} if sel.any() else {}
        for kind, sel in (("latents", is_latent), ("random", ~is_latent))
    }
    timing["total"] = time.perf_counter() - began
    return MetricResult(
        values=values,
        counts={
            "latents_sampled": m,
            "latents_alive": int(alive.sum()),
            "latents_qualified": len(qualified),
            "latents_scored": int(sae_scores.scored.sum()),
            "random_scored": int(random_scores.scored.sum()),
            "records": len(records.t),
            "records_capped": int(built.capped.sum()),
            "build_tokens": n_scored_build,
            "score_tokens": int(score_pool.scored.sum()),
            "kl_windows": n_kl,
            "rerun_sequences": sum(log.sequences.values()),
            "rerun_tokens": sum(log.tokens.values()),
            "fewest_sequences": fewest_seqs,
            "fewest_tokens": fewest_tokens,
        },
        details={
            "search": params.search,
            "pools": {
                "build": f"train windows {params.build_start}.."
                f"{params.build_start + len(build_pool.windows) - 1}",
                "score": f"eval windows {_score_start(context)}.."
                f"{_score_start(context) + len(score_pool.windows) - 1}",
            },
            "latents": per_latent,
            "n_patterns": n_patterns[:m],
            "n_patterns_random": n_patterns[m:],
            "reruns": {"sequences": log.sequences, "tokens": log.tokens},
            "suffix_length_quantiles": lengths,
            "seconds": timing,
        },
    )


register(
    Metric(
        name="n2g",
        version=1,
        description="how well short token patterns (N2G) explain latents: precision, recall and f1 on "
        "held-out text beside token-lookup and random-direction baselines, and explanation reconstruction",
        compute=compute,
        params=N2GParams,
        prepare=prepare,
        headline=("n2g_f1", "n2g_precision", "n2g_recall", "n2g_f1_token", "expl_kl_recovered", "expl_fvu"),
        lower_is_better=frozenset({"expl_fvu", "expl_fvu_token"}),
        plots=(Plot("n2g_f1_vs_l0.png", "n2g_f1", "N2G explanation f1 (held out)"),),
    )
)
