"""What the writer's and the maintenance consumer's processes share: a graceful Huey
consumer whose loops ride out a disk that refuses writes, logging to the data home, and
one-line errors where Huey's own script has no error handling of ours."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from huey import Huey
from huey.consumer import Consumer, Scheduler, Worker, WorkerRecycle

from pipeline.backoff import StorageWatch
from pipeline.config import Config, private_files
from pipeline.errors import ConfigError, IndexqError, StorageError, describe, storage_error

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


class GracefulConsumer(Consumer):
    """Huey's consumer with SIGTERM made graceful, like SIGINT.

    Huey treats SIGTERM as "stop now", which with thread workers ends the process in
    the middle of a commit. The writer's tasks check the stop flag between commits,
    so a graceful stop finishes the commit in hand and then stops.

    A data home the disk cannot write is a state of its own (``pipeline.backoff``): one
    log line when it starts and one when it ends, back-off in between.
    """

    worker_class = StorageAwareWorker
    scheduler_class = StorageAwareScheduler

    def __init__(self, huey: Huey, **options: Any) -> None:
        super().__init__(huey, **options)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._signal_actions[signum] = (False, True)
        # Now, not when run() starts: a SIGTERM while the model loads or the queue is
        # requeued then stops the consumer gracefully as soon as it runs, instead of
        # killing the process with the default action.
        if threading.current_thread() is threading.main_thread():
            self._set_signal_handlers()


def one_thread_worker(role: str, command: str, options: dict[str, Any], periodic_for: str) -> None:
    """``huey_consumer`` options a writer or a maintenance consumer cannot run with, refused
    in one line: more or fewer workers than one thread (two maintenance threads took two
    backups of one watermark; ``-w 0`` ran nothing while holding the lock), and ``-n``,
    which turns off the scheduler that runs ``periodic_for``."""
    workers = options.get("workers", 1)
    worker_type = options.get("worker_type", "thread")
    hint = f"run: huey_consumer {command} -w 1 -k thread"
    if workers != 1 or worker_type != "thread":
        raise ConfigError(
            f"the {role} runs exactly one thread worker, got workers={workers} worker_type={worker_type!r}", hint=hint
        )
    if not options.get("periodic", True):
        raise ConfigError(f"the {role} needs Huey's scheduler for {periodic_for}: drop -n/--no-periodic", hint=hint)


def exit_with(exc: IndexqError) -> SystemExit:
    """For huey_consumer, which has no error handling of ours: what the CLI would print, and its exit code."""
    print(describe(exc), file=sys.stderr)
    return SystemExit(exc.exit_code)


def log_to_home(config: Config, name: str) -> None:
    """A consumer logs to logs/NAME in the data home as well as to stderr."""
    handler = HomeLogHandler(str(config.logs_path / name))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    # The Chroma HttpClient's transport logs every request at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        # Under huey_consumer only Huey's own logger prints: show ours on stderr too.
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter(LOG_FORMAT))
        for package in ("pipeline", "workers", "tasks", "ops"):
            logging.getLogger(package).addHandler(console)
    os.chmod(config.logs_path / name, 0o600)


def lazy_huey(build: Callable[[Config], T]) -> Callable[[str], T]:
    """A module ``__getattr__`` that builds ``huey`` for huey_consumer on first use, from
    ``INDEXQ_*`` variables: importing the module (as ``indexq worker --home`` does) then
    creates nothing in another data home, and bad configuration is one line, not a traceback."""
    instance: list[T] = []

    def __getattr__(name: str) -> T:
        if name != "huey":
            raise AttributeError(name)
        if not instance:
            # huey_consumer is where this process starts: everything it creates in the
            # data home (Chroma's files included) is the owner's only.
            private_files()
            try:
                instance.append(build(Config.from_env()))
            except IndexqError as exc:
                raise exit_with(exc) from None
        return instance[0]

    return __getattr__
