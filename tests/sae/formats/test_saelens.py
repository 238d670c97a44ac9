"""SAELens checkpoints: the loaded SAE matches SAELens' equations, and SAELens itself where installed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saebench.sae.load import CheckpointError, load_sae

ATOL = 1e-5


def saelens_forward(t: dict, cfg: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, reconstruction) by SAELens' equations, written out from its StandardSAE/TopKSAE/... code."""
    d = x.shape[-1]
    norm = cfg["normalize_activations"]
    if norm in ("none", False):
        sae_in, undo = x, lambda y: y
    elif norm == "constant_norm_rescale":
        coeff = math.sqrt(d) / x.norm(dim=-1, keepdim=True)
        sae_in, undo = x * coeff, lambda y: y / coeff
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        sae_in, undo = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    elif norm == "expected_average_only_in":
        s = cfg["scaling_factor"]
        sae_in, undo = x * s, lambda y: y / s
    sae_in = sae_in - t["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg.get("architecture", "standard")
    W_dec = t["W_dec"]
    if arch == "gated":
        active = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        z = active * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = sae_in @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            if cfg.get("rescale_acts_by_decoder_norm"):
                pre = pre * W_dec.norm(dim=-1)
            values, indices = pre.topk(cfg["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        elif arch == "jumprelu":
            threshold = t["threshold"] if "threshold" in t else t["log_threshold"].exp()
            z = torch.relu(pre) * (pre > threshold)
        elif arch == "batchtopk":
            z = torch.relu(pre) * (pre > t["topk_threshold"])
        else:
            z = torch.relu(pre)
    if cfg.get("rescale_acts_by_decoder_norm"):
        return z, undo((z / W_dec.norm(dim=-1)) @ W_dec + t["b_dec"])
    return z, undo(z @ W_dec + t["b_dec"])


CASES = [
    ("standard", "none", {}),
    ("standard", "constant_norm_rescale", {"apply_b_dec": False}),
    ("standard", "layer_norm", {}),
    ("topk", "none", {}),
    ("topk", "layer_norm", {"rescale": True, "unit_decoder": False}),
    ("jumprelu", "none", {}),
    ("jumprelu", "none", {"log_threshold": True}),
    ("gated", "none", {}),
    ("batchtopk", "none", {}),
]


@pytest.mark.parametrize(("architecture", "normalize", "options"), CASES)
def test_matches_saelens_equations(tmp_path, writers, x, architecture, normalize, options):
    t = writers.saelens(tmp_path, architecture, normalize=normalize, **options)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    z_ref, x_hat_ref = saelens_forward(t, {**cfg, **cfg["metadata"]}, x)

    sae = load_sae(tmp_path)
    assert sae.info.format == "saelens" and sae.info.architecture == architecture
    assert torch.allclose(sae.encode(x), z_ref, atol=ATOL)
    assert torch.allclose(sae(x), x_hat_ref, atol=ATOL)
    assert torch.allclose(sae.decode(sae.encode(x), x), x_hat_ref, atol=ATOL)
    assert (z_ref != 0).sum(-1).float().mean() > 0  # the comparison is not between two all-zero codes


def test_flat_pre_v6_topk_config(tmp_path, writers, x):
    t = writers.saelens(tmp_path, "topk", normalize=False, flat=True, hook="blocks.6.hook_resid_pre")
    sae = load_sae(tmp_path)
    _, x_hat_ref = saelens_forward(
        t, {"architecture": "topk", "k": 4, "normalize_activations": "none", "apply_b_dec_to_input": True}, x
    )
    assert (sae.activation, sae.k) == ("topk", 4)
    assert torch.allclose(sae(x), x_hat_ref, atol=ATOL)
    assert (sae.info.layer, sae.info.site_name, sae.info.model_name, sae.info.context_size) == (
        5,
        "blocks.6.hook_resid_pre",
        "gpt2",
        128,
    )


def test_expected_average_only_in_reads_the_training_scaler(tmp_path, writers, x):
    t = writers.saelens(tmp_path, "standard", normalize="expected_average_only_in")
    with pytest.raises(CheckpointError, match="expected_average_only_in but no scaling factor"):
        load_sae(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(
        json.dumps({"scaling_factor": 0.25, "has_whitening": False})
    )
    cfg = {
        "normalize_activations": "expected_average_only_in",
        "scaling_factor": 0.25,
        "apply_b_dec_to_input": True,
    }
    _, x_hat_ref = saelens_forward(t, cfg, x)
    assert torch.allclose(load_sae(tmp_path)(x), x_hat_ref, atol=ATOL)


# SAELens' inference classes cannot load BatchTopK training checkpoints or log_threshold (its training
# classes convert them); the equations above cover those.
LIBRARY_CASES = [c for c in CASES if c[0] != "batchtopk" and not c[2].get("log_threshold")]


@pytest.mark.parametrize(("architecture", "normalize", "options"), LIBRARY_CASES)
def test_matches_saelens_library(tmp_path, writers, x, saelens_lib, architecture, normalize, options):
    writers.saelens(tmp_path, architecture, normalize=normalize, **options)
    reference = saelens_lib.load_from_disk(tmp_path)
    sae = load_sae(tmp_path)
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), reference.encode(x), atol=ATOL)
        assert torch.allclose(sae(x), reference(x), atol=ATOL)


def test_refuses_unsupported_architecture(tmp_path, writers):
    writers.saelens(tmp_path, "standard")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "skip_transcoder"}))
    with pytest.raises(CheckpointError, match="architecture 'skip_transcoder' is not supported"):
        load_sae(tmp_path)
