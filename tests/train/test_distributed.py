"""Two gloo processes against one: data- and latent-parallel training give one process's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saebench.train import TrainConfig, Trainer
from saebench.train.state import STATE_FILE, read_state

from .conftest import planted_batches

D = 24
STEPS = 100
BATCH = 128
WORLD = 2
#: fork: the ranks start in milliseconds instead of re-importing torch (~10 s each on a busy 2-core machine)
START = "fork"


def tiny(**overrides) -> TrainConfig:
    """96 latents, k 4, AuxK busy (dead after 2 batches), float64 so that rounding cannot flip a top-k."""
    base = dict(n_latents=96, k=4, batch_size=BATCH, lr=3e-3, geometric_median_tokens=512, log_every=10)
    base |= dict(dead_tokens=256, dtype="float64", max_tokens=STEPS * BATCH, checkpoint_every=25)
    return TrainConfig(**{**base, **overrides})


def stream():
    """Batches of other sizes than the trainer's, so that re-cutting them is part of what is compared."""
    return planted_batches(STEPS * BATCH // 200, 200, d=D, seed=4)


def train(config: TrainConfig, out_dir, *, kill_after: int | None = None) -> None:
    """One run into out_dir (resumed when it has a state); kill_after: SIGKILL this process after that many
    incoming batches."""
    if (out_dir / STATE_FILE).exists():
        trainer = Trainer.resume(out_dir, latent_shards=config.latent_shards)
    else:
        trainer = Trainer(config, D, out_dir=out_dir)

    def batches():
        for i, x in enumerate(stream()):
            if kill_after is not None and i == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            yield x

    trainer.fit(batches(), progress=False)


def _worker(rank: int, init_file: str, config: TrainConfig, out_dir, kill: tuple[int, int] | None):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        train(config, out_dir, kill_after=kill[1] if kill and kill[0] == rank else None)
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, config: TrainConfig, out_dir, kill: tuple[int, int] | None = None) -> None:
    """Train on WORLD gloo processes; kill: (rank, after how many batches) to SIGKILL one of them."""
    init_file = tmp_path / f"init-{len(list(tmp_path.glob('init-*')))}"
    mp.start_processes(
        _worker, args=(str(init_file), config, out_dir, kill), nprocs=WORLD, join=True, start_method=START
    )


def assert_same_training(got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert (got["step"], got["tokens_seen"]) == (want["step"], want["tokens_seen"])
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, rtol=rtol, atol=atol, msg=name)
    for i, moments in want["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["optimizer"]["state"][i][key], moments[key], rtol=rtol, atol=atol)
    assert torch.equal(got["tokens_since_fired"], want["tokens_since_fired"])
    for row, reference in zip(got["history"], want["history"], strict=True):
        assert row["dead_frac"] == reference["dead_frac"]
        assert row["nmse"] == pytest.approx(reference["nmse"], rel=1e-9)
        assert row["l0"] == pytest.approx(reference["l0"], rel=1e-12)


def test_other_shards_latents_take_distinct_free_rows():
    """The sparse kernels' CSR patterns need distinct rows per token: a shard's held latents keep theirs, the
    other shards' latents (masked) get rows no held latent of the token uses."""
    from types import SimpleNamespace

    from saebench.train.distributed import ShardedSAE

    shard = SimpleNamespace(n_local=48, rows=slice(48, 96), n_total=96, world=2)
    model = ShardedSAE.__new__(ShardedSAE)
    super(ShardedSAE, model).__init__(tiny(), D, n_latents=shard.n_local)
    model.shards = shard
    generator = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(96, generator=generator)[:16] for _ in range(500)])
    local, held = model._local(indices)
    assert torch.equal(local[held], indices[held] - 48) and 0.3 < held.double().mean() < 0.7
    assert ((local >= 0) & (local < 48)).all()
    ordered = local.sort(1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process runs every mode is compared with, by config."""
    runs = {}

    def run(config: TrainConfig) -> dict:
        key = repr(config)
        if key not in runs:
            out_dir = tmp_path_factory.mktemp("one-process")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as each rank does: tiny steps on a busy machine are 7x slower threaded
            try:
                train(config, out_dir)
            finally:
                torch.set_num_threads(threads)
            runs[key] = read_state(out_dir)
        return runs[key]

    return run


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation": "relu", "l1_coefficient": 0.05},
        {"latent_shards": WORLD},
        {"latent_shards": WORLD, "multi_topk": True, "tied_init": False},
    ],
    ids=["data-parallel", "data-parallel-relu", "latent-parallel", "latent-multi-topk-untied"],
)
def test_two_processes_train_the_weights_of_one(tmp_path, one_process, overrides):
    config = tiny(**overrides)
    spawn(tmp_path, config, tmp_path / "run")
    got, want = read_state(tmp_path / "run"), one_process(tiny(**{**overrides, "latent_shards": 1}))
    if config.activation == "topk":
        assert max(row["auxk_nmse"] for row in got["history"]) > 0.1  # AuxK took part
    assert_same_training(got, want)
    assert got["model"]["W_enc"].shape == (96, D)  # the one-process layout, whatever the shards


def test_float32_data_parallel_stays_within_rounding_of_one_process(tmp_path, one_process):
    config = tiny(dtype="float32")
    spawn(tmp_path, config, tmp_path / "run")
    got, want = read_state(tmp_path / "run"), one_process(config)
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("mode", "killed"), [("data", 0), ("latent", 1)])
def test_a_killed_rank_resumes_to_the_uninterrupted_weights(tmp_path, one_process, mode, killed):
    config = tiny(latent_shards=WORLD if mode == "latent" else 1)
    out_dir = tmp_path / "run"
    with pytest.raises(mp.ProcessExitedException):
        spawn(tmp_path, config, out_dir, kill=(killed, 40))  # dies at step ~62, past 2 checkpoints
    assert 0 < read_state(out_dir)["step"] < STEPS
    spawn(tmp_path, config, out_dir)
    assert_same_training(read_state(out_dir), one_process(tiny()))


RUN = "topk-n2048-k16"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_llama):
    """`saebench train` arguments on the tiny model, and the checkpoint one process trains with them."""
    from saebench.cli import main
    from tests.conftest import write_corpus

    root = tmp_path_factory.mktemp("cli")
    tiny_llama.hf_model.save_pretrained(root / "model")
    tiny_llama.tokenizer.save_pretrained(root / "model")
    options = ["n_latents=64", "k=4", "batch_size=64", "geometric_median_tokens=128", "dtype=float64"]
    options += ["lr=1e-3", "log_every=5", "checkpoint_every=4"]
    args = ["train", "--preset", RUN, "--n-tokens", "1200", "--model", str(root / "model"), "--layer", "1"]
    args += ["--corpus", str(write_corpus(root / "corpus.txt")), "--ctx", "16"]
    args += [x for item in options for x in ("--set", item)]
    assert main([*args, "--out", str(root / "one"), "--cache-dir", str(root / "cache-one")]) == 0
    return args, root / "one" / RUN


@pytest.mark.slow  # 17-55 s here: torchrun and its ranks import torch and transformers afresh
@pytest.mark.parametrize("sets", [[], ["latent_shards=2"]], ids=["data-parallel", "latent-parallel"])
def test_torchrun_saebench_train_gives_the_one_process_checkpoint(tmp_path, cli_run, sets):
    """`torchrun -m saebench train` end to end on the tiny model, its activation cache new (the ranks take
    turns at its lock): the checkpoint `saebench train` writes in one process."""
    args, one = cli_run
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]
    command = [*torchrun, "-m", "saebench", *args, *(x for item in sets for x in ("--set", item))]
    command += ["--out", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache-two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAEBENCH_LR_TREND": "none"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"{RUN}/sae") == 1  # printed by rank 0 only
    got, want = read_state(tmp_path / "two" / RUN), read_state(one)
    assert got["step"] > 10 and got["history"][-1]["dead_frac"] > 0
    assert_same_training(got, want)
    cfg = json.loads((tmp_path / "two" / RUN / "sae" / "cfg.json").read_text())
    assert cfg["training"]["distributed"]["mode"] == ("latent" if sets else "data")
