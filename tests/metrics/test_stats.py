import numpy as np
import pytest

from saebench.metrics.stats import mean_estimate, ratio_estimate


def test_mean_interval_covers_and_shrinks():
    rng = np.random.default_rng(0)
    small = mean_estimate(rng.normal(1.0, 1.0, 50), "units")
    large = mean_estimate(rng.normal(1.0, 1.0, 5000), "units")
    assert small.lo < 1.0 < small.hi
    assert (large.hi - large.lo) < (small.hi - small.lo) / 5
    # the normal-theory half-width for n=5000, sd=1 is 1.96/sqrt(5000) ~ 0.028
    assert (large.hi - large.lo) / 2 == pytest.approx(0.0277, rel=0.15)


def test_ratio_is_ratio_of_sums_not_mean_of_ratios():
    num, den = np.array([1.0, 9.0]), np.array([1.0, 3.0])
    est = ratio_estimate(num, den, "windows")
    assert est.value == pytest.approx(10 / 4)
    assert est.n == 2 and est.unit == "windows"


def test_seeded():
    v = np.arange(20.0)
    assert mean_estimate(v, "u", seed=3) == mean_estimate(v, "u", seed=3)
