"""`saebench leaderboard`: a markdown table and plots generated from result files alone.

One row per checkpoint; one column per headline value of every metric found in the files (a new metric
adds columns without a change here).  Plots: nmse vs L0 by architecture, delta_ce vs L0, dead fraction,
probe_loss vs L0 when probe results exist.  A section checks three claims of Gao et al. (2024) on the
checkpoints present.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saebench.data.cache import atomic_write_bytes
from saebench.results import iter_results
from saebench.runner import format_estimate


@dataclass
class Row:
    """Everything known about one checkpoint across its result files."""

    label: str
    checkpoint: dict
    #: {metric: {value name: estimate dict}}
    values: dict[str, dict] = field(default_factory=dict)
    #: {metric: headline value names}
    headline: dict[str, list] = field(default_factory=dict)
    lower_is_better: set = field(default_factory=set)

    def get(self, metric: str, name: str) -> float | None:
        v = self.values.get(metric, {}).get(name)
        return None if v is None else v["value"]

    @property
    def family(self) -> str:
        """Architecture family for plots: topk, relu, jumprelu, ... (with a training variant if any)."""
        training = self.checkpoint.get("training") or {}
        variant = training.get("variant") or _training_variant(training.get("config") or {})
        arch = str(self.checkpoint.get("architecture", "?")).lower()
        arch = {"standard": "relu"}.get(arch, arch)
        return f"{arch} ({variant})" if variant else arch


def _training_variant(config: dict) -> str | None:
    """How a saebench-trained checkpoint departs from the paper's recipe, from its training config."""
    departures = []
    if config.get("activation") == "topk" and config.get("auxk_alpha") == 0:
        departures.append("no AuxK")
    if config.get("tied_init") is False:
        departures.append("untied init")
    if config.get("multi_topk"):
        departures.append("Multi-TopK")
    if config.get("lr") is not None:
        departures.append(f"lr {config['lr']:.3g}")
    return ", ".join(departures) or None


def collect_rows(result_dirs: list[Path]) -> list[Row]:
    rows: dict[str, Row] = {}
    for folder in result_dirs:
        for _, r in iter_results(folder):
            label = r["checkpoint"]["label"]
            row = rows.setdefault(label, Row(label, r["checkpoint"]))
            row.values[r["metric"]] = r["values"]
            row.headline[r["metric"]] = r.get("headline", list(r["values"]))
            row.lower_is_better |= {f"{r['metric']}.{n}" for n in r.get("lower_is_better", [])}
    return list(rows.values())


def columns(rows: list[Row]) -> list[tuple[str, str]]:
    from saebench.metrics.registry import metric_names

    order = metric_names()
    metrics = sorted(
        {m for r in rows for m in r.headline}, key=lambda m: (order.index(m) if m in order else 99, m)
    )
    cols = []
    for m in metrics:
        names = next(r.headline[m] for r in rows if m in r.headline)
        cols += [(m, n) for n in names]
    return cols


def table(rows: list[Row], sort: str | None = None) -> str:
    from tabulate import tabulate

    cols = columns(rows)
    if sort:
        metric, _, name = sort.partition(".")
        if (metric, name) not in cols:
            raise ValueError(f"cannot sort by {sort!r}; available: {', '.join(f'{m}.{n}' for m, n in cols)}")
        descending = sort not in {key for r in rows for key in r.lower_is_better}
        rows = sorted(
            rows,
            key=lambda r: (
                r.get(metric, name) is None,
                -(r.get(metric, name) or 0) if descending else (r.get(metric, name) or 0),
            ),
        )
    headers = ["checkpoint", "arch", "n", "k", "train tokens", *[f"{m}.{n}" for m, n in cols]]
    body = []
    for r in rows:
        c = r.checkpoint
        tokens = (c.get("training") or {}).get("tokens_seen", "")
        cells = [r.label, r.family, c.get("n_latents", ""), c.get("k") or "", tokens]
        for m, n in cols:
            v = r.values.get(m, {}).get(n)
            cells.append(format_estimate(v) if v else "")
        body.append(cells)
    return tabulate(body, headers=headers, tablefmt="github")


# --- claims of the paper ---------------------------------------------------------------------------------
def _xy(rows: list[Row], family: str, y: tuple[str, str]) -> list[tuple[float, float, Row]]:
    pts = []
    for r in rows:
        l0, v = r.get("core", "l0"), r.get(*y)
        if r.family == family and l0 and v is not None:
            pts.append((l0, v, r))
    return sorted(pts, key=lambda p: p[0])


def claim_topk_frontier(rows: list[Row]) -> str:
    """At each ReLU checkpoint's L0, the TopK frontier's nmse (log-log interpolation) against the ReLU's."""
    relu, topk = _xy(rows, "relu", ("core", "nmse")), _xy(rows, "topk", ("core", "nmse"))
    if not relu or len(topk) < 2:
        return "not measured: needs ReLU and at least two TopK checkpoints with core results"
    wins, lines = 0, []
    for n in sorted({int(p[2].checkpoint.get("n_latents", 0)) for p in relu}):
        t = [p for p in topk if p[2].checkpoint.get("n_latents") == n] or topk
        frontier = _lower_envelope(t)
        for l0, v, r in (p for p in relu if p[2].checkpoint.get("n_latents") == n):
            tv = _loglog_interp(frontier, l0)
            target = ((r.checkpoint.get("training") or {}).get("config") or {}).get("l1_target_l0")
            missed = (
                f" (its lambda search aimed at L0 {target:g})" if target and not 0.5 < l0 / target < 2 else ""
            )
            if tv is None:
                # outside the TopK L0 range: beaten only if a TopK checkpoint is sparser and more accurate
                better = [p for p in t if p[0] <= l0 and p[1] < v]
                if better:
                    wins += 1
                    b = min(better, key=lambda p: p[1])
                    lines.append(
                        f"  - {r.label}: L0 {l0:.1f}{missed}, nmse {v:.4f}; dominated by {b[2].label} "
                        f"(L0 {b[0]:.1f}, nmse {b[1]:.4f}) vs TopK"
                    )
                else:
                    lines.append(
                        f"  - {r.label}: L0 {l0:.1f}{missed}, nmse {v:.4f}; outside the TopK L0 range and "
                        "not dominated; not compared"
                    )
                continue
            wins += tv < v
            lines.append(f"  - {r.label}: L0 {l0:.1f}{missed}, nmse ReLU {v:.4f} vs TopK {tv:.4f}")
    compared = sum(("vs TopK" in line or "dominated by" in line) for line in lines)
    head = (
        f"TopK has the lower nmse at matched L0 (or a sparser TopK checkpoint has a lower nmse) for {wins} "
        f"of {compared} comparable ReLU checkpoints"
    )
    return "\n".join([head, *lines])


def _lower_envelope(points):
    pts = sorted((p[0], p[1]) for p in points)
    out = []
    for x, y in pts:
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


def _loglog_interp(frontier, x: float) -> float | None:
    xs = np.log([p[0] for p in frontier])
    ys = np.log([p[1] for p in frontier])
    lx = math.log(x)
    if len(xs) < 2 or lx < xs[0] - 1e-9 or lx > xs[-1] + 1e-9:
        return None
    return float(np.exp(np.interp(lx, xs, ys)))


def claim_dead_latents(rows: list[Row]) -> str:
    with_aux = [r for r in rows if r.family == "topk" and r.get("core", "dead_frac") is not None]
    without = [
        r
        for r in rows
        if r.family.startswith("topk (")
        and ("AuxK" in r.family or "untied" in r.family)
        and r.get("core", "dead_frac") is not None
    ]
    if not with_aux:
        return "not measured: needs TopK checkpoints with core results"
    worst = max(with_aux, key=lambda r: r.get("core", "dead_frac"))
    text = (
        f"TopK with AuxK and tied init: dead fraction at most {worst.get('core', 'dead_frac'):.4f} "
        f"({worst.label}) over {len(with_aux)} checkpoints"
    )
    for r in without:
        text += f"; {r.label} ({r.family}): {r.get('core', 'dead_frac'):.4f}"
        twin = [
            t
            for t in with_aux
            if (t.checkpoint.get("n_latents"), t.checkpoint.get("k"))
            == (r.checkpoint.get("n_latents"), r.checkpoint.get("k"))
        ]
        if twin and r.get("core", "nmse") is not None and twin[0].get("core", "nmse") is not None:
            text += (
                f", with nmse {r.get('core', 'nmse'):.4f} against {twin[0].get('core', 'nmse'):.4f} "
                f"for the recipe at the same n and k ({twin[0].label})"
            )
    relu = [
        r.get("core", "dead_frac")
        for r in rows
        if r.family == "relu" and r.get("core", "dead_frac") is not None
    ]
    if relu:
        text += f"; ReLU + L1 for contrast: {min(relu):.4f} to {max(relu):.4f} over {len(relu)} checkpoints"
    return text


def fit_power_law(n: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of y = a n^b + c (c >= 0), by a grid over b and linear least squares for a, c."""
    best = None
    for b in np.linspace(-2.0, -0.01, 400):
        A = np.stack([n**b, np.ones_like(n)], 1)
        (a, c), *_ = np.linalg.lstsq(A, y, rcond=None)
        if c < 0:  # the irreducible term is not negative
            a, c = float(np.linalg.lstsq(A[:, :1], y, rcond=None)[0][0]), 0.0
        err = float(((a * n**b + c - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, float(a), float(b), float(c))
    return best[1], best[2], best[3]


def claim_power_law(rows: list[Row]) -> str:
    """Fit a n^b + c to nmse over n per k, for each TopK family (the recipe, and variants like a fixed lr)."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        if r.family.split(" (")[0] == "topk" and r.get("core", "nmse") is not None and r.checkpoint.get("k"):
            groups.setdefault((r.family, int(r.checkpoint["k"])), []).append(r)
    lines = []
    for (family, k), rs in sorted(groups.items(), key=lambda item: (item[0][0] != "topk", item[0])):
        rs = sorted(rs, key=lambda r: r.checkpoint["n_latents"])
        if len({r.checkpoint["n_latents"] for r in rs}) < 3:
            continue
        n = np.array([r.checkpoint["n_latents"] for r in rs], dtype=float)
        y = np.array([r.get("core", "nmse") for r in rs])
        a, b, c = fit_power_law(n, y)
        falls = a > 0 and b < 0
        measured = ", ".join(f"n={int(ni)}: {yi:.4f}" for ni, yi in zip(n, y, strict=True))
        verdict = "falls with n" if falls else "does NOT fall with n here"
        name = "" if family == "topk" else f"{family}, "
        lines.append(f"  - {name}k={k}: {measured}; fit nmse = {a:.4g} n^{b:.3f} + {c:.4g}: {verdict}")
    if not lines:
        return "not measured: needs TopK checkpoints at 3 or more sizes n for one k"
    return "fit of a n^b + c to nmse over n (TopK, per k):\n" + "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------------------
def plots(rows: list[Row], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    specs = [
        ("nmse_vs_l0.png", ("core", "nmse"), "nmse (SAE space)"),
        ("delta_ce_vs_l0.png", ("downstream", "delta_ce"), "delta CE (nats/token)"),
        ("probe_loss_vs_l0.png", ("probes", "probe_loss"), "probe loss (nats)"),
    ]
    families = sorted({r.family for r in rows})
    for name, y, ylabel in specs:
        if not any(r.get(*y) is not None and r.get("core", "l0") for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for fam in families:
            pts = _xy(rows, fam, y)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=fam)
        ax.set_xscale("log")
        if y[1] == "nmse":
            ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_fig(fig, out / name)
        plt.close(fig)
        made.append(name)
    dead = [(r.label, r.get("core", "dead_frac")) for r in rows if r.get("core", "dead_frac") is not None]
    if dead:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(dead) + 1.2))
        ax.barh([d[0] for d in dead], [d[1] for d in dead])
        ax.set_xlabel("dead fraction of latents")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        _save_fig(fig, out / "dead_frac.png")
        plt.close(fig)
        made.append("dead_frac.png")
    return made


def _save_fig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def generate(result_dirs: list[Path], out: Path, sort: str | None = None) -> Path:
    rows = collect_rows(result_dirs)
    if not rows:
        raise ValueError(
            f"no result files under {', '.join(map(str, result_dirs))}: run `saebench run` first"
        )
    out.mkdir(parents=True, exist_ok=True)
    images = plots(rows, out)
    parts = [
        "# Leaderboard",
        "",
        f"Generated by `saebench leaderboard` from {sum(len(r.values) for r in rows)} result files "
        f"({len(rows)} checkpoints). Values: estimate [95% bootstrap interval].",
        "`core.nmse` is measured in each SAE's own input space (after its input normalisation, e.g. "
        "per-token layer norm); `core.fvu_raw`, the same ratio in raw residual space, compares across them.",
        "",
        table(rows, sort),
        "",
        "## Paper claims, measured here",
        "",
        f"- **TopK beats ReLU on the nmse-L0 frontier.** {claim_topk_frontier(rows)}",
        f"- **AuxK and tied init leave few dead latents.** {claim_dead_latents(rows)}",
        f"- **nmse falls as a power law in n with an irreducible term.** {claim_power_law(rows)}",
        "",
    ]
    if images:
        parts += ["## Plots", ""] + [f"![{i}]({i})" for i in images] + [""]
    path = out / "README.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
