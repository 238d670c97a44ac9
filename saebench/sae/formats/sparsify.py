"""EleutherAI sparsify (PyPI `eai-sparsify`): `<run>/<hookpoint>/` with `cfg.json` and `sae.safetensors`.

Tensors encoder.weight (n, d), encoder.bias (n), W_dec (n, d), b_dec (d).  The hookpoint folder is an HF
module path (`layers.8`): the SAE reads the output of block 8.  The run folder's `config.json` names the
model (`model`) and context length (`ctx_len`) when the run was started from sparsify's CLI.

    z     = topk_k(relu((x - b_dec) @ encoder.weight.T + encoder.bias))
    x_hat = z @ W_dec + b_dec

No input normalisation.  groupmax activations, skip connections (W_skip) and transcoders are refused:
the internal SAE cannot represent them.
"""

from __future__ import annotations

import json
from pathlib import Path

from saebench.sae.formats.common import (
    CheckpointError,
    CheckpointFormat,
    check_k,
    check_shapes,
    folder_of,
    layer_from_module_path,
    read_json,
    read_safetensors,
    require,
)
from saebench.sae.sae import SAE, SAEInfo

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"


def detect(path: Path) -> bool:
    folder = folder_of(path, (CONFIG, WEIGHTS))
    if folder is None:
        return False
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "format" not in cfg and ("k" in cfg or "activation" in cfg)


def load(path: Path) -> SAE:
    folder = path if path.is_dir() else path.parent
    cfg_file, weights_file = folder / CONFIG, folder / WEIGHTS
    cfg = read_json(cfg_file)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise CheckpointError(
            f"{cfg_file}: sparsify activation {activation!r} is not supported: only topk fits the SAE"
        )
    if cfg.get("transcode"):
        raise CheckpointError(
            f"{cfg_file}: this is a transcoder (transcode=true); the suite evaluates SAEs only"
        )
    t = read_safetensors(weights_file)
    if cfg.get("skip_connection") or "W_skip" in t:
        raise CheckpointError(
            f"{weights_file}: skip connections (W_skip) are not supported: the internal SAE has no skip path"
        )
    require(weights_file, t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), "a sparsify SAE")
    known = {"d": (cfg["d_in"], "cfg.json d_in")} if "d_in" in cfg else {}
    if cfg.get("num_latents"):
        known["n"] = (cfg["num_latents"], "cfg.json num_latents")
    elif "d_in" in cfg and cfg.get("expansion_factor"):
        known["n"] = (cfg["d_in"] * cfg["expansion_factor"], "cfg.json d_in * expansion_factor")
    shapes = {"encoder.weight": ("n", "d"), "encoder.bias": ("n",), "W_dec": ("n", "d"), "b_dec": ("d",)}
    sizes = check_shapes(weights_file, t, shapes, known)
    k = check_k(cfg_file, cfg.get("k", 32), sizes["n"])

    hookpoint = folder.name
    run_cfg = _run_config(folder.parent / RUN_CONFIG)
    info = SAEInfo(
        format="sparsify",
        architecture="topk",
        model_name=run_cfg.get("model"),
        layer=layer_from_module_path(cfg_file, hookpoint),
        site_name=hookpoint,
        context_size=run_cfg.get("ctx_len"),
        extra=cfg,
    )
    return SAE(
        t["encoder.weight"].T.contiguous(),
        t["encoder.bias"],
        t["W_dec"],
        t["b_dec"],
        activation="topk",
        k=k,
        b_pre=t["b_dec"],
        info=info,
    )


def _run_config(path: Path) -> dict:
    """The run's config.json, or {} when absent; only its model and ctx_len are read."""
    return read_json(path) if path.is_file() else {}


FORMAT = CheckpointFormat(
    name="sparsify",
    needs=f"a hookpoint folder with {CONFIG} and {WEIGHTS}",
    detect=detect,
    load=load,
)
