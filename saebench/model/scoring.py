"""Next-token loss from final hidden states, a chunk of positions at a time.

The LM head's logits are the largest tensors in an evaluation (positions x vocabulary, 49k or 262k wide):
they are made for `chunk` positions at a time and reduced in place, never kept.

For KL(p || q) between a clean distribution p = softmax(l_p) and a spliced one q = softmax(l_q):

    KL_t = sum_v p_v l_p,v - lse(l_p) - sum_v p_v l_q,v + lse(l_q)

When the head is linear (l = W h + b, no softcapping), sum_v p_v l_q,v = h_q . (W^T p) + p . b, so the
clean side reduces to a vector e = W^T p (d wide) and a scalar c = sum_v p_v l_p,v - lse(l_p) - p . b per
position, computed once:  KL_t = c_t - h_q . e_t + lse(l_q).  Per spliced run only one head pass is needed.
"""

from __future__ import annotations

import torch

CHUNK = 256


def has_linear_head(model) -> bool:
    return getattr(model.family, "softcap", None) is None


def _lse_and_target(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over the vocabulary and the target's logit; overwrites `logits` (no extra allocation)."""
    picked = logits.gather(1, targets[:, None])[:, 0]
    top = logits.amax(-1, keepdim=True)
    logits.sub_(top).exp_()
    return top[:, 0] + logits.sum(-1).log(), picked


def next_token_ce(model, final: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Cross-entropy (nats) per position of final hidden states (..., d) against targets (...)."""
    flat, t = final.reshape(-1, final.shape[-1]), targets.reshape(-1)
    out = torch.empty(t.shape, dtype=torch.float32, device=final.device)
    for i in range(0, len(t), chunk):
        lse, picked = _lse_and_target(model.logits(flat[i : i + chunk]).float(), t[i : i + chunk])
        out[i : i + chunk] = lse - picked
    return out.reshape(targets.shape)


def clean_reference(
    model, final: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a linear head: per position CE, e = W^T p (..., d) and c (...), see the module docstring."""
    head = model.family.head
    flat, t = final.reshape(-1, final.shape[-1]), targets.reshape(-1)
    ce = torch.empty(t.shape, dtype=torch.float64, device=final.device)
    c = torch.empty_like(ce)
    e = torch.empty(flat.shape, dtype=torch.float32, device=final.device)
    for i in range(0, len(t), chunk):
        logits = model.logits(flat[i : i + chunk]).float()
        p = torch.softmax(logits, -1)
        lse = logits.logsumexp(-1)
        ce[i : i + chunk] = (lse - logits.gather(1, t[i : i + chunk, None])[:, 0]).double()
        bias = p @ head.bias.float() if getattr(head, "bias", None) is not None else 0.0
        c[i : i + chunk] = (torch.linalg.vecdot(p, logits) - lse - bias).double()
        e[i : i + chunk] = p @ head.weight.float()
    shape = targets.shape
    return ce.reshape(shape), e.reshape(*shape, -1), c.reshape(shape)


def ce_and_kl_linear(
    model, final: torch.Tensor, targets: torch.Tensor, e: torch.Tensor, c: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position CE of `final` and KL(p_clean || q) from the clean side's (e, c); one head pass."""
    d = final.shape[-1]
    flat, t, e, c = final.reshape(-1, d), targets.reshape(-1), e.reshape(-1, d), c.reshape(-1)
    ce = torch.empty(t.shape, dtype=torch.float64, device=final.device)
    kl = torch.empty_like(ce)
    for i in range(0, len(t), chunk):
        h = flat[i : i + chunk]
        lse, picked = _lse_and_target(model.logits(h).float(), t[i : i + chunk])
        ce[i : i + chunk] = (lse - picked).double()
        kl[i : i + chunk] = c[i : i + chunk].double() - torch.linalg.vecdot(
            h.double(), e[i : i + chunk].double()
        )
        kl[i : i + chunk] += lse.double()
    return ce.reshape(targets.shape), kl.reshape(targets.shape)


def ce_and_kl(
    model, final: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any head: per position CE of `final` and KL(p_reference || p_final), two head passes."""
    d = final.shape[-1]
    flat_q, flat_p, t = final.reshape(-1, d), reference.reshape(-1, d), targets.reshape(-1)
    ce = torch.empty(t.shape, dtype=torch.float64, device=final.device)
    kl = torch.empty_like(ce)
    for i in range(0, len(t), chunk):
        lq = model.logits(flat_q[i : i + chunk]).float()
        lp = model.logits(flat_p[i : i + chunk]).float()
        lse_q, lse_p = lq.logsumexp(-1), lp.logsumexp(-1)
        ce[i : i + chunk] = (lse_q - lq.gather(1, t[i : i + chunk, None])[:, 0]).double()
        lq.sub_(lp)  # l_q - l_p
        lp.sub_(lse_p[:, None]).exp_()  # p
        kl[i : i + chunk] = (-torch.linalg.vecdot(lp, lq) - lse_p + lse_q).double()
    return ce.reshape(targets.shape), kl.reshape(targets.shape)
