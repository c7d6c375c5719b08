"""The ledger: one SQLite row per chunk, the source of truth of every collection.

Producers write pending rows *before* they enqueue work; the writer stores each
embedding as soon as it is computed and marks rows committed *after* Chroma accepted
them. WAL with ``synchronous=FULL``: a row the ledger reported written survives power
loss. Transactions are short and ``BEGIN IMMEDIATE`` so that a producer and the writer
wait for each other instead of failing on a lock upgrade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import sqlite_utils

from pipeline.corpus import gone
from pipeline.ids import new_job_id

PENDING = "pending"  # needs an embedding
EMBEDDED = "embedded"  # embedding stored, not yet in Chroma
COMMITTED = "committed"  # in Chroma
DELETING = "deleting"  # stale: to be removed from Chroma, then from the ledger
FAILED = "failed"  # refused by validation; the reason is in `error`
OUTSTANDING = (PENDING, EMBEDDED, DELETING)

# Tables are created "if not exists": a bump adds what a newer version needs.
SCHEMA_VERSION = 5

# SQLite allows 32766 host parameters; stay far below for IN (...) lists.
_IN_CHUNK = 500


@dataclasses.dataclass
class Row:
    collection: str
    id: str
    text: str
    metadata: dict[str, Any]
    hash: str
    state: str
    embedding: bytes | None


@dataclasses.dataclass
class SourcePlan:
    """What a submitted source changes: rows to write, ids to index, stale ids, and counts."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    linked: list[str] = dataclasses.field(default_factory=list)
    to_index: list[str] = dataclasses.field(default_factory=list)
    stale: list[str] = dataclasses.field(default_factory=list)
    # (id, metadata JSON): text unchanged, metadata not; no new embedding needed.
    retag: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # (id, owning source): ids another source holds; never written over.
    collisions: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    metadata_updated: int = 0


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


def _event(row: tuple[Any, ...]) -> dict[str, Any]:
    when, kind, ok, summary, detail = row
    return {"time": when, "kind": kind, "ok": bool(ok), "summary": summary, "detail": json.loads(detail or "{}")}


def _tally(conn: sqlite3.Connection, kind: str, collection: str, n: int) -> None:
    """Add ``n`` to a per-collection counter in ``meta`` (``committed:docs``), in the caller's
    transaction: never decreasing, so Prometheus can read it as a counter (pipeline.metrics)."""
    if n:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
            (f"{kind}:{collection}", n),
        )


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        conn = sqlite3.connect(str(path), timeout=120, isolation_level=None, check_same_thread=False)
        if new:
            path.chmod(0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=120000")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        # The writer's worker thread and status probes may share one Ledger.
        self._lock = threading.RLock()
        self._create()

    def _create(self) -> None:
        # Status probes and pollers open the ledger often: skip the write transaction
        # (and its fsync) when the schema is already current.
        if self.conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        with self._tx():
            self.db.table("jobs").create(
                {
                    "id": str, "collection": str, "kind": str, "sources": str, "state": str,
                    "created": float, "finished": float, "total": int, "new": int, "changed": int,
                    "unchanged": int, "stale": int, "skipped_files": int, "skipped": str,
                },
                pk="id", if_not_exists=True,
            )  # fmt: skip
            self.db.table("chunks").create(
                {
                    "collection": str, "id": str, "source": str, "ordinal": int, "text": str,
                    "metadata": str, "hash": str, "state": str, "embedding": bytes, "model": str,
                    "embeds": int, "seq": int, "committed_at": float, "updated": float,
                    "error": str, "job": str,
                },
                pk=("collection", "id"), if_not_exists=True,
            )  # fmt: skip
            self.db.table("job_chunks").create(
                {"job": str, "collection": str, "id": str}, pk=("job", "collection", "id"), if_not_exists=True
            )
            self.db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
            # What maintenance did (backups, checks, recoveries, alerts), for status.
            self.db.table("events").create(
                {"id": int, "time": float, "kind": str, "ok": int, "summary": str, "detail": str},
                pk="id", if_not_exists=True,
            )  # fmt: skip
            self.db.table("events").create_index(["kind", "time"], if_not_exists=True)
            chunks = self.db.table("chunks")
            chunks.create_index(["collection", "source", "ordinal"], if_not_exists=True)
            chunks.create_index(["collection", "hash"], if_not_exists=True)
            chunks.create_index(["state"], if_not_exists=True)
            chunks.create_index(["committed_at"], if_not_exists=True)
            chunks.create_index(["job", "state"], if_not_exists=True)
            self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('seq', '0'), ('embeddings', '0')")
            # Version 3: parts received from remote producers (the intake), so that
            # ingesting a part twice changes nothing; jobs count their parts.
            self.db.table("received").create({"key": str, "job": str, "time": float}, pk="key", if_not_exists=True)
            # Version 4: which jobs a chunk belongs to (progress published per task).
            self.db.table("job_chunks").create_index(["collection", "id"], if_not_exists=True)
            jobs = self.db.table("jobs")
            # Version 5: metadata-only updates; the producer's pid and host, so that a
            # submission whose producer died shows as abandoned.
            # A remote job's --prune (roots and filters) waits here until every part is in.
            for column, kind in (("parts", int), ("received", int), ("metadata_updated", int), ("pid", int),
                                 ("host", str), ("pruned", int), ("prune", str)):  # fmt: skip
                if column not in jobs.columns_dict:
                    jobs.add_column(column, kind)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                # Inside the try: a COMMIT refused (disk full) must not leave the
                # transaction open, or every later BEGIN fails for another reason.
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.conn.close()

    # ---- producers -------------------------------------------------------------

    def create_job(self, collection: str, kind: str, sources: list[str]) -> str:
        job = new_job_id()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO jobs(id, collection, kind, sources, state, created, total, new, changed,"
                " unchanged, metadata_updated, stale, skipped_files, skipped, pid, host)"
                " VALUES (?, ?, ?, ?, 'submitting', ?, 0, 0, 0, 0, 0, 0, 0, '[]', ?, ?)",
                (job, collection, kind, json.dumps(sources), time.time(), os.getpid(), socket.gethostname()),
            )
        return job

    def finish_submission(self, job: str, counts: dict[str, int], skipped: list[dict[str, str]]) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET state='queued', total=?, new=?, changed=?, unchanged=?, metadata_updated=?,"
                " stale=?, skipped_files=?, skipped=? WHERE id=?",
                (counts["total"], counts["new"], counts["changed"], counts["unchanged"], counts["metadata_updated"],
                 counts["stale"], len(skipped), json.dumps(skipped), job),
            )  # fmt: skip

    def fail_submission(self, job: str, reason: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET state='failed', skipped=? WHERE id=?", (json.dumps([{"error": reason}]), job))

    def by_source(self, collection: str, source: str) -> dict[int, tuple[str, str, str, str]]:
        """ordinal -> (id, hash, state, metadata JSON) of the rows a source has now."""
        rows = self.conn.execute(
            "SELECT ordinal, id, hash, state, metadata FROM chunks WHERE collection=? AND source=?",
            (collection, source),
        )
        return {ordinal: (id_, hash_, state, meta) for ordinal, id_, hash_, state, meta in rows}

    def owners(self, collection: str, ids: Sequence[str]) -> dict[str, str]:
        """id -> source for those of ``ids`` the ledger holds (stale rows on their way out aside)."""
        found: dict[str, str] = {}
        for part in _batched(ids, _IN_CHUNK):
            marks = ",".join("?" * len(part))
            found.update(
                self.conn.execute(
                    f"SELECT id, source FROM chunks WHERE collection=? AND id IN ({marks}) AND state != 'deleting'",
                    (collection, *part),
                )
            )
        return found

    def sources_under(self, collection: str, roots: Sequence[str]) -> list[str]:
        """Sources of a collection that are one of ``roots`` or lie under one (real paths)."""
        found: set[str] = set()
        for root in roots:
            prefix = root.rstrip("/") + "/"
            found.update(
                r[0] for r in self.conn.execute(
                    "SELECT DISTINCT source FROM chunks WHERE collection=? AND state != 'deleting'"
                    " AND (source=? OR substr(source, 1, ?)=?)",
                    (collection, root, len(prefix), prefix),
                )
            )  # fmt: skip
        return sorted(found)

    def by_ids(self, collection: str, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """id -> (hash, state) for those of ``ids`` the ledger has."""
        found: dict[str, tuple[str, str]] = {}
        for part in _batched(ids, _IN_CHUNK):
            marks = ",".join("?" * len(part))
            for id_, hash_, state in self.conn.execute(
                f"SELECT id, hash, state FROM chunks WHERE collection=? AND id IN ({marks})", (collection, *part)
            ):
                found[id_] = (hash_, state)
        return found

    def reusable_embedding(self, collection: str, hash_: str, model: str) -> bytes | None:
        """An embedding already computed for the same text with the same model."""
        row = self.conn.execute(
            "SELECT embedding FROM chunks WHERE collection=? AND hash=? AND model=? AND embedding IS NOT NULL LIMIT 1",
            (collection, hash_, model),
        ).fetchone()
        return row[0] if row else None

    def plan_source(self, collection: str, source: str, chunks: Sequence[dict[str, Any]], model: str) -> SourcePlan:
        """Compare a source's chunks (id, ordinal, text, metadata, hash) with what the ledger has.

        Unchanged chunks are not written again (but indexed if still outstanding); a
        chunk whose text is unchanged but whose metadata is not (lines moved above it)
        gets its metadata updated with its stored embedding; changed ones are reset;
        chunks past the source's end become stale. Text already embedded with the same
        model anywhere in the collection reuses that embedding. An id another source
        holds is never written over: it is listed in ``collisions``.
        """
        plan = SourcePlan()
        existing = self.by_source(collection, source)
        owners: dict[str, str] = {}
        if source.startswith("id:"):  # file ids are hashes of their own source: they cannot collide
            owners = self.owners(collection, [c["id"] for c in chunks])
        for chunk in chunks:
            id_ = chunk["id"]
            owner = owners.get(id_)
            if owner is not None and owner != source:
                plan.collisions.append((id_, owner))
                continue
            plan.linked.append(id_)
            metadata = chunk["metadata"]
            metadata = metadata if isinstance(metadata, str) else json.dumps(metadata, sort_keys=True)
            old = existing.get(chunk["ordinal"])
            if old and old[0] == id_ and old[1] == chunk["hash"] and old[2] != DELETING:
                if old[3] != metadata:
                    plan.metadata_updated += 1
                    plan.retag.append((id_, metadata))
                    plan.to_index.append(id_)
                    continue
                plan.unchanged += 1
                if old[2] in (PENDING, EMBEDDED):
                    plan.to_index.append(id_)
                continue
            if old and old[2] != DELETING:
                plan.changed += 1
            else:
                plan.new += 1
            reused = self.reusable_embedding(collection, chunk["hash"], model)
            plan.rows.append({
                "id": id_, "source": source, "ordinal": chunk["ordinal"], "text": chunk["text"],
                "metadata": metadata, "hash": chunk["hash"], "state": EMBEDDED if reused else PENDING,
                "embedding": reused, "model": model if reused else None,
            })  # fmt: skip
            plan.to_index.append(id_)
        plan.stale = [
            old[0]
            for ordinal, old in existing.items()
            if ordinal >= len(chunks) and old[2] in (COMMITTED, PENDING, EMBEDDED, FAILED)
        ]
        return plan

    def write_submission(
        self, job: str, collection: str, rows: list[dict[str, Any]], linked: list[str], stale: list[str],
        retag: Sequence[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        """One transaction: new or changed rows, metadata updates, the job's membership, stale rows."""
        with self._tx() as conn:
            self._write(conn, job, collection, rows, linked, stale, retag)

    def ingest(self, key: str, part: dict[str, Any], model: str) -> tuple[list[str], list[str]] | None:
        """Record an intake part from a remote producer: (ids to index, stale ids), or None if already received.

        One transaction holds the rows and the part's key, so a part ingested again
        (its task replayed after a kill) changes nothing.
        """
        collection, job = part["collection"], part["job"]
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM received WHERE key=?", (key,)).fetchone():
                return None
            conn.execute(
                "INSERT OR IGNORE INTO jobs(id, collection, kind, sources, state, created, total, new, changed,"
                " unchanged, stale, skipped_files, skipped, received)"
                " VALUES (?, ?, ?, ?, 'submitting', ?, 0, 0, 0, 0, 0, 0, '[]', 0)",
                (job, collection, part["kind"], json.dumps(part.get("sources", [])), part.get("created", time.time())),
            )
            to_index: list[str] = []
            stale: list[str] = []
            counts = {"total": 0, "new": 0, "changed": 0, "unchanged": 0, "metadata_updated": 0, "stale": 0}
            refused: list[dict[str, str]] = []
            for entry in part["files"]:
                plan = self.plan_source(collection, entry["source"], entry["chunks"], model)
                self._write(conn, job, collection, plan.rows, plan.linked, plan.stale, plan.retag)
                to_index.extend(plan.to_index)
                stale.extend(plan.stale)
                counts["total"] += len(plan.linked)
                counts["stale"] += len(plan.stale)
                for name in ("new", "changed", "unchanged", "metadata_updated"):
                    counts[name] += getattr(plan, name)
                # A remote producer cannot see this ledger: an id another source holds is
                # refused here, kept visible in the job's skipped list, never written over.
                refused.extend(
                    {"source": entry["source"], "reason": f"id {id_!r} is already held by {owner}"}
                    for id_, owner in plan.collisions
                )
            conn.execute(
                "UPDATE jobs SET total=total+:total, new=new+:new, changed=changed+:changed,"
                " unchanged=unchanged+:unchanged, metadata_updated=coalesce(metadata_updated, 0)+:metadata_updated,"
                " stale=stale+:stale, received=coalesce(received, 0)+1 WHERE id=:job",
                {**counts, "job": job},
            )
            if refused:
                (old,) = conn.execute("SELECT skipped FROM jobs WHERE id=?", (job,)).fetchone()
                merged = json.loads(old or "[]") + refused
                conn.execute(
                    "UPDATE jobs SET skipped=?, skipped_files=? WHERE id=?", (json.dumps(merged), len(merged), job)
                )
            if part["final"]:
                (old,) = conn.execute("SELECT skipped FROM jobs WHERE id=?", (job,)).fetchone()
                # Ids refused from earlier parts (and this one) are already there.
                skipped = json.loads(old or "[]") + part.get("skipped", [])
                conn.execute(
                    "UPDATE jobs SET parts=?, skipped_files=?, skipped=?, prune=? WHERE id=?",
                    (part["parts"], len(skipped), json.dumps(skipped), json.dumps(part.get("prune")), job),
                )
            complete = conn.execute(
                "UPDATE jobs SET state='queued' WHERE id=? AND state='submitting' AND parts IS NOT NULL"
                " AND received >= parts RETURNING prune, skipped",
                (job,),
            ).fetchone()
            if complete and complete[0] and json.loads(complete[0]):
                stale.extend(self._prune(conn, job, collection, json.loads(complete[0]), json.loads(complete[1])))
            conn.execute("INSERT INTO received(key, job, time) VALUES (?, ?, ?)", (key, job, time.time()))
        return to_index, stale

    def _prune(
        self, conn: sqlite3.Connection, job: str, collection: str, spec: dict[str, Any], skipped: list[dict[str, str]]
    ) -> list[str]:
        """A remote job's --prune, once all its parts are in: sources under its roots that it
        did not send (nor skip), and that its filters would have taken, become stale."""
        sent = {
            r[0] for r in conn.execute(
                "SELECT DISTINCT c.source FROM job_chunks j JOIN chunks c ON c.collection=j.collection AND c.id=j.id"
                " WHERE j.job=?", (job,),
            )
        } | {s.get("source") for s in skipped}  # fmt: skip
        sources = gone(self.sources_under(collection, spec["roots"]), sent.__contains__,
                       map(Path, spec["roots"]), spec.get("include", ()), spec.get("exclude", ()))  # fmt: skip
        ids = [
            r[0] for source in sources for r in conn.execute(
                "SELECT id FROM chunks WHERE collection=? AND source=? AND state IN (?, ?, ?, ?)",
                (collection, source, COMMITTED, PENDING, EMBEDDED, FAILED),
            )
        ]  # fmt: skip
        self._write(conn, job, collection, [], [], ids)
        conn.execute("UPDATE jobs SET pruned=?, stale=stale+? WHERE id=?", (len(sources), len(ids), job))
        return ids

    def _write(
        self, conn: sqlite3.Connection, job: str, collection: str,
        rows: list[dict[str, Any]], linked: list[str], stale: list[str], retag: Sequence[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        now = time.time()
        # Metadata only: a committed row goes back to 'embedded' with its stored
        # embedding, so the writer upserts the new metadata without embedding again.
        conn.executemany(
            "UPDATE chunks SET metadata=?, job=?, updated=?, error=NULL, state=CASE"
            " WHEN state IN ('committed', 'failed')"
            " THEN (CASE WHEN embedding IS NULL THEN 'pending' ELSE 'embedded' END)"
            " ELSE state END WHERE collection=? AND id=?",
            [(meta, job, now, collection, id_) for id_, meta in retag],
        )
        conn.executemany(
            "INSERT INTO chunks(collection, id, source, ordinal, text, metadata, hash, state, embedding,"
            " model, embeds, updated, job) VALUES (:collection, :id, :source, :ordinal, :text, :metadata,"
            " :hash, :state, :embedding, :model, 0, :updated, :job)"
            " ON CONFLICT(collection, id) DO UPDATE SET source=excluded.source, ordinal=excluded.ordinal,"
            " text=excluded.text, metadata=excluded.metadata, hash=excluded.hash, state=excluded.state,"
            " embedding=excluded.embedding, model=excluded.model, embeds=0, error=NULL,"
            " updated=excluded.updated, job=excluded.job",
            [{**row, "collection": collection, "updated": now, "job": job} for row in rows],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO job_chunks(job, collection, id) VALUES (?, ?, ?)",
            [(job, collection, id_) for id_ in linked],
        )
        conn.executemany(
            "UPDATE chunks SET state='deleting', job=?, updated=? WHERE collection=? AND id=?",
            [(job, now, collection, id_) for id_ in stale],
        )

    # ---- the writer ------------------------------------------------------------

    def load(self, collection: str, ids: Sequence[str], states: Iterable[str]) -> list[Row]:
        wanted = tuple(states)
        rows: list[Row] = []
        for part in _batched(ids, _IN_CHUNK):
            marks = ",".join("?" * len(part))
            smarks = ",".join("?" * len(wanted))
            cursor = self.conn.execute(
                f"SELECT collection, id, text, metadata, hash, state, embedding FROM chunks"
                f" WHERE collection=? AND id IN ({marks}) AND state IN ({smarks})",
                (collection, *part, *wanted),
            )
            rows.extend(Row(c, i, t, json.loads(m or "{}"), h, s, e) for c, i, t, m, h, s, e in cursor)
        order = {id_: n for n, id_ in enumerate(ids)}
        rows.sort(key=lambda r: order.get(r.id, 0))
        return rows

    def begin_embedding(self, collection: str, ids: Sequence[str]) -> None:
        """Count an embedding attempt before it starts, so a kill mid-way still shows."""
        with self._tx() as conn:
            conn.executemany(
                "UPDATE chunks SET embeds=embeds+1 WHERE collection=? AND id=?", [(collection, i) for i in ids]
            )
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key='embeddings'", (len(ids),))
            _tally(conn, "embedded", collection, len(ids))

    def store_embeddings(self, collection: str, items: Sequence[tuple[str, str, bytes]], model: str) -> None:
        """(id, hash, embedding): stored only if the text was not replaced meanwhile."""
        now = time.time()
        with self._tx() as conn:
            conn.executemany(
                "UPDATE chunks SET embedding=?, model=?, state='embedded', updated=?"
                " WHERE collection=? AND id=? AND hash=? AND state='pending'",
                [(blob, model, now, collection, id_, hash_) for id_, hash_, blob in items],
            )

    def checkpoint(self, collection: str, items: Sequence[tuple[str, str]]) -> int:
        """Mark (id, hash) committed under one new commit sequence number."""
        now = time.time()
        with self._tx() as conn:
            (seq,) = conn.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='seq' RETURNING CAST(value AS INTEGER)"
            ).fetchone()
            done = conn.executemany(
                "UPDATE chunks SET state='committed', seq=?, committed_at=?, updated=?"
                " WHERE collection=? AND id=? AND hash=? AND state='embedded'",
                [(seq, now, now, collection, id_, hash_) for id_, hash_ in items],
            ).rowcount
            _tally(conn, "committed", collection, done)
        return int(seq)

    def fail(self, collection: str, items: Sequence[tuple[str, str]]) -> None:
        """(id, reason): rows the writer refused; kept, visible, never silently dropped."""
        with self._tx() as conn:
            done = conn.executemany(
                "UPDATE chunks SET state='failed', error=?, updated=? WHERE collection=? AND id=?",
                [(reason, time.time(), collection, id_) for id_, reason in items],
            ).rowcount
            _tally(conn, "failed", collection, done)

    def forget(self, collection: str, ids: Sequence[str]) -> None:
        """Drop stale rows once Chroma no longer has them (unless re-submitted meanwhile)."""
        with self._tx() as conn:
            conn.executemany(
                "DELETE FROM chunks WHERE collection=? AND id=? AND state='deleting'", [(collection, i) for i in ids]
            )

    def outstanding(self, batch: int) -> Iterator[tuple[str, str, list[str]]]:
        """(collection, state, ids) in batches: every row that still needs the writer."""
        cursor = self.conn.execute(
            "SELECT collection, state, id FROM chunks WHERE state IN (?, ?, ?) ORDER BY collection, state, rowid",
            OUTSTANDING,
        )
        key: tuple[str, str] | None = None
        ids: list[str] = []
        for collection, state, id_ in cursor.fetchall():
            kind = "delete" if state == DELETING else "index"
            if (collection, kind) != key or len(ids) >= batch:
                if key and ids:
                    yield key[0], key[1], ids
                key, ids = (collection, kind), []
            ids.append(id_)
        if key and ids:
            yield key[0], key[1], ids

    # ---- status ------------------------------------------------------------------

    def outstanding_of(self, part: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(ids to index, stale ids) of an intake part already recorded that still need the writer."""
        collection = part["collection"]
        ids = [c["id"] for entry in part["files"] for c in entry["chunks"]]
        to_index = [id_ for id_, (_, state) in self.by_ids(collection, ids).items() if state in (PENDING, EMBEDDED)]
        stale: list[str] = []
        for entry in part["files"]:
            stale.extend(
                r[0] for r in self.conn.execute(
                    "SELECT id FROM chunks WHERE collection=? AND source=? AND job=? AND state=?",
                    (collection, entry["source"], part["job"], DELETING),
                )
            )  # fmt: skip
        return to_index, stale

    def jobs_of(self, collection: str, ids: Sequence[str]) -> set[str]:
        """Jobs whose progress these chunks change: the job that last wrote each row (stale
        rows included) and every unfinished job the chunks belong to (an unchanged chunk
        still outstanding belongs to the resubmission too)."""
        jobs: set[str] = set()
        for part in _batched(ids, _IN_CHUNK):
            marks = ",".join("?" * len(part))
            jobs.update(
                r[0] for r in self.conn.execute(
                    f"SELECT DISTINCT job FROM chunks WHERE collection=? AND id IN ({marks})"
                    f" UNION SELECT DISTINCT l.job FROM job_chunks l JOIN jobs ON jobs.id = l.job"
                    f" WHERE l.collection=? AND l.id IN ({marks}) AND jobs.finished IS NULL",
                    (collection, *part, collection, *part),
                ) if r[0]
            )  # fmt: skip
        return jobs

    def unfinished_jobs(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE finished IS NULL")]

    def mark_finished(self, job: str) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET finished=? WHERE id=? AND finished IS NULL", (time.time(), job))

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
            " coalesce(sum(c.state IN ('pending', 'embedded')), 0), coalesce(sum(c.state='failed'), 0)"
            " FROM job_chunks j JOIN chunks c ON c.collection=j.collection AND c.id=j.id WHERE j.job=?",
            (job,),
        ).fetchone()
        (deleting,) = self.conn.execute(
            "SELECT count(*) FROM chunks WHERE job=? AND state='deleting'", (job,)
        ).fetchone()
        pending += deleting
        if state == "queued":
            state = "running" if pending else ("failed" if failed else "done")
        return JobProgress(job, collection, state, chunks, committed, pending, failed, created, skipped_files)

    def job_ids(self, limit: int = 20) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs ORDER BY created DESC LIMIT ?", (limit,))]

    def skipped(self, job: str) -> list[dict[str, str]]:
        row = self.conn.execute("SELECT skipped FROM jobs WHERE id=?", (job,)).fetchone()
        return json.loads(row[0]) if row else []

    def commit_stats(self, window: float = 60.0) -> dict[str, Any]:
        now = time.time()
        (last,) = self.conn.execute("SELECT max(committed_at) FROM chunks").fetchone()
        (recent,) = self.conn.execute("SELECT count(*) FROM chunks WHERE committed_at >= ?", (now - window,)).fetchone()
        return {"last_commit": last, "recent_rate": recent / window}

    def counts(self) -> dict[str, int]:
        return {state: n for state, n in self.conn.execute("SELECT state, count(*) FROM chunks GROUP BY state")}

    def embeddings_total(self) -> int:
        """Embeddings computed in this data home since it was created (all attempts)."""
        (n,) = self.conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key='embeddings'").fetchone()
        return int(n)

    def embedded_more_than_once(self) -> int:
        """Chunks whose current text was embedded twice or more (resume waste)."""
        (n,) = self.conn.execute("SELECT count(*) FROM chunks WHERE embeds > 1").fetchone()
        return int(n)

    # ---- maintenance events ------------------------------------------------------

    def add_event(self, kind: str, ok: bool, summary: str, detail: dict[str, Any] | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO events(time, kind, ok, summary, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), kind, int(ok), summary, json.dumps(detail or {})),
            )

    def last_event(self, kind: str, ok: bool | None = None) -> dict[str, Any] | None:
        sql = "SELECT time, kind, ok, summary, detail FROM events WHERE kind=?"
        params: tuple[Any, ...] = (kind,)
        if ok is not None:
            sql += " AND ok=?"
            params += (int(ok),)
        row = self.conn.execute(sql + " ORDER BY time DESC, id DESC LIMIT 1", params).fetchone()
        return _event(row) if row else None

    def events(self, kind: str, since: float) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT time, kind, ok, summary, detail FROM events WHERE kind=? AND time>=? ORDER BY time DESC",
            (kind, since),
        )
        return [_event(r) for r in rows]

    def collections(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT collection FROM chunks ORDER BY collection")]

    def ids_by_state(self, collection: str) -> dict[str, str]:
        """id -> state of every row of a collection."""
        return dict(self.conn.execute("SELECT id, state FROM chunks WHERE collection=?", (collection,)))

    def watermark(self) -> int:
        """The last commit sequence number: every commit up to it is in Chroma."""
        (seq,) = self.conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key='seq'").fetchone()
        return int(seq)

    def committed_after(self, collection: str, seq: int) -> list[Row]:
        cursor = self.conn.execute(
            "SELECT collection, id, text, metadata, hash, state, embedding FROM chunks"
            " WHERE collection=? AND state='committed' AND seq>? ORDER BY seq",
            (collection, seq),
        )
        return [Row(c, i, t, json.loads(m or "{}"), h, s, e) for c, i, t, m, h, s, e in cursor]

    def rows(self, collection: str, ids: Sequence[str]) -> list[Row]:
        return self.load(collection, ids, (COMMITTED,))

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the ledger through SQLite's backup API."""
        dest = sqlite3.connect(str(target))
        try:
            with self._lock:
                self.conn.backup(dest)
            # A self-contained file: no WAL side files that a copy could leave behind.
            dest.execute("PRAGMA journal_mode=DELETE")
        finally:
            dest.close()

    def committed(self, collection: str) -> Iterator[Row]:
        cursor = self.conn.execute(
            "SELECT collection, id, text, metadata, hash, state, embedding FROM chunks"
            " WHERE collection=? AND state='committed' ORDER BY id",
            (collection,),
        )
        for c, i, t, m, h, s, e in cursor:
            yield Row(c, i, t, json.loads(m or "{}"), h, s, e)
