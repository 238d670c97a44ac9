"""The subject model: a Hugging Face causal LM run up to a residual site and from it.

With `L` the site layer (0-indexed) and `x` the residual after decoder block `L`:

    x      = to_site(input_ids, L)          embeddings + blocks 0..L (blocks above and the head never run)
    h      = from_site(x, L)                blocks L+1.. + final norm, on a possibly edited x
    logits = logits(h)                      LM head (+ final logit softcapping)

`logits(from_site(to_site(ids, L), L))` equals the model's own forward logits, and editing `x` acts exactly
like a hook replacing block L's output in a full forward.  Batches are right-padded and need no attention
mask (the model is causal).  Call under `torch.inference_mode()`.
"""

from __future__ import annotations

import torch
from torch import nn

from saebench.model.families import Family, family_for

DOC_SEPARATOR = "<|endoftext|>"


class SubjectModel:
    """A causal LM, its tokenizer, and the two halves around a residual site.

    Attributes:
        name: the name it was loaded by (alias, folder or hub id).
        model_id: a stable identity for cache keys and result files (see `loading.model_id`).
        d_model, n_layers, vocab_size: residual width, number of decoder blocks, logit width.
        bos_id: the token put at position 0 of every window: the tokenizer's BOS where it adds one itself,
            else `<|endoftext|>` where the vocabulary has it (GPT-2, SmolLM2, Pythia), else its EOS.
        eos_id: the document separator: `<|endoftext|>` where the vocabulary has it, else the EOS token.
        hf_model, tokenizer: the wrapped transformers objects (eval mode, no parameter gradients).
    """

    def __init__(self, hf_model: nn.Module, tokenizer, name: str, model_id: str | None = None):
        self.hf_model = hf_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.model_id = model_id or name
        self.family: Family = family_for(hf_model)
        self.n_layers = len(self.family.blocks)
        self.d_model = int(hf_model.config.hidden_size)
        self.vocab_size = int(self.family.head.weight.shape[0])
        self.bos_id, self.eos_id = _special_ids(tokenizer, name)

    @classmethod
    def from_hf(
        cls,
        model: nn.Module,
        tokenizer,
        name: str,
        *,
        model_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> SubjectModel:
        """Wrap an in-memory transformers causal LM, moving it to `device` / `dtype` when given."""
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return cls(model, tokenizer, name, model_id)

    @property
    def device(self) -> torch.device:
        return self.family.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.head.weight.dtype

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for {self.name}: use 0..{self.n_layers - 1}")
        return layer

    def to_site(self, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual after block `layer` for token ids (B, T): (B, T, d_model)."""
        self._check_layer(layer)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be a 2-D integer tensor (batch, tokens), got {tuple(input_ids.shape)} "
                f"{input_ids.dtype}"
            )
        hidden = self.family.embed(input_ids.to(self.device, torch.long))
        return self.family.run_blocks(hidden, 0, layer + 1)

    def from_site(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """Final-normed hidden state (B, T, d_model) from the residual (B, T, d_model) after block `layer`."""
        self._check_layer(layer)
        if resid.ndim != 3 or resid.shape[-1] != self.d_model:
            raise ValueError(
                f"resid must have shape (batch, tokens, {self.d_model}) for {self.name}, "
                f"got {tuple(resid.shape)}"
            )
        hidden = self.family.run_blocks(resid.to(self.device, self.dtype), layer + 1, self.n_layers)
        return self.family.final_norm(hidden)

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size) from the final-normed hidden state."""
        return self.family.logits(final_hidden)

    def __repr__(self) -> str:
        return (
            f"SubjectModel({self.name!r}, {self.hf_model.config.model_type}, d_model={self.d_model}, "
            f"n_layers={self.n_layers}, vocab_size={self.vocab_size}, {self.device}, {self.dtype})"
        )


def _special_ids(tokenizer, name: str) -> tuple[int, int]:
    """(bos_id, eos_id) as documented on `SubjectModel`."""
    separator = tokenizer.get_vocab().get(DOC_SEPARATOR)
    probe = tokenizer("a")["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    eos_id = separator if separator is not None else tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id if adds_bos else (separator if separator is not None else eos_id)
    if bos_id is None or eos_id is None:
        raise ValueError(
            f"tokenizer of {name} has no BOS, EOS or {DOC_SEPARATOR} token; set its eos_token before loading"
        )
    return int(bos_id), int(eos_id)
