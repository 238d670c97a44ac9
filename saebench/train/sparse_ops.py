"""Autograd through the k selected latents only: the trainer's sparse encoder and decoder.

With indices I (N, m) of the selected latents per token:

    encoder  a[t, j] = (u[t] - b_pre) . W_enc[I[t, j]] + b_enc[I[t, j]]      (W_enc stored (n, d))
    decoder  y[t]    = sum_j z[t, j] W_dec[I[t, j]]

Their gradients touch only the selected rows, so a step costs O(N m d) besides the dense forward matmul
that chooses I (dense autograd would spend another two (N, n, d) matmuls in the backward):

    encoder  dW_enc[i] = sum_{I[t,j]=i} g[t,j] (u[t] - b_pre)      db_enc[i] = sum_{I[t,j]=i} g[t,j]
             du[t]     = sum_j g[t,j] W_enc[I[t,j]]                 db_pre    = -sum_t du[t]
    decoder  dW_dec[i] = sum_{I[t,j]=i} z[t,j] G[t]                dz[t,j]   = G[t] . W_dec[I[t,j]]

Two primitives cover all of them: `scatter_outer` (rows of dW: dW = G^T V with G the (N, n) selection
matrix, m nonzeros per token, as one sparse CSR (n x N) @ dense product on the selection grouped by latent,
`latent_major`, which the encoder and decoder backward of one selection share) and `gathered_dot` (a dot
product per selected latent: a sampled dense-dense matmul on the CSR pattern of I); sums of selected rows
are `F.embedding_bag`.  A dense G^T V would cost another (n x N x d) matmul, as much as the forward's.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

#: largest (tokens x selected x d) block `scatter_outer` holds at once: 64 MiB in float32 (few, large
#: ops: on a loaded machine every parallel region waits for its slowest thread)
CHUNK_ELEMENTS = 1 << 24


#: `latent_major`'s result: (crow, order, tokens)
Pattern = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: devices whose sparse CSR @ dense product `scatter_outer` uses (MKL on CPU, cuSPARSE on CUDA)
_CSR_DEVICES = ("cpu", "cuda")


def _chunk_tokens(m: int, d: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, m * d))


def _sort_dtype(n_rows: int) -> torch.dtype:
    """The narrowest integer type holding 0 .. n_rows - 1: a stable sort of 131,072 int16 keys takes ~2 ms
    here, of int32 ~20 ms and of int64 ~100 ms (on a loaded 2-core machine)."""
    for dtype in (torch.int16, torch.int32):
        if n_rows - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def latent_major(indices: torch.Tensor, n_rows: int) -> Pattern:
    """The selections grouped by latent: (crow (n_rows + 1,), order (N m,), tokens (N m,)) such that the flat
    positions p = t m + j with indices[t, j] == i are order[crow[i]:crow[i + 1]], in increasing p (token
    order), and tokens = order // m are their tokens.

    That is the CSR pattern of the (n_rows x N) transposed selection matrix; computed once per selection, it
    serves every per-latent sum over it (`scatter_outer`)."""
    flat = indices.reshape(-1)
    order = flat.to(_sort_dtype(n_rows)).sort(stable=True).indices
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
    return crow, order, order // indices.shape[1]


def scatter_outer(
    indices: torch.Tensor,
    coeff: torch.Tensor,
    vectors: torch.Tensor,
    n_rows: int,
    pattern: Pattern | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (n_rows, d) with out[i] = sum over (t, j) with indices[t, j] == i of coeff[t, j] * vectors[t].

    `out`: a tensor to overwrite with the result (its contents are ignored), or None for a new one.

    On CPU and CUDA: one sparse (CSR, n_rows x N, m nonzeros per column) @ dense (N x d) product, its
    nonzeros in token order (`pattern` is `latent_major(indices, n_rows)` when the caller has it);
    elsewhere index_add_ over token chunks.  The two agree to rounding: the order in which the sparse
    kernel adds a row's terms is the library's (bitwise the index_add_ sum on the machines this was first
    tested on; on an AVX-512 Xeon, MKL's kernel orders them otherwise, 1e-15 apart in float64)."""
    n_tokens, m = indices.shape
    d = vectors.shape[1]
    if vectors.device.type in _CSR_DEVICES and n_tokens * m:
        crow, order, tokens = pattern if pattern is not None else latent_major(indices, n_rows)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            selection = torch.sparse_csr_tensor(
                crow,
                tokens,
                coeff.reshape(-1)[order],
                (n_rows, n_tokens),
                check_invariants=False,
            )
        # into an uninitialised result with beta=0: `selection @ vectors` would zero-fill a result, compute
        # into a second one and copy it over (two extra passes over (n_rows, d))
        out = vectors.new_empty(n_rows, d) if out is None else out
        return torch.addmm(out, selection, vectors, beta=0, out=out)
    out = vectors.new_zeros(n_rows, d) if out is None else out.zero_()
    chunk = max(1, min(n_tokens, _chunk_tokens(m, d)))  # >= 1: a data-parallel share may be empty
    buffer = vectors.new_empty(chunk, m, d)
    for start in range(0, n_tokens, chunk):
        stop = min(n_tokens, start + chunk)
        block = buffer[: stop - start]
        torch.mul(coeff[start:stop, :, None], vectors[start:stop, None, :], out=block)
        out.index_add_(0, indices[start:stop].reshape(-1), block.view(-1, d))
    return out


def gathered_dot(indices: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """out (N, m) with out[t, j] = rows[indices[t, j]] . vectors[t]; indices distinct within each token.

    A sampled dense-dense matmul: (vectors @ rows^T) evaluated only at the CSR pattern of `indices`.  The CPU
    kernel computes every sampled entry on its own, so there the columns go in unsorted (and the values come
    back in the order of `indices`); elsewhere they are sorted per token first and the result unsorted."""
    n_tokens, m = indices.shape
    unsorted = vectors.device.type == "cpu"
    if unsorted:
        columns, order = indices, None
    else:
        order = indices.argsort(dim=1)
        columns = indices.gather(1, order)
    crow = torch.arange(0, n_tokens * m + 1, m, device=indices.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow,
            columns.reshape(-1),
            vectors.new_zeros(n_tokens * m),
            (n_tokens, rows.shape[0]),
            check_invariants=False,
        )
    sampled = torch.sparse.sampled_addmm(pattern, vectors, rows.T, beta=0.0).values().view(n_tokens, m)
    return sampled if order is None else torch.empty_like(sampled).scatter_(1, order, sampled)


def _take(pool: list[torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor | None:
    """A spare tensor of like's shape, dtype and device, removed from `pool` (None if it has none).

    The trainer puts last step's weight gradients back into the pool after the optimizer step; the
    backward computes this step's into them and hands them to autograd, which makes them the parameters'
    .grad again without a copy (it keeps a gradient it is given that nothing else refers to).  That spares
    two fresh (n, d) tensors a step (~20 ms per 64 MB in page faults here)."""
    while pool:
        spare = pool.pop()
        if spare.shape == like.shape and spare.dtype == like.dtype and spare.device == like.device:
            return spare
    return None


class SelectedPreactivations(torch.autograd.Function):
    """a[t, j] = (u[t] - b_pre) . W_enc[I[t, j]] + b_enc[I[t, j]], with gradients through the selected rows.

    `values`, when given, must equal that forward result (the trainer has it from the dense pre-activations
    it picked I from, so the forward costs nothing); pass None to compute it here.
    """

    @staticmethod
    def forward(ctx, u, b_pre, W_enc, b_enc, indices, values=None, pattern=None, pool=None):
        centred = u - b_pre
        if values is None:
            values = gathered_dot(indices, W_enc, centred) + b_enc[indices]
        else:
            values = values.clone()
        ctx.save_for_backward(centred, W_enc, indices)
        ctx.pattern, ctx.pool = pattern, pool
        ctx.mark_non_differentiable(indices)
        return values

    @staticmethod
    def backward(ctx, grad):
        centred, W_enc, indices = ctx.saved_tensors
        need_u, need_b_pre, need_w, need_b = ctx.needs_input_grad[:4]
        grad_u = grad_b_pre = grad_w = grad_b = None
        grad = grad.contiguous()
        if need_b or need_b_pre:
            # per-latent sums of g: db_enc, and db_pre = -W_enc^T db_enc without an (N, d) intermediate
            per_latent = grad.new_zeros(W_enc.shape[0]).index_add_(0, indices.reshape(-1), grad.reshape(-1))
            grad_b = per_latent if need_b else None
            grad_b_pre = -(per_latent @ W_enc) if need_b_pre else None
        if need_u:
            grad_u = F.embedding_bag(indices, W_enc, per_sample_weights=grad, mode="sum")
        if need_w:
            out = _take(ctx.pool, W_enc)
            grad_w = scatter_outer(indices, grad, centred, W_enc.shape[0], ctx.pattern, out)
        return grad_u, grad_b_pre, grad_w, grad_b, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """y[t] = sum_j z[t, j] W_dec[I[t, j]] (no bias), with gradients through the selected rows only."""

    @staticmethod
    def forward(ctx, indices, z, W_dec, pattern=None, pool=None):
        ctx.save_for_backward(indices, z, W_dec)
        ctx.pattern, ctx.pool = pattern, pool
        return F.embedding_bag(indices, W_dec, per_sample_weights=z, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        indices, z, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_z = gathered_dot(indices, W_dec, grad) if ctx.needs_input_grad[1] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = scatter_outer(indices, z, grad, W_dec.shape[0], ctx.pattern, _take(ctx.pool, W_dec))
        return None, grad_z, grad_w, None, None


def selected_preactivations(
    u: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor | None = None,
    pattern: Pattern | None = None,
    pool: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """See `SelectedPreactivations`; `pattern`: `latent_major(indices, n)` when the caller shares it;
    `pool`: spare W_enc-shaped tensors the backward may take one of to hold dW_enc (see `_take`)."""
    return SelectedPreactivations.apply(u, b_pre, W_enc, b_enc, indices, values, pattern, pool)


def sparse_decode(
    indices: torch.Tensor,
    z: torch.Tensor,
    W_dec: torch.Tensor,
    pattern: Pattern | None = None,
    pool: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """See `SparseDecode`; `pattern` and `pool` as in `selected_preactivations`."""
    return SparseDecode.apply(indices, z, W_dec, pattern, pool)
