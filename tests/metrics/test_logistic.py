import math

import numpy as np
import pytest
import torch

from saebench.metrics.logistic import cross_entropy, fit_logistic, standardize
from tests import requires

sklearn_lm = requires.module("sklearn.linear_model", "pip install scikit-learn")

L2 = 1e-3


def sklearn_reference(train: np.ndarray, y: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """(w, b, train CE, test CE) per column from scikit-learn at a tight tolerance."""
    rows = []
    for j in range(train.shape[1]):
        clf = sklearn_lm.LogisticRegression(C=1 / (L2 * len(y)), solver="lbfgs", tol=1e-10, max_iter=10000)
        clf.fit(train[:, j : j + 1], y)
        z, zt = clf.decision_function(train[:, j : j + 1]), clf.decision_function(test[:, j : j + 1])
        rows.append(
            [
                clf.coef_[0, 0],
                clf.intercept_[0],
                np.mean(np.logaddexp(0, z) - y * z),
                np.mean(np.logaddexp(0, zt) - y_test * zt),
            ]
        )
    return np.array(rows)


def ours(train, y, test, y_test, dtype=torch.float64, **kwargs) -> tuple[np.ndarray, object]:
    fit = fit_logistic(torch.tensor(train, dtype=dtype), torch.tensor(y), dtype=dtype, **kwargs)
    test_ce = fit.test_ce(torch.tensor(test, dtype=dtype), torch.tensor(y_test))
    return np.stack([fit.w.numpy(), fit.b.numpy(), fit.train_ce.numpy(), test_ce.numpy()], 1), fit


def labelled(n: int, rng: np.random.Generator, frac: float = 0.5) -> np.ndarray:
    return rng.permutation(np.arange(n) < round(frac * n))


def standardised(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = standardize(torch.tensor(train), torch.tensor(test))
    return a.numpy(), b.numpy()


def test_matches_sklearn_on_random_features():
    rng = np.random.default_rng(0)
    y, y_test = labelled(160, rng, 0.4), labelled(120, rng)
    shift = rng.normal(0, 1.0, 12)
    raw = rng.normal(size=(160, 12)) + y[:, None] * shift
    raw_test = rng.normal(size=(120, 12)) + y_test[:, None] * shift
    raw[:, :4] = rng.exponential(1.0, (160, 4)) * (rng.random((160, 4)) < 0.2)  # sparse, latent-like
    train, test = standardised(raw, raw_test)
    got, fit = ours(train, y, test, y_test)
    assert bool(fit.converged.all())
    np.testing.assert_allclose(got, sklearn_reference(train, y, test, y_test), atol=1e-5, rtol=0)


def test_matches_sklearn_on_separable_penalised_features():
    rng = np.random.default_rng(1)
    y, y_test = labelled(128, rng), labelled(96, rng)
    sign, sign_test = 2.0 * y - 1, 2.0 * y_test - 1
    raw = np.stack(
        [
            sign * rng.uniform(0.2, 1.0, 128),  # separated with a gap
            sign * rng.uniform(0.0, 1.0, 128) + 0.3,  # separated, off-centre
            np.where(y, 1.0, 0.0) + 0.05 * rng.normal(size=128),  # label plus tiny noise
            np.where(y & (rng.random(128) < 0.1), 5.0, 0.0),  # fires only on a few positives
        ],
        1,
    )
    raw_test = np.stack(
        [sign_test * 0.6, sign_test * 0.5 + 0.3, np.where(y_test, 1.0, 0.0), np.where(y_test, 5.0, 0.0)], 1
    )
    train, test = standardised(raw, raw_test)
    got, fit = ours(train, y, test, y_test)
    assert bool(fit.converged.all())
    assert np.all(np.abs(got[:3, 0]) > 3)  # the penalty, not the data, bounds w
    np.testing.assert_allclose(got, sklearn_reference(train, y, test, y_test), atol=1e-5, rtol=0)


def test_float32_agrees_to_1e5():
    rng = np.random.default_rng(2)
    y, y_test = labelled(256, rng), labelled(256, rng)
    shift = rng.normal(0, 1.0, 16)
    raw = rng.normal(size=(256, 16)) + y[:, None] * shift
    raw_test = rng.normal(size=(256, 16)) + y_test[:, None] * shift
    train, test = standardised(raw, raw_test)
    got, _ = ours(train, y, test, y_test, dtype=torch.float32)
    ref = sklearn_reference(train.astype(np.float32).astype(np.float64), y, test, y_test)
    np.testing.assert_allclose(got[:, 2:], ref[:, 2:], atol=1e-5, rtol=0)


def test_constant_features_get_the_prior():
    rng = np.random.default_rng(3)
    y, y_test = labelled(100, rng, 0.3), labelled(50, rng, 0.6)
    raw = np.column_stack([np.zeros(100), np.full(100, 0.1), rng.normal(size=100), np.full(100, 7.0)])
    raw_test = np.column_stack([rng.normal(size=(50, 4))])
    train, test = standardised(raw, raw_test)
    assert np.all(train[:, [0, 1, 3]] == 0) and np.all(test[:, [0, 1, 3]] == 0)
    got, fit = ours(train, y, test, y_test)
    got_raw, _ = ours(raw, y, raw_test, y_test)  # constant but not zero: the same answer
    prior = 0.3
    for table in (got, got_raw):
        np.testing.assert_allclose(table[[0, 1, 3], 0], 0.0, atol=0)
        np.testing.assert_allclose(table[[0, 1, 3], 1], math.log(prior / (1 - prior)), atol=1e-12)
        entropy = -(prior * math.log(prior) + (1 - prior) * math.log(1 - prior))
        np.testing.assert_allclose(table[[0, 1, 3], 2], entropy, atol=1e-12)
        test_prior_ce = -(0.6 * math.log(prior) + 0.4 * math.log(1 - prior))
        np.testing.assert_allclose(table[[0, 1, 3], 3], test_prior_ce, atol=1e-12)
    assert np.all(np.isfinite(got)) and bool(fit.converged.all())
    assert fit.n_iter[[0, 1, 3]].tolist() == [0, 0, 0]


def test_planted_label_feature_has_lowest_train_ce():
    rng = np.random.default_rng(4)
    y = labelled(200, rng)
    raw = rng.normal(size=(200, 300)) + 0.3 * y[:, None] * rng.normal(size=300)
    raw[:, 137] = y
    train, _ = standardize(torch.tensor(raw, dtype=torch.float32), torch.tensor(raw[:2], dtype=torch.float32))
    fit = fit_logistic(train, torch.tensor(y))
    assert int(fit.train_ce.argmin()) == 137
    assert fit.train_ce[137] < 0.05


def test_streaming_working_set_is_exact():
    """Tiny chunks force many joins and compactions of the working set; the answer must not move."""
    rng = np.random.default_rng(5)
    y = labelled(64, rng)
    raw = rng.normal(size=(64, 50)) + y[:, None] * rng.normal(0, 2, 50)
    raw[:, ::7] = 1.5  # constant columns scattered through the chunks
    x = torch.tensor(raw)
    whole = fit_logistic(x, torch.tensor(y))
    for chunk in (64, 64 * 3, 64 * 50):
        part = fit_logistic(x, torch.tensor(y), chunk_elements=chunk)
        torch.testing.assert_close(part.w, whole.w, atol=1e-12, rtol=0)
        torch.testing.assert_close(part.train_ce, whole.train_ce, atol=1e-12, rtol=0)


def test_max_iter_stops_and_reports_unconverged():
    rng = np.random.default_rng(6)
    y = labelled(64, rng)
    raw = np.column_stack([np.where(y, 1.0, -1.0), rng.normal(size=64)])
    fit = fit_logistic(torch.tensor(raw), torch.tensor(y), max_iter=2)
    assert not bool(fit.converged[0]) and int(fit.n_iter[0]) == 2
    full = fit_logistic(torch.tensor(raw), torch.tensor(y))
    assert bool(full.converged.all()) and full.train_ce[0] < fit.train_ce[0]


def test_cross_entropy_is_exact_for_confident_logits():
    f = torch.tensor([[100.0], [-100.0]], dtype=torch.float64)
    y = torch.tensor([True, True])
    ce = cross_entropy(f, y, torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert float(ce[0]) == pytest.approx((math.exp(-100) + 100) / 2, abs=1e-12)


def test_bad_inputs_raise():
    y = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic(torch.tensor([[1.0], [float("nan")], [0.0]]), y)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(torch.ones(3, 1), torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="shape"):
        fit_logistic(torch.ones(3, 1), torch.tensor([True, False]))


@pytest.mark.parametrize("w_start", [30.0, -30.0, 200.0])
def test_damping_recovers_from_a_saturated_start(w_start):
    """From a far, saturated start an undamped Newton step overshoots and diverges; the damped one must
    still reach the optimum (the start is planted through the private working set)."""
    from saebench.metrics import logistic

    rng = np.random.default_rng(7)
    y = torch.tensor(labelled(64, rng))
    x = (
        torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        + 0.8 * (2.0 * y - 1)[:, None]
    )
    x = (x - x.mean()) / x.std(correction=0)
    reference = fit_logistic(x, y)

    f64 = dict(dtype=torch.float64)
    result = logistic._Fit(torch.zeros(1, **f64), torch.zeros(1, **f64), torch.zeros(1, **f64),
                           torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.bool))  # fmt: skip
    working = logistic._WorkingSet(64, 32, L2, 1e-8, 50, result, capacity=2, dtype=torch.float64)
    order = torch.argsort((~y).to(torch.uint8), stable=True)
    working.add(x[order].T, torch.tensor([0]), x.abs().max().reshape(1))
    working.state[:, logistic.W] = w_start
    working.state[:, [logistic.DW, logistic.DB]] = 0
    while working.n_live:
        working.step()
    working.release_finished()
    assert bool(result.converged[0])
    torch.testing.assert_close(result.w, reference.w, atol=1e-8, rtol=0)
    torch.testing.assert_close(result.b, reference.b, atol=1e-8, rtol=0)
    torch.testing.assert_close(result.train_ce, reference.train_ce, atol=1e-12, rtol=0)
