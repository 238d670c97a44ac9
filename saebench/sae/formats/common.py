"""What every checkpoint format shares: the error type, safe file reading, shape checks and site names.

A format is a `CheckpointFormat`: a name, the files it needs (for error messages), `detect(path)` and
`load(path)`.  Loaders return an SAE in float32 on the CPU with its `SAEInfo` filled; `load_sae` checks it
and moves it to the caller's device and dtype.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saebench.sae.sae import SAE


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and the problem."""


@dataclass(frozen=True)
class CheckpointFormat:
    """One library's on-disk layout."""

    #: registry name, also SAEInfo.format (saelens, sparsify, dictionary_learning, openai, native)
    name: str
    #: what a checkpoint of this format looks like on disk, shown when nothing matches
    needs: str
    #: True when PATH (a file or a folder) is a checkpoint of this format; never raises
    detect: Callable[[Path], bool]
    #: read PATH into a float32 CPU SAE, raising CheckpointError for anything it cannot represent exactly
    load: Callable[[Path], SAE]


def folder_of(path: Path, files: tuple[str, ...]) -> Path | None:
    """The checkpoint folder when PATH is a folder holding all of FILES or is one of them, else None."""
    folder = path if path.is_dir() else path.parent if path.name in files else None
    if folder is None or not all((folder / name).is_file() for name in files):
        return None
    return folder


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, floating ones as float32."""
    try:
        tensors = load_file(path, device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    return {name: as_float32(t) for name, t in tensors.items()}


def read_torch(path: Path) -> dict:
    """A `.pt` file loaded without unpickling arbitrary objects (torch.load with weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refusing to unpickle arbitrary objects ({first_line}); re-save it as a dict of "
            "tensors, numbers and strings, e.g. torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable torch file ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return {name: as_float32(v) if isinstance(v, torch.Tensor) else v for name, v in state.items()}


def torch_file_mentions(path: Path, names: tuple[bytes, ...]) -> bool:
    """True when a zip-format `.pt` file's pickle names all NAMES; reads the pickle's bytes, never runs it."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [info for info in archive.infolist() if info.filename.endswith("data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > 1 << 20:
                return False
            data = archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False
    return all(name in data for name in names)


def as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def require(file: Path, tensors: dict, names: tuple[str, ...], what: str) -> None:
    """Raise when any of NAMES is missing from TENSORS, naming the first missing one and what needs it."""
    for name in names:
        if name not in tensors:
            found = ", ".join(sorted(k for k in tensors if isinstance(tensors[k], torch.Tensor)))
            raise CheckpointError(f"{file}: missing tensor {name!r} needed by {what} (found: {found})")


def check_shapes(
    file: Path,
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, tuple[str, ...]],
    known: dict | None = None,
) -> dict[str, int]:
    """Check tensors against symbolic shapes such as {"W_enc": ("d", "n")}; return the sizes found.

    KNOWN seeds sizes from the config, e.g. {"d": (768, "cfg.json d_in")}; the first tensor that fixes a
    size is named when a later one disagrees.
    """
    sizes: dict[str, tuple[int, str]] = dict(known or {})
    for name, dims in shapes.items():
        shape = tuple(tensors[name].shape)
        if len(shape) != len(dims):
            raise CheckpointError(
                f"{file}: tensor {name} has shape {shape}, expected {len(dims)} dims ({', '.join(dims)})"
            )
        for dim, size in zip(dims, shape, strict=True):
            expected, source = sizes.setdefault(dim, (size, name))
            if size != expected:
                raise CheckpointError(
                    f"{file}: shapes disagree: {name} has shape {shape}, but {source} gives {dim}={expected}"
                )
    return {dim: size for dim, (size, _) in sizes.items()}


def check_k(file: Path, k: int | None, n: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise CheckpointError(
            f"{file}: k={k!r} is not a positive integer; TopK needs the number of active latents"
        )
    if k > n:
        raise CheckpointError(f"{file}: k={k} exceeds the number of latents n={n}")
    return k


# --- sites -------------------------------------------------------------------------------------------------
# The suite hooks the residual stream after decoder block L.  Each format names its site its own way; these
# map the names to L, refuse the sites the suite cannot hook, and return None where the name says nothing.


def unhookable(file: Path, site: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: site {site!r} is {what}; the suite can only hook the residual stream after a block "
        "(resid_post): use an SAE trained there"
    )


_TL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TL_UNHOOKABLE = {
    "hook_resid_mid": "the residual stream between attention and MLP (resid_mid)",
    "hook_attn_out": "an attention output",
    "hook_mlp_out": "an MLP output",
    "hook_mlp_in": "an MLP input",
}


def layer_from_transformer_lens(file: Path, hook: str) -> int:
    """TransformerLens hook -> L: blocks.L.hook_resid_post -> L, blocks.L.hook_resid_pre -> L - 1."""
    match = _TL_BLOCK.match(hook)
    if match is None:
        if hook.startswith("hook_embed") or hook.startswith("hook_pos_embed"):
            raise unhookable(file, hook, "an embedding output")
        raise unhookable(file, hook, "not a block's residual stream")
    layer, rest = int(match.group(1)), match.group(2)
    if rest == "hook_resid_post":
        return layer
    if rest == "hook_resid_pre":
        if layer == 0:
            raise unhookable(file, hook, "the embedding output (block 0's input)")
        return layer - 1
    if rest in _TL_UNHOOKABLE:
        raise unhookable(file, hook, _TL_UNHOOKABLE[rest])
    if rest.endswith(("hook_z", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_result")):
        raise unhookable(file, hook, "inside attention")
    if rest.startswith("mlp.") or rest.startswith("ln"):
        raise unhookable(file, hook, "inside a block")
    raise unhookable(file, hook, "not a block's residual stream")


_HF_BLOCK = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:layers|h|blocks|layer)\.(\d+)(?:\.(.+))?$")


def layer_from_module_path(file: Path, module: str) -> int | None:
    """HF module path -> L: the output of `layers.L` (or `model.layers.L`, `transformer.h.L`, ...) is L.

    A submodule of a block (`layers.8.mlp`, `layers.8.self_attn`) or an embedding is refused; a name that
    does not look like a module path gives None.
    """
    match = _HF_BLOCK.match(module)
    if match is None:
        if "embed" in module or module.endswith("wte"):
            raise unhookable(file, module, "an embedding output")
        return None
    if match.group(2) is not None:
        raise unhookable(file, module, "a submodule of a block, not the block's output")
    return int(match.group(1))
