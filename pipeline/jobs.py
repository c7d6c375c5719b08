"""Jobs in the ledger: one row per submission, and its progress counted from its chunks.

A job is 'submitting' while its producer writes it, 'queued' once everything is in
the ledger; its progress ('running', 'done', 'failed') is counted from the chunks it
holds, never stored. A submission whose local producer died shows as 'abandoned'.
Reached as ``Ledger.jobs``; the intake's part of a remote job is in ``pipeline.sources``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import psutil

from pipeline.ids import new_job_id
from pipeline.rows import DELETING, EMBEDDED, PENDING, Transaction, id_lists

# What `progress` counts as still to do and `running` looks for, in one place: a chunk
# still to embed or commit (reached through the job's list), and a stale row still to
# delete (reached through the job that marked it).
_TO_COMMIT = f"c.state IN ('{PENDING}', '{EMBEDDED}')"
_TO_DELETE = f"job=? AND state='{DELETING}'"

# Counting a job looks at every chunk it has: 0.1 s of CPU for 40,000 chunks on a 2-core
# machine, which a producer polling every half second would take from the writer beside
# it (18 % of a core, measured). Whoever polls waits this many times the last count's
# own duration before counting again, so that polling costs at most 5 % of one core
# however large the job, and at most POLL_CEILING seconds between looks.
POLL_COST_FACTOR = 20
POLL_CEILING = 10.0


def poll_interval(floor: float, counted_seconds: float, factor: float = POLL_COST_FACTOR) -> float:
    """Seconds until the next count of a job's progress: ``floor``, longer for a big job."""
    return max(floor, min(POLL_CEILING, counted_seconds * factor))


@dataclasses.dataclass(frozen=True)
class JobProgress:
    id: str
    collection: str
    state: str
    chunks: int
    committed: int
    pending: int
    failed: int
    created: float
    skipped_files: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _producer_gone(pid: int | None, host: str | None, created: float) -> bool:
    """The producer of a submission on this host is no longer running (killed, crashed)."""
    if not pid or host != socket.gethostname():
        return False  # a remote producer's submission: its parts are still coming, or not
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return True
    # A pid reused by a later process is not the producer.
    return started > created + 1


class Jobs:
    def __init__(self, conn: sqlite3.Connection, tx: Transaction) -> None:
        self.conn = conn
        self._tx = tx

    def create(self, collection: str, kind: str, sources: list[str]) -> str:
        job = new_job_id()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO jobs(id, collection, kind, sources, state, created, total, new, changed,"
                " unchanged, metadata_updated, stale, skipped_files, skipped, pid, host)"
                " VALUES (?, ?, ?, ?, 'submitting', ?, 0, 0, 0, 0, 0, 0, 0, '[]', ?, ?)",
                (job, collection, kind, json.dumps(sources), time.time(), os.getpid(), socket.gethostname()),
            )
        return job

    def finish(self, job: str, counts: dict[str, int], skipped: list[dict[str, str]]) -> None:
        """The submission is entirely in the ledger: the job is queued for the writer."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state='queued', total=?, new=?, changed=?, unchanged=?, metadata_updated=?,"
                " stale=?, skipped_files=?, skipped=? WHERE id=?",
                (counts["total"], counts["new"], counts["changed"], counts["unchanged"], counts["metadata_updated"],
                 counts["stale"], len(skipped), json.dumps(skipped), job),
            )  # fmt: skip

    def fail(self, job: str, reason: str) -> None:
        """The submission stopped part-way (a full disk): what was written is indexed, the job says why."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET state='failed', skipped=? WHERE id=?", (json.dumps([{"error": reason}]), job))

    def progress(self, job: str) -> JobProgress | None:
        row = self.conn.execute(
            "SELECT collection, state, created, skipped_files, pid, host FROM jobs WHERE id=?", (job,)
        ).fetchone()
        if row is None:
            return None
        collection, state, created, skipped_files, pid, host = row
        if state == "submitting" and _producer_gone(pid, host, created):
            state = "abandoned"
        chunks, committed, pending, failed = self.conn.execute(
            "SELECT count(*), coalesce(sum(c.state='committed'), 0),"
            f" coalesce(sum({_TO_COMMIT}), 0), coalesce(sum(c.state='failed'), 0)"
            " FROM job_chunks j JOIN chunks c ON c.collection=j.collection AND c.id=j.id WHERE j.job=?",
            (job,),
        ).fetchone()
        (deleting,) = self.conn.execute(f"SELECT count(*) FROM chunks WHERE {_TO_DELETE}", (job,)).fetchone()
        pending += deleting
        if state == "queued":
            state = "running" if pending else ("failed" if failed else "done")
        return JobProgress(job, collection, state, chunks, committed, pending, failed, created, skipped_files)

    def failure_reasons(self, job: str, limit: int = 3) -> list[tuple[str, int]]:
        """(reason, chunks) of the job's failed chunks, the most frequent first."""
        return [
            (reason or "no reason recorded", n)
            for reason, n in self.conn.execute(
                "SELECT c.error, count(*) FROM job_chunks j JOIN chunks c ON c.collection=j.collection AND c.id=j.id"
                " WHERE j.job=? AND c.state='failed' GROUP BY c.error ORDER BY count(*) DESC, c.error LIMIT ?",
                (job, limit),
            )
        ]

    def running(self, job: str) -> bool:
        """Whether the job is still being submitted, or queued with a chunk still to commit or
        delete. Cheap while it runs, unlike ``progress``: one outstanding chunk is found among
        the first few of the job's (ids are hashes, so commits fall all over its index)
        instead of every chunk counted."""
        row = self.conn.execute("SELECT state, created, pid, host FROM jobs WHERE id=?", (job,)).fetchone()
        if row is None:
            return False
        state, created, pid, host = row
        if state == "submitting":
            return not _producer_gone(pid, host, created)
        if state != "queued":
            return False
        (outstanding,) = self.conn.execute(
            "SELECT EXISTS(SELECT 1 FROM job_chunks j JOIN chunks c ON c.collection=j.collection AND c.id=j.id"
            f" WHERE j.job=? AND {_TO_COMMIT}) OR EXISTS(SELECT 1 FROM chunks WHERE {_TO_DELETE})",
            (job, job),
        ).fetchone()
        return bool(outstanding)

    def recent(self, limit: int = 20) -> list[str]:
        """Ids of the ``limit`` newest jobs, newest first."""
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs ORDER BY created DESC LIMIT ?", (limit,))]

    def of_chunks(self, collection: str, ids: Sequence[str]) -> set[str]:
        """Jobs whose progress these chunks change: the job that last wrote each row (stale
        rows included) and every unfinished job the chunks belong to (an unchanged chunk
        still outstanding belongs to the resubmission too)."""
        jobs: set[str] = set()
        for part, marks in id_lists(ids):
            jobs.update(
                r[0] for r in self.conn.execute(
                    f"SELECT DISTINCT job FROM chunks WHERE collection=? AND id IN ({marks})"
                    f" UNION SELECT DISTINCT l.job FROM job_chunks l JOIN jobs ON jobs.id = l.job"
                    f" WHERE l.collection=? AND l.id IN ({marks}) AND jobs.finished IS NULL",
                    (collection, *part, collection, *part),
                ) if r[0]
            )  # fmt: skip
        return jobs

    def unfinished(self) -> list[str]:
        """Jobs not yet published as finished (``pipeline.progress``)."""
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE finished IS NULL")]

    def mark_finished(self, job: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET finished=? WHERE id=? AND finished IS NULL", (time.time(), job))
