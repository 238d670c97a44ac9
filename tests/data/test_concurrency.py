"""Several processes on one cold cache: one collects while the others wait, a killed collector is taken
over from its shards, a half-written file is never read, and every process gets a single run's numbers.

Real subprocesses throughout.  A process is killed at a chosen moment by `KILLER`, a prelude that wraps
the cache's shard writes: after the N-th shard it SIGKILLs itself (or, with `half`, dies half-way through
writing it), and with a `pause` file it first stops at its first shard, holding the lock, until told to go.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saebench.data.cache import Store

ROOT = Path(__file__).resolve().parents[2]

KILLER = r"""
import io, os, signal, sys, time
from pathlib import Path
import numpy as np
from saebench.data import cache

KILL_AFTER, HOW, PAUSE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
written = 0
real_save = cache.atomic_save_npy


def half_save(f, array, allow_pickle=False):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save(path, array):
    global written
    if path.parent.name.startswith("shards-"):
        if PAUSE != "-" and written == 0:  # hold the lock at the first shard until the test says go
            Path(PAUSE + ".ready").touch()
            while not Path(PAUSE + ".go").exists():
                time.sleep(0.02)
        written += 1
        if written == KILL_AFTER and HOW == "half":
            np.save = half_save
        real_save(path, array)
        if written == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
        return
    real_save(path, array)


cache.atomic_save_npy = save
sys.argv = sys.argv[3:]
"""

COLLECTOR = r"""
log = Path(sys.argv[1])


def produce(start, stop):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {start}\n")
    time.sleep(float(sys.argv[3]))
    x = np.arange(start, stop, dtype=np.float64)
    return {"a": x[:, None] * np.ones((1, 3)), "b": x}


out = cache.Store("test", {"x": 1}, root=Path(sys.argv[2])).collect(("a", "b"), N_ITEMS, CHUNK, produce)
print(float(out["a"].sum()), float(out["b"].sum()))
"""
N_ITEMS, CHUNK = 40, 4  # ten chunks of two arrays: twenty shard writes

CLI = r"""
from saebench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(program: str, *args, kill_after: int = 0, how: str = "after", pause: str = "-", stderr=None):
    """A real Python process running KILLER and then `program` with `args` as sys.argv[1:]."""
    code = KILLER + program.replace("N_ITEMS", str(N_ITEMS)).replace("CHUNK", str(CHUNK))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["TQDM_DISABLE"] = "1"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(kill_after), how, pause, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        text=True,
    )


def wait_for(condition, timeout: float = 300.0, what: str = "condition", procs=()) -> None:
    """Poll `condition`; fail when it times out or one of `procs` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, f"a process ended (rc {ended[0].returncode}) before {what}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def produced(log: Path) -> list[int]:
    return sorted(int(line.split()[1]) for line in log.read_text().splitlines())


def expected_sums() -> str:
    b = np.arange(N_ITEMS, dtype=np.float64)
    return f"{float(b.sum() * 3)} {float(b.sum())}"


def assert_clean(cache: Path) -> None:
    """No temporary file and no shard left, and every array in the cache loads whole."""
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("shards-")]
    for path in cache.rglob("*.npy"):
        np.load(path, allow_pickle=False)


# --- the store, driven by small processes that import only numpy and the cache ----------------------------


def test_concurrent_collectors_share_one_collection(tmp_path):
    log = tmp_path / "log"
    procs = [start(COLLECTOR, log, tmp_path / "cache", 0.12) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {expected_sums()}
    assert produced(log) == list(range(0, N_ITEMS, CHUNK))  # every chunk computed once, by one process
    assert_clean(tmp_path / "cache")


def test_killed_collector_is_taken_over_from_its_shards(tmp_path):
    log, pause = tmp_path / "log", str(tmp_path / "pause")
    victim = start(COLLECTOR, log, tmp_path / "cache", 0.02, kill_after=5, pause=pause)
    wait_for(lambda: Path(pause + ".ready").exists(), what="the victim to hold the lock", procs=[victim])
    others = [start(COLLECTOR, log, tmp_path / "cache", 0.02) for _ in range(2)]
    time.sleep(0.5)
    Path(pause + ".go").touch()
    victim.communicate(timeout=120)
    assert victim.returncode == -signal.SIGKILL
    outs = [p.communicate(timeout=120) for p in others]
    assert [p.returncode for p in others] == [0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {expected_sums()}
    # the victim finished chunks 0 and 4 and half of 8 (a but not b); the taker-over redid only chunk 8
    assert produced(log) == sorted([0, 4, 8, *range(8, N_ITEMS, CHUNK)])
    assert_clean(tmp_path / "cache")


def test_half_written_shard_is_never_read(tmp_path):
    victim = start(COLLECTOR, tmp_path / "log", tmp_path / "cache", 0, kill_after=5, how="half")
    victim.communicate(timeout=120)
    assert victim.returncode == -signal.SIGKILL
    store = Store("test", {"x": 1}, root=tmp_path / "cache")
    (shard_dir,) = store.folder.glob("shards-*")
    assert not (shard_dir / "a.000000008.npy").exists()  # the half file sits under a temporary name
    assert list(shard_dir.glob(".a.000000008.npy.*.tmp"))
    for shard in shard_dir.glob("*.npy"):
        assert np.load(shard).shape[0] == CHUNK
    calls = []

    def produce(lo, hi):
        calls.append(lo)
        x = np.arange(lo, hi, dtype=np.float64)
        return {"a": x[:, None] * np.ones((1, 3)), "b": x}

    out = store.collect(("a", "b"), N_ITEMS, CHUNK, produce)
    assert calls == list(range(8, N_ITEMS, CHUNK))
    np.testing.assert_array_equal(out["b"], np.arange(N_ITEMS))
    assert_clean(tmp_path / "cache")


def test_truncated_shard_is_recomputed(tmp_path):
    """A shard cut short under its final name (a crash on a file system without atomic renames)."""
    store = Store("test", {"x": 1}, root=tmp_path)
    calls = []

    def produce(lo, hi):
        calls.append(lo)
        if lo == 8 and len(calls) == 3:
            raise KeyboardInterrupt
        return {"a": np.arange(lo, hi, dtype=np.float32)}

    with pytest.raises(KeyboardInterrupt):
        store.collect(("a",), 12, 4, produce)
    shard = next(store.folder.glob("shards-*")) / "a.000000004.npy"
    shard.write_bytes(shard.read_bytes()[:-6])
    np.testing.assert_array_equal(store.collect(("a",), 12, 4, produce)["a"], np.arange(12))
    assert calls == [0, 4, 8, 4, 8]


LOCK_AND_DIE = r"""
store = cache.Store("test", {"x": 1}, root=Path(sys.argv[1]))
with store.lock("holding"):
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    holder = start(LOCK_AND_DIE, tmp_path, "die")
    holder.communicate(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    store = Store("test", {"x": 1}, root=tmp_path)
    assert (store.folder / ".lock").read_text().split()[0] == str(holder.pid)  # the dead holder's pid
    t0 = time.perf_counter()
    with store.lock():
        pass
    assert time.perf_counter() - t0 < 0.5


def test_warm_read_takes_no_lock(tmp_path):
    store = Store("test", {"x": 1}, root=tmp_path)
    store.collect(("a",), 6, 3, lambda lo, hi: {"a": np.arange(lo, hi)})
    holder = start(LOCK_AND_DIE, tmp_path, 30)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        out = store.collect(("a",), 6, 3, lambda lo, hi: pytest.fail("a finished store was recomputed"))
        assert time.perf_counter() - t0 < 0.5
        np.testing.assert_array_equal(out["a"], np.arange(6))
    finally:
        holder.kill()
        holder.communicate()


# --- whole evaluations: `saebench run` with core, downstream and probes on the tiny model -----------------

METRICS = ("core", "downstream", "probes")


def make_workspace(folder: Path, model, n_checkpoints: int = 3, save_model: bool = True) -> Path:
    """`model` (a SubjectModel) as a folder, a corpus, checkpoints sae0.. of its width and a tiny probe task
    under `folder` (the benchmark passes save_model=False for a real model, named by its alias)."""
    import random

    import pandas as pd

    from saebench.sae.formats.native import save_native
    from tests.conftest import random_sae, write_corpus

    if save_model:
        model.hf_model.save_pretrained(folder / "model")
        model.tokenizer.save_pretrained(folder / "model")
    write_corpus(folder / "corpus.txt")
    for i in range(n_checkpoints):
        save_native(random_sae(model.d_model, 96, k=4, seed=i), folder / "checkpoints" / f"sae{i}")
    rng, rows = random.Random(0), []
    for i in range(56):
        letters = "abcdefghijklm" if i % 2 == 0 else "nopqrstuvwxyz"
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(1 + i % 3)]
        rows.append({"prompt": " ".join(words), "target": i % 2 == 0})
    (folder / "tasks").mkdir()
    pd.DataFrame(rows).to_csv(folder / "tasks" / "halves.csv", index=False)
    (folder / "tasks" / "tiny_halves.yaml").write_text(
        "source: halves.csv\ntext_column: prompt\nlabel_column: target\npositive_label: true\n"
        "n_train: 32\nn_test: 20\nmax_tokens: 10\n"
    )
    return folder


def run_args(workspace: Path, checkpoint: str, out: Path, cache: Path) -> list[str]:
    return [
        "run",
        "--checkpoint",
        str(workspace / "checkpoints" / checkpoint) if checkpoint else str(workspace / "checkpoints"),
        "--tasks",
        ",".join(METRICS),
        "--probe-tasks",
        "tiny_halves",
        "--include-tasks",
        str(workspace / "tasks"),
        "--model",
        str(workspace / "model"),
        "--layer",
        "1",
        "--corpus",
        str(workspace / "corpus.txt"),
        "--n-tokens",
        "90",
        "--ctx",
        "16",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]


def comparable(result: dict):
    """What must not depend on how the run went: the key, values, counts and details (timings aside)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "timing"}
        return x

    return {k: strip(result[k]) for k in ("key", "values", "counts", "details")}


def results_of(out: Path, label: str) -> dict:
    return {m: comparable(json.loads((out / label / f"{m}.json").read_text())) for m in METRICS}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    """The workspace and the single-process reference: every checkpoint evaluated by one process (this one:
    the same code and thread count as a subprocess, without paying the imports again)."""
    from saebench.cli import main

    folder = make_workspace(tmp_path_factory.mktemp("concurrent"), tiny_llama)
    assert main(run_args(folder, "", folder / "reference", folder / "reference-cache")) == 0
    return folder


def finish(procs, stderr_files=None) -> list[str]:
    """Wait for `procs`; their stderr (from the pipes, or from `stderr_files`), none with a traceback."""
    errs = [p.communicate(timeout=300)[1] for p in procs]
    if stderr_files is not None:
        errs = [Path(f).read_text() for f in stderr_files]
    for err in errs:
        assert "Traceback" not in err, err
    return errs


def test_three_concurrent_runs_on_a_cold_cache(workspace, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    procs = [start(CLI, *run_args(workspace, f"sae{i}", out, cache)) for i in range(3)]
    errs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    for i in range(3):
        assert results_of(out, f"sae{i}") == results_of(workspace / "reference", f"sae{i}")
    assert_clean(cache)


def test_run_killed_during_collection_then_rerun(workspace, tmp_path):
    """The victim stops at its first shard, holding the lock, until another run waits on it; then it dies at
    its second, half-way through collecting the residuals, and the other goes on from its shard."""
    out, cache, pause = tmp_path / "out", tmp_path / "cache", str(tmp_path / "pause")
    victim = start(CLI, *run_args(workspace, "sae0", out, cache), kill_after=2, pause=pause)
    wait_for(lambda: Path(pause + ".ready").exists(), what="the victim to hold the lock", procs=[victim])
    log = tmp_path / "stderr"
    other = start(CLI, *run_args(workspace, "sae1", out, cache), stderr=log.open("w"))
    wait_for(lambda: "waiting for process" in log.read_text(), what="the other to wait", procs=[other])
    Path(pause + ".go").touch()
    victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL
    errs = finish([other], [log])
    assert other.returncode == 0, errs
    assert not (out / "sae0").exists()
    rerun = start(CLI, *run_args(workspace, "sae0", out, cache))
    finish([rerun])
    assert rerun.returncode == 0
    for label in ("sae0", "sae1"):
        assert results_of(out, label) == results_of(workspace / "reference", label)
    assert_clean(cache)
