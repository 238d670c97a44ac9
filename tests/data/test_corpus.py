"""Windows: BOS at 0, EOS between documents, eval/train disjoint, deterministic, resumable; corpus files."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from saebench.data.corpus import (
    CorpusError,
    corpus_documents,
    corpus_fingerprint,
    make_windows,
    split_documents,
)
from tests.data.conftest import word_tokenizer

BOS_ID, EOS_ID = 0, 1  # as in conftest.word_tokenizer


def _windows(documents, tokenizer, **kwargs):
    args = {"bos_id": BOS_ID, "eos_id": EOS_ID, "ctx": 8, "n_windows": 4, "split": "train"} | kwargs
    return make_windows(documents, tokenizer, **args)


def _max_windows(documents, tokenizer, split, ctx=8):
    """Every window a split can give, found by asking for one too many."""
    with pytest.raises(CorpusError, match=r"gives \d+ windows") as info:
        _windows(documents, tokenizer, split=split, ctx=ctx, n_windows=10_000)
    n = int(re.search(r"gives (\d+) windows", str(info.value)).group(1))
    return _windows(documents, tokenizer, split=split, ctx=ctx, n_windows=n)


def _doc_of(tokenizer, token_id):
    return tokenizer.convert_ids_to_tokens(int(token_id)).split("_")[0]


def test_windows_have_shape_dtype_and_bos_at_zero(documents, tokenizer):
    windows = _windows(documents, tokenizer, ctx=8, n_windows=5)
    assert windows.shape == (5, 8) and windows.dtype == torch.long
    assert (windows[:, 0] == BOS_ID).all()
    assert not (windows[:, 1:] == BOS_ID).any()


def test_stream_is_whole_documents_joined_by_eos(documents, tokenizer):
    windows = _max_windows(documents, tokenizer, "train")
    stream = windows[:, 1:].reshape(-1).tolist()
    pieces = " ".join(tokenizer.convert_ids_to_tokens(stream)).split("[EOS]")
    complete = [piece.strip() for piece in pieces[:-1]]  # the last piece may be cut by the final window
    train_docs = set(split_documents(documents, "train"))
    assert len(complete) >= 0.8 * len(train_docs)
    assert all(piece in train_docs for piece in complete)
    assert len(set(complete)) == len(complete)


def test_eval_and_train_use_disjoint_documents(documents, tokenizer):
    seen = {}
    for split in ("eval", "train"):
        windows = _max_windows(documents, tokenizer, split)
        body = windows[:, 1:].reshape(-1)
        seen[split] = {_doc_of(tokenizer, t) for t in body[body != EOS_ID]}
    assert seen["eval"] and seen["train"]
    assert not seen["eval"] & seen["train"]
    assert len(split_documents(documents, "eval")) == 6  # 10% of 60


def test_same_arguments_give_same_windows_and_seed_reorders(documents, tokenizer):
    first = _windows(documents, tokenizer, seed=3)
    assert torch.equal(first, _windows(documents, tokenizer, seed=3))
    assert not torch.equal(first, _windows(documents, tokenizer, seed=4))


def test_start_continues_the_stream(documents, tokenizer):
    full = _windows(documents, tokenizer, n_windows=9, seed=1)
    resumed = _windows(documents, tokenizer, n_windows=4, start=5, seed=1)
    assert torch.equal(resumed, full[5:])


def test_too_few_windows_is_a_clear_error(documents, tokenizer):
    with pytest.raises(CorpusError, match=r"the eval split of the corpus gives \d+ windows of 8 tokens"):
        _windows(documents, tokenizer, split="eval", n_windows=1000)


def test_bad_arguments_are_errors(documents, tokenizer):
    with pytest.raises(CorpusError, match="unknown split 'test'"):
        _windows(documents, tokenizer, split="test")
    with pytest.raises(CorpusError, match="ctx=1"):
        _windows(documents, tokenizer, ctx=1)
    with pytest.raises(CorpusError, match="needs 2 or more"):
        _windows(documents[:1], tokenizer)


def test_only_needed_documents_are_tokenized(make_documents, make_tokenizer):
    documents = make_documents(3000)
    inner = make_tokenizer(documents)
    tokenized = []

    def counting_tokenizer(texts, **kwargs):
        tokenized.extend(texts)
        return inner(texts, **kwargs)

    windows = make_windows(
        documents, counting_tokenizer, bos_id=BOS_ID, eos_id=EOS_ID, ctx=8, n_windows=2, split="train"
    )
    assert windows.shape == (2, 8)
    assert 2 <= len(tokenized) < 0.2 * len(documents)


def test_txt_corpus_is_deduplicated_and_shuffled_reproducibly(tmp_path):
    docs = [f"document number {k}\nsecond line" for k in range(30)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs + docs[:5] + ["   "]) + "\n")
    loaded = corpus_documents(str(path))
    assert sorted(loaded) == sorted(docs)
    assert loaded != docs  # shuffled
    assert loaded == corpus_documents(str(path))


def test_jsonl_and_parquet_corpora_read_the_text_column(tmp_path):
    docs = [f"text {k}" for k in range(10)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": k}) for k, d in enumerate(docs)))
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"text": docs}).to_parquet(parquet)
    assert sorted(corpus_documents(str(jsonl))) == sorted(docs)
    assert sorted(corpus_documents(str(parquet))) == sorted(docs)
    pd.DataFrame({"body": docs}).to_parquet(parquet)
    with pytest.raises(CorpusError, match="no column 'text' \\(it has body\\)"):
        corpus_documents(str(parquet))


def test_fingerprint_is_stable_and_follows_content(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\n\ntwo\n")
    first = corpus_fingerprint(str(path))
    assert first == corpus_fingerprint(str(path))
    path.write_text("one\n\nthree\n")
    assert corpus_fingerprint(str(path)) != first
    assert corpus_fingerprint() == corpus_fingerprint("sae-probes-mix") != first


def test_default_corpus_is_large_and_does_not_contain_probe_texts():
    from saebench.data.tasks import discover_tasks, load_task_data

    documents = corpus_documents()
    assert len(documents) > 50_000 and sum(map(len, documents)) > 40_000_000
    eval_docs = split_documents(documents, "eval")
    assert sum(map(len, eval_docs)) > 1_000_000  # > 200k tokens at ~4 characters per token
    corpus = set(documents)
    for task in discover_tasks().values():
        texts, _ = load_task_data(task)
        # Only one-word replies ("Wow", "Yes") occur in both.
        assert all(len(text) < 10 for text in corpus.intersection(texts)), task.name


def test_default_corpus_order_is_fixed():
    documents = corpus_documents()
    assert np.array_equal([len(d) for d in documents[:50]], [len(d) for d in corpus_documents()[:50]])


# --- the whole corpus, small corpora ----------------------------------------------------------------------


def test_all_split_is_every_document_and_one_is_enough(documents, tokenizer):
    assert list(split_documents(documents, "all")) == list(documents)
    windows = _max_windows(documents, tokenizer, "all")
    body = windows[:, 1:].reshape(-1)
    seen = {_doc_of(tokenizer, t) for t in body[body != EOS_ID]}
    assert len(seen) >= 0.9 * len(documents)  # both former splits; only the last window's tail is cut
    single = split_documents(documents[:1], "all")
    assert list(single) == documents[:1]
    with pytest.raises(
        CorpusError, match=r"has 1 document\(s\); splitting it by document .* needs 2 or more"
    ):
        split_documents(documents[:1], "eval")


def test_a_long_single_document_is_cut_into_windows():
    doc = " ".join(f"d0_{j}" for j in range(40))
    tok = word_tokenizer(doc.split())
    windows = _windows([doc], tok, split="all", ctx=8, n_windows=5)  # 35 of its 40 tokens, no separator
    assert windows.shape == (5, 8) and (windows[:, 0] == BOS_ID).all()
    assert tok.convert_ids_to_tokens(windows[:, 1:].reshape(-1).tolist()) == doc.split()[:35]


def test_fewer_windows_than_asked_are_all_of_them_padded(documents, tokenizer):
    few = documents[:3]
    stream = []
    for k in np.random.default_rng(0).permutation(3):
        stream += tokenizer(few[k], add_special_tokens=False)["input_ids"] + [EOS_ID]
    with pytest.raises(CorpusError, match="fewer windows"):
        _windows(few, tokenizer, split="all", n_windows=100)
    got = _windows(few, tokenizer, split="all", n_windows=100, allow_fewer=True, pad_id=EOS_ID)
    n = -(-len(stream) // 7)
    assert got.shape == (n, 8)
    body = got[:, 1:].reshape(-1).tolist()
    assert body[: len(stream)] == stream and set(body[len(stream) :]) <= {EOS_ID}  # every token, once
    unpadded = _windows(few, tokenizer, split="all", n_windows=100, allow_fewer=True)
    assert torch.equal(unpadded, got[: len(stream) // 7])
    # the first windows are those a smaller request gives
    assert torch.equal(_windows(few, tokenizer, split="all", n_windows=2), got[:2])
    with pytest.raises(CorpusError, match="smaller --ctx"):
        _windows(few, tokenizer, split="all", ctx=200, n_windows=3, allow_fewer=True)


def _site(tmp_path, tiny_llama, corpus, **config):
    from saebench.data.site import Site, SiteConfig

    cfg = SiteConfig(model="tiny", layer=1, corpus=str(corpus), ctx=16, cache_dir=str(tmp_path / "cache"))
    return Site(SiteConfig(**{**cfg.__dict__, **config}), tiny_llama, model_identity="tiny")


def test_site_key_names_the_split_only_when_whole(tmp_path, tiny_llama, corpus_file):
    default, whole = (
        _site(tmp_path, tiny_llama, corpus_file),
        _site(tmp_path, tiny_llama, corpus_file, eval_split="all"),
    )
    assert set(default.key) == {"model", "layer", "corpus", "ctx", "seed", "model_dtype"}
    assert whole.key == {**default.key, "eval_split": "all"}
    eval_windows, all_windows = default.windows("eval", 40), whole.windows("eval", 40)
    assert not np.array_equal(eval_windows, all_windows)
    assert np.array_equal(all_windows, whole.windows("all", 40))
    with pytest.raises(CorpusError, match="evaluated whole"):
        whole.windows("train", 4)
    with pytest.raises(CorpusError, match="evaluated whole"):
        whole.train_sample(10)


def test_site_gives_a_small_corpus_whole_and_caches_it(tmp_path, tiny_llama):
    notes = tmp_path / "notes.txt"
    notes.write_text("a single short note of exactly this many bytes, one token each.\n")
    n_text = len(notes.read_text().strip().encode())
    site = _site(tmp_path, tiny_llama, notes, eval_split="all")
    windows = site.windows("eval", 50)
    assert windows.shape == (-(-(n_text + 1) // 15), 16)
    assert int(site.scored(windows).sum()) == n_text
    resid = site.resid("eval", 50)
    assert resid.shape[:2] == windows.shape
    assert np.array_equal(site.windows("eval", 50), windows) and np.array_equal(
        site.windows("eval", 3), windows[:3]
    )
    assert np.array_equal(site.resid("eval", 20), resid)


def _native_checkpoint(tmp_path, d):
    from saebench.sae.formats.native import save_native
    from tests.conftest import random_sae

    return save_native(random_sae(d, 32, k=4), tmp_path / "ckpt" / "sae")


def _runner(tmp_path, model, corpus, checkpoint, **eval_overrides):
    from saebench.runner import RunConfig, Runner
    from tests.conftest import tiny_eval_config

    cfg = RunConfig(
        checkpoint=str(checkpoint),
        metrics=["core", "downstream"],
        eval=tiny_eval_config(tmp_path, corpus, **{"n_tokens": 8 * 15, "batch_size": 4, **eval_overrides}),
        out=str(tmp_path / "results"),
    )
    return Runner(cfg, model=model)


def test_run_scores_a_one_document_corpus_whole_and_says_so_once(tmp_path, tiny_llama):
    notes = tmp_path / "notes.txt"
    notes.write_text("The only document: a note that is shorter than the evaluation tokens asked for.")
    n_text = len(notes.read_text().encode())
    runner = _runner(tmp_path, tiny_llama, notes, _native_checkpoint(tmp_path, tiny_llama.d_model))
    assert runner.eval_split == "all"
    with pytest.warns(UserWarning) as caught:
        results = runner.run()
    lines = [str(w.message) for w in caught if "scoring" in str(w.message)]
    assert lines == [f"corpus {notes} has {n_text} tokens; scoring {n_text} instead of {8 * 15}"]
    for result in results:
        assert result["eval"]["eval_split"] == "all" and result["data_key"]["eval_split"] == "all"
        assert result["eval"]["n_tokens_scored"] == n_text
    core = next(r for r in results if r["metric"] == "core")
    assert core["values"]["nmse"]["n"] == -(-(n_text + 1) // 15)  # every window there is
    down = next(r for r in results if r["metric"] == "downstream")
    assert down["counts"]["spliced"] == n_text


def test_run_keeps_the_split_where_something_is_fitted_or_on_the_default_corpus(tmp_path, tiny_llama):
    from saebench.context import EvalConfig
    from saebench.runner import RunConfig, evaluation_split

    notes = tmp_path / "notes.txt"
    notes.write_text("one document only")
    builtin = _runner(tmp_path, tiny_llama, notes, "builtin:pca-topk:k=4,fit_tokens=100")
    assert builtin.eval_split == "eval"
    with pytest.raises(CorpusError, match="needs 2 or more"):
        builtin.run()
    assert evaluation_split(RunConfig(checkpoint="ckpt", metrics=["core"], eval=EvalConfig())) == "eval"
    user = RunConfig(checkpoint="ckpt", metrics=["core"], eval=EvalConfig(corpus="notes.txt"))
    assert evaluation_split(user) == "all"
    user.eval_split = "eval"
    assert evaluation_split(user) == "eval"


def test_run_on_a_big_enough_user_corpus_scores_what_was_asked_silently(tmp_path, tiny_llama, corpus_file):
    import warnings

    runner = _runner(tmp_path, tiny_llama, corpus_file, _native_checkpoint(tmp_path, tiny_llama.d_model))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*scoring")
        results = runner.run()
    assert all(r["eval"]["n_windows"] == 8 and r["eval"]["eval_split"] == "all" for r in results)
