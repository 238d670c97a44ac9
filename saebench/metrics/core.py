"""core: reconstruction and sparsity on the evaluation tokens (METRICS.md).

Over the scored tokens of the evaluation windows (positions 1.. less BOS/EOS separators, `Site.scored`),
with u the SAE-space input and x the raw residual:

    l0         = mean_t |{j : z_tj != 0}|
    nmse       = sum_t ||u_t - u_hat_t||^2 / sum_t ||u_t - mean(u)||^2          (SAE space)
    fvu_raw    = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2          (raw space)
    dead_frac  = |{j : never active}| / n
    dense_frac = |{j : active on more than dense_threshold of the tokens}| / n
    norm_ratio = mean_t ||x_hat_t|| / ||x_t||

Sums are accumulated per window in float64; intervals resample windows (latents for the fractions).
`details["nmse_windows"]` keeps nmse's per-window numerator and denominator, so the leaderboard's fits can
resample the same windows across checkpoints (`saebench.leaderboard.fits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.context import EvalContext
from saebench.metrics.registry import Metric, MetricResult, Plot, register
from saebench.metrics.stats import mean_estimates, ratio_estimate
from saebench.sae.sae import SAE


@dataclass
class CoreParams:
    #: a latent active on more than this fraction of tokens counts as dense
    dense_threshold: float = 0.1

    def __post_init__(self):
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"core: dense_threshold is a fraction in (0, 1], got {self.dense_threshold}")


class _SumOfSquaresAroundMean:
    """Per-window sum ||v - mean||^2 where the mean is over all windows, from one streaming pass."""

    def __init__(self, n_windows: int, d: int):
        self.sq = np.zeros(n_windows)
        self.vec = np.zeros((n_windows, d))
        self.count = np.zeros(n_windows)

    def add(self, start: int, v: torch.Tensor, keep: torch.Tensor) -> None:
        """v: (b, tokens, d) for windows start.., keep: (b, tokens) which tokens count."""
        v = v.double() * keep.unsqueeze(-1)
        b = v.shape[0]
        self.sq[start : start + b] += v.pow(2).sum((1, 2)).cpu().numpy()
        self.vec[start : start + b] += v.sum(1).cpu().numpy()
        self.count[start : start + b] += keep.sum(1).cpu().numpy()

    def per_window(self) -> np.ndarray:
        mu = self.vec.sum(0) / self.count.sum()
        return self.sq - 2 * self.vec @ mu + self.count * (mu @ mu)


def compute(context: EvalContext, sae: SAE, params: CoreParams) -> MetricResult:
    n_windows, d, n = len(context.windows), sae.d_in, sae.n_latents
    err_sae, err_raw = np.zeros(n_windows), np.zeros(n_windows)
    l0, norm_ratio, tokens = np.zeros(n_windows), np.zeros(n_windows), np.zeros(n_windows)
    spread_sae, spread_raw = _SumOfSquaresAroundMean(n_windows, d), _SumOfSquaresAroundMean(n_windows, d)
    fires = torch.zeros(n, dtype=torch.int64, device=context.device)

    batches = context.reconstructions(sae).batches()
    for start, stop, x, rec in tqdm(
        batches,
        total=-(-n_windows // context.config.batch_size),
        desc="core",
        leave=False,
        dynamic_ncols=True,
    ):
        b, t = x.shape[:2]
        keep = torch.from_numpy(context.mask[start:stop]).to(context.device)
        w = keep.double()
        u, u_hat, x_hat = (a.reshape(b, t, d).double() for a in (rec.u, rec.u_hat, rec.x_hat))
        xd = x.double()
        err_sae[start:stop] = ((u - u_hat).pow(2).sum(-1) * w).sum(1).cpu().numpy()
        err_raw[start:stop] = ((xd - x_hat).pow(2).sum(-1) * w).sum(1).cpu().numpy()
        spread_sae.add(start, u, w)
        spread_raw.add(start, xd, w)
        active = (rec.codes.values != 0) & keep.reshape(-1, 1)
        l0[start:stop] = active.sum(-1).reshape(b, t).sum(1).double().cpu().numpy()
        ratio = x_hat.norm(dim=-1) / xd.norm(dim=-1).clamp_min(1e-30)
        norm_ratio[start:stop] = (ratio * w).sum(1).cpu().numpy()
        tokens[start:stop] = w.sum(1).cpu().numpy()
        fires += torch.bincount(rec.codes.indices[active], minlength=n)

    total = int(tokens.sum())
    freq = fires.double().cpu().numpy() / total
    seed = context.config.seed
    # one resampling of the latents for both fractions (a wide SAE has a million)
    fractions = {"dead_frac": freq == 0, "dense_frac": freq > params.dense_threshold}
    values = {
        "nmse": ratio_estimate(err_sae, spread_sae.per_window(), "windows", seed),
        "fvu_raw": ratio_estimate(err_raw, spread_raw.per_window(), "windows", seed),
        "l0": ratio_estimate(l0, tokens, "windows", seed),
        **mean_estimates(fractions, "latents", seed),
        "norm_ratio": ratio_estimate(norm_ratio, tokens, "windows", seed),
    }
    return MetricResult(
        values=values,
        counts={
            "tokens": total,
            "windows": n_windows,
            "latents": n,
            "excluded_special_tokens": int((~context.mask).sum()),
        },
        details={
            "firing_frequency_histogram": _log_histogram(freq),
            "nmse_windows": {"num": err_sae.tolist(), "den": spread_sae.per_window().tolist()},
        },
    )


def _log_histogram(freq: np.ndarray) -> dict:
    """Counts of latents per decade of firing frequency (dead latents counted apart)."""
    alive = freq[freq > 0]
    edges = np.arange(-8, 1)
    counts, _ = np.histogram(np.log10(alive), bins=edges) if alive.size else (np.zeros(len(edges) - 1), None)
    return {"dead": int((freq == 0).sum()), "log10_edges": edges.tolist(), "counts": [int(c) for c in counts]}


register(
    Metric(
        name="core",
        version=1,
        description="reconstruction (nmse, fvu_raw) and sparsity (l0, dead and dense latents)",
        compute=compute,
        params=CoreParams,
        latent_sharded=True,
        headline=("nmse", "l0", "dead_frac", "fvu_raw", "dense_frac", "norm_ratio"),
        lower_is_better=frozenset({"nmse", "fvu_raw", "dead_frac", "dense_frac"}),
        compact=("nmse", "l0", "dead_frac"),
        unranked=frozenset({"l0", "norm_ratio"}),
        sae_space=frozenset({"nmse"}),
        plots=(
            Plot("nmse_vs_l0.png", "nmse", "nmse (SAE space)", log=True),
            Plot("dead_frac.png", "dead_frac", "dead fraction of latents", kind="bar"),
        ),
    )
)
