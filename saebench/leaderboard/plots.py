"""The leaderboard's figures (matplotlib; each written as PNG and SVG), from declarations and fits only.

    vs_l0 plots a metric declares (`Plot(kind="vs_l0")`): the value against L0, one line per (family, n)
        across k (or L1 targets), colour by n, marker by family, 95% intervals as error bars;
    bar plots a metric declares: one bar per checkpoint;
    metrics_vs_n.png: every ranked compact value (`Metric.compact`) against n at one k, one panel each;
    at_fixed_l0 plots (`Plot(kind="at_fixed_l0")`): a value against another, one line per (family, k) across
        n (downstream declares the paper's delta_ce against nmse);
    nmse_vs_n_fits.png: nmse against n per k with the fitted L(N) (solid) and L(N, K) (dashed) drawn over.

Log axes carry plain tick labels (16, 32, 64).  Every data series is a Line2D with gid "series" (fitted
curves: gid "fit"), so tests count them on the figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from saebench.leaderboard import Row, dead_pairs
from saebench.metrics.registry import Plot

MARKERS = "osD^v<>PX*"
FITS_FILE = "nmse_vs_n_fits.png"
VS_N_FILE = "metrics_vs_n.png"
DEAD_HISTORY_FILE = "dead_over_training.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_axis(ax, which: str, values) -> None:
    """Log scale with plain tick labels at round values inside the data's range (16, 32, 64; 0.2, 0.3)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    vals = [float(v) for v in values if v and v > 0 and math.isfinite(v)]
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    if not vals:
        return
    ticks = nice_log_ticks(min(vals), max(vals))
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def nice_log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Round values (powers of two when the range spans them, else 1-2-5 style) covering [lo, hi]."""
    if lo <= 0 or hi <= 0:
        return []
    if hi / lo >= 1.9 and lo >= 1:
        ticks = [2.0**e for e in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    else:
        ticks = []
        for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            fine = hi / lo < 3  # under a factor of 3, round values a half-step apart
            for m in (1, 1.2, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8) if fine else (1, 1.5, 2, 3, 4, 5, 6, 8):
                t = round(m * 10.0**e, 12)
                if lo / 1.1 <= t <= hi * 1.1:
                    ticks.append(t)
    while len(ticks) > most:
        ticks = ticks[::2]
    return ticks or [lo, hi]


def _err(rows: list[Row], metric: str, name: str) -> np.ndarray:
    """(2, points) distances from each value to its interval's ends (0 where there is no interval)."""
    out = []
    for r in rows:
        v = r.values[metric][name]
        lo, hi = v.get("lo"), v.get("hi")
        out.append((v["value"] - lo if lo is not None else 0.0, hi - v["value"] if hi is not None else 0.0))
    return np.clip(np.array(out, dtype=float).T.reshape(2, -1), 0, None)


def _colours(values):
    plt = _plt()
    vals = sorted(set(values))
    cmap = plt.get_cmap("viridis")
    if len(vals) == 1:
        return {vals[0]: cmap(0.35)}
    lv = np.log2(vals)
    return {v: cmap(0.9 * (x - lv[0]) / (lv[-1] - lv[0])) for v, x in zip(vals, lv, strict=True)}


def _legend(ax, families: dict[str, str], colours: dict, colour_title: str) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.3", marker=m, ls="", label=f) for f, m in families.items()]
    handles += [Line2D([], [], color=c, lw=2, label=f"{colour_title}={v}") for v, c in colours.items()]
    ax.legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 6 else 1)


def _has(r: Row, col: tuple[str, str]) -> bool:
    return r.get(*col) is not None


def vs_l0_figure(rows: list[Row], metric: str, plot: Plot):
    """The declared value against L0: one line per (family, n) across k or L1 target."""
    plt = _plt()
    y = (metric, plot.value)
    use = [r for r in rows if _has(r, y) and r.get(*plot.against)]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(sorted({r.family for r in use}))}
    colours = _colours([int(r.checkpoint.get("n_latents") or 0) for r in use])
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in use:
        groups.setdefault((r.family, int(r.checkpoint.get("n_latents") or 0)), []).append(r)
    for (family, n), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.get(*plot.against))
        _series(ax, rs, plot.against, y, families[family], colours[n], f"{family}, n={n}")
    plain_log_axis(ax, "x", [r.get(*plot.against) for r in use])
    if plot.log:
        plain_log_axis(ax, "y", [r.get(*y) for r in use])
    ax.set_xlabel(plot.against_label)
    ax.set_ylabel(plot.label)
    _legend(ax, families, colours, "n")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _series(ax, rs: list[Row], x: tuple[str, str], y: tuple[str, str], marker: str, colour, label: str):
    """One line series (gid "series") through the rows' (x, y) values, with their intervals as error bars."""
    xs, ys = [r.get(*x) for r in rs], [r.get(*y) for r in rs]
    ax.plot(xs, ys, marker=marker, color=colour, lw=1.3, ms=5, gid="series", label=label)
    ax.errorbar(
        xs, ys, yerr=_err(rs, *y), xerr=_err(rs, *x), fmt="none", ecolor=colour, elinewidth=0.8, capsize=0
    )


def _fixed_l0(r: Row) -> int | None:
    """The L0 a checkpoint was made for: its k, else the L1 search's target."""
    if r.checkpoint.get("k"):
        return int(r.checkpoint["k"])
    target = ((r.checkpoint.get("training") or {}).get("config") or {}).get("l1_target_l0")
    return int(target) if target else None


def at_fixed_l0_figure(rows: list[Row], metric: str, plot: Plot):
    """The value against another (`plot.against`), one line per (family, k) across n."""
    plt = _plt()
    y = (metric, plot.value)
    use = [
        r
        for r in rows
        if _has(r, y) and r.get(*plot.against) and _fixed_l0(r) and r.checkpoint.get("n_latents")
    ]
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in use:
        groups.setdefault((r.family, _fixed_l0(r)), []).append(r)
    groups = {g: rs for g, rs in groups.items() if len({r.checkpoint["n_latents"] for r in rs}) >= 2}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(sorted({f for f, _ in groups}))}
    colours = _colours([k for _, k in groups])
    for (family, k), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.checkpoint["n_latents"])
        _series(ax, rs, plot.against, y, families[family], colours[k], f"{family}, L0={k}")
    shown = [r for rs in groups.values() for r in rs]
    plain_log_axis(ax, "x", [r.get(*plot.against) for r in shown])
    if plot.log:
        plain_log_axis(ax, "y", [r.get(*y) for r in shown])
    ax.set_xlabel(f"{plot.against_label} (each line: one family and L0 as n grows)")
    ax.set_ylabel(plot.label)
    _legend(ax, families, colours, "L0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _panel_values(rows: list[Row]) -> list[tuple[str, str, str, bool]]:
    """(metric, value, label, log) of every ranked compact value present, labels from the metric's plots."""
    from saebench.leaderboard.tables import compact_columns, unranked

    labels = {}
    from saebench.metrics.registry import metrics

    for m in metrics():
        for p in m.plots:
            labels.setdefault((m.name, p.value), (p.label, p.log))
    return [
        (m, v, *labels.get((m, v), (f"{m}.{v}", False)))
        for m, v in compact_columns(rows)
        if (m, v) not in unranked()
    ]


def fixed_k(rows: list[Row]) -> int | None:
    """The k with the most (family, n) checkpoints (ties: the middle one)."""
    counts: dict[int, int] = {}
    for r in rows:
        if r.checkpoint.get("k") and r.checkpoint.get("n_latents"):
            counts[int(r.checkpoint["k"])] = counts.get(int(r.checkpoint["k"]), 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    ks = sorted(k for k, c in counts.items() if c == top)
    return ks[len(ks) // 2]


def vs_n_figure(rows: list[Row], k: int):
    """Every ranked compact value against n at one k, a panel each, one line per family."""
    plt = _plt()
    at_k = [r for r in rows if r.checkpoint.get("k") == k and r.checkpoint.get("n_latents")]
    panels = [p for p in _panel_values(at_k) if sum(_has(r, p[:2]) for r in at_k) >= 2]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrow = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4.2 * cols, 3.4 * nrow), squeeze=False)
    families = sorted({r.family for r in at_k})
    markers = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(families)}
    colour = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    for ax, (metric, value, label, log) in zip(axes.flat, panels, strict=False):
        for family in families:
            rs = sorted(
                (r for r in at_k if r.family == family and _has(r, (metric, value))),
                key=lambda r: r.checkpoint["n_latents"],
            )
            if len(rs) < 2:
                continue
            xs, ys = [r.checkpoint["n_latents"] for r in rs], [r.get(metric, value) for r in rs]
            ax.plot(
                xs, ys, marker=markers[family], color=colour[family], lw=1.3, ms=5, gid="series", label=family
            )
            ax.errorbar(
                xs,
                ys,
                yerr=_err(rs, metric, value),
                fmt="none",
                ecolor=colour[family],
                elinewidth=0.8,
                capsize=0,
            )
        plain_log_axis(ax, "x", [r.checkpoint["n_latents"] for r in at_k if _has(r, (metric, value))])
        if log:
            plain_log_axis(ax, "y", [r.get(metric, value) for r in at_k if _has(r, (metric, value))])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("n (latents)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"every headline value against n at k={k}", fontsize=10)
    fig.tight_layout()
    return fig


def fits_figure(rows: list[Row]):
    """nmse against n per k, per family, with the fitted L(N) (solid) and L(N, K) (dashed) over the points."""
    from saebench.leaderboard.fits import scaling_fits

    plt = _plt()
    fams = scaling_fits(rows)
    if not fams:
        return None
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), squeeze=False, sharey=True)
    for ax, ff in zip(axes.flat, fams, strict=True):
        ks = sorted({f.k for f in ff.ln})
        colours = _colours(ks)
        for f in ff.ln:
            pts = f.points
            if not pts:
                continue
            n = np.array([p.n for p in pts], dtype=float)
            y = np.array([p.value for p in pts])
            err = np.clip(
                np.array(
                    [
                        [p.value - (p.lo if p.lo is not None else p.value) for p in pts],
                        [(p.hi if p.hi is not None else p.value) - p.value for p in pts],
                    ]
                ),
                0,
                None,
            )
            note = "" if not f.flag else " (L(N) flagged)"
            bars = ax.errorbar(
                n, y, yerr=err, fmt="o", color=colours[f.k], ms=5, capsize=0, label=f"k={f.k}{note}"
            )
            bars.lines[0].set_gid("series")
            grid = np.geomspace(n.min(), n.max(), 60)
            if not f.flag:
                ax.plot(grid, f.curve(grid), color=colours[f.k], lw=1.4, gid="fit")
            if not ff.lnk.flag and f.k in {p.k for p in ff.lnk.points}:
                ax.plot(grid, ff.lnk.curve(grid, f.k), color=colours[f.k], lw=1.1, ls="--", gid="fit")
        all_n = [p.n for f in ff.ln for p in f.points]
        plain_log_axis(ax, "x", all_n)
        plain_log_axis(ax, "y", [p.value for f in ff.ln for p in f.points])
        joint = "L(N, K) dashed" if not ff.lnk.flag else "L(N, K) flagged"
        ax.set_title(f"{ff.family}: L(N) solid, {joint}", fontsize=9)
        ax.set_xlabel("n (latents)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("nmse")
    fig.tight_layout()
    return fig


def dead_history_figure(rows: list[Row]):
    """The dead fraction over training of each run with a dead-latent mitigation off and of its twin with
    both on (`dead_pairs`), from the trainer's `dead_history`; None when no pair recorded one."""
    plt = _plt()
    pairs = [
        (r, t)
        for r, t in dead_pairs(rows)
        if all((x.checkpoint.get("training") or {}).get("dead_history") for x in (r, t))
    ]
    if not pairs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    drawn = set()
    for pair in pairs:
        for r in pair:
            if r.label in drawn:
                continue
            drawn.add(r.label)
            tokens, dead = zip(*r.checkpoint["training"]["dead_history"], strict=True)
            ax.plot(
                tokens,
                dead,
                marker="o",
                markersize=3,
                linestyle="--" if r.mitigations_off else "-",
                label=f"{r.label} ({r.family})",
            )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("dead fraction (no fire in dead_tokens)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plots(rows: list[Row], out: Path) -> list[str]:
    """Every figure the rows support, written under `out` as PNG and SVG; the PNG names, in README order."""
    from saebench.metrics.registry import metrics

    plt = _plt()
    declared = [(m.name, plot) for m in metrics() for plot in m.plots]
    made = []

    def keep(fig, name):
        if fig is not None:
            save_figure(fig, out / name)
            made.append(name)
            plt.close(fig)

    for metric, plot in (d for d in declared if d[1].kind == "vs_l0"):
        if any(r.get(metric, plot.value) is not None and r.get(*plot.against) for r in rows):
            keep(vs_l0_figure(rows, metric, plot), plot.file)
    k = fixed_k(rows)
    if k is not None:
        keep(vs_n_figure(rows, k), VS_N_FILE)
    for metric, plot in (d for d in declared if d[1].kind == "at_fixed_l0"):
        if sum(r.get(metric, plot.value) is not None and r.get(*plot.against) is not None for r in rows) >= 2:
            keep(at_fixed_l0_figure(rows, metric, plot), plot.file)
    keep(fits_figure(rows), FITS_FILE)
    keep(dead_history_figure(rows), DEAD_HISTORY_FILE)
    for metric, plot in (d for d in declared if d[1].kind == "bar"):
        bars = [(r.label, r.get(metric, plot.value)) for r in rows if r.get(metric, plot.value) is not None]
        if not bars:
            continue
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(bars) + 1.2))
        ax.barh([b[0] for b in bars], [b[1] for b in bars])
        ax.set_xlabel(plot.label)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        keep(fig, plot.file)
    return made


def save_figure(fig, path: Path) -> None:
    """`path` (a .png) and the same name as .svg, each written to a temporary file and renamed."""
    for target, kw in ((path, {"dpi": 110}), (path.with_suffix(".svg"), {})):
        tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
        fig.savefig(tmp, **kw)
        os.replace(tmp, target)
