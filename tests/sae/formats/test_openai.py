"""OpenAI sparse_autoencoder checkpoints: the loaded SAE matches the library's equations."""

from __future__ import annotations

import pytest
import torch

from saebench.sae.load import CheckpointError, load_sae

ATOL = 1e-5


def openai_forward(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoencoder.forward of openai/sparse_autoencoder: LN for TopK models, pre_bias in and out."""
    topk = state["activation"] == "TopK"
    if topk:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    if topk:
        values, indices = pre.topk(state["activation_state_dict"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    else:
        z = torch.relu(pre)
    recons = z @ state["decoder.weight"].T + state["pre_bias"]
    return z, recons * std + mu if topk else recons


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_matches_openai_equations(tmp_path, writers, x, activation):
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "8.pt"
    state = writers.openai(path, activation)
    sae = load_sae(path)
    z_ref, x_hat_ref = openai_forward(state, x)
    assert torch.allclose(sae.encode(x), z_ref, atol=ATOL)
    assert torch.allclose(sae(x), x_hat_ref, atol=ATOL)
    assert (sae.info.format, sae.info.architecture) == ("openai", activation)
    assert (sae.info.layer, sae.info.site_name) == (8, "resid_post_mlp")


def test_layer_from_file_name_and_unknown_without_location(tmp_path, writers):
    writers.openai(tmp_path / "resid_post_mlp_3.pt")
    writers.openai(tmp_path / "mine" / "sae.pt")
    assert load_sae(tmp_path / "resid_post_mlp_3.pt").info.layer == 3
    assert load_sae(tmp_path / "mine" / "sae.pt").info.layer is None


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("resid_post_attn", "the residual stream between attention and MLP"),
        ("resid_delta_mlp", "an MLP output"),
        ("resid_delta_attn", "an attention output"),
    ],
)
def test_refuses_sites_the_suite_cannot_hook(tmp_path, writers, location, message):
    path = tmp_path / f"{location}_v5_32k" / "autoencoders" / "2.pt"
    writers.openai(path)
    with pytest.raises(CheckpointError, match=f"site '{location} layer 2' is {message}"):
        load_sae(path)
