"""Synthetic activations from a planted dictionary: x = sum of a few random unit directions + offset."""

import pytest
import torch


def planted_batches(
    n_batches: int, batch: int, *, d: int = 24, n_features: int = 96, active: int = 4, seed: int = 0
):
    """A reproducible list of (batch, d) float32 tensors; each token mixes `active` of a fixed set of planted
    unit features (the same for every seed; `seed` draws the tokens)."""
    planted = torch.Generator().manual_seed(12345)
    features = torch.randn(n_features, d, generator=planted)
    features /= features.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=planted)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        which = torch.rand(batch, n_features, generator=gen).topk(active, dim=1).indices
        scale = torch.rand(batch, active, generator=gen) * 2 + 0.5
        x = (
            (scale[:, :, None] * features[which]).sum(1)
            + offset
            + 0.01 * torch.randn(batch, d, generator=gen)
        )
        out.append(x)
    return out


@pytest.fixture
def planted():
    return planted_batches


@pytest.fixture(autouse=True)
def no_installed_lr_trend(monkeypatch):
    """Training tests see the paper's lr rule unless they build a trend themselves (an installed
    saebench/train/lr_trend.json would otherwise change the lr of every run without an explicit lr)."""
    monkeypatch.setenv("SAEBENCH_LR_TREND", "none")
