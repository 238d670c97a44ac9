import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from saebench.data.task_activations import site_task_activations, tokenize_examples
from saebench.data.tasks import discover_tasks
from saebench.metrics import probes as probes_module
from saebench.metrics.probes import (
    PooledLatents,
    ProbesParams,
    auroc,
    best_latent_probe,
    best_probe,
    pool_residual,
    pooled_codes,
)
from saebench.metrics.probes import compute as probes
from saebench.metrics.registry import get_metric
from saebench.sae import sae as sae_module
from tests.conftest import random_sae

POSITIVE_LETTERS, NEGATIVE_LETTERS = "abcdefghijklm", "nopqrstuvwxyz"


@pytest.fixture
def task_dir(tmp_path):
    """Two tiny tasks: words over one half of the alphabet (positive) or the other, in two pools."""
    rng = random.Random(0)
    rows = []
    for i in range(56):
        letters = POSITIVE_LETTERS if i % 2 == 0 else NEGATIVE_LETTERS
        words = [
            "".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(1, 3))
        ]
        rows.append({"prompt": " ".join(words), "target": i % 2 == 0})
    folder = tmp_path / "tasks"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "halves.csv", index=False)
    common = "source: halves.csv\ntext_column: prompt\nlabel_column: target\npositive_label: true\n"
    sizes = "n_train: 32\nn_test: 20\nmax_tokens: 10\n"
    (folder / "tiny_halves.yaml").write_text(common + sizes)
    (folder / "tiny_halves_max.yaml").write_text(common + sizes + "pool: max\n")
    return folder


def params_for(task_dir, **overrides) -> ProbesParams:
    return ProbesParams(
        **{"tasks": "tiny_halves,tiny_halves_max", "include_tasks": str(task_dir), **overrides}
    )


def tiny_task(task_dir, name="tiny_halves"):
    return discover_tasks([task_dir])[name]


def planted_sae(context, task, n_latents=48, planted=17):
    """A ReLU SAE whose latent `planted` is relu(x . v) with x . v ~ +1 on the tokens of positive examples
    and ~ -1 on negative ones (least squares on the task's cached residuals): after pooling it separates
    the classes with values near 1 and exactly 0.  The other latents are random."""
    acts = site_task_activations(context.site, task)
    x = torch.from_numpy(np.array(acts.resid)).double()
    token_labels = np.repeat(acts.labels, acts.lengths)
    target = torch.from_numpy(np.where(token_labels, 1.0, -1.0))
    v = torch.linalg.lstsq(x, target.unsqueeze(1)).solution.squeeze(1)
    assert bool(((x @ v > 0) == torch.from_numpy(token_labels)).all()), "the plant must separate every token"
    sae = random_sae(context.model.d_model, n_latents, activation="relu", seed=1)
    with torch.no_grad():
        sae.W_enc[:, planted] = v.float()
        sae.b_enc[planted] = 0.0
    return sae


def test_planted_latent_wins_its_task(make_context, task_dir):
    context = make_context()
    sae = planted_sae(context, tiny_task(task_dir))
    result = probes(context, sae, params_for(task_dir))
    for name in ("tiny_halves", "tiny_halves_max"):
        detail = result.details["tasks"][name]
        assert detail["latent"] == 17, name
        assert detail["test_auroc"] == 1.0
        assert detail["test_ce"] < 0.1 < detail["prior_test_ce"]
        assert (detail["n_train"], detail["n_test"]) == (32, 20)
    loss = result.values["probe_loss"]
    assert loss.n == 2 and loss.unit == "tasks" and loss.lo <= loss.value <= loss.hi
    assert loss.value == pytest.approx(np.mean([d["test_ce"] for d in result.details["tasks"].values()]))
    assert result.counts["tasks"] == 2 and result.counts["latents"] == 48
    assert set(result.details["timing"]) == {"activations_s", "encode_s", "fit_s", "residual_s"}


def test_dead_latents_get_the_prior(make_context, task_dir):
    context = make_context()
    sae = random_sae(context.model.d_model, 32, activation="relu")
    with torch.no_grad():
        sae.b_enc[:] = -1e6  # never active: every pooled latent is the constant 0
    result = probes(context, sae, params_for(task_dir))
    prior = result.values["probe_loss_prior"].value
    assert prior == pytest.approx(math.log(2), abs=1e-12)  # balanced splits
    assert result.values["probe_loss"].value == pytest.approx(prior, abs=1e-6)
    for detail in result.details["tasks"].values():
        assert detail["latent"] == 0 and detail["test_auroc"] == 0.5
        assert detail["train_ce"] == pytest.approx(math.log(2), abs=1e-6)


def test_residual_baseline_is_the_best_raw_channel(make_context, task_dir):
    context = make_context()
    task = tiny_task(task_dir)
    result = probes(context, random_sae(context.model.d_model, 32), params_for(task_dir, tasks="tiny_halves"))
    detail = result.details["tasks"]["tiny_halves"]

    acts = site_task_activations(context.site, task)
    pooled = np.stack(
        [
            np.asarray(acts.resid[a:b]).mean(0)
            for a, b in zip(acts.offsets[:-1], acts.offsets[1:], strict=True)
        ]
    )
    expected = best_probe(torch.from_numpy(pooled), acts.labels, acts.n_train, ProbesParams())
    assert detail["residual_channel"] == expected.feature
    assert detail["residual_test_ce"] == pytest.approx(expected.test_ce, abs=1e-6)
    assert result.values["probe_loss_residual"].value == pytest.approx(expected.test_ce, abs=1e-6)
    assert detail["residual_test_ce"] < detail["prior_test_ce"]  # disjoint alphabets: some channel separates


def test_task_activations_are_the_examples_run_alone(make_context, task_dir):
    context = make_context()
    task = tiny_task(task_dir)
    acts = site_task_activations(context.site, task)
    assert acts.n_examples == 52 and acts.n_train == 32
    assert acts.labels[:32].sum() == 16 and acts.labels[32:].sum() == 10
    from saebench.data.tasks import load_task_data

    texts, labels = load_task_data(task)
    np.testing.assert_array_equal(labels[acts.rows], acts.labels)
    tokens = tokenize_examples(
        [texts[i] for i in acts.rows], context.model.tokenizer, context.model.bos_id, 10
    )
    assert max(len(t) for t in tokens) == 10 and min(len(t) for t in tokens) < 10
    for i in (0, 7, 51):
        ids = torch.tensor([tokens[i]])
        with torch.inference_mode():
            alone = context.model.to_site(ids, context.layer)[0, 1:].numpy()
        np.testing.assert_allclose(acts.resid[acts.offsets[i] : acts.offsets[i + 1]], alone, atol=1e-5)

    def refuse(*args, **kwargs):
        raise AssertionError("a warm cache must not run the model")

    context.model.to_site, saved = refuse, context.model.to_site
    try:
        again = site_task_activations(context.site, task)
    finally:
        context.model.to_site = saved
    np.testing.assert_array_equal(np.asarray(again.resid), np.asarray(acts.resid))


@pytest.mark.parametrize("pool", ["mean", "max", "last"])
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_pooling_matches_dense_encoding(make_context, task_dir, pool, activation):
    context = make_context()
    acts = site_task_activations(context.site, tiny_task(task_dir))
    sae = random_sae(context.model.d_model, 40, activation=activation, normalization="layer_norm", k=5)
    got = pooled_codes(sae, acts, pool, chunk_tokens=37, device="cpu").columns(0, sae.n_latents)
    for i in range(acts.n_examples):
        with torch.inference_mode():
            z = sae.encode(
                torch.from_numpy(np.array(acts.resid[acts.offsets[i] : acts.offsets[i + 1]]))
            ).double()
        want = {"mean": z.mean(0), "max": z.max(0).values, "last": z[-1]}[pool]
        torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-6)
    residual = pool_residual(acts, pool)
    first = np.asarray(acts.resid[acts.offsets[0] : acts.offsets[1]], dtype=np.float64)
    want0 = {"mean": first.mean(0), "max": first.max(0), "last": first[-1]}[pool]
    np.testing.assert_allclose(residual[0], want0, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "max", "last"])
def test_pooled_blocks_are_the_dense_pooling(make_context, task_dir, pool):
    context = make_context()
    acts = site_task_activations(context.site, tiny_task(task_dir))
    sae = random_sae(context.model.d_model, 40, activation="relu", normalization="layer_norm")
    pooled = pooled_codes(sae, acts, pool, chunk_tokens=37, device="cpu")
    dense = pooled.columns(0, 40)
    assert dense.shape == (acts.n_examples, 40) and bool((dense != 0).any())
    for a, b in [(0, 7), (7, 19), (19, 40), (5, 6), (12, 12)]:
        assert torch.equal(pooled.columns(a, b), dense[:, a:b]), (a, b)


def sparse_pooled(dense: torch.Tensor, pool: str = "mean") -> PooledLatents:
    example, latent = torch.nonzero(dense, as_tuple=True)
    return PooledLatents(*dense.shape, pool, example, latent, dense[example, latent])


def test_chunked_probe_fit_picks_the_latent_of_one_fit():
    """Fitted in blocks of latents, the probes select the latent (the first of equal train CE) and give
    the values that one fit over all latents gives."""
    g = torch.Generator().manual_seed(0)
    n_ex, n_train, n = 60, 36, 50
    labels = np.arange(n_ex) % 2 == 0
    signal = torch.from_numpy(labels).double() * 0.4
    dense = torch.rand(n_ex, n, generator=g, dtype=torch.float64) + signal[:, None] * torch.rand(
        n, generator=g
    )
    dense[torch.rand(n_ex, n, generator=g) < 0.6] = 0  # sparse, as pooled codes are
    dense[:, 7:9] = 0  # dead latents: constant columns
    dense[:, 41] = dense[:, 23] = torch.from_numpy(labels).double() * 0.9 + 0.2 * dense[:, 3]
    params = ProbesParams(fit_dtype="float64")
    want = best_probe(dense, labels, n_train, params)
    assert want.feature == 23  # the better of two equal columns is the first
    pooled = sparse_pooled(dense)
    for chunk in (1, 7, 24, 50, None):
        got = best_latent_probe(pooled, labels, n_train, params, chunk)
        assert got.feature == want.feature, chunk
        assert got.train_ce == pytest.approx(want.train_ce, rel=1e-12, abs=0)
        assert got.test_ce == pytest.approx(want.test_ce, rel=1e-12, abs=0)
        assert got.test_auroc == want.test_auroc


def test_probes_on_a_wide_sae_match_one_fit(make_context, task_dir, monkeypatch):
    """With the encode and the fits chunked (tiny bounds stand in for a wide SAE) the metric's result is
    the unchunked one (in float64: float32 blocks agree to float32 rounding, ~1e-7)."""
    context = make_context()
    sae = random_sae(context.model.d_model, 48, activation="topk", k=6, normalization="layer_norm", seed=4)
    sae = sae.double()
    params = params_for(task_dir, fit_dtype="float64")
    want = probes(context, sae, params)
    monkeypatch.setattr(probes_module, "POOLED_ELEMENTS", 5 * 52)  # 5 latents of 52 examples per fit
    monkeypatch.setattr(sae_module, "SCRATCH_ELEMENTS", 11 * 37)  # encode 11 latents at a time
    columns = []
    dense_columns = PooledLatents.columns
    monkeypatch.setattr(
        PooledLatents, "columns", lambda s, a, b: columns.append(b - a) or dense_columns(s, a, b)
    )
    got = probes(context, sae, params)
    assert set(columns) == {5, 3}
    for name, detail in want.details["tasks"].items():
        assert got.details["tasks"][name]["latent"] == detail["latent"]
        for key, value in detail.items():
            expected = pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value
            assert got.details["tasks"][name][key] == expected, (name, key)
    assert got.values["probe_loss"].value == pytest.approx(want.values["probe_loss"].value, rel=1e-9)


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    labels = rng.random(40) < 0.5
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(scores, labels) == pytest.approx(pairwise, abs=1e-12)


def test_probes_is_registered():
    metric = get_metric("probes")
    assert metric.headline[0] == "probe_loss" and "probe_loss" in metric.lower_is_better
    assert isinstance(metric.params(), ProbesParams)
