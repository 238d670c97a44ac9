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


@pytest.mark.parametrize("block_elements", [1, 50, 999, 1 << 22])
def test_resamples_drawn_in_blocks_give_the_one_draw(monkeypatch, block_elements):
    """Many units (a wide SAE's latents) are resampled a block of resamples at a time, to the values one
    (n_boot, n) draw gives (the default block holds all 1000 resamples of up to 4194 units)."""
    from saebench.metrics import stats

    rng = np.random.default_rng(5)
    v, den = (rng.random(300) < 0.2).astype(float), rng.random(300) + 0.5
    w = np.random.default_rng(3).multinomial(300, np.full(300, 1 / 300), size=200).astype(np.float64)
    want_mean = np.nanquantile(w @ v / 300, [0.025, 0.975])
    want_ratio = np.nanquantile((w @ v) / (w @ den), [0.025, 0.975])
    monkeypatch.setattr(stats, "BOOT_ELEMENTS", block_elements)
    mean, ratio = mean_estimate(v, "latents", 3, n_boot=200), ratio_estimate(v, den, "windows", 3, n_boot=200)
    # counts of 0/1 values sum exactly in any order; other sums agree to the last bits of float64
    assert (mean.lo, mean.hi) == tuple(want_mean) and mean.value == v.mean()
    assert (ratio.lo, ratio.hi) == pytest.approx(tuple(want_ratio), rel=1e-14, abs=0)


def test_means_over_the_same_units_share_one_resampling():
    from saebench.metrics.stats import mean_estimates

    rng = np.random.default_rng(2)
    a, b = rng.random(500) < 0.1, rng.random(500)
    both = mean_estimates({"a": a, "b": b}, "latents", seed=4)
    assert both["a"] == mean_estimate(a, "latents", seed=4)
    assert both["b"] == mean_estimate(b, "latents", seed=4)
    with pytest.raises(ValueError, match="different lengths"):
        mean_estimates({"a": a, "b": b[:3]}, "latents")
