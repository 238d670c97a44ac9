"""load_sae: format detection, the checks and their messages, find_checkpoints, check_width."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from saebench.sae.formats.native import save_native
from saebench.sae.load import CheckpointError, check_width, find_checkpoints, load_sae
from saebench.sae.sae import SAE


def _native(folder, d=8, n=24):
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.randn(n, d, generator=gen)
    sae = SAE(
        torch.randn(d, n, generator=gen),
        torch.zeros(n),
        W_dec / W_dec.norm(dim=-1, keepdim=True),
        torch.zeros(d),
        activation="topk",
        k=4,
    )
    return save_native(sae, folder)


def test_detects_each_format_without_flags(tmp_path, writers):
    writers.saelens(tmp_path / "saelens")
    writers.sparsify(tmp_path / "sparsify", "layers.2")
    writers.dictionary_learning(tmp_path / "dl" / "trainer_0", "BatchTopKSAE")
    writers.openai(tmp_path / "openai" / "resid_post_mlp" / "1.pt")
    _native(tmp_path / "native")
    expected = {
        "saelens": "saelens",
        "sparsify/layers.2": "sparsify",
        "dl/trainer_0": "dictionary_learning",
        "dl/trainer_0/ae.pt": "dictionary_learning",
        "openai/resid_post_mlp/1.pt": "openai",
        "native": "native",
        "native/cfg.json": "native",
        "saelens/cfg.json": "saelens",
    }
    for rel, fmt in expected.items():
        sae = load_sae(tmp_path / rel)
        assert sae.info.format == fmt, rel
        assert sae.info.path == str(tmp_path / rel)


def test_device_and_dtype(tmp_path, writers):
    writers.saelens(tmp_path)
    sae = load_sae(tmp_path, device="cpu", dtype=torch.float64)
    assert sae.W_enc.dtype == torch.float64 and sae.b_pre.dtype == torch.float64


def test_unknown_format_lists_what_is_recognised(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(
        CheckpointError, match="unknown checkpoint format; recognised formats are native: .*saelens"
    ):
        load_sae(tmp_path)
    with pytest.raises(
        CheckpointError, match="unknown checkpoint format 'foo'; known formats: native, saelens"
    ):
        load_sae(tmp_path, format="foo")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_sae(tmp_path / "absent")


def _edit_saelens_weights(folder, edit):
    tensors = load_file(folder / "sae_weights.safetensors")
    edit(tensors)
    save_file(tensors, folder / "sae_weights.safetensors")


def test_missing_tensor(tmp_path, writers):
    writers.saelens(tmp_path)
    _edit_saelens_weights(tmp_path, lambda t: t.pop("b_dec"))
    with pytest.raises(
        CheckpointError, match=r"sae_weights.safetensors: missing tensor 'b_dec' needed by a SAELens"
    ):
        load_sae(tmp_path)


def test_shapes_that_disagree(tmp_path, writers):
    writers.saelens(tmp_path)
    _edit_saelens_weights(tmp_path, lambda t: t.update(W_dec=torch.randn(24, 9)))
    with pytest.raises(
        CheckpointError, match=r"shapes disagree: W_dec has shape \(24, 9\), but cfg.json d_in gives d=8"
    ):
        load_sae(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_weights(tmp_path, writers, bad):
    writers.saelens(tmp_path)
    _edit_saelens_weights(tmp_path, lambda t: t["W_enc"].__setitem__((3, 5), bad))
    with pytest.raises(CheckpointError, match="W_enc holds 1 NaN/inf values of 192"):
        load_sae(tmp_path)


def test_k_larger_than_n(tmp_path, writers):
    writers.saelens(tmp_path, "topk", k=25)
    with pytest.raises(CheckpointError, match="cfg.json: k=25 exceeds the number of latents n=24"):
        load_sae(tmp_path)


class Opaque:
    """Stands for any object a pickle would have to construct."""


def test_refuses_pickles_that_need_arbitrary_objects(tmp_path, writers):
    path = tmp_path / "resid_post_mlp" / "0.pt"
    state = writers.openai(path)
    torch.save({**state, "extra": Opaque()}, path)
    with pytest.raises(CheckpointError, match="0.pt: refusing to unpickle arbitrary objects"):
        load_sae(path)


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("blocks.3.hook_mlp_out", "site 'blocks.3.hook_mlp_out' is an MLP output"),
        ("blocks.3.hook_attn_out", "site 'blocks.3.hook_attn_out' is an attention output"),
        (
            "blocks.3.hook_resid_mid",
            r"site 'blocks.3.hook_resid_mid' is the residual stream between attention",
        ),
        ("blocks.3.attn.hook_z", r"site 'blocks.3.attn.hook_z' is attention head outputs \(hook_z\)"),
        ("blocks.0.hook_resid_pre", "site 'blocks.0.hook_resid_pre' is the embedding output"),
    ],
)
def test_refuses_sites_the_suite_cannot_hook(tmp_path, writers, hook, message):
    writers.saelens(tmp_path, hook=hook)
    with pytest.raises(CheckpointError, match=message):
        load_sae(tmp_path)


@pytest.mark.parametrize(("hook", "layer"), [("blocks.3.hook_resid_post", 3), ("blocks.3.hook_resid_pre", 2)])
def test_transformer_lens_hooks_map_to_the_block(tmp_path, writers, hook, layer):
    writers.saelens(tmp_path, hook=hook)
    assert load_sae(tmp_path).info.layer == layer


def test_other_formats_refuse_unhookable_sites(tmp_path, writers):
    writers.sparsify(tmp_path / "run", "layers.3.mlp")
    with pytest.raises(CheckpointError, match="site 'layers.3.mlp' is a submodule of a block"):
        load_sae(tmp_path / "run" / "layers.3.mlp")
    writers.dictionary_learning(tmp_path / "dl", "AutoEncoderTopK", submodule="attn_out_layer_3")
    with pytest.raises(CheckpointError, match="site 'attn_out_layer_3' is an attention output"):
        load_sae(tmp_path / "dl")


def test_warns_on_decoder_rows_that_are_not_unit_norm(tmp_path, writers):
    t = writers.saelens(tmp_path, unit_decoder=False)
    norms = t["W_dec"].norm(dim=-1)
    with pytest.warns(
        UserWarning, match=f"not unit norm \\(norms from {norms.min():.4g} to {norms.max():.4g}\\)"
    ):
        load_sae(tmp_path)
    writers.saelens(tmp_path, unit_decoder=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_sae(tmp_path)


def test_check_width(tmp_path, writers):
    writers.saelens(tmp_path)
    sae = load_sae(tmp_path)
    check_width(sae, 8)
    with pytest.raises(
        CheckpointError, match="d_in=8 does not match the model's residual width 576 .*model gpt2"
    ):
        check_width(sae, 576)


def test_find_checkpoints_in_nested_folders(tmp_path, writers):
    run = tmp_path / "sparsify_run"
    for layer in (10, 2):
        writers.sparsify(run, f"layers.{layer}")
    torch.save({"step": torch.tensor(1)}, run / "optimizer_0.pt")  # training state, not a checkpoint
    for i in (1, 0):
        writers.dictionary_learning(tmp_path / "dl" / f"trainer_{i}", "AutoEncoderTopK")
        torch.save({"x": torch.zeros(1)}, tmp_path / "dl" / f"trainer_{i}" / "checkpoints_ae_100.pt")
    writers.openai(tmp_path / "openai" / "resid_post_mlp" / "11.pt")
    writers.openai(tmp_path / "openai" / "resid_post_mlp" / "9.pt")
    writers.saelens(tmp_path / "saelens" / "final_1000")
    (tmp_path / "saelens" / "final_1000" / "trainer_state.pt").write_bytes(b"")
    _native(tmp_path / "native")
    (tmp_path / "empty").mkdir()

    rel = [p.relative_to(tmp_path).as_posix() for p in find_checkpoints(tmp_path)]
    assert rel == [
        "dl/trainer_0",
        "dl/trainer_1",
        "native",
        "openai/resid_post_mlp/9.pt",
        "openai/resid_post_mlp/11.pt",
        "saelens/final_1000",
        "sparsify_run/layers.2",
        "sparsify_run/layers.10",
    ]
    assert find_checkpoints(run / "layers.2") == [run / "layers.2"]
    with pytest.raises(CheckpointError, match="empty: no checkpoint found here or below"):
        find_checkpoints(tmp_path / "empty")


def test_dictionary_learning_without_config_says_why_it_is_needed(tmp_path, writers):
    writers.dictionary_learning(tmp_path, "BatchTopKSAE")
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file is missing; .* name the dict_class"):
        load_sae(tmp_path)


def test_messages_are_one_line(tmp_path, writers):
    writers.saelens(tmp_path, hook="blocks.1.hook_mlp_out")
    with pytest.raises(CheckpointError) as err:
        load_sae(tmp_path)
    assert "\n" not in str(err.value)
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["hook_name"] in str(err.value)
