"""Tests that need an optional package: skip locally when it is missing, fail under CI.

A cross-check against a peer library (or a real-model test that needs the offline model package) that
silently skips is a check that did not run.  Locally a missing package skips with the install command;
under `CI=true` the same case fails, naming the package, so a CI run can never go green on a machine
that lacks part of the set-up.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from types import ModuleType

import pytest


def missing(package: str, install: str) -> None:
    """Stop this test: PACKAGE is not importable; INSTALL is the command that provides it."""
    message = f"needs {package!r}, which is not installed ({install})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def distribution(dist: str, install: str | None = None) -> importlib.metadata.Distribution:
    """The installed distribution DIST, or `missing`."""
    try:
        return importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        missing(dist, install or f"pip install --no-deps {dist}")
        raise  # unreachable: missing() always raises


def module(name: str, install: str) -> ModuleType:
    """Import NAME; a module missing anywhere in its import chain (e.g. a peer's `datasets`) is `missing`."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing(err.name or name, install)
        raise
