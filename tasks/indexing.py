"""The writer's tasks: ingest parts from remote producers, index chunks, delete stale chunks, requeue what was lost."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from huey import crontab

from pipeline.errors import storage_error

if TYPE_CHECKING:
    from workers.queue import WriterHuey

logger = logging.getLogger(__name__)

# A task lost with a killed consumer loses nothing (its ledger rows stay outstanding);
# retries cover transient Chroma errors without waiting for a requeue. A data home the
# disk cannot write (full, read-only) is not retried through the queue, which is on the
# same disk: the task waits it out with back-off (``_persevere``).
RETRIES = 3
RETRY_DELAY = 5


@dataclasses.dataclass(frozen=True)
class Tasks:
    index_chunks: Any
    delete_chunks: Any
    ingest: Any
    requeue_lost: Any


def _persevere(huey: WriterHuey, step: Callable[[], int]) -> int:
    """Run a writer step; while the data home cannot be written, wait with back-off and
    run it again (one log line when that starts, one when it ends). Every step can run
    twice: ids are deterministic and rows say what is left. 0 if the writer stops first:
    the chunks stay outstanding in the ledger for the next start."""
    writer = huey.running_writer()
    config = huey.config
    doing = f"the writer cannot write the data home {config.home}"
    where = config.chroma_dir if config.chroma_engine == "persistent" else config.home
    return huey.storage_watch.retry(doing, step, writer.stop, where) or 0


def register(huey: WriterHuey) -> Tasks:
    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def index_chunks(collection: str, ids: list[str]) -> int:
        return _persevere(huey, lambda: huey.running_writer().index(collection, ids))

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def delete_chunks(collection: str, ids: list[str]) -> int:
        return _persevere(huey, lambda: huey.running_writer().delete(collection, ids))

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def ingest(key: str) -> int:
        return _persevere(huey, lambda: _ingest(key))

    def _ingest(key: str) -> int:
        # Record a remote producer's part in the ledger, then index it like a local
        # submission: the same micro-batched tasks, the same requeue if they are lost.
        work = huey.running_writer().ingest(huey.intake, key)
        if work is None:
            return 0
        collection, to_index, stale = work
        step = huey.config.micro_batch
        for start in range(0, len(to_index), step):
            index_chunks(collection, to_index[start : start + step])
        for start in range(0, len(stale), step):
            delete_chunks(collection, stale[start : start + step])
        return len(to_index)

    @huey.periodic_task(crontab(minute="*/5"))
    def requeue_lost() -> int:
        if huey.config.remote_producers:
            # Progress published for remote producers: kept as long as backups are.
            huey.intake.prune_progress(time.time() - huey.config.retention)
        # Only an empty queue with outstanding rows means work was lost: requeueing
        # while tasks wait would just queue the same chunks twice.
        if huey.pending_count():
            return 0
        try:
            return huey.requeue()
        except Exception as exc:  # a full disk: the next run (or the next start) requeues them
            error = storage_error(exc, f"the writer cannot requeue into {huey.config.home}", huey.config.home)
            if error is None:
                raise
            huey.storage_watch.failed(error)
            return 0

    return Tasks(index_chunks, delete_chunks, ingest, requeue_lost)
