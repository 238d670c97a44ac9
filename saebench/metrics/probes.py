"""probes: 1-D logistic probes over every latent, the paper's probe loss (METRICS.md).

Per task (a YAML in `tasks/`; its seeded balanced split of n_train / n_test examples, each truncated to
max_tokens with BOS): the SAE encodes the cached site residuals at positions 1.., latents are pooled per
example (mean, max or last over positions 1..), and every latent j gets its own probe
p = sigmoid(w f_j + b) on the standardised pooled feature, fitted by Newton-Raphson on the train split
(mean log-loss + (l2/2) w^2, see `saebench.metrics.logistic`).  Then

    task score         = test CE of the latent with the lowest *train* CE (no selection on test)
    probe_loss         = mean task score over tasks                               (nats, lower is better)
    probe_loss_residual = the same with the d_model raw residual channels, pooled the same way, as features
    probe_loss_prior   = mean test CE of predicting the train prior

Wide SAEs: the pooled latents are kept sparse (the pooled codes, `PooledLatents`) and the probes are
fitted `POOLED_ELEMENTS // n_examples` latents at a time, keeping the best so far (the first latent of the
lowest train CE, as one fit over all latents picks); nothing of size examples x n_latents is held at once.

A latent-sharded SAE (`saebench.sae.latent_shard`, one wide checkpoint under torchrun): every rank
encodes with the whole SAE's codes, keeps its own latents' entries and fits them; per task the lowest train
CE over the ranks wins, the lowest rank's on equal CE (its latents come first), as one fit picks.

Intervals resample tasks.  Per task the details keep the chosen latent's id, train CE, test CE and test
AUROC, the residual channel's, and the prior's CE.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.context import EvalContext
from saebench.data.task_activations import TaskActivations, site_task_activations
from saebench.data.tasks import TaskError, discover_tasks, select_tasks, task_fingerprint
from saebench.metrics.logistic import cross_entropy, fit_logistic, standardize
from saebench.metrics.registry import Metric, MetricResult, Option, Plot, register
from saebench.metrics.stats import mean_estimate
from saebench.sae.latent_shard import LatentShard
from saebench.sae.sae import SAE

FIT_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: pooled values (examples x latents) densified at once for the probe fits: 128 MB in float64
POOLED_ELEMENTS = 1 << 24


@dataclass
class ProbesParams:
    #: tasks to probe: names, tags or `all`, comma-separated (see `saebench tasks list`)
    tasks: str = "all"
    #: extra folders of task YAMLs, comma-separated; a task there overrides a built-in one of that name
    include_tasks: str = ""
    #: penalty on the probe's slope: minimise mean train log-loss + (l2 / 2) w^2
    l2: float = 1e-3
    #: Newton stops when both coordinates of its step are below this ...
    tol: float = 1e-8
    #: ... or after this many passes
    max_iter: int = 50
    #: precision of the logistic fits: float32 agrees with scikit-learn's float64 fits to ~1e-6 in test CE
    #: and is twice as fast; float64 for reference
    fit_dtype: str = "float32"
    #: tokens encoded by the SAE at once: the dense pre-activations are chunk_tokens x n_latents, or x a
    #: chunk of the latents for a wide SAE (`SAE.latent_chunk`)
    chunk_tokens: int = 1024

    def __post_init__(self):
        if self.fit_dtype not in FIT_DTYPES:
            raise ValueError(
                f"probes: fit_dtype must be one of {', '.join(FIT_DTYPES)}, got {self.fit_dtype!r}"
            )
        if not self.l2 >= 0:
            raise ValueError(f"probes: l2 is a penalty weight and must be >= 0, got {self.l2}")
        if not self.tol > 0:
            raise ValueError(f"probes: tol must be positive, got {self.tol}")
        if self.max_iter < 1:
            raise ValueError(f"probes: max_iter must be >= 1, got {self.max_iter}")
        if self.chunk_tokens < 1:
            raise ValueError(f"probes: chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass
class BestProbe:
    """The candidate feature with the lowest train CE on one task."""

    feature: int
    train_ce: float
    test_ce: float
    test_auroc: float


class PooledLatents:
    """A task's SAE latents pooled per example, kept sparse: the entries (example, latent, value) of its
    tokens' codes, whose sum per (example, latent) is the pooled value for `mean` (values pre-scaled by
    1 / length) and `last` (one token per example), and whose max (from 0) is it for `max`.

    `columns(a, b)` is the dense block of latents [a, b), (n_examples, b - a) float64.
    """

    def __init__(self, n_examples: int, n_latents: int, pool: str, example, latent, value):
        self.n_examples, self.n_latents, self.pool = n_examples, n_latents, pool
        self.example, self.latent, self.value = example, latent, value
        self._by_latent = None

    def finite(self) -> bool:
        """Whether every pooled value is finite (sums and maxima of finite float32 values in float64 are)."""
        return bool(torch.isfinite(self.value).all())

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Pooled values of latents [start, stop) for every example, (n_examples, stop - start) float64."""
        example, latent, value = self.example, self.latent, self.value
        if (start, stop) != (0, self.n_latents):
            if self._by_latent is None:
                # stable: within one (example, latent) the entries keep their token order, so each block
                # sums them in the order a block of all latents does
                order = torch.argsort(latent, stable=True)
                self._by_latent = (example[order], latent[order], value[order])
            example, latent, value = self._by_latent
            lo, hi = torch.searchsorted(latent, torch.tensor([start, stop], device=latent.device)).tolist()
            example, latent, value = example[lo:hi], latent[lo:hi], value[lo:hi]
        width = stop - start
        out = torch.zeros(self.n_examples * width, dtype=torch.float64, device=value.device)
        where = example * width + (latent - start)
        if self.pool == "max":
            out.scatter_reduce_(0, where, value, "amax")
        else:
            out.index_add_(0, where, value)
        return out.view(self.n_examples, width)


def pooled_codes(
    sae, acts: TaskActivations, pool: str, chunk_tokens: int, device, latents: slice | None = None
) -> PooledLatents:
    """The task's SAE latents pooled per example (mean, max or last over positions 1..), kept sparse.

    Latents are >= 0 and an inactive latent is exactly 0, so max pooling starts from 0 and a sum over the
    sparse codes is the sum over all latents.  `last` encodes only each example's last position.
    `latents`: keep only that range of the latents, numbered from its start (a latent shard's own).
    """
    lo_latent, hi_latent = (0, sae.n_latents) if latents is None else (latents.start, latents.stop)
    n_ex, lengths = acts.n_examples, acts.lengths
    if pool == "last":
        examples = np.flatnonzero(lengths > 0)
        rows = acts.offsets[1:][examples] - 1
    else:
        examples = np.repeat(np.arange(n_ex), lengths)
        rows = None
    scale = 1.0 / lengths[examples] if pool == "mean" else np.ones(len(examples))
    examples_t = torch.from_numpy(examples).to(device)
    scale_t = torch.from_numpy(scale).to(device)
    scratch = sae.scratch(min(chunk_tokens, max(len(examples), 1)))
    parts = []
    with torch.inference_mode():
        for lo in range(0, len(examples), chunk_tokens):
            hi = min(lo + chunk_tokens, len(examples))
            block = acts.resid[lo:hi] if rows is None else acts.resid[rows[lo:hi]]
            x = torch.from_numpy(np.array(block)).to(device, sae.W_enc.dtype)
            codes = sae.encode_codes(x, scratch).codes
            active = codes.values != 0
            if latents is not None:
                active &= (codes.indices >= lo_latent) & (codes.indices < hi_latent)
            parts.append(
                (
                    examples_t[lo:hi, None].expand_as(codes.indices)[active],
                    codes.indices[active] - lo_latent,
                    (codes.values.double() * scale_t[lo:hi, None])[active],
                )
            )
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    example, latent, value = (torch.cat(p) for p in zip(*parts, strict=True)) if parts else (empty,) * 3
    return PooledLatents(n_ex, hi_latent - lo_latent, pool, example, latent, value.double())


def pool_residual(acts: TaskActivations, pool: str) -> np.ndarray:
    """The raw residual channels pooled per example, (n_examples, d) float64; 0 for an empty example."""
    lengths, starts = acts.lengths, acts.offsets[:-1]
    out = np.zeros((acts.n_examples, acts.resid.shape[1]))
    full = np.flatnonzero(lengths > 0)
    if pool == "last":
        out[full] = acts.resid[acts.offsets[1:][full] - 1]
        return out
    # segments of empty examples are skipped; sums accumulate in float64
    if pool == "max":
        out[full] = np.maximum.reduceat(acts.resid, starts[full], axis=0)
    else:
        out[full] = np.add.reduceat(acts.resid, starts[full], axis=0, dtype=np.float64)
    if pool == "mean":
        out[full] /= lengths[full, None]
    return out


def best_probe(features: torch.Tensor, labels: np.ndarray, n_train: int, params: ProbesParams) -> BestProbe:
    """Fit a probe on every column of `features` (n_examples, F; train rows first) and return the one
    with the lowest train CE, scored on the test rows."""
    dtype = FIT_DTYPES[params.fit_dtype]
    y = torch.from_numpy(np.asarray(labels, dtype=bool)).to(features.device)
    train, test = standardize(features[:n_train].to(dtype), features[n_train:].to(dtype))
    fit = fit_logistic(
        train, y[:n_train], l2=params.l2, tol=params.tol, max_iter=params.max_iter, dtype=dtype
    )
    j = int(torch.argmin(fit.train_ce))
    scores = (fit.w[j] * test[:, j].double() + fit.b[j]).cpu().numpy()
    test_ce = float(cross_entropy(test[:, j : j + 1], y[n_train:], fit.w[j : j + 1], fit.b[j : j + 1])[0])
    return BestProbe(j, float(fit.train_ce[j]), test_ce, auroc(scores, labels[n_train:]))


def best_latent_probe(
    pooled: PooledLatents, labels: np.ndarray, n_train: int, params: ProbesParams, chunk: int | None = None
) -> BestProbe:
    """`best_probe` over every latent, fitted `chunk` latents at a time (default: POOLED_ELEMENTS //
    n_examples, all of them for ordinary widths); a later block wins only with a strictly lower train CE,
    so the latent is the one a single fit over all latents picks."""
    n = pooled.n_latents
    width = max(1, min(n, chunk or POOLED_ELEMENTS // max(pooled.n_examples, 1)))
    best = None
    for start in range(0, n, width):
        found = best_probe(pooled.columns(start, min(start + width, n)), labels, n_train, params)
        if best is None or found.train_ce < best.train_ce:
            best = replace(found, feature=found.feature + start)
    return best


def prior_ce(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test CE of predicting the train prior for every example."""
    p, q = float(np.mean(train_labels)), float(np.mean(test_labels))
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2."""
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average 1-based rank over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def residual_baseline(context: EvalContext, task, acts: TaskActivations, params: ProbesParams) -> BestProbe:
    """The best raw residual channel on a task; it does not depend on the SAE, so it is cached on disk."""
    fit = {k: getattr(params, k) for k in ("l2", "tol", "max_iter", "fit_dtype")}
    store = context.store("probe-residual", {"task": task_fingerprint(task), "pool": task.pool, **fit})
    if store.has("best"):
        feature, train_ce, test_ce, test_auroc = store.load("best", mmap=False).tolist()
        return BestProbe(int(feature), train_ce, test_ce, test_auroc)
    residual = torch.from_numpy(pool_residual(acts, task.pool)).to(context.device)
    best = best_probe(residual, acts.labels, acts.n_train, params)
    store.save("best", np.array([best.feature, best.train_ce, best.test_ce, best.test_auroc]))
    return best


def selected(params: ProbesParams) -> list:
    include = [p.strip() for p in params.include_tasks.split(",") if p.strip()]
    return select_tasks(discover_tasks(include), params.tasks)


def claim_task_items(items: list[str], overrides: dict) -> dict:
    """`--tasks` items that name probe tasks or tags select this metric on those tasks."""
    include = [p.strip() for p in str(overrides.get("include_tasks", "")).split(",") if p.strip()]
    try:
        select_tasks(discover_tasks(include), ",".join(items))
    except TaskError as err:
        raise ValueError(f"not a probe task or tag: {err}") from None
    return {"tasks": ",".join(items)}


def task_fingerprints(params: ProbesParams) -> dict:
    """The selected tasks' definitions and data, so an edited task YAML or data file is not reused."""
    return {"tasks": {task.name: task_fingerprint(task) for task in selected(params)}}


def compute(context: EvalContext, sae: SAE, params: ProbesParams) -> MetricResult:
    tasks = selected(params)
    shard = sae.latents if isinstance(sae, LatentShard) else None  # fit only this rank's latents
    timing = {"activations_s": 0.0, "encode_s": 0.0, "fit_s": 0.0, "residual_s": 0.0}
    per_task, scores, residual_scores, prior_scores = {}, [], [], []
    n_tokens = 0
    for task in tqdm(tasks, desc="probes", leave=False, dynamic_ncols=True):
        t0 = time.perf_counter()
        acts = site_task_activations(context.site, task)
        t1 = time.perf_counter()
        pooled = pooled_codes(sae, acts, task.pool, params.chunk_tokens, context.device, shard)
        if not pooled.finite():
            raise FloatingPointError(
                f"probes: SAE latents on task {task.name!r} contain NaN or inf ({sae.info.path})"
            )
        t2 = time.perf_counter()
        best = best_latent_probe(pooled, acts.labels, acts.n_train, params)
        if shard is not None:  # this rank's best of its latents; the lowest train CE of all ranks wins
            best = sae.lowest(best.train_ce, replace(best, feature=best.feature + shard.start))
        del pooled
        t3 = time.perf_counter()
        best_residual = residual_baseline(context, task, acts, params)
        t4 = time.perf_counter()
        for name, dt in zip(timing, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            timing[name] += dt

        prior = prior_ce(acts.labels[: acts.n_train], acts.labels[acts.n_train :])
        scores.append(best.test_ce)
        residual_scores.append(best_residual.test_ce)
        prior_scores.append(prior)
        n_tokens += int(acts.offsets[-1])
        per_task[task.name] = {
            "latent": best.feature,
            "train_ce": best.train_ce,
            "test_ce": best.test_ce,
            "test_auroc": best.test_auroc,
            "residual_channel": best_residual.feature,
            "residual_train_ce": best_residual.train_ce,
            "residual_test_ce": best_residual.test_ce,
            "residual_test_auroc": best_residual.test_auroc,
            "prior_test_ce": prior,
            "n_train": acts.n_train,
            "n_test": acts.n_examples - acts.n_train,
            "pool": task.pool,
            "max_tokens": task.max_tokens,
            "tokens": int(acts.offsets[-1]),
        }
    print(
        f"probes: {len(tasks)} tasks, encode {timing['encode_s']:.1f} s, fit {timing['fit_s']:.1f} s, "
        f"residual baseline {timing['residual_s']:.1f} s, activations {timing['activations_s']:.1f} s",
        file=sys.stderr,
    )
    seed = context.config.seed
    values = {
        "probe_loss": mean_estimate(scores, "tasks", seed),
        "probe_loss_residual": mean_estimate(residual_scores, "tasks", seed),
        "probe_loss_prior": mean_estimate(prior_scores, "tasks", seed),
    }
    counts = {"tasks": len(tasks), "tokens": n_tokens, "latents": sae.n_latents}
    return MetricResult(values=values, counts=counts, details={"tasks": per_task, "timing": timing})


register(
    Metric(
        name="probes",
        version=1,
        description="1-D logistic probe loss of the best latent per binary task (probe_loss)",
        compute=compute,
        params=ProbesParams,
        latent_sharded=True,
        headline=("probe_loss", "probe_loss_residual", "probe_loss_prior"),
        lower_is_better=frozenset({"probe_loss", "probe_loss_residual", "probe_loss_prior"}),
        key_extra=task_fingerprints,
        options=(
            Option(
                "--probe-tasks",
                "tasks",
                "probe tasks for the probes metric: names and/or tags, comma-separated (default all)",
            ),
            Option(
                "--include-tasks",
                "include_tasks",
                "extra folder of task YAMLs (repeatable)",
                metavar="DIR",
                repeatable=True,
            ),
        ),
        claim_items=claim_task_items,
        plots=(Plot("probe_loss_vs_l0.png", "probe_loss", "probe loss (nats)"),),
    )
)
