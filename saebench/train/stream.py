"""Training activations: residuals at the site for training-split windows, from the shared cache.

The windows come from the corpus' training split (the evaluation windows are held out and never trained
on).  Residuals are collected once into the activation cache (resumable) and then streamed in blocks:
each block drops position 0 and BOS/EOS separators (attention sinks with outsized norms, see
`Site.scored`) and is shuffled with a seeded generator, so the same arguments give the same stream
and a resumed trainer can skip exactly the batches it has seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from saebench.data.site import Site


def training_windows(n_tokens: int, ctx: int) -> int:
    """Windows whose positions 1.. hold at least n_tokens tokens (before separators are dropped)."""
    return -(-n_tokens // (ctx - 1))


def stream_length(site: Site, n_tokens: int) -> int:
    """How many tokens `activation_stream(site, n_tokens)` yields (separators dropped)."""
    windows = site.windows("train", training_windows(n_tokens, site.config.ctx))
    return int(site.scored(windows).sum())


def activation_stream(
    site: Site, n_tokens: int, *, seed: int = 0, block_windows: int = 4096
) -> Iterator[torch.Tensor]:
    """Yield shuffled (tokens, d) float32 blocks from `n_tokens` worth of training windows.

    The tokens dropped as separators make the stream a little shorter than n_tokens (`stream_length`).
    """
    n_windows = training_windows(n_tokens, site.config.ctx)
    windows = site.windows("train", n_windows)
    resid = site.resid("train", n_windows)
    generator = np.random.default_rng(seed)
    for start in range(0, n_windows, block_windows):
        stop = min(start + block_windows, n_windows)
        keep = site.scored(windows[start:stop])
        block = np.asarray(resid[start:stop, 1:])[keep]
        yield torch.from_numpy(block[generator.permutation(len(block))])
