"""Fixtures for the data tests: a word-level tokenizer built offline, documents whose tokens name them."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS_ID, EOS_ID = 0, 1


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word: `[BOS]` is 0, `[EOS]` 1, `[UNK]` 2, then `words` in order."""
    vocab = {"[BOS]": BOS_ID, "[EOS]": EOS_ID, "[UNK]": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tagged_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Document k is the words `d{k}_0 d{k}_1 ...` (3 to 12 of them), so every token tells its document."""
    lengths = [3 + (7 * k + seed) % 10 for k in range(n_docs)]
    return [" ".join(f"d{k}_{j}" for j in range(length)) for k, length in enumerate(lengths)]


def tokenizer_for(documents: list[str]) -> PreTrainedTokenizerFast:
    return word_tokenizer([word for doc in documents for word in doc.split()])


@pytest.fixture
def documents() -> list[str]:
    return tagged_documents(60)


@pytest.fixture
def tokenizer(documents) -> PreTrainedTokenizerFast:
    return tokenizer_for(documents)


@pytest.fixture
def make_documents():
    """`tagged_documents` for tests that need another size."""
    return tagged_documents


@pytest.fixture
def make_tokenizer():
    """`tokenizer_for`: the word tokenizer of a list of documents."""
    return tokenizer_for
