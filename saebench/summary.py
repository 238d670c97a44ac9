"""The terminal summary of a run and the one way estimates are printed (`estimate [lo, hi]`).

One checkpoint: a row per value.  Several: one table per metric with as many of its headline values as
fit in `SUMMARY_WIDTH` columns (`--wide` for all).
"""

from __future__ import annotations

#: the terminal summary fits this many columns (`--wide` lifts the limit)
SUMMARY_WIDTH = 100


def summary_table(results: list[dict], wide: bool = False, width: int = SUMMARY_WIDTH) -> str:
    """The run's values with their intervals, in at most `width` columns unless `wide`.

    One checkpoint: one row per value (metric, value, estimate [lo, hi], n).  Several: one table per metric,
    a row per checkpoint, with the metric's first headline values, as many as fit; `wide`: one table of
    every headline value of every metric.
    """
    labels = list(dict.fromkeys(r["checkpoint"]["label"] for r in results))
    if len(labels) == 1:
        return _values_table(results)
    columns: dict[str, list[str]] = {}  # metric -> its headline values present, in headline order
    rows: dict[str, dict] = {label: {} for label in labels}
    for r in results:
        for name in r["headline"]:
            v = r["values"].get(name)
            if v is None:
                continue
            if name not in columns.setdefault(r["metric"], []):
                columns[r["metric"]].append(name)
            rows[r["checkpoint"]["label"]][(r["metric"], name)] = format_estimate(v)
    if wide:
        return _checkpoints_table(
            rows, [(m, n) for m, names in columns.items() for n in names], shorten=False
        )
    blocks, shown, total = [], 0, 0
    for metric, names in columns.items():
        fit = 1
        while (
            fit < len(names)
            and _width(_checkpoints_table(rows, [(metric, n) for n in names[: fit + 1]])) <= width
        ):
            fit += 1
        blocks.append(f"{metric}\n{_checkpoints_table(rows, [(metric, n) for n in names[:fit]])}")
        shown, total = shown + fit, total + len(names)
    text = "\n\n".join(blocks)
    if shown < total:
        text += (
            f"\n\n{shown} of {total} headline values shown; `saebench run --wide` shows them all, "
            "the result files every value"
        )
    return text


def _width(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def _short(label: str, limit: int = 32) -> str:
    return (
        label if len(label) <= limit else label[: limit // 2 - 1] + "..." + label[-(limit - limit // 2 - 2) :]
    )


def _checkpoints_table(rows: dict[str, dict], columns: list[tuple[str, str]], shorten: bool = True) -> str:
    from tabulate import tabulate

    metrics = {m for m, _ in columns}
    headers = ["checkpoint", *(name if len(metrics) < 2 else f"{m}.{name}" for m, name in columns)]
    body = [
        [_short(label) if shorten else label, *(cells.get(c, "") for c in columns)]
        for label, cells in rows.items()
    ]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def _values_table(results: list[dict]) -> str:
    """One checkpoint's values, one per row: headline values first, in each metric's order."""
    from tabulate import tabulate

    body = []
    for r in results:
        names = [*r["headline"], *(n for n in r["values"] if n not in r["headline"])]
        for name in names:
            v = r["values"].get(name)
            if v is None:
                continue
            count = f"{v.get('n', '')} {v.get('unit', '')}".strip()
            body.append([r["metric"], name, format_estimate(v), count])
    label = results[0]["checkpoint"]["label"]
    table = tabulate(
        body,
        headers=["metric", "value", "estimate [95% interval]", "n"],
        tablefmt="github",
        disable_numparse=True,
    )
    return f"checkpoint {_short(label, 80)}\n{table}"


def format_estimate(v: dict) -> str:
    def f(x):
        return f"{x:.4g}"

    if v.get("lo") is None:
        return f(v["value"])
    return f"{f(v['value'])} [{f(v['lo'])}, {f(v['hi'])}]"
