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

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from huey import Huey
from huey.consumer import Scheduler, Worker, WorkerRecycle

from pipeline.config import GUARD_BACKOFF
from pipeline.errors import StorageError, from_chroma, storage_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Free space a consumer whose Chroma failed waits for before it restarts.
RESTART_ROOM = 4 * 2**20


def has_room(path: Path) -> bool:
    """RESTART_ROOM free under ``path``, and a small write there goes through."""
    probe = path / f".room-probe-{os.getpid()}"
    try:
        if shutil.disk_usage(path).free < RESTART_ROOM:
            return False
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


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


@contextlib.contextmanager
def reset_on_storage_error(storage: Any, doing: str) -> Iterator[None]:
    """Raise storage trouble as StorageError and drop Huey's SQLite connection with it.

    A COMMIT that failed for lack of space leaves its transaction open on the connection,
    and Huey's next ``begin`` would then fail for another reason forever.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        error = storage_error(exc, doing, getattr(storage, "filename", None))
        if error is None:
            raise
        close = getattr(storage, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        raise error from exc


class StorageAwareWorker(Worker):
    """Huey's worker loop, with storage trouble handled by the consumer's StorageWatch."""

    def loop(self, now: Any = None) -> None:
        watch: StorageWatch = self.huey.storage_watch
        try:
            task = self.huey.dequeue()
        except StorageError as refused:
            self.stop_flag.wait(watch.failed(refused))
            return
        except Exception:
            self._logger.exception("Error reading from queue")
            self.sleep()
            return
        if task is None:
            if not self.huey.storage.blocking:
                self.sleep()
            return
        watch.ok()  # a task was taken off the queue: the queue's file can be written
        self.delay = self.default_delay
        self.task_count += 1
        try:
            self.huey.execute(task, now)
        except Exception as exc:  # e.g. Huey scheduling a retry into a full queue
            trouble = storage_error(exc, f"cannot run task {task.id}")
            if trouble is None:
                self._logger.exception("Unhandled error during execution of task %s.", task.id)
            else:
                watch.failed(trouble)
        if self.max_tasks and self.task_count >= self.max_tasks:
            self._logger.info("Worker reached max tasks (%d), exiting.", self.max_tasks)
            raise WorkerRecycle()


class StorageAwareScheduler(Scheduler):
    """Huey's scheduler loop, with storage trouble handled by the consumer's StorageWatch."""

    _next_loop: float
    _next_periodic: float

    def loop(self, now: Any = None) -> None:
        watch: StorageWatch = self.huey.storage_watch
        current = self._next_loop
        self._next_loop += self.interval
        if self._next_loop < time.monotonic():
            self._next_loop = time.monotonic()
            return
        try:
            for task in self.huey.read_schedule(now):
                self._enqueue(task, watch)
        except StorageError as error:
            watch.failed(error)
        except Exception:
            self._logger.exception("Error reading schedule.")
        if self.periodic and self._next_periodic <= time.monotonic():
            while self._next_periodic <= time.monotonic():
                self._next_periodic += self.periodic_task_seconds
            for task in self.huey.read_periodic(now):
                self._logger.info("Enqueueing periodic task %s.", task)
                self._enqueue(task, watch)
        self.sleep_for_interval(current, self.interval)

    def _enqueue(self, task: Any, watch: StorageWatch) -> None:
        try:
            self.huey.enqueue(task)
        except StorageError as error:
            # A periodic task comes again at its next time; a retry's chunks stay
            # outstanding in the ledger and are requeued.
            watch.failed(error)
        except Exception:
            self._logger.exception("Error enqueueing %s.", task)


class HomeLogHandler(logging.FileHandler):
    """logs/NAME in the data home. When the disk refuses a line, one line on stderr says so
    (instead of logging's "--- Logging error ---" and a traceback for every record)."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename)
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self._failing and not self._errored:
            self._failing = False
            print(f"indexq: writing to {self.baseFilename} works again", file=sys.stderr)
        self._errored = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._errored = True
        if not self._failing:
            self._failing = True
            reason = sys.exc_info()[1]
            print(f"indexq: cannot write to {self.baseFilename} ({reason}); logging to stderr only", file=sys.stderr)

    _errored = False


class HomeHuey(Huey):
    """A Huey whose queue lives in (or beside) the data home: a queue operation the disk
    refuses raises StorageError, with the SQLite connection reset."""

    storage_watch: StorageWatch

    @property
    def _doing(self) -> str:
        return f"cannot use the queue {getattr(self.storage, 'filename', self.name)}"

    def enqueue(self, task: Any) -> Any:
        with reset_on_storage_error(self.storage, self._doing):
            return super().enqueue(task)

    def dequeue(self) -> Any:
        with reset_on_storage_error(self.storage, self._doing):
            return super().dequeue()

    def read_schedule(self, timestamp: Any = None) -> Any:
        with reset_on_storage_error(self.storage, self._doing):
            return super().read_schedule(timestamp)
