"""The writer's Huey instance: the queue producers enqueue into and the one writer drains.

``WriterHuey.create_consumer`` is where a process becomes the writer, whether it was
started by ``indexq worker`` or by ``huey_consumer workers.writer.huey``: it takes
the data home's writer lock (a second writer is refused before it touches Chroma),
loads the model, opens Chroma, and requeues every chunk the ledger still owes.

The queue is Huey's SQLite storage in the data home, or its Redis storage when
``queue_url`` names a Redis server shared by producers on many machines. Messages
are signed JSON either way (``workers.serializer``), never pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from huey import Huey
from huey.consumer import Consumer
from huey.storage import SqliteStorage

from pipeline.config import Config
from pipeline.errors import ConfigError, IndexqError, UnreachableError, WriterLockedError, storage_errors
from pipeline.intake import Intake
from pipeline.locks import WriterLock
from pipeline.metrics import MetricsServer
from pipeline.metrics import serve as serve_metrics
from pipeline.progress import Publisher
from pipeline.writer import Writer
from tasks.indexing import Tasks, register
from workers.backoff import (
    HomeHuey,
    HomeLogHandler,
    StorageAwareScheduler,
    StorageAwareWorker,
    StorageWatch,
)
from workers.serializer import JsonSerializer

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def queue_secret(config: Config) -> str:
    """The key that signs queue payloads: INDEXQ_SECRET, else the data home's key file.

    A local queue creates its key file on first use. A shared queue needs the same key
    on every machine, so it is never invented: INDEXQ_SECRET, or a copied queue.key.
    """
    if secret := os.environ.get("INDEXQ_SECRET", "").strip():
        return secret
    path = config.secret_path
    if config.remote_producers and not path.exists():
        raise ConfigError(
            f"a shared queue ({config.queue_shown}) needs the same signing key on every machine:"
            " INDEXQ_SECRET is not set and there is no queue.key in the data home",
            hint="set INDEXQ_SECRET to one long random value (e.g. `openssl rand -hex 32`) for every"
            " producer, writer and maintenance process",
        )
    if not path.exists():
        # Written whole under a private name, then published with link(): a process
        # racing us sees no key or a complete key, never an empty file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            # Also when the disk is full or the home read-only: no empty key file left behind.
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return path.read_text().strip()


class WriterConsumer(Consumer):
    """Huey's consumer with SIGTERM made graceful, like SIGINT.

    Huey treats SIGTERM as "stop now", which with thread workers ends the process in
    the middle of a commit. The writer's tasks check the stop flag between commits,
    so a graceful stop finishes the commit in hand and then stops.

    A data home the disk cannot write is a state of its own (``workers.backoff``): one
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


def _storage(config: Config) -> tuple[type, dict[str, Any]]:
    if config.queue_engine == "redis":
        from huey.storage import RedisStorage

        # blocking pop: an idle writer waits on Redis instead of polling it.
        return RedisStorage, {"url": config.queue_url, "blocking": True, "read_timeout": 1}
    config.queue_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SqliteStorage, {"filename": str(config.queue_path)}


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
                logger.warning("could not renew the writer's lease on the queue: %s", str(exc).splitlines()[0][:200])

    def release(self) -> None:
        self._stop.set()
        try:
            self.conn.eval(self._RELEASE, 1, self.key, self.value)
        except Exception:
            logger.warning("could not release the writer's lease on the queue; it ends within %ds", self.TTL)


class WriterHuey(HomeHuey):
    metrics: MetricsServer | None = None  # served while this process is the writer (INDEXQ_METRICS_PORT)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.writer: Writer | None = None
        self.storage_watch = StorageWatch("writer")
        self._lease: QueueLease | None = None
        with storage_errors(f"cannot open the queue of the data home {config.home}", config.home):
            config.ensure_home()
            self._lock = WriterLock(config.writer_lock_path)
            secret = queue_secret(config)
            storage_class, storage_kwargs = _storage(config)
            super().__init__(
                name="indexq-writer",
                results=False,
                serializer=JsonSerializer(secret, salt="indexq-writer"),
                storage_class=storage_class,
                **storage_kwargs,
            )
            if config.queue_engine == "sqlite":
                os.chmod(config.queue_path, 0o600)
        self.intake = Intake(self.storage, secret)
        self.tasks: Tasks = register(self)

    @property
    def lease_key(self) -> str:
        return f"indexq.writer.{self.storage.name}"

    def serving_writer(self) -> dict[str, Any] | None:
        """The writer that holds this shared queue's lease (host, home, pid, since, model), if any."""
        if self.config.queue_engine != "redis":
            return None
        raw = self.storage.conn.get(self.lease_key)
        return json.loads(raw) if raw else None

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        # indexq never revokes. Huey would read revocation keys from the shared
        # key-value store, where anyone who can write to Redis could plant junk that
        # makes every task fail after it was popped.
        return False

    @contextlib.contextmanager
    def reaching(self, hint: str = "start the Redis server, or check INDEXQ_QUEUE_URL") -> Iterator[None]:
        """Turn a Redis connection failure inside the block into UnreachableError (exit 5)."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise UnreachableError(
                f"cannot reach the queue at {self.config.queue_shown}: {exc}".splitlines()[0], hint=hint
            ) from exc

    def ping(self) -> None:
        """Raise UnreachableError unless the queue answers."""
        with self.reaching():
            self.storage.queue_size()

    def running_writer(self) -> Writer:
        if self.writer is None:
            raise RuntimeError("this process is not the writer: start it with `indexq worker`")
        return self.writer

    def start_writer(self, **options: Any) -> WriterConsumer:
        """Become the one writer of the data home and return its consumer (raises)."""
        with storage_errors(f"the writer cannot start on {self.config.home}", self.config.home):
            return self._start_writer(**options)

    def _start_writer(self, **options: Any) -> WriterConsumer:
        workers = options.get("workers", 1)
        worker_type = options.get("worker_type", "thread")
        if options.get("max_tasks"):
            # A recycled worker thread would run the shutdown hooks (and give the
            # queue's lease away) while the consumer goes on.
            raise ConfigError("the writer does not recycle its worker: drop --max-tasks")
        if workers != 1 or worker_type != "thread":
            raise ConfigError(
                f"the writer runs exactly one thread worker, got workers={workers} worker_type={worker_type!r}",
                hint="run: huey_consumer workers.writer.huey -w 1 -k thread",
            )
        self.ping()
        self._lock.acquire()
        try:
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
            consumer = WriterConsumer(self, **options)
            self.writer = Writer(self.config, stop=consumer.stop_flag)
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
            queued = self.requeue()
            self.writer.state.publish()
            # Last: a metrics port that cannot be had stops the start (exit 2) with nothing left open.
            writer = self.writer
            self.metrics = serve_metrics(self.config, "writer", writer.state, writer.embedder, self.pending_count)
            logger.info(
                "writer pid %d started on %s; %d tasks requeued from the ledger", os.getpid(), self.config.home, queued
            )
        except BaseException:
            self._release()
            raise
        return consumer

    @property
    def state_key(self) -> str:
        return f"{self.lease_key}.state"

    def _publish_state(self, state: dict[str, Any]) -> None:
        # Unsigned, like the lease: only shown, and trusted only while its pid holds the lease.
        self.storage.conn.set(self.state_key, json.dumps(state))

    def serving_writer_state(self) -> dict[str, Any] | None:
        """What the writer holding this shared queue's lease published about itself, if anything."""
        raw = self.storage.conn.get(self.state_key)
        return json.loads(raw) if raw else None

    def _alert(self, message: str) -> None:
        """A refused queue payload: an alert in logs/alerts.log and `indexq status`."""
        from ops import alerts

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
        self._lock.release()

    def create_consumer(self, **options: Any) -> WriterConsumer:
        # Entry point of `huey_consumer workers.writer.huey`.
        try:
            return self.start_writer(**options)
        except IndexqError as exc:
            raise exit_with(exc) from None

    def stop_writer(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self._release()

    def requeue(self) -> int:
        """Enqueue a task for every intake part not yet ingested and every outstanding ledger row."""
        from pipeline.ledger import Ledger

        count = 0
        for key in self.intake.keys():
            self.tasks.ingest(key)
            count += 1
        ledger = self.writer.ledger if self.writer else Ledger(self.config.ledger_path)
        for collection, kind, ids in ledger.outstanding(self.config.micro_batch):
            task = self.tasks.delete_chunks if kind == "delete" else self.tasks.index_chunks
            task(collection, ids)
            count += 1
        return count


def exit_with(exc: IndexqError) -> SystemExit:
    """For huey_consumer, which has no error handling of ours: one line, a hint, the exit code."""
    print(f"Error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"Hint: {exc.hint}", file=sys.stderr)
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
