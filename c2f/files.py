"""Files c2f writes: one atomic-write helper, and one writer per directory.

``atomic_write`` writes to ``<path>.tmp-<pid>``, flushes and fsyncs it, then ``os.replace``-s it onto
``path``: a reader sees the old file or the new one, never half of one, and a failed write removes its
temporary file. ``lock_directory`` takes an exclusive OS lock (``fcntl.flock``) on ``<dir>/.c2f-lock``
for the life of the process that holds it (a run directory while it trains, a cache while ``extract``
fills it); the OS frees it when that process ends, however it ends, so a killed writer leaves no stale
lock. A second process gets ``LockedError`` naming the holder's pid and host, and writes nothing.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable

try:
    import fcntl
except ImportError:   # Windows: no flock; runs go unlocked, with a warning
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = ".c2f-lock"
HOLDER_WAIT_S = 1.0   # how long a refused process waits for the holder to write its pid (it does so at once)

# The descriptors of the locks this process holds. A forked child (a data-loader worker) closes its copies at
# once: the lock stays with the holder alone, and dies with it even while orphaned workers linger.
_held: set = set()


def _close_inherited_locks() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, fsyncs it and moves it onto ``path``.

    On any failure (``write`` raising, a full disk, ``path`` an existing directory) the temporary file
    is removed and the error raised; ``path`` is left as it was.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else dict(encoding="utf-8"))) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


class LockedError(RuntimeError):
    """A directory another c2f process holds the lock of; the message names its pid and host."""


class DirLock:
    """The held lock of one directory; ``release()`` (or leaving a ``with`` block) frees it.

    Only the process that took it releases it; a forked child has closed its copy of the descriptor.
    """

    def __init__(self, directory: str, fd: int | None):
        self.directory, self.fd, self.pid = directory, fd, os.getpid()

    def release(self) -> None:
        if self.fd is None or os.getpid() != self.pid:
            return
        try:
            os.ftruncate(self.fd, 0)   # the next holder writes its own pid; a reader never sees a stale one
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            _held.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The holder's pid and host as it wrote them into the lock file."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            info = None
        if isinstance(info, dict):
            return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"
        if time.monotonic() > deadline:
            return "a process that has not written its pid yet"
        time.sleep(0.02)


def lock_directory(directory: str, what: str, hint: str) -> DirLock:
    """Takes the exclusive lock of ``directory`` (made if absent) or raises ``LockedError``.

    ``what`` names what the directory holds in the error ("run", "feature cache"), ``hint`` says what to
    do instead. Only the directory and its lock file are created; a refused caller changes nothing.
    """
    os.makedirs(directory, exist_ok=True)
    if fcntl is None:
        log.warning("cannot lock %s: this platform has no fcntl; never write into it from two processes at once",
                    directory)
        return DirLock(directory, None)
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
        os.close(fd)
        if holder is None:
            raise
        raise LockedError(f"{directory} is in use: another c2f process ({holder}) is writing this {what}; "
                          f"{hint}") from None
    _held.add(fd)
    info = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return DirLock(directory, fd)
