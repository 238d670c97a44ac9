"""The k largest entries of each row, exactly, faster than `torch.topk` on wide rows (SAE pre-activations).

`row_topk(x, k)` returns what `torch.topk(x, k, dim=1, sorted=False)` returns, the same values up to the
order of each row's entries (and the same indices up to that order and ties).  On CPU, for rows of n >= 32 k
entries with n a multiple of `GROUPS`, it selects through group maxima:

    groups           = n/G groups of G entries: group j holds entries j, j + n/G, ..., j + (G - 1) n/G
                       (strided, so that all their maxima are one elementwise max of G slices of the row)
    candidates       = the G entries of each of the k groups with the largest maxima (chosen by row_topk
                       over the n/G maxima, so that wide rows recurse)
    result           = the top k of those k G candidates

which is exact.  Let v be the row's k-th largest value.  Fewer than k entries exceed v, so fewer than k groups
have a maximum above v: all of them are chosen, and with them every entry above v.  Each other chosen group
whose maximum is v adds an entry equal to v; when fewer than k groups reach v, every entry >= v is a
candidate.  The elementwise max reads the row once, cheaply; torch.topk then sorts through n/G maxima and
k G candidates instead of n entries.  Measured on this project's 2-core CPU (`benchmarks/topk_selection.py`,
rows of one 64 MB chunk): 2.4x torch.topk's speed at n = 16384, k = 32, and 1.2x to 3.3x wherever it
applies in n = 2048 .. 65536, k = 16 .. 128.  On other devices, and for narrow rows, it is torch.topk (the
grouped path is unmeasured on GPUs).
"""

from __future__ import annotations

import torch

#: entries per group, from a CPU sweep of 2 .. 32 at k = 16 .. 128 (one level, no recursion): the best or
#: within 15% of it for n = 2048 .. 16384 where the grouped path applies; at n = 65536, 16 was up to 1.4x
#: faster
GROUPS = 8
#: devices the grouped path is measured faster on
GROUPED_DEVICES = ("cpu",)


def grouped(n: int, k: int, device: torch.device) -> bool:
    """Whether `row_topk` selects through group maxima for rows of n entries."""
    return device.type in GROUPED_DEVICES and k > 0 and n % GROUPS == 0 and n >= 32 * k


def row_topk(x: torch.Tensor, k: int, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(values, indices) of the k largest entries in each row of the 2-D `x`, unsorted; `out`: tensors of
    shape (rows, k) to write them into, as torch.topk's `out`."""
    rows, n = x.shape
    if not grouped(n, k, x.device) or rows == 0:
        return torch.topk(x, k, dim=1, sorted=False, out=out)
    width = n // GROUPS
    # maxima of the strided groups: one elementwise max over G contiguous slices of each row
    maxima = x.reshape(rows, GROUPS, width).amax(dim=1)
    groups = row_topk(maxima, k)[1]  # the same selection one level up, while the maxima are wide enough
    offsets = torch.arange(0, n, width, device=x.device)
    columns = (groups.unsqueeze(2) + offsets).view(rows, k * GROUPS)
    candidates = x.gather(1, columns)
    if out is None:
        values, where = candidates.topk(k, dim=1, sorted=False)
        return values, columns.gather(1, where)
    values, indices = out
    _, where = torch.topk(candidates, k, dim=1, sorted=False, out=(values, torch.empty_like(indices)))
    torch.gather(columns, 1, where, out=indices)
    return values, indices
