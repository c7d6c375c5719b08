"""The writer's tasks: ingest parts from remote producers, index chunks, delete stale chunks, requeue what was lost."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from huey import crontab

if TYPE_CHECKING:
    from workers.queue import WriterHuey

logger = logging.getLogger(__name__)

# A task lost with a killed consumer loses nothing (its ledger rows stay outstanding);
# retries cover transient Chroma or disk errors without waiting for a requeue.
RETRIES = 3
RETRY_DELAY = 5


@dataclasses.dataclass(frozen=True)
class Tasks:
    index_chunks: Any
    delete_chunks: Any
    ingest: Any
    requeue_lost: Any


def register(huey: WriterHuey) -> Tasks:
    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def index_chunks(collection: str, ids: list[str]) -> int:
        return huey.running_writer().index(collection, ids)

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def delete_chunks(collection: str, ids: list[str]) -> int:
        return huey.running_writer().delete(collection, ids)

    @huey.task(retries=RETRIES, retry_delay=RETRY_DELAY)
    def ingest(key: str) -> int:
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
        return huey.requeue()

    return Tasks(index_chunks, delete_chunks, ingest, requeue_lost)
