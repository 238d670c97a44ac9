import math

import pytest

from saebench.train.l1_search import MAX_STEP, MAX_TRIALS, Trial, accepted, closest, next_lambda


def search(curve, target, start, trials=()):
    trials = list(trials)
    while not any(accepted(t, target) for t in trials) and len(trials) < 3 * MAX_TRIALS:
        lam = next_lambda(trials, target, start)
        trials.append(Trial(lam, curve(lam), 0.0))
    return trials


@pytest.mark.parametrize("slope", [-0.7, -1.5, -2.5, -4.0])
@pytest.mark.parametrize("target", [16, 32, 64])
@pytest.mark.parametrize("start", [0.01, 0.1, 1.0])
def test_power_law_curves_are_hit_within_the_trial_budget(slope, target, start):
    def curve(lam):
        return 30 * (lam / 0.2) ** slope

    trials = search(curve, target, start)
    assert accepted(trials[-1], target)
    # far starts (up to 100x off in lambda) cost the clamped steps; near ones fit in MAX_TRIALS
    far = abs(math.log(start / (0.2 * (target / 30) ** (1 / slope)))) > math.log(MAX_STEP)
    assert len(trials) <= (2 * MAX_TRIALS if far else MAX_TRIALS)


def test_kinked_curve_with_trials_shared_across_targets():
    # steep at large lambda, shallow at small (the shape measured on SmolLM2: 0.1 -> 122, 0.3 -> 7.7)
    def curve(lam):
        return 120 * (lam / 0.1) ** (-1.1 if lam < 0.1 else -2.5)

    shared = []
    for target in (16, 32, 64):
        shared = search(curve, target, 0.1, shared)
        assert accepted(closest(shared, target), target)
    assert len(shared) <= 2 * MAX_TRIALS


def test_proposals():
    assert next_lambda([], 32, 0.3) == 0.3
    # bracketed: log-log interpolation between the nearest trials on either side
    lam = next_lambda([Trial(0.1, 128, 0), Trial(0.4, 8, 0)], 32, 0.3)
    assert lam == pytest.approx(0.2)
    # one-sided: the default slope, at most MAX_STEP per proposal, in the right direction
    assert next_lambda([Trial(0.1, 100, 0)], 64, 1.0) > 0.1
    assert next_lambda([Trial(0.1, 10_000, 0)], 16, 1.0) == pytest.approx(0.1 * MAX_STEP)
    assert next_lambda([Trial(0.1, 2, 0)], 64, 1.0) == pytest.approx(0.1 / MAX_STEP)
    # dead runs (L0 0) count as very sparse rather than breaking the logarithm
    assert next_lambda([Trial(1.0, 0.0, 0)], 32, 1.0) < 1.0
    assert closest([Trial(0.1, 40, 0), Trial(0.2, 20, 0)], 32).l1_coefficient == 0.1
