"""The reference trainer: `Trainer(config, d_in).fit(batches)` on a stream of (tokens, d) activations.

One step on a batch x of `batch_size` tokens:

    u = normalize(x)                    (per token, recorded in the checkpoint's normalisation)
    loss.backward()                     (see autoencoder.py for the losses)
    W_dec.grad -= parallel components   (keeps the unit-norm constraint first order)
    Adam step (constant lr)
    W_dec rows <- unit norm
    tokens_since_fired += N, reset to 0 for every latent active in the batch; dead = >= dead_tokens

The first `geometric_median_tokens` tokens fix b_pre (their geometric median) before training on them.
Checkpoints go to `out_dir`: the SAE in the native format in out_dir/sae (`save_native`, with the
provenance; load it with `load_sae`), the training state beside it, out_dir/training_state.pt
(`state.py`), and the log lines so far (nmse, L0, dead fraction per `log_every` steps) in
out_dir/history.jsonl; `Trainer.resume(out_dir)` carries on from the last one.

Under torchrun (a torch.distributed default group of N processes) the trainer splits each step over the
ranks, data- or latent-parallel (`distributed.py`), with the same batches, weights and checkpoints as one
process; rank 0 writes the checkpoints and shows the progress.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.cache import atomic_write_bytes
from ..sae.sae import SAE, Normalization, SAEInfo
from . import distributed
from .autoencoder import TrainableSAE
from .batches import rebatch
from .config import TrainConfig
from .geometric_median import geometric_median
from .state import read_state, write_state

#: the SAE's folder inside a run's out_dir
SAE_FOLDER = "sae"
#: the log lines so far (step, tokens, loss, nmse, l0, auxk_nmse, dead_frac, ...), one JSON object per line,
#: beside the SAE folder; rewritten at every checkpoint
HISTORY_FILE = "history.jsonl"

#: devices with a fused Adam kernel
FUSED_ADAM_DEVICES = ("cpu", "cuda")


class StepStats(NamedTuple):
    """What one optimizer step measured (tensors on the training device, read them at log time)."""

    loss: torch.Tensor
    nmse: torch.Tensor
    l0: torch.Tensor
    auxk_nmse: torch.Tensor
    l1: torch.Tensor


class Trainer:
    """Trains one SAE; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        d_in: int,
        *,
        out_dir: str | Path | None = None,
        info: SAEInfo | None = None,
    ):
        self.config = config
        self.d_in = d_in
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.info = info or SAEInfo()
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.normalization = Normalization(kind=config.input_normalization)
        #: how the work is split over torch.distributed ranks (None: one process)
        self.parallel = distributed.for_config(config)
        if self.parallel is None:
            self.model = TrainableSAE(config, d_in)
        else:
            self.model = self.parallel.build_model(config, d_in)
        #: the lr trained at and what chose it, fixed for the run (a resumed run keeps its own, see `resume`)
        self.lr, self.lr_source = config.lr_choice()
        # fused: one pass over each parameter and its two moments (the for-loop Adam makes seven, with two
        # fresh (n, d) temporaries); the same update up to float rounding (~1 ulp)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=self.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            fused=self.device.type in FUSED_ADAM_DEVICES,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.dead_tokens = config.effective_dead_tokens()
        self.tokens_since_fired = torch.zeros(self.model.n_latents, dtype=torch.int64, device=self.device)
        self.initialized = False
        self.step = 0
        self.tokens_seen = 0
        self.wall_time_s = 0.0
        #: one dict per log line: step, tokens, loss, nmse, l0, auxk_nmse, l1, l1_coefficient, dead_frac
        self.history: list[dict] = []
        self._window: list[StepStats] = []

    # --- the loop -------------------------------------------------------------------------------------------
    def fit(self, batches: Iterable[torch.Tensor], *, skip_seen: bool = True, progress: bool = True) -> SAE:
        """Train on `batches` until max_tokens or the stream's end, checkpointing to out_dir; return the SAE.

        After `resume`, pass the same stream from its start: the `step` batches already trained on are
        skipped (skip_seen=False when the stream is already positioned past them).
        """
        stream = rebatch(batches, self.config.batch_size)
        if skip_seen and self.step:
            stream = itertools.islice(stream, self.step, None)
        if not self.initialized:
            head, count = [], 0
            for x in stream:
                head.append(x)
                count += x.shape[0]
                if count >= self.config.geometric_median_tokens:
                    break
            if not head:
                raise ValueError("the activation stream is empty: nothing to initialise or train on")
            self.initialize(torch.cat(head)[: self.config.geometric_median_tokens])
            stream = itertools.chain(head, stream)
        total = math.ceil(self.config.max_tokens / self.config.batch_size) if self.config.max_tokens else None
        quiet = not progress or (self.parallel is not None and not self.parallel.is_main)
        bar = tqdm(total=total, initial=self.step, disable=quiet, unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        try:
            for x in stream:
                if self.finished:
                    break
                if x.shape[0] < 2:  # a last batch of one token has no variance: its nmse (the loss) is 0/0
                    self.tokens_seen += x.shape[0]
                    continue
                self._window.append(self.train_step(x))
                bar.update(1)
                if self.step % self.config.log_every == 0:
                    bar.set_postfix(self._log(), refresh=False)
                if self.out_dir is not None and self.config.checkpoint_every:
                    if self.step % self.config.checkpoint_every == 0:
                        self.wall_time_s += time.perf_counter() - started
                        started = time.perf_counter()
                        self.save_checkpoint()
        finally:
            bar.close()
        self.wall_time_s += time.perf_counter() - started
        if self._window:
            self._log()
        if self.out_dir is not None:
            self.save_checkpoint()
        if self.parallel is not None:
            self.parallel.barrier()  # no rank goes on before rank 0 has written the last checkpoint
        return self.to_sae()

    @property
    def finished(self) -> bool:
        return self.config.max_tokens is not None and self.tokens_seen >= self.config.max_tokens

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor) -> None:
        """b_pre = geometric median of the normalised sample; decoder/encoder from the seeded generator."""
        u, _ = self.normalization.apply(sample.to(self.device, torch.float64))
        self.model.initialize(geometric_median(u), self.generator)
        if self.parallel is not None:
            self.parallel.after_initialize(self.model)
        self.initialized = True

    def train_step(self, x: torch.Tensor) -> StepStats:
        """One optimizer step on raw activations x (tokens, d): the whole batch, also under torchrun (a
        data-parallel rank trains on its share of it)."""
        if not self.initialized:
            raise RuntimeError("call initialize(sample) (or fit) before train_step")
        n_tokens = x.shape[0]
        if self.parallel is not None:
            x = self.parallel.local_batch(x)
        x = x.to(self.device, self.dtype)
        u, _ = self.normalization.apply(x)
        total_variance = self.model.variance(u)
        if self.config.activation == "relu":
            l1_coefficient = self.l1_coefficient_at(self.step)
            # dense latents: back-propagate chunk by chunk so that memory stays bounded; each chunk's loss
            # is its share of the batch loss (sums over the batch's variance and token count)
            chunk = max(1, self.config.chunk_elements // self.model.n_latents)
            fired = torch.zeros(self.model.n_latents, dtype=torch.bool, device=self.device)
            sums = torch.zeros(5, dtype=torch.float64, device=self.device)
            for part in u.split(chunk):
                out = self.model(
                    part, total_variance=total_variance, n_tokens=n_tokens, l1_coefficient=l1_coefficient
                )
                out.loss.backward()
                fired |= out.fired
                share = part.shape[0] / n_tokens
                sums += torch.stack(
                    [out.loss.detach(), out.nmse.detach(), out.l0 * share, out.auxk_nmse, out.l1.detach()]
                )
            stats = StepStats(*sums.unbind())
        else:
            dead = self.tokens_since_fired >= self.dead_tokens
            out = self.model(u, dead=dead, total_variance=total_variance)
            out.loss.backward()
            fired = out.fired
            # a data-parallel rank's share (its rows may be none: the mean over them is then NaN)
            l0 = out.l0 if u.shape[0] == n_tokens else out.l0.nan_to_num(0.0) * (u.shape[0] / n_tokens)
            stats = StepStats(
                out.loss.detach(), out.nmse.detach(), l0, out.auxk_nmse.detach(), out.l1.detach()
            )
        if self.parallel is not None:
            fired, reduced = self.parallel.reduce_step(self.model, fired, stats)
            stats = StepStats(*reduced)
        self.model.project_decoder_grad()
        self.optimizer.step()
        if self.config.activation == "topk":
            self.model.recycle_gradients()  # this step's weight gradients hold the next step's
        self.optimizer.zero_grad(set_to_none=True)
        self.model.normalize_decoder()
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0
        self.step += 1
        self.tokens_seen += n_tokens
        return stats

    def l1_coefficient_at(self, step: int) -> float:
        """lambda for optimizer step `step` (0-based): the configured value after a linear warm-up."""
        warmup = self.config.l1_warmup * (self.config.max_tokens or 0) / self.config.batch_size
        ramp = min(1.0, (step + 1) / warmup) if warmup > 1 else 1.0
        return self.config.l1_coefficient * ramp

    def _log(self) -> dict:
        window = StepStats(*(torch.stack(column).mean() for column in zip(*self._window, strict=True)))
        self._window = []
        row = {
            "step": self.step,
            "tokens": self.tokens_seen,
            **{name: float(value) for name, value in window._asdict().items()},
            "l1_coefficient": self.l1_coefficient_at(self.step - 1)
            if self.config.activation == "relu"
            else None,
            "dead_frac": self.dead_fraction(),
        }
        self.history.append(row)
        return {"nmse": f"{row['nmse']:.4f}", "L0": f"{row['l0']:.1f}", "dead": f"{row['dead_frac']:.3f}"}

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for `dead_tokens` tokens."""
        dead = self.tokens_since_fired >= self.dead_tokens
        return float(dead.double().mean()) if self.parallel is None else self.parallel.dead_fraction(dead)

    # --- products -------------------------------------------------------------------------------------------
    def to_sae(self) -> SAE:
        """The internal SAE with the current weights and the input normalisation used in training."""
        return self.model.to_sae(replace(self.normalization), replace(self.info, extra=dict(self.info.extra)))

    def provenance(self) -> dict:
        """What `save_native` records under `training`."""
        last = self.history[-1] if self.history else {}
        return {
            "trainer": "saebench.train",
            "saebench_version": __version__,
            "torch_version": torch.__version__,
            "config": self.config.to_dict(),
            "lr": self.lr,
            "lr_source": self.lr_source,
            "k_aux": self.model.k_aux,
            "auxk_alpha": self.model.auxk_alpha,
            "dead_tokens": self.dead_tokens,
            "l1_coefficient": self.config.l1_coefficient if self.config.activation == "relu" else None,
            "input_normalization": self.normalization.to_dict(),
            "seed": self.config.seed,
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "complete": self.finished,
            "wall_time_s": round(self.wall_time_s, 3),
            "last_log": last,
            # (tokens, dead fraction) at every log step: the dead count over training (leaderboard)
            "dead_history": [[row["tokens"], round(row["dead_frac"], 6)] for row in self.history],
            **({} if self.parallel is None else {"distributed": self.parallel.describe()}),
        }

    @property
    def sae_dir(self) -> Path | None:
        """Where checkpoints put the SAE (native format)."""
        return None if self.out_dir is None else self.out_dir / SAE_FOLDER

    def save_checkpoint(self) -> Path:
        """Training state (atomic) first, then the SAE folder (replaced atomically); returns that folder.

        Under torchrun every rank calls it (latent shards are gathered) and rank 0 alone writes."""
        from ..sae.formats.native import save_native

        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir to save checkpoints to")
        writes = self.parallel is None or self.parallel.is_main
        if not writes and not self.parallel.shards_latents:
            return self.sae_dir
        state, sae = self._state(), self.to_sae()
        if not writes:
            return self.sae_dir
        write_state(self.out_dir, state)
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write_bytes(self.out_dir / HISTORY_FILE, lines.encode())
        return save_native(sae, self.sae_dir, training=self.provenance())

    def _state(self) -> dict:
        model_state = {name: value.detach() for name, value in self.model.state_dict().items()}
        optimizer_state, tokens_since_fired = self.optimizer.state_dict(), self.tokens_since_fired
        if self.parallel is not None:  # latent parallel: the one-process layout, gathered from the shards
            model_state, optimizer_state, tokens_since_fired = self.parallel.full_state(
                self.model, model_state, optimizer_state, tokens_since_fired
            )
        return {
            "config": self.config.to_dict(),
            "d_in": self.d_in,
            "info": {key: value for key, value in asdict(self.info).items() if key != "extra"},
            "model": {name: value.cpu() for name, value in model_state.items()},
            "optimizer": optimizer_state,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "tokens_since_fired": tokens_since_fired.cpu(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "initialized": self.initialized,
            "wall_time_s": self.wall_time_s,
            "history": self.history,
            "lr": self.lr,
            "lr_source": self.lr_source,
        }

    @classmethod
    def resume(
        cls, out_dir: str | Path, *, device: str | None = None, latent_shards: int | None = None
    ) -> Trainer:
        """A trainer in the state of out_dir's last checkpoint (optionally moved to another device, or to
        another number of latent shards: the state file is the same for every layout)."""
        state = read_state(out_dir, map_location="cpu")
        config = TrainConfig(**state["config"])
        if device is not None:
            config = replace(config, device=device)
        if latent_shards is not None:
            config = replace(config, latent_shards=latent_shards)
        trainer = cls(config, state["d_in"], out_dir=out_dir, info=SAEInfo(**state["info"]))
        if trainer.parallel is not None:
            state = trainer.parallel.local_state(trainer.model, state)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step = state["step"]
        trainer.tokens_seen = state["tokens_seen"]
        trainer.tokens_since_fired.copy_(state["tokens_since_fired"])
        trainer.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        trainer.initialized = state["initialized"]
        trainer.wall_time_s = state["wall_time_s"]
        trainer.history = state["history"]
        if "lr" in state:  # the lr the run started at, even if the trend in force has changed since
            trainer.lr, trainer.lr_source = state["lr"], state["lr_source"]
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.lr
        return trainer
