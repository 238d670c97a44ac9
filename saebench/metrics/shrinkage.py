"""shrinkage: does the encoder under-estimate activations? (METRICS.md; the issue's definition)

On the scored tokens of the first ceil(n_tokens / (ctx - 1)) evaluation windows (whole windows, so the
refined reconstruction can be spliced into the model), keep each token's active set S (the non-zero codes)
and refine the values in SAE space, u = normalize(x), with W_S the active decoder rows (|S| x d):

    z*  = argmin_{z >= 0}  1/2 ||u - b_dec - W_S^T z||^2        G = W_S W_S^T,  c = W_S (u - b_dec)

by projected accelerated gradient descent (FISTA, gradient G z - c, step 1/L with L = lambda_max(G) per
token, momentum restarted whenever it points uphill, O'Donoghue & Candes 2015), in float64, from the
encoder's values.  A token has converged when its projected gradient (the gradient, with the components
that point out of z_i >= 0 at z_i = 0 dropped) has norm <= tol ||c||; a token that has not after max_iter
iterations keeps its last iterate, is counted (`unconverged_frac`) and makes a warning.  Then

    activation_scale = sum ||z*||_1 / sum ||z||_1        above 1: the encoder shrinks its activations
    nmse, nmse_refined = sum ||u - u_hat||^2 / sum ||u - mean(u)||^2, with the encoder's / refined codes
    nmse_gain        = nmse - nmse_refined
    delta_ce, delta_ce_refined   the encoder's / refined raw reconstruction spliced in as downstream does
                     (`downstream.spliced_ce_kl`, against its cached clean pass), on the same windows; the
                     encoder's pass is downstream's own (`reconstruction_ce_kl`), run once per SAE
    moved_frac       share of tokens with ||z* - z||_2 > moved_threshold ||z||_2

Intervals resample windows.  Tokens are refined all at once on padded active sets ((tokens, m, m) Gram
matrices), `chunk_tokens` at a time in order of their active count, each chunk padded to its own widest set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from saebench.context import EvalContext
from saebench.metrics.core import _SumOfSquaresAroundMean
from saebench.metrics.downstream import reconstruction_ce_kl, reference, spliced_ce_kl
from saebench.metrics.registry import Metric, MetricResult, register
from saebench.metrics.stats import ratio_estimate
from saebench.sae.sae import SAE, SparseCodes


@dataclass
class ShrinkageParams:
    #: evaluation tokens refined: the scored positions of the first ceil(n_tokens / (ctx - 1)) windows
    n_tokens: int = 4096
    #: iterations of projected accelerated gradient descent at most, per token
    max_iter: int = 200
    #: converged when the projected gradient's norm is <= tol times the gradient's norm at z = 0
    tol: float = 1e-6
    #: a token's codes moved when ||z_refined - z||_2 > moved_threshold ||z||_2
    moved_threshold: float = 0.01
    #: splice the reconstructions into the model for delta_ce and delta_ce_refined
    delta_ce: bool = True
    #: tokens refined together (their active decoder rows are chunk x m x d float64)
    chunk_tokens: int = 512

    def __post_init__(self):
        for name in ("n_tokens", "max_iter", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"shrinkage: {name} must be >= 1, got {getattr(self, name)}")
        if not self.tol > 0:
            raise ValueError(f"shrinkage: tol must be positive, got {self.tol}")
        if not self.moved_threshold >= 0:
            raise ValueError(f"shrinkage: moved_threshold must be >= 0, got {self.moved_threshold}")


class Refined(NamedTuple):
    """Refined codes of N tokens on their active sets (the input codes' slots), float64."""

    #: (N, m) refined values, >= 0, zero where the input code was zero
    values: torch.Tensor
    #: (N,) iterations used (0: the input was already optimal)
    iterations: torch.Tensor
    #: (N,) final projected-gradient norm relative to ||c|| (the gradient's norm at z = 0)
    grad_norm: torch.Tensor
    #: (N,) whether grad_norm <= tol
    converged: torch.Tensor
    #: (N,) squared SAE-space error before and after, ||u - b_dec - W_S^T z||^2
    err_before: torch.Tensor
    err_after: torch.Tensor


#: Gram matrices (float64 bytes) refined together at most: 8 KB a token at 32 active latents
GRAM_BYTES = 1 << 28


def _bmv(G: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.bmm(G, z[..., None])[..., 0]


def _projected(grad: torch.Tensor, z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The gradient less the components that push z_i = 0 below zero (the KKT residual of z >= 0)."""
    return torch.where(z > 0, grad, grad.clamp_max(0)) * support


def gram_system(
    W_dec: torch.Tensor, b_dec: torch.Tensor, u: torch.Tensor, codes: SparseCodes
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G = W_S W_S^T (N, m, m), c = W_S (u - b_dec) (N, m) and ||u - b_dec||^2 (N,) in float64.

    Slots whose code is zero (padding, inactive) get zero rows: they stay at zero.
    """
    rows = W_dec.double()[codes.indices]  # a no-op conversion when the caller passes float64 rows
    r = u.double() - b_dec.double()
    active = (codes.values != 0).double()
    G = torch.bmm(rows, rows.transpose(1, 2)).mul_(active[:, :, None] * active[:, None, :])
    return G, _bmv(rows, r).mul_(active), r.square().sum(-1)


def refine(
    G: torch.Tensor,
    c: torch.Tensor,
    r2: torch.Tensor,
    z0: torch.Tensor,
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> Refined:
    """min_{z >= 0} 1/2 z^T G z - c^T z per token (FISTA with restarts, step 1/lambda_max(G)) from z0.

    G (N, m, m), c (N, m), r2 = ||u - b_dec||^2 (N,), z0 (N, m) >= 0 zero off the support.  The support is
    where z0 is non-zero; z stays zero elsewhere.  Converged tokens stop updating.

    On CPU this runs on one thread: the iterations are a few hundred small tensor operations, and on a
    shared machine each parallel region waits milliseconds for its second thread (40x slower here).
    """
    if G.device.type != "cpu":
        return _refine(G, c, r2, z0, max_iter=max_iter, tol=tol)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _refine(G, c, r2, z0, max_iter=max_iter, tol=tol)
    finally:
        torch.set_num_threads(threads)


def _refine(
    G: torch.Tensor, c: torch.Tensor, r2: torch.Tensor, z0: torch.Tensor, *, max_iter: int, tol: float
) -> Refined:
    support = (z0 != 0).double()
    z0 = z0.double() * support
    L = torch.linalg.eigvalsh(G)[:, -1].clamp_min(1e-300)[:, None]
    scale = c.norm(dim=-1).clamp_min(1e-300)
    Gz = _bmv(G, z0)
    grad_norm = _projected(Gz - c, z0, support).norm(dim=-1) / scale
    z, y, Gy = z0.clone(), z0.clone(), Gz.clone()
    # momentum t_0 = 1, t_(k+1) = (1 + sqrt(1 + 4 t_k^2)) / 2 is every token's sequence up to its restarts:
    # a table indexed by each token's steps since its last restart (no sqrt kernel per step)
    table = [1.0]
    for _ in range(max_iter):
        table.append((1 + math.sqrt(1 + 4 * (table[-1] * table[-1]))) / 2)
    t_of = torch.tensor(table, dtype=torch.float64, device=z0.device)
    k = torch.zeros(len(z0), dtype=torch.long, device=z0.device)
    iterations = torch.full((len(z0),), max_iter, dtype=torch.long, device=z0.device)
    iterations[grad_norm <= tol] = 0
    work, it = torch.nonzero(grad_norm > tol)[:, 0], 0
    while len(work) and it < max_iter:
        # the working tokens' state, stepped until the next compaction (every 8 iterations)
        Gw, cw, sw, Lw, scale_w = G[work], c[work], support[work], L[work], scale[work]
        zw, yw, Gyw, Gzw, kw = z[work], y[work], Gy[work], Gz[work], k[work]
        live = torch.ones(len(work), dtype=torch.bool, device=z0.device)
        for _ in range(min(8, max_iter - it)):
            it += 1
            new = (yw - (Gyw - cw) / Lw).clamp_min(0) * sw
            Gnew = _bmv(Gw, new)
            restart = ((yw - new) * (new - zw)).sum(-1) > 0
            k_next = torch.where(restart, 0, kw + 1)
            beta = torch.where(restart, 0.0, (t_of[kw] - 1) / t_of[k_next])[:, None]
            keep = live[:, None]  # a token that has converged keeps its iterate
            yw = torch.where(keep, new + beta * (new - zw), yw)
            Gyw = torch.where(keep, Gnew + beta * (Gnew - Gzw), Gyw)
            zw, Gzw = torch.where(keep, new, zw), torch.where(keep, Gnew, Gzw)
            kw = torch.where(live, k_next, kw)
            g = _projected(Gzw - cw, zw, sw).norm(dim=-1) / scale_w
            fresh = live & (g <= tol)
            iterations[work[fresh]] = it
            live &= ~fresh
            grad_norm[work] = g
        z[work], y[work], Gy[work], Gz[work], k[work] = zw, yw, Gyw, Gzw, kw
        work = work[live]
    done = grad_norm <= tol
    zG0 = (z0 * _bmv(G, z0)).sum(-1)
    err_before = (r2 - 2 * (c * z0).sum(-1) + zG0).clamp_min(0)
    err_after = (r2 - 2 * (c * z).sum(-1) + (z * Gz).sum(-1)).clamp_min(0)
    return Refined(z, iterations, grad_norm, done, err_before, err_after)


def refine_codes(
    sae: SAE, u: torch.Tensor, codes: SparseCodes, *, max_iter: int = 200, tol: float = 1e-6, chunk: int = 512
) -> Refined:
    """`refine` on the SAE's decoder for SAE-space inputs u (N, d) and their codes; values in codes' slots.

    Tokens are taken in order of their active count and refined in groups, each padded only to its own
    widest active set (a few dense tokens do not make every token's Gram matrix wide) and as large as
    `GRAM_BYTES` of Gram matrices allow (at least `chunk` tokens): a TopK SAE's 4,096 tokens are one group,
    so the iterations' small tensor operations run once, not once per chunk.  The active decoder rows are
    gathered `chunk` tokens at a time (chunk x m x d float64).
    """
    n, m = codes.values.shape
    values, slot = codes.values.detach().sort(dim=-1, descending=True)  # active slots first
    indices = codes.indices.gather(1, slot)
    l0 = (values != 0).sum(-1)
    order = torch.argsort(l0, stable=True)
    widths = l0[order].clamp_min(1).tolist()
    W_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach()
    out = torch.zeros(n, m, dtype=torch.float64, device=u.device)
    parts, lo = [], 0
    while lo < n:
        hi = lo + min(chunk, n - lo)
        while hi < n and (hi + 1 - lo) * widths[hi] ** 2 * 8 <= GRAM_BYTES:
            hi += 1
        rows, width = order[lo:hi], widths[hi - 1]
        systems = [
            gram_system(W_dec, b_dec, u[r], SparseCodes(indices[r, :width], values[r, :width]))
            for r in rows.split(chunk)
        ]
        G, c, r2 = (torch.cat(part) for part in zip(*systems, strict=True))
        parts.append(refine(G, c, r2, values[rows, :width], max_iter=max_iter, tol=tol))
        out[rows[:, None], slot[rows, :width]] = parts[-1].values
        lo = hi
    inverse = torch.argsort(order)
    joined = [torch.cat(field)[inverse] for field in list(zip(*parts, strict=True))[1:]]
    return Refined(out, *joined)


@torch.inference_mode()
def compute(context: EvalContext, sae: SAE, params: ShrinkageParams) -> MetricResult:
    ctx = context.config.ctx
    n_windows = min(len(context.windows), math.ceil(params.n_tokens / (ctx - 1)))
    mask = torch.from_numpy(context.mask[:n_windows]).to(context.device)
    x, rec = context.reconstructions(sae).encode(0, n_windows)  # keeps x_hat for the shared spliced pass
    d, keep = x.shape[-1], mask.reshape(-1)
    codes = rec.codes.select(keep)
    refined = refine_codes(
        sae, rec.u[keep], codes, max_iter=params.max_iter, tol=params.tol, chunk=params.chunk_tokens
    )

    # per window sums over its scored tokens
    window = torch.arange(n_windows, device=context.device).repeat_interleave(ctx - 1)[keep]

    def per_window(v: torch.Tensor) -> np.ndarray:
        out = torch.zeros(n_windows, dtype=torch.float64, device=v.device)
        return out.index_add_(0, window, v.double()).cpu().numpy()

    z0 = codes.values.double()
    l1_before, l1_after = per_window(z0.abs().sum(-1)), per_window(refined.values.abs().sum(-1))
    moved = (refined.values - z0).norm(dim=-1) > params.moved_threshold * z0.norm(dim=-1)
    spread = _SumOfSquaresAroundMean(n_windows, d)
    spread.add(0, rec.u.reshape(n_windows, ctx - 1, d), mask.double())
    spread = spread.per_window()
    err_before, err_after = per_window(refined.err_before), per_window(refined.err_after)
    tokens = per_window(torch.ones_like(refined.err_before))
    unconverged = per_window((~refined.converged).double())
    seed = context.config.seed
    values = {
        "activation_scale": ratio_estimate(l1_after, l1_before, "windows", seed),
        "nmse": ratio_estimate(err_before, spread, "windows", seed),
        "nmse_refined": ratio_estimate(err_after, spread, "windows", seed),
        "nmse_gain": ratio_estimate(err_before - err_after, spread, "windows", seed),
        "moved_frac": ratio_estimate(per_window(moved.double()), tokens, "windows", seed),
        "unconverged_frac": ratio_estimate(unconverged, tokens, "windows", seed),
    }
    if params.delta_ce:
        x_ref = x.clone().reshape(-1, d)
        x_ref[keep] = sae.decode_codes(
            SparseCodes(codes.indices, refined.values.to(sae.W_dec.dtype)), rec.state.select(keep)
        )
        x_ref = x_ref.reshape(x.shape)
        ce_clean = reference(context).ce_clean[:n_windows]
        positions = np.full(n_windows, ce_clean.shape[1], dtype=np.float64)
        ce_before, _ = reconstruction_ce_kl(context, sae, n_windows)  # downstream's pass, shared
        ce_after, _ = spliced_ce_kl(context, lambda a, b: x_ref[a:b], n_windows)
        values["delta_ce"] = ratio_estimate(ce_before - ce_clean.sum(1), positions, "windows", seed)
        values["delta_ce_refined"] = ratio_estimate(ce_after - ce_clean.sum(1), positions, "windows", seed)

    n_unconverged = int((~refined.converged).sum())
    if n_unconverged:
        warnings.warn(
            f"shrinkage: {n_unconverged} of {len(refined.converged)} tokens did not converge in "
            f"{params.max_iter} iterations (tol {params.tol:g}); they keep their last iterate and are "
            "counted in unconverged_frac",
            stacklevel=2,
        )
    iters = refined.iterations.double().cpu().numpy()
    grad = refined.grad_norm.cpu().numpy()
    counts = {
        "tokens": int(keep.sum()),
        "windows": n_windows,
        "unconverged_tokens": n_unconverged,
        "moved_tokens": int(moved.sum()),
        "tokens_without_active_latents": int((codes.values == 0).all(-1).sum()),
    }
    details = {
        "iterations": {
            "mean": float(iters.mean()),
            "median": float(np.median(iters)),
            "p95": float(np.quantile(iters, 0.95)),
            "max": int(iters.max()),
        },
        "final_projected_grad_norm": {
            "median": float(np.median(grad)),
            "p95": float(np.quantile(grad, 0.95)),
            "max": float(grad.max()),
            "relative_to": "||W_S (u - b_dec)||, the gradient's norm at z = 0",
        },
        "unconverged": "kept at the last iterate, counted in unconverged_frac and warned about",
        "tokens": "scored positions of the first ceil(n_tokens / (ctx - 1)) evaluation windows",
        "moved": "||z_refined - z||_2 > moved_threshold ||z||_2",
    }
    return MetricResult(values=values, counts=counts, details=details)


register(
    Metric(
        name="shrinkage",
        version=1,
        description="activation shrinkage: codes refined on their active sets by projected FISTA "
        "(activation_scale, nmse_gain, delta_ce_refined)",
        compute=compute,
        params=ShrinkageParams,
        headline=("activation_scale", "nmse_gain", "nmse_refined", "delta_ce_refined", "delta_ce"),
        lower_is_better=frozenset({"nmse_refined", "delta_ce_refined", "delta_ce", "nmse"}),
    )
)
