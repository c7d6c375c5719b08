"""The ledger: one SQLite row per chunk, the source of truth of every collection.

Producers write pending rows *before* they enqueue work; the writer stores each
embedding as soon as it is computed and marks rows committed *after* Chroma accepted
them. WAL with ``synchronous=FULL``: a row the ledger reported written survives power
loss. The one exception is the writer's checkpoint (``synchronous=NORMAL``, no fsync of
its own): a kill -9 cannot lose it, a power loss can only turn committed rows back into
embedded ones, which the writer upserts again (idempotent). Transactions are short and
``BEGIN IMMEDIATE`` so that a producer and the writer wait for each other instead of
failing on a lock upgrade.

This module holds the connection, the schema, the writer's chunk state machine and
the reads of recovery and backups. On the same connection: ``Ledger.sources``
(``pipeline.sources``: what a submission changes, the intake's parts),
``Ledger.jobs`` (``pipeline.jobs``: job rows and progress) and ``Ledger.events``
(``pipeline.events``: what maintenance did).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from pipeline.embedder import model_identity
from pipeline.errors import DamageFoundError
from pipeline.events import Events
from pipeline.jobs import Jobs
from pipeline.rows import COMMITTED, DELETING, OUTSTANDING, ROW_COLUMNS, Row, id_lists
from pipeline.sources import Sources

# Tables are created "if not exists": a bump adds what a newer version needs.
SCHEMA_VERSION = 7


def _tally(conn: sqlite3.Connection, kind: str, collection: str, n: int) -> None:
    """Add ``n`` to a per-collection counter in ``meta`` (``committed:docs``), in the caller's
    transaction: never decreasing, so Prometheus can read it as a counter (pipeline.metrics)."""
    if n:
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + excluded.value",
            (f"{kind}:{collection}", n),
        )


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> DamageFoundError | None:
    """A ledger SQLite calls no database or malformed, as the one line every command gives."""
    if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return None  # a disk that refuses, a lock: the caller's to say
    return DamageFoundError(
        f"the ledger {path} is damaged: {exc}",
        hint="the ledger is the record of every chunk and cannot be rebuilt from Chroma: put back a copy"
        " of it (your own backup of the data home), or start a new data home and index again",
    )


def check_ledger(path: Path) -> None:
    """Raise DamageFoundError if the ledger at ``path`` is not a SQLite database; read-only
    (a full disk must still say "cannot check", not this)."""
    if not path.exists():
        return
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        if (damage := _damaged(path, exc)) is not None:
            raise damage from None
    finally:
        conn.close()


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        conn = sqlite3.connect(str(path), timeout=120, isolation_level=None, check_same_thread=False)
        if new:
            path.chmod(0o600)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=120000")
            self.conn = conn
            self.db = sqlite_utils.Database(conn)
            # The writer's worker thread and status probes may share one Ledger.
            self._lock = threading.RLock()
            self._create()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if (damage := _damaged(path, exc)) is None:
                raise
            raise damage from None
        self.sources = Sources(conn, self._tx)
        self.jobs = Jobs(conn, self._tx)
        self.events = Events(conn, self._tx)

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
            # Version 6: the hash of the text last committed under a chunk's id, so that a
            # chunk whose new text fails can be told from one whose committed text is current.
            chunks = self.db.table("chunks")
            if "committed_hash" not in chunks.columns_dict:
                chunks.add_column("committed_hash", str)
                # A committed row's text is the one committed (failed rows' is unknown: left NULL).
                self.conn.execute("UPDATE chunks SET committed_hash=hash WHERE state='committed'")
            # Version 7: the data home's own id, which its backups' ledger snapshots carry, so
            # that a backup of another home is never restored into this one.
            self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('home', ?)", (uuid.uuid4().hex,))
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def home_id(self) -> str | None:
        """The id of the data home this ledger belongs to (schema 7; None before)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key='home'").fetchone()
        return str(row[0]) if row else None

    @contextlib.contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``durable=False`` commits without an fsync (see ``checkpoint``)."""
        with self._lock:
            if not durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
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
            finally:
                if not durable:
                    self.conn.execute("PRAGMA synchronous=FULL")

    def sync(self) -> None:
        """Make every transaction committed so far durable, the writer's checkpoints included.

        A durable commit fsyncs the whole WAL, frames of earlier NORMAL commits with it.
        Called by backups before they read the watermark: a power loss must never take the
        ledger's commit sequence back below a watermark a backup has recorded.
        """
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('synced', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(time.time()),),
            )

    def close(self) -> None:
        self.conn.close()

    # ---- the writer ------------------------------------------------------------

    def load(self, collection: str, ids: Sequence[str], states: Iterable[str]) -> list[Row]:
        """The rows of ``ids`` that are in one of ``states``, in the order of ``ids``."""
        wanted = tuple(states)
        rows: list[Row] = []
        smarks = ",".join("?" * len(wanted))
        for part, marks in id_lists(ids):
            cursor = self.conn.execute(
                f"SELECT {ROW_COLUMNS} FROM chunks WHERE collection=? AND id IN ({marks}) AND state IN ({smarks})",
                (collection, *part, *wanted),
            )
            rows.extend(map(Row.of, cursor))
        order = {id_: n for n, id_ in enumerate(ids)}
        rows.sort(key=lambda r: order.get(r.id, 0))
        return rows

    def begin_embedding(self, collection: str, ids: Sequence[str]) -> None:
        """Count an embedding attempt before it starts, so a kill mid-way still shows.

        Durable (fsynced), unlike ``checkpoint``: without an fsync a power loss while the
        model runs would lose the count and the embeddings both, and the attempt made again
        would look like the first (``embedded_more_than_once``, invariant 4's evidence,
        would under-count). Once per micro-batch, not per commit: ~1-8 ms here.
        """
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

    def drop_foreign_embeddings(self, collection: str, ids: Sequence[str], model: str) -> dict[str, int]:
        """Rows of ``ids`` whose stored, uncommitted embedding another model made go back to
        pending, embedding dropped: {that model: rows}. (A writer restarted with another
        model, or a producer that reused another model's embedding, left them.) Models are
        compared by ``embedder.model_identity``: another spelling of ``model`` is not another model."""
        mine = model_identity(model)
        found: dict[str | None, int] = {}
        for part, marks in id_lists(ids):
            for other, n in self.conn.execute(
                f"SELECT model, count(*) FROM chunks WHERE collection=? AND id IN ({marks})"
                " AND state='embedded' GROUP BY model",
                (collection, *part),
            ):
                if other is None or model_identity(other) != mine:
                    found[other] = found.get(other, 0) + n
        if found:
            with self._tx() as conn:
                for other in found:
                    for part, marks in id_lists(ids):
                        conn.execute(
                            "UPDATE chunks SET state='pending', embedding=NULL, model=NULL, updated=?"
                            f" WHERE collection=? AND id IN ({marks}) AND state='embedded' AND model IS ?",
                            (time.time(), collection, *part, other),
                        )
        return {other or "?": n for other, n in found.items()}

    def checkpoint(self, collection: str, items: Sequence[tuple[str, str, str | None]]) -> int:
        """Mark (id, hash, metadata) committed under one new commit sequence number: only a
        row that still has that text and that metadata (JSON as the ledger holds it; None:
        any). A producer that gave the row new metadata while the writer upserted the old
        leaves it outstanding, and its task upserts the new.

        Not fsynced (``synchronous=NORMAL``): in WAL mode the commit is in the OS's page
        cache when this returns, so a kill -9 of the writer loses nothing; a power loss can
        lose the last checkpoints, whose rows are then ``embedded`` again and upserted once
        more (same ids, same vectors: harmless). The next durable transaction on the
        ledger (any producer's, the next micro-batch's embeddings, a backup's ``sync``)
        makes them durable too. One fsync per commit was the largest cost around a commit.
        """
        now = time.time()
        with self._tx(durable=False) as conn:
            (seq,) = conn.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='seq' RETURNING CAST(value AS INTEGER)"
            ).fetchone()
            done = conn.executemany(
                "UPDATE chunks SET state='committed', seq=?, committed_at=?, updated=?"
                " WHERE collection=? AND id=? AND hash=? AND state='embedded' AND (?7 IS NULL OR metadata = ?7)",
                [(seq, now, now, collection, id_, hash_, meta) for id_, hash_, meta in items],
            ).rowcount
            # What Chroma now holds under each id, whatever the row says: a producer that
            # replaced the text meanwhile left the row outstanding, and Chroma has this one.
            conn.executemany(
                "UPDATE chunks SET committed_hash=? WHERE collection=? AND id=?",
                [(hash_, collection, id_) for id_, hash_, _ in items],
            )
            _tally(conn, "committed", collection, done)
        return int(seq)

    def fail(self, collection: str, items: Sequence[tuple[str, str, str]]) -> None:
        """(id, hash, reason): rows the writer refused; kept, visible, never silently dropped.
        Only the text the writer had (``hash``) while still outstanding: a producer may have
        submitted other text under the id meanwhile, which is not what was refused."""
        with self._tx() as conn:
            done = conn.executemany(
                "UPDATE chunks SET state='failed', error=?, updated=?"
                " WHERE collection=? AND id=? AND hash=? AND state IN ('pending', 'embedded')",
                [(reason, time.time(), collection, id_, hash_) for id_, hash_, reason in items],
            ).rowcount
            _tally(conn, "failed", collection, done)

    def failed_after_a_commit(self, collection: str | None = None) -> dict[str, list[str]]:
        """{collection: ids} of failed rows whose id was committed with other text: Chroma
        may still hold that text, which no file has now. (A row whose committed text is its
        own, failed on new metadata, is not one: Chroma holds its current text.) Rows that
        had failed before the ledger recorded ``committed_hash`` (schema 6) are never listed."""
        sql = (
            "SELECT collection, id FROM chunks WHERE state='failed'"
            " AND committed_hash IS NOT NULL AND committed_hash != hash"
        )
        rows = self.conn.execute(sql, ()) if collection is None else self.conn.execute(
            sql + " AND collection=?", (collection,)
        )  # fmt: skip
        found: dict[str, list[str]] = {}
        for name, id_ in rows:
            found.setdefault(name, []).append(id_)
        return found

    def failed_on_committed_text(self, collection: str, watermark: int | None = None) -> set[str]:
        """Failed rows whose own text is the one last committed under their id (refused for
        new metadata): Chroma rightly holds that text. With ``watermark`` (Chroma restored
        from a backup), only those committed by then: the backup holds their text."""
        rows = self.conn.execute(
            "SELECT id FROM chunks WHERE collection=? AND state='failed' AND committed_hash = hash"
            " AND (? IS NULL OR seq <= ?)",
            (collection, watermark, watermark),
        )
        return {id_ for (id_,) in rows}

    def withdrawn(self, collection: str, ids: Sequence[str]) -> None:
        """The older text of these failed rows is out of Chroma: nothing is committed under their ids."""
        with self._tx() as conn:
            conn.executemany(
                "UPDATE chunks SET committed_hash=NULL WHERE collection=? AND id=? AND state='failed'",
                [(collection, id_) for id_ in ids],
            )

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

    # ---- status ---------------------------------------------------------------------

    def commit_stats(self, window: float = 60.0) -> dict[str, Any]:
        now = time.time()
        (last,) = self.conn.execute("SELECT max(committed_at) FROM chunks").fetchone()
        (recent,) = self.conn.execute("SELECT count(*) FROM chunks WHERE committed_at >= ?", (now - window,)).fetchone()
        return {"last_commit": last, "recent_rate": recent / window}

    def counts(self) -> dict[str, int]:
        return {state: n for state, n in self.conn.execute("SELECT state, count(*) FROM chunks GROUP BY state")}

    def committed_count(self) -> int:
        (n,) = self.conn.execute("SELECT count(*) FROM chunks WHERE state='committed'").fetchone()
        return int(n)

    def embeddings_total(self) -> int:
        """Embeddings computed in this data home since it was created (all attempts)."""
        (n,) = self.conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key='embeddings'").fetchone()
        return int(n)

    def embedded_more_than_once(self) -> int:
        """Chunks whose current text was embedded twice or more (resume waste)."""
        (n,) = self.conn.execute("SELECT count(*) FROM chunks WHERE embeds > 1").fetchone()
        return int(n)

    # ---- recovery and backups --------------------------------------------------------

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
        """Rows committed after the commit sequence number ``seq`` (a backup's watermark), in commit order."""
        cursor = self.conn.execute(
            f"SELECT {ROW_COLUMNS} FROM chunks WHERE collection=? AND state='committed' AND seq>? ORDER BY seq",
            (collection, seq),
        )
        return list(map(Row.of, cursor))

    def rows(self, collection: str, ids: Sequence[str]) -> list[Row]:
        """The committed rows of ``ids``."""
        return self.load(collection, ids, (COMMITTED,))

    def backup_to(self, target: Path) -> None:
        """A consistent copy of the ledger through SQLite's backup API."""
        self.sync()  # the copy and the watermark read after it are on disk in the ledger too
        dest = sqlite3.connect(str(target))
        try:
            with self._lock:
                self.conn.backup(dest)
            # A self-contained file: no WAL side files that a copy could leave behind.
            dest.execute("PRAGMA journal_mode=DELETE")
        finally:
            dest.close()

    def committed(self, collection: str) -> Iterator[Row]:
        """Every committed row of a collection, by id."""
        cursor = self.conn.execute(
            f"SELECT {ROW_COLUMNS} FROM chunks WHERE collection=? AND state='committed' ORDER BY id", (collection,)
        )
        yield from map(Row.of, cursor)
