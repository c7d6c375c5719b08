"""The one writer: ``indexq worker``, or ``huey_consumer workers.writer.huey -w 1 -k thread``.

``WriterHuey.create_consumer`` is where a process becomes the writer, whether it was
started by ``indexq worker`` or by ``huey_consumer``: it takes the data home's writer
lock (a second writer is refused before it touches Chroma), loads the model, opens
Chroma, and requeues every chunk the ledger still owes. With a shared (Redis) queue it
also holds the queue's lease, so that one writer serves one queue.

``huey`` (for huey_consumer) is built on first use from ``INDEXQ_*`` variables
(``INDEXQ_HOME`` names the data home).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from pipeline import alerts
from pipeline.backoff import StorageWatch
from pipeline.config import Config, same_file
from pipeline.errors import ConfigError, IndexqError, WriterLockedError, first_line, storage_errors
from pipeline.locks import ProcessLock
from pipeline.metrics import MetricsServer
from pipeline.metrics import serve as serve_metrics
from pipeline.progress import Publisher
from pipeline.queryserver import QueryServer
from pipeline.queryserver import serve as serve_queries
from pipeline.queue import QueueClient
from pipeline.writer import Writer
from tasks.indexing import WriterTasks, register
from workers.consumer import GracefulConsumer, exit_with, lazy_huey, log_to_home, one_thread_worker

logger = logging.getLogger(__name__)


class QueueLease:
    """With a shared queue, one writer per queue: a lease in Redis, renewed while the writer lives.

    The data home's flock stops a second writer on the same machine and home; a writer
    with another data home on another machine would drain the same queue into a second
    ledger. The lease names its holder; a writer finding its own data home's lease takes
    it over (it holds that home's flock, so the old holder is dead); any other waits
    out the TTL of a dead holder or is refused (exit 3).
    """

    TTL = 30
    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    _TAKEOVER = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then"
        " return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) end return false"
    )

    def __init__(self, conn: Any, key: str, holder: dict[str, Any], on_lost: Any = None) -> None:
        self.conn, self.key = conn, key
        self.holder = holder
        self.on_lost = on_lost
        self.value = json.dumps(holder, sort_keys=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(10):
            if self.conn.set(self.key, self.value, nx=True, ex=self.TTL):
                break
            raw = self.conn.get(self.key)
            if raw is None:
                continue  # it just expired: try to take it again
            current = json.loads(raw)
            if (current.get("host"), current.get("home")) != (self.holder["host"], self.holder["home"]):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("since", 0)))
                raise WriterLockedError(
                    f"another writer serves this queue: pid {current.get('pid')} on {current.get('host')}"
                    f" (data home {current.get('home')}) since {since}",
                    hint=f"run one writer per queue; if it died, its lease ends within {self.TTL}s",
                )
            # Our own data home's lease: its holder is dead (we hold the home's flock).
            # Compare-and-set, so that a lease someone else took meanwhile is not overwritten.
            if self.conn.eval(self._TAKEOVER, 1, self.key, raw, self.value, self.TTL):
                break
        else:
            raise WriterLockedError("could not take the writer's lease on the queue", hint="try again")
        self._thread = threading.Thread(target=self._renew, name="indexq-queue-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.TTL / 3):
            try:
                if not self.conn.eval(self._RENEW, 1, self.key, self.value, self.TTL):
                    # Lapsed (Redis was away longer than the TTL) and free: take it again.
                    if self.conn.set(self.key, self.value, nx=True, ex=self.TTL):
                        logger.warning("the writer's lease on the queue had lapsed; taken again")
                        continue
                    # Another writer took the queue over: stop (gracefully) rather than
                    # drain it into a second ledger.
                    logger.critical("the writer's lease on the queue was taken by another writer: stopping")
                    if self.on_lost is not None:
                        self.on_lost()
                    return
            except Exception as exc:  # Redis away: the consumer backs off; keep trying
                logger.warning("could not renew the writer's lease on the queue: %s", first_line(exc))

    def release(self) -> None:
        self._stop.set()
        try:
            self.conn.eval(self._RELEASE, 1, self.key, self.value)
        except Exception:
            logger.warning("could not release the writer's lease on the queue; it ends within %ds", self.TTL)


class WriterHuey(QueueClient):
    """The writer's queue in the one process that drains it: lifecycle, lease, consumer."""

    metrics: MetricsServer | None = None  # served while this process is the writer (INDEXQ_METRICS_PORT)
    queries: QueryServer | None = None  # query embeddings for `indexq search`, on query.sock

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.writer: Writer | None = None
        self.storage_watch = StorageWatch("writer")
        self._lease: QueueLease | None = None
        with storage_errors(f"cannot open the queue of the data home {config.home}", config.home):
            self._lock = ProcessLock(config.writer_lock_path)
        queue_lock = config.queue_lock_path
        self._queue_lock = None if queue_lock is None else ProcessLock(queue_lock)
        # The writer's periodic requeue; index/delete/ingest are declared by QueueClient.
        self.requeue_lost = register(
            self, self.storage_watch, lambda: self.writer.withdraw_failed(wait=False) if self.writer else 0
        )

    def start_writer(self, **options: Any) -> GracefulConsumer:
        """Become the one writer of the data home and return its consumer (raises)."""
        with storage_errors(f"the writer cannot start on {self.config.home}", self.config.home):
            return self._start_writer(**options)

    def _start_writer(self, **options: Any) -> GracefulConsumer:
        if options.get("max_tasks"):
            # A recycled worker thread would run the shutdown hooks (and give the
            # queue's lease away) while the consumer goes on.
            raise ConfigError("the writer does not recycle its worker: drop --max-tasks")
        one_thread_worker(
            "writer", "workers.writer.huey", options, "its requeue of what the ledger owes (INDEXQ_REQUEUE_INTERVAL)"
        )
        self.ping()
        self._lock.acquire()
        try:
            queue_lock = self._queue_lock  # unless it is the lock just taken, by another spelling
            if queue_lock is not None and not same_file(queue_lock.path, self.config.writer_lock_path):
                with storage_errors(
                    f"the writer cannot lock its queue {self.config.queue_path}", self.config.queue_path
                ):
                    queue_lock.acquire()
            if self.config.queue_engine == "redis":
                self._lease = QueueLease(
                    self.storage.conn, self.lease_key,
                    {"host": socket.gethostname(), "home": str(self.config.home), "pid": os.getpid(),
                     "since": time.time(), "model": self.config.model},
                    on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM),
                )  # fmt: skip
                self._lease.acquire()
                # Under huey_consumer nothing calls stop_writer(): give the lease back
                # when the worker thread stops, so another machine need not wait it out.
                self.on_shutdown("indexq-release-lease")(self._release_lease)
            log_to_home(self.config, "writer.log")
            consumer = GracefulConsumer(self, **options)
            self.writer = Writer(self.config, stop=consumer.stop_flag)
            self.handlers = WriterTasks(self, self.writer, self.storage_watch)
            if self.config.remote_producers:
                self.writer.publisher = Publisher(self.config, self.intake)
                self.writer.publisher.start()
                # Where `indexq status` on a producer's machine reads the writer's settings.
                self.writer.state.sinks.append(self._publish_state)
            self.serializer.on_refused = self._alert
            # The ledger (and the intake) are the truth: drop the queued tasks and requeue
            # from them, so a restart neither loses a task that died with the last writer
            # nor carries duplicates. Only the queue and schedule: Huey's flush() would
            # also empty the key-value store, which holds the intake.
            self.storage.flush_queue()
            self.storage.flush_schedule()
            queued = self.requeue(self.writer.ledger)
            # A writer killed between failing a chunk and withdrawing its older version (best
            # effort: never stops the start).
            self.writer.withdraw_failed(wait=False)
            self.writer.state.publish()
            # Last: a metrics port that cannot be had stops the start (exit 2) with nothing left open.
            writer = self.writer
            self.metrics = serve_metrics(self.config, "writer", writer.state, writer.embedder, self.pending_count)
            # Never stops the start: without it, `indexq search` loads the model itself.
            self.queries = serve_queries(self.config.query_socket_path, writer.embedder)
            logger.info(
                "writer pid %d started on %s; %d tasks requeued from the ledger", os.getpid(), self.config.home, queued
            )
        except BaseException:
            self._release()
            raise
        return consumer

    def _publish_state(self, state: dict[str, Any]) -> None:
        # Unsigned, like the lease: only shown, and trusted only while its pid holds the lease.
        self.storage.conn.set(self.state_key, json.dumps(state))

    def _alert(self, message: str) -> None:
        """A refused queue payload: an alert in logs/alerts.log and `indexq status`."""
        if self.writer is not None:
            alerts.raise_alert(self.config, self.writer.ledger, message)

    def _release_lease(self) -> None:
        # As a shutdown hook this also runs when a worker thread dies and Huey starts
        # another: keep the lease unless the consumer is really stopping.
        if self.writer is None or self.writer.stop.is_set():
            self._drop_lease()

    def _drop_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def _release(self) -> None:
        self._drop_lease()
        if self._queue_lock is not None:
            self._queue_lock.release()
        self._lock.release()

    def create_consumer(self, **options: Any) -> GracefulConsumer:
        # Entry point of `huey_consumer workers.writer.huey`.
        try:
            return self.start_writer(**options)
        except IndexqError as exc:
            raise exit_with(exc) from None

    def stop_writer(self) -> None:
        if self.queries is not None:
            self.queries.close()
            self.queries = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.handlers = None
        self._release()


__getattr__ = lazy_huey(WriterHuey)
