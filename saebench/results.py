"""Result files: one JSON per (checkpoint, metric), written atomically, with provenance.

Layout: `<out>/<checkpoint label>/<metric>.json`.  Each file carries a `key` (hash of the metric name and
version, its parameters, the checkpoint's sha256 and the evaluation data key): a rerun whose key matches
reuses the file instead of recomputing.  A label folder holds one checkpoint's results: the runner refuses
to file a checkpoint with another sha256 there.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from pathlib import Path

from saebench import __version__
from saebench.data.cache import atomic_write_bytes, key_digest

RESULT_SCHEMA = 1


def file_digest(path: Path) -> str:
    """sha256 of a checkpoint: of the file, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def slug(text: str) -> str:
    """A file-name-safe label."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "checkpoint"


def result_key(metric: str, version: int, params: dict, checkpoint_sha: str, data_key: dict) -> str:
    return key_digest(
        {
            "metric": metric,
            "version": version,
            "params": params,
            "checkpoint": checkpoint_sha,
            "data": data_key,
        }
    )


def result_path(out_dir: Path, label: str, metric: str) -> Path:
    return Path(out_dir) / slug(label) / f"{metric}.json"


def load_result(path: Path) -> dict | None:
    """A result file's content, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def reusable(path: Path, key: str) -> dict | None:
    result = load_result(path)
    return result if result is not None and result.get("key") == key else None


def write_result(path: Path, result: dict) -> None:
    atomic_write_bytes(
        Path(path), (json.dumps(result, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()
    )


def provenance(device: str, wall_time_s: float) -> dict:
    import torch
    import transformers

    return {
        "saebench_version": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "wall_time_s": round(wall_time_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def filed_checkpoints(folder: Path):
    """(path, checkpoint entry) of each result file directly in one checkpoint's results folder."""
    for path in sorted(Path(folder).glob("*.json")):
        result = load_result(path)
        if isinstance(result, dict) and isinstance(result.get("checkpoint"), dict):
            yield path, result["checkpoint"]


def iter_results(folder: Path):
    """Every result file below a folder, parsed (unreadable files are skipped)."""
    for path in sorted(Path(folder).rglob("*.json")):
        result = load_result(path)
        if isinstance(result, dict) and result.get("schema") == RESULT_SCHEMA and "metric" in result:
            yield path, result

