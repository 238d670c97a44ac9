"""Per-architecture adapters that run a Hugging Face causal LM in two halves around a residual site.

A full forward of every supported family is

    h_0     = embed(input_ids)                              token (+ position) embeddings
    h_{i+1} = block_i(h_i, **block_inputs(i))               masks and rotary tables, built from the shape
    logits  = head(final_norm(h_n))                         (+ final logit softcapping in some families)

and the residual after block L is h_{L+1}.  An adapter names the modules and builds `block_inputs` exactly
as the family's own `forward` does (transformers 5.x), so running blocks [0, L] and then [L+1, n) gives the
model's logits bit for bit.  To add a family: subclass `Family`, implement `embed` and `block_inputs`, set
`blocks` / `final_norm`, and register it in `FAMILIES` under its `config.model_type`.

Running on cached keys (`saebench.model.batched`): a family that sets `cache_kwarg` (the decoder layer's
keyword for a transformers `Cache`) and implements `suffix_inputs` can run query positions p (B, T) against
keys already in the cache plus the new ones, under an explicit mask over key positions (B, K).  Families
without it fall back to full reruns.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

BlockInputs = Callable[[int], dict]


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter in `FAMILIES`."""


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """Position ids 0..T-1 of a right-padded (B, T, d) batch, shape (1, T)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _mask(config, hidden: torch.Tensor, positions: torch.Tensor, sliding: bool = False):
    """The causal mask the family's forward would build with no padding mask and no cache.

    None under sdpa (attention is then causal by construction); a (B, 1, T, T) mask under eager attention,
    where passing None instead would silently make attention bidirectional.
    """
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)


class Family:
    """How to run one architecture block by block.  Subclasses set `blocks` and `final_norm`."""

    blocks: nn.ModuleList
    final_norm: nn.Module
    #: the decoder layers' keyword for a key/value `Cache` (transformers 5.x: `cache`; GPT-NeoX:
    #: `layer_past`); None where running on cached keys is not implemented for the family
    cache_kwarg: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.head = model.get_output_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Residual stream before block 0, (B, T, d)."""
        raise NotImplementedError

    def block_inputs(self, hidden: torch.Tensor) -> BlockInputs:
        """Keyword arguments of block i for a batch shaped like `hidden` (only shape, dtype, device count)."""
        raise NotImplementedError

    def run_blocks(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks start..stop-1 on `hidden` and return the residual after the last one."""
        inputs = self.block_inputs(hidden)
        for i in range(start, stop):
            out = self.blocks[i](hidden, **inputs(i))
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def run_blocks_with(
        self, hidden: torch.Tensor, start: int, stop: int, inputs: BlockInputs, **extra
    ) -> torch.Tensor:
        """`run_blocks` with given block inputs and extra keywords for every block (e.g. a cache)."""
        for i in range(start, stop):
            out = self.blocks[i](hidden, **inputs(i), **extra)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @property
    def reuses_keys(self) -> bool:
        """Whether `suffix_inputs` works here: a cache keyword and an attention that takes a 4-D mask."""
        return self.cache_kwarg is not None and self.config._attn_implementation in ("sdpa", "eager")

    def suffix_inputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor, key_valid: Tensor
    ) -> BlockInputs:
        """Block inputs for queries at `positions` (B, T) over cached + new keys at `key_positions` (B, K).

        The keys are those the cache returns after this step: the cached ones, then the T new ones; a query
        attends to key k where key_valid[b, k] and key_positions[b, k] <= its position (and within the
        sliding window on sliding layers).
        """
        raise NotImplementedError(f"{type(self).__name__} does not run on cached keys")

    def _suffix_mask(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        key_valid: Tensor,
        window: int | None = None,
    ) -> torch.Tensor:
        """The explicit (B, 1, T, K) mask: bool for sdpa (True = attend), additive 0 / dtype-min for eager."""
        q, k = positions[:, :, None], key_positions[:, None, :]
        allowed = key_valid[:, None, :] & (k <= q)
        if window is not None:
            allowed &= q - k < window
        allowed = allowed[:, None]
        if self.config._attn_implementation == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        return mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(final_hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class RotaryDecoder(Family):
    """Llama-style decoders: `model.model.{embed_tokens, layers, norm, rotary_emb}`, pre-norm blocks.

    Covers per-layer attention types (`config.layer_types`: full vs sliding-window layers, as in Gemma 2/3
    and Qwen 2/3) and per-type rotary tables (Gemma 3: local and global RoPE bases).  Gemma's embedding
    scale lives in its embedding module, so `embed_tokens(ids)` is already the scaled embedding.
    """

    cache_kwarg = "cache"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = model.model
        if getattr(self.config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"{self.config.model_type} model uses bidirectional attention; only causal LMs are supported"
            )
        self.embed_tokens = base.embed_tokens
        self.blocks = base.layers
        self.final_norm = base.norm
        self.rotary = base.rotary_emb
        self.rotary_by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.layer_types = getattr(self.config, "layer_types", None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def _layer_type(self, i: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[i]
        # Families without layer_types (Mistral, Phi-3) use one window for every layer when one is set.
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def block_inputs(self, hidden: torch.Tensor) -> BlockInputs:
        positions = _positions(hidden)
        types = sorted({self._layer_type(i) for i in range(len(self.blocks))})
        masks = {t: _mask(self.config, hidden, positions, sliding=t == "sliding_attention") for t in types}
        if self.rotary_by_type:
            rotary = {t: self.rotary(hidden, positions, t) for t in types}
        else:
            shared = self.rotary(hidden, position_ids=positions)
            rotary = dict.fromkeys(types, shared)

        def inputs(i: int) -> dict:
            t = self._layer_type(i)
            return {"attention_mask": masks[t], "position_embeddings": rotary[t], "position_ids": positions}

        return inputs

    def suffix_inputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor, key_valid: Tensor
    ) -> BlockInputs:
        types = sorted({self._layer_type(i) for i in range(len(self.blocks))})
        window = getattr(self.config, "sliding_window", None)
        masks = {
            t: self._suffix_mask(
                hidden, positions, key_positions, key_valid, window if t == "sliding_attention" else None
            )
            for t in types
        }
        if self.rotary_by_type:
            rotary = {t: self.rotary(hidden, positions, t) for t in types}
        else:
            rotary = dict.fromkeys(types, self.rotary(hidden, position_ids=positions))

        def inputs(i: int) -> dict:
            t = self._layer_type(i)
            return {"attention_mask": masks[t], "position_embeddings": rotary[t], "position_ids": positions}

        return inputs


class GPT2(Family):
    """GPT-2: learned position embeddings added to the token embeddings, `transformer.{wte, wpe, h, ln_f}`."""

    cache_kwarg = "cache"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = model.transformer
        self.wte, self.wpe, self.drop = base.wte, base.wpe, base.drop
        self.blocks = base.h
        self.final_norm = base.ln_f

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(positions))

    def block_inputs(self, hidden: torch.Tensor) -> BlockInputs:
        positions = _positions(hidden)
        inputs = {"attention_mask": _mask(self.config, hidden, positions), "position_ids": positions}
        return lambda i: inputs

    def suffix_inputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor, key_valid: Tensor
    ) -> BlockInputs:
        mask = self._suffix_mask(hidden, positions, key_positions, key_valid)
        inputs = {"attention_mask": mask, "position_ids": positions}
        return lambda i: inputs


class GPTNeoX(Family):
    """GPT-NeoX / Pythia: `gpt_neox.{embed_in, layers, final_layer_norm, rotary_emb}`, head `embed_out`."""

    cache_kwarg = "layer_past"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = model.gpt_neox
        self.embed_in, self.dropout = base.embed_in, base.emb_dropout
        self.blocks = base.layers
        self.final_norm = base.final_layer_norm
        self.rotary = base.rotary_emb

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed_in(input_ids))

    def block_inputs(self, hidden: torch.Tensor) -> BlockInputs:
        positions = _positions(hidden)
        inputs = {
            "attention_mask": _mask(self.config, hidden, positions),
            "position_ids": positions,
            "position_embeddings": self.rotary(hidden, position_ids=positions),
        }
        return lambda i: inputs

    def suffix_inputs(
        self, hidden: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor, key_valid: Tensor
    ) -> BlockInputs:
        inputs = {
            "attention_mask": self._suffix_mask(hidden, positions, key_positions, key_valid),
            "position_ids": positions,
            "position_embeddings": self.rotary(hidden, position_ids=positions),
        }
        return lambda i: inputs


FAMILIES: dict[str, type[Family]] = {
    "llama": RotaryDecoder,
    "mistral": RotaryDecoder,
    "qwen2": RotaryDecoder,
    "qwen3": RotaryDecoder,
    "gemma": RotaryDecoder,
    "gemma2": RotaryDecoder,
    "gemma3_text": RotaryDecoder,
    "olmo2": RotaryDecoder,
    "phi3": RotaryDecoder,
    "gpt2": GPT2,
    "gpt_neox": GPTNeoX,
}


def family_for(model: nn.Module) -> Family:
    """The adapter for `model`, chosen by `config.model_type`."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"no adapter for model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))} "
            "(add one in saebench/model/families.py)"
        )
    return FAMILIES[model_type](model)
