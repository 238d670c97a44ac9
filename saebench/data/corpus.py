"""The text corpus and the token windows cut from it (core, downstream, n2g, ablation, shrinkage, training).

Documents come shuffled with a fixed seed.  The first `EVAL_FRACTION` of them is the `eval` split, the rest
`train`, so evaluation text is never trained on whatever window counts anyone asks for; `all` is the whole
corpus, for evaluating a user's text that nothing is fitted on (one document is enough).  Within a split
the documents are put in a seeded order, tokenized, joined with EOS into one stream

    doc_a EOS doc_b EOS doc_c EOS ...

and the stream is cut into pieces of ctx - 1 tokens (a long document spans many); each window is BOS
followed by one piece.  Evaluation may ask for more windows than a small corpus has (`allow_fewer`): it
gets every window there is, the last one completed with a padding token when the stream ends inside it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from saebench.data.sources import SAE_PROBES_PREFIX, SourceError, read_table, source_fingerprint

DEFAULT_CORPUS = "sae-probes-mix"
# sae-probes files that none of the 61 default probe tasks uses and whose sources do not overlap them.
SAE_PROBES_MIX_STEMS = (
    "45_context_ans",
    "94_ai_gen",
    "48_cm_correct",
    "49_cm_isshort",
    "111_yelp_data",
    "86_social_iqa",
    "103_it_tick",
    "88_glue_mnli",
    "98_cancer_cat",
    "55_open_qa",
    "99_sci_cat",
    "93_glue_stsb",
    "44_phys_tf",
    "90_glue_qnli",
)
SHUFFLE_SEED = 0
EVAL_FRACTION = 0.1
SPLITS = ("eval", "train", "all")
# Bump when the recipe below (dedup, shuffle, split, join) changes, so cached windows are not reused.
RECIPE_VERSION = 1

# Lazy tokenization: each batch is sized from the tokens still missing at this many characters per token
# (English BPE gives about 4; a low guess only means one more batch), and never smaller than the floor.
_CHARS_PER_TOKEN_GUESS = 4
_MIN_BATCH_CHARS = 16_384
_MAX_BATCH_DOCS = 1024


class CorpusError(ValueError):
    """A corpus that cannot give what was asked: unknown source, no text column, too few windows."""


def corpus_documents(corpus: str = DEFAULT_CORPUS) -> list[str]:
    """The corpus as a list of non-empty, de-duplicated documents, shuffled with a fixed seed.

    `corpus` is `sae-probes-mix` (the default, 14 sae-probes files), a `sae-probes:<stem>`, a local .txt
    (documents separated by blank lines), .jsonl (field `text`), .parquet / .csv (column `text`) path, or a
    Hugging Face data set id (`id`, `id:config`; column `text`, split `train`).
    """
    return list(_cached_documents(corpus, corpus_fingerprint(corpus)))


def corpus_fingerprint(corpus: str = DEFAULT_CORPUS) -> str:
    """A stable identity of the corpus and of the recipe that turns it into split documents (hex digest)."""
    parts = [f"recipe={RECIPE_VERSION}", f"shuffle={SHUFFLE_SEED}", f"eval_fraction={EVAL_FRACTION}"]
    parts += [source_fingerprint(source) for source in _sources(corpus)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def split_documents(documents: Sequence[str], split: str) -> Sequence[str]:
    """The `eval` part (the first EVAL_FRACTION of the documents, at least one), the `train` rest or `all`."""
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split == "all":
        return documents
    if len(documents) < 2:
        raise CorpusError(
            f"the corpus has {len(documents)} document(s); splitting it by document into eval and train "
            "(something is fitted on it: a built-in baseline or training) needs 2 or more (a .txt separates "
            "documents by blank lines)"
        )
    n_eval = min(len(documents) - 1, max(1, math.ceil(EVAL_FRACTION * len(documents))))
    return documents[:n_eval] if split == "eval" else documents[n_eval:]


def make_windows(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    bos_id: int,
    eos_id: int,
    ctx: int = 64,
    n_windows: int,
    split: str = "eval",
    seed: int = 0,
    start: int = 0,
    allow_fewer: bool = False,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Windows `start .. start + n_windows - 1` of a split's token stream: LongTensor (n_windows, ctx).

    `tokenizer` is a Hugging Face tokenizer (called as `tokenizer(list_of_texts, add_special_tokens=False)`).
    `seed` orders the split's documents; the same arguments always give the same windows, and `start`
    continues a stream where an earlier call with the same seed stopped.  Only as many documents as the
    requested windows need are tokenized.  A split too small for the windows asked is an error, unless
    `allow_fewer`: then every window from `start` to the end of the stream comes back, and with `pad_id`
    the stream's last tokens too, in a final window completed with `pad_id` (a token that is not scored).
    """
    if ctx < 2:
        raise CorpusError(f"ctx={ctx}: a window needs at least 2 tokens (BOS and one of text)")
    if n_windows < 1 or start < 0:
        raise CorpusError(f"n_windows={n_windows}, start={start}: need n_windows >= 1 and start >= 0")
    part = split_documents(documents, split)
    order = np.random.default_rng(seed).permutation(len(part))
    piece = ctx - 1
    stream = _token_stream(part, order, tokenizer, eos_id, n_tokens=(start + n_windows) * piece)
    available = len(stream) // piece
    if allow_fewer and pad_id is not None and len(stream) % piece and available < start + n_windows:
        stream = np.concatenate([stream, np.full(piece - len(stream) % piece, pad_id, dtype=np.int64)])
        available += 1
    if allow_fewer and start < available < start + n_windows:
        n_windows = available - start
    if available < start + n_windows:
        fix = "a smaller --ctx" if allow_fewer else "fewer windows"
        raise CorpusError(
            f"the {split} split of the corpus gives {available} windows of {ctx} tokens "
            f"({len(stream)} tokens) but windows {start}..{start + n_windows - 1} were asked for: "
            f"use a bigger corpus or {fix}"
        )
    body = torch.from_numpy(stream[start * piece : (start + n_windows) * piece]).view(n_windows, piece)
    bos = torch.full((n_windows, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, body], dim=1)


def _token_stream(
    documents: Sequence[str], order: np.ndarray, tokenizer: Any, eos_id: int, n_tokens: int
) -> np.ndarray:
    """Tokenize documents in `order`, each followed by EOS, until `n_tokens` or the end."""
    chunks: list[np.ndarray] = []
    have = 0
    i = 0
    while have < n_tokens and i < len(order):
        budget = max(_MIN_BATCH_CHARS, (n_tokens - have) * _CHARS_PER_TOKEN_GUESS)
        batch: list[str] = []
        chars = 0
        while i < len(order) and chars < budget and len(batch) < _MAX_BATCH_DOCS:
            batch.append(documents[order[i]])
            chars += len(batch[-1])
            i += 1
        # verbose=False: long documents are cut into windows here, so the model-length warning is noise.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if len(ids) == 0:
                continue
            chunks.append(np.asarray(ids, dtype=np.int64))
            chunks.append(np.array([eos_id], dtype=np.int64))
            have += len(ids) + 1
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _sources(corpus: str) -> list[str]:
    if corpus == DEFAULT_CORPUS:
        return [SAE_PROBES_PREFIX + stem for stem in SAE_PROBES_MIX_STEMS]
    return [corpus]


@functools.lru_cache(maxsize=2)
def _cached_documents(corpus: str, fingerprint: str) -> tuple[str, ...]:
    """Read, clean, de-duplicate and shuffle; `fingerprint` is in the key so a changed file is re-read."""
    texts: list[str] = []
    for source in _sources(corpus):
        column = "prompt" if source.startswith(SAE_PROBES_PREFIX) else "text"
        try:
            table = read_table(source)
        except SourceError as exc:
            raise CorpusError(f"corpus {corpus!r}: {exc}") from None
        if column not in table.columns:
            raise CorpusError(
                f"corpus {corpus!r} has no column {column!r} (it has {', '.join(map(str, table.columns))}): "
                "put the documents in a `text` column"
            )
        texts += [str(text) for text in table[column].dropna() if str(text).strip()]
    documents = list(dict.fromkeys(texts))  # drop repeats (several sae-probes files share their source text)
    if not documents:
        raise CorpusError(f"corpus {corpus!r} has no non-empty documents")
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(documents))
    return tuple(documents[i] for i in order)
