"""downstream: the LM with the SAE's reconstruction spliced in at the site (METRICS.md).

At every scored position (all but 0 and the BOS/EOS separators, see `Site.scored`) the residual after
block `layer` is replaced by x_hat; the model runs from the
site on; next-token prediction is scored on positions 1..ctx-2 (targets 2..ctx-1):

    delta_ce       = CE(spliced) - CE(clean)                                  (nats/token)
    kl             = mean_t KL(p_clean,t || p_spliced,t)                       (from log_softmax)
    loss_recovered = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))

Everything that does not depend on the SAE (the model below the site, the clean final hidden state, clean
and zero-ablated CE: `reference`) is computed once per site and cached; per SAE only the blocks above the
site run once, with one LM head pass (the KL's clean side is cached in compact form, see
`saebench.model.scoring`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.context import EvalContext, Reconstructions
from saebench.metrics.registry import Metric, MetricResult, Plot, register
from saebench.metrics.stats import ratio_estimate
from saebench.model.batched import run_from_site
from saebench.model.scoring import (
    ce_and_kl,
    ce_and_kl_linear,
    clean_reference,
    has_linear_head,
    next_token_ce,
)
from saebench.sae.sae import SAE

#: positions whose next token is scored: 1..ctx-2 (targets 2..ctx-1)
INNER = slice(1, -1)


@dataclass
class DownstreamParams:
    """No parameters beyond the evaluation set's (positions scored: 1..ctx-2)."""


class Reference(NamedTuple):
    """What downstream compares against, for positions 1..ctx-2 (targets 2..ctx-1); SAE-independent.

    ce_clean, ce_zero: per-position CE (n_windows, ctx - 2), clean and with the site's residual zeroed at
    the scored positions.  For the KL, the clean distribution in compact form (`saebench.model.scoring`):
    with a linear head unembed_mean = W^T p (n_windows, ctx - 2, d) and clean_term (n_windows, ctx - 2);
    otherwise the clean final hidden state `final`, whose image under the head is the clean logits.
    """

    ce_clean: np.ndarray
    ce_zero: np.ndarray
    unembed_mean: np.ndarray | None = None
    clean_term: np.ndarray | None = None
    final: np.ndarray | None = None


def reference(context: EvalContext) -> Reference:
    """The clean and zero-ablated passes over the evaluation windows, computed once per site and cached."""
    windows, resid, mask, model, layer = (
        context.windows,
        context.resid,
        context.mask,
        context.model,
        context.layer,
    )
    linear = has_linear_head(model)
    names = ("ce_clean", "ce_zero", *(("unembed_mean", "clean_term") if linear else ("final",)))
    store = context.store(
        "eval-downstream", {"n_windows": len(windows), "exclude_special": context.config.exclude_special}
    )

    def produce(start: int, stop: int) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(windows[start:stop]).to(context.device)
        h = torch.from_numpy(np.array(resid[start:stop])).to(context.device, model.dtype)
        targets = ids[:, 2:]
        with torch.inference_mode():
            final = run_from_site(model, h, layer, positions=INNER)
            if linear:
                ce_clean, e, c = clean_reference(model, final, targets)
                out = {"unembed_mean": e.cpu().numpy(), "clean_term": c.cpu().numpy()}
            else:
                ce_clean = next_token_ce(model, final, targets)
                out = {"final": final.float().cpu().numpy()}
            zeroed = h.clone()
            zeroed[:, 1:][torch.from_numpy(mask[start:stop]).to(context.device)] = 0
            ce_zero = next_token_ce(
                model, run_from_site(model, h, layer, replacement=zeroed, positions=INNER), targets
            )
        return {**out, "ce_clean": ce_clean.double().cpu().numpy(), "ce_zero": ce_zero.double().cpu().numpy()}

    arrays = store.collect(
        names, len(windows), context.config.batch_size, produce, desc="clean and zero-ablated pass"
    )
    return Reference(**arrays)


def spliced_ce_kl(
    context: EvalContext,
    x_hat: Callable[[int, int], torch.Tensor],
    n_windows: int | None = None,
    *,
    start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per window, CE and KL(p_clean || p_spliced) summed over positions 1..ctx-2, with x_hat(a, b)
    (raw reconstructions of positions 1.. of windows [a, b)) spliced in at the scored positions.

    Over evaluation windows [start, n_windows) (all by default), against `reference(context)`; only the
    blocks above the site run, from the cached site residuals.
    """
    clean, model, layer = reference(context), context.model, context.layer
    n_windows, device = len(context.windows) if n_windows is None else n_windows, context.device
    b = context.config.batch_size
    batches = [(a, min(a + b, n_windows)) for a in range(start, n_windows, b)]
    ce_spliced, kl = np.zeros(n_windows - start), np.zeros(n_windows - start)
    for a, z in tqdm(batches, desc="downstream", leave=False, dynamic_ncols=True):
        ids = torch.from_numpy(context.windows[a:z]).to(device)
        h = torch.from_numpy(np.array(context.resid[a:z])).to(device, model.dtype)
        keep = torch.from_numpy(context.mask[a:z]).to(device)
        spliced = h.clone()
        spliced[:, 1:][keep] = x_hat(a, z).to(device, model.dtype)[keep]
        with torch.inference_mode():
            final = run_from_site(model, h, layer, replacement=spliced, positions=INNER)
            if clean.unembed_mean is not None:
                e = torch.from_numpy(np.array(clean.unembed_mean[a:z])).to(device)
                c = torch.from_numpy(np.array(clean.clean_term[a:z])).to(device)
                ce_tok, kl_tok = ce_and_kl_linear(model, final, ids[:, 2:], e, c)
            else:
                final_clean = torch.from_numpy(np.array(clean.final[a:z])).to(device, model.dtype)
                ce_tok, kl_tok = ce_and_kl(model, final, final_clean, ids[:, 2:])
        ce_spliced[a - start : z - start] = ce_tok.double().sum(1).cpu().numpy()
        kl[a - start : z - start] = kl_tok.double().sum(1).cpu().numpy()
    return ce_spliced, kl


class _Spliced:
    """Per-window CE and KL of one SAE's reconstruction spliced in, for the first `done` windows."""

    def __init__(self):
        self.ce, self.kl, self.done = np.zeros(0), np.zeros(0), 0


#: kept with the SAE's `Reconstructions` (so dropped by `context.forget(sae)`)
_spliced: weakref.WeakKeyDictionary[Reconstructions, _Spliced] = weakref.WeakKeyDictionary()


def reconstruction_ce_kl(
    context: EvalContext, sae: SAE, n_windows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`spliced_ce_kl` of the SAE's own reconstruction over the first `n_windows` windows, run once per SAE.

    Windows already run for this SAE (by downstream, or by another metric such as shrinkage) are reused and
    only the rest run: the encoder's spliced pass is one piece shared by every metric that needs it.
    """
    rec = context.reconstructions(sae)
    n_windows = len(context.windows) if n_windows is None else n_windows
    memo = _spliced.setdefault(rec, _Spliced())
    if memo.done < n_windows:
        ce, kl = spliced_ce_kl(context, rec.x_hat, n_windows, start=memo.done)
        memo.ce, memo.kl = np.concatenate([memo.ce, ce]), np.concatenate([memo.kl, kl])
        memo.done = n_windows
    return memo.ce[:n_windows].copy(), memo.kl[:n_windows].copy()


def compute(context: EvalContext, sae: SAE, params: DownstreamParams) -> MetricResult:
    clean, n_windows = reference(context), len(context.windows)
    ce_spliced, kl = reconstruction_ce_kl(context, sae)
    ce_clean = clean.ce_clean.sum(1)
    ce_zero = clean.ce_zero.sum(1)
    positions = np.full(n_windows, clean.ce_clean.shape[1], dtype=np.float64)
    seed = context.config.seed
    values = {
        "delta_ce": ratio_estimate(ce_spliced - ce_clean, positions, "windows", seed),
        "kl": ratio_estimate(kl, positions, "windows", seed),
        "loss_recovered": ratio_estimate(ce_zero - ce_spliced, ce_zero - ce_clean, "windows", seed),
        "ce_spliced": ratio_estimate(ce_spliced, positions, "windows", seed),
        "ce_clean": ratio_estimate(ce_clean, positions, "windows", seed),
        "ce_zero": ratio_estimate(ce_zero, positions, "windows", seed),
    }
    counts = {"positions": int(positions.sum()), "windows": n_windows, "spliced": int(context.mask.sum())}
    return MetricResult(values=values, counts=counts)


def prepare(context: EvalContext, params: DownstreamParams) -> None:
    """The clean and zero-ablated passes every checkpoint's spliced pass is compared with (`reference`)."""
    reference(context)


register(
    Metric(
        name="downstream",
        version=1,
        description="LM loss with the reconstruction spliced in (delta_ce, kl, loss_recovered)",
        compute=compute,
        params=DownstreamParams,
        prepare=prepare,
        headline=("delta_ce", "kl", "loss_recovered"),
        lower_is_better=frozenset({"delta_ce", "kl", "ce_spliced"}),
        plots=(
            Plot("delta_ce_vs_l0.png", "delta_ce", "delta CE (nats/token)"),
            Plot(
                "delta_ce_vs_nmse.png",
                "delta_ce",
                "delta_ce (nats)",
                kind="at_fixed_l0",
                log=True,
                against=("core", "nmse"),
                against_label="nmse",
            ),
        ),
    )
)
