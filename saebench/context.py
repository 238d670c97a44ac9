"""The evaluation set a metric receives besides the SAE: held-out windows at a site and their residuals.

Data flows one way: `Site` (model + corpus -> windows -> cached residuals) -> `EvalContext` (the `eval`
split's first n_windows windows, their residuals and scored positions) -> metrics.  The part of the model
below the site runs once per key and is reused by every checkpoint and every metric; what a metric needs
beyond that (e.g. downstream's clean pass) lives in the metric's own module, cached through `store`.

Per SAE, `reconstructions(sae)` encodes the evaluation tokens once and keeps the raw reconstructions
(tokens x d, never tokens x latents), so a second metric on the same SAE does not encode again.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from saebench.data.cache import Store
from saebench.data.site import DTYPES, Site, SiteConfig
from saebench.model.subject import SubjectModel
from saebench.sae.sae import SAE, Reconstruction

__all__ = ["DTYPES", "EvalConfig", "EvalContext", "Reconstructions"]


@dataclass
class EvalConfig(SiteConfig):
    """Where and on what the SAEs are evaluated: a site (`SiteConfig`) and the evaluation set's size."""

    #: evaluation tokens (positions 1.. of each window; position 0 is excluded everywhere)
    n_tokens: int = 16384
    #: first window of the held-out split evaluated (0: the evaluation set; the trainer's lr sweep
    #: validates on the windows after it, so the lr is never tuned on the windows results are reported on)
    eval_start: int = 0

    def __post_init__(self):
        if self.eval_start < 0:
            raise ValueError(f"eval_start must be >= 0, got {self.eval_start}")

    @property
    def n_windows(self) -> int:
        return math.ceil(self.n_tokens / (self.ctx - 1))

    def site_config(self) -> SiteConfig:
        return SiteConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SiteConfig)})


class EvalContext:
    """The evaluation windows of one (model, layer, corpus, sizes), their residuals and scored positions."""

    def __init__(
        self,
        config: EvalConfig,
        site: Site | None = None,
        *,
        preloaded_model: SubjectModel | None = None,
        model_identity: str | None = None,
    ):
        self.config = config
        self.site = site or Site(config.site_config(), preloaded_model, model_identity)
        self._reconstructions: weakref.WeakKeyDictionary[SAE, Reconstructions] = weakref.WeakKeyDictionary()

    @property
    def model(self) -> SubjectModel:
        return self.site.model

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def device(self) -> torch.device:
        return self.site.device

    @property
    def data_key(self) -> dict:
        """What an evaluation result depends on besides the checkpoint and the metric's parameters."""
        return {
            **self.site.key,
            "n_tokens": self.config.n_tokens,
            "exclude_special": self.config.exclude_special,
            **({"eval_start": self.config.eval_start} if self.config.eval_start else {}),
        }

    def store(self, kind: str, extra: dict | None = None) -> Store:
        """A cache folder at this site for a metric's own SAE-independent data; keyed by the evaluation
        set's first window too when it is not the default set's (eval_start > 0), so data of other
        windows (the lr sweep's validation windows) never serves this set or is served by it."""
        start = {"eval_start": self.config.eval_start} if self.config.eval_start else {}
        return self.site.store(kind, {**(extra or {}), **start})

    @cached_property
    def windows(self) -> np.ndarray:
        """Evaluation windows (n_windows, ctx), from the held-out split of the corpus."""
        return self.site.windows("eval", self.config.n_windows, self.config.eval_start)

    @cached_property
    def resid(self) -> np.ndarray:
        """Residuals at the site for the evaluation windows (n_windows, ctx, d), memory-mapped."""
        return self.site.resid("eval", self.config.n_windows, self.config.eval_start)

    @cached_property
    def mask(self) -> np.ndarray:
        """Scored positions 1.. of the evaluation windows, (n_windows, ctx - 1) bool."""
        return self.site.scored(self.windows)

    def window_batches(self, batch: int | None = None) -> Iterator[tuple[int, int]]:
        """(start, stop) ranges over the evaluation windows."""
        n, b = len(self.windows), batch or self.config.batch_size
        for start in range(0, n, b):
            yield start, min(start + b, n)

    def reconstructions(self, sae: SAE) -> Reconstructions:
        """The SAE on the evaluation set; one object per SAE, kept until `forget(sae)`."""
        if sae not in self._reconstructions:
            self._reconstructions[sae] = Reconstructions(self, sae)
        return self._reconstructions[sae]

    def forget(self, sae: SAE) -> None:
        """Drop what was kept for this SAE."""
        self._reconstructions.pop(sae, None)


class Reconstructions:
    """One SAE over the evaluation windows' positions 1..: encoded batch by batch, raw x_hat kept.

    Tokens are encoded `chunk_tokens` at a time and a wide SAE's latents in chunks (`SAE.latent_chunk`), so
    the dense pre-activations stay small (at most `SCRATCH_ELEMENTS`); latents leave as sparse codes.
    """

    def __init__(self, context: EvalContext, sae: SAE, chunk_tokens: int = 512):
        self.context, self.sae, self.chunk_tokens = context, sae, chunk_tokens
        n_windows, ctx, d = context.resid.shape
        self._x_hat = torch.empty(n_windows, ctx - 1, d)
        self._done = torch.zeros(n_windows, dtype=torch.bool)

    def encode(self, start: int, stop: int) -> tuple[torch.Tensor, Reconstruction]:
        """x (b, ctx-1, d) of windows [start, stop) and the Reconstruction of its b*(ctx-1) tokens.

        Their raw reconstructions are kept (`x_hat`)."""
        context, sae = self.context, self.sae
        x = torch.from_numpy(np.array(context.resid[start:stop, 1:])).to(context.device, sae.W_enc.dtype)
        flat, scratch = x.reshape(-1, x.shape[-1]), sae.scratch(self.chunk_tokens)
        with torch.inference_mode():
            parts = [
                sae.reconstruct(flat[i : i + self.chunk_tokens], scratch)
                for i in range(0, flat.shape[0], self.chunk_tokens)
            ]
        rec = Reconstruction.cat(parts)
        self._x_hat[start:stop] = rec.x_hat.reshape(x.shape).cpu()
        self._done[start:stop] = True
        return x, rec

    def batches(self, batch: int | None = None) -> Iterator[tuple[int, int, torch.Tensor, Reconstruction]]:
        """Yield (start, stop, x (b, ctx-1, d), Reconstruction over the b*(ctx-1) tokens) for windows."""
        for start, stop in self.context.window_batches(batch):
            yield start, stop, *self.encode(start, stop)

    def x_hat(self, start: int, stop: int) -> torch.Tensor:
        """Raw reconstructions of positions 1.. of windows [start, stop), encoding only those not yet done."""
        if not self._done[start:stop].all():
            self.encode(start, stop)
        return self._x_hat[start:stop].to(self.context.device)
