"""The training-state file beside a checkpoint: everything `Trainer.resume` needs, written atomically.

It holds the parameters too, so a kill between writing it and writing the SAE folder cannot pair an
optimizer state with weights from another step.  Only tensors, numbers, strings, lists and dicts go in,
so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

STATE_FILE = "training_state.pt"
STATE_VERSION = 1


def write_state(folder: str | Path, state: dict) -> Path:
    """Write `state` to folder/training_state.pt via a temporary file and an atomic rename."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    tmp = folder / f".{STATE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        torch.save({"state_version": STATE_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_state(folder: str | Path, map_location: str | torch.device | None = None) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training state to resume from: {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("state_version") != STATE_VERSION:
        raise ValueError(
            f"{path}: training-state version {state.get('state_version')}, expected {STATE_VERSION}"
        )
    return state
