"""Choosing the ReLU baseline's lambda: fixed-lambda runs, searched until the run's L0 is near a target.

The paper's baseline is ReLU + L1 at a fixed lambda; to compare it with TopK at k we need the lambda whose
run ends at L0 ~ k.  L0 at the end of a fixed-length run falls with lambda, locally like a power law, but
it keeps drifting during a short run, so no short proxy predicts it: every trial is a full run at one
fixed lambda (`runs.search_l1`), and this module only proposes the next lambda from the finished trials.

    bracketed (trials on both sides of the target): interpolate log L0 against log lambda between the
        closest pair;
    one-sided: extrapolate from the nearest trial with the local slope (the two trials nearest the
        target), clamped to [-4, -0.5], or -1.5 with a single trial; at most 4x per proposal.

Trials of one dictionary size serve all its targets, and a size without trials starts from the nearest
size's trials, so later searches start close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

#: a trial is accepted when its L0 is within this factor of the target
TOLERANCE = 1.2
#: full-length runs per target at most; then the closest trial is used (and the leaderboard shows its L0)
MAX_TRIALS = 4
#: d log L0 / d log lambda assumed from a single trial
DEFAULT_SLOPE = -1.5
#: a one-sided proposal moves lambda by at most this factor
MAX_STEP = 4.0


class Trial(NamedTuple):
    """One finished fixed-lambda run: its lambda, final L0 and nmse."""

    l1_coefficient: float
    l0: float
    nmse: float


def _log_point(trial: Trial) -> tuple[float, float]:
    return math.log(trial.l1_coefficient), math.log(max(trial.l0, 0.1))


def accepted(trial: Trial, target: float) -> bool:
    return abs(math.log(max(trial.l0, 0.1) / target)) <= math.log(TOLERANCE)


def closest(trials: Sequence[Trial], target: float) -> Trial:
    """The trial whose L0 is nearest the target on a log scale."""
    if not trials:
        raise ValueError("no finished trials to choose from")
    return min(trials, key=lambda t: abs(math.log(max(t.l0, 0.1) / target)))


def next_lambda(trials: Sequence[Trial], target: float, start: float) -> float:
    """The lambda to try next for `target` given finished trials (`start` when there are none)."""
    if not trials:
        return start
    y = math.log(target)
    points = sorted(_log_point(t) for t in trials)
    high = [p for p in points if p[1] > y]  # L0 above the target: lambda too small
    low = [p for p in points if p[1] <= y]
    if high and low:
        a, b = max(high), min(low)
        if a[0] < b[0]:
            x = a[0] + (y - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
        else:  # not monotone (run-to-run noise): split the difference
            x = (a[0] + b[0]) / 2
        return math.exp(x)
    near = sorted(points, key=lambda p: abs(p[1] - y))
    slope = DEFAULT_SLOPE
    if len(near) > 1 and near[0][0] != near[1][0]:
        fitted = (near[0][1] - near[1][1]) / (near[0][0] - near[1][0])
        slope = min(-0.5, max(-4.0, fitted)) if fitted < 0 else DEFAULT_SLOPE
    step = (y - near[0][1]) / slope
    step = max(-math.log(MAX_STEP), min(math.log(MAX_STEP), step))
    return math.exp(near[0][0] + step)
