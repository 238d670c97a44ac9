import numpy as np
import pytest
import torch

from saebench.metrics.n2g import N2GParams, score, simulation_scale
from saebench.metrics.n2g import compute as n2g
from saebench.metrics.n2g_patterns import WILDCARD, Pattern, Trie, predict
from saebench.model.subject import SubjectModel
from saebench.sae.sae import SAE
from tests.conftest import tiny_eval_config, write_corpus

V = 257  # tiny byte tokenizer: id 0 is <|endoftext|> (BOS and EOS), byte b is b + 1


def tok(ch: str) -> int:
    return ord(ch) + 1


class BigramModel(SubjectModel):
    """The tiny model's tokenizer and head; the site residual is exactly [onehot(token), onehot(prev)].

    A latent reading the residual linearly then sees exactly the current token and the one before it (BOS
    for position 0), so latents firing on known bigrams can be planted.  Above the site: a fixed linear map.
    """

    def __init__(self, tiny: SubjectModel):
        super().__init__(tiny.hf_model, tiny.tokenizer, "bigram", "bigram-stub")
        self.d_model = 2 * V
        g = torch.Generator().manual_seed(0)
        self.up = torch.randn(2 * V, tiny.d_model, generator=g)

    def to_site(self, input_ids, layer):
        ids = input_ids.long()
        prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)
        one = torch.nn.functional.one_hot
        return torch.cat([one(ids, V), one(prev, V)], -1).float()

    def from_site(self, resid, layer):
        return torch.tanh(resid.float() @ self.up)


def planted_sae() -> SAE:
    """Latent 0: the bigram 't' 'h'; 1: the token 'q' anywhere; 2: any token right after a context start."""
    d, n = 2 * V, 3
    W_enc, b_enc = torch.zeros(d, n), torch.zeros(n)
    W_enc[tok("h"), 0], W_enc[V + tok("t"), 0], b_enc[0] = 1.0, 1.0, -1.0
    W_enc[tok("q"), 1] = 1.0
    W_enc[V + 0, 2], b_enc[2] = 1.0, -0.5
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return SAE(W_enc, b_enc, W_dec, torch.zeros(d), activation="relu")


@pytest.fixture
def bigram_context(tmp_path, tiny_llama):
    from saebench.context import EvalContext

    corpus = write_corpus(tmp_path / "big.txt", n_docs=3000)
    config = tiny_eval_config(tmp_path, corpus)
    return EvalContext(config, preloaded_model=BigramModel(tiny_llama))


# the stub model overrides to_site, which the key-reusing saliency runs bypass
SMALL = dict(
    n_build_tokens=1500, n_score_tokens=1500, min_build=3, min_score=1, n_kl_windows=40, reuse_keys=False
)


@pytest.mark.parametrize("search", ["bracket", "exhaustive"])
def test_planted_latents_get_their_patterns(bigram_context, search):
    result = n2g(bigram_context, planted_sae(), N2GParams(search=search, **SMALL))
    by_latent = {row["latent"]: row for row in result.details["latents"]}
    assert sorted(by_latent) == [0, 1, 2]
    assert by_latent[0]["explanation"] == "t [h]"  # the bigram, not anchored, no wildcard
    assert by_latent[1]["explanation"] == "[q]"  # one token regardless of context
    assert by_latent[2]["explanation"] == "^ [*]"  # anchored at a context start, any token
    for row in by_latent.values():
        assert row["scored"] and row["precision"] == 1.0 and row["recall"] == 1.0 and row["f1"] == 1.0
    assert result.values["n2g_f1"].value == 1.0 and result.values["n2g_f1"].n == 3
    assert result.counts["latents_sampled"] == result.counts["latents_scored"] == 3
    assert result.details["search"] == search
    # perfectly explained latents: the simulation is the activation itself
    assert [row["c"] for row in by_latent.values()] == pytest.approx([1.0, 1.0, 1.0])
    assert result.values["expl_fvu"].value == pytest.approx(0.0, abs=1e-12)
    assert result.values["expl_kl_recovered"].value == pytest.approx(1.0, abs=1e-9)
    # the current token alone cannot tell 'h' after 't' from other 'h'
    assert result.values["n2g_precision_token"].value < 1.0
    assert result.values["expl_kl_recovered_token"].value < 1.0
    assert result.counts["rerun_sequences"] >= result.counts["fewest_sequences"]


def test_bracket_search_needs_fewer_reruns_and_finds_the_same_lengths(bigram_context):
    sae = planted_sae()
    a = n2g(bigram_context, sae, N2GParams(search="bracket", **SMALL))
    b = n2g(bigram_context, sae, N2GParams(search="exhaustive", **SMALL))
    assert a.details["latents"] == b.details["latents"]
    assert a.counts["rerun_tokens"] < b.counts["rerun_tokens"]


def test_the_suffix_cap_keeps_the_last_tokens_and_counts_the_records_it_cut(bigram_context):
    sae = planted_sae()
    free = n2g(bigram_context, sae, N2GParams(**SMALL))
    capped = n2g(bigram_context, sae, N2GParams(max_suffix=1, **SMALL))
    assert free.counts["records_capped"] == 0  # every activation here needs at most two tokens
    by_latent = {row["latent"]: row for row in capped.details["latents"]}
    # the bigram 't' 'h' does not fit in one token: its records keep 'h' alone and are counted as cut
    assert by_latent[0]["explanation"] == "[h]" and by_latent[0]["precision"] < 1.0
    assert by_latent[1]["explanation"] == "[q]" and by_latent[1]["f1"] == 1.0
    n_bigram_records = sum(1 for j in capped.details["latents"] if j["latent"] == 0)
    assert capped.counts["records_capped"] >= n_bigram_records > 0
    assert capped.counts["rerun_tokens"] < free.counts["rerun_tokens"]


def test_explain_computes_only_the_latents_no_result_file_explains(bigram_context):
    from saebench.explain import format_n2g, n2g_rows
    from saebench.metrics.n2g import explain_latents

    sae, params = planted_sae(), N2GParams(**SMALL)
    rows = explain_latents(bigram_context, sae, [1, 0], params)
    assert [r["latent"] for r in rows] == [0, 1]
    assert [r["explanation"] for r in rows] == ["t [h]", "[q]"]
    assert all(r["precision"] == r["recall"] == 1.0 for r in rows)
    assert 0 < rows[0]["active_score"] < rows[0]["score_tokens"]
    with pytest.raises(ValueError, match="latents must lie in 0..2"):
        explain_latents(bigram_context, sae, [3], params)

    cached = {1: {**rows[1], "explanation": "from the file"}}
    both = n2g_rows(bigram_context, sae, [0, 1], cached, params)
    assert both[1]["source"] == "n2g result file" and both[1]["explanation"] == "from the file"
    assert both[0]["source"] == "computed now"
    text = format_n2g(both[1])
    assert text.startswith("N2G (n2g result file): precision 1.000, recall 1.000, f1 1.000")
    assert text.splitlines()[1] == "   from the file"


def test_the_leaderboard_claims_on_n2g():
    from saebench.leaderboard import Row
    from saebench.leaderboard.claims import claim_n2g_precision_recall, claim_n2g_with_k, claim_n2g_with_n

    def est(v, lo, hi):
        return {"value": v, "lo": lo, "hi": hi}

    def row(label, n, k, p, r, f1, token):
        values = {
            "n2g_precision": est(p, p - 0.01, p + 0.01),
            "n2g_recall": est(r, r - 0.01, r + 0.01),
            "n2g_f1": est(f1, f1 - 0.02, f1 + 0.02),
            "n2g_f1_token": est(token, token - 0.02, token + 0.02),
        }
        return Row(label, {"architecture": "topk", "n_latents": n, "k": k}, {"n2g": values})

    rows = [
        row("a", 2048, 32, 0.3, 0.6, 0.40, 0.10),
        row("b", 4096, 32, 0.4, 0.5, 0.45, 0.44),
        row("c", 8192, 32, 0.5, 0.4, 0.50, 0.10),
        row("d", 4096, 64, 0.2, 0.3, 0.25, 0.10),
        Row("e", {}, {"core": {"nmse": est(0.1, 0.1, 0.1)}}),
    ]
    text = claim_n2g_precision_recall(rows)
    assert text.splitlines()[0] == (
        "recall is above precision for 3 of 4 checkpoints; N2G's f1 beats the current-token lookup's "
        "(95% intervals apart) for 3 of 4"
    )
    assert "b: " in text and "not above the token baseline" in text
    with_n = claim_n2g_with_n(rows)
    assert "k=32: n=2048: 0.4000, n=4096: 0.4500, n=8192: 0.5000; rises with n" in with_n
    assert "k=64" not in with_n  # one size only
    assert "n=4096: k=32: 0.4500, k=64: 0.2500; falls with k" in claim_n2g_with_k(rows)
    for claim in (claim_n2g_precision_recall, claim_n2g_with_n, claim_n2g_with_k):
        assert claim(rows[4:]).startswith("not measured: ")


def test_saliency_on_cached_keys_equals_full_reruns(make_context):
    from tests.conftest import random_sae

    context = make_context()
    sae = random_sae(context.model.d_model, 64, k=4, seed=3)
    params = dict(
        n_latents=6, n_build_tokens=1200, n_score_tokens=1200, min_build=3, min_score=1, n_kl_windows=8
    )
    reused = n2g(context, sae, N2GParams(**params))
    rerun = n2g(context, sae, N2GParams(reuse_keys=False, **params))
    assert reused.details["latents"] == rerun.details["latents"]
    assert reused.values["n2g_f1_random"].value == rerun.values["n2g_f1_random"].value
    assert reused.counts["rerun_sequences"] == rerun.counts["rerun_sequences"]
    assert reused.counts["rerun_tokens"] < rerun.counts["rerun_tokens"]


def test_a_second_run_reads_the_pools_codes_from_the_cache(bigram_context, monkeypatch):
    encoded = []
    encode = SAE.encode_codes

    def counted(self, x, *args, **kwargs):
        encoded.append(x.shape[0])
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(SAE, "encode_codes", counted)

    def rows_encoded(sae) -> tuple[int, list]:
        encoded.clear()
        result = n2g(bigram_context, sae, N2GParams(**SMALL))
        return sum(encoded), result.details["latents"]

    sae = planted_sae()
    first, rows = rows_encoded(sae)
    second, again = rows_encoded(sae)
    pools = 2 * 100 * (bigram_context.config.ctx - 1)  # both pools' positions 1..
    assert again == rows and first - second == pools  # only the re-runs' rows are encoded again
    other = planted_sae()
    with torch.no_grad():
        other.W_enc[0, 0] += 1.0  # another SAE: its own cache entry, encoded afresh
    assert rows_encoded(other)[0] >= pools


def test_trie_prediction_on_a_hand_made_example():
    a, b, c, x = 5, 6, 7, 9
    trie = Trie(
        [
            Pattern((b,), False, 1.0),
            Pattern((a, b), False, 3.0),
            Pattern((WILDCARD, b), False, 2.0),
            Pattern((a, b), False, 2.5),  # same pattern: the leaf keeps the largest
            Pattern((c, WILDCARD, b), True, 4.0),
        ]
    )
    #         0  1  2  3  4  5  6  7  8
    window = [0, c, x, b, a, b, x, b, b]
    got = [trie.walk(window, t) for t in range(len(window))]
    # t=3: c x b at the start (after BOS) -> anchored 3-gram; t=5: a b; t=7: * b (x b); t=8: * b (b b)
    assert got == [0.0, 0.0, 0.0, 4.0, 0.0, 3.0, 0.0, 2.0, 2.0]
    vectorised = predict([trie], np.array([window]), starts=[0])[0, :, 0]
    assert vectorised.tolist() == got
    # the anchor needs a context start before the pattern
    assert trie.walk([0, x, c, x, b], 4) == 2.0
    assert trie.walk([0, x, 0, c, x, b], 5) == 4.0


def test_vectorised_prediction_equals_the_walk():
    rng = np.random.default_rng(0)
    vocab = 6
    tries = []
    for _ in range(5):
        patterns = []
        for _ in range(12):
            length = int(rng.integers(1, 5))
            tokens = [int(t) for t in rng.integers(1, vocab, size=length)]
            tokens = [WILDCARD if rng.random() < 0.3 else t for t in tokens]
            if all(t == WILDCARD for t in tokens):
                tokens[-1] = 1
            patterns.append(Pattern(tuple(tokens), bool(rng.random() < 0.3), float(rng.random())))
        tries.append(Trie(patterns))
    windows = rng.integers(0, vocab, size=(30, 12))
    windows[:, 0] = 0
    got = predict(tries, windows, starts=[0])
    for j, trie in enumerate(tries):
        walk = np.array([[trie.walk(w.tolist(), t) for t in range(windows.shape[1])] for w in windows])
        np.testing.assert_array_equal(got[..., j], walk)
    assert (got > 0).mean() > 0.2  # the check is not vacuous


def test_scoring_arithmetic():
    acts = np.array([[0.0, 2.0, 1.0, 0.4, 3.0, 0.0]]).T[None]  # (1, 6, 1)
    preds = np.array([[1.5, 0.0, 1.2, 0.0, 2.0, 0.0]]).T[None]
    mask = np.array([[True, True, True, True, True, False]])
    s = score(acts, preds, np.array([2.0]), mask)
    # threshold 1.0: fires at 1, 2, 4; predicted at 0, 2, 4; both at 2, 4
    assert s.precision[0] == pytest.approx(2 / 3) and s.recall[0] == pytest.approx(2 / 3)
    assert s.f1[0] == pytest.approx(2 / 3) and bool(s.scored[0])
    none = score(acts, np.zeros_like(preds), np.array([2.0]), mask)
    assert none.precision[0] == 0 and none.recall[0] == 0 and none.f1[0] == 0


def test_simulation_scale():
    preds = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    acts = np.array([[1.0, 1.0], [3.0, 2.0], [5.0, 0.0]])
    # c = (1*1 + 2*3) / (1 + 4) = 7/5; a column never predicted gets 0
    assert simulation_scale(preds, acts).tolist() == pytest.approx([1.4, 0.0])


def test_params_are_validated():
    with pytest.raises(ValueError, match="search"):
        N2GParams(search="linear")
    with pytest.raises(ValueError, match="keep"):
        N2GParams(keep=1.5)
