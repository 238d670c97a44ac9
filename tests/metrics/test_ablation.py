import numpy as np
import pytest
import torch

from saebench.metrics.ablation import (
    LATENT,
    RANDOM,
    RESIDUAL,
    AblationParams,
    compute,
    contributions,
    effect_sparsity,
    effects,
    largest_active,
    plan,
    sample_positions,
    upper_cache,
)
from saebench.model.batched import median_centred_norms
from tests.conftest import random_sae

PARAMS = AblationParams(n_positions=6, n_future=8, max_latents=4, n_control=2)


def score_of(diff: torch.Tensor) -> float:
    """The metric's score of one logit difference (T, V), through the seam's reduction."""
    norms = median_centred_norms(diff)
    return float(effect_sparsity(norms["l1"], norms["l2"], diff.shape[1]))


def test_one_nonzero_logit_per_row_has_the_closed_form():
    T, V = 5, 257
    a = torch.tensor([2.0, -0.5, 1.0, 3.0, -1.5])
    diff = torch.zeros(T, V)
    diff[torch.arange(T), torch.tensor([3, 100, 7, 256, 0])] = a
    # every row's median is 0, so u is the rows themselves: (sum |a|)^2 / sum a^2 / (T V)
    want = float(a.double().abs().sum() ** 2 / a.double().square().sum() / (T * V))
    assert score_of(diff) == pytest.approx(want, rel=1e-12)
    assert score_of(torch.zeros(T, V).index_fill_(1, torch.tensor([9]), 1.0)) == pytest.approx(1 / V)
    flat = torch.cat([torch.ones(T, 128), -torch.ones(T, 128), torch.zeros(T, 1)], 1)  # median 0
    assert score_of(flat) == pytest.approx(256 / 257, rel=1e-12)  # equal magnitudes: the densest


def test_a_uniform_shift_of_each_row_scores_as_if_it_were_not_there():
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(4, 257, generator=g) * (torch.rand(4, 257, generator=g) < 0.05)
    shift = torch.tensor([[3.0], [-7.5], [0.25], [100.0]])
    assert score_of(diff + shift) == pytest.approx(score_of(diff), rel=1e-5)
    # a pure shift is no effect at all, as a zero difference: 0/0, left out of the means
    assert np.isnan(score_of(shift.expand(4, 257).clone()))
    assert np.isnan(score_of(torch.zeros(4, 257)))


@pytest.mark.parametrize("normalization", ["none", "layer_norm", "token_norm"])
@torch.inference_mode()
def test_contributions_are_exact_and_an_inactive_latent_contributes_nothing(normalization):
    d, n = 16, 64
    sae = random_sae(d, n, k=4, normalization=normalization, seed=1)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(2)) * 3
    encoded = sae.encode_codes(x)
    ids, acts = largest_active(encoded.codes, 3)
    assert (acts[:, :-1] >= acts[:, 1:]).all() and (ids >= 0).all()
    got = contributions(sae, encoded, ids)
    dense = encoded.codes.to_dense(n)
    for p in range(5):
        for s, j in enumerate(ids[p].tolist()):
            z = dense[p].clone()
            z[j] = 0
            want = sae.decode(dense[p : p + 1], x[p : p + 1]) - sae.decode(z[None], x[p : p + 1])
            torch.testing.assert_close(got[p, s], want[0], rtol=1e-4, atol=1e-5)
    inactive = torch.stack(
        [torch.tensor([j for j in range(n) if j not in set(row)][:3]) for row in ids.tolist()]
    )
    assert torch.equal(contributions(sae, encoded, inactive), torch.zeros(5, 3, d))
    assert torch.equal(contributions(sae, encoded, torch.full((5, 1), -1)), torch.zeros(5, 1, d))


def test_ablating_an_inactive_latent_changes_no_logit(make_context):
    context = make_context()
    sae = random_sae(context.model.d_model, 128, k=8)
    ablations = plan(context, sae, PARAMS)
    x = torch.from_numpy(np.array(context.resid[ablations.windows, ablations.starts]))
    with torch.inference_mode():
        encoded = sae.encode_codes(x)
        active = set(encoded.codes.indices.flatten().tolist())
        off = next(j for j in range(128) if j not in active)
        deltas = -contributions(sae, encoded, torch.full((len(x), 1), off))[:, 0]
    assert torch.equal(deltas, torch.zeros_like(deltas))
    norms = effects(context, ablations._replace(deltas=deltas), PARAMS, progress=False)
    active = effects(context, ablations, PARAMS, progress=False)
    # the suffix's rerun on cached keys matches the clean run to float rounding only
    assert norms["l2"].max() < 1e-5 and active["l2"].sum(-1).min() > 1e-2


def test_positions_are_scored_seeded_and_leave_room_for_the_future(make_context):
    context = make_context()
    windows, t = sample_positions(context.mask, 8, 40, 0)
    assert len(windows) == 40 and len(set(zip(windows, t, strict=True))) == 40
    assert t.min() >= 1 and t.max() <= context.config.ctx - 8
    assert context.mask[windows, t - 1].all()
    again = sample_positions(context.mask, 8, 40, 0)
    assert np.array_equal(windows, again[0]) and np.array_equal(t, again[1])
    with pytest.raises(ValueError, match="n_future"):
        sample_positions(context.mask, 16, 4, 0)


def test_controls_match_the_norm_of_an_ablation_at_their_position(make_context):
    context = make_context()
    sae = random_sae(context.model.d_model, 128, k=8)
    a = plan(context, sae, PARAMS)
    x = torch.from_numpy(np.array(context.resid[a.windows, a.starts]))
    norm = a.deltas.norm(dim=-1)
    with torch.inference_mode():
        l0 = sae.encode_codes(x).codes.l0()
    for p in range(a.n_positions):
        mine = a.position == p
        latent = mine & (a.kind == LATENT)
        first = int(torch.nonzero(mine)[0, 0])
        assert latent.sum() == min(4, int(l0[first]))  # at most the 4 largest ablated
        by_latent = dict(zip(a.latent[latent].tolist(), norm[latent].tolist(), strict=True))
        for b in torch.nonzero(mine & (a.kind != LATENT))[:, 0].tolist():
            assert norm[b].item() == pytest.approx(by_latent[int(a.latent[b])], rel=1e-5)
        for b in torch.nonzero(mine & (a.kind == RESIDUAL))[:, 0].tolist():
            c = int(a.channel[b])
            assert torch.count_nonzero(a.deltas[b]) == 1 and a.deltas[b, c] * x[b, c] <= 0
        assert (mine & (a.kind == RANDOM)).sum() == 2
    assert torch.equal(plan(context, sae, PARAMS).deltas, a.deltas)


def _hooked_diff(model, ids, layer, t, delta):
    """Logit differences (ctx, V) of one window with `delta` added to the site residual at t, from the full
    HF forward with a hook on block `layer`."""
    block = model.family.blocks[layer]
    edit = {"on": False}

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        if edit["on"]:
            h = h.clone()
            h[0, t] += delta.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            clean = model.hf_model(input_ids=ids[None], use_cache=False).logits[0].double()
            edit["on"] = True
            edited = model.hf_model(input_ids=ids[None], use_cache=False).logits[0].double()
    finally:
        handle.remove()
    return edited - clean


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_reuse_equals_a_full_rerun_and_the_hooked_model(make_context, family):
    from saebench.model.tiny import tiny_model

    context = make_context() if family == "llama" else make_context(model=tiny_model("gpt2"))
    sae = random_sae(context.model.d_model, 128, k=8)
    a = plan(context, sae, PARAMS)
    cache, _ = upper_cache(context, a.windows)
    assert cache.reuse
    reused = effects(context, a, PARAMS, progress=False)
    full = effects(context, a, PARAMS, reuse=False, progress=False)
    for key in ("median", "l1", "l2"):
        torch.testing.assert_close(reused[key], full[key], rtol=1e-4, atol=1e-5)
    T = PARAMS.n_future
    for b in range(0, len(a.windows), 7):
        w, t = int(a.windows[b]), int(a.starts[b])
        diff = _hooked_diff(
            context.model, torch.from_numpy(context.windows[w]), context.layer, t, a.deltas[b]
        )
        assert diff[:t].abs().max() == 0  # positions before t are untouched
        u = diff[t : t + T]
        u = u - u.median(-1, keepdim=True).values
        np.testing.assert_allclose(reused["l1"][b].numpy(), u.abs().sum(-1).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(reused["l2"][b].numpy(), u.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-4)
        want = float(u.abs().sum() ** 2 / u.square().sum() / u.numel())
        got = float(effect_sparsity(reused["l1"][b], reused["l2"][b], context.model.vocab_size))
        assert got == pytest.approx(want, rel=1e-4)


def test_compute_reports_each_value_beside_its_controls(make_context):
    context = make_context()
    sae = random_sae(context.model.d_model, 128, k=8)
    result = compute(context, sae, PARAMS)
    v, c = result.values, result.counts
    assert set(v) == {"ablation_sparsity", "ablation_sparsity_random", "ablation_sparsity_residual"}
    for est in v.values():
        assert 1 / (8 * context.model.vocab_size) <= est.lo <= est.value <= est.hi <= 1
        assert est.n == 6 and est.unit == "positions"
    assert 6 <= c["latent_ablations"] <= 24 and c["random_ablations"] == c["residual_ablations"] == 12
    assert c["ablations_without_effect"] == 0
    q = result.details["quantiles"]["latent"]
    assert q["0.05"] <= q["0.5"] <= q["0.95"]
    assert result.details["sparsest"][0]["sparsity"] <= result.details["densest"][0]["sparsity"]


def test_params_are_validated():
    with pytest.raises(ValueError, match="n_control"):
        AblationParams(n_control=0)


def test_explain_shows_the_top_positions_and_the_logits_the_ablation_moves(make_context):
    import argparse

    from saebench.explain import add_parser, explain_latent, format_explanation, latent_activations

    context = make_context()
    sae = random_sae(context.model.d_model, 128, k=8)
    x = torch.from_numpy(np.array(context.resid[:, 1:])).reshape(-1, context.model.d_model)
    with torch.inference_mode():
        fires = (sae.encode(x) > 0).sum(0)
    latent, never = int(fires.argmax()), int(torch.nonzero(fires == 0)[0, 0])
    expl = explain_latent(context, sae, latent, n_examples=3, top_tokens=4, n_future=8)
    assert len(expl.examples) == 3 and expl.active_positions >= 3
    a = [e.activation for e in expl.examples]
    assert a == sorted(a, reverse=True) and a[0] == pytest.approx(
        float(latent_activations(context, sae, latent).max())
    )
    e = expl.examples[0]
    assert context.mask[e.window, e.t - 1] and e.tokens[-1] == context.windows[e.window, e.t]
    # the next-token row: lowered most negative first, raised most positive first
    assert e.lowered[0][1] <= e.lowered[-1][1] < 0 < e.raised[-1][1] <= e.raised[0][1]
    assert 0 < e.sparsity <= 1
    text = format_explanation(expl, context.model.tokenizer, label="tiny")
    assert f"latent {latent} of tiny" in text and text.count("next token") == 3
    assert "never active" in format_explanation(explain_latent(context, sae, never), context.model.tokenizer)

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["explain", "--checkpoint", "builtin:pca-topk", "--latent", "5", "--latent", "7", "--examples", "2"]
    )
    assert (args.latent, args.examples, args.n_future, args.func.__name__) == ([5, 7], 2, 16, "cmd_explain")
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "--checkpoint", "x", "--latent", "-1"])


def test_the_leaderboard_claim_compares_latents_with_the_residual_basis():
    from saebench.leaderboard import Row
    from saebench.leaderboard.claims import claim_ablation_sparsity

    def est(v, lo, hi):
        return {"value": v, "lo": lo, "hi": hi}

    rows = [
        Row(
            "a",
            {},
            {
                "ablation": {
                    "ablation_sparsity": est(0.1, 0.09, 0.11),
                    "ablation_sparsity_residual": est(0.3, 0.28, 0.32),
                    "ablation_sparsity_random": est(0.29, 0.27, 0.31),
                }
            },
        ),  # fmt: skip
        Row(
            "b",
            {},
            {
                "ablation": {
                    "ablation_sparsity": est(0.3, 0.2, 0.4),
                    "ablation_sparsity_residual": est(0.3, 0.28, 0.32),
                }
            },
        ),  # fmt: skip
        Row("c", {}, {"core": {"nmse": est(0.1, 0.1, 0.1)}}),
    ]
    text = claim_ablation_sparsity(rows)
    assert "for 1 of 2 checkpoints" in text
    assert (
        "a: latents 0.1000 [0.0900, 0.1100] vs residual channel" in text and "random direction 0.29" in text
    )
    assert "b: " in text and "intervals overlap" in text
    assert claim_ablation_sparsity(rows[2:]).startswith("not measured: ")
