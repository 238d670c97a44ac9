import numpy as np
import pytest
import torch

from saebench.metrics.downstream import DownstreamParams, reference
from saebench.metrics.downstream import compute as downstream
from tests.conftest import identity_sae, random_sae


def hooked_logits(model, ids, layer, replace):
    """Full HF forward with block `layer`'s output replaced by replace(h) at positions 1.. that are not
    BOS/EOS separators (token id 0 in the tiny tokenizer)."""
    block = model.family.blocks[layer]

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        keep = ids != 0
        keep[:, 0] = False
        h[keep] = replace(h)[keep]
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.hf_model(input_ids=ids, use_cache=False).logits.double()
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["llama", "gemma3-softcap", "gpt2"])
def test_downstream_matches_full_model_with_hook(make_context, family):
    from saebench.model.tiny import tiny_model

    if family == "llama":
        context = make_context()
    elif family == "gpt2":
        context = make_context(model=tiny_model("gpt2"))
    else:  # a softcapped head: the KL cannot use the linear-head shortcut
        context = make_context(model=tiny_model("gemma3", final_logit_softcapping=3.0))
        assert reference(context).final is not None
    model, layer = context.model, context.layer
    sae = random_sae(model.d_model, 128, k=8)
    result = downstream(context, sae, DownstreamParams())

    ids = torch.from_numpy(context.windows)
    clean = hooked_logits(model, ids, layer, lambda h: h)
    spliced = hooked_logits(model, ids, layer, lambda h: sae(h))
    zero = hooked_logits(model, ids, layer, torch.zeros_like)
    t = ids[:, 2:]

    def ce(logits):
        return -torch.log_softmax(logits[:, 1:-1], -1).gather(-1, t.unsqueeze(-1)).squeeze(-1).mean().item()

    lc, ls = torch.log_softmax(clean[:, 1:-1], -1), torch.log_softmax(spliced[:, 1:-1], -1)
    kl = (lc.exp() * (lc - ls)).sum(-1).mean().item()
    v = result.values
    assert v["ce_clean"].value == pytest.approx(ce(clean), abs=1e-5)
    assert v["ce_spliced"].value == pytest.approx(ce(spliced), abs=1e-5)
    assert v["ce_zero"].value == pytest.approx(ce(zero), abs=1e-5)
    assert v["delta_ce"].value == pytest.approx(ce(spliced) - ce(clean), abs=1e-5)
    assert v["kl"].value == pytest.approx(kl, abs=1e-5)
    expected_lr = (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean))
    assert v["loss_recovered"].value == pytest.approx(expected_lr, rel=1e-4)
    assert result.counts["positions"] == 12 * 14


def test_exact_reconstruction_changes_nothing(make_context):
    context = make_context()
    v = downstream(context, identity_sae(context.model.d_model), DownstreamParams()).values
    assert abs(v["delta_ce"].value) < 1e-5 and abs(v["kl"].value) < 1e-6
    assert v["loss_recovered"].value == pytest.approx(1.0, abs=1e-5)


def test_clean_pass_is_cached_once(make_context):
    context = make_context()
    first = np.array(reference(context).ce_clean)
    again = make_context()  # a new context over the same cache folder reads what the first one wrote
    key = {"n_windows": len(again.windows), "exclude_special": True}
    assert again.store("eval-downstream", key).has("unembed_mean", "clean_term", "ce_clean", "ce_zero")
    np.testing.assert_array_equal(np.array(reference(again).ce_clean), first)


def test_other_windows_get_their_own_clean_pass(make_context):
    first = make_context(n_tokens=4 * 15)
    later = make_context(n_tokens=4 * 15, eval_start=len(first.windows))  # e.g. the lr sweep's validation
    assert not np.array_equal(first.windows, later.windows)
    for context in (first, later):  # the other set's clean pass would give an exact reconstruction a KL
        v = downstream(context, identity_sae(context.model.d_model), DownstreamParams()).values
        assert abs(v["delta_ce"].value) < 1e-5 and abs(v["kl"].value) < 1e-6


def test_downstream_after_core_does_not_encode_again(make_context):
    from saebench.metrics.core import CoreParams
    from saebench.metrics.core import compute as core

    context = make_context()
    sae = random_sae(context.model.d_model, 64, k=4)
    calls = []
    original = sae.reconstruct
    sae.reconstruct = lambda *a, **k: calls.append(1) or original(*a, **k)
    core(context, sae, CoreParams())
    after_core = len(calls)
    assert after_core > 0
    downstream(context, sae, DownstreamParams())
    assert len(calls) == after_core
    context.forget(sae)
    downstream(context, sae, DownstreamParams())  # forgotten: encodes once more, same result
    assert len(calls) == 2 * after_core


def test_the_encoder_pass_is_one_piece_run_once_per_window(make_context, monkeypatch):
    from saebench.metrics import downstream as module

    context = make_context()
    sae = random_sae(context.model.d_model, 64, k=4)
    n = len(context.windows)
    original, ranges = module.spliced_ce_kl, []

    def spy(ctx, x_hat, n_windows=None, *, start=0):
        ranges.append((start, n_windows))
        return original(ctx, x_hat, n_windows, start=start)

    monkeypatch.setattr(module, "spliced_ce_kl", spy)
    first = module.reconstruction_ce_kl(context, sae, 3)  # e.g. shrinkage's windows
    whole = module.reconstruction_ce_kl(context, sae)  # downstream: only the rest runs
    fewer = module.reconstruction_ce_kl(context, sae, 4)
    downstream(context, sae, DownstreamParams())
    assert ranges == [(0, 3), (3, n)]
    want = original(context, context.reconstructions(sae).x_hat)
    for got, expected in zip(whole, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(first[0], whole[0][:3])
    np.testing.assert_array_equal(fewer[1], whole[1][:4])
    context.forget(sae)  # forgotten with the SAE's reconstructions
    module.reconstruction_ce_kl(context, sae, 2)
    assert ranges[-1] == (0, 2)
