"""Re-cutting an activation stream into fixed-size training batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def rebatch(batches: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Yield (batch_size, d) tensors from a stream of (tokens, d) tensors of any sizes, in order; a last,
    shorter batch carries the remainder.  Holds at most one batch plus one incoming tensor."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pending: list[torch.Tensor] = []
    count = 0
    for batch in batches:
        if batch.ndim != 2:
            raise ValueError(f"activation batches must be (tokens, d), got shape {tuple(batch.shape)}")
        while batch.shape[0]:
            take = min(batch_size - count, batch.shape[0])
            pending.append(batch[:take])
            count += take
            batch = batch[take:]
            if count == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, count = [], 0
    if count:
        yield torch.cat(pending)
