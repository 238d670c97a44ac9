import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from saebench.metrics.shrinkage import ShrinkageParams, compute, gram_system, refine, refine_codes
from saebench.sae.sae import SAE, SparseCodes
from tests.conftest import identity_sae, random_sae


def dictionary(d: int, n: int, seed: int = 0) -> SAE:
    return random_sae(d, n, k=4, seed=seed).double().requires_grad_(False)


def random_supports(n_tokens: int, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_tokens)])


def test_a_synthetic_dictionary_with_known_codes_is_recovered():
    d, n, k, N = 32, 64, 4, 300
    sae = dictionary(d, n)
    g = torch.Generator().manual_seed(1)
    indices = random_supports(N, n, k, 2)
    truth = 0.5 + 1.5 * torch.rand(N, k, generator=g, dtype=torch.float64)
    u = sae.b_dec + torch.einsum("nk,nkd->nd", truth, sae.W_dec[indices])
    guess = truth * (0.3 + 1.2 * torch.rand(N, k, generator=g, dtype=torch.float64))  # wrong magnitudes
    refined = refine_codes(sae, u, SparseCodes(indices, guess), tol=1e-10, max_iter=500, chunk=128)
    assert refined.converged.all()
    torch.testing.assert_close(refined.values, truth, rtol=0, atol=1e-8)
    assert refined.err_after.max() < 1e-14 < refined.err_before.min()
    assert refined.iterations.max() < 500


def test_one_active_latent_has_the_closed_form():
    d, n, N = 16, 40, 50
    sae = dictionary(d, n, seed=3)
    g = torch.Generator().manual_seed(4)
    u = torch.randn(N, d, generator=g, dtype=torch.float64)
    j = torch.randint(0, n, (N, 1), generator=g)
    # a token's single latent, padded to three slots with zero codes (as `SparseCodes.cat` pads)
    indices = torch.cat([j, torch.zeros(N, 2, dtype=torch.long)], 1)
    values = torch.cat(
        [torch.full((N, 1), 0.1, dtype=torch.float64), torch.zeros(N, 2, dtype=torch.float64)], 1
    )
    refined = refine_codes(sae, u, SparseCodes(indices, values), tol=1e-12)
    w = sae.W_dec[j[:, 0]]
    want = ((u - sae.b_dec) * w).sum(-1).clamp_min(0) / w.square().sum(-1)
    torch.testing.assert_close(refined.values[:, 0], want, rtol=0, atol=1e-12)
    assert (refined.values[:, 1:] == 0).all()
    assert (want == 0).any() and (want > 0).any()  # both sides of the positivity bound are exercised


def test_positivity_holds_and_matches_nonnegative_least_squares():
    d, n, k, N = 24, 48, 8, 200
    sae = dictionary(d, n, seed=5)
    g = torch.Generator().manual_seed(6)
    indices = random_supports(N, n, k, 7)
    signed = torch.randn(N, k, generator=g, dtype=torch.float64)  # targets need negative codes
    u = sae.b_dec + torch.einsum("nk,nkd->nd", signed, sae.W_dec[indices])
    u += 0.1 * torch.randn(N, d, generator=g, dtype=torch.float64)
    start = torch.rand(N, k, generator=g, dtype=torch.float64) + 0.01
    refined = refine_codes(sae, u, SparseCodes(indices, start), tol=1e-10, max_iter=2000)
    assert refined.converged.all()
    assert (refined.values >= 0).all() and (refined.values == 0).sum() > N  # the bound is active often
    for i in range(0, N, 10):
        A = sae.W_dec[indices[i]].T.numpy()
        want, _ = nnls(A, (u[i] - sae.b_dec).numpy())
        np.testing.assert_allclose(refined.values[i].numpy(), want, rtol=0, atol=1e-7)
    # the KKT conditions: zero gradient on the positive codes, no descent direction at the zeros
    G, c, _ = gram_system(sae.W_dec, sae.b_dec, u, SparseCodes(indices, start))
    grad = torch.bmm(G, refined.values[..., None])[..., 0] - c
    scale = c.norm(dim=-1, keepdim=True)
    assert (grad.abs() / scale)[refined.values > 0].max() < 1e-8
    assert (grad / scale)[refined.values == 0].min() > -1e-8


def test_a_token_that_does_not_converge_is_counted():
    d, n, k, N = 24, 48, 8, 64
    sae = dictionary(d, n, seed=8)
    indices = random_supports(N, n, k, 9)
    u = torch.randn(N, d, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    codes = SparseCodes(indices, torch.ones(N, k, dtype=torch.float64))
    G, c, r2 = gram_system(sae.W_dec, sae.b_dec, u, codes)
    refined = refine(G, c, r2, codes.values, max_iter=3, tol=1e-12)
    assert not refined.converged.any() and (refined.iterations == 3).all()
    assert (refined.grad_norm > 1e-12).all()
    assert (refined.err_after <= refined.err_before).all()


def _halved(sae: SAE) -> SAE:
    """The same SAE with the encoder's pre-activations halved: same supports, every code halved."""
    return SAE(
        sae.W_enc.detach() * 0.5,
        sae.b_enc.detach() * 0.5,
        sae.W_dec.detach().clone(),
        sae.b_dec.detach().clone(),
        activation=sae.activation,
        k=sae.k,
        b_pre=sae.b_pre.clone(),
        normalization=sae.normalization,
    )


PARAMS = ShrinkageParams(n_tokens=5 * 15, tol=1e-9, max_iter=1000)


def test_an_encoder_that_halves_every_code_shrinks_by_two(make_context):
    context = make_context()
    exact = identity_sae(context.model.d_model)  # x_hat == x: its codes are already optimal
    v = compute(context, exact, PARAMS).values
    assert v["activation_scale"].value == pytest.approx(1.0, abs=1e-6)
    result = compute(context, _halved(exact), PARAMS)
    v = result.values
    assert v["activation_scale"].value == pytest.approx(2.0, rel=1e-6)
    assert v["nmse_refined"].value < 1e-10 and v["nmse_gain"].value == pytest.approx(v["nmse"].value)
    assert abs(v["delta_ce_refined"].value) < 1e-5 < 1e-3 < abs(v["delta_ce"].value)  # a random model
    assert v["moved_frac"].value == 1.0 and v["unconverged_frac"].value == 0.0
    assert result.counts["windows"] == 5 and result.counts["tokens"] <= 5 * 15


@pytest.mark.parametrize("normalization", ["none", "layer_norm"])
def test_halving_a_topk_encoder_doubles_its_scale(make_context, normalization):
    context = make_context()
    sae = random_sae(context.model.d_model, 256, k=8, normalization=normalization, seed=11)
    params = ShrinkageParams(n_tokens=6 * 15, tol=1e-9, max_iter=2000, delta_ce=False)
    full, half = compute(context, sae, params).values, compute(context, _halved(sae), params).values
    ratio = half["activation_scale"].value / full["activation_scale"].value
    assert ratio == pytest.approx(2.0, rel=1e-6)
    assert half["nmse_refined"].value == pytest.approx(full["nmse_refined"].value, rel=1e-6)
    assert half["nmse"].value > full["nmse_refined"].value
    assert "delta_ce_refined" not in half


def test_params_are_validated():
    with pytest.raises(ValueError, match="tol"):
        ShrinkageParams(tol=0)


def test_the_leaderboard_claim_reports_the_scale_per_family():
    from saebench.leaderboard import Row
    from saebench.leaderboard.claims import claim_shrinkage

    def row(label, arch, scale, lo):
        values = {"activation_scale": {"value": scale, "lo": lo, "hi": scale + 0.01}}
        return Row(label, {"architecture": arch}, {"shrinkage": values})

    rows = [row("t1", "topk", 1.001, 0.99), row("t2", "topk", 1.01, 1.005), row("r", "standard", 1.3, 1.2)]
    text = claim_shrinkage(rows).splitlines()
    assert text[1] == "  - relu: activation_scale 1.3000 to 1.3000 over 1 checkpoints, interval above 1 for 1"
    assert text[2] == "  - topk: activation_scale 1.0010 to 1.0100 over 2 checkpoints, interval above 1 for 1"
    assert claim_shrinkage([Row("x", {}, {})]).startswith("not measured: ")


def test_after_downstream_only_the_refined_reconstruction_is_spliced(make_context, monkeypatch):
    from saebench.metrics import downstream as downstream_module
    from saebench.metrics import shrinkage as shrinkage_module

    context = make_context()
    sae = random_sae(context.model.d_model, 64, k=4)
    original, calls = downstream_module.spliced_ce_kl, []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("start", 0))
        return original(*args, **kwargs)

    monkeypatch.setattr(downstream_module, "spliced_ce_kl", spy)
    monkeypatch.setattr(shrinkage_module, "spliced_ce_kl", spy)
    alone = compute(context, sae, PARAMS)
    assert len(calls) == 2  # the encoder's reconstruction, the refined one
    context.forget(sae)
    calls.clear()
    downstream_module.compute(context, sae, downstream_module.DownstreamParams())
    after = compute(context, sae, PARAMS)
    assert len(calls) == 2  # downstream's pass over every window, then only shrinkage's refined one
    for key in ("delta_ce", "delta_ce_refined", "activation_scale", "nmse_refined"):
        assert after.values[key].value == pytest.approx(alone.values[key].value, rel=1e-6, abs=1e-7)
