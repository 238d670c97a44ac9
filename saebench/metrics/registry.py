"""The metric registry: a metric is one module in `saebench/metrics/` that calls `register(Metric(...))`.

The runner looks metrics up by name and hands each one the evaluation context (model, cached activations)
and one SAE: `compute(context: EvalContext, sae: SAE, params: P) -> MetricResult`; the metric only
computes.  Everything the outside needs from a metric travels in its `Metric` entry: its parameters (a
dataclass), its command-line options and `--tasks` items beyond its name (`Option`, `claim_items`), its
headline values and its leaderboard plots (`Plot`), so the runner, the CLI and the leaderboard name no
metric.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Estimate:
    """A headline number with its 95% bootstrap interval and the count of units it rests on."""

    value: float
    lo: float | None = None
    hi: float | None = None
    #: how many units (windows, tasks, latents, ...) the value and its interval rest on
    n: int = 0
    #: what was resampled for the interval
    unit: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MetricResult:
    """What a metric returns: named estimates, counts, and JSON-able details (per task, per latent...)."""

    values: dict[str, Estimate]
    counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def check_finite(self, metric: str, checkpoint: str) -> None:
        for name, est in self.values.items():
            for part in (est.value, est.lo, est.hi):
                if part is not None and not np.isfinite(part):
                    raise FloatingPointError(
                        f"metric {metric!r} gave a non-finite {name} ({part}) for checkpoint {checkpoint}; "
                        "check the checkpoint's weights and the model dtype (try --dtype float32)"
                    )


@dataclass(frozen=True)
class Option:
    """A `saebench run` option that sets one of the metric's parameters (`--FLAG VALUE`)."""

    #: the flag, e.g. "--probe-tasks"
    flag: str
    #: the parameter it sets
    param: str
    #: help text
    help: str
    #: metavar in the help
    metavar: str | None = None
    #: the flag may be given several times; the values are joined with ","
    repeatable: bool = False


@dataclass(frozen=True)
class Plot:
    """A leaderboard plot of one of the metric's values: against L0 per family (`vs_l0`) or a bar chart."""

    #: file name in the leaderboard folder
    file: str
    #: the metric's value plotted
    value: str
    #: axis label
    label: str
    #: "vs_l0": value against core L0, one series per architecture family; "bar": one bar per checkpoint
    kind: str = "vs_l0"
    #: logarithmic value axis
    log: bool = False
    #: for `vs_l0`: the (metric, value) on the horizontal axis, log-scaled, and its label
    against: tuple[str, str] = ("core", "l0")
    against_label: str = "L0 (active latents per token)"


@dataclass(frozen=True)
class Metric:
    """A registered metric."""

    #: name used on the command line and in result files
    name: str
    #: bump when the definition changes: old result files are then recomputed
    version: int
    #: one line for `saebench run --help` and the leaderboard
    description: str
    #: compute(context, sae, params) -> MetricResult
    compute: Callable[..., MetricResult]
    #: dataclass type holding the metric's parameters, every field with a default
    params: type
    #: value names shown in the summary table and the leaderboard, most important first
    headline: tuple[str, ...]
    #: value names for which lower is better (used to sort the leaderboard)
    lower_is_better: frozenset[str] = frozenset()
    #: key_extra(params) -> dict: what else a result depends on (e.g. the tasks' data), for result reuse
    key_extra: Callable[[Any], dict] | None = None
    #: prepare(context, params): fill the cache with what `compute` reads at a site whatever the SAE (e.g.
    #: downstream's clean pass), so that under torchrun the ranks collect it together, each a share of its
    #: shards, before any of them evaluates a checkpoint (`saebench.sharded`); one process never calls it
    prepare: Callable[[Any, Any], None] | None = None
    #: `compute` works on a `LatentShard` (one rank's latents of a wide SAE; it only encodes and decodes
    #: through the SAE's codes, or splits its work over `sae.latents`), run on every rank of a torchrun
    #: launch with one checkpoint; other metrics run on rank 0 alone with the whole SAE (`saebench.sharded`)
    latent_sharded: bool = False
    #: command-line options of `saebench run` that set this metric's parameters
    options: tuple[Option, ...] = ()
    #: claim_items(items, overrides) -> parameter overrides, or None: `--tasks` items that are not metric
    #: names but select this metric (probes: task names and tags); raises ValueError naming what is wrong
    #: when the items are meant for it but unusable
    claim_items: Callable[[list[str], dict], dict | None] | None = None
    #: leaderboard plots of this metric's values
    plots: tuple[Plot, ...] = ()
    #: the values in the leaderboard's compact table and its against-n panels (default: the first headline)
    compact: tuple[str, ...] = ()
    #: values with no better direction (L0, a norm ratio): never bold, never ranked
    unranked: frozenset[str] = frozenset()
    #: values measured in the SAE's own input space (after its normalisation): rows compare only within
    #: one space (`checkpoint.normalization` in each result file)
    sae_space: frozenset[str] = frozenset()

    @property
    def compact_values(self) -> tuple[str, ...]:
        return self.compact or self.headline[:1]


_REGISTRY: dict[str, Metric] = {}
_LOADED = False


def register(metric: Metric) -> Metric:
    if metric.name in _REGISTRY and _REGISTRY[metric.name] is not metric:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    _REGISTRY[metric.name] = metric
    return metric


def _load_metric_modules() -> None:
    """Import every module of this package once, so each metric file registers itself."""
    global _LOADED
    if _LOADED:
        return
    import saebench.metrics as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED = True


def metric_names() -> list[str]:
    _load_metric_modules()
    return sorted(_REGISTRY, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def get_metric(name: str) -> Metric:
    _load_metric_modules()
    if name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; registered metrics: {', '.join(metric_names())}")
    return _REGISTRY[name]


def metrics() -> list[Metric]:
    """Every registered metric, in table order."""
    return [_REGISTRY[n] for n in metric_names()]


def params_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


# the order metrics appear in tables; metrics not listed follow alphabetically
_ORDER = ["core", "downstream", "probes", "n2g", "ablation", "shrinkage"]
