"""Checkpoint formats: one module per library, looked up by name or detected from what is at a path.

Adding a format is one module exposing `FORMAT = CheckpointFormat(...)` plus a `register_format` call.
"""

from __future__ import annotations

from pathlib import Path

from saebench.sae.formats import dictionary_learning, native, openai, saelens, sparsify
from saebench.sae.formats.common import CheckpointError, CheckpointFormat

FORMATS: dict[str, CheckpointFormat] = {}


def register_format(fmt: CheckpointFormat) -> None:
    """Make FMT loadable by name and by detection; detection tries formats in registration order."""
    FORMATS[fmt.name] = fmt


for _module in (native, saelens, sparsify, dictionary_learning, openai):
    register_format(_module.FORMAT)


def get_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(path: Path) -> CheckpointFormat | None:
    """The first registered format that recognises PATH, or None."""
    return next((fmt for fmt in FORMATS.values() if fmt.detect(path)), None)


def describe_formats() -> str:
    """One line naming each format and what it needs on disk, for error messages."""
    return "; ".join(f"{fmt.name}: {fmt.needs}" for fmt in FORMATS.values())


__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointFormat",
    "describe_formats",
    "detect_format",
    "get_format",
    "register_format",
]
