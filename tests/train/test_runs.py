import json

import torch

from saebench.sae.load import find_checkpoints, load_sae
from saebench.train.config import TrainConfig
from saebench.train.l1_search import MAX_TRIALS, Trial, accepted, closest, next_lambda
from saebench.train.runs import SEARCH_FOLDER, _start, run_status, train_runs
from saebench.train.stream import activation_stream


def test_stream_is_seeded_training_split_without_separators(make_context):
    context = make_context()
    a = torch.cat(list(activation_stream(context.site, 600, seed=1, block_windows=16)))
    b = torch.cat(list(activation_stream(context.site, 600, seed=1, block_windows=16)))
    assert torch.equal(a, b) and 500 < len(a) <= 600
    # no attention-sink rows: the separators' residuals are dropped, so norms stay near the median
    norms = a.norm(dim=1)
    assert norms.max() < 10 * norms.median()


def test_train_runs_writes_loadable_checkpoints_and_skips_finished(make_context, tmp_path):
    context = make_context()
    configs = {
        "topk-small": TrainConfig(
            n_latents=64, k=4, batch_size=64, geometric_median_tokens=128, checkpoint_every=0
        )
    }
    out = tmp_path / "runs"
    (path,) = train_runs(context.site, configs, out, n_tokens=600)
    assert run_status(out / "topk-small") == "complete"
    sae = load_sae(path)
    assert sae.n_latents == 64 and sae.k == 4 and sae.info.layer == context.layer
    assert sae.info.extra["training"]["tokens_seen"] >= 500
    assert find_checkpoints(out) == [path]
    before = (path / "sae.safetensors").stat().st_mtime_ns
    train_runs(context.site, configs, out, n_tokens=600)
    assert (path / "sae.safetensors").stat().st_mtime_ns == before


def test_relu_target_searches_fixed_lambda_runs_and_records_the_search(make_context, tmp_path):
    context = make_context()
    base = dict(
        activation="relu",
        n_latents=64,
        batch_size=32,
        lr=0.01,
        geometric_median_tokens=128,
        checkpoint_every=0,
    )
    configs = {
        "relu-l8": TrainConfig(**base, k=8, l1_target_l0=8),
        "relu-l16": TrainConfig(**base, k=16, l1_target_l0=16),
    }
    out = tmp_path / "runs"
    paths = train_runs(context.site, configs, out, n_tokens=2000)
    (family,) = (out / SEARCH_FOLDER).iterdir()
    trial_dirs = sorted(family.iterdir())
    assert 1 < len(trial_dirs) <= 2 * MAX_TRIALS
    for path, target in zip(paths, (8, 16), strict=True):
        training = load_sae(path).info.extra["training"]
        search = training["l1_search"]
        trials = [Trial(**t) for t in search["trials"]]
        chosen = Trial(**search["chosen"])
        # the checkpoint is the trial closest to the target, trained at one fixed lambda
        assert chosen == closest(trials, target)
        assert training["config"]["l1_coefficient"] == chosen.l1_coefficient
        assert training["config"]["l1_target_l0"] == target and training["last_log"]["l0"] == chosen.l0
        assert (
            accepted(chosen, target)
            or len(json.loads((path.parent / "l1_search.json").read_text())["tried"]) == MAX_TRIALS
        )
    # a rerun trains nothing new
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    train_runs(context.site, configs, out, n_tokens=2000)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    # a family at another lr and size starts from these trials, not from the default lambda; one that
    # differs in anything else (here the batch) does not
    trained = load_sae(paths[0]).info.extra["training"]
    trials, ran = [Trial(**t) for t in trained["l1_search"]["trials"]], trained["config"]["max_tokens"]
    other = TrainConfig(**{**base, "lr": 0.02, "n_latents": 128}, k=12, l1_target_l0=12, max_tokens=ran)
    assert _start(out, other, 12) == next_lambda(trials, 12, other.l1_coefficient) != other.l1_coefficient
    unlike = TrainConfig(**{**base, "batch_size": 64}, k=12, l1_target_l0=12, max_tokens=ran)
    assert _start(out, unlike, 12) == unlike.l1_coefficient
