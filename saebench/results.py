"""Result files: one JSON per (checkpoint, metric), written atomically, with provenance.

Layout: `<out>/<checkpoint label>/<metric>.json`.  Each file carries a `key` (hash of the metric name and
version, its parameters, the checkpoint's sha256 and the evaluation data key): a rerun whose key matches
reuses the file instead of recomputing.  A label folder holds one checkpoint's results: the runner refuses
to file a checkpoint with another sha256 there.

As data: `load_results(folder)` is one pandas row per (checkpoint, metric, value name), the columns in
`RESULT_COLUMNS`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections.abc import Iterable
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


#: the columns of `load_results`, in order: what is measured, then which checkpoint, how, and provenance
RESULT_COLUMNS = {
    "label": "the checkpoint's label (its results folder)",
    "metric": "metric name",
    "name": "value name, e.g. nmse",
    "value": "the estimate",
    "lo": "lower end of its 95% bootstrap interval (empty when it has none)",
    "hi": "upper end of the interval",
    "n": "how many units the value and its interval rest on",
    "unit": "what those units are (windows, tasks, latents)",
    "headline": "whether the metric lists the value among its headline values",
    "lower_is_better": "whether lower values are better",
    "source": "where the checkpoint was read from",
    "sha256": "the checkpoint's sha256 (built-ins: their spec and site)",
    "format": "checkpoint format (saelens, sparsify, native, builtin, ...)",
    "architecture": "topk, standard (ReLU), jumprelu, ...",
    "n_latents": "dictionary size",
    "k": "active latents per token of a TopK SAE (empty otherwise)",
    "d_in": "input width",
    "training_tokens": "tokens the checkpoint was trained on, where its training record says",
    "variant": "the training variant its training record names, if any",
    "metric_version": "the metric's version when the value was computed",
    "model": "subject model",
    "layer": "site: residual after this block",
    "corpus": "evaluation corpus",
    "n_tokens": "evaluation tokens",
    "ctx": "window length",
    "seed": "seed",
    "dtype": "model and SAE dtype",
    "wall_time_s": "seconds the metric took",
    "device": "torch device it ran on",
    "saebench_version": "saebench version",
    "torch": "torch version",
    "transformers": "transformers version",
    "python": "Python version",
    "created": "when the result was computed (UTC)",
    "path": "the result file",
}

_INTEGER_COLUMNS = ("n", "n_latents", "k", "d_in", "training_tokens", "metric_version", "layer", "n_tokens")
_INTEGER_COLUMNS += ("ctx", "seed")


def load_results(folder: str | Path | Iterable[str | Path]):
    """Every result file below `folder` (or below each of several folders) as a pandas DataFrame.

    One row per (checkpoint, metric, value name), columns `RESULT_COLUMNS`; integer columns are nullable
    (`Int64`), a field a file lacks is missing.  Rows come in file order (label, then metric), each file's
    values in the order it stores them.
    """
    import pandas as pd

    folders = [folder] if isinstance(folder, str | Path) else list(folder)
    rows = []
    for root in map(Path, folders):
        if not root.is_dir():
            raise ValueError(f"{root}: no such folder of result files")
        for path, result in iter_results(root):
            rows.extend(_result_rows(path, result))
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    for column in _INTEGER_COLUMNS:
        frame[column] = pd.array(frame[column], dtype="Int64")
    for column in ("value", "lo", "hi", "wall_time_s"):
        frame[column] = frame[column].astype(float)
    return frame


def _result_rows(path: Path, result: dict) -> list[dict]:
    ckpt = result.get("checkpoint") or {}
    training = ckpt.get("training") or {}
    evaluation = result.get("eval") or {}
    prov = result.get("provenance") or {}
    headline, lower = set(result.get("headline") or ()), set(result.get("lower_is_better") or ())
    common = {
        "label": ckpt.get("label"),
        "metric": result["metric"],
        **{key: ckpt.get(key) for key in ("source", "sha256", "format", "architecture", "n_latents", "k")},
        "d_in": ckpt.get("d_in"),
        "training_tokens": training.get("tokens_seen"),
        "variant": training.get("variant"),
        "metric_version": result.get("metric_version"),
        **{
            key: evaluation.get(key)
            for key in ("model", "layer", "corpus", "n_tokens", "ctx", "seed", "dtype")
        },
        **{key: prov.get(key) for key in ("wall_time_s", "device", "saebench_version", "torch")},
        **{key: prov.get(key) for key in ("transformers", "python", "created")},
        "path": str(path),
    }
    rows = []
    for name, v in (result.get("values") or {}).items():
        estimate = {key: v.get(key) for key in ("value", "lo", "hi", "n", "unit")}
        rows.append(
            {
                **common,
                "name": name,
                **estimate,
                "headline": name in headline,
                "lower_is_better": name in lower,
            }
        )
    return rows
