"""Tiny random subject models built in-process, for tests that run the whole pipeline in milliseconds.

The tokenizer is byte-level: id 0 is `<|endoftext|>` (BOS, EOS and document separator, as in SmolLM2)
and ids 1..256 are the 256 bytes, so any text tokenizes offline, one token per byte.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from saebench.model.subject import DOC_SEPARATOR, SubjectModel

TINY_VOCAB = 257


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: `<|endoftext|>` is id 0 and byte b is id b + 1."""
    vocab = {DOC_SEPARATOR: 0} | {ch: b + 1 for b, ch in enumerate(_byte_chars())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([DOC_SEPARATOR])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=DOC_SEPARATOR, eos_token=DOC_SEPARATOR, pad_token=DOC_SEPARATOR
    )


def _byte_chars() -> list[str]:
    """The printable character that byte-level pre-tokenization writes for each byte 0..255.

    Printable Latin-1 bytes stand for themselves; the others are moved, in order, to code points 256 and up.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), 256),
    ]
    moved = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(moved)) for b in range(256)]


def _configs(vocab: int) -> dict:
    """Small configs per family: hidden 64, 4 layers, 4 heads; grouped-query attention where possible."""
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    rotary = {
        **common,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    return {
        "llama": (LlamaConfig, {**rotary, "tie_word_embeddings": True}),
        "qwen2": (Qwen2Config, rotary),
        "gemma3": (
            Gemma3TextConfig,
            {
                **rotary,
                "head_dim": 16,
                "sliding_window": 8,
                # One global layer among local sliding-window ones, as in Gemma 3 (5 local : 1 global).
                "layer_types": [
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                    "sliding_attention",
                ],
                "final_logit_softcapping": 5.0,
            },
        ),
        "gpt2": (GPT2Config, {**common, "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 256}),
        "gpt_neox": (
            GPTNeoXConfig,
            {
                **common,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "max_position_embeddings": 256,
                "rotary_pct": 0.5,
            },
        ),
    }


TINY_FAMILIES = tuple(_configs(TINY_VOCAB))


def tiny_model(
    family: str = "llama",
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **overrides,
) -> SubjectModel:
    """A randomly initialised model of `family` (one of `TINY_FAMILIES`) with the tiny byte tokenizer.

    `overrides` replace config fields (e.g. `num_hidden_layers=2`); the same seed gives the same weights.
    The caller's global RNG state is left untouched.
    """
    configs = _configs(TINY_VOCAB)
    if family not in configs:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(configs)}")
    config_cls, kwargs = configs[family]
    config = config_cls(**{**kwargs, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    return SubjectModel.from_hf(
        model,
        tiny_tokenizer(),
        f"tiny-{family}",
        model_id=f"tiny-{family}-seed{seed}",
        device=device,
        dtype=dtype,
    )
