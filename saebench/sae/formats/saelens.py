"""SAELens (PyPI `sae-lens`): a folder with `cfg.json` and `sae_weights.safetensors`.

Tensors W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d); jumprelu adds threshold (n) (older files:
log_threshold, threshold = exp(log_threshold)); gated has b_gate, b_mag, r_mag and no b_enc; BatchTopK
training checkpoints keep a scalar topk_threshold that SAELens turns into a jumprelu threshold on export.

With sae_in = norm(x) - b_dec * apply_b_dec_to_input and pre = sae_in @ W_enc + b_enc:

    standard   z = relu(pre)
    topk       z = relu(topk_k(pre))       rescale_acts_by_decoder_norm: pre * ||W_dec_i||, then
                                           z / ||W_dec_i|| before the decoder; folded here as
                                           W_enc * ||W_dec_i||, b_enc * ||W_dec_i||, W_dec / ||W_dec_i||,
                                           which is the same map
    jumprelu   z = relu(pre) * (pre > threshold)
    gated      z = 1[sae_in @ W_enc + b_gate > 0] * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)
    x_hat = denorm(z @ W_dec + b_dec)

normalize_activations: none; expected_average_only_in (x * s, with s from the training checkpoint's
activation_scaler.json; SAELens folds s into the weights of finished SAEs and then says none);
constant_norm_rescale (x * sqrt(d) / ||x||); layer_norm ((x - mean) / (std + 1e-5), undone with std alone).
Configs from before v6 are flat (hook_point, activation_fn_str, activation_fn_kwargs.k, boolean
normalize_activations); v6 nests model facts under `metadata`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from saebench.sae.formats.common import (
    CheckpointError,
    CheckpointFormat,
    check_k,
    check_shapes,
    folder_of,
    layer_from_transformer_lens,
    read_json,
    read_safetensors,
    require,
    unhookable,
)
from saebench.sae.sae import SAE, Normalization, SAEInfo

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SCALER = "activation_scaler.json"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk")


def detect(path: Path) -> bool:
    return folder_of(path, (CONFIG, WEIGHTS)) is not None


def load(path: Path) -> SAE:
    folder = path if path.is_dir() else path.parent
    cfg_file, weights_file = folder / CONFIG, folder / WEIGHTS
    cfg = read_json(cfg_file)
    meta = cfg.get("metadata") or {}

    def fact(key, *old_keys):
        """A model fact: v6 keeps it under metadata, older configs at the top level."""
        for source, name in [(meta, key), (cfg, key)] + [(cfg, old) for old in old_keys]:
            if source.get(name) is not None:
                return source[name]
        return None

    architecture = cfg.get("architecture") or "standard"
    activation_fn = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    k = cfg.get("k")
    if activation_fn == "topk" and architecture == "standard":  # pre-v6: TopK was a standard SAE's activation
        architecture, k = "topk", (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    elif architecture == "standard" and activation_fn != "relu":
        raise CheckpointError(
            f"{cfg_file}: activation function {activation_fn!r} is not supported (relu, topk)"
        )
    if architecture not in ARCHITECTURES:
        raise CheckpointError(
            f"{cfg_file}: SAELens architecture {architecture!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )

    hook = fact("hook_name", "hook_point")
    if cfg.get("reshape_activations") == "hook_z" or (hook and hook.endswith("hook_z")):
        raise unhookable(cfg_file, hook or "hook_z", "attention head outputs (hook_z)")
    if fact("hook_head_index", "hook_point_head_index") is not None:
        raise unhookable(cfg_file, hook, "a single attention head")
    layer = layer_from_transformer_lens(cfg_file, hook) if hook else None

    t = read_safetensors(weights_file)
    _drop_unit_scaling_factor(weights_file, t)
    gate_bias = "b_gate" if architecture == "gated" else "b_enc"
    needed = ("W_enc", gate_bias, "W_dec", "b_dec")
    if architecture == "gated":
        needed += ("r_mag", "b_mag")
    elif architecture == "jumprelu":
        needed += ("log_threshold",) if "log_threshold" in t else ("threshold",)
    elif architecture in ("batchtopk", "matryoshka_batchtopk"):
        needed += ("topk_threshold",)
    require(weights_file, t, needed, f"a SAELens {architecture} SAE")
    shapes = {"W_enc": ("d", "n"), gate_bias: ("n",), "W_dec": ("n", "d"), "b_dec": ("d",)}
    shapes.update(
        {name: ("n",) for name in ("r_mag", "b_mag", "threshold", "log_threshold") if name in needed}
    )
    if "topk_threshold" in needed:
        shapes["topk_threshold"] = ()
    known = {}
    if "d_in" in cfg:
        known["d"] = (cfg["d_in"], "cfg.json d_in")
    if "d_sae" in cfg:
        known["n"] = (cfg["d_sae"], "cfg.json d_sae")
    sizes = check_shapes(weights_file, t, shapes, known)

    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t[gate_bias], t["W_dec"], t["b_dec"]
    kwargs: dict = {}
    if architecture == "topk":
        kwargs = {"activation": "topk", "k": check_k(cfg_file, k, sizes["n"])}
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    elif architecture == "jumprelu":
        threshold = t["threshold"] if "threshold" in t else t["log_threshold"].exp()
        kwargs = {"activation": "jumprelu", "threshold": threshold}
    elif architecture in ("batchtopk", "matryoshka_batchtopk"):
        kwargs = {"activation": "jumprelu", "threshold": t["topk_threshold"].expand(sizes["n"])}
    elif architecture == "gated":
        kwargs = {"activation": "gated", "r_mag": t["r_mag"], "b_mag": t["b_mag"]}
    else:
        kwargs = {"activation": "relu"}

    info = SAEInfo(
        format="saelens",
        architecture=architecture,
        model_name=fact("model_name"),
        layer=layer,
        site_name=hook,
        context_size=fact("context_size"),
        extra=cfg,
    )
    return SAE(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        b_pre=b_dec if cfg.get("apply_b_dec_to_input", True) else None,
        normalization=_normalization(folder, cfg_file, cfg.get("normalize_activations")),
        info=info,
        **kwargs,
    )


def _normalization(folder: Path, cfg_file: Path, kind) -> Normalization:
    if kind in (None, False, "none"):
        return Normalization()
    if kind in (True, "expected_average_only_in"):
        scale = read_json(folder / SCALER).get("scaling_factor") if (folder / SCALER).is_file() else None
        if scale is None:
            raise CheckpointError(
                f"{cfg_file}: normalize_activations is expected_average_only_in but no scaling factor was "
                f"found; fold it into the weights (SAELens fold_activation_norm_scaling_factor) or add "
                f'{SCALER} {{"scaling_factor": s}} beside it'
            )
        return Normalization("constant", scale=float(scale))
    if kind == "constant_norm_rescale":
        return Normalization("token_norm")
    if kind == "layer_norm":
        return Normalization("layer_norm", eps=1e-5, unbiased=True, undo_with_eps=False)
    raise CheckpointError(
        f"{cfg_file}: normalize_activations {kind!r} is not supported (none, expected_average_only_in, "
        "constant_norm_rescale, layer_norm); fold it into the weights with SAELens first"
    )


def _drop_unit_scaling_factor(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Old SAELens files may carry a fine-tuning `scaling_factor`; all ones means none was used."""
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise CheckpointError(
            f"{file}: a fine-tuning scaling_factor other than 1 is not supported; "
            "fold it into W_dec's rows first"
        )


FORMAT = CheckpointFormat(
    name="saelens",
    needs=f"a folder with {CONFIG} and {WEIGHTS}",
    detect=detect,
    load=load,
)
