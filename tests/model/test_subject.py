"""The two halves around the site reproduce the full forward, for every family and attention kind."""

import pytest
import torch

from saebench.model.tiny import TINY_FAMILIES, tiny_model

ATTENTION = ("sdpa", "eager")
CASES = [(family, attention) for family in TINY_FAMILIES for attention in ATTENTION]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def subject(request):
    family, attention = request.param
    return tiny_model(family, seed=1, attn_implementation=attention)


def _ids(subject, batch=3, tokens=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, subject.vocab_size, (batch, tokens), generator=generator)
    ids[:, 0] = subject.bos_id
    return ids


def _full_logits(subject, ids, replace_layer=None, replacement=None):
    """The model's own forward, optionally with a hook replacing block `replace_layer`'s output."""
    handle = None
    if replace_layer is not None:
        block = subject.family.blocks[replace_layer]
        handle = block.register_forward_hook(lambda module, args, out: replacement)
    try:
        return subject.hf_model(input_ids=ids, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()


@torch.inference_mode()
def test_split_reproduces_full_logits_at_every_layer(subject):
    ids = _ids(subject)
    full = _full_logits(subject, ids)
    assert full.shape == (3, 20, subject.vocab_size)
    for layer in range(subject.n_layers):
        split = subject.logits(subject.from_site(subject.to_site(ids, layer), layer))
        torch.testing.assert_close(split, full, rtol=0, atol=0)


@torch.inference_mode()
def test_to_site_equals_hidden_states(subject):
    ids = _ids(subject, seed=1)
    hidden = subject.hf_model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    # hidden_states[L + 1] is block L's output, except the last entry, which is final-normed.
    for layer in range(subject.n_layers - 1):
        torch.testing.assert_close(subject.to_site(ids, layer), hidden[layer + 1], rtol=0, atol=0)


@torch.inference_mode()
def test_edited_residual_acts_like_a_hook_in_the_full_forward(subject):
    ids = _ids(subject, seed=2)
    layer = 1
    resid = subject.to_site(ids, layer)
    generator = torch.Generator().manual_seed(3)
    edited = resid + resid.std() * torch.randn(resid.shape, generator=generator)
    edited[:, 0] = resid[:, 0]
    spliced = subject.logits(subject.from_site(edited, layer))
    hooked = _full_logits(subject, ids, replace_layer=layer, replacement=edited)
    torch.testing.assert_close(spliced, hooked, rtol=0, atol=0)
    assert (spliced - subject.logits(subject.from_site(resid, layer))).abs().max() > 1e-2


@torch.inference_mode()
def test_attention_is_causal_in_both_halves(subject):
    ids = _ids(subject, seed=4)
    later = ids.clone()
    later[:, 10:] = (later[:, 10:] + 7) % subject.vocab_size
    layer = 1
    site, site_later = subject.to_site(ids, layer), subject.to_site(later, layer)
    torch.testing.assert_close(site[:, :10], site_later[:, :10], rtol=0, atol=0)
    assert (site[:, 10:] - site_later[:, 10:]).abs().max() > 1e-3
    edited = site.clone()
    # A random direction: a constant shift would vanish in GPT-2's LayerNorms.
    edited[:, 15] += torch.randn(subject.d_model, generator=torch.Generator().manual_seed(5))
    before, after = subject.from_site(site, layer), subject.from_site(edited, layer)
    torch.testing.assert_close(before[:, :15], after[:, :15], rtol=0, atol=0)
    assert (before[:, 15:] - after[:, 15:]).abs().max() > 1e-4


def test_layer_and_shape_errors_say_what_to_fix():
    subject = tiny_model("llama")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"layer 4 is out of range .* use 0\.\.3"):
        subject.to_site(ids, 4)
    with pytest.raises(ValueError, match="2-D integer tensor"):
        subject.to_site(ids.float(), 0)
    with pytest.raises(ValueError, match=r"shape \(batch, tokens, 64\)"):
        subject.from_site(torch.zeros(1, 4, 32), 0)


def test_bf16_runs_and_tracks_fp32():
    fp32, bf16 = tiny_model("llama", seed=2), tiny_model("llama", seed=2, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    ids = _ids(fp32)
    with torch.inference_mode():
        low = bf16.logits(bf16.from_site(bf16.to_site(ids, 1), 1))
        high = fp32.logits(fp32.from_site(fp32.to_site(ids, 1), 1))
    assert low.dtype == torch.bfloat16
    assert (low.float() - high).abs().max() < 0.05 * high.abs().max()
