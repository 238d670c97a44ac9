"""One rank's share of a very wide SAE's latents, as evaluation under torchrun uses it.

Rank r of N holds latents [r n / N, (r + 1) n / N) of W_enc, b_enc, W_dec (and a JumpReLU threshold, a
gated magnitude path); b_pre, b_dec and the normalisation are replicated.  Per batch of tokens, on every rank
(training's latent-parallel scheme, `saebench.train.distributed`):

    candidates_r = rank r's codes of its own latents (TopK: its top-k, else its active latents), global ids
    codes        = TopK: the top-k of all_gather(candidates); else all of them   the same on every rank
    u_hat        = sum_r W_dec_r^T z_r + b_dec   (all_reduce)     z_r: the codes' entries rank r holds

so `encode_sparse`, `decode_sparse`, `reconstruct` (and `encode_codes`, `decode_codes`) give every rank the
codes and reconstructions one process computes with the whole SAE: the same non-zero latents and values
(each a dot product over d, computed alike), listed in another order per token, and u_hat up to float
rounding (the decoder's sum runs in another order).  A token with fewer than k positive pre-activations
may list other zero-valued latents than one process: nothing reads those (codes are used through their
non-zero entries).  Exact ties between pre-activations are broken by torch.topk here as in one process,
with no promise that the same latent wins.

Every rank must make the same calls in the same order (each is a collective).  `latents` is the range
this rank holds, for metrics that split work over latents (probes fit only their own).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from saebench.ranks import Group, gather_columns
from saebench.sae.sae import SAE, SparseCodes


def latent_range(n_latents: int, rank: int, world: int) -> slice:
    """Latents [rank n / world, (rank + 1) n / world): the shares differ by at most one latent."""
    return slice(rank * n_latents // world, (rank + 1) * n_latents // world)


def _slice(sae: SAE, latents: slice) -> SAE:
    def cut(t):
        return None if t is None else t[latents].clone()

    return SAE(
        sae.W_enc[:, latents].clone(),
        sae.b_enc[latents].clone(),
        sae.W_dec[latents].clone(),
        sae.b_dec.clone(),
        activation=sae.activation,
        k=None if sae.k is None else min(sae.k, latents.stop - latents.start),
        threshold=cut(sae.threshold),
        b_pre=sae.b_pre.clone(),
        r_mag=cut(sae.r_mag),
        b_mag=cut(sae.b_mag),
        normalization=sae.normalization,
        info=sae.info,
    )


class LatentShard(nn.Module):
    """This rank's latents of `sae` (see the module docstring); speaks the part of `SAE`'s interface that
    latent-sharded metrics use (`Metric.latent_sharded`), with the whole SAE's facts (n_latents, k, info)."""

    def __init__(self, sae: SAE, group: Group):
        super().__init__()
        if sae.n_latents < group.world:
            raise ValueError(f"{sae.n_latents} latents cannot be shared over {group.world} ranks")
        self.group = group
        self.latents = latent_range(sae.n_latents, group.rank, group.world)
        self.local = _slice(sae, self.latents)
        self.n_latents, self.d_in, self.k = sae.n_latents, sae.d_in, sae.k
        self.activation, self.normalization, self.info = sae.activation, sae.normalization, sae.info

    @property
    def W_enc(self) -> torch.Tensor:
        """This rank's columns of W_enc (what callers read its dtype and device from)."""
        return self.local.W_enc

    @property
    def architecture(self) -> str:
        return self.info.architecture

    def scratch(self, tokens: int, latent_chunk: int | None = None) -> torch.Tensor:
        return self.local.scratch(tokens, latent_chunk)

    def encode_sparse(
        self, u: torch.Tensor, scratch: torch.Tensor | None = None, latent_chunk: int | None = None
    ) -> SparseCodes:
        """The whole SAE's codes of u (tokens, d), from every rank's candidates (a collective)."""
        mine = self.local.encode_sparse(u, scratch, latent_chunk)
        indices, values = mine.indices + self.latents.start, mine.values
        width = torch.tensor([indices.shape[1]], device=u.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)  # shares of n % N + 1 latents, active counts: differ
        pad = int(width) - indices.shape[1]
        # padding is never chosen over a candidate by the top-k (-inf) and adds nothing elsewhere (0)
        fill = -torch.inf if self.activation == "topk" else 0.0
        indices, values = F.pad(indices, (0, pad)), F.pad(values, (0, pad), value=fill)
        indices, values = gather_columns(indices), gather_columns(values)
        if self.activation == "topk":
            values, top = values.topk(self.k, dim=-1, sorted=False)
            return SparseCodes(indices.gather(1, top), values.clamp_min(0))
        return SparseCodes(indices, values)

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        """SAE-space u_hat of the whole SAE's codes: each rank decodes the entries it holds, summed over ranks
        (a collective)."""
        local = codes.indices - self.latents.start
        held = (local >= 0) & (local < self.latents.stop - self.latents.start)
        weights = torch.where(held, codes.values, torch.zeros_like(codes.values))
        part = F.embedding_bag(local.where(held, 0), self.local.W_dec, per_sample_weights=weights, mode="sum")
        dist.all_reduce(part)
        return part + self.local.b_dec

    # the raw-space steps are SAE's own, around the two collectives above
    encode_codes = SAE.encode_codes
    decode_codes = SAE.decode_codes
    reconstruct = SAE.reconstruct

    def lowest(self, key: float, item):
        """Of every rank's (key, item), the item of the lowest key; on equal keys the lowest rank's (its
        latents come first, so a first-lowest rule over latents is kept).  A collective."""
        parts = self.group.gather("lowest over latent shards", (key, item))
        best = 0
        for r, (k, _) in enumerate(parts):
            if k < parts[best][0]:
                best = r
        return parts[best][1]
