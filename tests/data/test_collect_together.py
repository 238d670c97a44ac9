"""Ranks of one group filling a store together: each shard made by exactly one rank, the array one process
makes, and a rank that fails at its share fails the step on every rank instead of leaving them waiting."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from saebench.data.cache import Store, collecting_together
from saebench.ranks import Group

N_ITEMS, CHUNK, WORLD = 23, 3, 2  # eight chunks, the last one short


def produce_logged(log: Path, fail_rank: int | None = None):
    def produce(start: int, stop: int) -> dict[str, np.ndarray]:
        rank = dist.get_rank() if dist.is_initialized() else -1
        if rank == fail_rank:
            raise OSError(f"rank {rank} cannot write here")
        with open(log, "a") as f:
            f.write(json.dumps([rank, start]) + "\n")
        x = np.arange(start, stop, dtype=np.float64)
        return {"a": x[:, None] * np.ones((1, 3)), "b": -x}

    return produce


def _rank(rank: int, init_file: str, root: str, log: str, fail_rank: int | None, outcome: str):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        with collecting_together(Group()):
            out = Store("test", {"x": 1}, root=Path(root)).collect(
                ("a", "b"), N_ITEMS, CHUNK, produce_logged(Path(log), fail_rank)
            )
        result = {"a": float(out["a"].sum()), "b": float(out["b"].sum())}
    except (OSError, RuntimeError) as err:
        result = {"error": str(err)}
    finally:
        dist.destroy_process_group()
    Path(f"{outcome}.{rank}").write_text(json.dumps(result))


def together(tmp_path, fail_rank: int | None = None) -> tuple[list[dict], list[list[int]]]:
    log, outcome = tmp_path / "log", tmp_path / "outcome"
    args = (str(tmp_path / "init"), str(tmp_path / "cache"), str(log), fail_rank, str(outcome))
    mp.start_processes(_rank, args=args, nprocs=WORLD, join=True, start_method="fork")
    outcomes = [json.loads(Path(f"{outcome}.{r}").read_text()) for r in range(WORLD)]
    produced = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return outcomes, produced


def test_each_shard_is_made_by_one_rank_and_the_arrays_are_one_process(tmp_path):
    alone = Store("test", {"x": 1}, root=tmp_path / "alone").collect(
        ("a", "b"), N_ITEMS, CHUNK, produce_logged(tmp_path / "alone.log")
    )
    outcomes, produced = together(tmp_path)
    starts = list(range(0, N_ITEMS, CHUNK))
    assert sorted(start for _, start in produced) == starts  # every chunk once
    assert {start: rank for rank, start in produced} == {s: i % WORLD for i, s in enumerate(starts)}
    store = Store("test", {"x": 1}, root=tmp_path / "cache")
    for name in ("a", "b"):
        assert np.array_equal(store.load(name), alone[name])
    assert outcomes == [{"a": float(alone["a"].sum()), "b": float(alone["b"].sum())}] * WORLD
    assert not list(store.folder.glob("shards-*"))  # joined once, shards removed


def test_a_rank_failing_at_its_share_fails_the_step_on_every_rank(tmp_path):
    outcomes, produced = together(tmp_path, fail_rank=1)
    assert outcomes[1] == {"error": "rank 1 cannot write here"}
    assert "rank 1 failed at its share: rank 1 cannot write here" in outcomes[0]["error"]
    assert {rank for rank, _ in produced} == {0}
    # what the others made stays as shards: a later collection by one process finishes from them
    log = tmp_path / "after.log"
    out = Store("test", {"x": 1}, root=tmp_path / "cache").collect(
        ("a", "b"), N_ITEMS, CHUNK, produce_logged(log)
    )
    redone = sorted(json.loads(line)[1] for line in log.read_text().splitlines())
    assert redone == list(range(CHUNK, N_ITEMS, 2 * CHUNK))  # rank 1's share only
    assert float(out["b"].sum()) == -float(sum(range(N_ITEMS)))


def test_a_lone_producer_waits_for_the_ranks_shared_lock(tmp_path):
    """The ranks hold the store's lock shared while they write; an exclusive producer cannot take it."""
    from saebench.data.locks import FileLock

    store = Store("test", {"x": 1}, root=tmp_path)
    path = store.folder / ".lock"
    with FileLock(path, shared=True):
        pid = os.fork()
        if pid == 0:  # another process: a second shared holder gets in, an exclusive one does not
            import fcntl

            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os._exit(2)
                except BlockingIOError:
                    os._exit(0)
            finally:
                os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(RuntimeError, match="held shared"), FileLock(path, shared=True), FileLock(path):
        pass
