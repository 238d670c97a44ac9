"""`saebench leaderboard`: tables, plots, scaling-law fits and the paper's claims from result files alone.

One row per checkpoint.  `tables`: a compact table of each metric's compact values (`Metric.compact`, best
in bold, ties marked) and the full table of every headline value with its interval; `plots`: the plots
each metric declares (`Metric.plots`) drawn as lines per (family, n), every compact value against n, and
the fitted scaling laws (`fits`) over their points; `claims`: claims of Gao et al. (2024) with a verdict
each.  A new metric adds columns, panels and plots without a change here.  `results.csv` beside them holds
every value of every file as data (`saebench.results.load_results`).

Values a metric declares as measured in the SAE's own input space (`Metric.sae_space`: core's nmse) compare
only between rows in one space (`Row.space`, from the checkpoint's input normalisation): rows in another
space than the majority are listed last, marked, and left out of the plots, fits and claims.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from saebench.data.cache import atomic_write_bytes
from saebench.model.aliases import DEFAULT_MODEL
from saebench.results import iter_results, load_results

SPACES = {"none": "raw", "constant": "raw", "layer_norm": "layer_norm", "token_norm": "token_norm"}


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
    #: {metric: the result's details}
    details: dict[str, dict] = field(default_factory=dict)
    #: {metric: the result's data_key as JSON}: which evaluation windows it was scored on
    data_keys: dict[str, str] = field(default_factory=dict)
    #: the subject model it was evaluated on (its alias or id, without the package version)
    subject: str = ""

    def get(self, metric: str, name: str) -> float | None:
        v = self.values.get(metric, {}).get(name)
        return None if v is None else v["value"]

    @property
    def family(self) -> str:
        """Architecture family for plots: topk, relu, jumprelu, ... (with a training variant if any)."""
        training = self.checkpoint.get("training") or {}
        variant = training.get("variant") or _training_variant(training.get("config") or {})
        return self._named(variant)

    def _named(self, variant: str | None) -> str:
        """`arch (variant) on subject`: the subject model named only when it is not the default one."""
        arch = str(self.checkpoint.get("architecture", "?")).lower()
        arch = {"standard": "relu"}.get(arch, arch)
        name = f"{arch} ({variant})" if variant else arch
        return f"{name} on {self.subject}" if _named_model(self.subject) else name

    @property
    def mitigations_off(self) -> bool:
        """Whether it was trained with AuxK or the tied encoder init (the dead-latent mitigations) off."""
        config = (self.checkpoint.get("training") or {}).get("config") or {}
        return bool(set(_departures(config)) & set(MITIGATIONS))

    @property
    def mitigated_family(self) -> str:
        """The family of its twin with both dead-latent mitigations on: its own without those departures."""
        training = self.checkpoint.get("training") or {}
        if training.get("variant"):
            return self.family
        rest = [d for d in _departures(training.get("config") or {}) if d not in MITIGATIONS]
        return self._named(", ".join(rest) or None)

    @property
    def space(self) -> str:
        """The input space its SAE-space values (nmse) are measured in: raw, layer_norm, token_norm.

        A constant rescaling leaves a ratio like nmse unchanged, so it counts as raw.
        """
        kind = self.checkpoint.get("normalization")
        return SPACES.get(kind, str(kind)) if kind else "unknown"


#: the departures that switch off the paper's dead-latent mitigations
MITIGATIONS = ("no AuxK", "untied init")


def _training_variant(config: dict) -> str | None:
    """How a saebench-trained checkpoint departs from the paper's recipe, from its training config."""
    return ", ".join(_departures(config)) or None


def _departures(config: dict) -> list[str]:
    departures = []
    if config.get("activation") == "topk" and config.get("auxk_alpha") == 0:
        departures.append("no AuxK")
    if config.get("tied_init") is False:
        departures.append("untied init")
    if config.get("multi_topk"):
        departures.append("Multi-TopK")
    if config.get("lr") is not None:
        departures.append(f"lr {config['lr']:.3g}")
    elif config.get("lr_at_n") is not None:
        departures.append(f"lr of n={config['lr_at_n']}")
    return departures


def _named_model(subject: str) -> bool:
    """Whether a row names its subject model (in its label and family): any model but the default."""
    return bool(subject) and subject != DEFAULT_MODEL


def _subject(result: dict) -> str:
    """The subject model a result was scored on, without its package version (`smollm2-135m@pkg==1`)."""
    model = (result.get("data_key") or {}).get("model") or (result.get("eval") or {}).get("model") or ""
    return str(model).split("@")[0]


def collect_rows(result_dirs: list[Path]) -> list[Row]:
    """One row per (checkpoint label, subject model); a row on another subject model than the default is
    labelled `subject/label`, so the same sweep run on two models gives two rows."""
    rows: dict[tuple[str, str], Row] = {}
    for folder in result_dirs:
        for _, r in iter_results(folder):
            label, subject = r["checkpoint"]["label"], _subject(r)
            shown = f"{subject}/{label}" if _named_model(subject) else label
            row = rows.setdefault((label, subject), Row(shown, r["checkpoint"], subject=subject))
            row.values[r["metric"]] = r["values"]
            row.headline[r["metric"]] = r.get("headline", list(r["values"]))
            row.lower_is_better |= {f"{r['metric']}.{n}" for n in r.get("lower_is_better", [])}
            row.details[r["metric"]] = r.get("details") or {}
            row.data_keys[r["metric"]] = json.dumps(r.get("data_key"), sort_keys=True)
    return list(rows.values())


def dead_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(variant, twin): each TopK run with AuxK or the tied init off, beside the run of the same n, k and
    other settings (e.g. the same fixed lr) with both mitigations on."""
    dead = ("core", "dead_frac")
    scored = [r for r in rows if r.get(*dead) is not None and r.family.startswith("topk")]
    pairs = []
    for r in (r for r in scored if r.mitigations_off):
        key = (r.checkpoint.get("n_latents"), r.checkpoint.get("k"), r.mitigated_family)
        twin = [
            t
            for t in scored
            if not t.mitigations_off
            and (t.checkpoint.get("n_latents"), t.checkpoint.get("k"), t.family) == key
        ]
        if twin:
            pairs.append((r, twin[0]))
    return pairs


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


# --- which values compare across rows -----------------------------------------------------------------------
def sae_space_values() -> set[tuple[str, str]]:
    """(metric, value) pairs measured in each SAE's own input space, as the metrics declare them."""
    from saebench.metrics.registry import metrics

    return {(m.name, v) for m in metrics() for v in m.sae_space}


def majority_space(rows: list[Row]) -> str | None:
    """The input space most rows with SAE-space values are in (ties: the reference trainer's, layer_norm)."""
    own = sae_space_values()
    spaces = [r.space for r in rows if any(r.get(m, v) is not None for m, v in own)]
    if not spaces:
        return None
    return max(sorted(set(spaces)), key=lambda s: (spaces.count(s), s == "layer_norm"))


def off_space(rows: list[Row]) -> list[Row]:
    """Rows whose SAE-space values are in another space than the majority's."""
    own, space = sae_space_values(), majority_space(rows)
    return [r for r in rows if r.space != space and any(r.get(m, v) is not None for m, v in own)]


def for_comparison(rows: list[Row]) -> list[Row]:
    """The rows with the SAE-space values of off-space rows removed: what plots, fits and claims use."""
    own, away = sae_space_values(), {r.label for r in off_space(rows)}
    out = []
    for r in rows:
        if r.label in away:
            values = {m: {n: v for n, v in vals.items() if (m, n) not in own} for m, vals in r.values.items()}
            r = replace(r, values=values)
        out.append(r)
    return out


def space_warnings(rows: list[Row]) -> list[str]:
    own = ", ".join(sorted(f"{m}.{v}" for m, v in sae_space_values()))
    space = majority_space(rows)
    return [
        f"warning: {r.label}'s {own} is in {r.space} space, the other rows' in {space} space: not "
        "comparable, so it is listed last, marked †, and left out of the plots, fits and claims"
        for r in off_space(rows)
    ]


# --- the README ---------------------------------------------------------------------------------------------
LEGEND = (
    "**Bold**: the best value of a column (lowest or highest, as the metric declares); `≈`: tied with the "
    "best (its 95% interval overlaps the best's); `†`: in another input space than the rest (not ranked). "
    "Columns without a better direction (L0) are never marked."
)


def generate(result_dirs: list[Path], out: Path, sort: str | None = None) -> Path:
    from saebench.leaderboard.claims import claims_section
    from saebench.leaderboard.fits import fits_section
    from saebench.leaderboard.plots import plots
    from saebench.leaderboard.tables import compact_table, table

    rows = collect_rows(result_dirs)
    if not rows:
        raise ValueError(
            f"no result files under {', '.join(map(str, result_dirs))}: run `saebench run` first"
        )
    rows_table = table(rows, sort)  # an unknown --sort stops here, before anything is written
    warnings = space_warnings(rows)
    for w in warnings:
        print(f"saebench: {w}", file=sys.stderr)
    compared = for_comparison(rows)
    out.mkdir(parents=True, exist_ok=True)
    images = plots(compared, out)
    space = majority_space(rows)
    parts = [
        "# Leaderboard",
        "",
        f"Generated by `saebench leaderboard` from {sum(len(r.values) for r in rows)} result files "
        f"({len(rows)} checkpoints). Values: estimate [95% bootstrap interval].",
        "`core.nmse` is measured in each SAE's own input space (after its input normalisation; the `space` "
        f"column): rows compare in {space or 'one'} space, where the reference trainer's SAEs are. "
        "`core.fvu_raw`, the same ratio in raw residual space, compares across spaces.",
        "",
        *(f"> {w}" for w in warnings),
        *([""] if warnings else []),
        "## Headline values",
        "",
        LEGEND,
        "",
        compact_table(rows, sort),
        "",
        "<details><summary>Every headline value with its 95% interval (also in results.csv)</summary>",
        "",
        rows_table,
        "",
        "</details>",
        "",
        "## Paper claims, measured here",
        "",
        claims_section(compared),
        "",
        "## Scaling laws",
        "",
        fits_section(compared),
        "",
    ]
    if images:
        parts += ["## Plots", "", "Each also as SVG beside it.", ""] + [f"![{i}]({i})" for i in images] + [""]
    atomic_write_bytes(out / "results.csv", load_results(result_dirs).to_csv(index=False).encode())
    path = out / "README.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def table(rows: list[Row], sort: str | None = None) -> str:
    """The full table (every headline value with its interval); see `saebench.leaderboard.tables`."""
    from saebench.leaderboard.tables import table as full_table

    return full_table(rows, sort)
