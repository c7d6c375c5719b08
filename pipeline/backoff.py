"""A data home the disk cannot write (full, read-only, I/O error), as a consumer meets it.

Huey logs every failed poll of its queue with a traceback: on a full disk the writer's
log grew by 6,106 lines in 35 s ("Error reading from queue", then "--- Logging error
---" once the log itself could not be written). Here storage trouble is a *state*: one
line when a consumer enters it, one when it leaves, and back-off in between. Nothing is
dropped: the ledger still holds every outstanding chunk, and a task that met the
trouble waits and runs again.

Chroma is the exception. After chromadb 1.5.9 failed a write for lack of space, its
next calls in the same process can block forever while holding the GIL (measured: an
upsert works once space is freed, then ``count()`` never returns, and a new client
hangs in its start-up), which no signal can interrupt. So a consumer whose Chroma
failed that way never calls it again: it waits until the disk has room, then restarts
itself the way Huey restarts on SIGHUP (a graceful stop, then the same command again
in a fresh process, which opens Chroma anew).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline.config import GUARD_BACKOFF
from pipeline.errors import StorageError, from_chroma, storage_error
from pipeline.fsync import probe_write

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Free space a consumer whose Chroma failed waits for before it restarts.
RESTART_ROOM = 4 * 2**20


def has_room(path: Path) -> bool:
    """RESTART_ROOM free under ``path``, and a small write there goes through."""
    try:
        if shutil.disk_usage(path).free < RESTART_ROOM:
            return False
        probe_write(path, "room")
    except OSError:
        return False
    return True


class StorageWatch:
    """Shared by a consumer's worker, scheduler and tasks: whoever meets the trouble first says so, once."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.since: float | None = None
        self._lock = threading.Lock()
        self._delay = GUARD_BACKOFF[0]

    @property
    def troubled(self) -> bool:
        return self.since is not None

    def failed(self, error: StorageError, then: str = "") -> float:
        """Enter (or stay in) the trouble state; returns the seconds to wait before trying again."""
        first, growth, longest = GUARD_BACKOFF
        then = then or f"retrying with back-off (at most every {longest:g}s), nothing is dropped"
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                self._delay = first
                logger.error("%s paused: %s; %s", self.role, error, then)
            delay = self._delay
            self._delay = min(self._delay * growth, longest)
        return delay

    def ok(self) -> None:
        """A write went through: leave the trouble state (logged once)."""
        if self.since is None:
            return
        with self._lock:
            if self.since is not None:
                waited = time.monotonic() - self.since
                logger.warning("%s resumed: the data home can be written again (after %.0fs)", self.role, waited)
                self.since = None

    def wait(self, error: StorageError, stop: threading.Event) -> bool:
        """Back off after ``error``; False if a stop was asked for meanwhile."""
        return not stop.wait(self.failed(error))

    def retry(self, doing: str, step: Callable[[], T], stop: threading.Event, path: Path) -> T | None:
        """Run ``step`` until it gets through, waiting out storage trouble; None if stopped first.

        Any other error is raised as it is. ``path`` is where the step writes (see
        ``storage_error``). A refused COMMIT leaves no transaction open (``Ledger._tx``).
        """
        while True:
            try:
                result = step()
            except Exception as exc:
                error = storage_error(exc, doing, path, unexplained=True)
                if error is None:
                    raise
                if from_chroma(exc):
                    self.restart_when_room(error, stop, path)
                    return None
                if not self.wait(error, stop):
                    return None
                continue
            self.ok()
            return result

    def restart_when_room(self, error: StorageError, stop: threading.Event, path: Path) -> None:
        """Chroma failed a write: never call it again here. Wait for room under ``path``,
        then restart this consumer in a fresh process (SIGHUP: graceful stop, then exec).
        Returns once the stop has begun, or at once if a stop was asked for."""
        then = "chromadb cannot be called again in this process: restarting once the disk has room"
        while not stop.is_set():
            if has_room(path):
                logger.warning("%s: the disk has room again; restarting to open Chroma afresh", self.role)
                os.kill(os.getpid(), signal.SIGHUP)
                # Hold the worker until the consumer stops it: no other task may reach Chroma.
                stop.wait()
                return
            stop.wait(self.failed(error, then))
