"""Bootstrap intervals shared by all metrics.

Resampling is over a metric's natural unit (windows, tasks, latents): the caller passes one row per unit.
A ratio of sums (nmse, fvu, loss recovered) is resampled as a ratio of resampled sums, not as a mean of
per-unit ratios.
"""

from __future__ import annotations

import numpy as np

from saebench.metrics.registry import Estimate

N_BOOT = 1000


def _weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Multinomial resampling counts (n_boot, n): row b says how often each unit is drawn."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanquantile(samples, [0.025, 0.975])
    return float(lo), float(hi)


def mean_estimate(values, unit: str, seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """Mean of per-unit values with a percentile bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError(f"no {unit} to average over")
    w = _weights(v.size, n_boot, seed)
    return Estimate(float(v.mean()), *_interval(w @ v / v.size), n=int(v.size), unit=unit)


def ratio_estimate(num, den, unit: str, seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """sum(num) / sum(den) over units, with the interval of the same ratio over resampled units."""
    a = np.asarray(num, dtype=np.float64)
    b = np.asarray(den, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"no {unit} to take a ratio over")
    w = _weights(a.size, n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = (w @ a) / (w @ b)
    return Estimate(float(a.sum() / b.sum()), *_interval(samples), n=int(a.size), unit=unit)
