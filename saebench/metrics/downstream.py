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

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.context import EvalContext
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
    context: EvalContext, x_hat: Callable[[int, int], torch.Tensor], n_windows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per window, CE and KL(p_clean || p_spliced) summed over positions 1..ctx-2, with x_hat(start, stop)
    (raw reconstructions of positions 1.. of windows [start, stop)) spliced in at the scored positions.

    Over the first `n_windows` evaluation windows (all by default), against `reference(context)`.
    """
    clean, model, layer = reference(context), context.model, context.layer
    n_windows, device = len(context.windows) if n_windows is None else n_windows, context.device
    ce_spliced, kl = np.zeros(n_windows), np.zeros(n_windows)
    batches = [(start, min(stop, n_windows)) for start, stop in context.window_batches() if start < n_windows]
    for start, stop in tqdm(batches, desc="downstream", leave=False, dynamic_ncols=True):
        ids = torch.from_numpy(context.windows[start:stop]).to(device)
        h = torch.from_numpy(np.array(context.resid[start:stop])).to(device, model.dtype)
        keep = torch.from_numpy(context.mask[start:stop]).to(device)
        spliced = h.clone()
        spliced[:, 1:][keep] = x_hat(start, stop).to(device, model.dtype)[keep]
        with torch.inference_mode():
            final = run_from_site(model, h, layer, replacement=spliced, positions=INNER)
            if clean.unembed_mean is not None:
                e = torch.from_numpy(np.array(clean.unembed_mean[start:stop])).to(device)
                c = torch.from_numpy(np.array(clean.clean_term[start:stop])).to(device)
                ce_tok, kl_tok = ce_and_kl_linear(model, final, ids[:, 2:], e, c)
            else:
                final_clean = torch.from_numpy(np.array(clean.final[start:stop])).to(device, model.dtype)
                ce_tok, kl_tok = ce_and_kl(model, final, final_clean, ids[:, 2:])
        ce_spliced[start:stop] = ce_tok.double().sum(1).cpu().numpy()
        kl[start:stop] = kl_tok.double().sum(1).cpu().numpy()
    return ce_spliced, kl


def compute(context: EvalContext, sae: SAE, params: DownstreamParams) -> MetricResult:
    clean, n_windows = reference(context), len(context.windows)
    ce_spliced, kl = spliced_ce_kl(context, context.reconstructions(sae).x_hat)
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


register(
    Metric(
        name="downstream",
        version=1,
        description="LM loss with the reconstruction spliced in (delta_ce, kl, loss_recovered)",
        compute=compute,
        params=DownstreamParams,
        headline=("delta_ce", "kl", "loss_recovered"),
        lower_is_better=frozenset({"delta_ce", "kl", "ce_spliced"}),
        plots=(Plot("delta_ce_vs_l0.png", "delta_ce", "delta CE (nats/token)"),),
    )
)
