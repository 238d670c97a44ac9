"""SAE.encode_codes / decode_codes: the normalisation state travels with the codes (saebench/sae/sae.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from saebench.sae.sae import SAE, Encoded, InputState, Normalization, Reconstruction, SparseCodes
from tests.conftest import random_sae

D, N, K = 12, 40, 5
ACTIVATIONS = ("relu", "topk", "jumprelu", "gated")
NORMALIZATIONS = {
    "none": Normalization(),
    "constant": Normalization("constant", scale=0.37),
    "token_norm": Normalization("token_norm"),
    "layer_norm": Normalization("layer_norm"),
    "layer_norm_biased_std": Normalization("layer_norm", unbiased=False),
    "layer_norm_undo_without_eps": Normalization("layer_norm", undo_with_eps=False, eps=1e-2),
}


def make_sae(activation: str, normalization: Normalization, seed: int = 0) -> SAE:
    """A random SAE (tests.conftest.random_sae) with a non-zero b_pre; gated gets a magnitude path."""
    if activation == "gated":
        base = random_sae(D, N, activation="relu", seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        sae = SAE(
            base.W_enc.data,
            base.b_enc.data,
            base.W_dec.data,
            base.b_dec.data,
            activation="gated",
            r_mag=0.2 * torch.randn(N, generator=g),
            b_mag=0.1 * torch.randn(N, generator=g),
        )
    else:
        sae = random_sae(D, N, activation=activation, k=K, seed=seed)
    sae.b_pre = 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(seed + 2))
    sae.normalization = copy.deepcopy(normalization)
    return sae


def residuals(tokens: int = 30, seed: int = 3) -> torch.Tensor:
    """Raw residuals with a non-zero mean and a spread of norms, so every normalisation does something."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(tokens, 1, generator=g) * 3) * torch.randn(tokens, D, generator=g) + 0.7


def by_hand(norm: Normalization, x: torch.Tensor):
    """u = normalize(x) and u_hat -> x_hat, written out from the equations in Normalization's docstring."""
    d = x.shape[-1]
    if norm.kind == "none":
        return x, lambda u: u
    if norm.kind == "constant":
        return x * norm.scale, lambda u: u / norm.scale
    if norm.kind == "token_norm":
        factor = d**0.5 / (x**2).sum(-1, keepdim=True).sqrt()
        return x * factor, lambda u: u / factor
    mean = x.sum(-1, keepdim=True) / d
    std = (((x - mean) ** 2).sum(-1, keepdim=True) / (d - 1 if norm.unbiased else d)).sqrt()
    undo_std = std + norm.eps if norm.undo_with_eps else std
    return (x - mean) / (std + norm.eps), lambda u: u * undo_std + mean


@pytest.mark.parametrize("norm_name", NORMALIZATIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_encode_codes_then_decode_codes_is_forward_exactly(activation, norm_name):
    sae, x = make_sae(activation, NORMALIZATIONS[norm_name]), residuals()
    with torch.inference_mode():
        encoded = sae.encode_codes(x, sae.scratch(64))
        x_hat = sae.decode_codes(encoded.codes, encoded.state)
        rec = sae.reconstruct(x)
        forward = sae(x)
        from_rec = sae.decode_codes(rec.codes, rec.state)
    assert isinstance(encoded, Encoded) and isinstance(encoded.state, InputState)
    assert torch.equal(x_hat, forward)
    assert torch.equal(rec.x_hat, forward)
    # the state kept in the Reconstruction is the one encode_codes returns, and decodes the same
    for kept, fresh in zip(rec.state, encoded.state, strict=True):
        assert (kept is None and fresh is None) or torch.equal(kept, fresh)
    assert torch.equal(from_rec, forward)
    carried = {name for name, t in zip(InputState._fields, encoded.state, strict=True) if t is not None}
    kind = sae.normalization.kind
    assert carried == {"token_norm": {"factor"}, "layer_norm": {"mean", "std"}}.get(kind, set())
    assert all(t.shape == (x.shape[0], 1) for t in encoded.state if t is not None)


@pytest.mark.parametrize("norm_name", NORMALIZATIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_decode_of_edited_codes_follows_the_equations(activation, norm_name):
    norm = NORMALIZATIONS[norm_name]
    sae, x = make_sae(activation, norm).double(), residuals().double()
    codes, state = sae.encode_codes(x)
    # zero the latent that fires most often, and halve the rest of one token's codes
    counts = torch.bincount(codes.indices[codes.values != 0], minlength=N)
    values = torch.where(codes.indices == counts.argmax(), 0.0, codes.values)
    values[0] *= 0.5
    edited = SparseCodes(codes.indices, values)
    got = sae.decode_codes(edited, state)

    _, undo = by_hand(norm, x)
    z = torch.zeros(x.shape[0], N, dtype=x.dtype).scatter_add_(1, codes.indices, values)
    expected = undo(z @ sae.W_dec.detach() + sae.b_dec.detach())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, sae(x), atol=1e-6), "the edit should change the reconstruction"
    # SAE-space decode of the same edit, without the normalisation
    torch.testing.assert_close(sae.decode_sparse(edited), z @ sae.W_dec + sae.b_dec, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_name", ["none", "token_norm", "layer_norm"])
def test_selecting_tokens_keeps_codes_and_state_together(norm_name):
    sae, x = make_sae("relu", NORMALIZATIONS[norm_name]), residuals()
    with torch.no_grad():
        encoded, x_hat = sae.encode_codes(x), sae(x)
        rows = torch.tensor([7, 2, 19, 2])
        for select in (rows, torch.arange(x.shape[0]) % 3 == 1, slice(4, 11)):
            part = encoded.select(select)
            assert torch.equal(sae.decode_codes(part.codes, part.state), x_hat[select])
            assert torch.equal(part.codes.indices, encoded.codes.indices[select])
        # a state of other tokens is refused rather than broadcast
        if norm_name != "none":
            with pytest.raises(ValueError, match="InputState of the same"):
                sae.decode_codes(encoded.codes.select(rows), encoded.state)
            with pytest.raises(ValueError, match="no state"):
                sae.decode_codes(encoded.codes, InputState())


@pytest.mark.parametrize("norm_name", ["none", "token_norm", "layer_norm"])
def test_cat_joins_batches_as_the_evaluation_loop_does(norm_name):
    sae, x = make_sae("relu", NORMALIZATIONS[norm_name]), residuals(40)
    with torch.inference_mode():
        parts = [sae.reconstruct(x[i : i + 9]) for i in range(0, 40, 9)]
        whole = Reconstruction.cat(parts)
        widths = {p.codes.indices.shape[1] for p in parts}
        assert len(widths) > 1, "batches of different widths exercise the padding"
        assert torch.equal(whole.x_hat, torch.cat([sae(x[i : i + 9]) for i in range(0, 40, 9)]))
        # one encode of all 40 tokens has other matmul blocks and code widths: only rounding differs
        torch.testing.assert_close(whole.x_hat, sae(x))
        assert whole.codes.indices.shape == (40, max(widths))
        assert torch.equal(whole.codes.l0(), torch.cat([p.codes.l0() for p in parts]))
        assert torch.equal(
            whole.codes.to_dense(N), torch.cat([sae.encode(x[i : i + 9]) for i in range(0, 40, 9)])
        )
        torch.testing.assert_close(sae.decode_codes(whole.codes, whole.state), whole.x_hat)
        state = sae.encode_codes(x).state
        for joined, direct in zip(whole.state, state, strict=True):
            assert (joined is None and direct is None) or torch.equal(joined, direct)
    # a Reconstruction built without a state (as context.py did) still joins, with no state
    assert Reconstruction.cat([p._replace(state=None) for p in parts]).state is None
    with pytest.raises(ValueError, match="missing"):
        InputState.cat([InputState(factor=torch.ones(2, 1)), InputState()])


@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("norm_name", ["none", "constant", "token_norm", "layer_norm_undo_without_eps"])
def test_decode_is_differentiable_in_values_on_a_fixed_support(norm_name, activation):
    sae = make_sae(activation, NORMALIZATIONS[norm_name]).double()
    x = residuals(4).double()
    with torch.no_grad():
        codes, state = sae.encode_codes(x)
    values = codes.values.clone().requires_grad_()

    def raw(v):
        return sae.decode_codes(SparseCodes(codes.indices, v), state)

    def sae_space(v):
        return sae.decode_sparse(SparseCodes(codes.indices, v))

    assert torch.autograd.gradcheck(raw, (values,), fast_mode=True)
    assert torch.autograd.gradcheck(sae_space, (values,), fast_mode=True)
    # d <g, x_hat> / d v_ti = <W_dec[i] * (d x_hat / d u_hat)_t, g_t>: the undo is per-token linear
    g = torch.randn(x.shape[0], D, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((raw(values) * g).sum(), values)
    _, undo = by_hand(sae.normalization, x)
    slope = undo(torch.ones(x.shape[0], D, dtype=x.dtype)) - undo(torch.zeros(x.shape[0], D, dtype=x.dtype))
    expected = torch.einsum("tmd,td->tm", sae.W_dec.detach()[codes.indices], g * slope)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_codes_encoded_under_inference_mode_refine_in_float64():
    """The shrinkage path: float32 codes from the evaluation loop, refined on a float64 copy of the SAE."""
    sae, x = make_sae("topk", NORMALIZATIONS["layer_norm"]), residuals(8)
    with torch.inference_mode():
        codes, state = sae.encode_codes(x)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        sae.decode_codes(codes, state)  # the SAE's parameters require grad: documented in decode_codes
    sae64 = copy.deepcopy(sae).double()
    codes, state64 = codes.clone(), state.to(torch.float64)
    values = codes.values.to(torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: sae64.decode_codes(SparseCodes(codes.indices, v), state64), (values,)
    )
    assert state64.mean.dtype == torch.float64 and state64.factor is None
    # a float64 state from a float64 encode: clone() is the copy that can enter autograd
    with torch.inference_mode():
        codes, state = sae64.encode_codes(x.double())
    codes, state = codes.clone(), state.clone()
    values = codes.values.clone().requires_grad_()
    x_hat = sae64.decode_codes(SparseCodes(codes.indices, values), state)
    (grad,) = torch.autograd.grad(x_hat.sum(), values)
    torch.testing.assert_close(grad, (sae64.W_dec.detach()[codes.indices] * state.std[:, :, None]).sum(-1))


def old_pipeline(sae: SAE, x: torch.Tensor):
    """The pre-InputState reconstruct, frozen: its apply and undo ops in their original order."""
    norm = sae.normalization
    if norm.kind == "none":
        u, undo = x, lambda v: v
    elif norm.kind == "constant":
        u, undo = x * norm.scale, lambda v: v / norm.scale
    elif norm.kind == "token_norm":
        factor = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u, undo = x * factor, lambda v: v / factor
    else:
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        std = centred.std(-1, keepdim=True, unbiased=norm.unbiased)
        s = std + norm.eps if norm.undo_with_eps else std
        u, undo = centred / (std + norm.eps), lambda v: v * s + mean
    codes = sae.encode_sparse(u, sae.scratch(x.shape[0]))
    u_hat = sae.decode_sparse(codes)
    return u, u_hat, undo(u_hat), codes


@pytest.mark.parametrize("norm_name", NORMALIZATIONS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_old_api_gives_identical_outputs(activation, norm_name):
    sae, x = make_sae(activation, NORMALIZATIONS[norm_name]), residuals()
    with torch.inference_mode():
        u, u_hat, x_hat, codes = old_pipeline(sae, x)
        rec = sae.reconstruct(x, sae.scratch(64))
        for new, old in zip(rec[:3], (u, u_hat, x_hat), strict=True):
            assert torch.equal(new, old)
        assert torch.equal(rec.codes.indices, codes.indices) and torch.equal(rec.codes.values, codes.values)
        # the hand-composed path metrics used: apply -> encode_sparse -> decode_sparse -> undo
        u2, state = sae.normalization.apply(x)
        assert torch.equal(u2, u)
        assert torch.equal(sae.normalization.undo(sae.decode_sparse(sae.encode_sparse(u2)), state), x_hat)
        # README's dense notebook API on a (batch, pos, d) input
        x3 = x.reshape(5, 6, D)
        z = sae.encode(x3)
        assert z.shape == (5, 6, N) and torch.equal(z.reshape(-1, N), codes.to_dense(N))
        assert torch.equal(sae(x3), x_hat.reshape(5, 6, D))
        torch.testing.assert_close(sae.decode(z, x3), x_hat.reshape(5, 6, D), rtol=1e-5, atol=1e-5)
