"""Which learning rate a run gets when its config leaves `lr` unset, and why.

    lr set in the config          -> that lr                           source "set"
    a fitted trend applies        -> a * n_latents ** b                source "trend <file> (fit <id>)"
    otherwise                     -> 2e-4 / sqrt(n_latents / 2**14)    source "paper rule" (+ why no trend)

The trend file is a small JSON file, {"trends": {activation: trend}}, one trend per activation, each
written by `saebench train --sweep lr --install-trend` (TopK) or `--sweep relu-lr --install-trend` (ReLU +
L1) from a finished lr sweep (`lr_sweep.py`): the best lr per dictionary size, fitted as lr*(n) = a n^b.
The best lr depends on the run's length and batch size (the paper's constant is for far longer runs and
larger batches), so a trend applies only to runs like the ones it was fitted on: the same activation and
batch size, and a token budget within `BUDGET_FACTOR` of the sweep's.  Other runs fall back to the
paper's rule, and the source says why.

The committed trend lives at `TREND_FILE` (absent until a real sweep has been fitted and installed);
$SAEBENCH_LR_TREND names another file, or `none` to ignore every trend.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .config import TrainConfig

#: the committed trend (read when $SAEBENCH_LR_TREND is unset)
TREND_FILE = Path(__file__).with_name("lr_trend.json")
#: a run's token budget may differ from the sweep's by at most this factor for the trend to apply
BUDGET_FACTOR = 2.0
#: the keys each trend in a trend file must have
TREND_KEYS = ("a", "b", "activation", "batch_size", "max_tokens", "fit_id")


class LrChoice(NamedTuple):
    """The lr a run trains at and what chose it ("set", "trend ...", "paper rule ...")."""

    lr: float
    source: str


def paper_lr(n_latents: int) -> float:
    """Gao et al.'s 1/sqrt(n) law with its constant: 2e-4 at n = 2^14."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def trend_path() -> Path | None:
    """The trend file in force: $SAEBENCH_LR_TREND (`none`: no trend), else TREND_FILE; None if absent."""
    named = os.environ.get("SAEBENCH_LR_TREND")
    if named is not None and named.strip().lower() in ("", "none"):
        return None
    path = Path(named) if named else TREND_FILE
    return path if path.is_file() else None


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int) -> dict[str, dict]:
    content = json.loads(Path(path).read_text())
    trends = content.get("trends") if isinstance(content, dict) else None
    if not isinstance(trends, dict) or not trends:
        raise ValueError(f"lr trend {path} has no trends: regenerate it from an lr sweep (--install-trend)")
    for activation, trend in trends.items():
        missing = [key for key in TREND_KEYS if key not in trend]
        if missing or trend["activation"] != activation:
            what = f"lacks {', '.join(missing)}" if missing else "files a trend under another activation"
            raise ValueError(f"lr trend {path} {what} ({activation}): regenerate it from an lr sweep")
    return trends


def load_trend(path: str | Path | None = None) -> dict[str, dict] | None:
    """The trend file's trends by activation ({"topk": {a, b, activation, batch_size, max_tokens, fit_id,
    ...}, ...}), or None without a file."""
    path = Path(path) if path is not None else trend_path()
    if path is None or not path.is_file():
        return None
    return _read(str(path.resolve()), path.stat().st_mtime_ns)


def with_trend(path: Path, trend: dict) -> dict:
    """The content of trend file `path` with `trend` filed under its activation (replacing that one)."""
    trends = dict(load_trend(path) or {}) if Path(path).is_file() else {}
    trends[trend["activation"]] = trend
    return {"trends": dict(sorted(trends.items()))}


def why_not(trend: dict, config: TrainConfig) -> str | None:
    """Why the trend does not apply to config (None when it does)."""
    if config.activation != trend["activation"]:
        return f"fitted for {trend['activation']}, not {config.activation}"
    if config.batch_size != trend["batch_size"]:
        return f"fitted at batch {trend['batch_size']}, not {config.batch_size}"
    if config.max_tokens is None:
        return "the run's token budget is not known (max_tokens unset)"
    ratio = config.max_tokens / trend["max_tokens"]
    if not 1 / BUDGET_FACTOR <= ratio <= BUDGET_FACTOR:
        return f"fitted at {trend['max_tokens']} tokens, not {config.max_tokens}"
    return None


def choose_lr(config: TrainConfig, trend_file: str | Path | None = None) -> LrChoice:
    """The lr config trains at and its source (see the module docstring); `trend_file` overrides the
    trend in force.  With `config.lr_at_n` set, the lr is the one a run of that many latents would get."""
    if config.lr is not None:
        return LrChoice(config.lr, "set")
    n = config.lr_at_n if config.lr_at_n is not None else config.n_latents
    at = f" at n={n}" if config.lr_at_n is not None else ""
    path = Path(trend_file) if trend_file is not None else trend_path()
    trends = load_trend(path) if path is not None else None
    if trends is None:
        return LrChoice(paper_lr(n), f"paper rule{at}")
    trend = trends.get(config.activation)
    reason = f"has no {config.activation} fit" if trend is None else why_not(trend, config)
    if reason is not None:
        return LrChoice(paper_lr(n), f"paper rule{at} (trend {_shown(path)} {reason})")
    return LrChoice(trend["a"] * n ** trend["b"], f"trend {_shown(path)} (fit {trend['fit_id']}){at}")


def _shown(path: Path) -> str:
    """The trend file as provenance names it: the packaged one by its place in the package, not by where
    this checkout happens to be; any other as given."""
    if path.resolve() == TREND_FILE.resolve():
        return f"saebench/train/{TREND_FILE.name}"
    return str(path)
