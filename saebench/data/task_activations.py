"""Residuals at the site for the examples of a probe task, computed once and cached on disk.

Only the examples of the task's seeded, class-balanced split are run: the n_train train examples, then the
n_test test examples.  Each example is BOS + its tokens, truncated to `max_tokens` (BOS included), and the
residuals after block `layer` at positions 1.. are kept, ragged: the examples' rows are concatenated into
`resid` (tokens, d) and example i owns rows offsets[i]:offsets[i + 1].  Position 0 (BOS, an attention sink
with an outsized norm) is never stored.

The rows are filled chunk by chunk through `Store.collect`, so a killed pass resumes where it stopped; a
chunk runs the examples that overlap it, in batches of similar length, right-padded (the model is causal,
so padding after a token never reaches it), with up to batch_size x max_tokens padded tokens per batch:
short examples share a forward pass with more of their kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saebench.data.cache import Store, cache_root
from saebench.data.tasks import Task, balanced_split, load_task_data, task_fingerprint
from saebench.model.batched import site_residuals


@dataclass
class TaskActivations:
    """Cached site residuals of one task's selected examples (train first, then test)."""

    task: Task
    #: (tokens, d) float32, memory-mapped: positions 1.. of every example, concatenated
    resid: np.ndarray
    #: (n_examples + 1,) int64: example i is resid[offsets[i]:offsets[i + 1]]
    offsets: np.ndarray
    #: (n_examples,) bool, True = positive
    labels: np.ndarray
    #: number of train examples; the rest are test
    n_train: int
    #: (n_examples,) int64: each example's row in the task's data
    rows: np.ndarray

    @property
    def n_examples(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """Positions 1.. stored per example."""
        return np.diff(self.offsets)


def selected_examples(task: Task, seed: int) -> tuple[list[str], np.ndarray, np.ndarray, int]:
    """(texts, labels, rows, n_train) of the task's seeded balanced split, train examples first."""
    texts, labels = load_task_data(task)
    train, test = balanced_split(labels, task.n_train, task.n_test, seed)
    rows = np.concatenate([train, test])
    return [texts[i] for i in rows], labels[rows], rows, len(train)


def tokenize_examples(texts: list[str], tokenizer, bos_id: int, max_tokens: int) -> list[list[int]]:
    """BOS + the text's tokens, cut to `max_tokens` ids in all."""
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [[bos_id, *ids[: max_tokens - 1]] for ids in encoded]


def task_activations(
    model,
    layer: int,
    task: Task,
    *,
    model_key: str,
    model_dtype: str,
    seed: int = 0,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
) -> TaskActivations:
    """The cached residuals of `task` for a `SubjectModel` at `layer`, computing what is missing.

    model_key, model_dtype: the model's identity and dtype name for the cache key (the context's
    `model_key` and `config.dtype`); seed: the balanced split's.
    """
    key = {
        "model": model_key,
        "layer": layer,
        "model_dtype": model_dtype,
        "task": task_fingerprint(task),
        "max_tokens": task.max_tokens,
        "seed": seed,
        "bos": model.bos_id,
    }
    store = Store("task-resid", key, root=Path(cache_dir) if cache_dir is not None else cache_root())
    examples = ("offsets", "labels", "rows", "n_train")
    if store.has("resid", *examples):  # warm: neither the data nor the tokenizer is needed
        offsets, labels, rows, n_train = (store.load(name, mmap=False) for name in examples)
        return TaskActivations(task, store.load("resid"), offsets, labels, int(n_train[0]), rows)

    texts, labels, rows, n_train = selected_examples(task, seed)
    tokens = tokenize_examples(texts, model.tokenizer, model.bos_id, task.max_tokens)
    lengths = np.array([len(ids) - 1 for ids in tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if store.has("offsets") and not np.array_equal(store.load("offsets", mmap=False), offsets):
        raise RuntimeError(
            f"cached activations of task {task.name!r} disagree with its data; delete {store.folder}"
        )
    for name, array in zip(examples, (offsets, labels, rows, np.array([n_train])), strict=True):
        store.save(name, array)

    def produce(start: int, stop: int) -> dict[str, np.ndarray]:
        """Residual rows [start, stop) of the concatenation: run every example that overlaps them."""
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, stop, side="left"))
        with torch.inference_mode():
            rows = site_residuals(model, tokens[first:last], layer, "after_bos", token_budget=budget)
        lo = int(offsets[first])
        return {"resid": rows.values[start - lo : stop - lo].numpy()}

    budget = batch_size * task.max_tokens  # padded tokens per forward pass
    n_tokens = int(offsets[-1])
    if n_tokens == 0:
        raise ValueError(f"task {task.name!r}: no example has a token after BOS")
    chunk = batch_size * (task.max_tokens - 1)
    resid = store.collect(("resid",), n_tokens, chunk, produce, desc=f"residuals of task {task.name}")[
        "resid"
    ]
    return TaskActivations(task, resid, offsets, labels, n_train, rows)


def site_task_activations(site, task: Task) -> TaskActivations:
    """`task_activations` at a `Site`: its model, layer, seed, batch size and cache folder."""
    c = site.config
    return task_activations(
        site.model, site.layer, task, model_key=site.model_key, model_dtype=c.dtype, seed=c.seed,
        batch_size=c.batch_size, cache_dir=c.cache_dir,
    )  # fmt: skip
