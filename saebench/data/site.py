"""A residual site of a subject model on a corpus: token windows and their residuals, cached on disk.

Data flows one way: model + corpus -> windows of one split (held out by document: `eval` or `train`) ->
residuals after block `layer` (cached, resumable) -> the evaluation set (`saebench.context`) and the
trainer's stream (`saebench.train.stream`).  Every cache key starts from `Site.key`: what residuals at the
site depend on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from saebench.data.cache import Store, cache_root
from saebench.model.batched import site_residuals
from saebench.model.subject import SubjectModel

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class SiteConfig:
    """Which model, site and corpus, and how activations there are computed and cached."""

    #: subject model: offline alias (smollm2-135m, gemma3-270m), local folder or Hugging Face id
    model: str = "smollm2-135m"
    #: site = residual stream after this decoder block; None: about 3/4 depth
    layer: int | None = None
    #: text for the windows: sae-probes-mix, a local txt/jsonl/parquet path or a hub data set id
    corpus: str = "sae-probes-mix"
    #: window length in tokens, including the BOS at position 0
    ctx: int = 64
    #: treat BOS/EOS tokens inside a window (document separators) like position 0: not scored, not
    #: spliced, not trained on.  They are attention sinks too, with ~50x the typical residual norm at
    #: mid-depth, and would otherwise dominate nmse and the downstream loss.
    exclude_special: bool = True
    #: windows per forward pass of the subject model
    batch_size: int = 32
    #: torch device for the model and the SAE
    device: str = "cpu"
    #: dtype of the subject model and the SAE
    dtype: str = "float32"
    #: seed for data order, bootstrap and metric sampling
    seed: int = 0
    #: cache folder (default $SAEBENCH_CACHE or ~/.cache/saebench)
    cache_dir: str | None = None
    #: where the evaluation windows come from: `eval` (the split held out by document) or `all` (the whole
    #: corpus, for a user's text that nothing is fitted on; then nothing may train on this site's corpus)
    eval_split: str = "eval"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


class Site:
    """Windows and residuals at one (model, layer, corpus, window length), computed once and cached."""

    def __init__(
        self,
        config: SiteConfig,
        model: SubjectModel | None = None,
        model_identity: str | None = None,
    ):
        self.config = config
        #: a model already in memory (tests, notebooks); loaded from config.model on first use otherwise
        self._preloaded = model
        #: identity of the model for cache keys (set from the loader, or by whoever passes a model)
        self._model_identity = model_identity

    @cached_property
    def model(self) -> SubjectModel:
        if self._preloaded is not None:
            return self._preloaded
        from saebench.model import load_model

        return load_model(self.config.model, device=self.config.device, dtype=self.config.torch_dtype)

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @cached_property
    def layer(self) -> int:
        if self.config.layer is not None:
            return self.config.layer
        from saebench.model import default_layer

        return default_layer(self.model.n_layers)

    @cached_property
    def model_key(self) -> str:
        return self._model_identity or self.model.model_id

    @cached_property
    def key(self) -> dict:
        """What activations at the site depend on; part of every cache key."""
        from saebench.data.corpus import corpus_fingerprint

        c = self.config
        return {
            "model": self.model_key,
            "layer": self.layer,
            "corpus": corpus_fingerprint(c.corpus),
            "ctx": c.ctx,
            "seed": c.seed,
            "model_dtype": c.dtype,
            # only when not the default, so the default's cache keys (and result keys) stay as they were
            **({"eval_split": c.eval_split} if c.eval_split != "eval" else {}),
        }

    @property
    def cache_root(self) -> Path:
        return cache_root() if self.config.cache_dir is None else Path(self.config.cache_dir)

    def store(self, kind: str, extra: dict | None = None) -> Store:
        """The cache folder for data of this `kind` at this site (`extra`: what else it depends on)."""
        return Store(kind, {**self.key, **(extra or {})}, root=self.cache_root)

    @cached_property
    def documents(self) -> list[str]:
        from saebench.data.corpus import corpus_documents

        return corpus_documents(self.config.corpus)

    def split(self, split: str) -> str:
        """The corpus split behind `split`: `eval` is the evaluation windows' (`SiteConfig.eval_split`)."""
        from saebench.data.corpus import CorpusError

        if self.config.eval_split not in ("eval", "all"):
            raise CorpusError(f"eval_split={self.config.eval_split!r}: use eval or all")
        if split == "train" and self.config.eval_split == "all":
            raise CorpusError(
                f"corpus {self.config.corpus!r} is evaluated whole (eval_split='all'): nothing may be fitted "
                "on its train split"
            )
        return self.config.eval_split if split == "eval" else split

    def windows(self, split: str, n_windows: int, start: int = 0) -> np.ndarray:
        """Token windows (n_windows, ctx) int64 of a corpus split, BOS at position 0, cached.

        Evaluation windows (`eval`) of a corpus too small for n_windows are all it has, the last one padded
        with EOS (not scored, like the separators; the same windows whatever `exclude_special`); training
        windows are never fewer.
        """
        split = self.split(split)
        store = self.store(f"windows-{split}", {"n_windows": n_windows, "start": start})
        if start == 0 and not store.has("tokens"):
            bigger = Store.covering(f"windows-{split}", store.key, "n_windows", self.cache_root, "tokens")
            if bigger is not None:
                return bigger.load("tokens", mmap=False)[:n_windows]

        def make() -> np.ndarray:
            from saebench.data.corpus import make_windows

            m = self.model
            tokens = make_windows(
                self.documents,
                m.tokenizer,
                bos_id=m.bos_id,
                eos_id=m.eos_id,
                ctx=self.config.ctx,
                n_windows=n_windows,
                split=split,
                seed=self.config.seed,
                start=start,
                allow_fewer=split != "train",
                pad_id=m.eos_id,
            )
            return tokens.numpy().astype(np.int64)

        # made by one process; others on the same cache (torchrun's ranks) wait for it and read it
        return store.cached("tokens", make)

    def resid(self, split: str, n_windows: int, start: int = 0) -> np.ndarray:
        """Residuals at the site (n_windows, ctx, d) float32 for `windows(...)`, memory-mapped.

        Collected batch by batch into the cache; an interrupted collection resumes where it stopped.
        """
        split = self.split(split)
        if start == 0:  # the first windows of a stream: a bigger finished collection serves
            key = {**self.key, "n_windows": n_windows, "start": 0}
            bigger = Store.covering(f"resid-{split}", key, "n_windows", self.cache_root, "resid")
            if bigger is not None:
                return bigger.load("resid")[:n_windows]
        windows = self.windows(split, n_windows, start)
        store = self.store(f"resid-{split}", {"n_windows": n_windows, "start": start})

        ctx = self.config.ctx

        def produce(lo: int, hi: int) -> dict[str, np.ndarray]:
            # one forward per chunk of `batch_size` windows (all of length ctx)
            with torch.inference_mode():
                h = site_residuals(self.model, torch.from_numpy(windows[lo:hi]), self.layer, "all",
                                   token_budget=(hi - lo) * ctx)  # fmt: skip
            return {"resid": h.values.reshape(hi - lo, ctx, -1).numpy()}

        return store.collect(
            ("resid",), len(windows), self.config.batch_size, produce, desc=f"residuals at the site ({split})"
        )["resid"]

    def scored(self, windows: np.ndarray) -> np.ndarray:
        """Which positions 1.. of these windows are scored, spliced and trained on: (n, ctx - 1) bool."""
        keep = np.ones(windows[:, 1:].shape, dtype=bool)
        if self.config.exclude_special:
            specials = [self.model.bos_id, self.model.eos_id]
            keep &= ~np.isin(windows[:, 1:], specials)
        return keep

    def train_sample(self, n_tokens: int) -> torch.Tensor:
        """Residuals at scored positions of training-split windows, (n_tokens, d) float32."""
        n_windows = -(-n_tokens // (self.config.ctx - 1))
        while True:
            windows, resid = self.windows("train", n_windows), self.resid("train", n_windows)
            keep = self.scored(windows)
            if keep.sum() >= n_tokens:
                break
            n_windows = int(n_windows * 1.1) + 1
        x = torch.from_numpy(np.array(resid[:, 1:])[keep])
        return x[:n_tokens]
