"""Bootstrap intervals shared by all metrics.

Resampling is over a metric's natural unit (windows, tasks, latents): the caller passes one row per unit.
A ratio of sums (nmse, fvu, loss recovered) is resampled as a ratio of resampled sums, not as a mean of
per-unit ratios.
"""

from __future__ import annotations

import numpy as np

from saebench.metrics.registry import Estimate

N_BOOT = 1000
#: resampling counts (resamples x units) drawn at once: with many units (the latents of a wide SAE) the
#: resamples are drawn in blocks, to the same values (one generator, rows drawn in order)
BOOT_ELEMENTS = 1 << 22


def _resampled_sums(columns: list[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Each column's (n,) sum under each of n_boot multinomial resamplings of its n units, (n_boot,) each;
    at most BOOT_ELEMENTS counts exist at once."""
    n = columns[0].size
    rng, p = np.random.default_rng(seed), np.full(n, 1.0 / n)
    sums = [np.empty(n_boot) for _ in columns]
    block = max(1, BOOT_ELEMENTS // n)
    for start in range(0, n_boot, block):
        w = rng.multinomial(n, p, size=min(block, n_boot - start)).astype(np.float64)
        for out, column in zip(sums, columns, strict=True):
            out[start : start + len(w)] = w @ column
    return sums


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanquantile(samples, [0.025, 0.975])
    return float(lo), float(hi)


def mean_estimate(values, unit: str, seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """Mean of per-unit values with a percentile bootstrap interval."""
    return mean_estimates({"mean": values}, unit, seed, n_boot)["mean"]


def mean_estimates(columns: dict, unit: str, seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Estimate]:
    """`mean_estimate` of each named column of per-unit values over the same units, sharing one resampling
    (the one each would draw alone with this seed)."""
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in columns.items()}
    size = next(iter(arrays.values())).size
    if size == 0:
        raise ValueError(f"no {unit} to average over")
    if any(v.size != size for v in arrays.values()):
        raise ValueError(f"mean_estimates: columns of different lengths over the same {unit}")
    sums = _resampled_sums(list(arrays.values()), n_boot, seed)
    return {
        name: Estimate(float(v.mean()), *_interval(s / size), n=size, unit=unit)
        for (name, v), s in zip(arrays.items(), sums, strict=True)
    }


def ratio_estimate(num, den, unit: str, seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """sum(num) / sum(den) over units, with the interval of the same ratio over resampled units."""
    a = np.asarray(num, dtype=np.float64)
    b = np.asarray(den, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"no {unit} to take a ratio over")
    sum_a, sum_b = _resampled_sums([a, b], n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = sum_a / sum_b
    return Estimate(float(a.sum() / b.sum()), *_interval(samples), n=int(a.size), unit=unit)
