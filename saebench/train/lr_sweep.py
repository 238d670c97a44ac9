"""The lr sweep, after training: score every run on held-out windows, pick the best lr per n, fit the trend.

    score   each run's checkpoint is evaluated by the runner (`saebench run`'s core and downstream
            metrics) on validation windows of the held-out split, which training never sees: those right
            after the evaluation set, so the lr is not tuned on the windows the leaderboard reports; the
            result files go to <out>/<run>/scores/ and are reused when the sweep is run again
    best    per n, the grid lr with the lowest delta_ce (CRITERION); its bracket is the neighbouring
            grid lrs, and `at_edge` flags a best at the grid's end (then the optimum may lie outside);
            lr_star refines an interior best by the vertex of a parabola through the three points in
            (log lr, delta_ce)
    trend   lr*(n) = a n^b, least squares of log lr_star on log n, over the interior n when at least two
            are interior (else over all n, flagged); the paper's slope is b = -1/2

The same code serves the ReLU lr sweep (`relu-lr`, whose runs are each a lambda search's chosen run at
L0 ~ 32); a fit holds one activation.  `finish_lr_sweep` writes all of it to <out>/lr-fit.json and prints
it; `install_trend` files that trend under its activation in the trend file `lr_trend.py` reads
(TREND_FILE by default), so that presets of that activation without an explicit lr train at the fitted lr.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from saebench.data.cache import atomic_write_bytes
from saebench.data.site import Site

#: the value the best lr minimises (downstream's delta CE: the issue's target); nmse is recorded beside it
CRITERION = ("downstream", "delta_ce")
#: the values recorded per run: (metric, value)
SCORES = (
    ("core", "nmse"),
    ("core", "l0"),
    ("core", "fvu_raw"),
    ("core", "dead_frac"),
    CRITERION,
    ("downstream", "kl"),
)
#: the sweep's fit, in its out folder
FIT_FILE = "lr-fit.json"
#: the scores of a run, inside its run folder
SCORES_FOLDER = "scores"


def validation_config(site: Site, eval_tokens: int):
    """The held-out windows the sweep scores on: the `eval_tokens` right after the evaluation set of the
    default size (`EvalConfig().n_windows` windows), so the lr is not tuned on the windows the leaderboard
    reports."""
    import dataclasses

    from saebench.context import EvalConfig

    fields = {**dataclasses.asdict(site.config), "layer": site.layer}
    return EvalConfig(**fields, n_tokens=eval_tokens, eval_start=EvalConfig(**fields).n_windows)


def score_checkpoint(
    site: Site,
    checkpoint: Path,
    out: Path,
    label: str,
    eval_tokens: int,
    *,
    force: bool = False,
    validation: bool = True,
) -> dict[str, dict]:
    """{metric: result} of core and downstream for one checkpoint, computed by the runner (`saebench run`)
    on `eval_tokens` tokens of the site's evaluation split (held out from training whatever the corpus):
    the validation windows after the evaluation set (`validation_config`), or with validation=False the
    evaluation set itself; filed under out/label and reused when they are there."""
    import dataclasses

    from saebench.context import EvalConfig
    from saebench.data.corpus import CorpusError
    from saebench.runner import RunConfig, Runner

    fields = {**dataclasses.asdict(site.config), "layer": site.layer}
    eval_config = EvalConfig(**fields, n_tokens=eval_tokens)
    if validation:
        held_out = validation_config(site, eval_tokens)
        try:
            site.windows("eval", held_out.n_windows, held_out.eval_start)
            eval_config = held_out
        except CorpusError:
            _warn_once(
                "lr sweep: the corpus' held-out split has no windows after the evaluation set; the runs are "
                "scored on the evaluation set itself (eval_start 0 in their scores)"
            )
    config = RunConfig(
        checkpoint=str(checkpoint),
        metrics=sorted({metric for metric, _ in SCORES}),
        eval=eval_config,
        out=str(out),
        label=label,
        force=force,
        model_given=True,
        eval_split="eval",
    )
    runner = Runner(config, model=site.model, model_identity=site.model_key)
    return {result["metric"]: result for result in runner.run()}


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def score_values(results: dict[str, dict]) -> dict[str, float]:
    """{"metric.value": value} of SCORES from `score_checkpoint`'s results."""
    return {f"{metric}.{value}": results[metric]["values"][value]["value"] for metric, value in SCORES}


def score_runs(site: Site, checkpoints: list[Path], eval_tokens: int, *, force: bool = False) -> list[dict]:
    """{name, activation, n_latents, k, lr, lr_source, batch_size, max_tokens, <metric.value>...} per
    checkpoint of `train_runs`, each scored by `score_checkpoint` into <run>/scores/."""
    rows = []
    for checkpoint in checkpoints:
        run_dir = Path(checkpoint).parent
        results = score_checkpoint(site, checkpoint, run_dir, SCORES_FOLDER, eval_tokens, force=force)
        training = results[CRITERION[0]]["checkpoint"]["training"]
        rows.append(
            {
                "name": run_dir.name,
                "activation": training["config"]["activation"],
                "n_latents": training["config"]["n_latents"],
                "k": training["config"]["k"],
                "lr": training["lr"],
                "lr_source": training.get("lr_source"),
                "batch_size": training["config"]["batch_size"],
                "max_tokens": training["config"]["max_tokens"],
                **score_values(results),
            }
        )
    return rows


def _vertex(xs: list[float], ys: list[float]) -> float:
    """x of the minimum of the parabola through three points, kept within their x range."""
    centre = xs[1]  # fitted around the middle point: log lrs are far from 0 and close together
    c2, c1, _ = np.polyfit([x - centre for x in xs], ys, 2)
    if not c2 > 0:  # not convex (noise): the middle point stands
        return xs[1]
    return float(min(max(centre - c1 / (2 * c2), xs[0]), xs[2]))


def best_per_n(rows: list[dict], criterion: str = ".".join(CRITERION)) -> list[dict]:
    """Per n (ascending): the best grid lr by `criterion`, its bracket, at_edge, lr_star."""
    out = []
    for n in sorted({row["n_latents"] for row in rows}):
        runs = sorted((row for row in rows if row["n_latents"] == n), key=lambda row: row["lr"])
        lrs = [row["lr"] for row in runs]
        values = [row[criterion] for row in runs]
        i = int(np.argmin(values))
        at_edge = len(runs) < 3 or i in (0, len(runs) - 1)
        if at_edge:
            lr_star = lrs[i]
        else:
            xs = [math.log(lr) for lr in lrs[i - 1 : i + 2]]
            lr_star = math.exp(_vertex(xs, values[i - 1 : i + 2]))
        out.append(
            {
                "n_latents": n,
                "best_lr": lrs[i],
                "best": values[i],
                "bracket": [lrs[i - 1] if i > 0 else None, lrs[i + 1] if i + 1 < len(lrs) else None],
                "at_edge": at_edge,
                "lr_star": lr_star,
                "grid": lrs,
                criterion: values,
            }
        )
    return out


def fit_trend(best: list[dict]) -> dict:
    """lr*(n) = a n^b by least squares in log-log over the interior n (all n when fewer than two are)."""
    interior = [b for b in best if not b["at_edge"]]
    points = interior if len(interior) >= 2 else best
    if len({p["n_latents"] for p in points}) < 2:
        return {"a": None, "b": None, "fit_n": [p["n_latents"] for p in points], "includes_edge": True}
    x = np.log([p["n_latents"] for p in points])
    y = np.log([p["lr_star"] for p in points])
    b, log_a = np.polyfit(x, y, 1)
    residual = y - (log_a + b * x)
    return {
        "a": float(math.exp(log_a)),
        "b": float(b),
        "paper_b": -0.5,
        "fit_n": [int(p["n_latents"]) for p in points],
        "includes_edge": any(p["at_edge"] for p in points),
        "rms_log_residual": float(np.sqrt(np.mean(residual**2))),
    }


def fit_sweep(rows: list[dict], *, sweep: str, out: Path, n_tokens: int, eval_tokens: int) -> dict:
    """The whole fit: the scored runs, the best per n and the trend, with what it was fitted at."""
    for key in ("activation", "batch_size", "k"):
        if len({row[key] for row in rows}) != 1:
            raise ValueError(f"the lr sweep's runs differ in {key}: one trend needs one {key}")
    best = best_per_n(rows)
    trend = fit_trend(best)
    table = {"runs": rows, "best": best, "trend": trend}
    fit_id = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:12]
    return {
        "fit_id": fit_id,
        "sweep": sweep,
        "out": str(Path(out).resolve()),
        "criterion": ".".join(CRITERION),
        "activation": rows[0]["activation"],
        "k": rows[0]["k"],
        "batch_size": rows[0]["batch_size"],
        "n_tokens": n_tokens,
        "max_tokens": int(np.median([row["max_tokens"] for row in rows])),
        "eval_tokens": eval_tokens,
        **table,
    }


def describe(fit: dict) -> str:
    """The fit as a few lines of text: per n the grid with delta_ce and nmse, the best, the trend."""
    size = f"k={fit['k']}" if fit["activation"] == "topk" else f"L0 target {fit['k']}"
    run = f"batch {fit['batch_size']}, {fit['max_tokens']} tokens per run"
    lines = [f"{fit['activation']} lr sweep at {size}, {run}"]
    by_name = {(row["n_latents"], row["lr"]): row for row in fit["runs"]}
    for b in fit["best"]:
        n = b["n_latents"]
        cells = []
        for lr in b["grid"]:
            row = by_name[(n, lr)]
            mark = "*" if lr == b["best_lr"] else " "
            cells.append(
                f"{mark}{lr:.3g}: dCE {row['downstream.delta_ce']:.4f} nmse {row['core.nmse']:.4f} "
                f"L0 {row['core.l0']:.1f}"
            )
        edge = "  AT THE GRID'S EDGE: widen the grid" if b["at_edge"] else ""
        lines.append(f"n={n}: best lr {b['best_lr']:.3g} (lr* {b['lr_star']:.3g}){edge}")
        lines.extend(f"    {cell}" for cell in cells)
    t = fit["trend"]
    if t["a"] is None:
        lines.append("trend: not fitted (fewer than two dictionary sizes)")
    else:
        note = " (includes edge points)" if t["includes_edge"] else ""
        lines.append(
            f"trend: lr*(n) = {t['a']:.4g} * n^{t['b']:.3f} over n in {t['fit_n']}{note}; paper b = -0.5"
        )
    return "\n".join(lines)


def finish_lr_sweep(
    site: Site, checkpoints: list[Path], out: Path, *, sweep: str, n_tokens: int, eval_tokens: int
) -> dict:
    """Score the sweep's runs, fit, write <out>/lr-fit.json, print the fit; returns it."""
    rows = score_runs(site, checkpoints, eval_tokens)
    fit = fit_sweep(rows, sweep=sweep, out=out, n_tokens=n_tokens, eval_tokens=eval_tokens)
    atomic_write_bytes(Path(out) / FIT_FILE, (json.dumps(fit, indent=1) + "\n").encode())
    print(describe(fit), file=sys.stderr)
    return fit


def install_trend(fit: dict, dest: Path) -> Path:
    """File the trend of a sweep's fit under its activation in trend file `dest` (other activations' trends
    there stay); refused when the fit has no trend."""
    from .lr_trend import with_trend

    trend = fit["trend"]
    if trend["a"] is None:
        raise ValueError(f"the fit {fit['fit_id']} has no trend (fewer than two dictionary sizes)")
    record = {
        "a": trend["a"],
        "b": trend["b"],
        "paper_b": trend["paper_b"],
        "activation": fit["activation"],
        "k": fit["k"],
        "batch_size": fit["batch_size"],
        "max_tokens": fit["max_tokens"],
        "n_tokens": fit["n_tokens"],
        "criterion": fit["criterion"],
        "fit_id": fit["fit_id"],
        "sweep": fit["sweep"],
        "fit_n": trend["fit_n"],
        "includes_edge": trend["includes_edge"],
        "best": [
            {key: b[key] for key in ("n_latents", "best_lr", "lr_star", "bracket", "at_edge")}
            for b in fit["best"]
        ],
    }
    content = with_trend(Path(dest), record)
    atomic_write_bytes(Path(dest), (json.dumps(content, indent=1) + "\n").encode())
    return Path(dest)
