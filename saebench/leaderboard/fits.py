"""Scaling laws of nmse over the leaderboard's TopK rows, with bootstrap intervals on every coefficient.

As Gao et al. (2024) fit them (n latents, k active per token, L the nmse):

    L(N) per k    L = a n^b + c                         c >= 0, the irreducible term
    L(N, K)       L = exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k)

L(N) is fitted by least squares over a grid of b in [B_MIN, B_MAX] with a and c linear (c clipped at 0);
L(N, K) by Levenberg-Marquardt on log L (log n and log k centred while fitting, the coefficients reported
uncentred).  In the joint law the exponent of n at a given k is beta_n + gamma log k: gamma < 0 means
L(N) steepens as k grows, eta < 0 that the irreducible term falls with k.

Intervals: every fit is refitted on N_BOOT resampled data sets and the 2.5/97.5 percentiles of each
coefficient reported.  A checkpoint's nmse is resampled from its evaluation windows when its core result
keeps the per-window sums (`details["nmse_windows"]`): the same resampled windows for every checkpoint that
was scored on the same windows, so the correlation between checkpoints is kept.  Otherwise (result files
written before those sums were kept) each checkpoint's nmse is drawn independently from a normal matching
its 95% interval, which ignores that correlation and overstates the noise in differences between
checkpoints; `Fit.resampling` says which was used.

A fit is flagged (`Fit.flag`), and no law printed, when its points are too few (L(N): fewer than 4 sizes;
L(N, K): fewer than 3 sizes, 3 k's or 9 points), when nmse does not fall with n (a <= 0; the exponent of n
at the middle k >= 0), when the exponent's interval reaches 0 or the edge of the searched range, when more
than 10% of the refits fail, or when the law misses its points by more than 3 of their standard errors
(root mean square).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

N_BOOT = 400
B_MIN, B_MAX = -3.0, -0.005
_B_GRID = np.linspace(B_MIN, B_MAX, 600)
JOINT_NAMES = ("alpha", "beta_k", "beta_n", "gamma", "zeta", "eta")
JOINT_LAW = (
    "log L = log(exp(alpha + beta_k log k + beta_n log n + gamma log k log n) + exp(zeta + eta log k))"
)
#: a z of 1.96 turns a 95% interval into a standard error
_Z95 = 1.959963984540054


@dataclass
class Point:
    """One checkpoint's nmse with what resampling it needs."""

    n: int
    k: int
    value: float
    lo: float | None
    hi: float | None
    label: str = ""
    #: per-window (numerator, denominator) of the nmse ratio, when the result file keeps them
    windows: tuple[np.ndarray, np.ndarray] | None = None
    #: what identifies the evaluation windows (the result's data_key), to resample them jointly
    data_key: str = ""

    @property
    def se(self) -> float:
        """Standard error from the 95% interval (a tenth of a percent of the value when there is none)."""
        if self.lo is None or self.hi is None or self.hi <= self.lo:
            return abs(self.value) * 1e-3 + 1e-12
        return (self.hi - self.lo) / (2 * _Z95)


@dataclass
class Coef:
    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"

    @property
    def below_zero(self) -> bool:
        return self.hi < 0

    @property
    def above_zero(self) -> bool:
        return self.lo > 0


@dataclass
class Fit:
    """A fitted law, its coefficients with intervals, and why it does not support a law (if it does not)."""

    #: "L(N)" or "L(N,K)"
    law: str
    points: list[Point]
    coef: dict[str, Coef] = field(default_factory=dict)
    #: "windows" or "normal approximation"
    resampling: str = ""
    #: None when the fit supports a law; else why not (too few points, too noisy, not falling with n)
    flag: str | None = None
    #: the k of an L(N) fit
    k: int | None = None

    def curve(self, n, k=None) -> np.ndarray:
        """The fitted L at sizes n (and k for L(N,K))."""
        n = np.asarray(n, dtype=float)
        c = {name: v.value for name, v in self.coef.items()}
        if self.law == "L(N)":
            return c["a"] * n ** c["b"] + c["c"]
        params = np.array([c[name] for name in JOINT_NAMES])
        return joint_law(params, n, np.full_like(n, float(k if k is not None else self.k)))

    def law_text(self) -> str:
        """The law with its coefficients and intervals, or the flag."""
        if self.flag:
            return f"no law: {self.flag}"
        c = self.coef
        if self.law == "L(N)":
            return f"nmse = a n^b + c, a = {c['a']}, b = {c['b']}, c = {c['c']}"
        terms = ", ".join(f"{name} = {c[name]}" for name in JOINT_NAMES)
        return f"{JOINT_LAW}, {terms}"


# --- L(N) ---------------------------------------------------------------------------------------------------
def fit_power_law(n: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares fit of y = a n^b + c (c >= 0), by a grid over b and linear least squares for a, c."""
    a, b, c = _power_law_batch(np.asarray(n, dtype=float), np.asarray(y, dtype=float)[None])
    return float(a[0]), float(b[0]), float(c[0])


def _power_law_batch(n: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fit_power_law for every row of Y (draws, points) at once: (a, b, c) arrays of length draws."""
    X = n[None, :] ** _B_GRID[:, None]  # (grid, points)
    m = n.size
    sx, sxx = X.sum(1), (X * X).sum(1)
    sy = Y.sum(1)  # (draws,)
    sxy = Y @ X.T  # (draws, grid)
    det = m * sxx - sx * sx
    a = (m * sxy - sx[None] * sy[:, None]) / det[None]
    c = (sy[:, None] - a * sx[None]) / m
    # c < 0 is not allowed: refit a alone through the origin
    a0 = sxy / sxx[None]
    neg = c < 0
    a, c = np.where(neg, a0, a), np.where(neg, 0.0, c)
    pred = a[:, :, None] * X[None] + c[:, :, None]
    err = ((pred - Y[:, None, :]) ** 2).sum(-1)
    best = err.argmin(1)
    rows = np.arange(Y.shape[0])
    return a[rows, best], _B_GRID[best], c[rows, best]


def fit_ln(points: list[Point], *, n_boot: int = N_BOOT, seed: int = 0) -> Fit:
    """L(N) = a n^b + c over points of one k, with bootstrap intervals and a flag when unsupported."""
    points = sorted(points, key=lambda p: p.n)
    fit = Fit("L(N)", points, k=points[0].k if points else None)
    sizes = len({p.n for p in points})
    if sizes < 4:
        fit.flag = f"too few points: {sizes} sizes n, a n^b + c needs 4 or more"
        return fit
    n = np.array([p.n for p in points], dtype=float)
    y = np.array([p.value for p in points])
    a, b, c = fit_power_law(n, y)
    draws, fit.resampling = resample(points, n_boot, seed)
    A, B, C = _power_law_batch(n, draws)
    fit.coef = {name: _coef(v, s) for name, v, s in (("a", a, A), ("b", b, B), ("c", c, C))}
    se = np.array([p.se for p in points])
    misfit = float(np.sqrt(np.mean(((a * n**b + c - y) / se) ** 2)))
    edge = 1e-9 + (_B_GRID[1] - _B_GRID[0])
    if a <= 0:
        fit.flag = "nmse does not fall with n (the best a n^b + c has a <= 0)"
    elif fit.coef["b"].hi >= B_MAX - edge or fit.coef["b"].lo <= B_MIN + edge:
        fit.flag = (
            f"too noisy: b's 95% interval [{fit.coef['b'].lo:.3g}, {fit.coef['b'].hi:.3g}] reaches the edge "
            f"of the searched range [{B_MIN:g}, {B_MAX:g}]"
        )
    elif misfit > 3:
        fit.flag = f"a n^b + c misses the points by {misfit:.1f} standard errors (rms)"
    return fit


# --- L(N, K) ------------------------------------------------------------------------------------------------
def joint_law(params: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    alpha, beta_k, beta_n, gamma, zeta, eta = params
    ln, lk = np.log(n), np.log(k)
    return np.exp(alpha + beta_k * lk + beta_n * ln + gamma * lk * ln) + np.exp(zeta + eta * lk)


def _centred_design(n, k):
    ln, lk = np.log(n), np.log(k)
    mn, mk = ln.mean(), lk.mean()
    return ln - mn, lk - mk, mn, mk


def _lm(theta, cn, ck, logy, iters: int = 200):
    """Levenberg-Marquardt on r = log(exp(A) + exp(B)) - log y in the centred parameters."""
    cols_a = np.stack([np.ones_like(cn), ck, cn, ck * cn], 1)
    cols_b = np.stack([np.ones_like(ck), ck], 1)

    def residual(t):
        A, B = cols_a @ t[:4], cols_b @ t[4:]
        return np.logaddexp(A, B) - logy, A, B

    r, A, B = residual(theta)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        s = 1.0 / (1.0 + np.exp(np.clip(B - A, -50, 50)))  # d log(e^A + e^B) / dA
        J = np.concatenate([cols_a * s[:, None], cols_b * (1 - s)[:, None]], 1)
        g, H = J.T @ r, J.T @ J
        improved = False
        for _ in range(12):
            step = np.linalg.solve(H + lam * (np.diag(np.diag(H)) + 1e-9 * np.eye(6)), -g)
            t_new = np.clip(theta + step, -60, 60)
            r_new, A_new, B_new = residual(t_new)
            c_new = float(r_new @ r_new)
            if c_new < cost:
                done = cost - c_new < 1e-14 * max(cost, 1e-30)
                theta, r, A, B, cost, lam, improved = (
                    t_new,
                    r_new,
                    A_new,
                    B_new,
                    c_new,
                    max(lam / 3, 1e-12),
                    True,
                )
                break
            lam *= 4
        if not improved or done:
            break
    return theta, cost


def _uncentre(theta, mn, mk) -> np.ndarray:
    a, bk, bn, g, z, e = theta
    return np.array([a - bk * mk - bn * mn + g * mk * mn, bk - g * mn, bn - g * mk, g, z - e * mk, e])


def fit_joint_law(n, k, y, start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(alpha, beta_k, beta_n, gamma, zeta, eta) minimising the squared error of log L, and that error.

    Started from `start` (centred parameters) when given, else from several splits of y into a power part
    and an irreducible floor.
    """
    n, k, y = (np.asarray(v, dtype=float) for v in (n, k, y))
    cn, ck, mn, mk = _centred_design(n, k)
    logy = np.log(y)
    starts = []
    if start is not None:
        starts.append(start)
    else:
        X = np.stack([np.ones_like(cn), ck, cn, ck * cn], 1)
        for share in (0.1, 0.5, 0.8):
            floor = share * y.min()
            power = np.linalg.lstsq(X, np.log(y - floor), rcond=None)[0]
            starts.append(np.concatenate([power, [math.log(floor), 0.0]]))
    best = min((_lm(s, cn, ck, logy) for s in starts), key=lambda t: t[1])
    return best[0], best[1]


def fit_lnk(points: list[Point], *, n_boot: int = N_BOOT // 2, seed: int = 0) -> Fit:
    """The joint L(N, K) over points of several n and k, with bootstrap intervals and a flag."""
    fit = Fit("L(N,K)", sorted(points, key=lambda p: (p.k, p.n)))
    sizes, ks = len({p.n for p in points}), len({p.k for p in points})
    if sizes < 3 or ks < 3 or len(points) < 9:
        fit.flag = (
            f"too few points: {len(points)} checkpoints at {sizes} sizes n and {ks} k's; the six "
            "coefficients need 3 or more of each and 9 or more points"
        )
        return fit
    pts = fit.points
    n = np.array([p.n for p in pts], dtype=float)
    k = np.array([p.k for p in pts], dtype=float)
    y = np.array([p.value for p in pts])
    theta, _ = fit_joint_law(n, k, y)
    _, _, mn, mk = _centred_design(n, k)
    params = _uncentre(theta, mn, mk)
    draws, fit.resampling = resample(pts, n_boot, seed)
    samples, failed = [], 0
    for row in draws:
        if (row <= 0).any():
            failed += 1
            continue
        t, cost = fit_joint_law(n, k, row, start=theta)
        if not np.isfinite(cost) or np.abs(t).max() >= 59:
            failed += 1
            continue
        samples.append(_uncentre(t, mn, mk))
    fit.coef = {}
    if len(samples) < 0.9 * len(draws):
        fit.flag = f"too noisy: {failed} of {len(draws)} refits on resampled data failed"
        samples = samples or [params]
    S = np.array(samples)
    fit.coef = {name: _coef(params[i], S[:, i]) for i, name in enumerate(JOINT_NAMES)}
    if fit.flag:
        return fit
    lk_mid = math.log(sorted({p.k for p in pts})[ks // 2])
    slope = params[2] + params[3] * lk_mid
    slope_s = S[:, 2] + S[:, 3] * lk_mid
    slope_lo, slope_hi = np.quantile(slope_s, [0.025, 0.975])
    se = np.array([p.se for p in pts])
    misfit = float(np.sqrt(np.mean(((joint_law(params, n, k) - y) / se) ** 2)))
    if slope >= 0:
        fit.flag = f"nmse does not fall with n (exponent of n at k={math.exp(lk_mid):.0f} is {slope:.3g})"
    elif slope_hi >= 0:
        fit.flag = (
            f"too noisy: the exponent of n at k={math.exp(lk_mid):.0f}, {slope:.3g}, has the 95% interval "
            f"[{slope_lo:.3g}, {slope_hi:.3g}], which includes 0"
        )
    elif misfit > 3:
        fit.flag = f"the law misses the points by {misfit:.1f} standard errors (rms)"
    return fit


# --- resampling ---------------------------------------------------------------------------------------------
def resample(points: list[Point], n_boot: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n_boot, points) resampled nmse values and how they were drawn ("windows" or "normal approximation").

    Windows when every point keeps its per-window sums: one multinomial draw of windows per data set of
    windows (data_key), shared by the checkpoints scored on it.
    """
    rng = np.random.default_rng(seed)
    if points and all(p.windows is not None for p in points):
        out = np.empty((n_boot, len(points)))
        weights: dict[tuple[str, int], np.ndarray] = {}
        for j, p in enumerate(points):
            num, den = p.windows
            key = (p.data_key, len(num))
            if key not in weights:
                weights[key] = rng.multinomial(len(num), np.full(len(num), 1 / len(num)), size=n_boot).astype(
                    float
                )
            w = weights[key]
            out[:, j] = (w @ num) / (w @ den)
        return out, "windows"
    values = np.array([p.value for p in points])
    se = np.array([p.se for p in points])
    draws = values[None] + rng.standard_normal((n_boot, len(points))) * se[None]
    return np.maximum(draws, values[None] * 1e-3), "normal approximation"


def _coef(value: float, samples: np.ndarray) -> Coef:
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return Coef(float(value), float(lo), float(hi))


# --- rows -> points -----------------------------------------------------------------------------------------
def nmse_points(rows, family: str, value: tuple[str, str] = ("core", "nmse")) -> list[Point]:
    """The rows of one family with a k and an nmse, as fit points (per-window sums when kept)."""
    out = []
    for r in rows:
        v = r.values.get(value[0], {}).get(value[1])
        n, k = r.checkpoint.get("n_latents"), r.checkpoint.get("k")
        if r.family != family or v is None or not n or not k:
            continue
        kept = (r.details.get(value[0]) or {}).get(f"{value[1]}_windows")
        windows = None
        if kept and len(kept.get("num", [])) == len(kept.get("den", [])) > 1:
            windows = (np.asarray(kept["num"], dtype=float), np.asarray(kept["den"], dtype=float))
        out.append(
            Point(
                int(n),
                int(k),
                float(v["value"]),
                v.get("lo"),
                v.get("hi"),
                r.label,
                windows,
                str(r.data_keys.get(value[0], "")),
            )
        )
    return out


def ln_fits(rows, family: str, **kw) -> list[Fit]:
    """L(N) for every k of the family that has checkpoints at one or more n, in order of k."""
    pts = nmse_points(rows, family)
    return [fit_ln([p for p in pts if p.k == k], **kw) for k in sorted({p.k for p in pts})]


def lnk_fit(rows, family: str, k_max: int = 64, **kw) -> Fit:
    """L(N, K) on the family's small-k sweep (k <= k_max)."""
    return fit_lnk([p for p in nmse_points(rows, family) if p.k <= k_max], **kw)


# --- every family at once, and the README section -----------------------------------------------------------
@dataclass
class FamilyFits:
    family: str
    #: L(N) per k, in order of k
    ln: list[Fit]
    lnk: Fit

    @property
    def resampling(self) -> str:
        return next((f.resampling for f in [*self.ln, self.lnk] if f.resampling), "")


_CACHE: dict[tuple, list[FamilyFits]] = {}


def scaling_fits(rows) -> list[FamilyFits]:
    """L(N) per k and L(N, K) for every family with a k at 2 or more sizes n (computed once per row set)."""
    key = tuple(
        (r.label, r.family, json_safe(r.values.get("core", {}).get("nmse")), r.checkpoint.get("k"))
        for r in rows
    )
    if key not in _CACHE:
        families = sorted({r.family for r in rows if r.checkpoint.get("k")}, key=lambda f: (f != "topk", f))
        out = []
        for family in families:
            pts = nmse_points(rows, family)
            if any(len({p.n for p in pts if p.k == k}) >= 2 for k in {p.k for p in pts}):
                out.append(FamilyFits(family, ln_fits(rows, family), lnk_fit(rows, family)))
        _CACHE.clear()
        _CACHE[key] = out
    return _CACHE[key]


def json_safe(v):
    return None if v is None else (v.get("value"), v.get("lo"), v.get("hi"))


RESAMPLING_NOTE = {
    "windows": "intervals from refits on resampled evaluation windows (the same windows for every checkpoint "
    "scored on them)",
    "normal approximation": "intervals from refits on each checkpoint's nmse drawn independently from a "
    "normal matching its 95% interval: these result files keep no per-window sums (core results written "
    "before `details.nmse_windows`), so the windows cannot be resampled; independent draws ignore that the "
    "checkpoints share their evaluation windows, and overstate the noise in the differences between them",
}


def fits_section(rows) -> str:
    """Markdown: the L(N) and L(N, K) fits of each family with every coefficient's interval, or the flag."""
    from tabulate import tabulate

    fams = scaling_fits(rows)
    if not fams:
        return "not fitted: needs checkpoints with a k at 2 or more sizes n and core results"
    notes = sorted({f.resampling for f in fams if f.resampling})
    parts = [
        "Fitted on nmse (in the rows' common input space) as Gao et al. (2024) fit it; "
        + "; ".join(RESAMPLING_NOTE[n] for n in notes)
        + f" ({N_BOOT} refits for L(N), {N_BOOT // 2} for L(N, K)). A fit is flagged instead of printed when "
        "its points are too few, too noisy (the exponent's interval reaches 0 or the searched range's edge, "
        "or refits fail), rise with n, or miss the law by more than 3 standard errors.",
        "",
        "L(N) per k: nmse = a n^b + c",
        "",
    ]
    body = []
    for ff in fams:
        for f in ff.ln:
            measured = ", ".join(f"{p.n}: {p.value:.4f}" for p in f.points)
            coefs = ["—"] * 3 if f.flag else [str(f.coef[c]) for c in ("a", "b", "c")]
            body.append([ff.family, f.k, measured, *coefs, f"flagged: {f.flag}" if f.flag else "fitted"])
    parts += [
        tabulate(body, headers=["family", "k", "nmse at n", "a", "b", "c", "fit"], tablefmt="github"),
        "",
    ]
    parts += [
        f"L(N, K): {JOINT_LAW}",
        "",
    ]
    body = []
    for ff in fams:
        f = ff.lnk
        ks = sorted({p.k for p in f.points})
        coefs = ["—"] * 6 if f.flag else [str(f.coef[c]) for c in JOINT_NAMES]
        verdict = f"flagged: {f.flag}" if f.flag else "fitted"
        body.append([ff.family, f"{len(f.points)} (k {', '.join(map(str, ks))})", *coefs, verdict])
    parts.append(tabulate(body, headers=["family", "points", *JOINT_NAMES, "fit"], tablefmt="github"))
    return "\n".join(parts)
