"""Load any supported checkpoint into the internal SAE, check it, and find checkpoints under a folder.

    sae = load_sae("runs/topk/layers.8")        # format detected from the files present
    check_width(sae, model_d)                    # before any metric runs
    paths = find_checkpoints("runs/")            # every checkpoint below a folder, naturally sorted
    sae = load_sae("hf:ORG/REPO/layers.8")       # a hub folder or saelens:RELEASE/SAE_ID (saebench.sae.hub)

Every problem is a `CheckpointError` (a ValueError) whose one-line message names the file and the fix.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from saebench.sae.formats import describe_formats, detect_format, get_format
from saebench.sae.formats.common import CheckpointError
from saebench.sae.sae import SAE

#: decoder rows whose norm is further than this from 1 trigger the "not unit norm" warning
UNIT_NORM_TOLERANCE = 1e-2

__all__ = ["CheckpointError", "check_width", "find_checkpoints", "load_sae", "resolve_checkpoint"]


def resolve_checkpoint(source: str | Path) -> Path:
    """The local file or folder a checkpoint source names: a path as it is; `hf:ORG/REPO[/SUB][@REV]` and
    `saelens:RELEASE/SAE_ID` downloaded into (or, offline, found in) the Hugging Face cache."""
    from saebench.sae import hub

    return hub.resolve(source) if _is_remote(source) else Path(source)


def _is_remote(source: str | Path) -> bool:
    from saebench.sae.hub import is_remote

    return is_remote(source)


def load_sae(
    path: str | Path,
    format: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """Read the checkpoint at PATH (a file or a folder, or a hub source: `resolve_checkpoint`) into an SAE.

    FORMAT names the format (saelens, sparsify, dictionary_learning, openai, native) and skips detection.
    Conversions (transposes, folded rescalings) are done in float32 before the cast to DTYPE.
    Raises CheckpointError for an unknown format, missing or disagreeing tensors, NaN/inf weights, k > n,
    unsafe pickles and sites the suite cannot hook; warns when decoder rows are not unit norm.
    """
    source = path
    path = resolve_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    fmt = get_format(format) if format is not None else detect_format(path)
    if fmt is None:
        raise CheckpointError(
            f"{path}: unknown checkpoint format; recognised formats are {describe_formats()}; "
            "pass format= (--format) to force one"
        )
    sae = fmt.load(path)
    sae.info.format = fmt.name
    sae.info.path = source if _is_remote(source) else str(path)
    _check_finite(sae, path)
    _warn_decoder_norms(sae, path)
    return sae.to(device=device, dtype=dtype)


def check_width(sae: SAE, d_model: int) -> None:
    """Raise when the SAE's input width is not the model's residual width D_MODEL."""
    if sae.d_in != d_model:
        trained_on = f" (the checkpoint names model {sae.info.model_name})" if sae.info.model_name else ""
        raise CheckpointError(
            f"{sae.info.path or 'SAE'}: SAE input width d_in={sae.d_in} does not match the model's residual "
            f"width {d_model}{trained_on}; evaluate it on the model it was trained on"
        )


def find_checkpoints(path: str | Path) -> list[Path]:
    """Every checkpoint at or below PATH, naturally sorted (layers.2 before layers.10).

    A checkpoint itself gives [PATH]; a folder is searched recursively, without descending into the
    checkpoints it finds (a SAELens folder's trainer_state.pt is not a checkpoint of its own).  A hub source
    gives the local paths in the Hugging Face cache (`resolve_checkpoint`).
    """
    path = resolve_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if detect_format(path) is not None:
        return [path]
    found = []
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            here = Path(root)
            subfolders = []
            for name in sorted(dirs):
                if name.startswith("."):  # hidden, including save_native's temporary folders
                    continue
                (found if detect_format(here / name) is not None else subfolders).append(here / name)
            dirs[:] = [folder.name for folder in subfolders]
            found += [here / name for name in files if detect_format(here / name) is not None]
    if not found:
        raise CheckpointError(
            f"{path}: no checkpoint found here or below; recognised formats are {describe_formats()}"
        )
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _check_finite(sae: SAE, path: Path) -> None:
    for name, tensor in [*sae.named_parameters(), *sae.named_buffers()]:
        # amin/amax propagate NaN and show +-inf without a tensor-sized mask (a wide SAE's W_enc is GBs)
        if not tensor.numel() or bool(torch.isfinite(tensor.amin()) & torch.isfinite(tensor.amax())):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(
                f"{path}: {name} holds {bad} NaN/inf values of {tensor.numel()}; the checkpoint is corrupt "
                "or was saved after training diverged"
            )


def _warn_decoder_norms(sae: SAE, path: Path) -> None:
    norms = sae.W_dec.detach().norm(dim=-1)
    if bool(((norms - 1).abs() > UNIT_NORM_TOLERANCE).any()):
        warnings.warn(
            f"{path}: decoder rows are not unit norm (norms from {float(norms.min()):.4g} to "
            f"{float(norms.max()):.4g}); latent magnitudes are not comparable across latents",
            stacklevel=3,
        )
