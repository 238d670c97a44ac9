"""Training on several processes under torch.distributed (launched by torchrun): data and latent parallel.

Data parallel (`latent_shards` 1, N processes): every rank holds the whole SAE and trains on its share of
every global batch (rows `tensor_split(N)[rank]` of the batch one process would train on).  The losses'
normalisers are the global batch's (sum_t ||u_t - mean u||^2 over all shares, the global token count), so
each rank's loss is its share of the one-process loss and the gradients, fired flags and logged statistics
are summed over ranks (all_reduce): the same step as one process on the global batch, up to float rounding.

Latent parallel (`latent_shards` = N = world size): rank r holds latents [r n/N, (r+1) n/N) of W_enc, b_enc
and W_dec (with their Adam moments and dead-latent counters); b_pre is replicated; every rank sees the whole
batch.  Per token (the paper's scheme):

    candidates_r = top-k of rank r's pre-activations, as (values, global indices)
    I            = top-k of all_gather(candidates)                     the same on every rank
    u_hat        = sum_r W_dec_r^T z_r + b_pre   (all_reduce)         z_r: the selected latents rank r holds

AuxK alike: each rank's top-k_aux over its own dead latents, gathered, the global top-k_aux kept.  The loss is
then computed identically on every rank; the all_reduce's backward is the identity, so each rank's sparse
backward gives exactly its own rows' gradients.  b_pre's gradient is the ranks' encoder parts summed plus
the decoder bias's counted once (its replicated uses carry 1/N before that sum).  The unit-norm projection
and Adam act per row and per element: shards need no communication there.

Both modes: the random init is drawn in full from the seeded generator on every rank (a shard keeps its rows),
b_pre is the geometric median of the same global head on every rank (broadcast from rank 0 to be sure), and a
checkpoint is the one-process training state and SAE folder (gathered, written by rank 0 only, atomically as
always), so every loader reads it and a run resumes in either layout, after a kill of any rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ranks import gather_columns as _gather_columns
from ..ranks import world_size
from ..sae.sae import Normalization, SAEInfo, SparseCodes
from ..sae.topk import row_topk
from .autoencoder import TrainableSAE, TrainOutput, nmse
from .config import TrainConfig

#: the parameters latent parallelism splits along their first (latent) axis; b_pre is replicated
SHARDED = ("W_enc", "b_enc", "W_dec")


def for_config(config: TrainConfig) -> DataParallel | LatentParallel | None:
    """How a trainer with `config` splits its work over the default group: None for one process."""
    world = world_size()
    if config.latent_shards > 1:
        if config.latent_shards != world:
            raise ValueError(
                f"latent_shards={config.latent_shards} needs as many processes, this run has {world} "
                f"(torchrun --nproc-per-node {config.latent_shards} -m saebench train ...)"
            )
        return LatentParallel(config)
    return DataParallel() if world > 1 else None


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0, in rank order (on every rank)."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class DataParallel:
    """Each rank trains on its rows of the global batch; see the module docstring."""

    shards_latents = False

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"mode": "data", "world_size": self.world}

    def local_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.tensor_split(self.world)[self.rank]

    def build_model(self, config: TrainConfig, d_in: int) -> TrainableSAE:
        model = TrainableSAE(config, d_in)
        model.variance = self.variance
        return model

    @torch.no_grad()
    def variance(self, x: torch.Tensor) -> torch.Tensor:
        """sum_t ||x_t - mean x||^2 over the global batch (every rank's share)."""
        sums = torch.cat([x.sum(0), x.new_full((1,), x.shape[0])])
        dist.all_reduce(sums)
        total = (x - sums[:-1] / sums[-1]).pow(2).sum()
        dist.all_reduce(total)
        return total

    @torch.no_grad()
    def after_initialize(self, model: TrainableSAE) -> None:
        for parameter in model.parameters():
            dist.broadcast(parameter.data, 0)

    @torch.no_grad()
    def reduce_step(self, model: TrainableSAE, fired: torch.Tensor, stats: tuple) -> tuple:
        """Sum the gradients, the fired flags and the step's statistics (shares of the global ones)."""
        for parameter in model.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
        flags = fired.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        packed = torch.stack([value.to(torch.float64) for value in stats])
        dist.all_reduce(packed)
        return flags.bool(), tuple(value.to(s.dtype) for value, s in zip(packed.unbind(), stats, strict=True))

    def dead_fraction(self, dead: torch.Tensor) -> float:
        return float(dead.double().mean())

    def full_state(self, model, model_state, optimizer_state, tokens_since_fired):
        return model_state, optimizer_state, tokens_since_fired

    def local_state(self, model, state: dict) -> dict:
        return state

    def barrier(self) -> None:
        dist.barrier()


class LatentParallel(DataParallel):
    """Each rank holds n / N latents and sees the whole batch; see the module docstring."""

    shards_latents = True

    def __init__(self, config: TrainConfig):
        super().__init__()
        if config.activation != "topk":
            raise ValueError("latent_shards applies to TopK SAEs; train the ReLU baseline data-parallel")
        if config.n_latents % self.world:
            raise ValueError(f"latent_shards={self.world} must divide n_latents={config.n_latents}")
        self.n_total = config.n_latents
        self.n_local = config.n_latents // self.world
        self.rows = slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def describe(self) -> dict:
        return {"mode": "latent", "world_size": self.world, "latent_shards": self.world}

    def local_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def build_model(self, config: TrainConfig, d_in: int) -> ShardedSAE:
        return ShardedSAE(config, d_in, self)

    @torch.no_grad()
    def after_initialize(self, model: TrainableSAE) -> None:
        dist.broadcast(model.b_pre.data, 0)

    @torch.no_grad()
    def reduce_step(self, model: TrainableSAE, fired: torch.Tensor, stats: tuple) -> tuple:
        """Only b_pre is shared: sum its gradient (the loss and its statistics are alike on every rank)."""
        if model.b_pre.grad is not None:
            dist.all_reduce(model.b_pre.grad)
        return fired, stats

    def dead_fraction(self, dead: torch.Tensor) -> float:
        count = dead.sum(dtype=torch.float64).reshape(1)
        dist.all_reduce(count)
        return float(count) / self.n_total

    def full_state(self, model, model_state, optimizer_state, tokens_since_fired):
        """The one-process model and optimizer state and dead counters, gathered from the shards (every rank
        takes part; every rank gets them)."""
        model_state = {name: _gather_rows(v) if name in SHARDED else v for name, v in model_state.items()}
        sharded_ids = [i for i, (name, _) in enumerate(model.named_parameters()) if name in SHARDED]
        states = dict(optimizer_state["state"])
        for i in sharded_ids:
            if i in states:
                states[i] = {
                    key: _gather_rows(v) if torch.is_tensor(v) and v.ndim else v
                    for key, v in states[i].items()
                }
        return model_state, {**optimizer_state, "state": states}, _gather_rows(tokens_since_fired)

    def local_state(self, model, state: dict) -> dict:
        """A one-process training state cut down to this rank's rows."""
        rows = self.rows
        sharded_ids = [i for i, (name, _) in enumerate(model.named_parameters()) if name in SHARDED]
        model_state = {name: v[rows] if name in SHARDED else v for name, v in state["model"].items()}
        optimizer = state["optimizer"]
        states = dict(optimizer["state"])
        for i in sharded_ids:
            if i in states:
                states[i] = {
                    key: v[rows] if torch.is_tensor(v) and v.ndim else v for key, v in states[i].items()
                }
        return {
            **state,
            "model": model_state,
            "optimizer": {**optimizer, "state": states},
            "tokens_since_fired": state["tokens_since_fired"][rows],
        }


class _SumOverRanks(torch.autograd.Function):
    """y = sum_r x_r on every rank.  The loss downstream is computed alike on every rank, so the gradient of
    each rank's x_r is that of y: the backward is the identity."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Replicated(torch.autograd.Function):
    """The identity, with the gradient divided by the world size: marks a use of a replicated parameter that
    every rank computes alike, so that summing the parameter's gradient over ranks counts that use once."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


class ShardedSAE(TrainableSAE):
    """This rank's latents of a TopK SAE (rows `shards.rows` of W_enc, b_enc, W_dec) and the replicated b_pre;
    the forward gives the whole SAE's loss on every rank (see the module docstring)."""

    def __init__(self, config: TrainConfig, d_in: int, shards: LatentParallel):
        super().__init__(config, d_in, n_latents=shards.n_local)
        self.shards = shards

    def _unit_rows(self, generator: torch.Generator) -> torch.Tensor:
        full = torch.randn(self.shards.n_total, self.d_in, generator=generator, dtype=torch.float64)
        rows = full[self.shards.rows]
        return rows / rows.norm(dim=1, keepdim=True)

    def _local(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows in this shard, held mask) of global latent indices (tokens, m).  Other shards' latents are
        masked (weight 0: they add nothing to this shard's sums or gradients) and take rows that none of the
        token's held latents uses, distinct among themselves, so that every token's rows stay distinct as
        the sparse kernels' CSR patterns require: the first free rows among 0 .. 2m - 1."""
        local = indices - self.shards.rows.start
        held = (local >= 0) & (local < self.n_latents)
        m = indices.shape[1]
        spare = min(2 * m, self.n_latents)
        if spare < m:  # a shard narrower than the selection: rows repeat (the CPU kernels still sum right)
            return local.where(held, 0), held
        taken = torch.zeros(indices.shape[0], spare + 1, dtype=torch.bool, device=indices.device)
        taken.scatter_(1, local.where(held & (local < spare), spare), True)  # column `spare`: a sink
        free = (~taken[:, :spare]).to(torch.int8).argsort(dim=1, descending=True, stable=True)
        rank_among_others = ((~held).cumsum(1) - 1).clamp_min(0)
        return local.where(held, free.gather(1, rank_among_others)), held

    @torch.no_grad()
    def _select(self, u: torch.Tensor, dead: torch.Tensor | None, kk: int):
        """The global top-kk per token and, over the dead latents of all shards, the global top-k_aux, as
        global indices and values, from each shard's candidates."""
        n_tokens = u.shape[0]
        offset = self.shards.rows.start
        k_aux, dead_ids = 0, None
        if dead is not None and self.auxk_alpha > 0:
            n_dead = dead.sum(dtype=torch.float64).reshape(1)
            dist.all_reduce(n_dead)
            k_aux = min(self.k_aux, int(n_dead))
            dead_ids = dead.nonzero().squeeze(1)
        local_k = min(kk, self.n_latents)
        local_aux = min(k_aux, dead_ids.numel()) if k_aux else 0
        indices = torch.empty(n_tokens, local_k, dtype=torch.int64, device=u.device)
        values = u.new_empty(n_tokens, local_k)
        # a shard with fewer dead latents than k_aux pads with -inf, never chosen (all shards hold >= k_aux)
        aux_indices = torch.zeros(n_tokens, k_aux, dtype=torch.int64, device=u.device)
        aux_values = u.new_full((n_tokens, k_aux), -torch.inf)
        for start, stop, pre in self._preactivation_chunks(u):
            row_topk(pre, local_k, out=(values[start:stop], indices[start:stop]))
            if local_aux:
                top_values, top_positions = row_topk(pre.index_select(1, dead_ids), local_aux)
                aux_values[start:stop, :local_aux] = top_values
                aux_indices[start:stop, :local_aux] = dead_ids[top_positions] + offset
        indices += offset
        indices, values = self._merge(indices, values, kk)
        aux = self._merge(aux_indices, aux_values, k_aux) if k_aux else None
        return indices, values, aux

    @staticmethod
    def _merge(indices: torch.Tensor, values: torch.Tensor, k: int):
        """The top k per token among every shard's candidates: (global indices, values)."""
        all_values, all_indices = _gather_columns(values), _gather_columns(indices)
        top_values, top = all_values.topk(k, dim=1, sorted=False)
        return all_indices.gather(1, top), top_values

    def _held_decode(self, u: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum_j z[t, j] W_dec[I[t, j]] over the selected latents this shard holds (differentiable), the
        ranks' partial sums added.  The held entries move to the front of each token's row and the columns
        no token needs are dropped, so a shard's sparse work is its share of the selection's."""
        local = indices - self.shards.rows.start
        held = (local >= 0) & (local < self.n_latents)
        width = max(1, int(held.sum(1).max()))  # the most held latents of one token
        front = (~held).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
        indices, values = indices.gather(1, front), values.gather(1, front)
        local, held = self._local(indices)
        pattern = self._pattern(local)
        z = F.relu(self._encode_selected(u, local, values, pattern)) * held.to(u.dtype)
        return _SumOverRanks.apply(self._decode(local, z, pattern))

    def _topk_forward(self, u, dead, total_variance) -> TrainOutput:
        k = self.config.k
        kk = 4 * k if self.config.multi_topk else k
        indices, values, aux = self._select(u, dead, kk)
        b_pre = _Replicated.apply(self.b_pre, self.shards.world)
        zero = total_variance.new_zeros(())
        multi = zero
        if self.config.multi_topk:
            multi = nmse(self._held_decode(u, indices, values) + b_pre, u, total_variance)
            top = values.topk(k, dim=1, sorted=False).indices
            indices, values = indices.gather(1, top), values.gather(1, top)
        u_hat = self._held_decode(u, indices, values) + b_pre
        recon = nmse(u_hat, u, total_variance)
        auxk = zero
        if aux is not None:
            error = (u - u_hat).detach()
            e_hat = self._held_decode(u, *aux)
            auxk = nmse(e_hat, error, self.variance(error)).nan_to_num(0.0)
        loss = recon + self.auxk_alpha * auxk + multi / 8
        with torch.no_grad():
            z = F.relu(values)  # every selected latent's code, known on every rank
            active = z > 0
            local = indices - self.shards.rows.start
            held = (local >= 0) & (local < self.n_latents)
            fired = torch.zeros(self.n_latents, dtype=torch.bool, device=u.device)
            fired[local[active & held]] = True
            l0 = active.sum(1, dtype=z.dtype).mean()
        return TrainOutput(SparseCodes(indices, z), fired, l0, u_hat, recon, auxk, multi, zero, loss)

    @torch.no_grad()
    def to_sae(self, normalization: Normalization, info: SAEInfo | None = None):
        """The whole SAE, gathered from the shards (every rank takes part; every rank gets it)."""
        full = TrainableSAE(self.config, self.d_in)
        full.load_state_dict(
            {name: _gather_rows(v) if name in SHARDED else v for name, v in self.state_dict().items()}
        )
        return full.to_sae(normalization, info)
