"""dictionary_learning checkpoints: the loaded SAE matches the library's equations and classes."""

from __future__ import annotations

import pytest
import torch

from saebench.sae.load import CheckpointError, load_sae

ATOL = 1e-5


def dictionary_learning_forward(dict_class: str, t: dict, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction by each dict_class's encode/decode, written out from the library's code."""
    if dict_class == "AutoEncoder":
        z = torch.relu((x - t["bias"]) @ t["encoder.weight"].T + t["encoder.bias"])
        return z @ t["decoder.weight"].T + t["bias"]
    if dict_class == "AutoEncoderNew":
        return (
            torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"]) @ t["decoder.weight"].T
            + t["decoder.bias"]
        )
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        p = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
        if dict_class == "AutoEncoderTopK":
            values, indices = p.topk(int(t["k"]), dim=-1)
            z = torch.zeros_like(p).scatter(-1, indices, values)
        else:
            z = p * (p > t["threshold"])
        return z @ t["decoder.weight"].T + t["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        p = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        return (p * (p > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    if dict_class == "JumpReluAutoEncoder":
        p = x @ t["W_enc"] + t["b_enc"]
        return torch.relu(p * (p > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    e = (x - t["decoder_bias"]) @ t["encoder.weight"].T
    z = ((e + t["gate_bias"]) > 0) * torch.relu(t["r_mag"].exp() * e + t["mag_bias"])
    return z @ t["decoder.weight"].T + t["decoder_bias"]


CLASSES = [
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
    "GatedAutoEncoder",
]


@pytest.mark.parametrize("dict_class", CLASSES)
def test_matches_library_equations(tmp_path, writers, x, dict_class):
    t = writers.dictionary_learning(tmp_path / "trainer_0", dict_class)
    sae = load_sae(tmp_path / "trainer_0")
    assert torch.allclose(sae(x), dictionary_learning_forward(dict_class, t, x), atol=ATOL)
    assert (sae.info.format, sae.info.architecture, sae.info.layer) == ("dictionary_learning", dict_class, 4)
    assert (sae.info.model_name, sae.info.context_size) == ("EleutherAI/pythia-70m-deduped", 128)
    assert sae.encode(x).count_nonzero() > 0


@pytest.mark.parametrize("dict_class", CLASSES)
def test_matches_library_classes(tmp_path, writers, x, dictionary_learning_lib, dict_class):
    writers.dictionary_learning(tmp_path, dict_class)
    reference = getattr(dictionary_learning_lib, dict_class).from_pretrained(str(tmp_path / "ae.pt"))
    sae = load_sae(tmp_path / "ae.pt")
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), reference.encode(x), atol=ATOL)
        assert torch.allclose(sae(x), reference(x), atol=ATOL)


def test_batchtopk_without_threshold_encodes_with_relu_and_warns(tmp_path, writers, x):
    t = writers.dictionary_learning(tmp_path, "BatchTopKSAE", threshold=-1.0)
    with pytest.warns(UserWarning, match="threshold was never set"):
        sae = load_sae(tmp_path)
    assert torch.allclose(sae(x), dictionary_learning_forward("BatchTopKSAE", t, x), atol=ATOL)


def test_k_disagreeing_with_config_is_refused(tmp_path, writers):
    writers.dictionary_learning(tmp_path, "AutoEncoderTopK", config_k=8)
    with pytest.raises(CheckpointError, match="trainer k=8 disagrees with k=4"):
        load_sae(tmp_path)


@pytest.mark.parametrize(("submodule", "layer"), [("resid_post_layer_9", 9), ("resid_pre_layer_9", 8)])
def test_submodule_names_the_layer(tmp_path, writers, submodule, layer):
    writers.dictionary_learning(tmp_path, "AutoEncoderTopK", submodule=submodule)
    assert load_sae(tmp_path).info.layer == layer
