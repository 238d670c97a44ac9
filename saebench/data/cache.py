"""On-disk cache of arrays, keyed by everything that produced them.

A `Store` is one folder per key (model, layer, data, sizes, ...): `key.json` says what is inside, each
array is one `.npy` file written atomically.  `Store.collect` fills an array chunk by chunk, keeping each
finished chunk as a shard, so a job killed half-way resumes where it stopped; when every chunk is done the
shards are joined into the final array and removed.  Arrays are read back memory-mapped.

Several processes may share a cache (a job queue evaluating a folder of checkpoints on one site).  Every
file is written to a temporary name and renamed, so a reader sees a whole file or none.  Producing is
serialised per store by a file lock (`saebench.data.locks`, released by the kernel when its holder dies):
the first process collects, the others wait, then find the finished arrays and load them; when the
producer was killed, the next one takes over from its shards.  A warm read (the arrays exist) takes no
lock.

The ranks of one torchrun launch fill a store together (`collecting_together`): each collects a disjoint
share of the missing shards, holding the lock shared (so the ranks write side by side while any other
process waits), then every rank hears whether every share is done, and the first to take the lock
exclusively joins the shards as any producer does (the others find the array).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from saebench.data.locks import FileLock


def cache_root() -> Path:
    """`$SAEBENCH_CACHE`, else the user's cache folder (`~/.cache/saebench`)."""
    env = os.environ.get("SAEBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saebench"


def key_digest(key: dict) -> str:
    """A short stable hash of a JSON-able key."""
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _chunk_rows(n_items: int, chunk: int) -> dict[int, int]:
    """{start: rows} of the chunks [start, start + chunk) that cover n_items."""
    return {s: min(s + chunk, n_items) - s for s in range(0, n_items, chunk)}


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _rows_of(path: Path) -> int | None:
    """The first-axis length of a readable .npy file, else None (missing, or not a whole array)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
    except (OSError, ValueError, EOFError, IndexError):
        return None


LOCK_FILE = ".lock"

#: the processes filling stores together (`collecting_together`), or None: this process alone
_together = None


@contextmanager
def collecting_together(group) -> Iterator[None]:
    """Within: every `Store.collect` is a step that each rank of `group` takes with the same store: each
    collects `todo[rank::world]` of the shards still missing, every rank learns whether every share is
    done, then the shards are joined (see the module docstring).  `group` has `rank`, `world` and
    `gather(step, obj)` (every rank's obj, on every rank: `saebench.ranks.Group`)."""
    global _together
    outer, _together = _together, group
    try:
        yield
    finally:
        _together = outer


class Store:
    """The cached arrays of one key under `<root>/<kind>/<digest>/`."""

    def __init__(self, kind: str, key: dict, root: Path | None = None):
        self.kind = kind
        self.key = key
        self.folder = (root or cache_root()) / kind / key_digest(key)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            atomic_write_bytes(key_file, json.dumps(key, indent=1, sort_keys=True, default=str).encode())

    @classmethod
    def covering(cls, kind: str, key: dict, size_field: str, root: Path | None = None, *names: str):
        """A finished store of `kind` whose key equals `key` except for a `size_field` at least as large.

        For arrays that are prefixes of larger ones (the first N windows of a stream): a request for fewer
        rows reuses a bigger collection.  Returns None when there is none.
        """
        best = None
        for key_file in ((root or cache_root()) / kind).glob("*/key.json"):
            try:
                other = json.loads(key_file.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            size = other.get(size_field)
            same = {k: v for k, v in other.items() if k != size_field} == {
                k: v for k, v in json.loads(json.dumps(key, default=str)).items() if k != size_field
            }
            fits = isinstance(size, int) and size >= key[size_field]
            if same and fits and (best is None or size < best[1]):
                store = cls(kind, other, root)
                if store.has(*names):
                    best = (store, size)
        return None if best is None else best[0]

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npy"

    def has(self, *names: str) -> bool:
        return all(self.path(n).exists() for n in names)

    def load(self, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(self.path(name), mmap_mode="r" if mmap else None, allow_pickle=False)

    def lock(self, what: str = "", shared: bool = False) -> FileLock:
        """The store's producer lock: held while its arrays are written (re-entrant within a process); shared
        by the ranks writing their shares of one collection."""
        return FileLock(self.folder / LOCK_FILE, what or f"writing {self.kind}", shared=shared)

    def save(self, name: str, array: np.ndarray) -> None:
        with self.lock(f"writing {self.kind}/{name}"):
            atomic_save_npy(self.path(name), array)

    def cached(self, name: str, make: Callable[[], np.ndarray], mmap: bool = False) -> np.ndarray:
        """Array `name`, computed by `make()` and saved when missing, by one process at a time."""
        if not self.has(name):
            with self.lock(f"computing {self.kind}/{name}"):
                if not self.has(name):  # else another process finished it while this one waited
                    atomic_save_npy(self.path(name), make())
        return self.load(name, mmap)

    def collect(
        self,
        names: tuple[str, ...],
        n_items: int,
        chunk: int,
        produce: Callable[[int, int], dict[str, np.ndarray]],
        desc: str = "collecting",
    ) -> dict[str, np.ndarray]:
        """Fill arrays `names` over items [0, n_items) with `produce(start, stop)`, resumably.

        `produce` returns one array per name whose first axis has stop - start rows.  Finished chunks
        survive an interruption as shards; a rerun computes only the missing ones.  One process collects
        at a time: others wait for the lock and then load what it made, or go on from its shards.
        """
        group = _together
        if group is not None and group.world > 1:
            self._collect_together(group, names, n_items, chunk, produce, desc)
        elif not self.has(*names):
            with self.lock(desc) as lock:
                if not self.has(*names):  # else another process finished while this one waited
                    self._collect(names, n_items, chunk, produce, desc, lock.locked)
        return {n: self.load(n) for n in names}

    def _shard_dir(self, names: tuple[str, ...], chunk: int) -> Path:
        return self.folder / f"shards-{'-'.join(names)}-{chunk}"

    @staticmethod
    def _shard(shard_dir: Path, name: str, start: int) -> Path:
        return shard_dir / f"{name}.{start:09d}.npy"

    def _missing(self, names, shard_dir: Path, rows: dict[int, int]) -> list[int]:
        """Starts of the chunks whose shards are not all there, whole."""
        return [s for s in rows if not all(_rows_of(self._shard(shard_dir, n, s)) == rows[s] for n in names)]

    def _collect(self, names, n_items, chunk, produce, desc, locked: bool) -> None:
        shard_dir = self._shard_dir(names, chunk)
        if locked:  # temporaries left by a killed producer; nobody else writes here while we hold the lock
            for leftover in [
                *shard_dir.glob(".*.tmp"),
                *(t for n in names for t in self.folder.glob(f".{n}.npy.*.tmp")),
            ]:
                leftover.unlink(missing_ok=True)
        rows = _chunk_rows(n_items, chunk)
        todo = self._missing(names, shard_dir, rows)
        done = n_items - sum(rows[s] for s in todo)
        bar = tqdm(total=n_items, desc=desc, unit="item", initial=done, dynamic_ncols=True, leave=False)
        with bar:
            self._produce(names, shard_dir, rows, todo, produce, desc, bar)
        for n in names:
            if not self.has(n):  # else joined before an interruption
                self._join(n, [np.load(self._shard(shard_dir, n, s), mmap_mode="r") for s in rows])
        shutil.rmtree(shard_dir, ignore_errors=True)

    def _produce(self, names, shard_dir: Path, rows: dict[int, int], todo: list[int], produce, desc, bar):
        for start in todo:
            stop = start + rows[start]
            arrays = produce(start, stop)
            for n in names:
                if arrays[n].shape[0] != stop - start:
                    raise RuntimeError(
                        f"{desc}: produce() gave {arrays[n].shape[0]} rows of {n!r}, expected {stop - start}"
                    )
                atomic_save_npy(self._shard(shard_dir, n, start), arrays[n])
            bar.update(stop - start)

    def _collect_together(self, group, names, n_items, chunk, produce, desc) -> None:
        """`collect` as one step of every rank of `group` (`collecting_together`): rank 0's list of missing
        chunks is split round-robin, each rank produces its share under the shared lock, every rank hears
        whether every share is done (a rank's failure fails the step on every rank instead of leaving the
        others waiting), then the shards are joined under the exclusive lock by whichever rank comes first."""
        shard_dir, rows = self._shard_dir(names, chunk), _chunk_rows(n_items, chunk)
        todo = [] if self.has(*names) else self._missing(names, shard_dir, rows)
        mine = group.gather(f"collect {self.folder}", todo)[0][group.rank :: group.world]
        error = None
        try:
            with self.lock(f"{desc}, rank {group.rank}'s share", shared=True):
                mine = [s for s in self._missing(names, shard_dir, rows) if s in mine]  # or done by others
                total, quiet = sum(rows[s] for s in mine), group.rank != 0
                bar = tqdm(total=total, desc=desc, unit="item", leave=False, disable=quiet)
                with bar:
                    self._produce(names, shard_dir, rows, mine, produce, desc, bar)
        except Exception as err:
            error = err
        errors = group.gather(f"collected {self.folder}", None if error is None else _one_line(error))
        if error is not None:
            raise error
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            raise RuntimeError(f"{desc}: rank {failed[0][0]} failed at its share: {failed[0][1]}")
        if not self.has(*names):
            with self.lock(desc) as lock:
                if not self.has(*names):  # every share is there: this joins them
                    self._collect(names, n_items, chunk, produce, desc, lock.locked)

    def _join(self, name: str, parts: list[np.ndarray]) -> None:
        rows = sum(p.shape[0] for p in parts)
        final = self.path(name)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=parts[0].dtype, shape=(rows, *parts[0].shape[1:])
            )
            offset = 0
            for p in parts:
                out[offset : offset + p.shape[0]] = p
                offset += p.shape[0]
            out.flush()
            del out
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
