"""The tiny in-process models and byte tokenizer that other tests build on."""

import pytest
import torch

from saebench.model.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


def test_byte_tokenizer_round_trips_any_text_one_token_per_byte():
    tokenizer = tiny_tokenizer()
    text = "Hello, wörld!\n\tÇa va? 東京"
    ids = tokenizer(text)["input_ids"]
    assert ids == [b + 1 for b in text.encode()]
    assert tokenizer.decode(ids) == text
    assert tokenizer("a<|endoftext|>b")["input_ids"] == [ord("a") + 1, 0, ord("b") + 1]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)) == (0, 0, 257)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_shape_and_special_ids(family):
    subject = tiny_model(family)
    assert (subject.d_model, subject.n_layers, subject.vocab_size) == (64, 4, 257)
    assert (subject.bos_id, subject.eos_id) == (0, 0)
    assert subject.device == torch.device("cpu") and subject.dtype == torch.float32
    assert not subject.hf_model.training
    assert subject.model_id == f"tiny-{family}-seed0"


def test_seed_fixes_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = tiny_model(seed=7), tiny_model(seed=7), tiny_model(seed=8)
    assert torch.equal(torch.rand(3), expected)
    weight = lambda s: s.family.blocks[0].mlp.up_proj.weight  # noqa: E731
    assert torch.equal(weight(a), weight(b))
    assert not torch.equal(weight(a), weight(c))


def test_overrides_reach_the_config():
    assert tiny_model("llama", num_hidden_layers=2).n_layers == 2
    assert tiny_model("gpt2", n_layer=3, n_embd=32).d_model == 32


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="unknown tiny model family 'bert'; choose one of llama"):
        tiny_model("bert")
