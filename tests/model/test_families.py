"""Every registered family splits exactly; unregistered ones fail with a clear message."""

import pytest
import torch
import transformers

from saebench.model.families import FAMILIES, UnsupportedModelError
from saebench.model.subject import SubjectModel
from saebench.model.tiny import TINY_FAMILIES, tiny_tokenizer

SIZES = {
    "vocab_size": 257,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
# Registered families that tiny_model does not build; each (config, attention) as the family allows.
OTHER_FAMILIES = {
    "mistral": (transformers.MistralConfig(**SIZES, sliding_window=6), "sdpa"),
    "qwen3": (transformers.Qwen3Config(**SIZES, head_dim=16), "sdpa"),
    "gemma": (transformers.GemmaConfig(**SIZES, head_dim=16), "sdpa"),
    "gemma2": (
        transformers.Gemma2Config(**SIZES, head_dim=16, sliding_window=6, final_logit_softcapping=5.0),
        "eager",
    ),
    "phi3": (transformers.Phi3Config(**SIZES), "eager"),
    "olmo2": (transformers.Olmo2Config(**SIZES), "sdpa"),
}


def test_every_registered_family_is_tested():
    tiny_types = {"gemma3": "gemma3_text"}
    covered = {tiny_types.get(f, f) for f in TINY_FAMILIES} | set(OTHER_FAMILIES)
    assert covered == set(FAMILIES)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
@torch.inference_mode()
def test_split_is_exact(family):
    config, attention = OTHER_FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    subject = SubjectModel.from_hf(model, tiny_tokenizer(), family)
    ids = torch.randint(0, 257, (2, 12))  # longer than the sliding windows
    full = model(input_ids=ids, use_cache=False).logits
    for layer in range(subject.n_layers):
        split = subject.logits(subject.from_site(subject.to_site(ids, layer), layer))
        torch.testing.assert_close(split, full, rtol=0, atol=0)


def test_unsupported_model_type_names_the_supported_ones():
    config = transformers.BloomConfig(vocab_size=257, hidden_size=32, n_layer=1, n_head=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match=r"no adapter for model type 'bloom'; supported: gemma, "):
        SubjectModel.from_hf(model, tiny_tokenizer(), "bloom")
