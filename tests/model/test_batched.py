"""Batched runs against the model's own forward with hooks on the site block."""

import numpy as np
import pytest
import torch

from saebench.model.batched import (
    SiteEdits,
    batch_tokens,
    cache_above_site,
    median_centred_norms,
    run_from_site,
    site_residuals,
    token_batches,
    token_cache,
    token_deltas,
)
from saebench.model.tiny import tiny_model

LAYER = 1
CASES = [
    (family, attention)
    for family in ("llama", "gpt2", "gemma3", "gpt_neox")
    for attention in ("sdpa", "eager")
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def subject(request):
    family, attention = request.param
    return tiny_model(family, seed=1, attn_implementation=attention)


# running to the site does not depend on the family beyond `to_site`: fewer cases for its larger grid
@pytest.fixture(
    scope="module", params=[("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")], ids="-".join
)
def lower(request):
    family, attention = request.param
    return tiny_model(family, seed=1, attn_implementation=attention)


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _hooked_site(subject, ids, layer):
    """Block `layer`'s output in the model's own forward of ids (B, T)."""
    seen = []
    handle = subject.family.blocks[layer].register_forward_hook(lambda m, a, out: seen.append(_output(out)))
    try:
        subject.hf_model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def _hooked_logits(subject, ids, layer, delta=None):
    """The model's own logits with `delta` (B, T, d) added to block `layer`'s output."""

    def hook(module, args, out):
        if delta is None:
            return out
        h = _output(out) + delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = subject.family.blocks[layer].register_forward_hook(hook)
    try:
        return subject.hf_model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def _ragged(subject, n=9, seed=0, shortest=1, longest=14):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g).tolist()
    seqs = []
    for n_tokens in lengths:
        s = torch.randint(1, subject.vocab_size, (n_tokens,), generator=g)
        s[0] = subject.bos_id
        seqs.append(s.tolist())
    return seqs


def _ids(subject, batch, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, subject.vocab_size, (batch, tokens), generator=g)
    ids[:, 0] = subject.bos_id
    return ids


# --- to the site --------------------------------------------------------------------------------------------


def test_token_batches_cut_at_the_padded_token_budget():
    # 3 x 3 = 9 fits; adding the 5 makes 4 x 5 = 20; the 5 and the 9 together pad to 2 x 9 = 18.
    assert token_batches([2, 3, 3, 5, 9], 9) == [[0, 1, 2], [3], [4]]
    assert token_batches([2, 3, 3, 5, 9], 17) == [[0, 1, 2], [3], [4]]
    assert token_batches([2, 3, 3, 5, 9], 18) == [[0, 1, 2], [3, 4]]
    assert token_batches([2, 3, 3, 5, 9], 20) == [[0, 1, 2, 3], [4]]
    assert token_batches([20], 4) == [[0]]  # longer than the budget: alone
    assert token_batches([], 4) == []


def test_token_batches_with_max_padding_cut_at_length_jumps():
    lengths = [2, 3, 3, 5, 9, 10, 40]
    assert token_batches(lengths, 1000) == [[0, 1, 2, 3, 4, 5, 6]]
    # 3 <= 1.5 * 2 + 1 joins the 2; 5 > 1.5 * 2 + 1 starts a batch, 9 > 1.5 * 5 + 1 another, 10 joins it
    assert token_batches(lengths, 1000, max_padding=0.5) == [[0, 1, 2], [3], [4, 5], [6]]
    assert token_batches(lengths, 1000, max_padding=0.0) == [[0, 1, 2], [3], [4, 5], [6]]
    assert token_batches(lengths, 6, max_padding=0.5) == [[0, 1], [2], [3], [4], [5], [6]]


def test_batch_tokens_follow_the_model_shape():
    small, wide = tiny_model("llama"), tiny_model("llama", hidden_size=128, intermediate_size=512)
    assert abs(batch_tokens(small, 2**24, 16) - 2 * batch_tokens(small, 2**23, 16)) <= 1
    assert batch_tokens(wide, 2**24, 16) < batch_tokens(small, 2**24, 16) / 2
    assert batch_tokens(tiny_model("llama", dtype=torch.float64), 2**24, 16) < batch_tokens(small, 2**24, 16)
    assert batch_tokens(small, 10, 16) == 16  # at least one sequence


@pytest.mark.parametrize("positions", ["all", "after_bos", "last", "explicit"])
@pytest.mark.parametrize("budget", [12, None])
@torch.inference_mode()
def test_site_residuals_match_the_hooked_forward_of_each_sequence(lower, positions, budget):
    subject = lower
    seqs = _ragged(subject)
    if positions == "explicit":
        g = torch.Generator().manual_seed(5)
        positions = [
            torch.randint(0, len(s), (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
            for s in seqs
        ]
    calls = []
    handle = subject.family.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    try:
        out = site_residuals(subject, seqs, LAYER, positions, token_budget=budget)
    finally:
        handle.remove()
    for i, s in enumerate(seqs):
        h = _hooked_site(subject, torch.tensor([s]), LAYER)[0]
        want = {
            "all": h,
            "after_bos": h[1:],
            "last": h[-1:],
        }.get(positions if isinstance(positions, str) else "", None)
        if want is None:
            want = h[positions[i]]
        got = out.values[out.offsets[i] : out.offsets[i + 1]]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if budget is not None:
        assert all(shape[0] * shape[1] <= max(budget, 14) for shape in calls)
    if budget == 12:
        assert len(calls) >= 3
    n_run = sum(shape[0] for shape in calls)
    n_wanted = sum(
        1
        for i, s in enumerate(seqs)
        if (len(positions[i]) if not isinstance(positions, str) else len(s) - (positions == "after_bos")) > 0
    )
    assert n_run == n_wanted  # sequences without a position to return are not run


@torch.inference_mode()
def test_site_residuals_reproduce_the_task_activation_batching_bit_for_bit(tiny_llama):
    """The rule task_activations.produce uses: sort by length, <= budget padded tokens, EOS padding, 1.."""
    seqs = _ragged(tiny_llama, n=17, seed=3, longest=12)
    budget = 3 * 12
    lengths = np.array([len(s) - 1 for s in seqs])
    members = sorted((i for i in range(len(seqs)) if lengths[i] > 0), key=lambda i: lengths[i])
    want = {}
    batches, current = [], []
    for i in members:
        if current and (len(current) + 1) * (int(lengths[i]) + 1) > budget:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    for batch in batches:
        ids = torch.full((len(batch), int(lengths[batch[-1]]) + 1), tiny_llama.eos_id, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : lengths[i] + 1] = torch.tensor(seqs[i])
        h = tiny_llama.to_site(ids, LAYER).float().cpu().numpy()
        for r, i in enumerate(batch):
            want[i] = h[r, 1 : 1 + lengths[i]]
    out = site_residuals(tiny_llama, seqs, LAYER, "after_bos", token_budget=budget)
    assert out.offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
    for i in range(len(seqs)):
        got = out.values[out.offsets[i] : out.offsets[i + 1]].numpy()
        np.testing.assert_array_equal(got, want.get(i, np.empty((0, tiny_llama.d_model))))


def test_site_residuals_reject_bad_positions(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        site_residuals(tiny_llama, [[0, 5, 6]], LAYER, [[3]])
    with pytest.raises(ValueError, match="one of"):
        site_residuals(tiny_llama, [[0, 5, 6]], LAYER, "first")


# --- from the site ------------------------------------------------------------------------------------------


def _edits(subject, batch, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    positions = torch.tensor([3, 7, 1, 0, 5, 5])  # a repeated (row, position): the deltas add up
    deltas = torch.randn(len(rows), subject.d_model, generator=g)
    dense = torch.zeros(batch, tokens, subject.d_model)
    dense.index_put_((rows, positions), deltas, accumulate=True)
    return SiteEdits(rows, positions, deltas), dense


@torch.inference_mode()
def test_edits_act_like_a_hook_in_the_full_forward(subject):
    ids = _ids(subject, 3, 12, seed=1)
    resid = subject.to_site(ids, LAYER)
    edits, dense = _edits(subject, 3, 12, seed=2)
    hooked = _hooked_logits(subject, ids, LAYER, dense)
    clean = _hooked_logits(subject, ids, LAYER)
    logits = run_from_site(subject, resid, LAYER, edits=edits, output="logits")
    torch.testing.assert_close(logits, hooked, rtol=0, atol=1e-5)
    assert (hooked - clean).abs().max() > 1e-2
    final = run_from_site(subject, resid, LAYER, edits=edits)
    # the repeated (row, position) adds its deltas one by one: equal to rounding, not bit for bit
    torch.testing.assert_close(final, subject.from_site(resid + dense, LAYER), rtol=0, atol=1e-5)
    # positions: shared, per row, a slice
    shared = torch.tensor([2, 7, 11])
    got = run_from_site(subject, resid, LAYER, edits=edits, positions=shared, output="logits")
    torch.testing.assert_close(got, hooked[:, shared], rtol=0, atol=1e-5)
    per_row = torch.tensor([[0, 3], [1, 2], [5, 11]])
    got = run_from_site(subject, resid, LAYER, edits=edits, positions=per_row, output="logit_diff")
    want = (hooked - clean)[torch.arange(3)[:, None], per_row]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got = run_from_site(
        subject, resid, LAYER, replacement=resid + dense, positions=slice(1, -1), output="logits"
    )
    torch.testing.assert_close(got, hooked[:, 1:-1], rtol=0, atol=1e-5)


def _dense_norms(diff):
    v = diff.shape[-1]
    median = np.sort(diff.double().numpy(), -1)[..., (v - 1) // 2]
    centred = diff.double().numpy() - median[..., None]
    return {"median": median, "l1": np.abs(centred).sum(-1), "l2": np.sqrt((centred**2).sum(-1))}


@torch.inference_mode()
def test_reductions_match_a_dense_computation_and_stay_chunked(subject):
    ids = _ids(subject, 3, 12, seed=3)
    resid = subject.to_site(ids, LAYER)
    edits, dense = _edits(subject, 3, 12, seed=4)
    diff = _hooked_logits(subject, ids, LAYER, dense) - _hooked_logits(subject, ids, LAYER)
    rows_seen = []

    def recorded(logit_diff):
        rows_seen.append(logit_diff.shape)
        return median_centred_norms(logit_diff)

    got = run_from_site(subject, resid, LAYER, edits=edits, output="logit_diff", reduce=recorded, chunk=5)
    assert rows_seen == [(5, subject.vocab_size)] * 7 + [(1, subject.vocab_size)]  # 36 rows, 5 at a time
    want = _dense_norms(diff)
    assert set(got) == {"median", "l1", "l2"}
    for name in want:
        assert got[name].shape == (3, 12)
        np.testing.assert_allclose(got[name].double().numpy(), want[name], rtol=1e-5, atol=1e-5)
    top = run_from_site(
        subject, resid, LAYER, edits=edits, output="logits", reduce=lambda l: l.topk(2, -1).indices, chunk=7
    )
    assert top.shape == (3, 12, 2)
    assert torch.equal(top[..., 0], _hooked_logits(subject, ids, LAYER, dense).argmax(-1))


# --- KV reuse -----------------------------------------------------------------------------------------------


def _oracle(subject, ids, windows, starts, deltas, n_positions):
    """Per continuation: the hooked full forward of its window with deltas (S, d) added from its start."""
    out = torch.full((len(windows), n_positions, subject.vocab_size), float("nan"), dtype=torch.float64)
    clean = _hooked_logits(subject, ids, LAYER)
    ctx = ids.shape[1]
    diffs = out.clone()
    for b, (w, t) in enumerate(zip(windows.tolist(), starts.tolist(), strict=True)):
        dense = torch.zeros(1, ctx, subject.d_model, dtype=subject.dtype)
        s = min(deltas.shape[1], ctx - t)
        dense[0, t : t + s] = deltas[b, :s]
        logits = _hooked_logits(subject, ids[w : w + 1], LAYER, dense)[0]
        n = min(n_positions, ctx - t)
        out[b, :n] = logits[t : t + n].double()
        diffs[b, :n] = (logits[t : t + n] - clean[w, t : t + n]).double()
    return out, diffs


@pytest.mark.parametrize("reuse", [True, False])
@torch.inference_mode()
def test_edited_continuations_match_the_full_rerun(subject, reuse):
    ctx, n_positions = 20, 6
    ids = _ids(subject, 3, ctx, seed=5)
    resid = subject.to_site(ids, LAYER)
    upper = cache_above_site(subject, resid, LAYER, reuse=reuse)
    assert upper.reuse == reuse
    torch.testing.assert_close(upper.final, subject.from_site(resid, LAYER), rtol=0, atol=0)
    # several windows and starts in one batch, four edits sharing the prefix of (window 1, t = 9), an edit at
    # t = 0 and continuations running past the window's end
    windows = torch.tensor([1, 1, 1, 1, 0, 2, 2, 0])
    starts = torch.tensor([9, 9, 9, 9, 0, 17, 4, 19])
    g = torch.Generator().manual_seed(6)
    deltas = 3 * torch.randn(len(windows), subject.d_model, generator=g)
    suffix_tokens = []
    handle = subject.family.blocks[LAYER + 1].register_forward_pre_hook(
        lambda m, a: suffix_tokens.append(a[0].shape[1])
    )
    try:
        logits = upper.run_edits(windows, starts, deltas, n_positions=n_positions, output="logits", batch=5)
    finally:
        handle.remove()
    assert suffix_tokens == ([n_positions] * 2 if reuse else [ctx] * 2)
    want, want_diff = _oracle(subject, ids, windows, starts, deltas[:, None], n_positions)
    assert logits.shape == want.shape
    assert torch.equal(torch.isnan(logits), torch.isnan(want))
    np.testing.assert_allclose(logits.double().numpy(), want.numpy(), rtol=0, atol=1e-5)
    assert np.nanmax(np.abs(want_diff.numpy())) > 1e-2
    diff = upper.run_edits(windows, starts, deltas, n_positions=n_positions)
    np.testing.assert_allclose(diff.double().numpy(), want_diff.numpy(), rtol=0, atol=1e-5)
    norms = upper.run_edits(
        windows, starts, deltas, n_positions=n_positions, reduce=median_centred_norms, chunk=4
    )
    dense = _dense_norms(torch.nan_to_num(want_diff))
    inside = ~torch.isnan(want_diff[..., 0]).numpy()
    for name in dense:
        assert np.isnan(norms[name].numpy()[~inside]).all()
        np.testing.assert_allclose(
            norms[name].double().numpy()[inside], dense[name][inside], rtol=1e-5, atol=1e-5
        )


@torch.inference_mode()
def test_multi_position_deltas_and_final_states(subject):
    ctx = 16
    ids = _ids(subject, 2, ctx, seed=7)
    resid = subject.to_site(ids, LAYER)
    upper = cache_above_site(subject, resid, LAYER)
    windows, starts = torch.tensor([0, 1, 1]), torch.tensor([2, 5, 14])
    g = torch.Generator().manual_seed(8)
    deltas = torch.randn(3, 3, subject.d_model, generator=g)
    final = upper.run_edits(windows, starts, deltas, n_positions=4, output="final")
    for b in range(3):
        w, t = int(windows[b]), int(starts[b])
        edited = resid[w : w + 1].clone()
        s = min(3, ctx - t)
        edited[0, t : t + s] += deltas[b, :s]
        want = subject.from_site(edited, LAYER)[0, t : t + 4]
        torch.testing.assert_close(final[b, : len(want)], want, rtol=0, atol=1e-5)
        assert torch.isnan(final[b, len(want) :]).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.inference_mode()
def test_kv_reuse_in_float64_is_exact_to_rounding(family, attention):
    subject = tiny_model(family, seed=2, dtype=torch.float64, attn_implementation=attention)
    ids = _ids(subject, 2, 24, seed=9)
    resid = subject.to_site(ids, LAYER)
    windows, starts = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([1, 12, 12, 12, 23])
    deltas = torch.randn(5, subject.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    cached = cache_above_site(subject, resid, LAYER).run_edits(windows, starts, deltas, output="logits")
    rerun = cache_above_site(subject, resid, LAYER, reuse=False).run_edits(
        windows, starts, deltas, output="logits"
    )
    assert cached.dtype == torch.float32  # logits leave as float32
    final_cached = cache_above_site(subject, resid, LAYER).run_edits(windows, starts, deltas, output="final")
    final_rerun = cache_above_site(subject, resid, LAYER, reuse=False).run_edits(
        windows, starts, deltas, output="final"
    )
    # eager llama attention takes its softmax in float32 whatever the model dtype
    exact = 1e-12 if attention == "sdpa" or family == "gpt2" else 1e-6
    torch.testing.assert_close(final_cached, final_rerun, rtol=0, atol=exact, equal_nan=True)
    torch.testing.assert_close(cached, rerun, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "gpt_neox"])
@torch.inference_mode()
def test_token_edits_on_cached_keys_equal_the_edited_sequences_to_the_site(family):
    subject = tiny_model(family, seed=3, dtype=torch.float64)
    ids = _ids(subject, 3, 10, seed=4)
    cache = token_cache(subject, ids, LAYER)
    torch.testing.assert_close(cache.final, subject.to_site(ids, LAYER), rtol=0, atol=1e-12)
    rows, starts = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 4, 9, 5])
    new = torch.tensor([7, 8, 9, 10])
    deltas = token_deltas(subject, ids[rows, starts], new)
    got = cache.run_edits(rows, starts, deltas, n_positions=6, output="final")
    for b in range(len(rows)):
        edited = ids[rows[b]].clone()
        edited[starts[b]] = new[b]
        want = subject.to_site(edited[None], LAYER)[0, starts[b] : starts[b] + 6]
        torch.testing.assert_close(got[b, : len(want)], want, rtol=0, atol=1e-10)
        assert got[b, len(want) :].isnan().all()  # past the sequence's end
    with pytest.raises(ValueError, match="needs the run to reach the head"):
        cache.run_edits(rows, starts, deltas, output="logits")


def test_run_edits_rejects_bad_requests(tiny_llama):
    resid = torch.zeros(2, 8, tiny_llama.d_model)
    upper = cache_above_site(tiny_llama, resid, LAYER)
    with pytest.raises(ValueError, match="starts must lie"):
        upper.run_edits([0], [8], torch.zeros(1, tiny_llama.d_model))
    with pytest.raises(ValueError, match="more than n_positions"):
        upper.run_edits([0], [1], torch.zeros(1, 5, tiny_llama.d_model), n_positions=4)


@torch.inference_mode()
def test_edits_at_position_zero_need_no_cache(subject):
    ids = _ids(subject, 2, 10, seed=11)
    resid = subject.to_site(ids, LAYER)
    deltas = torch.randn(3, subject.d_model, generator=torch.Generator().manual_seed(12))
    args = ([1, 0, 1], [0, 0, 0], deltas)
    cached = cache_above_site(subject, resid, LAYER).run_edits(*args, n_positions=4, output="logits")
    rerun = cache_above_site(subject, resid, LAYER, reuse=False).run_edits(
        *args, n_positions=4, output="logits"
    )
    torch.testing.assert_close(cached, rerun, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab", [1, 2, 7, 256, 257])
def test_median_centred_norms_selects_torchs_lower_median_and_copies_unless_told(vocab):
    diff = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    diff[0] = 0.5  # ties
    kept = diff.clone()
    got = median_centred_norms(diff)
    assert torch.equal(diff, kept)  # overwrite=False leaves the input alone
    want = _dense_norms(diff.double())
    assert torch.equal(got["median"], diff.median(-1).values)
    for name in want:
        np.testing.assert_allclose(got[name].double().numpy(), want[name], rtol=1e-6, atol=1e-6)
    scratch = diff.clone()
    again = median_centred_norms(scratch, overwrite=True)
    assert torch.equal(again["median"], got["median"])
    np.testing.assert_allclose(again["l1"].numpy(), got["l1"].numpy(), rtol=1e-6)
