"""The native format: save_native then load_sae gives back the same SAE, facts and all."""

from __future__ import annotations

import json

import pytest
import torch

from saebench.sae.formats.native import save_native
from saebench.sae.load import CheckpointError, load_sae
from saebench.sae.sae import SAE, Normalization, SAEInfo

D, N = 8, 24


def _sae(activation: str, normalization: Normalization) -> SAE:
    gen = torch.Generator().manual_seed(3)
    extra = {}
    if activation == "topk":
        extra["k"] = 5
    if activation == "jumprelu":
        extra["threshold"] = torch.rand(N, generator=gen)
    if activation == "gated":
        extra.update(r_mag=torch.randn(N, generator=gen) * 0.3, b_mag=torch.randn(N, generator=gen) * 0.3)
    W_dec = torch.randn(N, D, generator=gen)
    return SAE(
        torch.randn(D, N, generator=gen) * 0.5,
        torch.randn(N, generator=gen) * 0.3,
        W_dec / W_dec.norm(dim=-1, keepdim=True),
        torch.randn(D, generator=gen) * 0.2,
        activation=activation,
        b_pre=torch.randn(D, generator=gen) * 0.2,
        normalization=normalization,
        info=SAEInfo(architecture=f"my-{activation}", model_name="smollm2-135m", layer=7, context_size=256),
        **extra,
    )


@pytest.mark.parametrize(
    ("activation", "normalization"),
    [
        ("relu", Normalization()),
        ("topk", Normalization("layer_norm", undo_with_eps=False)),
        ("jumprelu", Normalization("constant", scale=0.125)),
        ("gated", Normalization("token_norm")),
    ],
)
def test_round_trip(tmp_path, x, activation, normalization):
    sae = _sae(activation, normalization)
    folder = save_native(sae, tmp_path / "ckpt", training={"tokens": 1000, "lr": 4e-4, "seed": 0})
    loaded = load_sae(folder)
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.normalization == normalization
    assert (loaded.activation, loaded.k) == (activation, sae.k)
    info = loaded.info
    assert (
        info.format,
        info.architecture,
        info.model_name,
        info.layer,
        info.site_name,
        info.context_size,
    ) == ("native", f"my-{activation}", "smollm2-135m", 7, "resid_post", 256)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["format"] == "saebench" and cfg["format_version"] == 1
    assert cfg["training"] == {"tokens": 1000, "lr": 4e-4, "seed": 0}
    assert (cfg["d_in"], cfg["n_latents"], cfg["site"]) == (D, N, "resid_post")


def test_overwrite_is_atomic_and_leaves_no_temporaries(tmp_path, x):
    first, second = _sae("relu", Normalization()), _sae("topk", Normalization())
    save_native(first, tmp_path / "ckpt")
    save_native(second, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load_sae(tmp_path / "ckpt")(x), second(x))


def test_training_that_is_not_json_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_native(
            _sae("relu", Normalization()), tmp_path / "ckpt", training={"device": torch.device("cpu")}
        )
    assert not any(tmp_path.iterdir())


def test_newer_format_version_is_refused(tmp_path):
    folder = save_native(_sae("relu", Normalization()), tmp_path / "ckpt")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "format_version": 2}))
    with pytest.raises(CheckpointError, match="format_version 2 is not 1"):
        load_sae(folder)
