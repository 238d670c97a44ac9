import numpy as np
import pytest
import torch

from saebench.metrics.core import CoreParams
from saebench.metrics.core import compute as core
from tests.conftest import identity_sae, random_sae


def direct_core(resid: np.ndarray, mask: np.ndarray, sae):
    """Dense, un-batched reference: every scored token at once."""
    x = torch.from_numpy(np.array(resid[:, 1:])[mask]).double()
    sae = sae.double()
    u, state = sae.normalization.apply(x)
    z = sae.encode(x)
    u_hat = z @ sae.W_dec + sae.b_dec
    x_hat = sae.normalization.undo(u_hat, state)
    nmse = ((u - u_hat) ** 2).sum() / ((u - u.mean(0)) ** 2).sum()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    freq = (z != 0).double().mean(0)
    return {
        "nmse": nmse.item(),
        "fvu_raw": fvu.item(),
        "l0": (z != 0).sum(1).double().mean().item(),
        "dead_frac": (freq == 0).double().mean().item(),
        "dense_frac": (freq > 0.1).double().mean().item(),
        "norm_ratio": (x_hat.norm(dim=1) / x.norm(dim=1)).mean().item(),
    }


@pytest.mark.parametrize(
    "activation,normalization",
    [("topk", "none"), ("relu", "layer_norm"), ("jumprelu", "token_norm"), ("topk", "layer_norm")],
)
def test_core_matches_direct_computation(make_context, activation, normalization):
    context = make_context()
    sae = random_sae(context.model.d_model, 96, activation=activation, normalization=normalization, k=5)
    result = core(context, sae, CoreParams())
    expected = direct_core(context.resid, context.mask, sae)
    for name, value in expected.items():
        got = result.values[name]
        assert got.value == pytest.approx(value, rel=1e-5, abs=1e-9), name
        assert got.lo <= got.value <= got.hi or name.endswith("_frac")
    separators = int((context.windows[:, 1:] == 0).sum())
    assert separators > 0  # the corpus joins documents with EOS: those positions are not scored
    assert result.counts["tokens"] == 12 * 15 - separators
    assert result.values["nmse"].n == 12 and result.values["nmse"].unit == "windows"


def test_core_of_an_exact_dictionary(make_context):
    context = make_context()
    result = core(context, identity_sae(context.model.d_model), CoreParams())
    assert result.values["nmse"].value < 1e-10
    assert result.values["norm_ratio"].value == pytest.approx(1.0, abs=1e-6)


def test_topk_l0_is_k_and_dead_latents_counted(make_context):
    context = make_context()
    sae = random_sae(context.model.d_model, 64, k=3)
    with torch.no_grad():
        sae.b_enc[:10] = -1e6  # these can never win the top-k
        sae.b_enc[10:] = 1e3  # and the others are always positive, so exactly k are active
    result = core(context, sae, CoreParams())
    assert result.values["l0"].value == pytest.approx(3.0)
    assert result.values["dead_frac"].value >= 10 / 64
