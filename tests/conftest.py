"""Shared fixtures: a tiny in-process subject model, a small text corpus, an evaluation context."""

from __future__ import annotations

import random

import pytest
import torch

WORDS = (
    "the cat sat on a mat while dogs ran past old trees near quiet rivers and bright hills under "
    "grey skies people read books about ships cities music science and history every day"
).split()


def write_corpus(path, n_docs: int = 200, seed: int = 0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "." for _ in range(n_docs)]
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    from saebench.model.tiny import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture
def corpus_file(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def tiny_eval_config(tmp_path, corpus_file, **overrides):
    """Evaluation settings for the tiny model: 12 windows of 16 tokens at layer 1, cache in tmp_path."""
    from saebench.context import EvalConfig

    settings = dict(
        model="tiny",
        layer=1,
        corpus=str(corpus_file),
        n_tokens=12 * 15,
        ctx=16,
        batch_size=5,
        cache_dir=str(tmp_path / "cache"),
    )
    return EvalConfig(**{**settings, **overrides})


@pytest.fixture
def make_context(tmp_path, corpus_file, tiny_llama):
    """EvalContext factory on the tiny model (see `tiny_eval_config`)."""
    from saebench.context import EvalContext

    def make(model=None, **overrides):
        return EvalContext(
            tiny_eval_config(tmp_path, corpus_file, **overrides), preloaded_model=model or tiny_llama
        )

    return make


def random_sae(d: int, n: int, *, activation="topk", k=4, normalization="none", seed=0, scale=1.0):
    """A random SAE with unit decoder rows; relu SAEs get a negative encoder bias so some latents stay off."""
    from saebench.sae.sae import SAE, Normalization

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone() * scale + 0.1 * torch.randn(d, n, generator=g)
    b_enc = -0.5 * torch.rand(n, generator=g)
    b_dec = 0.1 * torch.randn(d, generator=g)
    threshold = 0.3 * torch.rand(n, generator=g) if activation == "jumprelu" else None
    return SAE(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        activation=activation,
        k=k if activation == "topk" else None,
        threshold=threshold,
        normalization=Normalization(normalization),
    )


def identity_sae(d: int):
    """An exact dictionary: latents relu(x), relu(-x) with decoder rows +I, -I, so x_hat == x."""
    from saebench.sae.sae import SAE

    eye = torch.eye(d)
    W_dec = torch.cat([eye, -eye])
    return SAE(W_dec.T.clone(), torch.zeros(2 * d), W_dec, torch.zeros(d), activation="relu")
