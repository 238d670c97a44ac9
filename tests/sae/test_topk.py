"""`row_topk` is torch.topk's exact selection, whichever path it takes."""

import pytest
import torch

from saebench.sae.topk import GROUPS, grouped, row_topk


def check(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    expected = torch.topk(x, k, dim=1).values
    assert torch.equal(values.sort(1, descending=True).values, expected)
    assert torch.equal(x.gather(1, indices), values)
    assert torch.equal(indices.sort(1).values.diff(1).clamp_max(1), torch.ones_like(indices[:, 1:]))


@pytest.mark.parametrize("n, k", [(2048, 32), (4096, 16), (1024, 4), (16384, 128)])
def test_grouped_selection_is_exact(n, k):
    assert grouped(n, k, torch.device("cpu"))
    generator = torch.Generator().manual_seed(n + k)
    x = torch.randn(64, n, generator=generator)
    check(x, k, *row_topk(x, k))


def test_ties_and_infinities():
    """Few distinct values (every row ties at its k-th value), rows of -inf, and one +inf."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (32, 512), generator=generator).float()
    x[3] = -torch.inf
    x[4, :100] = -torch.inf
    x[5, 7] = torch.inf
    x[6] = 0.0
    assert grouped(512, 8, x.device)
    check(x, 8, *row_topk(x, 8))


def test_the_top_entries_in_one_group():
    """All k winners share one strided group (and the runners-up another): only its maximum ranks it."""
    n, k = 1024, 8
    x = torch.zeros(2, n)
    width = n // GROUPS
    x[0, torch.arange(GROUPS) * width + 5] = torch.arange(10.0, 10.0 + GROUPS)
    x[1, :k] = torch.arange(1.0, 1.0 + k)
    check(x, k, *row_topk(x, k))


def test_out_tensors_receive_the_result():
    x = torch.randn(16, 4096)
    values, indices = torch.empty(16, 32), torch.empty(16, 32, dtype=torch.int64)
    returned = row_topk(x, 32, out=(values, indices))
    assert returned[0] is values and returned[1] is indices
    check(x, 32, values, indices)


@pytest.mark.parametrize("n, k", [(100, 4), (256, 16), (2048, 2048), (4096, 0)])
def test_narrow_or_odd_rows_use_torch_topk(n, k):
    assert not grouped(n, k, torch.device("cpu"))
    x = torch.randn(8, n)
    check(x, k, *row_topk(x, k))


def test_non_contiguous_and_empty_rows():
    wide = torch.randn(4096, 6).T  # (6, 4096), not contiguous
    assert not wide.is_contiguous()
    check(wide, 16, *row_topk(wide, 16))
    values, indices = row_topk(torch.empty(0, 4096), 16)
    assert values.shape == indices.shape == (0, 16)
