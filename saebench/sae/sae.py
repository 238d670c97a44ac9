"""The sparse autoencoder every checkpoint format is loaded into.

In SAE space (after the input normalisation, see `Normalization`):

    pre     = (u - b_pre) @ W_enc + b_enc
    z       = act(pre)      relu | topk: relu, then keep the k largest | jumprelu: pre * (pre > threshold)
                            gated: 1[pre > 0] * relu(exp(r_mag) * (pre - b_enc) + b_mag)
    u_hat   = z @ W_dec + b_dec

and in raw residual space  x_hat = denormalize(u_hat).  `b_pre` is the vector the encoder subtracts first
(OpenAI's pre_bias, sparsify's b_dec, SAELens' b_dec when apply_b_dec_to_input); zero when the library
subtracts nothing.  Shapes: W_enc (d, n), W_dec (n, d).  A gated SAE's gate and magnitude paths share W_enc:
b_enc is the gate bias, and the magnitude path rescales the same projection by exp(r_mag) and adds b_mag.

Latents travel as `SparseCodes` (indices, values) of shape (tokens, m): m = k for TopK, else the largest
number of active latents in the batch, padded with value 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "constant", "token_norm", "layer_norm")


class SparseCodes(NamedTuple):
    """Active latents per token: `indices` (tokens, m) int64 and `values` (tokens, m); padding has value 0."""

    indices: torch.Tensor
    values: torch.Tensor

    def l0(self) -> torch.Tensor:
        """Number of non-zero latents per token."""
        return (self.values != 0).sum(-1)

    def to_dense(self, n_latents: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], n_latents)
        return out.scatter_add_(1, self.indices, self.values)


class Reconstruction(NamedTuple):
    """One pass through the SAE: the input and its reconstruction in SAE space, the raw reconstruction."""

    u: torch.Tensor
    u_hat: torch.Tensor
    x_hat: torch.Tensor
    codes: SparseCodes


@dataclass
class Normalization:
    """How a library maps a raw residual x to the SAE's input u, undone on decode.

    kind:
      none        u = x
      constant    u = x * scale                                   (SAELens expected_average_only_in)
      token_norm  u = x * sqrt(d) / ||x||                          (SAELens constant_norm_rescale)
      layer_norm  u = (x - mean_d(x)) / (std_d(x) + eps)           (OpenAI TopK, SAELens layer_norm)
    """

    kind: str = "none"
    #: constant factor for kind == "constant"
    scale: float = 1.0
    #: added to the std for kind == "layer_norm"
    eps: float = 1e-5
    #: layer_norm divides by the unbiased (n - 1) std when True (OpenAI and SAELens use torch's default)
    unbiased: bool = True
    #: layer_norm's undo multiplies by std + eps (the exact inverse) when True, by std alone when False
    #: (what OpenAI's and SAELens' decoders do)
    undo_with_eps: bool = True

    def __post_init__(self):
        if self.kind not in NORMALIZATIONS:
            raise ValueError(f"unknown input normalisation {self.kind!r}; expected one of {NORMALIZATIONS}")

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Return u and the per-token state that `undo` needs."""
        if self.kind == "none":
            return x, ()
        if self.kind == "constant":
            return x * self.scale, ()
        if self.kind == "token_norm":
            factor = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * factor, (factor,)
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        std = centred.std(-1, keepdim=True, unbiased=self.unbiased)
        return centred / (std + self.eps), (mean, std + self.eps if self.undo_with_eps else std)

    def undo(self, u: torch.Tensor, state: tuple) -> torch.Tensor:
        if self.kind == "none":
            return u
        if self.kind == "constant":
            return u / self.scale
        if self.kind == "token_norm":
            return u / state[0]
        mean, std = state
        return u * std + mean

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "scale": self.scale,
            "eps": self.eps,
            "unbiased": self.unbiased,
            "undo_with_eps": self.undo_with_eps,
        }


@dataclass
class SAEInfo:
    """What a checkpoint says about itself, beyond its weights."""

    #: checkpoint format that produced it (saelens, sparsify, dictionary_learning, openai, native, builtin)
    format: str = "native"
    #: library architecture name as found (standard, topk, jumprelu, batchtopk, gated, ...)
    architecture: str = "relu"
    #: subject model id or alias the SAE was trained on, when known
    model_name: str | None = None
    #: site: the residual stream after decoder block `layer` (0-indexed), when known
    layer: int | None = None
    #: the site as the library names it (hook name, module path)
    site_name: str | None = None
    #: context length used in training, when known
    context_size: int | None = None
    #: where it was loaded from
    path: str | None = None
    #: anything else from the checkpoint's config, kept as found
    extra: dict = field(default_factory=dict)


class SAE(nn.Module):
    """A sparse autoencoder in raw residual space (see the module docstring for the equations)."""

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        activation: str = "relu",
        k: int | None = None,
        threshold: torch.Tensor | None = None,
        b_pre: torch.Tensor | None = None,
        r_mag: torch.Tensor | None = None,
        b_mag: torch.Tensor | None = None,
        normalization: Normalization | None = None,
        info: SAEInfo | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        d, n = W_enc.shape
        if activation == "topk" and (k is None or not 0 < k <= n):
            raise ValueError(f"TopK SAE needs 0 < k <= n_latents, got k={k}, n_latents={n}")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("JumpReLU SAE needs a threshold")
        if activation == "gated" and (r_mag is None or b_mag is None):
            raise ValueError("gated SAE needs the magnitude path's r_mag and b_mag")
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(b_dec)
        self.register_buffer("b_pre", torch.zeros(d, dtype=W_enc.dtype) if b_pre is None else b_pre)
        if threshold is not None:
            self.register_buffer("threshold", threshold.expand(n).clone())
        else:
            self.threshold = None
        if activation == "gated":
            self.register_buffer("r_mag", r_mag)
            self.register_buffer("b_mag", b_mag)
        else:
            self.r_mag = self.b_mag = None
        self.activation = activation
        self.k = k
        self.normalization = normalization or Normalization()
        self.info = info or SAEInfo(architecture=activation)

    # --- facts -----------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    @property
    def architecture(self) -> str:
        return self.info.architecture

    @property
    def metadata(self) -> SAEInfo:
        return self.info

    # --- sparse path (what metrics use) ------------------------------------------------------------------
    def pre_activations(self, u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # addmm adds the bias inside the matmul: one pass over the (tokens x n_latents) output, not two
        return torch.addmm(self.b_enc, u - self.b_pre, self.W_enc, out=out)

    def scratch(self, tokens: int) -> torch.Tensor:
        """A reusable (tokens x n_latents) buffer for `encode_sparse`: fresh large allocations are slow."""
        return torch.empty(tokens, self.n_latents, dtype=self.W_enc.dtype, device=self.W_enc.device)

    def encode_sparse(self, u: torch.Tensor, scratch: torch.Tensor | None = None) -> SparseCodes:
        """Latents of SAE-space inputs u (tokens, d) as (indices, values).

        `scratch` (from `self.scratch(at least tokens)`) receives the dense pre-activations, which are
        overwritten; the returned codes do not alias it.
        """
        out = scratch[: u.shape[0]] if scratch is not None and scratch.shape[0] >= u.shape[0] else None
        pre = self.pre_activations(u, out)
        if self.activation == "topk":
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return SparseCodes(indices, values.clamp_min(0))
        floor = self.threshold.clamp_min(0) if self.activation == "jumprelu" else 0.0
        # inactive entries become -inf in place; the m = most active per token are then the top-m
        pre.masked_fill_(pre <= floor, -torch.inf)
        m = max(int(torch.isfinite(pre).sum(-1).max()), 1) if pre.shape[0] else 1
        values, indices = pre.topk(m, dim=-1, sorted=False)
        active = torch.isfinite(values)
        if self.activation == "gated":
            x_enc = values - self.b_enc[indices]
            values = torch.relu(x_enc * self.r_mag[indices].exp() + self.b_mag[indices])
        return SparseCodes(indices, torch.where(active, values, torch.zeros_like(values)))

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        """SAE-space reconstruction u_hat from (indices, values), touching only the active decoder rows."""
        u_hat = F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=codes.values, mode="sum")
        return u_hat + self.b_dec

    def reconstruct(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> Reconstruction:
        """Raw residuals x (tokens, d) through the SAE, keeping the SAE-space pair for metrics."""
        u, state = self.normalization.apply(x)
        codes = self.encode_sparse(u, scratch)
        u_hat = self.decode_sparse(codes)
        return Reconstruction(u, u_hat, self.normalization.undo(u_hat, state), codes)

    # --- dense API for notebooks (raw residual space) -------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents (..., n) of raw residuals x (..., d)."""
        shape = x.shape[:-1]
        u, _ = self.normalization.apply(x.reshape(-1, self.d_in))
        return self.encode_sparse(u).to_dense(self.n_latents).reshape(*shape, self.n_latents)

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Raw reconstruction from dense latents z (..., n).

        Normalisations that depend on the token (layer_norm, token_norm) need the original input x to undo;
        `forward(x)` handles that for you.
        """
        shape = z.shape[:-1]
        u_hat = z.reshape(-1, self.n_latents) @ self.W_dec + self.b_dec
        if self.normalization.kind in ("layer_norm", "token_norm"):
            if x is None:
                raise ValueError(
                    f"decode() of an SAE with {self.normalization.kind} input normalisation needs the input "
                    "x to undo it: call decode(z, x) or forward(x)"
                )
            _, state = self.normalization.apply(x.reshape(-1, self.d_in))
        else:
            state = ()
        return self.normalization.undo(u_hat, state).reshape(*shape, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw reconstruction x_hat of raw residuals x (..., d)."""
        shape = x.shape
        return self.reconstruct(x.reshape(-1, self.d_in)).x_hat.reshape(shape)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return (
            f"d_in={self.d_in}, n_latents={self.n_latents}, activation={self.activation}{k}, "
            f"normalization={self.normalization.kind}, format={self.info.format}"
        )
