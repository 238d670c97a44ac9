"""downstream: the LM with the SAE's reconstruction spliced in at the site (METRICS.md).

At every scored position (all but 0 and the BOS/EOS separators, see `EvalContext.mask`) the residual after
block `layer` is replaced by x_hat; the model runs from the
site on; next-token prediction is scored on positions 1..ctx-2 (targets 2..ctx-1):

    delta_ce       = CE(spliced) - CE(clean)                                  (nats/token)
    kl             = mean_t KL(p_clean,t || p_spliced,t)                       (from log_softmax)
    loss_recovered = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))

Everything that does not depend on the SAE (the model below the site, the clean final hidden state, clean
and zero-ablated CE) comes from the evaluation context's cache; per SAE only the blocks above the site run
once, with one LM head pass (the KL's clean side is cached in compact form, see `saebench.model.scoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.metrics.registry import Metric, MetricResult, register
from saebench.metrics.stats import ratio_estimate
from saebench.model.scoring import ce_and_kl, ce_and_kl_linear


@dataclass
class DownstreamParams:
    """No parameters beyond the evaluation set's (positions scored: 1..ctx-2)."""


def compute(ctx, sae, params: DownstreamParams) -> MetricResult:
    clean, model, layer = ctx.clean, ctx.model, ctx.layer
    n_windows = len(ctx.windows)
    ce_spliced, kl = np.zeros(n_windows), np.zeros(n_windows)
    batches = list(ctx.window_batches())
    for start, stop in tqdm(batches, desc="downstream", leave=False, dynamic_ncols=True):
        ids = torch.from_numpy(ctx.windows[start:stop]).to(ctx.device)
        h = torch.from_numpy(np.array(ctx.resid[start:stop])).to(ctx.device, model.dtype)
        keep = torch.from_numpy(ctx.mask[start:stop]).to(ctx.device)
        h[:, 1:][keep] = ctx.x_hat(sae, start, stop).to(model.dtype)[keep]
        with torch.inference_mode():
            final = model.from_site(h, layer)[:, 1:-1]
            if "unembed_mean" in clean:
                e = torch.from_numpy(np.array(clean["unembed_mean"][start:stop])).to(ctx.device)
                c = torch.from_numpy(np.array(clean["clean_term"][start:stop])).to(ctx.device)
                ce_tok, kl_tok = ce_and_kl_linear(model, final, ids[:, 2:], e, c)
            else:
                final_clean = torch.from_numpy(np.array(clean["final"][start:stop])).to(
                    ctx.device, model.dtype
                )
                ce_tok, kl_tok = ce_and_kl(model, final, final_clean, ids[:, 2:])
        ce_spliced[start:stop] = ce_tok.double().sum(1).cpu().numpy()
        kl[start:stop] = kl_tok.double().sum(1).cpu().numpy()

    ce_clean = clean["ce_clean"].sum(1)
    ce_zero = clean["ce_zero"].sum(1)
    positions = np.full(n_windows, clean["ce_clean"].shape[1], dtype=np.float64)
    seed = ctx.config.seed
    values = {
        "delta_ce": ratio_estimate(ce_spliced - ce_clean, positions, "windows", seed),
        "kl": ratio_estimate(kl, positions, "windows", seed),
        "loss_recovered": ratio_estimate(ce_zero - ce_spliced, ce_zero - ce_clean, "windows", seed),
        "ce_spliced": ratio_estimate(ce_spliced, positions, "windows", seed),
        "ce_clean": ratio_estimate(ce_clean, positions, "windows", seed),
        "ce_zero": ratio_estimate(ce_zero, positions, "windows", seed),
    }
    counts = {"positions": int(positions.sum()), "windows": n_windows, "spliced": int(ctx.mask.sum())}
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
    )
)
