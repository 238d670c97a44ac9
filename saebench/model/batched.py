"""Batched runs of the subject model for metrics: ragged sequences to the site, edited residuals from it.

With L the site layer, x = to_site(ids, L) (B, T, d) and h = from_site(x, L) (see `saebench.model.subject`):

  to the site    `site_residuals(model, sequences, L, positions)`: x of every sequence at the chosen
                 positions, as a ragged concatenation (rows, d) + offsets.  Sequences are sorted by length
                 (stable) and cut into batches of at most `token_budget` padded tokens, right-padded with
                 the EOS id: the model is causal, so padding never reaches an earlier token, and a row equals
                 `to_site` of the same right-padded batch bit for bit.
  from the site  `run_from_site(model, x, L, replacement=, edits=, positions=, output=, reduce=)`: with x' the
                 edited residual (the replacement, or x, plus additive `SiteEdits` x'[r, p] += delta), returns
                 h' = from_site(x', L), its logits l' = head(h'), or l' - l against the unedited run, at the
                 chosen positions (with a linear head l' - l = W (h' - h), one head pass).  A `reduce`
                 over the vocabulary (e.g. `median_centred_norms`) is applied
                 `chunk` rows at a time, so (positions x vocabulary) is never held for the whole batch.
  KV reuse       `cache_above_site(model, x, L)` runs the clean windows above the site once and keeps every
                 block's keys/values.  An edit at position t leaves positions < t unchanged, so the edited
                 run of positions t..t+T-1 only needs the cached keys of positions < t:
                     h'_{t+i} = blocks_{L+1..}(x'_{t..t+T-1} | K, V of the clean positions < t)
                 equal to the full rerun up to float rounding.  `UpperCache.run_edits` does this for a batch
                 of (window, t, delta) continuations at once (several windows and t, many edits per prefix).

Memory: `batch_tokens(model, memory_bytes, seq_len)` turns a byte budget into padded tokens per forward from
the model's shape (width, depth, MLP width, heads, dtype), never from a per-model table.  Call under
`torch.inference_mode()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers import DynamicCache

from saebench.model.scoring import CHUNK, has_linear_head

#: bytes of working memory one forward may use, by default
DEFAULT_MEMORY_BYTES = 1 << 30
#: named position choices of `site_residuals`
POSITION_CHOICES = ("all", "after_bos", "last")

Reduction = Callable[[torch.Tensor], "torch.Tensor | dict[str, torch.Tensor]"]


class Ragged(NamedTuple):
    """Rows of many sequences, concatenated: sequence i owns values[offsets[i]:offsets[i + 1]]."""

    #: (rows, d)
    values: torch.Tensor
    #: (n_sequences + 1,) int64
    offsets: torch.Tensor


class SiteEdits(NamedTuple):
    """Additive edits of a site residual: resid[rows[k], positions[k]] += deltas[k] (repeats add up)."""

    #: (k,) int64 batch rows
    rows: torch.Tensor
    #: (k,) int64 token positions
    positions: torch.Tensor
    #: (k, d)
    deltas: torch.Tensor


# --- memory budget ------------------------------------------------------------------------------------------


def _config_int(config, names: Sequence[str], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return default


def bytes_per_token(model, seq_len: int) -> int:
    """Peak working memory one token adds to a forward of `seq_len` tokens, from the model's shape.

    Inference frees a block's temporaries before the next block runs, so one block's working set counts:
    residual, normed input, attention input/output and q/k/v (~8 d), the MLP's gate, up and activation
    (3 x intermediate), and float32 attention scores (heads x seq_len; eager attention materialises them).
    """
    config = model.hf_model.config
    d = model.d_model
    intermediate = _config_int(config, ("intermediate_size", "n_inner"), 4 * d)
    heads = _config_int(config, ("num_attention_heads", "n_head"), 1)
    return _dtype_bytes(model) * (8 * d + 3 * intermediate) + 4 * heads * seq_len


def kv_bytes_per_token(model, n_layers: int) -> int:
    """Bytes of one token's keys and values in `n_layers` blocks (2 x kv heads x head dim each)."""
    config = model.hf_model.config
    heads = _config_int(config, ("num_attention_heads", "n_head"), 1)
    head_dim = _config_int(config, ("head_dim",), model.d_model // heads)
    kv_heads = _config_int(config, ("num_key_value_heads",), heads)
    return _dtype_bytes(model) * 2 * kv_heads * head_dim * n_layers


def _dtype_bytes(model) -> int:
    return torch.finfo(model.dtype).bits // 8


def batch_tokens(model, memory_bytes: int = DEFAULT_MEMORY_BYTES, seq_len: int = 1) -> int:
    """Padded tokens per forward that fit `memory_bytes` (at least one sequence of `seq_len`)."""
    return max(seq_len, memory_bytes // bytes_per_token(model, seq_len))


def token_batches(lengths: Sequence[int], budget: int, max_padding: float | None = None) -> list[list[int]]:
    """Split sequences, given in order of non-decreasing length, into batches of <= `budget` padded tokens.

    Returns index lists into `lengths`; a batch pads to its last (longest) member, and a sequence longer
    than the budget runs alone.  With `max_padding` f, a batch also ends before a member longer than
    (1 + f) times its first member's length plus one token, so that padding stays near f of the tokens
    (ragged lengths: many small batches of nearly equal lengths instead of a few padded ones).
    """
    batches, current = [], []
    for i, n in enumerate(lengths):
        too_long = max_padding is not None and current and n > (1 + max_padding) * lengths[current[0]] + 1
        if current and ((len(current) + 1) * int(n) > budget or too_long):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


# --- to the site --------------------------------------------------------------------------------------------


def _picks(positions, lengths: list[int]) -> list[torch.Tensor]:
    """Per sequence, the positions to return, as int64 tensors."""
    if isinstance(positions, str):
        if positions not in POSITION_CHOICES:
            raise ValueError(
                f"positions must be one of {POSITION_CHOICES} or position lists, got {positions!r}"
            )
        start = {"all": lambda n: 0, "after_bos": lambda n: 1, "last": lambda n: n - 1}[positions]
        return [torch.arange(start(n), n) for n in lengths]
    if len(positions) != len(lengths):
        raise ValueError(f"got {len(positions)} position lists for {len(lengths)} sequences")
    picks = []
    for i, (p, n) in enumerate(zip(positions, lengths, strict=True)):
        p = torch.as_tensor(p, dtype=torch.long).reshape(-1)
        if len(p) and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"sequence {i} has {n} tokens; positions {p.tolist()} are out of range")
        picks.append(p)
    return picks


def site_residuals(
    model,
    sequences: Sequence[Sequence[int] | torch.Tensor],
    layer: int,
    positions: str | Sequence[Sequence[int] | torch.Tensor] = "after_bos",
    *,
    token_budget: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    pad_id: int | None = None,
    max_padding: float | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_device: str | torch.device = "cpu",
) -> Ragged:
    """Residuals after block `layer` of ragged token sequences at the chosen positions.

    positions: "all", "after_bos" (1.. of each), "last" (one row per sequence), or one position list per
        sequence (rows in the order given).
    token_budget: padded tokens per forward (the batching rule of `token_batches`); by default from
        `memory_bytes` and the model's shape.  Sequences with no position to return are not run.
    pad_id: right-padding token, the model's EOS id by default.
    max_padding: cut batches at length jumps too, keeping padding near this fraction (see `token_batches`).
    Returns rows in input order: sequence i's at values[offsets[i]:offsets[i + 1]], (rows, d) `out_dtype`.
    """
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    lengths = [len(s) for s in seqs]
    if any(n == 0 for n in lengths):
        raise ValueError("every sequence needs at least one token")
    picks = _picks(positions, lengths)
    counts = torch.tensor([len(p) for p in picks], dtype=torch.long)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=offsets[1:])
    out = torch.empty(int(offsets[-1]), model.d_model, dtype=out_dtype, device=out_device)
    members = sorted((i for i in range(len(seqs)) if counts[i] > 0), key=lambda i: lengths[i])
    if token_budget is None:
        token_budget = batch_tokens(model, memory_bytes, max(lengths, default=1))
    pad = model.eos_id if pad_id is None else pad_id
    for batch in token_batches([lengths[i] for i in members], token_budget, max_padding):
        batch = [members[j] for j in batch]
        ids = torch.full((len(batch), lengths[batch[-1]]), pad, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = seqs[i]
        h = model.to_site(ids.to(model.device), layer)
        rows = torch.cat([torch.full((len(picks[i]),), r) for r, i in enumerate(batch)]).to(h.device)
        cols = torch.cat([picks[i] for i in batch]).to(h.device)
        dest = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in batch]).to(out_device)
        out[dest] = h[rows, cols].to(out_dtype).to(out_device)
    return Ragged(out, offsets)


# --- from the site ------------------------------------------------------------------------------------------


def median_centred_norms(diff: torch.Tensor, *, overwrite: bool = False) -> dict[str, torch.Tensor]:
    """Per row of logit differences (n, V): the (lower) median m, and the L1 and L2 norms of diff - m.

    overwrite: diff is scratch (a buffer of `run_from_site`'s reduce): its rows are left permuted and centred
    instead of copied.  On CPU the median is numpy's introselect (`partition`), an exact selection about 10x
    faster than torch's `median` over a 49k vocabulary; the norms do not depend on the order within a row.
    """
    work = diff if overwrite else diff.clone()
    if work.device.type == "cpu" and work.dtype in (torch.float32, torch.float64) and work.shape[-1] > 0:
        k = (work.shape[-1] - 1) // 2
        work.detach().numpy().partition(k, axis=-1)
        median = work[:, k].clone()
    else:
        median = work.median(-1).values
    centred = work.sub_(median[:, None])
    l2 = torch.linalg.vector_norm(centred, dim=-1)
    return {"median": median, "l1": centred.abs_().sum(-1), "l2": l2}


def _head_rows(model, final: torch.Tensor, clean: torch.Tensor | None, reduce: Reduction | None, chunk: int):
    """logits(final) (- logits(clean)) per row of (N, d), float32, reduced `chunk` rows at a time.

    With a linear head (no softcapping) the difference is one head pass, W (h' - h): the bias cancels, and the
    difference is not the small remainder of two rounded logit vectors.  With a `reduce`, the float32 rows
    are written into one (chunk, V) buffer reused by every chunk (a fresh 50 MB tensor per chunk costs its
    page faults): the reduction may overwrite its argument and must return new tensors, not views of it.
    """
    linear = clean is not None and has_linear_head(model)
    weight = model.family.head.weight
    scratch = None
    if linear and reduce is not None and weight.dtype == torch.float32:
        scratch = torch.empty(min(chunk, final.shape[0]), model.vocab_size, device=final.device)
    parts = []
    for i in range(0, final.shape[0], chunk):
        if linear:
            step = final[i : i + chunk] - clean[i : i + chunk]
            if scratch is not None:
                logits = torch.matmul(step, weight.t(), out=scratch[: step.shape[0]])
            else:
                logits = torch.nn.functional.linear(step, weight).float()
        else:
            logits = model.logits(final[i : i + chunk]).float()
            if clean is not None:
                logits.sub_(model.logits(clean[i : i + chunk]).float())
        parts.append(reduce(logits) if reduce is not None else logits)
    if not parts:
        empty = torch.empty(0, model.vocab_size, device=final.device)
        parts = [reduce(empty) if reduce is not None else empty]
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _select(hidden: torch.Tensor, positions) -> torch.Tensor:
    """hidden (B, T, d) at positions: None (all), a slice, (P,) shared by every row, or (B, P) per row."""
    if positions is None:
        return hidden
    if isinstance(positions, slice):
        return hidden[:, positions]
    positions = torch.as_tensor(positions, dtype=torch.long, device=hidden.device)
    if positions.ndim == 1:
        return hidden[:, positions]
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return hidden[rows, positions]


def _unflatten(result, shape: tuple[int, ...]):
    if isinstance(result, dict):
        return {k: v.reshape(*shape, *v.shape[1:]) for k, v in result.items()}
    return result.reshape(*shape, *result.shape[1:])


def apply_edits(resid: torch.Tensor, edits: SiteEdits) -> torch.Tensor:
    """A copy of resid (B, T, d) with the edits added."""
    edited = resid.clone()
    index = (edits.rows.to(resid.device), edits.positions.to(resid.device))
    edited.index_put_(index, edits.deltas.to(resid.device, resid.dtype), accumulate=True)
    return edited


def run_from_site(
    model,
    resid: torch.Tensor,
    layer: int,
    *,
    replacement: torch.Tensor | None = None,
    edits: SiteEdits | None = None,
    positions=None,
    output: str = "final",
    reduce: Reduction | None = None,
    clean_final: torch.Tensor | None = None,
    chunk: int = CHUNK,
):
    """Run blocks above the site on an edited residual and return `output` at `positions`.

    resid (B, T, d): the clean residual at the site.  The edited one is `replacement` (B, T, d) if given,
        else resid, plus `edits`.
    positions: None (all), a slice, (P,) positions shared by all rows, or (B, P) per row.
    output: "final" (final-normed hidden (B, P, d)), "logits" or "logit_diff" (edited - clean logits), float32
        (B, P, V), or with `reduce` (a function of (n, V) float32 rows returning (n, ...) or a dict of them)
        its result shaped (B, P, ...), computed `chunk` rows at a time (the rows may sit in a reused buffer:
        a reduction may overwrite them and returns new tensors, never views of its argument).
    clean_final (B, T, d): the clean run's final hidden state, if already known (for "logit_diff").
    "final" equals `model.from_site` of the edited residual bit for bit.
    """
    if output not in ("final", "logits", "logit_diff"):
        raise ValueError(f"output must be 'final', 'logits' or 'logit_diff', got {output!r}")
    if reduce is not None and output == "final":
        raise ValueError("reduce applies to logits; ask for output='logits' or 'logit_diff'")
    edited = replacement if replacement is not None else resid
    if edits is not None:
        edited = apply_edits(edited, edits)
    final = _select(model.from_site(edited, layer), positions)
    if output == "final":
        return final
    clean = None
    if output == "logit_diff":
        clean = _select(clean_final if clean_final is not None else model.from_site(resid, layer), positions)
        clean = clean.reshape(-1, clean.shape[-1])
    shape = tuple(final.shape[:-1])
    return _unflatten(_head_rows(model, final.reshape(-1, final.shape[-1]), clean, reduce, chunk), shape)


# --- KV reuse -----------------------------------------------------------------------------------------------


class UpperCache:
    """The clean run of windows above the site, kept so edited continuations rerun only their suffix.

    Holds the clean site residual `resid` (W, ctx, d), the clean final-normed hidden state `final`, and, where
    the family supports it (`Family.reuses_keys`: llama-style decoders, GPT-2, GPT-NeoX under sdpa or eager
    attention), every block's keys and values above the site, (W, kv heads, ctx, head dim) per block: build
    one per batch of windows.  Elsewhere (other families, flash or flex attention) `run_edits` reruns full
    windows instead: the same results, at full cost.

    The blocks run are layer + 1 .. stop - 1 (stop: the model's depth by default).  `layer = -1` starts at
    the embeddings (`resid` = `Family.embed` of the tokens, edits = differences of token embeddings), and a
    `stop` below the depth ends at a site: then `final` and output "final" are the residual after block
    stop - 1, not final-normed (`token_cache`).
    """

    def __init__(
        self,
        model,
        resid: torch.Tensor,
        layer: int,
        *,
        reuse: bool | None = None,
        batch: int | None = None,
        stop: int | None = None,
    ):
        if layer != -1:
            model._check_layer(layer)
        self.stop = model.n_layers if stop is None else stop
        if not layer < self.stop <= model.n_layers:
            raise ValueError(f"stop must lie in {layer + 1}..{model.n_layers}, got {self.stop}")
        self.model, self.layer = model, layer
        self.resid = resid.to(model.device, model.dtype)
        n_windows, self.ctx, _ = self.resid.shape
        family = model.family
        self.reuse = family.reuses_keys if reuse is None else reuse and family.reuses_keys
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        upper = range(layer + 1, self.stop)
        if batch is None:
            batch = max(1, DEFAULT_MEMORY_BYTES // (self.ctx * bytes_per_token(model, self.ctx)))
        finals, keys, values = [], [[] for _ in upper], [[] for _ in upper]
        for lo in range(0, n_windows, batch):
            x = self.resid[lo : lo + batch]
            if not self.reuse:
                finals.append(self._norm(family.run_blocks(x, layer + 1, self.stop)))
                continue
            cache = DynamicCache()
            h = family.run_blocks_with(
                x, layer + 1, self.stop, family.block_inputs(x), **{family.cache_kwarg: cache}
            )
            finals.append(self._norm(h))
            for j, i in enumerate(upper):
                keys[j].append(cache.layers[i].keys)
                values[j].append(cache.layers[i].values)
        self.final = torch.cat(finals)
        if self.reuse:
            self.keys = [torch.cat(k) for k in keys]
            self.values = [torch.cat(v) for v in values]

    def _norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.family.final_norm(h) if self.stop == self.model.n_layers else h

    def _suffix_final(self, windows: torch.Tensor, starts: torch.Tensor, deltas: torch.Tensor, n: int):
        """Final hidden (B, n, d) of continuations: window w_b, edited by deltas (B, S, d) at t_b.."""
        family, layer = self.model.family, self.layer
        device = self.resid.device
        steps = torch.arange(n, device=device)
        positions = starts[:, None] + steps  # (B, n)
        inside = positions < self.ctx
        clamped = positions.clamp(max=self.ctx - 1)
        if not self.reuse:
            full = self.resid[windows].clone()
            rows = torch.arange(len(windows), device=device)[:, None].expand(-1, deltas.shape[1])
            at = starts[:, None] + torch.arange(deltas.shape[1], device=device)
            keep = at < self.ctx
            full.index_put_((rows[keep], at[keep]), deltas[keep], accumulate=True)
            final = self._norm(family.run_blocks(full, layer + 1, self.stop))
            return final[torch.arange(len(windows), device=device)[:, None], clamped]
        x = self.resid[windows[:, None], clamped] * inside[..., None]
        x[:, : deltas.shape[1]] += deltas * inside[:, : deltas.shape[1], None]
        prefix = int(starts.max())
        cache = DynamicCache()
        if prefix > 0:
            for j, i in enumerate(range(layer + 1, self.stop)):
                cache.update(self.keys[j][windows, :, :prefix], self.values[j][windows, :, :prefix], i)
        before = torch.arange(prefix, device=device).expand(len(windows), -1)
        key_positions = torch.cat([before, positions], 1)
        key_valid = torch.cat([before < starts[:, None], torch.ones_like(inside)], 1)
        inputs = family.suffix_inputs(x, positions, key_positions, key_valid)
        h = family.run_blocks_with(x, layer + 1, self.stop, inputs, **{family.cache_kwarg: cache})
        return self._norm(h)

    def run_edits(
        self,
        windows,
        starts,
        deltas: torch.Tensor,
        *,
        n_positions: int = 16,
        output: str = "logit_diff",
        reduce: Reduction | None = None,
        batch: int | None = None,
        chunk: int = CHUNK,
    ):
        """Edited continuations b = (window w_b, start t_b, deltas): positions t_b..t_b+n_positions-1.

        windows, starts: (B,) ints.  deltas: (B, d), added at t_b, or (B, S, d), added at t_b..t_b+S-1.
        output: as in `run_from_site` ("final", "logits", "logit_diff" against the clean run), (B, n, ...);
        positions past the window's end are NaN.  Continuations run `batch` at a time (by default from the
        memory budget), reusing the clean keys of positions < t_b where `reuse` is on.
        """
        model, device = self.model, self.resid.device
        if output not in ("final", "logits", "logit_diff"):
            raise ValueError(f"output must be 'final', 'logits' or 'logit_diff', got {output!r}")
        if output != "final" and self.stop < model.n_layers:
            raise ValueError(
                f"output {output!r} needs the run to reach the head; this cache stops at {self.stop}"
            )
        windows = torch.as_tensor(windows, dtype=torch.long, device=device).reshape(-1)
        starts = torch.as_tensor(starts, dtype=torch.long, device=device).reshape(-1)
        deltas = deltas.to(device, model.dtype)
        deltas = deltas[:, None] if deltas.ndim == 2 else deltas
        if not len(windows) == len(starts) == len(deltas):
            raise ValueError(f"got {len(windows)} windows, {len(starts)} starts and {len(deltas)} deltas")
        if len(starts) and (int(starts.min()) < 0 or int(starts.max()) >= self.ctx):
            raise ValueError(f"starts must lie in 0..{self.ctx - 1}")
        if deltas.shape[1] > n_positions:
            raise ValueError(f"deltas cover {deltas.shape[1]} positions, more than n_positions={n_positions}")
        if batch is None:  # per continuation: its suffix's forward and three copies of its prefix's keys
            upper = self.stop - self.layer - 1 if self.reuse else 0
            per = n_positions * bytes_per_token(model, self.ctx + n_positions)
            per += 3 * self.ctx * kv_bytes_per_token(model, upper)
            if not self.reuse:
                per = self.ctx * bytes_per_token(model, self.ctx)
            batch = max(1, DEFAULT_MEMORY_BYTES // per)
        parts = []
        for lo in range(0, len(windows), batch):
            w, t = windows[lo : lo + batch], starts[lo : lo + batch]
            final = self._suffix_final(w, t, deltas[lo : lo + batch], n_positions)
            positions = t[:, None] + torch.arange(n_positions, device=device)
            inside = positions < self.ctx
            if output == "final":
                parts.append(final.masked_fill(~inside[..., None], float("nan")))
                continue
            clean = None
            if output == "logit_diff":
                clean = self.final[w[:, None].expand_as(positions)[inside], positions[inside]]
            rows = _head_rows(model, final[inside], clean, reduce, chunk)
            parts.append(_scatter_rows(rows, inside))
        if isinstance(parts[0], dict):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return torch.cat(parts)


def _scatter_rows(rows, inside: torch.Tensor):
    """Rows for the True entries of `inside` (B, n) placed in a NaN-filled (B, n, ...) tensor."""
    if isinstance(rows, dict):
        return {k: _scatter_rows(v, inside) for k, v in rows.items()}
    out = torch.full((*inside.shape, *rows.shape[1:]), float("nan"), dtype=rows.dtype, device=rows.device)
    out[inside] = rows
    return out


def cache_above_site(model, resid: torch.Tensor, layer: int, **kwargs) -> UpperCache:
    """Run the clean windows resid (W, ctx, d) above the site once and keep what edited reruns reuse."""
    return UpperCache(model, resid, layer, **kwargs)


def token_cache(model, ids: torch.Tensor, layer: int, **kwargs) -> UpperCache:
    """Run token sequences ids (W, T) to the site after block `layer` once, keeping every block's keys.

    `final[:, p]` is the site residual at position p (as `model.to_site`), and `run_edits` with
    `token_deltas(model, old, new)` as deltas gives the site residuals of the sequences with tokens replaced
    at the starts, running only positions start.. on the cached keys of the earlier ones."""
    model._check_layer(layer)
    embedded = model.family.embed(ids.to(model.device, torch.long))
    return UpperCache(model, embedded, -1, stop=layer + 1, **kwargs)


def token_deltas(model, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """(N, d) embedding differences that replace token old[i] by new[i] (position terms cancel)."""
    embed = model.family.embed
    pair = torch.stack([torch.as_tensor(old), torch.as_tensor(new)], 1).to(model.device, torch.long)
    e = embed(pair.reshape(-1, 1)).reshape(len(pair), 2, -1)
    return e[:, 1] - e[:, 0]
