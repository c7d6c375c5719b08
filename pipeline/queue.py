"""The writer's queue as producers, the API and maintenance see it: enqueue, look, requeue.

``QueueClient`` needs no writer: it opens the queue (Huey's SQLite storage in the data
home, or its Redis storage when ``queue_url`` names a server shared by producers on
many machines), signs messages as JSON (``pipeline.serializer``, never pickle) and
declares the writer's tasks by name. Only the writer process (``workers.writer``)
gives them their handlers; anywhere else calling a task just enqueues it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from huey import Huey
from huey.storage import SqliteStorage

from pipeline.batches import batched
from pipeline.config import Config
from pipeline.errors import ConfigError, StorageError, UnreachableError, first_line, storage_error, storage_errors
from pipeline.intake import Intake
from pipeline.ledger import Ledger
from pipeline.serializer import JsonSerializer

# A task lost with a killed consumer loses nothing (its ledger rows stay outstanding);
# retries cover transient Chroma errors without waiting for a requeue.
RETRIES = 3
RETRY_DELAY = 5


class Handlers(Protocol):
    """What the writer does for each task (``tasks.indexing.WriterTasks``)."""

    def index_chunks(self, collection: str, ids: list[str]) -> int: ...

    def delete_chunks(self, collection: str, ids: list[str]) -> int: ...

    def ingest(self, key: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Tasks:
    """The writer's tasks; calling one enqueues it."""

    index_chunks: Any
    delete_chunks: Any
    ingest: Any


def declare(huey: Huey, handlers: Callable[[], Handlers]) -> Tasks:
    """The writer's tasks under stable names; ``handlers()`` is asked only when one runs."""

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def index_chunks(collection: str, ids: list[str]) -> int:
        return handlers().index_chunks(collection, ids)

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def delete_chunks(collection: str, ids: list[str]) -> int:
        return handlers().delete_chunks(collection, ids)

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def ingest(key: str) -> int:
        return handlers().ingest(key)

    return Tasks(index_chunks, delete_chunks, ingest)


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


# Seconds to connect to Redis, and to wait for one answer: redis-py waits forever by
# default, so a server that took the connection and never answered (stopped, or a
# rediss:// URL on a plain port) hung every command instead of exit 5. The writer's
# blocking pop waits 1 s at a time, well inside the bound.
REDIS_CONNECT_TIMEOUT = 10.0
REDIS_SOCKET_TIMEOUT = 30.0


def _storage(config: Config) -> tuple[type, dict[str, Any]]:
    if config.queue_engine == "redis":
        from huey.storage import RedisStorage
        from redis import ConnectionPool

        assert config.queue_url is not None
        pool = ConnectionPool.from_url(
            config.queue_url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT, socket_timeout=REDIS_SOCKET_TIMEOUT
        )
        # blocking pop: an idle writer waits on Redis instead of polling it.
        return RedisStorage, {"connection_pool": pool, "blocking": True, "read_timeout": 1}
    config.queue_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return SqliteStorage, {"filename": str(config.queue_path)}


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


class HomeHuey(Huey):
    """A Huey whose queue lives in (or beside) the data home: a queue operation the disk
    refuses raises StorageError, with the SQLite connection reset."""

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


class QueueClient(HomeHuey):
    """The writer's queue, for anyone who enqueues into it or looks at it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.handlers: Handlers | None = None  # set only in the writer process
        with storage_errors(f"cannot open the queue of the data home {config.home}", config.home):
            config.ensure_home()
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
        self.tasks = declare(self, self._handlers)

    def _handlers(self) -> Handlers:
        if self.handlers is None:
            raise RuntimeError("this process is not the writer: start it with `indexq worker`")
        return self.handlers

    @property
    def lease_key(self) -> str:
        return f"indexq.writer.{self.storage.name}"

    @property
    def state_key(self) -> str:
        return f"{self.lease_key}.state"

    def serving_writer(self) -> dict[str, Any] | None:
        """The writer that holds this shared queue's lease (host, home, pid, since, model), if any."""
        if self.config.queue_engine != "redis":
            return None
        raw = self.storage.conn.get(self.lease_key)
        return json.loads(raw) if raw else None

    def serving_writer_state(self) -> dict[str, Any] | None:
        """What the writer holding this shared queue's lease published about itself, if anything."""
        raw = self.storage.conn.get(self.state_key)
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
                f"cannot reach the queue at {self.config.queue_shown}: {first_line(exc)}", hint=hint
            ) from exc

    def ping(self) -> None:
        """Raise UnreachableError unless the queue answers."""
        with self.reaching():
            self.storage.queue_size()

    def enqueue_work(self, collection: str, to_index: Sequence[str], stale: Sequence[str]) -> int:
        """Index and delete tasks of ``task_chunks`` ids each; returns how many."""
        step = self.config.task_chunks
        count = 0
        for ids, task in ((to_index, self.tasks.index_chunks), (stale, self.tasks.delete_chunks)):
            for part in batched(ids, step):
                task(collection, list(part))
                count += 1
        return count

    def requeue(self, ledger: Ledger | None = None) -> int:
        """Enqueue a task for every intake part not yet ingested and every outstanding ledger row."""
        count = 0
        for key in self.intake.keys():
            self.tasks.ingest(key)
            count += 1
        own = ledger is None
        ledger = ledger or Ledger(self.config.ledger_path)
        try:
            for collection, kind, ids in ledger.outstanding(self.config.task_chunks):
                task = self.tasks.delete_chunks if kind == "delete" else self.tasks.index_chunks
                task(collection, ids)
                count += 1
        finally:
            if own:
                ledger.close()
        return count
