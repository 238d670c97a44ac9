"""`saebench run`: every requested metric for every checkpoint, one result file each.

checkpoint(s) -> SAE -> (one EvalContext per model and site, shared by all checkpoints) -> metrics ->
result files -> summary table.  A result whose key (metric version, parameters, checkpoint sha256,
evaluation data) matches an existing file is reused unless `force`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saebench.context import EvalConfig, EvalContext
from saebench.metrics.registry import Metric, get_metric, metric_names, params_dict
from saebench.metrics.registry import metrics as all_metrics
from saebench.results import (
    RESULT_SCHEMA,
    file_digest,
    provenance,
    result_key,
    result_path,
    reusable,
    write_result,
)
from saebench.sae.builtin import build_builtin, is_builtin, parse_builtin
from saebench.sae.sae import SAE


@dataclass
class RunConfig:
    """One `saebench run`."""

    #: a checkpoint (file or folder), a folder of checkpoints, or builtin:NAME
    checkpoint: str
    #: metric names to compute
    metrics: list[str]
    #: where and on what to evaluate
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: results folder
    out: str = "results"
    #: recompute even when a matching result file exists
    force: bool = False
    #: checkpoint format, when detection should be overridden
    format: str | None = None
    #: whether the user chose the model explicitly (else a checkpoint's own model name wins)
    model_given: bool = False
    #: per-metric parameter overrides: {metric: {field: value}}
    params: dict[str, dict] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A checkpoint to evaluate: where it is, the label its results are filed under, its identity."""

    source: str
    label: str
    sha256: str | None = None


def parse_metrics(spec: str, overrides: dict[str, dict] | None = None) -> tuple[list[str], dict[str, dict]]:
    """`--tasks` -> (metric names in table order, parameter overrides the items imply, per metric).

    Items are `all` (every registered metric), metric names, or items a metric claims (`Metric.claim_items`:
    probe task names and tags select `probes` on those tasks, e.g. `--tasks core,code,21_headline_istrump`).
    `overrides` are the parameters given otherwise, which a claim may need (e.g. extra task folders).
    """
    overrides = overrides or {}
    names = metric_names()
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--tasks is empty: give `all`, metric names or probe task names/tags")
    wanted, rest = set(), []
    for item in items:
        if item == "all":
            wanted.update(names)
        elif item in names:
            wanted.add(item)
        else:
            rest.append(item)
    implied: dict[str, dict] = {}
    if rest:
        reasons = []
        for metric in (m for m in all_metrics() if m.claim_items is not None):
            try:
                claimed = metric.claim_items(rest, overrides.get(metric.name, {}))
            except ValueError as err:
                reasons.append(f"{metric.name}: {err}")
                continue
            if claimed is not None:
                wanted.add(metric.name)
                implied[metric.name] = claimed
                break
        else:
            raise ValueError(f"--tasks: not a metric ({', '.join(names)}): {'; '.join(reasons) or rest}")
    return [n for n in names if n in wanted], implied


def discover(checkpoint: str) -> list[Checkpoint]:
    if is_builtin(checkpoint):
        return [Checkpoint(checkpoint, parse_builtin(checkpoint).label)]
    from saebench.sae.load import find_checkpoints

    root = Path(checkpoint)
    paths = find_checkpoints(root)
    found = []
    for p in paths:
        rel = p.relative_to(root) if p != root and root.is_dir() else Path(p.name)
        parts = rel.with_suffix("").parts if p.is_file() else rel.parts
        if len(parts) > 1 and parts[-1] == "sae":  # a trainer run folder: <run>/sae
            parts = parts[:-1]
        label = "__".join(parts)
        found.append(Checkpoint(str(p), label if len(paths) > 1 else (root.resolve().name or label)))
    return found


def make_params(metric: Metric, overrides: dict) -> object:
    """The metric's parameters with `overrides` ({name: value}; text is read by the field's declared type,
    as `--param METRIC.NAME=VALUE` gives it) over the defaults, validated by the params' `__post_init__`."""
    from saebench.params import build

    return build(
        metric.params, overrides, flag="--param", prefix=f"{metric.name}.", owner=f"metric {metric.name!r}"
    )


class Runner:
    """Evaluates checkpoints; contexts (model, cached activations) are shared across checkpoints."""

    def __init__(self, config: RunConfig, model=None, model_identity: str | None = None):
        self.config = config
        self.contexts: dict[tuple, EvalContext] = {}
        self._model = model
        self._model_identity = model_identity

    def context_for(self, model_name: str, layer: int | None) -> EvalContext:
        key = (model_name, layer)
        if key not in self.contexts:
            cfg = dataclasses.replace(self.config.eval, model=model_name, layer=layer)
            shared = next(iter(self.contexts.values()), None)
            model = (
                self._model
                if self._model is not None
                else (shared.model if shared is not None and shared.config.model == model_name else None)
            )
            self.contexts[key] = EvalContext(cfg, preloaded_model=model, model_identity=self._model_identity)
        return self.contexts[key]

    def load(self, ckpt: Checkpoint) -> tuple[SAE, EvalContext]:
        cfg = self.config
        if is_builtin(ckpt.source):
            spec = parse_builtin(ckpt.source)
            context = self.context_for(cfg.eval.model, cfg.eval.layer)
            sae = build_builtin(spec, context.site.train_sample(spec.fit_tokens), seed=cfg.eval.seed)
            ckpt.sha256 = f"builtin:{spec}:{context.site.key}"
        else:
            from saebench.sae.load import check_width, load_sae

            sae = load_sae(ckpt.source, format=cfg.format, device="cpu", dtype=torch.float32)
            ckpt.sha256 = file_digest(Path(ckpt.source))
            model_name = cfg.eval.model
            if sae.info.model_name and not cfg.model_given:
                model_name = _known_model(sae.info.model_name, cfg.eval.model)
            elif sae.info.model_name and sae.info.model_name != cfg.eval.model:
                warnings.warn(
                    f"{ckpt.source} was trained on {sae.info.model_name!r}; evaluating on "
                    f"{cfg.eval.model!r} as asked",
                    stacklevel=2,
                )
            layer = cfg.eval.layer if cfg.eval.layer is not None else sae.info.layer
            if cfg.eval.layer is not None and sae.info.layer is not None and sae.info.layer != cfg.eval.layer:
                warnings.warn(
                    f"{ckpt.source} was trained at layer {sae.info.layer}; evaluating at layer "
                    f"{cfg.eval.layer} as asked",
                    stacklevel=2,
                )
            context = self.context_for(model_name, layer)
            check_width(sae, context.model.d_model)
        return sae.to(context.device, context.model.dtype).eval(), context

    def evaluate(self, ckpt: Checkpoint, metric_names_: list[str]) -> list[dict]:
        sae, context = self.load(ckpt)
        results = []
        for name in metric_names_:
            metric = get_metric(name)
            params = make_params(metric, self.config.params.get(name, {}))
            extra = metric.key_extra(params) if metric.key_extra else {}
            key = result_key(
                name, metric.version, params_dict(params), ckpt.sha256, {**context.data_key, **extra}
            )
            path = result_path(Path(self.config.out), ckpt.label, name)
            old = None if self.config.force else reusable(path, key)
            if old is not None:
                results.append(old)
                continue
            t0 = time.perf_counter()
            result = metric.compute(context, sae, params)
            result.check_finite(name, ckpt.source)
            payload = _payload(metric, params, result, ckpt, sae, context, key, time.perf_counter() - t0)
            write_result(path, payload)
            results.append(payload)
        context.forget(sae)
        return results

    def run(self) -> list[dict]:
        metrics = self.config.metrics
        results = []
        for ckpt in discover(self.config.checkpoint):
            print(f"evaluating {ckpt.label} ({', '.join(metrics)})", file=sys.stderr)
            results.extend(self.evaluate(ckpt, metrics))
        return results


def _known_model(checkpoint_model: str, fallback: str) -> str:
    """The checkpoint's model name, mapped onto an offline alias where it names one."""
    from saebench.model import resolve_alias

    return resolve_alias(checkpoint_model) or checkpoint_model or fallback


def _payload(metric, params, result, ckpt, sae, context, key, wall) -> dict:
    info = sae.info
    return {
        "schema": RESULT_SCHEMA,
        "metric": metric.name,
        "metric_version": metric.version,
        "key": key,
        "checkpoint": {
            "label": ckpt.label,
            "source": ckpt.source,
            "sha256": ckpt.sha256,
            "format": info.format,
            "architecture": info.architecture,
            "d_in": sae.d_in,
            "n_latents": sae.n_latents,
            "k": sae.k,
            "normalization": sae.normalization.kind,
            "training": info.extra.get("training"),
        },
        "values": {k: v.to_dict() for k, v in result.values.items()},
        "headline": list(metric.headline),
        "lower_is_better": sorted(metric.lower_is_better),
        "config": params_dict(params),
        "eval": {
            **dataclasses.asdict(context.config),
            "layer": context.layer,
            "n_windows": len(context.windows),
        },
        "data_key": context.data_key,
        "counts": result.counts,
        "details": result.details,
        "provenance": provenance(str(context.device), wall),
    }


def summary_table(results: list[dict]) -> str:
    """One row per checkpoint, the headline values of each metric with intervals."""
    from tabulate import tabulate

    rows: dict[str, dict] = {}
    columns: list[str] = []
    for r in results:
        row = rows.setdefault(r["checkpoint"]["label"], {"checkpoint": r["checkpoint"]["label"]})
        for name in r["headline"]:
            v = r["values"].get(name)
            if v is None:
                continue
            col = name
            if col not in columns:
                columns.append(col)
            row[col] = format_estimate(v)
    return tabulate(
        [[row.get(c, "") for c in ["checkpoint", *columns]] for row in rows.values()],
        headers=["checkpoint", *columns],
        tablefmt="github",
    )


def format_estimate(v: dict) -> str:
    def f(x):
        return f"{x:.4g}"

    if v.get("lo") is None:
        return f(v["value"])
    return f"{f(v['value'])} [{f(v['lo'])}, {f(v['hi'])}]"
