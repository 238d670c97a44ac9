"""sparsify checkpoints: the loaded SAE matches sparsify's equations, and sparsify itself where installed."""

from __future__ import annotations

import pytest
import torch

from saebench.sae.load import CheckpointError, load_sae

ATOL = 1e-5


def sparsify_forward(t: dict, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(encoder(x - b_dec)), keep the top k, decode with W_dec + b_dec."""
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    values, indices = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values)
    return z, z @ t["W_dec"] + t["b_dec"]


def test_matches_sparsify_equations(tmp_path, writers, x):
    t = writers.sparsify(tmp_path / "run", "layers.5")
    sae = load_sae(tmp_path / "run" / "layers.5")
    z_ref, x_hat_ref = sparsify_forward(t, 4, x)
    assert torch.allclose(sae.encode(x), z_ref, atol=ATOL)
    assert torch.allclose(sae(x), x_hat_ref, atol=ATOL)
    info = sae.info
    assert (info.format, info.architecture, info.layer, info.site_name) == ("sparsify", "topk", 5, "layers.5")
    assert (info.model_name, info.context_size) == ("HuggingFaceTB/SmolLM2-135M", 256)


@pytest.mark.parametrize(
    ("hookpoint", "layer"), [("model.layers.7", 7), ("gpt_neox.layers.2", 2), ("h.0", 0)]
)
def test_module_paths_name_the_block(tmp_path, writers, hookpoint, layer):
    writers.sparsify(tmp_path, hookpoint)
    assert load_sae(tmp_path / hookpoint).info.layer == layer


def test_matches_sparsify_library(tmp_path, writers, x, sparsify_lib):
    writers.sparsify(tmp_path, "layers.5")
    reference = sparsify_lib.load_from_disk(tmp_path / "layers.5")
    sae = load_sae(tmp_path / "layers.5")
    with torch.no_grad():
        top_acts, top_indices, _ = reference.encode(x)
        x_hat_ref = reference.decode(top_acts, top_indices)
    codes = sae.reconstruct(x).codes
    z_ref = torch.zeros(x.shape[0], sae.n_latents).scatter(-1, top_indices, top_acts)
    assert torch.allclose(codes.to_dense(sae.n_latents), z_ref, atol=ATOL)
    assert torch.allclose(sae(x), x_hat_ref, atol=ATOL)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"activation": "groupmax"}, "activation 'groupmax' is not supported"),
        ({"skip_connection": True}, "skip connections"),
        ({"transcode": True}, "transcoder"),
        ({"k": 25}, "k=25 exceeds the number of latents n=24"),
    ],
)
def test_refuses_what_the_sae_cannot_represent(tmp_path, writers, cfg, message):
    writers.sparsify(tmp_path, "layers.1", cfg_extra=cfg)
    with pytest.raises(CheckpointError, match=message):
        load_sae(tmp_path / "layers.1")
