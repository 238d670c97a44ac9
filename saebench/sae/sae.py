"""The sparse autoencoder every checkpoint format is loaded into.

In SAE space (after the input normalisation, see `Normalization`):

    pre     = (u - b_pre) @ W_enc + b_enc
    z       = act(pre)      relu | topk: relu, then keep the k largest | jumprelu: pre * (pre > threshold)
                            gated: 1[pre > 0] * relu(exp(r_mag) * (pre - b_enc) + b_mag)
    u_hat   = z @ W_dec + b_dec

and in raw residual space  u = normalize(x),  x_hat = denormalize(u_hat, state), where `state` (an
`InputState`) is what the input's normalisation leaves behind per token.  `b_pre` is the vector the encoder
subtracts first (OpenAI's pre_bias, sparsify's b_dec, SAELens' b_dec when apply_b_dec_to_input); zero when
the library subtracts nothing.  Shapes: W_enc (d, n), W_dec (n, d).  A gated SAE's gate and magnitude paths
share W_enc: b_enc is the gate bias, and the magnitude path rescales the same projection by exp(r_mag) and
adds b_mag.

Latents travel as `SparseCodes` (indices, values) of shape (tokens, m): m = k for TopK, else the largest
number of active latents in the batch, padded with value 0.

Encode and decode, as openai/sparse_autoencoder's `encode -> (latents, info)`, `decode(latents, info)`: the
state a raw-space decode needs travels with the codes, so nothing downstream calls the normalisation.

    codes, state = sae.encode_codes(x, scratch)   raw x (tokens, d) -> Encoded(SparseCodes, InputState)
    x_hat = sae.decode_codes(codes, state)        raw x_hat (tokens, d); == forward(x) bit for bit
    u_hat = sae.decode_sparse(codes)              SAE-space u_hat, no normalisation
    rec = sae.reconstruct(x, scratch)             Reconstruction(u, u_hat, x_hat, codes, state)

Wide SAEs encode in latent chunks: at most `SCRATCH_ELEMENTS` pre-activations (tokens x latents) exist at
once, and the codes of each chunk are merged into the running result (TopK: the k largest of the running
top-k and the chunk's own top-k, which is the top-k over all latents; ReLU, JumpReLU, gated: the union of
each chunk's active latents).  SAEs of ordinary width (tokens x n_latents within the bound) take one chunk.

Codes may be edited before decoding (a latent zeroed, values rescaled), and a subset of tokens taken with
`select(rows)` on codes and state alike.  Decoding is differentiable in `codes.values` on a fixed support
(and in W_dec, b_dec).  `encode(x)`, `decode(z, x)` and `forward(x)` are the dense equivalents for
notebooks, on any leading shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .topk import row_topk

ACTIVATIONS = ("relu", "topk", "jumprelu", "gated")
#: most pre-activations (tokens x latents) one encode holds at once (128 MB in float32); wider SAEs encode
#: in latent chunks
SCRATCH_ELEMENTS = 1 << 25
NORMALIZATIONS = ("none", "constant", "token_norm", "layer_norm")


class SparseCodes(NamedTuple):
    """Active latents per token: `indices` (tokens, m) int64 and `values` (tokens, m); padding has value 0.

    An encode gives each row distinct indices; the padding that `cat` adds repeats index 0 (value 0).
    """

    indices: torch.Tensor
    values: torch.Tensor

    def l0(self) -> torch.Tensor:
        """Number of non-zero latents per token."""
        return (self.values != 0).sum(-1)

    def to_dense(self, n_latents: int) -> torch.Tensor:
        out = self.values.new_zeros(self.values.shape[0], n_latents)
        return out.scatter_add_(1, self.indices, self.values)

    def select(self, rows) -> SparseCodes:
        """The codes of a subset of tokens: `rows` is an index tensor, a boolean mask or a slice."""
        return SparseCodes(self.indices[rows], self.values[rows])

    def clone(self) -> SparseCodes:
        """A copy; made outside torch.inference_mode, it can enter autograd (see `SAE.decode_codes`)."""
        return SparseCodes(self.indices.clone(), self.values.clone())

    @classmethod
    def cat(cls, parts: Sequence[SparseCodes]) -> SparseCodes:
        """Codes of consecutive token batches joined, each padded (index 0, value 0) to the widest m."""
        width = max(p.indices.shape[1] for p in parts)
        return cls(
            torch.cat([F.pad(p.indices, (0, width - p.indices.shape[1])) for p in parts]),
            torch.cat([F.pad(p.values, (0, width - p.values.shape[1])) for p in parts]),
        )


class InputState(NamedTuple):
    """What undoing the input normalisation needs, per token: the second output of `Normalization.apply`.

    Each field is None or a (tokens, 1) tensor (`(..., 1)` for inputs of shape (..., d)):

      none, constant  all None: the undo needs nothing per token
      token_norm      factor = sqrt(d) / ||x||                    x_hat = u_hat / factor
      layer_norm      mean = mean_d(x), std = std_d(x) + eps      x_hat = u_hat * std + mean
                      (std = std_d(x) alone when the normalisation's undo_with_eps is False)

    It follows its tokens: `select(rows)` keeps a subset, `cat` joins batches, `to` moves or casts it.
    """

    #: layer_norm: the per-token mean that was subtracted
    mean: torch.Tensor | None = None
    #: layer_norm: the per-token multiplier the undo applies (std + eps, or std)
    std: torch.Tensor | None = None
    #: token_norm: the per-token factor sqrt(d) / ||x|| that u = x * factor applied
    factor: torch.Tensor | None = None

    def select(self, rows) -> InputState:
        """The state of a subset of tokens: `rows` is an index tensor, a boolean mask or a slice."""
        return InputState(*(None if t is None else t[rows] for t in self))

    def to(self, *args, **kwargs) -> InputState:
        """Every tensor moved or cast with `torch.Tensor.to(*args, **kwargs)`."""
        return InputState(*(None if t is None else t.to(*args, **kwargs) for t in self))

    def clone(self) -> InputState:
        """A copy; made outside torch.inference_mode, it can enter autograd (see `SAE.decode_codes`)."""
        return InputState(*(None if t is None else t.clone() for t in self))

    @classmethod
    def cat(cls, states: Sequence[InputState]) -> InputState:
        """States of consecutive token batches joined (all of one normalisation kind)."""
        if not states:
            return cls()
        fields = []
        for name, column in zip(cls._fields, zip(*states, strict=True), strict=True):
            if all(t is None for t in column):
                fields.append(None)
            elif any(t is None for t in column):
                raise ValueError(f"InputState.cat: field {name!r} is missing from some states")
            else:
                fields.append(torch.cat(column))
        return cls(*fields)


class Encoded(NamedTuple):
    """Raw residuals encoded: the codes and the state `SAE.decode_codes` needs to return to raw space."""

    codes: SparseCodes
    state: InputState

    def select(self, rows) -> Encoded:
        """Codes and state of a subset of tokens (index tensor, boolean mask or slice)."""
        return Encoded(self.codes.select(rows), self.state.select(rows))


class Reconstruction(NamedTuple):
    """One pass through the SAE (tokens, ...): the SAE-space pair, the raw reconstruction and the codes."""

    #: the SAE's input, normalize(x)
    u: torch.Tensor
    #: its reconstruction in SAE space
    u_hat: torch.Tensor
    #: the reconstruction in raw residual space, denormalize(u_hat, state)
    x_hat: torch.Tensor
    codes: SparseCodes
    #: what decodes edited codes back to raw space (`SAE.decode_codes(codes, state)`); None when the
    #: Reconstruction was built without it
    state: InputState | None = None

    @classmethod
    def cat(cls, parts: Sequence[Reconstruction]) -> Reconstruction:
        """Reconstructions of consecutive token batches joined; codes padded to the widest m."""
        states = [p.state for p in parts]
        return cls(
            torch.cat([p.u for p in parts]),
            torch.cat([p.u_hat for p in parts]),
            torch.cat([p.x_hat for p in parts]),
            SparseCodes.cat([p.codes for p in parts]),
            None if any(s is None for s in states) else InputState.cat(states),
        )


@dataclass
class Normalization:
    """How a library maps a raw residual x to the SAE's input u, undone on decode.

    kind:
      none        u = x                                           x_hat = u_hat
      constant    u = x * scale                                   x_hat = u_hat / scale
                  (SAELens expected_average_only_in)
      token_norm  u = x * sqrt(d) / ||x||                          x_hat = u_hat / factor
                  (SAELens constant_norm_rescale)
      layer_norm  u = (x - mean_d(x)) / (std_d(x) + eps)           x_hat = u_hat * std + mean
                  (OpenAI TopK, SAELens layer_norm)

    The per-token quantities the undo needs travel as an `InputState`.
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

    def apply(self, x: torch.Tensor) -> tuple[torch.Tensor, InputState]:
        """u = normalize(x) for x (..., d), and the per-token state that `undo` needs."""
        if self.kind == "none":
            return x, InputState()
        if self.kind == "constant":
            return x * self.scale, InputState()
        if self.kind == "token_norm":
            factor = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * factor, InputState(factor=factor)
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        std = centred.std(-1, keepdim=True, unbiased=self.unbiased)
        return centred / (std + self.eps), InputState(mean, std + self.eps if self.undo_with_eps else std)

    def undo(self, u: torch.Tensor, state: InputState) -> torch.Tensor:
        """x = denormalize(u) for u (..., d), with the state `apply` returned for the same tokens."""
        if self.kind == "none":
            return u
        if self.kind == "constant":
            return u / self.scale
        per_token = state.factor if self.kind == "token_norm" else state.std
        if per_token is None or per_token.shape[:-1] != u.shape[:-1]:
            got = "no state" if per_token is None else f"a state of shape {tuple(per_token.shape)}"
            raise ValueError(
                f"undoing {self.kind} on u of shape {tuple(u.shape)} needs the InputState of the same "
                f"tokens; got {got}"
            )
        if self.kind == "token_norm":
            return u / state.factor
        return u * state.std + state.mean

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


def _active(pre: torch.Tensor, floor) -> tuple[torch.Tensor, torch.Tensor]:
    """The m = most active entries per row of `pre` (tokens, width) above `floor`, m the largest count in
    any row (at least 1): (values, indices), inactive ones -inf.  Overwrites `pre`."""
    # inactive entries become -inf in place; the m most active per token are then the top-m
    pre.masked_fill_(pre <= floor, -torch.inf)
    m = max(int(torch.isfinite(pre).sum(-1).max()), 1) if pre.shape[0] else 1
    return pre.topk(m, dim=-1, sorted=False)


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

    def latent_chunk(self, tokens: int) -> int:
        """Latents encoded at once for `tokens` tokens: all of them when tokens x n_latents is within
        `SCRATCH_ELEMENTS`, else as many as fit (at least one)."""
        return max(1, min(self.n_latents, SCRATCH_ELEMENTS // max(tokens, 1)))

    def scratch(self, tokens: int, latent_chunk: int | None = None) -> torch.Tensor:
        """A reusable (tokens x chunk) buffer for `encode_sparse`, chunk = `latent_chunk(tokens)` unless
        given: fresh large allocations are slow."""
        width = min(self.n_latents, latent_chunk or self.latent_chunk(tokens))
        return torch.empty(tokens, width, dtype=self.W_enc.dtype, device=self.W_enc.device)

    def encode_sparse(
        self, u: torch.Tensor, scratch: torch.Tensor | None = None, latent_chunk: int | None = None
    ) -> SparseCodes:
        """Latents of SAE-space inputs u (tokens, d) as (indices, values).

        `scratch` (from `self.scratch(at least tokens)`) receives the dense pre-activations, which are
        overwritten; the returned codes do not alias it.  Latents are encoded `latent_chunk` at a time
        (default: the scratch's width, else `self.latent_chunk(tokens)`); every chunking gives the same
        codes up to the order of each token's entries.
        """
        tokens, n = u.shape[0], self.n_latents
        if scratch is not None and (scratch.shape[0] < tokens or not scratch.is_contiguous()):
            scratch = None
        width = latent_chunk or (scratch.shape[1] if scratch is not None else self.latent_chunk(tokens))
        if width >= n:
            fits = scratch is not None and scratch.shape[1] == n
            return self._encode_all(u, scratch[:tokens] if fits else None)
        return self._encode_chunked(u, width, scratch)

    def _encode_all(self, u: torch.Tensor, out: torch.Tensor | None) -> SparseCodes:
        """Every latent at once (`out`: a (tokens, n_latents) buffer or None)."""
        pre = self.pre_activations(u, out)
        if self.activation == "topk":
            values, indices = row_topk(pre, self.k)
            return SparseCodes(indices, values.clamp_min(0))
        return self._finish(*_active(pre, self._floor(slice(None))))

    def _encode_chunked(self, u: torch.Tensor, width: int, scratch: torch.Tensor | None) -> SparseCodes:
        """Latents [a, a + width) at a time; TopK keeps a running top-k, the others collect active sets."""
        tokens, n, topk = u.shape[0], self.n_latents, self.activation == "topk"
        flat = None if scratch is None or scratch.numel() < tokens * width else scratch.view(-1)
        centred = u - self.b_pre
        values, indices = [], []
        for a in range(0, n, width):
            latents = slice(a, min(a + width, n))
            size = latents.stop - a
            # a contiguous view of the buffer, which addmm writes into without a copy
            out = None if flat is None else flat[: tokens * size].view(tokens, size)
            pre = torch.addmm(self.b_enc[latents], centred, self.W_enc[:, latents], out=out)
            if topk:
                v, i = row_topk(pre, min(self.k, size))
            else:
                v, i = _active(pre, self._floor(latents))
            values.append(v)
            indices.append(i + a)
            if topk and sum(v.shape[1] for v in values) > self.k:
                v, where = torch.cat(values, 1).topk(self.k, dim=-1, sorted=False)
                values, indices = [v], [torch.cat(indices, 1).gather(1, where)]
        values, indices = torch.cat(values, 1), torch.cat(indices, 1)
        if topk:
            return SparseCodes(indices, values.clamp_min(0))
        # each chunk padded its tokens to its own widest count: keep the m most active per token overall
        values, where = _active(values, -torch.inf)
        return self._finish(values, indices.gather(1, where))

    def _floor(self, latents: slice):
        """What a pre-activation must exceed to be active (ReLU, gated: 0; JumpReLU: its threshold)."""
        return self.threshold[latents].clamp_min(0) if self.activation == "jumprelu" else 0.0

    def _finish(self, values: torch.Tensor, indices: torch.Tensor) -> SparseCodes:
        """Codes from the active pre-activations (inactive entries -inf): gated rescales them."""
        active = torch.isfinite(values)
        if self.activation == "gated":
            x_enc = values - self.b_enc[indices]
            values = torch.relu(x_enc * self.r_mag[indices].exp() + self.b_mag[indices])
        return SparseCodes(indices, torch.where(active, values, torch.zeros_like(values)))

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        """SAE-space reconstruction u_hat from (indices, values), touching only the active decoder rows.

        Differentiable in `codes.values` (embedding_bag's per_sample_weights has a backward in mode "sum";
        tests/sae/test_codes.py gradchecks it in float64), W_dec and b_dec.
        """
        u_hat = F.embedding_bag(codes.indices, self.W_dec, per_sample_weights=codes.values, mode="sum")
        return u_hat + self.b_dec

    def encode_codes(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> Encoded:
        """Raw residuals x (tokens, d) -> codes and the state that decodes them back to raw space.

        `scratch` as for `encode_sparse`.
        """
        u, state = self.normalization.apply(x)
        return Encoded(self.encode_sparse(u, scratch), state)

    def decode_codes(self, codes: SparseCodes, state: InputState) -> torch.Tensor:
        """Raw reconstruction x_hat (tokens, d) of codes (edited or not), with the `state` of their tokens.

        Differentiable in `codes.values` on a fixed support.  Codes and states made under
        torch.inference_mode (as `reconstruct` is run by the evaluation loop) cannot enter a graph, not even
        one that only the SAE's parameters start: decode them under no_grad / inference_mode, or `clone()`
        both (or cast them with `.to(dtype)`, which copies) outside it first.
        """
        return self.normalization.undo(self.decode_sparse(codes), state)

    def reconstruct(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> Reconstruction:
        """Raw residuals x (tokens, d) through the SAE, keeping the SAE-space pair and the state."""
        u, state = self.normalization.apply(x)
        codes = self.encode_sparse(u, scratch)
        u_hat = self.decode_sparse(codes)
        return Reconstruction(u, u_hat, self.normalization.undo(u_hat, state), codes, state)

    # --- dense API for notebooks (raw residual space) -------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents (..., n) of raw residuals x (..., d)."""
        shape = x.shape[:-1]
        codes = self.encode_codes(x.reshape(-1, self.d_in)).codes
        return codes.to_dense(self.n_latents).reshape(*shape, self.n_latents)

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
            state = InputState()
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
