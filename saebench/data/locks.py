"""Inter-process file locks for the activation cache: one process produces, the others wait.

`FileLock(path)` takes an exclusive lock on `path` (created if missing).  On POSIX it is `fcntl.flock`,
on Windows `msvcrt.locking` on the file's first byte: either way the kernel drops the lock when its
process exits or is killed, so a lock left by a dead process never blocks anyone and there is nothing to
detect or clean up (the lock file itself stays; it is empty apart from the holder's pid, for messages).
Where the file system cannot lock (some network or FUSE mounts answer ENOLCK or EOPNOTSUPP), the lock
degrades to no lock with one warning: every cache file is still written to a temporary name and renamed,
so readers never see a partial file, but two processes may then compute the same thing twice.

A lock may be taken shared (`shared=True`): shared holders exclude exclusive ones but not each other
(the ranks of one torchrun launch writing disjoint shards of one cache entry, while any other producer
waits).  Windows' `msvcrt.locking` has no shared mode: there shared holders take turns.

The lock is re-entrant within a process (a counter per path), so a locked method may call another; a
process holding a lock shared cannot take it exclusively (release it first).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

#: seconds a process waits for a lock before it says on stderr what it is waiting for
WAIT_MESSAGE_AFTER_S = 1.0

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_held: dict[str, tuple[int, int, bool]] = {}  # path -> (fd, depth, shared) of the locks this process holds
_held_guard = threading.Lock()
_warned = False


def _try_lock(fd: int, shared: bool = False) -> bool:
    """Take the lock without waiting; False when another process holds it (exclusively, or at all when
    `shared` is False)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the file: 'process PID (what it does)'."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid, _, what = os.read(fd, 512).decode(errors="replace").strip().partition(" ")
    except OSError:
        pid, what = "", ""
    who = f"process {pid}" if pid.isdigit() else "another process"
    return f"{who} ({what})" if what else who


class FileLock:
    """An inter-process lock on `path`, as a context manager: exclusive, or `shared` with other shared
    holders; `what` names it in messages."""

    def __init__(self, path: str | Path, what: str = "", shared: bool = False):
        self.path = Path(path)
        self.what = what or "writing"
        self.shared = shared
        #: whether the lock is really held (False where the file system cannot lock)
        self.locked = False

    def __enter__(self) -> FileLock:
        key = str(self.path)
        with _held_guard:
            if key in _held:
                fd, depth, shared = _held[key]
                if shared and not self.shared:
                    raise RuntimeError(f"{self.path}: held shared by this process; release it to lock it")
                _held[key] = (fd, depth + 1, shared)
                self.locked = fd >= 0
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = self._acquire(fd)
        except BaseException:
            os.close(fd)
            raise
        self.locked = locked
        if locked:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {self.what}".encode())
            except OSError:
                pass  # the pid is only for other processes' messages
        with _held_guard:
            _held[key] = (fd if locked else -1, 1, self.shared)
        if not locked:
            os.close(fd)
        return self

    def _acquire(self, fd: int) -> bool:
        """Wait for the lock; False when the file system cannot lock at all (then run unlocked)."""
        global _warned
        started, pause, told = time.monotonic(), 0.005, False
        while True:
            try:
                if _try_lock(fd, self.shared):
                    if told:
                        print(f"saebench: {self.path.parent} is free, continuing", file=sys.stderr)
                    return True
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                if not _warned:
                    _warned = True
                    warnings.warn(
                        f"file locks are not supported under {self.path.parent} ({e.strerror}); "
                        "concurrent processes may compute the same cache entries twice",
                        stacklevel=3,
                    )
                return False
            if not told and time.monotonic() - started >= WAIT_MESSAGE_AFTER_S:
                told = True
                print(
                    f"saebench: waiting for {_holder(fd)} to finish with {self.path.parent}",
                    file=sys.stderr,
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def __exit__(self, *exc) -> None:
        key = str(self.path)
        with _held_guard:
            fd, depth, shared = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1, shared)
                return
            del _held[key]
        if fd >= 0:
            try:
                _unlock(fd)
            finally:
                os.close(fd)


def held(path: str | Path) -> bool:
    """Whether this process holds the lock on `path`."""
    return str(Path(path)) in _held
