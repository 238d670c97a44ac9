"""dictionary_learning (PyPI `dictionary-learning`): `trainer_<i>/ae.pt` (a state dict) + `config.json`.

config.json holds {"trainer": {"dict_class", "activation_dim", "dict_size", "k", "layer", "lm_name",
"submodule_name", ...}, "buffer": {"ctx_len", "io", ...}}.  Training divided activations by a norm factor
that is folded into the biases at save time: the saved model works on raw activations.  Per dict_class
(W_e = encoder.weight (n, d), W_d = decoder.weight (d, n)):

    AutoEncoder              z = relu((x - bias) @ W_e.T + encoder.bias)        x_hat = z @ W_d.T + bias
                             (loading rescales each latent so decoder columns have unit norm, as the
                             library's from_pretrained does; x_hat is unchanged)
    AutoEncoderNew           z = relu(x @ W_e.T + encoder.bias)               x_hat = z @ W_d.T + decoder.bias
    AutoEncoderTopK          z = topk_k(relu((x - b_dec) @ W_e.T + encoder.bias)) x_hat = z @ W_d.T + b_dec
    BatchTopKSAE             p = relu((x - b_dec) @ W_e.T + encoder.bias); z = p * (p > threshold)
                             (inference uses the scalar threshold, as the library's encode does)
    MatryoshkaBatchTopKSAE   as BatchTopKSAE with W_enc (d, n), b_enc, W_dec (n, d)
    JumpReluAutoEncoder      p = x @ W_enc + b_enc; z = relu(p * (p > threshold))  x_hat = z @ W_dec + b_dec
    GatedAutoEncoder         e = (x - decoder_bias) @ W_e.T
                             z = 1[e + gate_bias > 0] * relu(exp(r_mag) e + mag_bias)
                             x_hat = z @ W_d.T + decoder_bias
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from saebench.sae.formats.common import (
    CheckpointError,
    CheckpointFormat,
    check_k,
    check_shapes,
    read_json,
    read_torch,
    require,
    unhookable,
)
from saebench.sae.sae import SAE, SAEInfo

WEIGHTS = "ae.pt"
CONFIG = "config.json"

LINEAR = {"encoder.weight": ("n", "d"), "encoder.bias": ("n",), "decoder.weight": ("d", "n")}
PARAMETERS = {
    "W_enc": ("d", "n"),
    "b_enc": ("n",),
    "W_dec": ("n", "d"),
    "b_dec": ("d",),
}
SHAPES = {
    "AutoEncoder": {**LINEAR, "bias": ("d",)},
    "AutoEncoderNew": {**LINEAR, "decoder.bias": ("d",)},
    "AutoEncoderTopK": {**LINEAR, "b_dec": ("d",), "k": (), "threshold": ()},
    "BatchTopKSAE": {**LINEAR, "b_dec": ("d",), "k": (), "threshold": ()},
    "MatryoshkaBatchTopKSAE": {**PARAMETERS, "k": (), "threshold": ()},
    "JumpReluAutoEncoder": {**PARAMETERS, "threshold": ("n",)},
    "GatedAutoEncoder": {
        "encoder.weight": ("n", "d"),
        "decoder.weight": ("d", "n"),
        "decoder_bias": ("d",),
        "r_mag": ("n",),
        "gate_bias": ("n",),
        "mag_bias": ("n",),
    },
}


def detect(path: Path) -> bool:
    if path.is_dir():
        return (path / WEIGHTS).is_file()
    return path.name == WEIGHTS and path.is_file()


def load(path: Path) -> SAE:
    folder = path if path.is_dir() else path.parent
    cfg_file, weights_file = folder / CONFIG, folder / WEIGHTS
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{cfg_file}: file is missing; dictionary_learning checkpoints need it to name the dict_class "
            "(AutoEncoderTopK and BatchTopKSAE store the same tensors)"
        )
    cfg = read_json(cfg_file)
    trainer = cfg.get("trainer") or {}
    dict_class = trainer.get("dict_class")
    if dict_class not in SHAPES:
        raise CheckpointError(
            f"{cfg_file}: dict_class {dict_class!r} is not supported; supported: {', '.join(SHAPES)}"
        )
    t = read_torch(weights_file)
    require(weights_file, t, tuple(SHAPES[dict_class]), f"a dictionary_learning {dict_class}")
    known = {}
    if trainer.get("activation_dim"):
        known["d"] = (trainer["activation_dim"], "config.json activation_dim")
    if trainer.get("dict_size"):
        known["n"] = (trainer["dict_size"], "config.json dict_size")
    sizes = check_shapes(weights_file, t, SHAPES[dict_class], known)
    kwargs = _convert(dict_class, t, weights_file, cfg_file, trainer, sizes["n"])

    buffer = cfg.get("buffer") or {}
    layer, site = _site(cfg_file, trainer, buffer)
    info = SAEInfo(
        format="dictionary_learning",
        architecture=dict_class,
        model_name=trainer.get("lm_name"),
        layer=layer,
        site_name=site,
        context_size=buffer.get("ctx_len"),
        extra=cfg,
    )
    return SAE(info=info, **kwargs)


def _convert(dict_class: str, t: dict, weights_file: Path, cfg_file: Path, trainer: dict, n: int) -> dict:
    """The library's tensors as keyword arguments of the internal SAE."""
    if dict_class == "AutoEncoder":
        W_e, b_e, W_d = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"]
        norms = W_d.norm(dim=0)
        if not torch.allclose(norms, torch.ones_like(norms)):
            W_e, b_e, W_d = W_e * norms[:, None], b_e * norms, W_d / norms
        return dict(W_enc=W_e.T, b_enc=b_e, W_dec=W_d.T, b_dec=t["bias"], b_pre=t["bias"], activation="relu")
    if dict_class == "AutoEncoderNew":
        return dict(
            W_enc=t["encoder.weight"].T,
            b_enc=t["encoder.bias"],
            W_dec=t["decoder.weight"].T,
            b_dec=t["decoder.bias"],
            activation="relu",
        )
    if dict_class == "GatedAutoEncoder":
        return dict(
            W_enc=t["encoder.weight"].T,
            b_enc=t["gate_bias"],
            W_dec=t["decoder.weight"].T,
            b_dec=t["decoder_bias"],
            b_pre=t["decoder_bias"],
            activation="gated",
            r_mag=t["r_mag"],
            b_mag=t["mag_bias"],
        )
    if dict_class == "JumpReluAutoEncoder":
        return dict(
            W_enc=t["W_enc"],
            b_enc=t["b_enc"],
            W_dec=t["W_dec"],
            b_dec=t["b_dec"],
            activation="jumprelu",
            threshold=t["threshold"],
        )

    k = int(t["k"])
    if trainer.get("k") is not None and trainer["k"] != k:
        raise CheckpointError(
            f"{cfg_file}: trainer k={trainer['k']} disagrees with k={k} stored in {WEIGHTS}"
        )
    check_k(weights_file, k, n)
    if dict_class == "MatryoshkaBatchTopKSAE":
        weights = dict(W_enc=t["W_enc"], b_enc=t["b_enc"], W_dec=t["W_dec"], b_dec=t["b_dec"])
    else:
        weights = dict(
            W_enc=t["encoder.weight"].T,
            b_enc=t["encoder.bias"],
            W_dec=t["decoder.weight"].T,
            b_dec=t["b_dec"],
        )
    weights["b_pre"] = weights["b_dec"]
    if dict_class == "AutoEncoderTopK":
        return dict(weights, activation="topk", k=k)
    threshold = t["threshold"]
    if float(threshold) < 0:
        warnings.warn(
            f"{weights_file}: {dict_class} threshold was never set ({float(threshold):g}); like the library, "
            "it then encodes with a plain ReLU, so L0 is not k",
            stacklevel=3,
        )
    return dict(weights, activation="jumprelu", threshold=threshold.expand(n))


_SUBMODULE = re.compile(r"^resid_(post|pre)_layer_(\d+)$")


def _site(cfg_file: Path, trainer: dict, buffer: dict) -> tuple[int | None, str | None]:
    """Layer L from submodule_name (resid_post_layer_8 -> 8) or from trainer.layer and buffer.io."""
    name = trainer.get("submodule_name")
    if name:
        match = _SUBMODULE.match(name)
        if match is not None:
            post, layer = match.group(1) == "post", int(match.group(2))
            if not post and layer == 0:
                raise unhookable(cfg_file, name, "the embedding output (block 0's input)")
            return (layer if post else layer - 1), name
        lowered = name.lower()
        for part, what in (
            ("attn", "an attention output"),
            ("mlp", "an MLP output"),
            ("embed", "an embedding"),
        ):
            if part in lowered:
                raise unhookable(cfg_file, name, what)
    layer = trainer.get("layer")
    if layer is None:
        return None, name
    if buffer.get("io", "out") == "in":
        if layer == 0:
            raise unhookable(cfg_file, name or "layer 0 input", "the embedding output (block 0's input)")
        return layer - 1, name
    if buffer.get("io", "out") != "out":
        raise unhookable(cfg_file, f"layer {layer} io={buffer['io']}", "not a block's output")
    return layer, name


FORMAT = CheckpointFormat(
    name="dictionary_learning",
    needs=f"a trainer folder with {WEIGHTS} and {CONFIG}",
    detect=detect,
    load=load,
)
