"""On-disk cache of arrays, keyed by everything that produced them.

A `Store` is one folder per key (model, layer, data, sizes, ...): `key.json` says what is inside, each
array is one `.npy` file written atomically.  `Store.collect` fills an array chunk by chunk, keeping each
finished chunk as a shard, so a job killed half-way resumes where it stopped; when every chunk is done the
shards are joined into the final array and removed.  Arrays are read back memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


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

    def save(self, name: str, array: np.ndarray) -> None:
        atomic_save_npy(self.path(name), array)

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
        survive an interruption as shards; a rerun computes only the missing ones.
        """
        if self.has(*names):
            return {n: self.load(n) for n in names}
        shard_dir = self.folder / f"shards-{'-'.join(names)}-{chunk}"
        starts = list(range(0, n_items, chunk))
        todo = [s for s in starts if not all((shard_dir / f"{n}.{s:09d}.npy").exists() for n in names)]
        with tqdm(
            total=n_items,
            desc=desc,
            unit="item",
            initial=(len(starts) - len(todo)) * chunk,
            dynamic_ncols=True,
            leave=False,
        ) as bar:
            for start in todo:
                stop = min(start + chunk, n_items)
                arrays = produce(start, stop)
                for n in names:
                    if arrays[n].shape[0] != stop - start:
                        raise RuntimeError(
                            f"{desc}: produce() gave {arrays[n].shape[0]} rows of {n!r}, "
                            f"expected {stop - start}"
                        )
                    atomic_save_npy(shard_dir / f"{n}.{start:09d}.npy", arrays[n])
                bar.update(stop - start)
        for n in names:
            parts = [np.load(shard_dir / f"{n}.{s:09d}.npy", mmap_mode="r") for s in starts]
            self._join(n, parts)
        shutil.rmtree(shard_dir, ignore_errors=True)
        return {n: self.load(n) for n in names}

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
