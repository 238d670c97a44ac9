"""The claims of Gao et al. (2024) that the leaderboard checks on the checkpoints present.

Each `claim_*` function of the leaderboard's rows returns one markdown paragraph: what was measured, or
what is missing to measure it.  Each `Claim` in `CLAIMS` pairs it with the paper's finding and a `measure`
that returns `Verdict`s: our number with its interval and a verdict computed by one rule (`verdict`):

    each comparison the claim rests on (a checkpoint against its control, a size against another, a fitted
    coefficient against 0) is *for* the claim when the 95% intervals are apart in the claim's direction,
    *against* it when they are apart the other way, and unseparated otherwise;
    any comparison against          -> "does not hold here"
    else more than half of them for -> "holds"
    else                            -> "not separated at this budget"
    no comparison possible          -> "not measured"
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from saebench.leaderboard import Row, dead_pairs, points
from saebench.leaderboard.fits import FamilyFits, fit_power_law, scaling_fits
from saebench.model.aliases import DEFAULT_MODEL

HOLDS, FAILS, UNSEPARATED, UNMEASURED = (
    "holds",
    "does not hold here",
    "not separated at this budget",
    "not measured",
)


@dataclass
class Verdict:
    """Our number with its interval, and the verdict of the rule in the module docstring."""

    number: str
    verdict: str
    #: which rows the verdict is about (a family), when the claim is measured per family
    scope: str = ""


def verdict(favour: int, against: int, total: int) -> str:
    if total == 0:
        return UNMEASURED
    if against:
        return FAILS
    return HOLDS if 2 * favour > total else UNSEPARATED


def _side(claimed_below: tuple, other: tuple) -> int:
    """+1 when `claimed_below`'s interval lies below `other`'s, -1 when above, 0 when they overlap."""
    lo, hi = _lohi(claimed_below)
    olo, ohi = _lohi(other)
    return 1 if hi < olo else -1 if lo > ohi else 0


def _lohi(est: tuple) -> tuple[float, float]:
    value, lo, hi = est
    return (value if lo is None else lo, value if hi is None else hi)


def _unmeasured(text: str) -> Verdict:
    return Verdict(text.removeprefix("not measured: "), UNMEASURED)


L0 = ("core", "l0")


def _interval(row: Row, metric: str, name: str) -> tuple[float, float | None, float | None] | None:
    v = row.values.get(metric, {}).get(name)
    return None if v is None else (v["value"], v.get("lo"), v.get("hi"))


def _xy(rows: list[Row], family: str, y: tuple[str, str]) -> list[tuple[float, float, Row]]:
    return points(rows, family, y, L0)


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
    if not with_aux:
        return "not measured: needs TopK checkpoints with core results"
    worst = max(with_aux, key=lambda r: r.get("core", "dead_frac"))
    text = (
        f"TopK with AuxK and tied init: dead fraction at most {worst.get('core', 'dead_frac'):.4f} "
        f"({worst.label}) over {len(with_aux)} checkpoints"
    )
    for r, twin in dead_pairs(rows):
        text += (
            f"; {r.label} ({r.family}): {r.get('core', 'dead_frac'):.4f} against "
            f"{twin.get('core', 'dead_frac'):.4f} for {twin.label} ({twin.family})"
        )
        if r.get("core", "nmse") is not None and twin.get("core", "nmse") is not None:
            text += f", with nmse {r.get('core', 'nmse'):.4f} against {twin.get('core', 'nmse'):.4f}"
    relu = [
        r.get("core", "dead_frac")
        for r in rows
        if r.family == "relu" and r.get("core", "dead_frac") is not None
    ]
    if relu:
        text += f"; ReLU + L1 for contrast: {min(relu):.4f} to {max(relu):.4f} over {len(relu)} checkpoints"
    return text


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


def _fmt(est: tuple[float, float | None, float | None]) -> str:
    value, lo, hi = est
    return f"{value:.4f}" if lo is None else f"{value:.4f} [{lo:.4f}, {hi:.4f}]"


def claim_ablation_sparsity(rows: list[Row]) -> str:
    """Per checkpoint, the latents' ablation sparsity against the residual-channel and random controls."""
    lines, sparser, measured = [], 0, 0
    for r in sorted(rows, key=lambda r: r.label):
        latent = _interval(r, "ablation", "ablation_sparsity")
        residual = _interval(r, "ablation", "ablation_sparsity_residual")
        random = _interval(r, "ablation", "ablation_sparsity_random")
        if latent is None or residual is None:
            continue
        measured += 1
        apart = None not in (latent[2], residual[1])
        if apart and latent[2] < residual[1]:
            sparser += 1
            verdict = "sparser than the residual basis"
        elif apart and latent[1] > residual[2]:
            verdict = "denser than the residual basis"
        else:
            verdict = "not distinguishable from the residual basis (intervals overlap)"
        control = f", random direction {_fmt(random)}" if random is not None else ""
        lines.append(
            f"  - {r.label}: latents {_fmt(latent)} vs residual channel {_fmt(residual)}{control}: {verdict}"
        )
    if not measured:
        return "not measured: needs ablation results (saebench run --tasks ablation)"
    head = (
        f"ablating a latent has sparser logit effects than ablating a residual channel of the same norm "
        f"(95% intervals apart) for {sparser} of {measured} checkpoints (lower is sparser)"
    )
    return "\n".join([head, *lines])


def claim_shrinkage(rows: list[Row]) -> str:
    """activation_scale (refined / encoder L1 on the same active sets) per family: TopK ~1, ReLU + L1 > 1."""
    groups: dict[str, list[tuple]] = {}
    for r in rows:
        scale = _interval(r, "shrinkage", "activation_scale")
        if scale is not None:
            groups.setdefault(r.family, []).append((scale, r.get("shrinkage", "nmse_gain")))
    if not groups:
        return "not measured: needs shrinkage results (saebench run --tasks shrinkage)"
    lines = []
    for family, found in sorted(groups.items()):
        scales = [scale[0] for scale, _ in found]
        shrinks = sum(scale[1] is not None and scale[1] > 1 for scale, _ in found)
        gains = [gain for _, gain in found if gain is not None]
        gain = f"; nmse gain {min(gains):.4f} to {max(gains):.4f}" if gains else ""
        lines.append(
            f"  - {family}: activation_scale {min(scales):.4f} to {max(scales):.4f} over {len(found)} "
            f"checkpoints, interval above 1 for {shrinks}{gain}"
        )
    head = "activation_scale = sum ||z refined||_1 / sum ||z||_1 on the same active sets (above 1: shrinks):"
    return "\n".join([head, *lines])


def claim_n2g_precision_recall(rows: list[Row]) -> str:
    """Per checkpoint, N2G precision against recall, and f1 against the token-lookup baseline."""
    lines, recall_higher, beats_token, measured = [], 0, 0, 0
    for r in sorted(rows, key=lambda r: r.label):
        p, rec = _interval(r, "n2g", "n2g_precision"), _interval(r, "n2g", "n2g_recall")
        f1, token = _interval(r, "n2g", "n2g_f1"), _interval(r, "n2g", "n2g_f1_token")
        if None in (p, rec, f1, token):
            continue
        measured += 1
        recall_higher += rec[0] > p[0]
        apart = None not in (f1[1], token[2])
        beats = apart and f1[1] > token[2]
        beats_token += beats
        verdict = "beats the token baseline" if beats else "not above the token baseline (intervals overlap)"
        lines.append(
            f"  - {r.label}: precision {_fmt(p)}, recall {_fmt(rec)}; f1 {_fmt(f1)} vs token lookup "
            f"{_fmt(token)}: {verdict}"
        )
    if not measured:
        return "not measured: needs n2g results (saebench run --tasks n2g)"
    head = (
        f"recall is above precision for {recall_higher} of {measured} checkpoints; N2G's f1 beats the "
        f"current-token lookup's (95% intervals apart) for {beats_token} of {measured}"
    )
    return "\n".join([head, *lines])


def _trend(rows: list[Row], value: tuple[str, str], by: str, within: str) -> list[str]:
    """TopK rows grouped by `within` (n_latents or k), the value's trend as `by` grows, one line per group."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        v = r.get(*value)
        n, k = r.checkpoint.get("n_latents"), r.checkpoint.get("k")
        if r.family != "topk" or v is None or n is None or k is None:
            continue
        key, x = (n, k) if within == "n_latents" else (k, n)
        groups.setdefault(int(key), []).append((int(x), float(v)))
    lines = []
    for key, pts in sorted(groups.items()):
        pts = sorted(set(pts))
        if len(pts) < 2:
            continue
        xs, ys = zip(*pts, strict=True)
        rho = _spearman(np.array(xs, dtype=float), np.array(ys))
        trend = "rises" if rho > 0.5 else "falls" if rho < -0.5 else "has no clear trend"
        measured = ", ".join(f"{by}={x}: {y:.4f}" for x, y in pts)
        lines.append(f"  - {within.replace('n_latents', 'n')}={key}: {measured}; {trend} with {by}")
    return lines


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def claim_n2g_with_n(rows: list[Row]) -> str:
    """TopK at fixed k: n2g_f1 against n (the paper: larger dictionaries are more explainable)."""
    lines = _trend(rows, ("n2g", "n2g_f1"), "n", "k")
    if not lines:
        return "not measured: needs n2g results for TopK checkpoints at 2 or more n for one k"
    return "n2g_f1 (TopK) as n grows at fixed k:\n" + "\n".join(lines)


def claim_n2g_with_k(rows: list[Row]) -> str:
    """TopK at fixed n: n2g_f1 against k (the paper: larger L0 makes token-pattern explanations worse)."""
    lines = _trend(rows, ("n2g", "n2g_f1"), "k", "n_latents")
    if not lines:
        return "not measured: needs n2g results for TopK checkpoints at 2 or more k for one n"
    return "n2g_f1 (TopK) as k grows at fixed n:\n" + "\n".join(lines)


# --- verdicts -----------------------------------------------------------------------------------------------
def _interp_est(env: list[tuple], x: float) -> tuple | None:
    """Log-log interpolation of (value, lo, hi) along an envelope of (x, (value, lo, hi)) points."""
    xs = np.log([p[0] for p in env])
    lx = math.log(x)
    if len(xs) < 2 or lx < xs[0] - 1e-9 or lx > xs[-1] + 1e-9:
        return None
    out = []
    for i in range(3):
        ys = [p[1][i] if p[1][i] is not None else p[1][0] for p in env]
        out.append(float(np.exp(np.interp(lx, xs, np.log(ys)))))
    return tuple(out)


def measure_topk_frontier(rows: list[Row]) -> Verdict:
    nmse = ("core", "nmse")
    relu, topk = _xy(rows, "relu", nmse), _xy(rows, "topk", nmse)
    if not relu or len(topk) < 2:
        return _unmeasured(claim_topk_frontier(rows))
    sides, closest = [], None
    for l0, v, r in relu:
        n = r.checkpoint.get("n_latents")
        t = [p for p in topk if p[2].checkpoint.get("n_latents") == n] or topk
        env, best = [], None
        for x, y, tr in sorted(t, key=lambda p: p[0]):
            if best is None or y < best:
                env.append((x, _interval(tr, *nmse)))
                best = y
        ours = _interval(r, *nmse)
        theirs = _interp_est(env, l0)
        if theirs is None:
            better = [p for p in t if p[0] <= l0 and p[1] < v]
            if not better:
                continue
            theirs = _interval(min(better, key=lambda p: p[1])[2], *nmse)
        sides.append(_side(theirs, ours))
        ratio = ours[0] / theirs[0]
        if closest is None or ratio < closest[0]:
            closest = (ratio, r.label, ours, theirs)
    if not sides:
        return Verdict("no ReLU checkpoint inside the TopK L0 range or dominated", UNMEASURED)
    favour, against = sides.count(1), sides.count(-1)
    _, label, ours, theirs = closest
    number = (
        f"TopK below ReLU (intervals apart) at {favour} of {len(sides)} ReLU checkpoints; closest: {label} "
        f"{_fmt(ours)} vs TopK {_fmt(theirs)}"
    )
    return Verdict(number, verdict(favour, against, len(sides)))


def measure_dead_latents(rows: list[Row]) -> Verdict:
    dead = ("core", "dead_frac")
    pairs = dead_pairs(rows)
    if not pairs:
        return Verdict(
            "needs a TopK run without AuxK / tied init beside one with both at the same settings", UNMEASURED
        )
    sides = [_side(_interval(t, *dead), _interval(r, *dead)) for r, t in pairs]
    number = "; ".join(
        f"dead fraction {t.label} {_fmt(_interval(t, *dead))} vs {r.label} {_fmt(_interval(r, *dead))}"
        for r, t in pairs
    )
    return Verdict(number, verdict(sides.count(1), sides.count(-1), len(sides)))


def _families_fitted(rows: list[Row]):
    return scaling_fits(rows)


def measure_power_law(rows: list[Row]) -> list[Verdict]:
    out = []
    for ff in _families_fitted(rows):
        sides, parts = [], []
        for f in ff.ln:
            if len({p.n for p in f.points}) < 2:
                continue
            first, last = f.points[0], f.points[-1]
            rise = _side((first.value, first.lo, first.hi), (last.value, last.lo, last.hi))
            if f.flag is None:
                sides.append(1)
                parts.append(f"k={f.k}: b = {f.coef['b']}, c = {f.coef['c']}")
            else:
                sides.append(-1 if rise == 1 else 0)
                moved = "rises" if last.value > first.value else "falls"
                parts.append(
                    f"k={f.k}: nmse {moved} from {_fmt((first.value, first.lo, first.hi))} at n={first.n} to "
                    f"{_fmt((last.value, last.lo, last.hi))} at n={last.n}; no law ({f.flag.split(':')[0]})"
                )
        if sides:
            out.append(
                Verdict("; ".join(parts), verdict(sides.count(1), sides.count(-1), len(sides)), ff.family)
            )
    return out or [Verdict("needs TopK checkpoints at 4 or more sizes n for one k", UNMEASURED)]


def _joint_coefficient(rows: list[Row], name: str, meaning: str) -> list[Verdict]:
    out = []
    for ff in _families_fitted(rows):
        f = ff.lnk
        if f.flag and f.flag.startswith("too few"):
            out.append(Verdict(f"L(N, K) not fitted: {f.flag}", UNMEASURED, ff.family))
        elif f.flag and f.flag.startswith("nmse does not fall"):
            out.append(Verdict(f"no falling L(N, K) to read {name} from: {f.flag}", UNMEASURED, ff.family))
        elif f.flag:
            out.append(Verdict(f"L(N, K) flagged: {f.flag}", UNSEPARATED, ff.family))
        else:
            c = f.coef[name]
            side = 1 if c.below_zero else -1 if c.above_zero else 0
            out.append(Verdict(f"{name} = {c} ({meaning})", verdict(side == 1, side == -1, 1), ff.family))
    return out or [Verdict("needs TopK checkpoints at 3 or more n and 3 or more k", UNMEASURED)]


def measure_steeper_with_k(rows: list[Row]) -> list[Verdict]:
    return _joint_coefficient(rows, "gamma", "the exponent of n is beta_n + gamma log k")


def measure_irreducible_with_k(rows: list[Row]) -> list[Verdict]:
    return _joint_coefficient(rows, "eta", "the irreducible term is exp(zeta + eta log k)")


def measure_ablation_sparsity(rows: list[Row]) -> Verdict:
    sides, worst = [], None
    for r in rows:
        latent = _interval(r, "ablation", "ablation_sparsity")
        residual = _interval(r, "ablation", "ablation_sparsity_residual")
        if latent is None or residual is None:
            continue
        sides.append(_side(latent, residual))
        ratio = latent[0] / residual[0] if residual[0] else math.inf
        if worst is None or ratio > worst[0]:
            worst = (ratio, r.label, latent, residual)
    if not sides:
        return _unmeasured(claim_ablation_sparsity(rows))
    _, label, latent, residual = worst
    number = (
        f"sparser than the residual channel at {sides.count(1)} of {len(sides)} checkpoints; least: {label} "
        f"{_fmt(latent)} vs {_fmt(residual)}"
    )
    return Verdict(number, verdict(sides.count(1), sides.count(-1), len(sides)))


def measure_shrinkage(rows: list[Row]) -> Verdict:
    one = (1.0, 1.0, 1.0)
    sides, parts = [], []
    for r in rows:
        scale = _interval(r, "shrinkage", "activation_scale")
        if scale is None or r.family.split(" (")[0] not in ("relu", "topk"):
            continue
        if r.family.startswith("relu"):
            sides.append(_side(one, scale))  # the claim: ReLU's scale lies above 1
        else:
            sides.append(-1 if _lohi(scale)[0] > 1 else 1)  # the claim: TopK's does not
        parts.append(f"{r.label} {_fmt(scale)}")
    if not sides:
        return _unmeasured(claim_shrinkage(rows))
    return Verdict(
        "activation_scale " + "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else ""),
        verdict(sides.count(1), sides.count(-1), len(sides)),
    )


def measure_n2g_precision_recall(rows: list[Row]) -> Verdict:
    sides, parts = [], []
    for r in rows:
        p, rec = _interval(r, "n2g", "n2g_precision"), _interval(r, "n2g", "n2g_recall")
        f1, token = _interval(r, "n2g", "n2g_f1"), _interval(r, "n2g", "n2g_f1_token")
        if None in (p, rec, f1, token):
            continue
        sides += [_side(p, rec), _side(token, f1)]
        parts.append(
            f"{r.label}: recall {_fmt(rec)} vs precision {_fmt(p)}, f1 {_fmt(f1)} vs token {_fmt(token)}"
        )
    if not sides:
        return _unmeasured(claim_n2g_precision_recall(rows))
    return Verdict(
        "; ".join(parts[:2]) + ("; ..." if len(parts) > 2 else ""),
        verdict(sides.count(1), sides.count(-1), len(sides)),
    )


def _ends(rows: list[Row], value: tuple[str, str], within: str) -> list[tuple[int, Row, Row]]:
    """Recipe TopK rows by `within` (k or n_latents): (group, row at the smallest other, the largest)."""
    groups: dict[int, list[Row]] = {}
    other = "n_latents" if within == "k" else "k"
    for r in rows:
        if (
            r.family == "topk"
            and r.get(*value) is not None
            and r.checkpoint.get("n_latents")
            and r.checkpoint.get("k")
        ):
            groups.setdefault(int(r.checkpoint[within]), []).append(r)
    out = []
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.checkpoint[other])
        if len({r.checkpoint[other] for r in rs}) >= 2:
            out.append((key, rs[0], rs[-1]))
    return out


def _measure_trend(rows: list[Row], within: str, falls: bool, text) -> Verdict:
    value = ("n2g", "n2g_f1")
    ends = _ends(rows, value, within)
    if not ends:
        return _unmeasured(text(rows))
    by = "n" if within == "k" else "k"
    by_key = "n_latents" if by == "n" else "k"
    sides, parts = [], []
    for key, small, large in ends:
        a, b = _interval(small, *value), _interval(large, *value)
        sides.append(_side(b, a) if falls else _side(a, b))
        parts.append(
            f"{within.replace('n_latents', 'n')}={key}: {_fmt(a)} at {by}={small.checkpoint[by_key]} "
            f"vs {_fmt(b)} at {by}={large.checkpoint[by_key]}"
        )
    return Verdict("n2g_f1 " + "; ".join(parts), verdict(sides.count(1), sides.count(-1), len(sides)))


def measure_n2g_with_n(rows: list[Row]) -> Verdict:
    return _measure_trend(rows, "k", False, claim_n2g_with_n)


def measure_n2g_with_k(rows: list[Row]) -> Verdict:
    return _measure_trend(rows, "n_latents", True, claim_n2g_with_k)


# --- subject-model size: Ls(N) ------------------------------------------------------------------------------
def _subject_groups(rows: list[Row]) -> dict[str, list[tuple[str, int, FamilyFits]]]:
    """{family without its subject model: [(subject, width, fits), ...] by width} for every fitted family
    trained on two or more subject models (width: the SAE's d_in, the subject model's d_model)."""
    subjects = {r.family: (r.subject or DEFAULT_MODEL, int(r.checkpoint.get("d_in") or 0)) for r in rows}
    groups: dict[str, list] = {}
    for ff in scaling_fits(rows):
        subject, width = subjects[ff.family]
        groups.setdefault(ff.family.removesuffix(f" on {subject}"), []).append((subject, width, ff))
    return {base: sorted(g, key=lambda item: item[1]) for base, g in groups.items() if len(g) >= 2}


def _nmse_higher(k: int, fs, fl) -> tuple[list[int], str]:
    """At each n both L(N) fits have points: the larger model's nmse above the smaller's (+1)."""
    at_n = {p.n: p for p in fs.points}
    pairs = [(at_n[p.n], p) for p in fl.points if p.n in at_n]
    sides = [_side((ps.value, ps.lo, ps.hi), (pl.value, pl.lo, pl.hi)) for ps, pl in pairs]
    return sides, f"k={k}: nmse " + ", ".join(
        f"n={ps.n}: {ps.value:.4f} vs {pl.value:.4f}" for ps, pl in pairs
    )


def _exponent_flatter(k: int, fs, fl) -> tuple[list[int], str]:
    """The larger model's L(N) exponent b above (flatter than) the smaller's (+1); unseparated when a fit
    is flagged."""
    if fs.flag or fl.flag:
        why = "; ".join(
            f"{'smaller' if f is fs else 'larger'}: {f.flag.split(':')[0]}" for f in (fs, fl) if f.flag
        )
        return [0], f"k={k}: exponents not compared ({why})"
    bs, bl = fs.coef["b"], fl.coef["b"]
    return [_side((bs.value, bs.lo, bs.hi), (bl.value, bl.lo, bl.hi))], f"k={k}: b = {bs} vs {bl}"


def _measure_subject(rows: list[Row], compare) -> list[Verdict]:
    """One verdict per family fitted on two subject models of different widths: `compare(k, smaller's L(N)
    fit, larger's)` -> (sides, text) at every k both have."""
    out = []
    for base, group in _subject_groups(rows).items():
        (s_name, s_width, small), (l_name, l_width, large) = group[0], group[-1]
        scope = f"{base}: {s_name} (d {s_width}) vs {l_name} (d {l_width})"
        if s_width == l_width:
            out.append(Verdict("the models have one width: no size to order them by", UNMEASURED, scope))
            continue
        small_ln, large_ln = {f.k: f for f in small.ln}, {f.k: f for f in large.ln}
        sides, parts = [], []
        for k in sorted(set(small_ln) & set(large_ln)):
            k_sides, text = compare(k, small_ln[k], large_ln[k])
            sides += k_sides
            parts.append(text)
        out.append(Verdict("; ".join(parts), verdict(sides.count(1), sides.count(-1), len(sides)), scope))
    return out or [
        Verdict("needs one sweep's TopK checkpoints (a k at 2 or more n) on two subject models", UNMEASURED)
    ]


def measure_subject_size(rows: list[Row]) -> list[Verdict]:
    return _measure_subject(rows, _nmse_higher)


def measure_subject_exponent(rows: list[Row]) -> list[Verdict]:
    return _measure_subject(rows, _exponent_flatter)


def claim_subject_size(rows: list[Row]) -> str:
    """Each family's L(N) per subject model, the smaller model (by width) first."""
    lines = []
    for base, group in _subject_groups(rows).items():
        for subject, width, ff in group:
            for f in ff.ln:
                measured = ", ".join(f"n={p.n}: {p.value:.4f}" for p in f.points)
                lines.append(f"  - {base}, {subject} (d_model {width}), k={f.k}: {measured}; {f.law_text()}")
    if not lines:
        return "not measured: needs one sweep's TopK checkpoints (a k at 2 or more n) on two subject models"
    return (
        "L(N) of one training recipe on each subject model, ordered by width (d_model); nmse compares across "
        "them as each SAE's own normalised reconstruction error:\n" + "\n".join(lines)
    )


@dataclass(frozen=True)
class Claim:
    #: the claim, as a heading
    title: str
    #: what the paper found
    paper: str
    #: rows -> Verdict or [Verdict] (one per family)
    measure: Callable
    #: rows -> the details paragraph (`claim_*`), or None
    details: Callable | None = None


CLAIMS = (
    Claim(
        "TopK beats ReLU on the nmse-L0 frontier.",
        "TopK reaches a lower nmse than ReLU + L1 at every L0",
        measure_topk_frontier,
        claim_topk_frontier,
    ),
    Claim(
        "AuxK and tied init leave few dead latents.",
        "with AuxK and the tied encoder init few latents die, even in the largest SAEs; without them many do",
        measure_dead_latents,
        claim_dead_latents,
    ),
    Claim(
        "nmse falls as a power law in n with an irreducible term.",
        "at fixed k, L(N) = a n^b + c with b < 0",
        measure_power_law,
        claim_power_law,
    ),
    Claim(
        "L(N) gets steeper as k grows.",
        "gamma < 0 in the joint L(N, K) fit",
        measure_steeper_with_k,
    ),
    Claim(
        "The irreducible loss falls as k grows.",
        "eta < 0 in the joint L(N, K) fit",
        measure_irreducible_with_k,
    ),
    Claim(
        "Latents have sparser downstream effects than residual channels.",
        "ablating a single latent changes few logits",
        measure_ablation_sparsity,
        claim_ablation_sparsity,
    ),
    Claim(
        "TopK does not shrink activations; ReLU + L1 does.",
        "TopK prevents activation shrinkage; an L1 penalty shrinks activations",
        measure_shrinkage,
        claim_shrinkage,
    ),
    Claim(
        "N2G explanations have high recall but lower precision, and beat a token lookup.",
        "N2G explanations have high recall and low precision (the token lookup is this suite's control)",
        measure_n2g_precision_recall,
        claim_n2g_precision_recall,
    ),
    Claim(
        "Larger dictionaries are better explained at fixed k.",
        "explainability improves with n",
        measure_n2g_with_n,
        claim_n2g_with_n,
    ),
    Claim(
        "Larger k makes token-pattern explanations worse.",
        "explanations get worse as k grows",
        measure_n2g_with_k,
        claim_n2g_with_k,
    ),
    Claim(
        "Larger subject models need larger SAEs for the same nmse.",
        "at fixed k, a larger subject model's L(N) lies higher (Ls(N))",
        measure_subject_size,
        claim_subject_size,
    ),
    Claim(
        "Larger subject models' L(N) has a worse exponent.",
        "at fixed k, a larger subject model's L(N) falls more slowly with n",
        measure_subject_exponent,
    ),
)

RULE = (
    "Verdicts: each comparison a claim rests on is *for* it when the 95% intervals are apart in the claim's "
    "direction and *against* it when they are apart the other way; any comparison against: **does not hold "
    "here**; otherwise more than half for: **holds**; otherwise: **not separated at this budget**."
)


def claims_table(rows: list[Row]) -> list[list[str]]:
    """[claim, the paper's finding, our number with interval, verdict] per claim (and family)."""
    out = []
    for claim in CLAIMS:
        found = claim.measure(rows)
        for v in found if isinstance(found, list) else [found]:
            title = claim.title if not v.scope else f"{claim.title} ({v.scope})"
            out.append(
                [title, claim.paper, v.number, f"**{v.verdict}**" if v.verdict != UNMEASURED else v.verdict]
            )
    return out


def sae_rows(rows: list[Row]) -> list[Row]:
    """The rows the claims are about: SAEs, not the built-in reference dictionaries (PCA, random), which
    are controls (in the tables beside them, and left out of every claim)."""
    return [r for r in rows if r.checkpoint.get("format") != "builtin"]


def claims_section(rows: list[Row]) -> str:
    """Markdown: the claims table, its rule, and each claim's details (on the SAE rows, `sae_rows`)."""
    from tabulate import tabulate

    rows = sae_rows(rows)
    body = [[cell.replace("|", "\\|") for cell in row] for row in claims_table(rows)]
    parts = [
        RULE,
        "The built-in reference dictionaries are controls, not SAEs: they are left out of the claims.",
        "",
        tabulate(
            body, headers=["claim", "the paper's finding", "measured here", "verdict"], tablefmt="github"
        ),
        "",
        "<details><summary>Per checkpoint</summary>",
        "",
    ]
    parts += [f"- **{c.title}** {c.details(rows)}" for c in CLAIMS if c.details is not None]
    parts += ["", "</details>"]
    return "\n".join(parts)
