"""Small checkpoints written in each library's documented on-disk layout, and the libraries themselves.

Writers return the tensors they wrote so tests can run the library's equations on them directly.  The
`*_lib` fixtures import a library's model code where it is installed (`pip install --no-deps ...`), skipping
package __init__ files that pull in training-only dependencies (wandb, nnsight).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from tests import requires

D, N, K = 8, 24, 4


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True)


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def write_saelens(
    folder: Path,
    architecture: str = "standard",
    *,
    k: int = K,
    normalize="none",
    apply_b_dec: bool = True,
    rescale: bool = False,
    flat: bool = False,
    hook: str = "blocks.3.hook_resid_post",
    log_threshold: bool = False,
    unit_decoder: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """SAELens: cfg.json (v6 nested metadata, or the flat pre-v6 keys) + sae_weights.safetensors."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = _rand(gen, N, D)
    t = {
        "W_enc": _rand(gen, D, N, scale=0.5),
        "W_dec": _unit_rows(W_dec) if unit_decoder else W_dec * 0.7,
        "b_dec": _rand(gen, D, scale=0.2),
    }
    if architecture == "gated":
        t.update(
            b_gate=_rand(gen, N, scale=0.3), b_mag=_rand(gen, N, scale=0.3), r_mag=_rand(gen, N, scale=0.3)
        )
    else:
        t["b_enc"] = _rand(gen, N, scale=0.3)
    if architecture == "jumprelu":
        threshold = torch.rand(N, generator=gen) * 0.8 + 0.05
        t["log_threshold" if log_threshold else "threshold"] = threshold.log() if log_threshold else threshold
    if architecture == "batchtopk":
        t["topk_threshold"] = torch.tensor(0.4)
    if flat:
        cfg = {
            "d_in": D,
            "d_sae": N,
            "dtype": "float32",
            "hook_point": hook,
            "model_name": "gpt2",
            "context_size": 128,
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": normalize,
            "activation_fn_str": "topk" if architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": k} if architecture == "topk" else {},
            "sae_lens_training_version": "3.13.0",
        }
        if architecture not in ("standard", "topk"):
            cfg["architecture"] = architecture
    else:
        cfg = {
            "d_in": D,
            "d_sae": N,
            "dtype": "float32",
            "device": "cpu",
            "architecture": architecture,
            "apply_b_dec_to_input": apply_b_dec,
            "normalize_activations": normalize,
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": "6.5.0",
                "model_name": "gpt2",
                "hook_name": hook,
                "context_size": 128,
                "prepend_bos": True,
            },
        }
        if architecture == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=rescale)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def write_sparsify(
    run: Path, hookpoint: str = "layers.5", *, k: int = K, cfg_extra: dict | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """sparsify: <run>/<hookpoint>/{cfg.json, sae.safetensors} and the run's config.json."""
    gen = torch.Generator().manual_seed(seed)
    t = {
        "encoder.weight": _rand(gen, N, D, scale=0.5),
        "encoder.bias": _rand(gen, N, scale=0.3),
        "W_dec": _unit_rows(_rand(gen, N, D)),
        "b_dec": _rand(gen, D, scale=0.2),
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": N // D,
        "normalize_decoder": True,
        "num_latents": N,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    cfg.update(cfg_extra or {})
    folder = run / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (run / "config.json").write_text(
        json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "ctx_len": 256, "hookpoints": [hookpoint]})
    )
    return t


def write_dictionary_learning(
    folder: Path,
    dict_class: str,
    *,
    k: int = K,
    submodule: str = "resid_post_layer_4",
    config_k: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """dictionary_learning: trainer_<i>/ae.pt (a torch state dict) + config.json."""
    gen = torch.Generator().manual_seed(seed)
    linear = {
        "encoder.weight": _rand(gen, N, D, scale=0.5),
        "encoder.bias": _rand(gen, N, scale=0.3),
        "decoder.weight": _unit_rows(_rand(gen, N, D)).T.contiguous(),
    }
    if dict_class == "AutoEncoder":
        linear["decoder.weight"] = linear["decoder.weight"] * (torch.rand(N, generator=gen) + 0.5)
        t = {**linear, "bias": _rand(gen, D, scale=0.2)}
    elif dict_class == "AutoEncoderNew":
        t = {**linear, "decoder.bias": _rand(gen, D, scale=0.2)}
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        t = {
            **linear,
            "b_dec": _rand(gen, D, scale=0.2),
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(threshold),
        }
    elif dict_class in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        t = {
            "W_enc": _rand(gen, D, N, scale=0.5),
            "b_enc": _rand(gen, N, scale=0.3),
            "W_dec": _unit_rows(_rand(gen, N, D)),
            "b_dec": _rand(gen, D, scale=0.2),
        }
        if dict_class == "JumpReluAutoEncoder":
            t["threshold"] = torch.rand(N, generator=gen) * 0.8
        else:
            t.update(
                k=torch.tensor(k, dtype=torch.int),
                threshold=torch.tensor(threshold),
                group_sizes=torch.tensor([N // 4, N // 4, N // 2]),
            )
    elif dict_class == "GatedAutoEncoder":
        t = {
            "decoder_bias": _rand(gen, D, scale=0.2),
            "encoder.weight": linear["encoder.weight"],
            "r_mag": _rand(gen, N, scale=0.3),
            "gate_bias": _rand(gen, N, scale=0.3),
            "mag_bias": _rand(gen, N, scale=0.3),
            "decoder.weight": linear["decoder.weight"],
        }
    else:
        raise AssertionError(dict_class)
    trainer = {
        "trainer_class": "TopKTrainer",
        "dict_class": dict_class,
        "activation_dim": D,
        "dict_size": N,
        "layer": 4,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "submodule_name": submodule,
        "seed": 0,
    }
    if "k" in t:
        trainer["k"] = k if config_k is None else config_k
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(t, folder / "ae.pt")
    config = {"trainer": trainer, "buffer": {"d_submodule": D, "io": "out", "n_ctxs": 100, "ctx_len": 128}}
    (folder / "config.json").write_text(json.dumps(config))
    return t


def write_openai(path: Path, activation: str = "TopK", *, k: int = K, seed: int = 0) -> dict:
    """OpenAI sparse_autoencoder: one .pt dict per (location, layer)."""
    gen = torch.Generator().manual_seed(seed)
    state = {
        "pre_bias": _rand(gen, D, scale=0.2),
        "latent_bias": _rand(gen, N, scale=0.3),
        "stats_last_nonzero": torch.zeros(N, dtype=torch.long),
        "latents_activation_frequency": torch.ones(N),
        "latents_mean_square": torch.zeros(N),
        "encoder.weight": _rand(gen, N, D, scale=0.5),
        "decoder.weight": _unit_rows(_rand(gen, N, D)).T.contiguous(),
        "activation": activation,
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"} if activation == "TopK" else {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture
def writers() -> SimpleNamespace:
    return SimpleNamespace(
        saelens=write_saelens,
        sparsify=write_sparsify,
        dictionary_learning=write_dictionary_learning,
        openai=write_openai,
    )


@pytest.fixture
def x() -> torch.Tensor:
    """Residual-like inputs: an offset, a spread of scales, and one token at 30x the others."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, D, generator=gen) * 2 + 0.7
    x[0] *= 30
    return x


# --- the libraries, where installed ------------------------------------------------------------------------


def _package_without_init(name: str, dist: str) -> Path:
    """Register package NAME without running its __init__, so its submodules import on their own."""
    root = Path(str(requires.distribution(dist).locate_file(name)))
    module = types.ModuleType(name)
    module.__path__ = [str(root)]
    sys.modules[name] = module
    return root


@pytest.fixture(scope="session")
def saelens_lib():
    """sae_lens' SAE classes and its disk loader (needs transformer-lens<4, jaxtyping, better-abc)."""
    for needed in ("transformer_lens", "jaxtyping", "better_abc"):
        requires.module(needed, "make setup setup-peers")
    if "sae_lens" not in sys.modules:
        _package_without_init("sae_lens", "sae-lens")
        sys.modules["sae_lens"].__version__ = importlib.metadata.version("sae-lens")
        sys.modules["sae_lens"].logger = logging.getLogger("sae_lens")
    from sae_lens.registry import register_sae_class
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    for name, cls, cfg in [
        ("standard", StandardSAE, StandardSAEConfig),
        ("topk", TopKSAE, TopKSAEConfig),
        ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig),
        ("gated", GatedSAE, GatedSAEConfig),
    ]:
        try:
            register_sae_class(name, cls, cfg)
        except ValueError:  # already registered by a real `import sae_lens`
            pass
    return SAE


@pytest.fixture(scope="session")
def dictionary_learning_lib():
    """dictionary_learning's model classes (its package __init__ imports nnsight, which is not needed)."""
    if "dictionary_learning" not in sys.modules:
        _package_without_init("dictionary_learning", "dictionary-learning")
    from dictionary_learning.dictionary import (
        AutoEncoder,
        AutoEncoderNew,
        GatedAutoEncoder,
        JumpReluAutoEncoder,
    )
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    return SimpleNamespace(
        AutoEncoder=AutoEncoder,
        AutoEncoderNew=AutoEncoderNew,
        GatedAutoEncoder=GatedAutoEncoder,
        JumpReluAutoEncoder=JumpReluAutoEncoder,
        AutoEncoderTopK=AutoEncoderTopK,
        BatchTopKSAE=BatchTopKSAE,
        MatryoshkaBatchTopKSAE=MatryoshkaBatchTopKSAE,
    )


@pytest.fixture(scope="session")
def sparsify_lib():
    """sparsify's SparseCoder, with its triton decoder disabled (it fails on CPU)."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    return requires.module("sparsify", "make setup setup-peers").SparseCoder
