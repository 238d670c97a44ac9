"""Wide SAEs encode in latent chunks (saebench/sae/sae.py): every chunking gives the dense encode's codes."""

from __future__ import annotations

import pytest
import torch

from saebench.sae import sae as sae_module
from saebench.sae.sae import SAE
from tests.conftest import random_sae

D, N, TOKENS = 12, 40, 30


def gated_sae() -> SAE:
    base = random_sae(D, N, activation="relu", seed=2)
    g = torch.Generator().manual_seed(3)
    return SAE(
        base.W_enc.data, base.b_enc.data, base.W_dec.data, base.b_dec.data, activation="gated",
        r_mag=0.3 * torch.randn(N, generator=g), b_mag=0.1 * torch.randn(N, generator=g),
    )  # fmt: skip


def make_sae(activation: str) -> SAE:
    if activation == "gated":
        return gated_sae()
    return random_sae(D, N, activation=activation, k=5, normalization="layer_norm")


def inputs() -> torch.Tensor:
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))


def assert_same_codes(got, want) -> None:
    """The same active latents with the same values per token, in any order; no latent twice in a token."""
    assert got.indices.shape == want.indices.shape
    dense_got, dense_want = got.to_dense(N), want.to_dense(N)
    assert torch.equal(dense_got != 0, dense_want != 0)
    torch.testing.assert_close(dense_got, dense_want, rtol=1e-6, atol=1e-6)
    assert torch.equal((got.values != 0).sum(1), (dense_got != 0).sum(1))


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu", "gated"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 33])
def test_chunked_encode_equals_the_dense_one(activation, chunk):
    sae = make_sae(activation)
    u, _ = sae.normalization.apply(inputs())
    with torch.inference_mode():
        dense = sae.encode_sparse(u, sae.scratch(TOKENS, latent_chunk=N))
        buffered = sae.encode_sparse(u, sae.scratch(TOKENS, latent_chunk=chunk))
        unbuffered = sae.encode_sparse(u, latent_chunk=chunk)
    assert sae.scratch(TOKENS, latent_chunk=chunk).shape == (TOKENS, chunk)
    assert bool((dense.values != 0).any())
    assert_same_codes(buffered, dense)
    assert_same_codes(unbuffered, dense)


def test_wide_saes_chunk_by_themselves(monkeypatch):
    """Past SCRATCH_ELEMENTS pre-activations per encode, the default encode is chunked and still exact."""
    sae = make_sae("topk")
    x = inputs()
    with torch.inference_mode():
        want = sae.encode_codes(x).codes
        assert sae.latent_chunk(TOKENS) == N
        monkeypatch.setattr(sae_module, "SCRATCH_ELEMENTS", TOKENS * 6)
        assert sae.latent_chunk(TOKENS) == 6 and sae.scratch(TOKENS).shape == (TOKENS, 6)
        calls = []
        addmm = torch.addmm
        monkeypatch.setattr(torch, "addmm", lambda *a, **kw: calls.append(a[2].shape) or addmm(*a, **kw))
        got = sae.encode_codes(x, sae.scratch(TOKENS)).codes
    assert calls == [(D, 6)] * 6 + [(D, 4)]
    assert_same_codes(got, want)
