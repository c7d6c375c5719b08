"""OS locks of the data home: the writer lock (held for life) and the commit lock.

Both are ``fcntl.flock`` locks, so the kernel releases them when the holder dies, even
by SIGKILL: a stale lock file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import BusyError, WriterLockedError


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def read_holder(path: Path) -> dict[str, Any] | None:
    """What the holder of a lock wrote about itself, if anything."""
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}"


class ProcessLock:
    """Exclusive lock that makes a process the one of its role (writer, maintenance) in a data home."""

    def __init__(self, path: Path, role: str = "writer") -> None:
        self.path = path
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = _open(self.path)
        # A status probe holds a shared lock for microseconds: retry briefly so that
        # it is never mistaken for a writer.
        if not _poll(fd, fcntl.LOCK_EX, time.monotonic() + 1.0):
            os.close(fd)
            holder = describe_holder(read_holder(self.path))
            raise WriterLockedError(
                f"another {self.role} holds {self.path}: {holder}",
                hint=f"stop that {self.role} first; only one may run per data home"
                + (" and per queue" if self.role == "writer" else ""),
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def writer_alive(path: Path) -> dict[str, Any] | None:
    """The holder's details if a writer holds the lock now, else None."""
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path) or {}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# The longest the writer stops before a commit for waiters (see CommitLock): one waiter
# gets in within one poll (50 ms at most); a stream of overlapping ones cannot hold the
# writer back for longer than this per commit.
GIVE_WAY_SECONDS = 1.0
# A waiter polls the lock every 1 ms at first, doubling up to this.
POLL_MAX_SECONDS = 0.05


def _poll(fd: int, operation: int, deadline: float) -> bool:
    """flock(fd, operation) without blocking, retried until ``deadline``; whether it was taken."""
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX_SECONDS)


class CommitLock:
    """Held by the writer around each commit; others take it to see Chroma quiet.

    The writer frees it for well under a millisecond between two commits when it commits
    back to back (a fast embedder, a GPU), too short a window for a waiter that polls.
    So a waiter with a timeout first claims the next turn, a shared lock on a second file
    (``commit.wait``, beside the commit lock) that it keeps while it polls; before each
    commit the writer waits until it can take an exclusive lock on that file (no claim
    left), for GIVE_WAY_SECONDS at most, and drops it at once. The writer finishes the
    commit in hand, stops before the next one, the waiter takes the commit lock within one
    poll and drops its claim, and the writer goes on once the waiter is done.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = _open(path)
        try:
            self._wait_fd = _open(path.with_suffix(".wait"))
        except BaseException:
            os.close(self._fd)
            raise

    @contextlib.contextmanager
    def held(self, timeout: float | None = None) -> Iterator[float]:
        """Hold the lock; yields the seconds spent waiting for it.

        Without a timeout (the writer): give way to waiters (GIVE_WAY_SECONDS at most),
        then block until the lock is free. With one (backups, checks, recovery, search):
        claim the next turn, then poll until the lock is free, raising BusyError after
        ``timeout`` seconds.
        """
        started = time.monotonic()
        if timeout is None:
            if _poll(self._wait_fd, fcntl.LOCK_EX, started + GIVE_WAY_SECONDS):
                fcntl.flock(self._wait_fd, fcntl.LOCK_UN)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        else:
            self._wait_for(started + timeout, timeout)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _wait_for(self, deadline: float, timeout: float) -> None:
        # The claim: the writer holds the exclusive lock on it only for an instant.
        claimed = _poll(self._wait_fd, fcntl.LOCK_SH, deadline)
        try:
            if not (claimed and _poll(self._fd, fcntl.LOCK_EX, deadline)):
                raise BusyError(
                    f"the commit lock {self.path} stayed busy for {timeout:g}s",
                    hint="the writer or a maintenance task is working; try again",
                )
        finally:
            if claimed:
                fcntl.flock(self._wait_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._wait_fd)
