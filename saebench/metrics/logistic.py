"""Batched one-dimensional logistic regression: every feature column is its own 2x2 Newton system.

For each feature f (one column of the train matrix: n examples, labels y in {0, 1}) fit

    p_i = sigmoid(w f_i + b),   minimising   L(w, b) = (1/n) sum_i CE_i + (l2/2) w^2     (b unpenalised)

The cross-entropy is written through the logit of the *wrong* class, m_i = -(2 y_i - 1)(w f_i + b), so
that CE_i = softplus(m_i) is exact for any logit.  With q_i = sigmoid(m_i), s_i = q_i (1 - q_i) and the
signed feature g_i = -(2 y_i - 1) f_i:

    dL/dw = (1/n) sum_i q_i g_i + l2 w           H_ww = (1/n) sum_i s_i f_i^2 + l2
    dL/db = (1/n) sum_i q_i (1 - 2 y_i)          H_wb = (1/n) sum_i s_i f_i        H_bb = (1/n) sum_i s_i

and the Newton direction is d = -H^{-1} grad.  The start is the exact Newton step from (0, logit(prior)),
where every q_i is known, so it costs two sums per feature.  A trial point x + t d is accepted when

    phi'(t) <= 0        phi(t) = L(x + t d) is convex, so phi(t) <= phi(0) + t phi'(t) <= phi(0); or
    t max_i |d_w f_i + d_b| <= 1/2      every logit moves by at most 1/2, so every s_i, hence phi'', stays
                                        within a factor e^(1/2) of its value at x, and with a = d^T H d,
                                        phi(t) <= phi(0) - t a (1 - t e^(1/2) / 2) < phi(0);

otherwise t shrinks to the secant root of phi' clamped to [0.1 t, 0.5 t].  Both tests need only the
gradient, so the passes over the data take no logarithm; the loss is evaluated once per feature, when it
finishes.  A
feature stops when its Newton step is below `tol` in both coordinates (that step is then applied) or after
`max_iter` passes.  A feature constant on train gets w = 0, b = logit(prior), the exact optimum.

Columns stream through a working set of at most 2 * chunk_elements values: a column leaves when it
finishes and new columns join whenever half the set has finished, so every pass runs on a full set.
Elementwise work runs in the chosen dtype; parameters and the 2x2 solves are float64, and the sums are
taken in the working dtype (torch's pairwise summation) and then promoted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

#: elements (examples x features) per incoming chunk; the working set holds up to twice this
CHUNK_ELEMENTS = 1 << 18
#: largest logit change along a step that is accepted without a sign test on phi'
MAX_LOGIT_SHIFT = 0.5
#: logit beyond which softplus(m) is evaluated as m + softplus(80) - 80 (see `_softplus_mean`)
SOFTPLUS_CLIP = 80.0


class LogisticFit(NamedTuple):
    """Per-feature fits of p = sigmoid(w f + b); every field has shape (F,), parameters in float64."""

    #: slope on the feature
    w: torch.Tensor
    #: intercept
    b: torch.Tensor
    #: mean train cross-entropy (nats) at (w, b), without the penalty
    train_ce: torch.Tensor
    #: Newton passes used (0 for constant features)
    n_iter: torch.Tensor
    #: whether the step fell below `tol` within `max_iter` passes (constant features count as converged)
    converged: torch.Tensor

    def test_ce(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per feature of the fitted probes on other examples (m, F), float64."""
        return cross_entropy(features, labels, self.w, self.b)


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) / std per column with the mean and population std of `train`; a column constant on
    train becomes 0 in both outputs."""
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"standardize needs (n, F) and (m, F) matrices, got {tuple(train.shape)}, {tuple(test.shape)}"
        )
    std, mean = torch.std_mean(train, dim=0, correction=0)
    constant = train.amin(0) == train.amax(0)
    inv = torch.where(constant, torch.zeros_like(std), 1.0 / std)
    return (train - mean).mul_(inv), (test - mean).mul_(inv)


def fit_logistic(
    train: torch.Tensor,
    labels: torch.Tensor,
    *,
    l2: float = 1e-3,
    tol: float = 1e-8,
    max_iter: int = 50,
    dtype: torch.dtype | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> LogisticFit:
    """Fit the penalised 1-D logistic regression of the module docstring on every column of `train` (n, F).

    labels: (n,) bools or 0/1 with both classes present.  dtype: precision of the elementwise passes
    (default: the features'); the stopping step is floored at 1000 eps of it (float32: 1.2e-4), below
    which its gradients are rounding noise, and the final applied Newton step then lands within that noise.
    """
    return _fit_logistic(train, labels, l2, tol, max_iter, dtype or train.dtype, chunk_elements)


def _fit_logistic(train, labels, l2, tol, max_iter, dtype, chunk_elements) -> LogisticFit:
    n, n_features = train.shape
    y = _check_labels(labels, n).to(train.device)
    order = torch.argsort((~y).to(torch.uint8), stable=True)  # positives first
    n_pos = int(y.sum())
    prior = n_pos / n
    f64 = dict(dtype=torch.float64, device=train.device)
    fit = _Fit(
        w=torch.zeros(n_features, **f64),
        b=torch.full((n_features,), math.log(prior / (1 - prior)), **f64),
        # a constant feature predicts the prior: its CE is the entropy of the prior
        train_ce=torch.full(
            (n_features,), -prior * math.log(prior) - (1 - prior) * math.log(1 - prior), **f64
        ),
        n_iter=torch.zeros(n_features, dtype=torch.int64, device=train.device),
        converged=torch.ones(n_features, dtype=torch.bool, device=train.device),
    )
    width = max(1, min(n_features, chunk_elements // n))
    tol = max(tol, 1000 * torch.finfo(dtype).eps)
    working = _WorkingSet(n, n_pos, l2, tol, max_iter, fit, capacity=2 * width, dtype=dtype)
    for start in range(0, n_features, width):
        chunk = train[:, start : start + width]
        low, high = chunk.amin(0), chunk.amax(0)  # NaN propagates into both, and inf - inf is NaN
        if not bool(torch.isfinite(high - low).all()):
            raise ValueError("fit_logistic: features contain NaN or inf")
        varies = torch.nonzero(low != high).squeeze(1)
        if len(varies):
            cols = chunk.index_select(1, varies) if len(varies) < chunk.shape[1] else chunk
            max_abs = torch.maximum(low.abs(), high.abs())[varies].to(torch.float64)
            working.add(cols.to(dtype).index_select(0, order).T, varies + start, max_abs)
        while working.n_live > width:
            working.step()
    while working.n_live:
        working.step()
    working.release_finished()

    return LogisticFit(*fit)


def cross_entropy(
    features: torch.Tensor,
    labels: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Mean CE per column (float64) of p = sigmoid(w f + b) on `features` (m, F): the mean of
    softplus(-(2 y - 1)(w f + b)) over rows."""
    return _cross_entropy(features, labels, w, b, dtype or features.dtype, chunk_elements)


def _cross_entropy(features, labels, w, b, dtype, chunk_elements) -> torch.Tensor:
    m, n_features = features.shape
    y = _check_labels(labels, m, need_both=False).to(features.device)
    negsign = (1.0 - 2.0 * y.to(dtype)).unsqueeze(1)
    width = max(1, min(n_features, chunk_elements // max(m, 1)))
    out = torch.empty(n_features, dtype=torch.float64, device=features.device)
    buffer = torch.empty(m * width, dtype=dtype, device=features.device)
    for start in range(0, n_features, width):
        cols = slice(start, min(start + width, n_features))
        work = buffer[: m * (cols.stop - cols.start)].view(m, -1)
        torch.mul(features[:, cols], w[cols].to(dtype), out=work)
        work.add_(b[cols].to(dtype)).mul_(negsign)
        out[cols] = _softplus_mean(work)
    return out


def _softplus_mean(m: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean of softplus(m) = log(1 + e^m) along `dim`, float64; overwrites m.

    log1p(exp(m)) is exact where exp does not overflow; above m = 80 softplus(m) - m < 2e-35, so m is
    clipped there and the excess added back.
    """
    big = bool(m.max() > SOFTPLUS_CLIP)
    excess = (m - SOFTPLUS_CLIP).clamp_min_(0).sum(dim).double() if big else 0.0
    m.clamp_max_(SOFTPLUS_CLIP).exp_().log1p_()
    return (m.sum(dim).double() + excess) / m.shape[dim]


def _check_labels(labels: torch.Tensor, n: int, need_both: bool = True) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.shape != (n,):
        raise ValueError(f"labels have shape {tuple(y.shape)}, expected ({n},)")
    if y.dtype != torch.bool:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("labels must be booleans or 0/1")
        y = y == 1
    if need_both and not 0 < int(y.sum()) < n:
        raise ValueError("a logistic fit needs both classes in the train labels")
    return y


class _Fit(NamedTuple):
    w: torch.Tensor
    b: torch.Tensor
    train_ce: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


#: columns of the working set's float64 state matrix, one row per feature column being iterated
W, B, DW, DB, T, DECREMENT, MAX_ABS, N_ITER, ID = range(9)


class _WorkingSet:
    """The feature columns being iterated, feature-major: `x` (c, n) holds their signed features (the
    examples ordered positives first, positive ones negated: g_i in the module docstring), `state` (c, 9)
    float64 their parameters, Newton step, step length t, decrement a = d^T H d, max |f|, passes and id
    (columns named above), `live` and `done` (c,) bools.  `x` lives in one of two preallocated buffers of
    `capacity` rows: dropping finished rows copies the live ones into the other."""

    def __init__(self, n, n_pos, l2, tol, max_iter, fit: _Fit, capacity: int, dtype: torch.dtype):
        self.n_pos, self.l2, self.tol, self.max_iter, self.fit = n_pos, l2, tol, max_iter, fit
        device = fit.w.device
        self.buffers = [torch.empty(capacity * n, dtype=dtype, device=device) for _ in range(4)]
        self.negsign = torch.ones(n, dtype=dtype, device=device)
        self.negsign[:n_pos] = -1
        self.x = self.buffers[0][:0].view(0, n)
        self.state = torch.empty(0, 9, dtype=torch.float64, device=device)
        self.live = self.done = torch.empty(0, dtype=torch.bool, device=device)
        self.n_live = 0

    def _rows(self, buffer: int, rows: int) -> torch.Tensor:
        n = self.negsign.shape[0]
        return self.buffers[buffer][: rows * n].view(rows, n)

    def add(self, features: torch.Tensor, ids: torch.Tensor, max_abs: torch.Tensor):
        """Join new feature columns (k, n), examples ordered positives first, each starting from the exact
        Newton step taken at (0, logit(prior))."""
        self.release_finished()
        k, n = features.shape
        c = self.x.shape[0]
        x = self._rows(self._home(), c + k)
        signed = x[c:]
        signed.copy_(features)
        signed[:, : self.n_pos].neg_()
        self.x = x

        n_pos, l2, prior = self.n_pos, self.l2, self.n_pos / n
        s0 = prior * (1 - prior)
        sum_pos = -signed[:, :n_pos].sum(1).double()
        sum_f = signed[:, n_pos:].sum(1).double() + sum_pos
        sum_sq = torch.linalg.vecdot(signed, signed).double()
        grad_w = ((prior - 1) * sum_pos + prior * (sum_f - sum_pos)) / n
        zeros = torch.zeros_like(grad_w)
        dw, db = _newton_direction(grad_w, zeros, s0 * sum_sq / n + l2, s0 * sum_f / n, zeros + s0)
        state = torch.stack(
            [zeros, zeros + math.log(prior / (1 - prior)), dw, db, zeros + 1, -grad_w * dw, max_abs, zeros,
             ids.double()], 1,
        )  # fmt: skip
        live = torch.ones(k, dtype=torch.bool, device=x.device)
        self.state = torch.cat([self.state, state])
        self.live, self.done = torch.cat([self.live, live]), torch.cat([self.done, ~live])
        self.n_live += k

    def _home(self) -> int:
        """Which of the two x buffers holds x now."""
        return 0 if self.x.data_ptr() == self.buffers[0].data_ptr() or not len(self.x) else 1

    def release_finished(self) -> None:
        """Write finished columns (parameters, train CE, passes) into the result and drop them."""
        c = self.x.shape[0]
        if self.n_live == c:
            return
        gone = torch.nonzero(~self.live).squeeze(1)
        out = self.state.index_select(0, gone)
        ids, w, b = out[:, ID].long(), out[:, W], out[:, B]
        self.fit.w[ids], self.fit.b[ids], self.fit.n_iter[ids] = w, b, out[:, N_ITER].long()
        self.fit.converged[ids] = self.done[gone]
        m = torch.index_select(self.x, 0, gone, out=self._rows(2, len(gone)))  # wrong-class logits: w g -/+ b
        m.mul_(w.to(m.dtype)[:, None])
        m[:, : self.n_pos].sub_(b.to(m.dtype)[:, None])
        m[:, self.n_pos :].add_(b.to(m.dtype)[:, None])
        self.fit.train_ce[ids] = _softplus_mean(m, dim=1)

        keep = torch.nonzero(self.live).squeeze(1)
        self.x = torch.index_select(self.x, 0, keep, out=self._rows(1 - self._home(), len(keep)))
        self.state, self.live, self.done = self.state[keep], self.live[keep], self.done[keep]

    def step(self) -> None:
        """One pass over the data: test every live column's trial point and take its next Newton step."""
        st, live = self.state, self.live
        dw, db, t, decrement = st[:, DW], st[:, DB], st[:, T], st[:, DECREMENT]
        trial = st[:, W : B + 1] + t[:, None] * st[:, DW : DB + 1]
        gw, gb, hww, hwb, hbb = self._derivatives(trial[:, 0], trial[:, 1])
        st[:, N_ITER] += live
        slope = gw * dw + gb * db  # phi'(t)
        shift = t * (dw.abs() * st[:, MAX_ABS] + db.abs())  # the largest change of a logit along the step
        accept = ((slope <= 0) | (shift <= MAX_LOGIT_SHIFT)) & live
        secant = torch.nan_to_num(decrement / (decrement + slope), nan=0.1).clamp_(0.1, 0.5)
        new_t = torch.where(accept, 1.0, torch.where(live, t * secant, t))

        step = torch.stack(_newton_direction(gw, gb, hww, hwb, hbb), 1)
        converged = accept & (step.abs().amax(1) < self.tol)
        taken = accept[:, None]
        st[:, W : B + 1] = torch.where(taken, trial + converged[:, None] * step, st[:, W : B + 1])
        st[:, DECREMENT] = torch.where(accept, -(gw * step[:, 0] + gb * step[:, 1]), decrement)
        st[:, DW : DB + 1] = torch.where(taken, step, st[:, DW : DB + 1])
        st[:, T] = new_t
        self.done |= converged
        self.live = live & ~converged & (st[:, N_ITER] < self.max_iter)
        self.n_live = int(self.live.sum())
        if 2 * self.n_live <= self.x.shape[0]:
            self.release_finished()

    def _derivatives(self, w: torch.Tensor, b: torch.Tensor):
        """Gradient and Hessian entries (float64, per row of x) at (w, b)."""
        x, n_pos, negsign = self.x, self.n_pos, self.negsign
        c, n = x.shape
        q, tmp = self._rows(2, c), self._rows(3, c)
        bd = b.to(x.dtype)[:, None]
        torch.mul(x, w.to(x.dtype)[:, None], out=q)  # m = w g -/+ b
        q[:, :n_pos].sub_(bd)
        q[:, n_pos:].add_(bd)
        q.sigmoid_()
        sums = torch.empty(5, c, dtype=x.dtype, device=x.device)  # n times: gw - l2 w, gb, hbb, hwb, hww - l2
        torch.sum(torch.mul(q, x, out=tmp), 1, out=sums[0])
        torch.mv(q, negsign, out=sums[1])
        s = q.addcmul_(q, q, value=-1)  # s = q - q^2
        torch.sum(s, 1, out=sums[2])
        torch.mul(s, x, out=tmp)  # s g
        torch.mv(tmp, negsign, out=sums[3])
        torch.sum(tmp.mul_(x), 1, out=sums[4])
        gw, gb, hbb, hwb, hww = sums.double().div_(n)
        return gw + self.l2 * w, gb, hww + self.l2, hwb, hbb


def _newton_direction(gw, gb, hww, hwb, hbb):
    """-H^{-1} g for a batch of 2x2 systems; det >= l2 H_bb > 0 by Cauchy-Schwarz, floored against the
    underflow of H_bb when every example is saturated."""
    hbb = hbb.clamp_min(1e-300)
    det = (hww * hbb - hwb * hwb).clamp_min(1e-300)
    return -(hbb * gw - hwb * gb) / det, -(hww * gb - hwb * gw) / det
