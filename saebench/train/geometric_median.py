"""The geometric median, which initialises the trainer's b_pre (Gao et al. 2024, appendix A.1).

    median(x_1..x_N) = argmin_y  sum_i ||x_i - y||_2

found by Weiszfeld's fixed-point iteration, started at the mean:

    y <- sum_i w_i x_i / sum_i w_i,      w_i = 1 / max(||x_i - y||, eps)

Each step does not increase the objective; the eps floor keeps the weights finite when y lands on a data
point (the iteration then stops at that point, which is the median whenever it is one).
"""

from __future__ import annotations

import torch


def geometric_median(
    points: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-6, eps: float = 1e-8
) -> torch.Tensor:
    """Geometric median of the rows of `points` (N, d), computed in float64, returned in points' dtype.

    Stops when a step moves y by less than `tol` times the mean distance from the points to y, or after
    `max_iter` steps.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty (N, d) tensor, got shape {tuple(points.shape)}")
    x = points.to(torch.float64)
    y = x.mean(0)
    for _ in range(max_iter):
        dist = (x - y).norm(dim=1)
        w = 1.0 / dist.clamp_min(eps)
        y_next = (w @ x) / w.sum()
        step = (y_next - y).norm()
        y = y_next
        if step <= tol * dist.mean().clamp_min(eps):
            break
    return y.to(points.dtype)
