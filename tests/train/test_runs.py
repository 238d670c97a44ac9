import torch

from saebench.sae.load import find_checkpoints, load_sae
from saebench.train.config import TrainConfig
from saebench.train.runs import run_status, train_runs
from saebench.train.stream import activation_stream


def test_stream_is_seeded_training_split_without_separators(make_context):
    ctx = make_context()
    a = torch.cat(list(activation_stream(ctx, 600, seed=1, block_windows=16)))
    b = torch.cat(list(activation_stream(ctx, 600, seed=1, block_windows=16)))
    assert torch.equal(a, b) and 500 < len(a) <= 600
    # no attention-sink rows: the separators' residuals are dropped, so norms stay near the median
    norms = a.norm(dim=1)
    assert norms.max() < 10 * norms.median()


def test_train_runs_writes_loadable_checkpoints_and_skips_finished(make_context, tmp_path):
    ctx = make_context()
    configs = {
        "topk-small": TrainConfig(
            n_latents=64, k=4, batch_size=64, geometric_median_tokens=128, checkpoint_every=0
        )
    }
    out = tmp_path / "runs"
    (path,) = train_runs(ctx, configs, out, n_tokens=600)
    assert run_status(out / "topk-small") == "complete"
    sae = load_sae(path)
    assert sae.n_latents == 64 and sae.k == 4 and sae.info.layer == ctx.layer
    assert sae.info.extra["training"]["tokens_seen"] >= 500
    assert find_checkpoints(out) == [path]
    before = (path / "sae.safetensors").stat().st_mtime_ns
    train_runs(ctx, configs, out, n_tokens=600)
    assert (path / "sae.safetensors").stat().st_mtime_ns == before
