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

import numpy as np
import torch

from saebench.context import EvalConfig, EvalContext
from saebench.metrics.registry import Metric, get_metric, metric_names, params_dict
from saebench.metrics.registry import metrics as all_metrics
from saebench.results import (
    RESULT_SCHEMA,
    file_digest,
    filed_checkpoints,
    provenance,
    result_key,
    result_path,
    reusable,
    slug,
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
    #: the label a single checkpoint's results are filed under (default: its folder or file name)
    label: str | None = None
    #: where the evaluation windows come from (`SiteConfig.eval_split`); None: decided by `evaluation_split`
    eval_split: str | None = None


def evaluation_split(config: RunConfig) -> str:
    """`all` (the whole corpus) when the corpus is the user's and nothing is fitted on it, else `eval`.

    A built-in baseline is fitted on the corpus' train split, and the default corpus keeps its split (the
    committed results and trained baselines rest on it); a user's file or data set that is only evaluated
    is evaluated whole, one document or many.
    """
    from saebench.data.corpus import DEFAULT_CORPUS

    if config.eval_split is not None:
        return config.eval_split
    if config.eval.eval_split != "eval":
        return config.eval.eval_split
    return "eval" if config.eval.corpus == DEFAULT_CORPUS or is_builtin(config.checkpoint) else "all"


def short_corpus_warning(context: EvalContext) -> str | None:
    """One line when the corpus gives fewer evaluation windows than asked (all of them are then used; a
    corpus short by less than one window fills its last window with padding and is not worth a line)."""
    windows, cfg = context.windows, context.config
    if len(windows) >= cfg.n_windows:
        return None
    model = context.model
    text = int((~np.isin(windows[:, 1:], [model.bos_id, model.eos_id])).sum())
    scored = int(context.mask.sum())
    return f"corpus {cfg.corpus} has {text} tokens; scoring {scored} instead of {cfg.n_tokens}"


@dataclass
class Checkpoint:
    """A checkpoint to evaluate: where it is, the label its results are filed under, its identity."""

    source: str
    label: str
    sha256: str | None = None

    def identify(self) -> str:
        """What result files of this checkpoint share (see `same_checkpoint`): its sha256, computed once; for
        a built-in baseline its spec (its sha256 adds the site it is fitted at, known once it is built)."""
        if is_builtin(self.source):
            return f"builtin:{parse_builtin(self.source)}"
        if self.sha256 is None:
            self.sha256 = file_digest(Path(self.source))
        return self.sha256


def same_checkpoint(filed: dict, ckpt: Checkpoint) -> bool:
    """Whether a result file's `checkpoint` entry is of `ckpt`: the same sha256 for files; for a built-in
    baseline the same spec (its sha256 also names the site it was fitted at, which a rerun may change)."""
    sha = str(filed.get("sha256") or "")
    if is_builtin(ckpt.source):
        return sha.startswith(ckpt.identify() + ":")
    return sha == ckpt.identify()


@dataclass
class Failure:
    """A checkpoint of a folder that could not be evaluated, and why (the message names the fix)."""

    label: str
    source: str
    message: str

    def __str__(self) -> str:
        message = self.message.removeprefix(f"{self.source}: ")
        return f"checkpoint {self.label} ({self.source}): {message}"


#: what stops one checkpoint of a folder, reported at the end instead of stopping the run
CHECKPOINT_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, RuntimeError, OSError)


def check_label(label: str) -> str:
    """A `--label`: a file-name-safe name (it becomes the results subfolder)."""
    if not label or label.startswith(".") or slug(label) != label:
        raise ValueError(f"--label {label!r}: use letters, digits and . _ + - (not starting with .)")
    return label


def check_layer(site, what: str | None = None) -> None:
    """Raise unless the site's layer is one of the loaded model's blocks (`what` names where it came from)."""
    n_layers, layer = site.model.n_layers, site.layer
    if not 0 <= layer < n_layers:
        what = what or f"--layer {layer}"
        raise ValueError(f"{what}: the model has blocks 0..{n_layers - 1}; pass --layer with one of those")


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


def discover(checkpoint: str, label: str | None = None) -> list[Checkpoint]:
    """The checkpoints at or below `checkpoint`, each with the label its results are filed under: a single
    checkpoint's folder or file name (or `label`), a folder's checkpoints their paths below it."""
    if is_builtin(checkpoint):
        return [Checkpoint(checkpoint, label or parse_builtin(checkpoint).label)]
    from saebench.sae.hub import is_remote, remote_checkpoints
    from saebench.sae.load import find_checkpoints

    if is_remote(checkpoint):  # hf:ORG/REPO/SUB, saelens:RELEASE/ID: labelled ORG__REPO__SUB, RELEASE__ID
        remote = remote_checkpoints(checkpoint)
        if label is not None and len(remote) > 1:
            raise ValueError(
                f"--label names one checkpoint, but {checkpoint} holds {len(remote)}: drop --label"
            )
        return [Checkpoint(src, label or lab, file_digest(local)) for src, lab, local in remote]

    root = Path(checkpoint)
    # a file is one checkpoint: loading it detects its format (or takes --format) or says why it cannot
    paths = [root] if root.is_file() else find_checkpoints(root)
    if label is not None and len(paths) > 1:
        raise ValueError(
            f"--label names one checkpoint, but {checkpoint} holds {len(paths)}; their results are filed "
            "under their paths below it: drop --label"
        )
    if label is not None:
        return [Checkpoint(str(paths[0]), label)]
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
    """Evaluates checkpoints; contexts (model, cached activations) are shared across checkpoints.

    A folder of checkpoints is a batch: a checkpoint that cannot be evaluated is recorded in `failures`
    and the others go on.  A single checkpoint's error is raised.
    """

    def __init__(self, config: RunConfig, model=None, model_identity: str | None = None):
        self.config = config
        self.contexts: dict[tuple, EvalContext] = {}
        self.failures: list[Failure] = []
        self._broken: dict[tuple, Exception] = {}
        self._model = model
        self._model_identity = model_identity
        self.eval_split = evaluation_split(config)
        self._warned_short: set[str] = set()

    def context_for(self, model_name: str, layer: int | None, what_layer: str | None = None) -> EvalContext:
        """The context at (model, layer), its model loaded, layer checked and windows cut; a context that
        failed to come up fails again at once for the next checkpoint that needs it."""
        key = (model_name, layer)
        if key in self._broken:
            raise self._broken[key]
        if key not in self.contexts:
            cfg = dataclasses.replace(
                self.config.eval, model=model_name, layer=layer, eval_split=self.eval_split
            )
            shared = next(iter(self.contexts.values()), None)
            model = (
                self._model
                if self._model is not None
                else (shared.model if shared is not None and shared.config.model == model_name else None)
            )
            context = EvalContext(cfg, preloaded_model=model, model_identity=self._model_identity)
            try:
                check_layer(context.site, what_layer)
                context.windows  # noqa: B018 -- corpus problems surface before any metric runs
            except Exception as err:
                self._broken[key] = err
                raise
            self.contexts[key] = context
            short = short_corpus_warning(context)
            if short is not None and short not in self._warned_short:
                self._warned_short.add(short)
                self.warn(short)
        return self.contexts[key]

    def warn(self, message: str) -> None:
        """A warning about the run as a whole (not about one checkpoint)."""
        warnings.warn(message, stacklevel=3)

    def load(self, ckpt: Checkpoint) -> tuple[SAE, EvalContext]:
        if is_builtin(ckpt.source):
            spec = parse_builtin(ckpt.source)
            context = self.builtin_context(ckpt)
            sae = build_builtin(spec, context.site.train_sample(spec.fit_tokens), seed=self.config.eval.seed)
        else:
            sae = self.read(ckpt)
            context = self.context_of(ckpt, sae)
        return sae.to(context.device, context.model.dtype).eval(), context

    def builtin_context(self, ckpt: Checkpoint) -> EvalContext:
        """The context a built-in baseline is fitted and evaluated in; its sha256 names the site."""
        context = self.context_for(self.config.eval.model, self.config.eval.layer)
        ckpt.sha256 = f"{ckpt.identify()}:{context.site.key}"
        return context

    def read(self, ckpt: Checkpoint) -> SAE:
        from saebench.sae.load import load_sae

        return load_sae(ckpt.source, format=self.config.format, device="cpu", dtype=torch.float32)

    def site_of(self, ckpt: Checkpoint, sae: SAE) -> tuple[str, int | None, str | None]:
        """(model, layer, where the layer comes from for messages) a loaded checkpoint is evaluated at: its
        own model and layer unless the run names them."""
        cfg = self.config
        model_name = cfg.eval.model
        if sae.info.model_name and not cfg.model_given:
            model_name = _known_model(sae.info.model_name, cfg.eval.model)
        elif sae.info.model_name and sae.info.model_name != cfg.eval.model:
            warnings.warn(
                f"{ckpt.source} was trained on {sae.info.model_name!r}; evaluating on {cfg.eval.model!r} "
                "as asked",
                stacklevel=3,
            )
        layer = cfg.eval.layer if cfg.eval.layer is not None else sae.info.layer
        what_layer = (
            None if cfg.eval.layer is not None or layer is None else f"layer {layer} (the checkpoint's)"
        )
        if cfg.eval.layer is not None and sae.info.layer is not None and sae.info.layer != cfg.eval.layer:
            warnings.warn(
                f"{ckpt.source} was trained at layer {sae.info.layer}; evaluating at layer {cfg.eval.layer} "
                "as asked",
                stacklevel=3,
            )
        return model_name, layer, what_layer

    def context_of(self, ckpt: Checkpoint, sae: SAE) -> EvalContext:
        """The context a loaded checkpoint is evaluated in (`site_of`), its width checked against the
        model's."""
        from saebench.model.loading import ModelLoadError
        from saebench.sae.load import check_width

        model_name, layer, what_layer = self.site_of(ckpt, sae)
        try:
            context = self.context_for(model_name, layer, what_layer)
        except ModelLoadError as err:
            if not sae.info.model_name or self.config.model_given:
                raise
            from saebench.model import DEFAULT_MODEL

            raise ModelLoadError(
                f"{ckpt.source}: its config names model {sae.info.model_name!r}, which cannot be loaded "
                f"here ({err}); pass --model {DEFAULT_MODEL} (or another model of width {sae.d_in})"
            ) from None
        check_width(sae, context.model.d_model)
        return context

    def _plan(self) -> list[tuple[Metric, object, dict]]:
        """(metric, parameters, what else its results depend on) per requested metric, validated (task
        selections included) before any checkpoint or model loads."""
        plan = []
        for name in self.config.metrics:
            metric = get_metric(name)
            params = make_params(metric, self.config.params.get(name, {}))
            plan.append((metric, params, metric.key_extra(params) if metric.key_extra else {}))
        return plan

    def check_filing(self, ckpt: Checkpoint, batch: bool) -> None:
        """Refuse to file results of `ckpt` where another checkpoint's results are (a label is one folder)."""
        folder = result_path(Path(self.config.out), ckpt.label, "x").parent
        for path, filed in filed_checkpoints(folder):
            if not same_checkpoint(filed, ckpt):
                fix = "evaluate it alone with --label NAME" if batch else "pass --label NAME"
                raise ValueError(
                    f"{ckpt.source}: {folder} already holds results of another checkpoint "
                    f"({filed.get('source')}, sha256 {str(filed.get('sha256'))[:12]}, in {path.name}); {fix} "
                    f"to file it under another name, give another --out, or delete {folder} to replace them"
                )

    def filing(self, ckpt: Checkpoint, context: EvalContext, metric: Metric, params, extra: dict):
        """(result file, result key) of one metric of `ckpt` evaluated in `context`."""
        data = {**context.data_key, **extra}
        key = result_key(metric.name, metric.version, params_dict(params), ckpt.sha256, data)
        return result_path(Path(self.config.out), ckpt.label, metric.name), key

    def evaluate(
        self, ckpt: Checkpoint, plan: list[tuple[Metric, object, dict]], batch: bool = False
    ) -> list[dict]:
        ckpt.identify()
        self.check_filing(ckpt, batch)
        sae, context = self.load(ckpt)
        print(f"evaluating {ckpt.label} ({', '.join(m.name for m, _, _ in plan)})", file=sys.stderr)
        results = []
        for metric, params, extra in plan:
            name = metric.name
            path, key = self.filing(ckpt, context, metric, params, extra)
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
        """Results of every checkpoint that could be evaluated; a folder's failures land in `failures`."""
        self.failures = []
        checkpoints = discover(self.config.checkpoint, self.config.label)
        plan = self._plan()
        batch = len(checkpoints) > 1
        results = []
        for ckpt in checkpoints:
            try:
                results.extend(self.evaluate(ckpt, plan, batch))
            except CHECKPOINT_ERRORS as err:
                if not batch:
                    raise
                text = str(err).strip()
                self.failures.append(
                    Failure(ckpt.label, ckpt.source, text.splitlines()[0] if text else type(err).__name__)
                )
                print(f"saebench: {ckpt.label} failed; going on with the others", file=sys.stderr)
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
            "n_tokens_scored": int(context.mask.sum()),
        },
        "data_key": context.data_key,
        "counts": result.counts,
        "details": result.details,
        "provenance": provenance(str(context.device), wall),
    }
