"""The leaderboard's tables: compact (one column per question, best in bold, ties marked) and full.

Both list the rows in the majority input space first, sorted by `sort` (default: the first compact
column), then the rows in another space (`saebench.leaderboard.off_space`), whose SAE-space values are
marked † and never ranked.  In the compact table the best value of a ranked column is bold and every value
whose 95% interval overlaps the best's is marked `≈` (tied).
"""

from __future__ import annotations

from saebench.leaderboard import Row, majority_space, sae_space_values
from saebench.summary import format_estimate

TIE = "≈"
OFF_SPACE = "†"


def columns(rows: list[Row]) -> list[tuple[str, str]]:
    """(metric, value) of every headline value present, metrics in registry order."""
    cols = []
    for m in _metrics(rows):
        names = next(r.headline[m] for r in rows if m in r.headline)
        cols += [(m, n) for n in names]
    return cols


def compact_columns(rows: list[Row]) -> list[tuple[str, str]]:
    """(metric, value) of each metric's compact values (`Metric.compact`, else its first headline value)."""
    from saebench.metrics.registry import get_metric

    cols = []
    for m in _metrics(rows):
        try:
            names = get_metric(m).compact_values
        except ValueError:  # a metric this install does not register: its first headline value
            names = tuple(next(r.headline[m] for r in rows if m in r.headline)[:1])
        cols += [(m, n) for n in names if any(r.get(m, n) is not None for r in rows)]
    return cols


def _metrics(rows: list[Row]) -> list[str]:
    from saebench.metrics.registry import metric_names

    order = metric_names()
    return sorted(
        {m for r in rows for m in r.headline}, key=lambda m: (order.index(m) if m in order else 99, m)
    )


def unranked() -> set[tuple[str, str]]:
    from saebench.metrics.registry import metrics

    return {(m.name, v) for m in metrics() for v in m.unranked}


def lower_is_better(rows: list[Row], metric: str, name: str) -> bool:
    return any(f"{metric}.{name}" in r.lower_is_better for r in rows)


def _is_off(row: Row, col: tuple[str, str], space: str | None) -> bool:
    return col in sae_space_values() and row.space != space


def sort_rows(rows: list[Row], sort: str | None, cols: list[tuple[str, str]]) -> list[Row]:
    """Rows in the majority space sorted by `sort` ("metric.value"; default the first), then the rest."""
    if sort:
        metric, _, name = sort.partition(".")
        if (metric, name) not in cols:
            raise ValueError(f"cannot sort by {sort!r}; available: {', '.join(f'{m}.{n}' for m, n in cols)}")
    elif cols:
        metric, name = cols[0]
    else:
        return rows
    descending = not lower_is_better(rows, metric, name)
    space = majority_space(rows)

    def key(r: Row):
        v = r.get(metric, name)
        return (
            _is_off(r, (metric, name), space) and v is not None,
            v is None,
            -(v or 0) if descending else (v or 0),
        )

    return sorted(rows, key=key)


def best_and_ties(rows: list[Row], col: tuple[str, str]) -> tuple[str | None, set[str]]:
    """The best row's label in a column and the labels tied with it (intervals overlapping the best's)."""
    if col in unranked():
        return None, set()
    space = majority_space(rows)
    cands = [r for r in rows if r.values.get(col[0], {}).get(col[1]) and not _is_off(r, col, space)]
    if not cands:
        return None, set()
    lower = lower_is_better(rows, *col)
    best = (min if lower else max)(cands, key=lambda r: r.get(*col))
    b_lo, b_hi = _bounds(best.values[col[0]][col[1]])
    tied = set()
    for r in cands:
        lo, hi = _bounds(r.values[col[0]][col[1]])
        if r is not best and lo <= b_hi and hi >= b_lo:
            tied.add(r.label)
    return best.label, tied


def _bounds(est: dict) -> tuple[float, float]:
    lo, hi = est.get("lo"), est.get("hi")
    v = est["value"]
    return (v if lo is None else lo, v if hi is None else hi)


def _row_facts(r: Row) -> list:
    c = r.checkpoint
    return [r.label, r.family, c.get("n_latents", ""), c.get("k") or "", r.space]


def compact_table(rows: list[Row], sort: str | None = None) -> str:
    """One column per question, plain values: best bold, ties `≈`, off-space values `†`."""
    from tabulate import tabulate

    cols = compact_columns(rows)
    space = majority_space(rows)
    marks = {col: best_and_ties(rows, col) for col in cols}
    names = [n for _, n in cols]
    headers = ["checkpoint", "family", "n", "k", "space"] + [
        n if names.count(n) == 1 else f"{m}.{n}" for m, n in cols
    ]
    body = []
    for r in sort_rows(rows, sort, cols):
        cells = _row_facts(r)
        for col in cols:
            v = r.get(*col)
            if v is None:
                cells.append("")
                continue
            text = f"{v:.4g}"
            best, tied = marks[col]
            if _is_off(r, col, space):
                text += f" {OFF_SPACE}"
            elif r.label == best:
                text = f"**{text}**"
            elif r.label in tied:
                text += f" {TIE}"
            cells.append(text)
        body.append(cells)
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def table(rows: list[Row], sort: str | None = None) -> str:
    """Every headline value with its 95% interval, one column each."""
    from tabulate import tabulate

    cols = columns(rows)
    rows = sort_rows(rows, sort, cols)
    space = majority_space(rows)
    headers = ["checkpoint", "arch", "n", "k", "space", "train tokens", *[f"{m}.{n}" for m, n in cols]]
    body = []
    for r in rows:
        tokens = (r.checkpoint.get("training") or {}).get("tokens_seen", "")
        cells = [*_row_facts(r), tokens]
        for col in cols:
            v = r.values.get(col[0], {}).get(col[1])
            mark = f" {OFF_SPACE}" if v and _is_off(r, col, space) else ""
            cells.append(format_estimate(v) + mark if v else "")
        body.append(cells)
    return tabulate(body, headers=headers, tablefmt="github")
