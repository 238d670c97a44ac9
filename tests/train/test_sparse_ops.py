import pytest
import torch

from saebench.train.autoencoder import TrainableSAE
from saebench.train.config import TrainConfig
from saebench.train.sparse_ops import (
    gathered_dot,
    scatter_outer,
    selected_preactivations,
    sparse_decode,
)


def _case(n_tokens=6, n=10, d=5, m=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n_tokens, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    indices = torch.rand(n_tokens, n, generator=gen).topk(m, dim=1).indices  # distinct per token
    indices[1] = indices[0]  # a latent selected by several tokens accumulates
    z = torch.rand(n_tokens, m, generator=gen, dtype=torch.float64, requires_grad=True)
    return u, b_pre, W, b, indices, z


def test_selected_preactivations_gradcheck():
    u, b_pre, W, b, indices, _ = _case()
    assert torch.autograd.gradcheck(lambda *a: selected_preactivations(*a, indices), (u, b_pre, W, b))


def test_sparse_decode_gradcheck():
    _, _, W, _, indices, z = _case()
    assert torch.autograd.gradcheck(lambda z, W: sparse_decode(indices, z, W), (z, W))


def test_selected_preactivations_with_precomputed_values_match_dense():
    u, b_pre, W, b, indices, _ = _case(seed=3)
    dense = torch.nn.functional.linear(u - b_pre, W, b)
    values = dense.detach().gather(1, indices)
    grad = torch.randn(values.shape, dtype=torch.float64)
    expected = torch.autograd.grad((dense.gather(1, indices) * grad).sum(), (u, b_pre, W, b))
    got = torch.autograd.grad(
        (selected_preactivations(u, b_pre, W, b, indices, values) * grad).sum(), (u, b_pre, W, b)
    )
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_primitives_chunk_boundaries(monkeypatch):
    import saebench.train.sparse_ops as ops

    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 7)  # forces one token per chunk
    u, _, W, _, indices, z = _case(n_tokens=9, seed=4)
    u, W, z = u.detach(), W.detach(), z.detach()
    dense = torch.zeros(9, W.shape[0], dtype=torch.float64).scatter(1, indices, z)
    torch.testing.assert_close(scatter_outer(indices, z, u, W.shape[0]), dense.T @ u)
    torch.testing.assert_close(gathered_dot(indices, W, u), (u @ W.T).gather(1, indices))


def test_training_step_gradients_equal_dense_autograd():
    """The whole TopK loss (with AuxK and Multi-TopK) through both backward paths."""
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    grads = []
    for sparse in (True, False):
        config = TrainConfig(
            n_latents=48, k=3, multi_topk=True, dtype="float64", sparse_backward=sparse, chunk_elements=500
        )
        model = TrainableSAE(config, 12)
        model.initialize(u.mean(0), torch.Generator().manual_seed(0))
        out = model(u, dead=dead)
        assert out.auxk_nmse > 0 and out.multi_topk_nmse > 0
        out.loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for sparse_grad, dense_grad in zip(*grads, strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-10, atol=1e-12)


def _index_add_reference(indices, coeff, vectors, n_rows):
    """The per-token index_add_ sum (the fallback path's order: each row's terms in token order)."""
    out = vectors.new_zeros(n_rows, vectors.shape[1])
    products = coeff[:, :, None] * vectors[:, None, :]
    out.index_add_(0, indices.reshape(-1), products.reshape(-1, vectors.shape[1]))
    return out


def test_latent_major_groups_selections_by_latent_in_token_order():
    from saebench.train.sparse_ops import latent_major

    _, _, _, _, indices, _ = _case(n_tokens=9, n=10, m=3, seed=6)
    crow, order, tokens = latent_major(indices, 12)  # two latents never selected
    flat = indices.reshape(-1)
    assert crow[0] == 0 and crow[-1] == flat.numel() and crow.shape == (13,)
    for latent in range(12):
        positions = order[crow[latent] : crow[latent + 1]]
        assert torch.equal(positions, (flat == latent).nonzero().squeeze(1))
    assert torch.equal(tokens, order // 3)
    # wider latent counts sort in wider key types, with the same result
    wide = latent_major(indices * 5000, 50_000)
    assert torch.equal(wide[1], order)


def test_scatter_outer_csr_path_is_the_index_add_sum_and_overwrites_out():
    # to rounding, not bitwise: how MKL's CSR kernel orders a row's terms depends on the CPU (bitwise the
    # index_add_ sum on the machines this was written on; 1.8e-15 apart in float64 on an AVX-512 Xeon)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        gen = torch.Generator().manual_seed(7)
        n_rows, n_tokens, m, d = 300, 64, 8, 40  # many rows never selected
        indices = torch.rand(n_tokens, n_rows, generator=gen).topk(m, dim=1).indices
        coeff = torch.randn(n_tokens, m, generator=gen, dtype=dtype)
        vectors = torch.randn(n_tokens, d, generator=gen, dtype=dtype)
        expected = _index_add_reference(indices, coeff, vectors, n_rows)
        close = dict(rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(scatter_outer(indices, coeff, vectors, n_rows), expected, **close)
        out = torch.full((n_rows, d), float("nan"), dtype=dtype)
        assert scatter_outer(indices, coeff, vectors, n_rows, out=out) is out
        torch.testing.assert_close(out, expected, **close)
        assert torch.equal(
            expected[expected.abs().sum(1) == 0], out[expected.abs().sum(1) == 0]
        )  # unselected


def test_gathered_dot_equals_the_dense_product_at_the_selection():
    u, _, W, _, indices, _ = _case(n_tokens=20, n=30, d=7, m=5, seed=8)
    u, W = u.detach(), W.detach()
    torch.testing.assert_close(gathered_dot(indices, W, u), (u @ W.T).gather(1, indices), rtol=0, atol=1e-12)


def test_backward_writes_weight_gradients_into_a_pooled_tensor():
    u, b_pre, W, b, indices, z = _case(seed=9)
    grad = torch.randn(indices.shape, dtype=torch.float64)
    expected = torch.autograd.grad((selected_preactivations(u, b_pre, W, b, indices) * grad).sum(), W)[0]
    pool = [torch.full_like(W, float("nan"))]
    spare = pool[0].data_ptr()  # no other reference: autograd keeps the tensor as W.grad without a copy
    (selected_preactivations(u, b_pre, W, b, indices, None, None, pool) * grad).sum().backward()
    assert not pool and W.grad.data_ptr() == spare
    assert torch.equal(W.grad, expected)
    W_dec = W.detach().clone().requires_grad_(True)
    pool = [torch.zeros(3, 3, dtype=torch.float64), torch.full_like(W_dec, float("nan"))]
    sparse_decode(indices, z, W_dec, None, pool).pow(2).sum().backward()
    reference = W_dec.detach().clone().requires_grad_(True)
    sparse_decode(indices, z, reference).pow(2).sum().backward()
    assert torch.equal(W_dec.grad, reference.grad)


@pytest.mark.parametrize("folded", [True, False])
def test_selection_is_the_dense_top_k(monkeypatch, folded):
    """`_select` (chunked pre-activations with the bias folded into the matmul or added by addmm, grouped
    top-k, AuxK over dead latents) picks exactly the dense pre-activations' top k and top k_aux."""
    from saebench.sae.topk import grouped

    if not folded:
        monkeypatch.setattr(TrainableSAE, "FOLDED_BIAS_DEVICES", ())
    gen = torch.Generator().manual_seed(11)
    n, d, k = 512, 12, 8
    u = torch.randn(40, d, generator=gen, dtype=torch.float64)
    config = TrainConfig(n_latents=n, k=k, dtype="float64", chunk_elements=7 * n)  # chunks of 7 tokens
    model = TrainableSAE(config, d)
    model.initialize(u.mean(0), torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_enc.normal_(generator=gen)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::2] = True
    assert grouped(n, k, u.device) and grouped(int(dead.sum()), model.k_aux, u.device)
    indices, values, (aux_indices, aux_values) = model._select(u, dead, k)
    dense = torch.nn.functional.linear(u - model.b_pre, model.W_enc, model.b_enc).detach()
    for got_indices, got_values, columns, m in (
        (indices, values, torch.arange(n), k),
        (aux_indices, aux_values, dead.nonzero().squeeze(1), model.k_aux),
    ):
        expected = dense[:, columns].topk(m, dim=1)
        assert torch.equal(got_indices.sort(1).values, columns[expected.indices].sort(1).values)
        torch.testing.assert_close(got_values, dense.gather(1, got_indices), rtol=0, atol=1e-12)
