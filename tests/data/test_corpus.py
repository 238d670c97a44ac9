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
