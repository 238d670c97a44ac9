"""`torchrun -m saebench run` on 2 gloo ranks against one process: the same result files, the summary
printed once, the activation cache filled once (each shard by exactly one rank); a dead rank ends the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saebench.sae.formats.native import save_native
from tests.conftest import random_sae, write_corpus

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
#: what says when a result was made, not what it is: the only fields allowed to differ
WHEN = ("wall_time_s", "created")

#: runs the CLI, logging every cache shard written (rank, kind/shards-folder/file); SAEBENCH_DIE_AT: this
#: rank exits at its first shard
PRELUDE = r"""
import json, os, sys
from saebench.data import cache

real_save, log = cache.atomic_save_npy, os.environ["SHARD_LOG"]


def save(path, array):
    if path.parent.name.startswith("shards-"):
        rank = int(os.environ.get("RANK", "-1"))
        if str(rank) == os.environ.get("SAEBENCH_DIE_AT"):
            os._exit(3)
        with open(log, "a") as f:
            f.write(json.dumps([rank, f"{path.parents[2].name}/{path.parent.name}/{path.name}"]) + "\n")
    real_save(path, array)


cache.atomic_save_npy = save
from saebench.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama):
    """The tiny model, a corpus, a folder of three checkpoints and one that cannot be evaluated (its width is
    not the model's), the `saebench run` arguments, and the one-process run: (args, out, stdout, shards)."""
    root = tmp_path_factory.mktemp("sharded")
    tiny_llama.hf_model.save_pretrained(root / "model")
    tiny_llama.tokenizer.save_pretrained(root / "model")
    runs = root / "runs"
    for i, (n, k) in enumerate([(96, 4), (128, 8), (64, 2)]):
        save_native(random_sae(64, n, k=k, seed=i), runs / f"sae-{i}")
    save_native(random_sae(32, 64, k=4), runs / "sae-narrow")
    (root / "prelude.py").write_text(PRELUDE)
    args = ["run", "--checkpoint", str(runs), "--model", str(root / "model"), "--layer", "1"]
    args += ["--corpus", str(write_corpus(root / "corpus.txt")), "--n-tokens", "600", "--ctx", "16"]
    args += ["--batch-size", "4"]  # 40 windows: ten shards of residuals, ten of the clean pass
    one = launch(root, [sys.executable], args, "one")
    return root, args, one


def launch(root: Path, command: list[str], args: list[str], name: str, **env) -> tuple:
    """Run the CLI (through PRELUDE) into root/name: (completed process, out folder, shards logged).  Every
    launch starts from an empty cache at one path (the path is part of each result file's settings) and
    leaves it as root/name/cache."""
    log = root / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARD_LOG": str(log), "PYTHONPATH": str(ROOT), **env}
    more = ["--out", str(root / name / "out"), "--cache-dir", str(root / "cache")]
    done = subprocess.run(
        [*command, str(root / "prelude.py"), *args, *more],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    shards = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    (root / name).mkdir(exist_ok=True)
    (root / "cache").rename(root / name / "cache")
    return done, root / name / "out", shards


def result_files(out: Path) -> dict[str, dict]:
    """Every result file below `out`, its provenance's WHEN fields dropped."""
    files = {}
    for path in sorted(out.rglob("*.json")):
        result = json.loads(path.read_text())
        for field in WHEN:
            assert field in result["provenance"]
            del result["provenance"][field]
        files[str(path.relative_to(out))] = result
    return files


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]


@pytest.mark.slow  # ~40-60 s here: torchrun and its ranks import torch and transformers afresh
def test_two_ranks_write_the_result_files_of_one_process(setup):
    root, args, (one, one_out, one_shards) = setup
    two, two_out, two_shards = launch(root, TORCHRUN, args, "two")
    for done in (one, two):  # the narrow checkpoint fails, alone, and is listed once
        assert done.returncode == 1, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("saebench: error: checkpoint")]
        assert len(errors) == 1 and "sae-narrow" in errors[0] and "d_in=32" in errors[0]
    want, got = result_files(one_out), result_files(two_out)
    assert sorted(want) == [f"sae-{i}/{m}.json" for i in range(3) for m in ("core", "downstream")]
    assert got == want
    summary = one.stdout.split("\nresults:")[0]
    assert two.stdout.count("\nresults:") == 1 and two.stdout.split("\nresults:")[0] == summary

    written = sorted(name for _, name in one_shards)
    assert sorted(name for _, name in two_shards) == written  # each shard once, by one rank
    for kind in ("resid-all", "eval-downstream"):  # each collection's chunks shared round-robin
        starts = sorted({_start(n) for n in written if n.startswith(kind)})
        assert len(starts) == 10
        for rank in range(WORLD):
            assert (
                sorted({_start(n) for r, n in two_shards if r == rank and n.startswith(kind)})
                == starts[rank::WORLD]
            )


def _start(shard: str) -> int:
    return int(shard.rsplit(".", 2)[1])


@pytest.mark.slow  # ~30-60 s
def test_a_rank_that_dies_ends_the_run_with_a_nonzero_status(setup):
    root, args, _ = setup
    dead, out, shards = launch(root, TORCHRUN, args, "dead", SAEBENCH_DIE_AT="1")
    assert dead.returncode != 0
    assert {rank for rank, _ in shards} <= {0} and "\nresults:" not in dead.stdout
    assert not list(out.rglob("*.json"))
