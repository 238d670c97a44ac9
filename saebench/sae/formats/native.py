"""This project's own format, written by the reference trainer: a folder with two files.

    sae.safetensors   W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d); b_pre (d) when the encoder
                      subtracts one, threshold (n) for jumprelu, r_mag (n) and b_mag (n) for gated
    cfg.json          {"format": "saebench", "format_version": 1, "architecture", "activation", "d_in",
                       "n_latents", "k", "normalization": {Normalization fields}, "model_name", "layer",
                       "site": "resid_post", "context_size", "training": {provenance}, "saebench_version"}

The SAE equations are those of `saebench.sae.sae` with the tensors as stored: nothing is guessed on load.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from safetensors.torch import save_file

import saebench
from saebench.sae.formats.common import (
    CheckpointError,
    CheckpointFormat,
    check_k,
    check_shapes,
    folder_of,
    read_json,
    read_safetensors,
    require,
)
from saebench.sae.sae import ACTIVATIONS, SAE, Normalization, SAEInfo

FORMAT_NAME = "saebench"
FORMAT_VERSION = 1
WEIGHTS = "sae.safetensors"
CONFIG = "cfg.json"
SITE = "resid_post"


def save_native(sae: SAE, folder: str | Path, *, training: dict | None = None) -> Path:
    """Write SAE to FOLDER in the native format and return FOLDER.

    The files are written into a temporary folder beside it, which then replaces FOLDER, so a reader never
    sees a half-written checkpoint.  TRAINING is free-form provenance (tokens, lr, seed, ...), kept as given.
    """
    folder = Path(folder)
    info = sae.info
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if bool((sae.b_pre != 0).any()):
        tensors["b_pre"] = sae.b_pre
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    if sae.activation == "gated":
        tensors["r_mag"], tensors["b_mag"] = sae.r_mag, sae.b_mag
    cfg = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": info.architecture,
        "activation": sae.activation,
        "d_in": sae.d_in,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "normalization": sae.normalization.to_dict(),
        "model_name": info.model_name,
        "layer": info.layer,
        "site": SITE,
        "context_size": info.context_size,
        "training": training or {},
        "saebench_version": saebench.__version__,
    }
    text = json.dumps(cfg, indent=2)  # fails here, before touching the disk, if TRAINING is not JSON

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(text + "\n")
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def detect(path: Path) -> bool:
    folder = folder_of(path, (CONFIG, WEIGHTS))
    if folder is None:
        return False
    try:
        return json.loads((folder / CONFIG).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def load(path: Path) -> SAE:
    folder = path if path.is_dir() else path.parent
    cfg_file, weights_file = folder / CONFIG, folder / WEIGHTS
    cfg = read_json(cfg_file)
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: format_version {version!r} is not {FORMAT_VERSION}; "
            "it was written by another saebench version: load it with that version"
        )
    for key in ("architecture", "activation", "d_in", "n_latents"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_file}: missing key {key!r}")
    activation = cfg["activation"]
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"{cfg_file}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    site = cfg.get("site", SITE)
    if site != SITE:
        raise CheckpointError(f"{cfg_file}: site {site!r} is not {SITE!r}; the suite hooks only {SITE}")

    tensors = read_safetensors(weights_file)
    needed = ("W_enc", "b_enc", "W_dec", "b_dec")
    needed += {"jumprelu": ("threshold",), "gated": ("r_mag", "b_mag")}.get(activation, ())
    require(weights_file, tensors, needed, f"a native {activation} SAE")
    shapes = {"W_enc": ("d", "n"), "b_enc": ("n",), "W_dec": ("n", "d"), "b_dec": ("d",)}
    shapes.update({name: dims for name, dims in _OPTIONAL_SHAPES.items() if name in tensors})
    known = {"d": (cfg["d_in"], "cfg.json d_in"), "n": (cfg["n_latents"], "cfg.json n_latents")}
    sizes = check_shapes(weights_file, tensors, shapes, known)
    k = check_k(cfg_file, cfg.get("k"), sizes["n"]) if activation == "topk" else cfg.get("k")

    try:
        normalization = Normalization(**cfg.get("normalization", {}))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cfg_file}: bad normalization {cfg.get('normalization')!r} ({err})") from None
    info = SAEInfo(
        format="native",
        architecture=cfg["architecture"],
        model_name=cfg.get("model_name"),
        layer=cfg.get("layer"),
        site_name=site,
        context_size=cfg.get("context_size"),
        extra=cfg,
    )
    return SAE(
        tensors["W_enc"],
        tensors["b_enc"],
        tensors["W_dec"],
        tensors["b_dec"],
        activation=activation,
        k=k,
        threshold=tensors.get("threshold"),
        b_pre=tensors.get("b_pre"),
        r_mag=tensors.get("r_mag"),
        b_mag=tensors.get("b_mag"),
        normalization=normalization,
        info=info,
    )


_OPTIONAL_SHAPES = {"b_pre": ("d",), "threshold": ("n",), "r_mag": ("n",), "b_mag": ("n",)}

FORMAT = CheckpointFormat(
    name="native",
    needs=f'a folder with {CONFIG} ("format": "{FORMAT_NAME}") and {WEIGHTS}',
    detect=detect,
    load=load,
)
