"""The autoencoder being trained, in SAE space (inputs u already normalised per token):

    pre   = W_enc (u - b_pre) + b_enc                          W_enc (n, d): rows are encoder directions
    z     = relu(topk_k(pre))     TopK        |   relu(pre)    ReLU baseline
    u_hat = W_dec^T z + b_pre                                  W_dec (n, d): rows are unit-norm directions

Losses, with sums over the batch's tokens t (the paper's normalised MSE divides by the error of
predicting the batch mean):

    nmse(a, b) = sum_t ||a_t - b_t||^2 / sum_t ||b_t - mean_t b||^2
    TopK   loss = nmse(u_hat, u) + alpha * nmse(e_hat, e)  [+ nmse(u_hat_4k, u) / 8 with Multi-TopK]
           e = u - u_hat (no gradient), e_hat = W_dec^T relu(topk_kaux(pre over dead latents)), NaN -> 0
    ReLU   loss = nmse(u_hat, u) + lambda * sum_t ||z_t||_1 / (N rms),  rms^2 = sum_t ||u_t - mean u||^2 / N

Decoder rows are kept at unit norm: `project_decoder_grad` removes each row's gradient component along
the row (before the optimiser step) and `normalize_decoder` rescales the rows after it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..sae.sae import SAE, Normalization, SAEInfo, SparseCodes
from ..sae.topk import row_topk
from .config import TrainConfig
from .sparse_ops import latent_major, selected_preactivations, sparse_decode


class TrainOutput(NamedTuple):
    """One forward pass of a training batch."""

    codes: SparseCodes | None
    """TopK: the k selected latents per token (values after the relu); None for ReLU."""
    fired: torch.Tensor
    """bool (n,): latents active (z > 0) on at least one token."""
    l0: torch.Tensor
    """Mean number of active latents per token."""
    u_hat: torch.Tensor
    """Reconstruction in SAE space (tokens, d)."""
    nmse: torch.Tensor
    """nmse(u_hat, u), or this chunk's share of it when a batch total_variance was passed."""
    auxk_nmse: torch.Tensor
    """nmse(e_hat, e) over the top-k_aux dead latents; 0 when none is dead or AuxK is off."""
    multi_topk_nmse: torch.Tensor
    """nmse of the top-4k reconstruction with Multi-TopK, else 0."""
    l1: torch.Tensor
    """ReLU: sum_t ||z_t||_1 / (N rms); else 0."""
    loss: torch.Tensor
    """What the optimiser minimises."""


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """sum_t ||x_t - mean_t x||^2, nmse's denominator (as a norm: one vectorised pass over x - mean)."""
    return torch.linalg.vector_norm(x - x.mean(0)).square()


def nmse(prediction: torch.Tensor, target: torch.Tensor, total_variance: torch.Tensor | None = None):
    """sum ||prediction - target||^2 / sum ||target - mean(target)||^2 (the denominator may be given)."""
    if total_variance is None:
        total_variance = batch_variance(target)
    # mse_loss: one fused kernel forward and one backward (sub, pow and sum take three and three)
    return F.mse_loss(prediction, target, reduction="sum") / total_variance


class TrainableSAE(nn.Module):
    """See the module docstring for the equations."""

    def __init__(self, config: TrainConfig, d_in: int, *, n_latents: int | None = None):
        """n_latents: the latents this module holds, when it is one shard of config.n_latents
        (`distributed.ShardedSAE`)."""
        super().__init__()
        self.config = config
        device, dtype = torch.device(config.device), getattr(torch, config.dtype)
        n = config.n_latents if n_latents is None else n_latents
        self.W_enc = nn.Parameter(torch.zeros(n, d_in, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(n, d_in, device=device, dtype=dtype))
        self.b_pre = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.k_aux = config.effective_k_aux(d_in)
        self.auxk_alpha = config.effective_auxk_alpha()
        #: large work buffers reused from step to step (a fresh 64 MB tensor costs ~20 ms in page faults)
        self._scratch: dict[str, torch.Tensor] = {}
        #: last step's W_enc / W_dec gradients, for the sparse backward to compute this step's into
        self._gradient_pool: list[torch.Tensor] = []
        #: nmse's denominator for a batch; data-parallel training sums it over every rank's share
        self.variance = batch_variance

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused work tensor of `shape` (contents undefined), grown when too small."""
        size = math.prod(shape)
        buffer = self._scratch.get(name)
        stale = buffer is None or (buffer.dtype, buffer.device) != (like.dtype, like.device)
        if stale or buffer.numel() < size:
            buffer = self._scratch[name] = like.new_empty(size)
        return buffer[:size].view(shape)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[0]

    # --- initialisation and the unit-norm constraint -------------------------------------------------------
    @torch.no_grad()
    def initialize(self, b_pre: torch.Tensor, generator: torch.Generator) -> None:
        """Random unit-norm decoder rows; W_enc = W_dec (tied) or independent unit rows, times the encoder
        init scale; b_enc = 0."""
        self.W_dec.copy_(self._unit_rows(generator))
        if self.config.tied_init:
            self.W_enc.copy_(self.W_dec)
        else:
            self.W_enc.copy_(self._unit_rows(generator))
        self.W_enc.mul_(self.config.effective_encoder_init_scale(self.d_in))
        self.b_enc.zero_()
        self.b_pre.copy_(b_pre)

    def _unit_rows(self, generator: torch.Generator) -> torch.Tensor:
        """Random unit rows (float64) for W_dec or W_enc, drawn from `generator`."""
        rows = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float64)
        return rows / rows.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """grad_i <- grad_i - (grad_i . w_i) w_i for every (unit) decoder row w_i."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            # g -= (g * w).sum(1) w: the product in one reused (n, d) buffer, then one fused pass over g
            work = self._buffer("decoder_grad", tuple(g.shape), g)
            dots = torch.mul(g, w, out=work).sum(1, keepdim=True)
            g.addcmul_(dots, w, value=-1)

    def recycle_gradients(self) -> None:
        """Move W_enc.grad and W_dec.grad (set to None) into the pool the next sparse backward computes its
        weight gradients into; call it after the optimizer step, in place of zeroing them."""
        self._gradient_pool.clear()
        for weight in (self.W_enc, self.W_dec):
            if weight.grad is not None:
                self._gradient_pool.append(weight.grad)
                weight.grad = None

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))

    # --- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        u: torch.Tensor,
        *,
        dead: torch.Tensor | None = None,
        total_variance: torch.Tensor | None = None,
        n_tokens: int | None = None,
        l1_coefficient: float = 0.0,
    ) -> TrainOutput:
        """Loss on SAE-space inputs u (tokens, d).

        dead: bool (n,) latents AuxK may use.  total_variance / n_tokens: the whole batch's
        sum ||u_t - mean u||^2 and token count when u is one chunk of it (the chunks' losses then add up to
        the batch loss); TopK batches are not chunked here (only their dense pre-activations are).
        l1_coefficient: the ReLU loss's lambda for this step (the trainer applies its warm-up).
        """
        if total_variance is None:
            total_variance = batch_variance(u)
        if self.config.activation == "relu":
            return self._relu_forward(u, total_variance, n_tokens or u.shape[0], l1_coefficient)
        return self._topk_forward(u, dead, total_variance)

    def _relu_forward(self, u, total_variance, n_tokens, l1_coefficient) -> TrainOutput:
        z = F.relu(F.linear(u - self.b_pre, self.W_enc, self.b_enc))
        u_hat = z @ self.W_dec + self.b_pre
        recon = nmse(u_hat, u, total_variance)
        rms = (total_variance.detach() / n_tokens).sqrt()
        l1 = z.sum() / (n_tokens * rms)
        zero = recon.new_zeros(())
        with torch.no_grad():
            active = z > 0
            fired, l0 = active.any(0), active.sum(1, dtype=z.dtype).mean()
        return TrainOutput(None, fired, l0, u_hat, recon, zero, zero, l1, recon + l1_coefficient * l1)

    #: devices where the bias rides in the encoder matmul (see `_preactivation_chunks`, measured on CPU only);
    #: elsewhere addmm, which spares the folded copy of W_enc
    FOLDED_BIAS_DEVICES = ("cpu",)
    #: the folded matmul's inner dimension is padded to a multiple of this (aligned GEMM operands)
    FOLDED_ALIGN = 8

    @torch.no_grad()
    def _preactivation_chunks(self, u: torch.Tensor):
        """(start, stop, pre) for chunks of u's rows: pre = (u - b_pre) W_enc^T + b_enc on rows start:stop, in
        one reused buffer of at most config.chunk_elements entries (overwritten by the next chunk).

        On CPU the bias rides in the matmul as one more inner column, [u - b_pre, 1, 0...] @
        [W_enc, b_enc, 0...]^T (zero-padded to a multiple of FOLDED_ALIGN): addmm would first broadcast b_enc
        into its output, a pass over every (chunk x n) block that costs more here than the extra column and
        the per-step copy of W_enc (on (1024 x 576) @ (576 x 16384): 59 ms against addmm's 64; the copy
        ~2 ms a step at n = 16384).  The folded copy costs one more W_enc of memory, kept between steps."""
        n_tokens, d = u.shape
        chunk = max(1, min(n_tokens, self.config.chunk_elements // self.n_latents))
        buffer = self._buffer("preactivations", (chunk, self.n_latents), u)
        if u.device.type not in self.FOLDED_BIAS_DEVICES:
            centred = u - self.b_pre
            for start in range(0, n_tokens, chunk):
                stop = min(n_tokens, start + chunk)
                out = buffer[: stop - start]
                yield start, stop, torch.addmm(self.b_enc, centred[start:stop], self.W_enc.T, out=out)
            return
        width = -(-(d + 1) // self.FOLDED_ALIGN) * self.FOLDED_ALIGN
        inputs = self._buffer("folded_inputs", (n_tokens, width), u)
        torch.sub(u, self.b_pre, out=inputs[:, :d])
        inputs[:, d] = 1
        inputs[:, d + 1 :] = 0
        weights = self._buffer("folded_weights", (self.n_latents, width), u)
        weights[:, :d] = self.W_enc
        weights[:, d] = self.b_enc
        weights[:, d + 1 :] = 0
        for start in range(0, n_tokens, chunk):
            stop = min(n_tokens, start + chunk)
            yield start, stop, torch.mm(inputs[start:stop], weights.T, out=buffer[: stop - start])

    @torch.no_grad()
    def _select(self, u: torch.Tensor, dead: torch.Tensor | None, kk: int):
        """Top-kk latents per token and, over dead latents, top-k_aux; chunked so that at most
        config.chunk_elements dense pre-activations exist at once."""
        n_tokens = u.shape[0]
        dead_ids = None
        if dead is not None and self.auxk_alpha > 0 and bool(dead.any()):
            dead_ids = dead.nonzero().squeeze(1)
        k_aux = 0 if dead_ids is None else min(self.k_aux, dead_ids.numel())
        indices = torch.empty(n_tokens, kk, dtype=torch.int64, device=u.device)
        values = u.new_empty(n_tokens, kk)
        aux_indices = torch.empty(n_tokens, k_aux, dtype=torch.int64, device=u.device)
        aux_values = u.new_empty(n_tokens, k_aux)
        for start, stop, pre in self._preactivation_chunks(u):
            row_topk(pre, kk, out=(values[start:stop], indices[start:stop]))
            if k_aux:
                dead_buffer = self._buffer("dead_preactivations", (stop - start, dead_ids.numel()), u)
                dead_pre = torch.index_select(pre, 1, dead_ids, out=dead_buffer)
                top_values, top_positions = row_topk(dead_pre, k_aux)
                aux_values[start:stop] = top_values
                aux_indices[start:stop] = dead_ids[top_positions]
        return indices, values, (aux_indices, aux_values) if k_aux else None

    def _pattern(self, indices):
        """The selection grouped by latent, shared by its encoder and decoder backward (sparse only)."""
        return latent_major(indices, self.n_latents) if self.config.sparse_backward else None

    def _encode_selected(self, u, indices, values, pattern=None):
        """Differentiable pre-activations at the selected indices."""
        if self.config.sparse_backward:
            return selected_preactivations(
                u, self.b_pre, self.W_enc, self.b_enc, indices, values, pattern, self._gradient_pool
            )
        pre = F.linear(u - self.b_pre, self.W_enc, self.b_enc)
        return pre.gather(1, indices)

    def _decode(self, indices, z, pattern=None):
        """W_dec^T z without the bias."""
        if self.config.sparse_backward:
            return sparse_decode(indices, z, self.W_dec, pattern, self._gradient_pool)
        dense = z.new_zeros(z.shape[0], self.n_latents).scatter(1, indices, z)
        return dense @ self.W_dec

    def _topk_forward(self, u, dead, total_variance) -> TrainOutput:
        k = self.config.k
        kk = 4 * k if self.config.multi_topk else k
        indices, values, aux = self._select(u, dead, kk)
        pattern = self._pattern(indices)
        z = F.relu(self._encode_selected(u, indices, values, pattern))
        zero = total_variance.new_zeros(())
        multi = zero
        if self.config.multi_topk:
            u_hat_4k = self._decode(indices, z, pattern) + self.b_pre
            multi = nmse(u_hat_4k, u, total_variance)
            top = values.topk(k, dim=1, sorted=False).indices
            indices, z = indices.gather(1, top), z.gather(1, top)
            pattern = self._pattern(indices)
        u_hat = self._decode(indices, z, pattern) + self.b_pre
        recon = nmse(u_hat, u, total_variance)
        auxk = zero
        if aux is not None:
            aux_indices, aux_values = aux
            aux_pattern = self._pattern(aux_indices)
            aux_z = F.relu(self._encode_selected(u, aux_indices, aux_values, aux_pattern))
            error = (u - u_hat).detach()
            auxk = nmse(
                self._decode(aux_indices, aux_z, aux_pattern), error, self.variance(error)
            ).nan_to_num(0.0)
        loss = recon + self.auxk_alpha * auxk + multi / 8
        with torch.no_grad():
            active = z > 0
            fired = torch.zeros(self.n_latents, dtype=torch.bool, device=u.device)
            fired[indices[active]] = True
            l0 = active.sum(1, dtype=z.dtype).mean()
        codes = SparseCodes(indices, z.detach())
        return TrainOutput(codes, fired, l0, u_hat, recon, auxk, multi, zero, loss)

    # --- export ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def to_sae(self, normalization: Normalization, info: SAEInfo | None = None) -> SAE:
        """The internal SAE with these weights (b_dec = b_pre, the bias the encoder subtracts)."""
        info = info or SAEInfo()
        info.format = "native"
        info.architecture = self.config.activation
        return SAE(
            self.W_enc.detach().T.clone(),
            self.b_enc.detach().clone(),
            self.W_dec.detach().clone(),
            self.b_pre.detach().clone(),
            activation=self.config.activation,
            k=self.config.k if self.config.activation == "topk" else None,
            b_pre=self.b_pre.detach().clone(),
            normalization=normalization,
            info=info,
        )
