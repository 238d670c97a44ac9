"""Everything a metric receives besides the SAE: the subject model, the site, and cached activations.

Data flows one way: model + corpus -> evaluation windows -> residuals at the site (cached on disk) ->
metrics.  The part of the model below the site, and everything downstream that does not depend on the
SAE (clean final hidden state, clean and zero-ablated cross-entropy), is computed once per key and reused
by every checkpoint and every metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from saebench.data.cache import Store, cache_root
from saebench.model.scoring import clean_reference, has_linear_head, next_token_ce
from saebench.model.subject import SubjectModel

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class EvalConfig:
    """Where and on what the SAEs are evaluated."""

    #: subject model: offline alias (smollm2-135m, gemma3-270m), local folder or Hugging Face id
    model: str = "smollm2-135m"
    #: site = residual stream after this decoder block; None: the checkpoint's, else about 3/4 depth
    layer: int | None = None
    #: text for the evaluation windows: sae-probes-mix, a local txt/jsonl/parquet path or a hub data set id
    corpus: str = "sae-probes-mix"
    #: evaluation tokens (positions 1.. of each window; position 0 is excluded everywhere)
    n_tokens: int = 16384
    #: window length including the BOS at position 0
    ctx: int = 64
    #: treat BOS/EOS tokens inside a window (document separators) like position 0: not scored, not
    #: spliced.  They are attention sinks too, with ~50x the typical residual norm at mid-depth, and
    #: would otherwise dominate nmse and the downstream loss.
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

    @property
    def n_windows(self) -> int:
        return math.ceil(self.n_tokens / (self.ctx - 1))

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


@dataclass
class EvalContext:
    """The evaluation set for one (model, layer, corpus, sizes) and lazy access to what metrics need."""

    config: EvalConfig
    #: a model already in memory (tests, notebooks); loaded from config.model on first use otherwise
    preloaded_model: SubjectModel | None = None
    #: identity of the model for cache keys (set from the loader, or by whoever passes a model)
    model_identity: str | None = None
    _layer: int | None = field(default=None, init=False)

    @cached_property
    def model(self) -> SubjectModel:
        if self.preloaded_model is not None:
            return self.preloaded_model
        from saebench.model import load_model

        return load_model(self.config.model, device=self.config.device, dtype=self.config.torch_dtype)

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    @property
    def layer(self) -> int:
        if self.config.layer is not None:
            return self.config.layer
        from saebench.model import default_layer

        return default_layer(self.model.n_layers)

    @cached_property
    def model_key(self) -> str:
        return self.model_identity or self.model.model_id

    @cached_property
    def site_key(self) -> dict:
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
        }

    @property
    def data_key(self) -> dict:
        """What an evaluation result depends on besides the checkpoint and the metric's parameters."""
        return {
            **self.site_key,
            "n_tokens": self.config.n_tokens,
            "exclude_special": self.config.exclude_special,
        }

    @property
    def _root(self) -> Path:
        return cache_root() if self.config.cache_dir is None else Path(self.config.cache_dir)

    def store(self, kind: str, extra: dict | None = None) -> Store:
        return Store(kind, {**self.site_key, **(extra or {})}, root=self._root)

    # --- windows and residuals at the site ------------------------------------------------------------
    @cached_property
    def documents(self) -> list[str]:
        from saebench.data.corpus import corpus_documents

        return corpus_documents(self.config.corpus)

    def site_windows(self, split: str, n_windows: int, start: int = 0) -> np.ndarray:
        """Token windows (n_windows, ctx) int64 of a corpus split, BOS at position 0, cached."""
        store = self.store(f"windows-{split}", {"n_windows": n_windows, "start": start})
        if start == 0 and not store.has("tokens"):
            bigger = Store.covering(f"windows-{split}", store.key, "n_windows", self._root, "tokens")
            if bigger is not None:
                return bigger.load("tokens", mmap=False)[:n_windows]
        if not store.has("tokens"):
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
            )
            store.save("tokens", tokens.numpy().astype(np.int64))
        return store.load("tokens", mmap=False)

    def site_resid(self, split: str, n_windows: int, start: int = 0) -> np.ndarray:
        """Residuals at the site (n_windows, ctx, d) float32 for `site_windows(...)`, memory-mapped.

        Collected batch by batch into the cache; an interrupted collection resumes where it stopped.
        """
        if start == 0:  # the first windows of a stream: a bigger finished collection serves
            key = {**self.site_key, "n_windows": n_windows, "start": 0}
            bigger = Store.covering(f"resid-{split}", key, "n_windows", self._root, "resid")
            if bigger is not None:
                return bigger.load("resid")[:n_windows]
        windows = self.site_windows(split, n_windows, start)
        store = self.store(f"resid-{split}", {"n_windows": n_windows, "start": start})

        def produce(lo: int, hi: int) -> dict[str, np.ndarray]:
            ids = torch.from_numpy(windows[lo:hi]).to(self.device)
            with torch.inference_mode():
                h = self.model.to_site(ids, self.layer)
            return {"resid": h.float().cpu().numpy()}

        return store.collect(
            ("resid",), len(windows), self.config.batch_size, produce, desc=f"residuals at the site ({split})"
        )["resid"]

    @cached_property
    def windows(self) -> np.ndarray:
        """Evaluation windows (n_windows, ctx), from the held-out split of the corpus."""
        return self.site_windows("eval", self.config.n_windows)

    @cached_property
    def resid(self) -> np.ndarray:
        """Residuals at the site for the evaluation windows (n_windows, ctx, d)."""
        return self.site_resid("eval", self.config.n_windows)

    def scored(self, windows: np.ndarray) -> np.ndarray:
        """Which positions 1.. of these windows are scored and spliced: (n, ctx - 1) bool."""
        keep = np.ones(windows[:, 1:].shape, dtype=bool)
        if self.config.exclude_special:
            specials = [self.model.bos_id, self.model.eos_id]
            keep &= ~np.isin(windows[:, 1:], specials)
        return keep

    @cached_property
    def mask(self) -> np.ndarray:
        """Scored positions 1.. of the evaluation windows, (n_windows, ctx - 1) bool."""
        return self.scored(self.windows)

    def train_sample(self, n_tokens: int) -> torch.Tensor:
        """Residuals at scored positions of training-split windows, (n_tokens, d) float32."""
        n_windows = -(-n_tokens // (self.config.ctx - 1))
        while True:
            windows, resid = self.site_windows("train", n_windows), self.site_resid("train", n_windows)
            keep = self.scored(windows)
            if keep.sum() >= n_tokens:
                break
            n_windows = int(n_windows * 1.1) + 1
        x = torch.from_numpy(np.array(resid[:, 1:])[keep])
        return x[:n_tokens]

    @cached_property
    def clean(self) -> dict[str, np.ndarray]:
        """SAE-independent downstream data for positions 1..ctx-2 (targets 2..ctx-1), computed once.

        ce_clean, ce_zero: per-position CE (n_windows, ctx - 2), clean and with the site's residual zeroed
            at the scored positions (`mask`).
        For the KL, the clean distribution in compact form (`saebench.model.scoring`): with a linear head,
            unembed_mean = W^T p (n_windows, ctx - 2, d) and clean_term (n_windows, ctx - 2); otherwise the
            clean final hidden state `final`, whose image under the head is the clean logits.
        """
        windows, resid, mask = self.windows, self.resid, self.mask
        linear = has_linear_head(self.model)
        names = ("ce_clean", "ce_zero", *(("unembed_mean", "clean_term") if linear else ("final",)))
        store = self.store(
            "eval-downstream", {"n_windows": len(windows), "exclude_special": self.config.exclude_special}
        )

        def produce(start: int, stop: int) -> dict[str, np.ndarray]:
            ids = torch.from_numpy(windows[start:stop]).to(self.device)
            h = torch.from_numpy(np.array(resid[start:stop])).to(self.device, self.model.dtype)
            targets = ids[:, 2:]
            with torch.inference_mode():
                final = self.model.from_site(h, self.layer)[:, 1:-1]
                if linear:
                    ce_clean, e, c = clean_reference(self.model, final, targets)
                    out = {"unembed_mean": e.cpu().numpy(), "clean_term": c.cpu().numpy()}
                else:
                    ce_clean = next_token_ce(self.model, final, targets)
                    out = {"final": final.float().cpu().numpy()}
                zeroed = h.clone()
                zeroed[:, 1:][torch.from_numpy(mask[start:stop]).to(self.device)] = 0
                ce_zero = next_token_ce(
                    self.model, self.model.from_site(zeroed, self.layer)[:, 1:-1], targets
                )
            return {
                **out,
                "ce_clean": ce_clean.double().cpu().numpy(),
                "ce_zero": ce_zero.double().cpu().numpy(),
            }

        return store.collect(
            names, len(windows), self.config.batch_size, produce, desc="clean and zero-ablated pass"
        )

    def window_batches(self, batch: int | None = None):
        """(start, stop) ranges over the evaluation windows."""
        n, b = len(self.windows), batch or self.config.batch_size
        for start in range(0, n, b):
            yield start, min(start + b, n)

    # --- the SAE on the evaluation set -----------------------------------------------------------------
    def reconstruct_batches(self, sae, batch: int | None = None, chunk_tokens: int = 512):
        """Yield (start, stop, x (b, ctx-1, d), Reconstruction over the b*(ctx-1) tokens) for windows.

        Positions 1.. only.  Tokens are encoded `chunk_tokens` at a time so the dense pre-activations stay
        small (chunk x n_latents); latents leave as sparse codes.  The raw reconstructions are kept per SAE
        (tokens x d, never tokens x latents) so a second metric does not encode again.
        """
        from saebench.sae.sae import Reconstruction, SparseCodes

        resid, d = self.resid, self.resid.shape[-1]
        if id(sae) not in self._x_hat_memo:
            self._x_hat_memo[id(sae)] = (
                torch.empty(resid.shape[0], resid.shape[1] - 1, d),
                torch.zeros(resid.shape[0], dtype=torch.bool),
            )
        kept, done = self._x_hat_memo[id(sae)]
        scratch = sae.scratch(chunk_tokens)
        for start, stop in self.window_batches(batch):
            x = torch.from_numpy(np.array(resid[start:stop, 1:])).to(self.device, sae.W_enc.dtype)
            flat = x.reshape(-1, d)
            parts = []
            with torch.inference_mode():
                for i in range(0, flat.shape[0], chunk_tokens):
                    parts.append(sae.reconstruct(flat[i : i + chunk_tokens], scratch))
            width = max(p.codes.indices.shape[1] for p in parts)

            def pad(t, w=width):
                return torch.nn.functional.pad(t, (0, w - t.shape[1]))

            rec = Reconstruction(
                torch.cat([p.u for p in parts]),
                torch.cat([p.u_hat for p in parts]),
                torch.cat([p.x_hat for p in parts]),
                SparseCodes(
                    torch.cat([pad(p.codes.indices) for p in parts]),
                    torch.cat([pad(p.codes.values) for p in parts]),
                ),
            )
            kept[start:stop] = rec.x_hat.reshape(x.shape).cpu()
            done[start:stop] = True
            yield start, stop, x, rec

    def x_hat(self, sae, start: int, stop: int) -> torch.Tensor:
        """Raw reconstructions of positions 1.. of windows [start, stop), reusing an earlier encode."""
        if id(sae) not in self._x_hat_memo or not self._x_hat_memo[id(sae)][1][start:stop].all():
            for _ in self.reconstruct_batches(sae):
                pass
        return self._x_hat_memo[id(sae)][0][start:stop].to(self.device)

    def forget(self, sae) -> None:
        """Drop what was kept for this SAE."""
        self._x_hat_memo.pop(id(sae), None)

    @cached_property
    def _x_hat_memo(self) -> dict:
        return {}
