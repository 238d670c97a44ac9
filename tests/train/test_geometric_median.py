import pytest
import torch

from saebench.train.geometric_median import geometric_median


def total_distance(points, y):
    return (points.double() - y.double()).norm(dim=1).sum()


def test_first_order_optimality_and_no_better_nearby_point():
    gen = torch.Generator().manual_seed(0)
    points = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    points[:40] += 30.0  # outliers
    y = geometric_median(points, tol=1e-12, max_iter=5000)
    diff = y - points
    grad = (diff / diff.norm(dim=1, keepdim=True)).sum(0)  # d/dy sum ||y - x_i||
    assert grad.norm() < 1e-6 * points.shape[0]
    best = total_distance(points, y)
    for _ in range(20):
        assert total_distance(points, y + 1e-3 * torch.randn(8, generator=gen, dtype=torch.float64)) > best
    assert total_distance(points, points.mean(0)) > best


def test_one_dimensional_median():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])
    y = geometric_median(points, max_iter=10_000, tol=1e-12)
    assert y.item() == pytest.approx(2.0, abs=1e-3)


def test_robust_to_outliers_where_the_mean_is_not():
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(1000, 16, generator=gen) * 0.1 + 5.0
    points[:100] = 1000.0
    y = geometric_median(points)
    assert (y - 5.0).abs().max() < 0.05
    assert (points.mean(0) - 5.0).abs().min() > 50
    assert y.dtype == points.dtype


def test_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        geometric_median(torch.zeros(0, 4))
