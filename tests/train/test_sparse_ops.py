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
