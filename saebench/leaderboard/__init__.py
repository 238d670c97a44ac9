"""`saebench leaderboard`: a markdown table and plots generated from result files alone.

One row per checkpoint; one column per headline value of every metric found in the files, and the plots
each metric declares (`Metric.plots`): a new metric adds columns and plots without a change here.
`results.csv` beside them holds every value of every file as data (`saebench.results.load_results`).  A
section checks claims of Gao et al. (2024) on the checkpoints present (`saebench.leaderboard.claims`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from saebench.data.cache import atomic_write_bytes
from saebench.results import iter_results, load_results
from saebench.summary import format_estimate


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


def points(
    rows: list[Row], family: str, y: tuple[str, str], x: tuple[str, str]
) -> list[tuple[float, float, Row]]:
    """(x, y, row) of the rows of one family that have both values (and a non-zero x), sorted by x."""
    pts = []
    for r in rows:
        xv, yv = r.get(*x), r.get(*y)
        if r.family == family and xv and yv is not None:
            pts.append((xv, yv, r))
    return sorted(pts, key=lambda p: p[0])


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


# --- plots --------------------------------------------------------------------------------------------------
def plots(rows: list[Row], out: Path) -> list[str]:
    """The plots the registered metrics declare, for the values present: value-vs-L0 plots, then bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saebench.metrics.registry import metrics

    made = []
    declared = [(m.name, plot) for m in metrics() for plot in m.plots]
    families = sorted({r.family for r in rows})
    for metric, plot in (d for d in declared if d[1].kind == "vs_l0"):
        y = (metric, plot.value)
        if not any(r.get(*y) is not None and r.get(*plot.against) for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for fam in families:
            pts = points(rows, fam, y, plot.against)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=fam)
        ax.set_xscale("log")
        if plot.log:
            ax.set_yscale("log")
        ax.set_xlabel(plot.against_label)
        ax.set_ylabel(plot.label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_fig(fig, out / plot.file)
        plt.close(fig)
        made.append(plot.file)
    for metric, plot in (d for d in declared if d[1].kind == "bar"):
        bars = [(r.label, r.get(metric, plot.value)) for r in rows if r.get(metric, plot.value) is not None]
        if not bars:
            continue
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(bars) + 1.2))
        ax.barh([b[0] for b in bars], [b[1] for b in bars])
        ax.set_xlabel(plot.label)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        _save_fig(fig, out / plot.file)
        plt.close(fig)
        made.append(plot.file)
    return made


def _save_fig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def generate(result_dirs: list[Path], out: Path, sort: str | None = None) -> Path:
    from saebench.leaderboard.claims import CLAIMS

    rows = collect_rows(result_dirs)
    if not rows:
        raise ValueError(
            f"no result files under {', '.join(map(str, result_dirs))}: run `saebench run` first"
        )
    rows_table = table(rows, sort)  # an unknown --sort stops here, before anything is written
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
        rows_table,
        "",
        "## Paper claims, measured here",
        "",
        *(f"- **{title}** {claim(rows)}" for title, claim in CLAIMS),
        "",
    ]
    if images:
        parts += ["## Plots", ""] + [f"![{i}]({i})" for i in images] + [""]
    atomic_write_bytes(out / "results.csv", load_results(result_dirs).to_csv(index=False).encode())
    path = out / "README.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
