"""What the writer runs for its tasks: ingest parts from remote producers, index chunks,
delete stale chunks, and requeue what was lost.

The tasks themselves are declared by name in ``pipeline.queue`` (producers enqueue
them without a writer); the writer process hands ``WriterTasks`` to its queue.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

from pipeline.backoff import StorageWatch
from pipeline.errors import storage_error
from pipeline.queue import QueueClient
from pipeline.writer import Writer

logger = logging.getLogger(__name__)


class WriterTasks:
    """The handlers of the writer's tasks.

    A data home the disk cannot write (full, read-only) is not retried through the
    queue, which is on the same disk: each step waits it out with back-off instead
    (one log line when that starts, one when it ends). Every step can run twice: ids are
    deterministic and ledger rows say what is left.
    """

    def __init__(self, queue: QueueClient, writer: Writer, watch: StorageWatch) -> None:
        self.queue, self.writer, self.watch = queue, writer, watch

    def index_chunks(self, collection: str, ids: list[str]) -> int:
        return self._persevere(lambda: self.writer.index(collection, ids))

    def delete_chunks(self, collection: str, ids: list[str]) -> int:
        return self._persevere(lambda: self.writer.delete(collection, ids))

    def ingest(self, key: str) -> int:
        return self._persevere(lambda: self._ingest(key))

    def _ingest(self, key: str) -> int:
        # Record a remote producer's part in the ledger, then index it like a local
        # submission: the same micro-batched tasks, the same requeue if they are lost.
        work = self.writer.ingest(self.queue.intake, key)
        if work is None:
            return 0
        collection, to_index, stale = work
        self.queue.enqueue_work(collection, to_index, stale)
        return len(to_index)

    def _persevere(self, step: Callable[[], int]) -> int:
        """0 if the writer stops first: the chunks stay outstanding for the next start."""
        config = self.queue.config
        doing = f"the writer cannot write the data home {config.home}"
        where = config.chroma_dir if config.chroma_engine == "persistent" else config.home
        return self.watch.retry(doing, step, self.writer.stop, where) or 0


def every(seconds: float) -> Callable[[datetime.datetime], bool]:
    """Huey's periodic test (made once a minute) for a period of ``seconds`` rounded to
    whole minutes. A crontab ``*/N`` would restart each hour: 7 minutes would give a gap of
    4 at the hour, and anything over 60 once an hour."""
    minutes = max(1, round(seconds / 60))
    return lambda moment: int(moment.timestamp() // 60) % minutes == 0


def register(queue: QueueClient, watch: StorageWatch, idle: Callable[[], object] | None = None) -> object:
    """The writer's periodic requeue, every ``requeue_interval`` (rounded to minutes);
    ``idle`` runs too when no task waits (the writer's withdrawal of failed chunks' older
    text, skipped at its start or at a task while a guard held); it must not raise."""
    config = queue.config

    @queue.periodic_task(every(config.requeue_interval))
    def requeue_lost() -> int:
        if config.remote_producers:
            # Progress published for remote producers: kept as long as backups are.
            queue.intake.prune_progress(time.time() - config.retention)
        # Only an empty queue with outstanding rows means work was lost: requeueing
        # while tasks wait would just queue the same chunks twice.
        if queue.pending_count():
            return 0
        if idle is not None:
            idle()
        try:
            return queue.requeue()
        except Exception as exc:  # a full disk: the next run (or the next start) requeues them
            error = storage_error(exc, f"the writer cannot requeue into {config.home}")
            if error is None:
                raise
            watch.failed(error)
            return 0

    return requeue_lost
