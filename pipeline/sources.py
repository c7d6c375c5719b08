"""What a submitted source changes in the ledger, and the recording of a remote producer's parts.

A producer (or, for a producer on another machine, the writer ingesting its intake
parts) compares each source's chunks with the rows the ledger holds for that source
and writes only the difference. Reached as ``Ledger.sources``.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import collection as collection_settings
from pipeline.collection import CollectionSettings
from pipeline.corpus import content_gone, covered_by, gone
from pipeline.embedder import model_identity
from pipeline.errors import ConfigError
from pipeline.rows import COMMITTED, DELETING, EMBEDDED, FAILED, PENDING, Transaction, id_lists


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


class Sources:
    def __init__(self, conn: sqlite3.Connection, tx: Transaction) -> None:
        self.conn = conn
        self._tx = tx

    # ---- reads for producers -------------------------------------------------------

    def owners(self, collection: str, ids: Sequence[str]) -> dict[str, str]:
        """id -> source for those of ``ids`` the ledger holds (stale rows on their way out aside)."""
        found: dict[str, str] = {}
        for part, marks in id_lists(ids):
            found.update(
                self.conn.execute(
                    f"SELECT id, source FROM chunks WHERE collection=? AND id IN ({marks}) AND state != 'deleting'",
                    (collection, *part),
                )
            )
        return found

    def under(self, collection: str, roots: Sequence[str]) -> list[str]:
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

    def plan(self, collection: str, source: str, chunks: Sequence[dict[str, Any]], model: str) -> SourcePlan:
        """Compare a source's chunks (id, ordinal, text, metadata, hash) with what the ledger has.

        Unchanged chunks are not written again (but indexed if still outstanding, and tried
        again if the writer refused them); a chunk whose text is unchanged but whose
        metadata is not (lines moved above it) gets its metadata updated with its stored
        embedding; changed ones are reset;
        chunks past the source's end become stale. Text already embedded with the same
        model anywhere in the collection reuses that embedding. An id another source
        holds is never written over: it is listed in ``collisions``.
        """
        plan = SourcePlan()
        identities: dict[str, str] = {}  # model name -> model_identity, once per plan (it reads the disk)
        existing = self._by_source(collection, source)
        # A file's ids are hashes of its path, but a record may have been given one as its id.
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
                if old[2] == FAILED:  # refused before (by a writer of another model, say): tried again
                    plan.retag.append((id_, metadata))
                if old[2] in (PENDING, EMBEDDED, FAILED):
                    plan.to_index.append(id_)
                continue
            if old and old[2] != DELETING:
                plan.changed += 1
            else:
                plan.new += 1
            reused = self._reusable_embedding(collection, chunk["hash"], model, identities)
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

    def _by_source(self, collection: str, source: str) -> dict[int, tuple[str, str, str, str]]:
        """ordinal -> (id, hash, state, metadata JSON) of the rows a source has now."""
        rows = self.conn.execute(
            "SELECT ordinal, id, hash, state, metadata FROM chunks WHERE collection=? AND source=?",
            (collection, source),
        )
        return {ordinal: (id_, hash_, state, meta) for ordinal, id_, hash_, state, meta in rows}

    def _by_ids(self, collection: str, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """id -> (hash, state) for those of ``ids`` the ledger has."""
        found: dict[str, tuple[str, str]] = {}
        for part, marks in id_lists(ids):
            for id_, hash_, state in self.conn.execute(
                f"SELECT id, hash, state FROM chunks WHERE collection=? AND id IN ({marks})", (collection, *part)
            ):
                found[id_] = (hash_, state)
        return found

    def _reusable_embedding(self, collection: str, hash_: str, model: str, identities: dict[str, str]) -> bytes | None:
        """An embedding already computed for the same text with the same model (by
        ``embedder.model_identity``: another spelling of the model is the same model)."""

        def identity(name: str) -> str:
            if name not in identities:
                identities[name] = model_identity(name)
            return identities[name]

        # One row per model that embedded this text (SQLite picks any of its rows).
        for made_by, embedding in self.conn.execute(
            "SELECT model, embedding FROM chunks WHERE collection=? AND hash=? AND embedding IS NOT NULL"
            " AND model IS NOT NULL GROUP BY model",
            (collection, hash_),
        ).fetchall():
            if identity(made_by) == identity(model):
                return bytes(embedding)
        return None

    def settings(self, collection: str, full_text: bool | None = None, model: str | None = None) -> CollectionSettings:
        """What a submission to ``collection`` gets; ConfigError (before anything is written)
        for settings other than those the collection was created with, or for ``model`` when
        the collection holds another model's vectors."""
        return collection_settings.check(self.conn, collection, full_text, model)

    def check_model(self, collection: str, model: str) -> None:
        """A search's: ConfigError where ``collection`` holds no vectors of ``model`` but another's."""
        collection_settings.check_model(self.conn, collection, model, mixed_ok=True)

    def claim_model(self, collection: str, model: str) -> list[str] | None:
        """The writer's, before its first commit to ``collection``: None where the collection
        holds ``model``'s vectors or none (recorded now), else the models whose vectors it holds."""
        with self._tx() as conn:
            return collection_settings.claim_model(conn, collection, model)

    # ---- writes ----------------------------------------------------------------------

    def write(
        self, job: str, collection: str, rows: list[dict[str, Any]], linked: list[str], stale: list[str],
        retag: Sequence[tuple[str, str]] = (), full_text: bool | None = None,
    ) -> None:  # fmt: skip
        """One transaction: the collection's settings if new, new or changed rows, metadata
        updates, the job's membership, stale rows."""
        with self._tx() as conn:
            collection_settings.record(conn, collection, full_text)
            _write(conn, job, collection, rows, linked, stale, retag)

    # ---- the intake: parts from remote producers ---------------------------------------

    def ingest(self, key: str, part: dict[str, Any], model: str) -> tuple[list[str], list[str]] | None:
        """Record an intake part from a remote producer: (ids to index, stale ids), or None if already received.

        One transaction holds the rows and the part's key, so a part ingested again
        (its task replayed after a kill) changes nothing.
        """
        collection, job = part["collection"], part["job"]
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM received WHERE key=?", (key,)).fetchone():
                return None
            _open_job(conn, part)
            try:
                collection_settings.record(conn, collection, part.get("full_text"))
            except ConfigError as exc:
                # The producer is on another machine: its job fails, saying why; nothing is written.
                conn.execute(
                    "UPDATE jobs SET state='failed', skipped=? WHERE id=?", (json.dumps([{"error": str(exc)}]), job)
                )
                conn.execute("INSERT INTO received(key, job, time) VALUES (?, ?, ?)", (key, job, time.time()))
                return [], []
            to_index, stale, counts, refused = self._record(conn, part, model)
            prune = _count_part(conn, part, counts, refused)
            if prune is not None:
                stale.extend(self._prune(conn, job, collection, *prune))
            conn.execute("INSERT INTO received(key, job, time) VALUES (?, ?, ?)", (key, job, time.time()))
        return to_index, stale

    def _record(
        self, conn: sqlite3.Connection, part: dict[str, Any], model: str
    ) -> tuple[list[str], list[str], dict[str, int], list[dict[str, str]]]:
        """Plan and write each file of a part: (ids to index, stale ids, the job's counts, refused ids)."""
        collection, job = part["collection"], part["job"]
        to_index: list[str] = []
        stale: list[str] = []
        counts = {"total": 0, "new": 0, "changed": 0, "unchanged": 0, "metadata_updated": 0, "stale": 0}
        refused: list[dict[str, str]] = []
        for entry in part["files"]:
            plan = self.plan(collection, entry["source"], entry["chunks"], model)
            _write(conn, job, collection, plan.rows, plan.linked, plan.stale, plan.retag)
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
        return to_index, stale, counts, refused

    def _prune(
        self, conn: sqlite3.Connection, job: str, collection: str, spec: dict[str, Any], skipped: list[dict[str, str]]
    ) -> list[str]:
        """A remote job's --prune, once all its parts are in: sources under its roots that it
        did not send (nor skip, nor found under a folder it could not read), and that its
        filters would have taken, become stale."""
        sent = {
            r[0] for r in conn.execute(
                "SELECT DISTINCT c.source FROM job_chunks j JOIN chunks c ON c.collection=j.collection AND c.id=j.id"
                " WHERE j.job=?", (job,),
            )
        } | {s.get("source") for s in skipped}  # fmt: skip
        unreadable = covered_by(
            s["source"]
            for s in skipped
            if isinstance(s.get("source"), str) and not content_gone(str(s.get("reason", "")))
        )
        sources = gone(self.under(collection, spec["roots"]), lambda s: s in sent or unreadable(s),
                       map(Path, spec["roots"]), spec.get("include", ()), spec.get("exclude", ()))  # fmt: skip
        ids = [
            r[0] for source in sources for r in conn.execute(
                "SELECT id FROM chunks WHERE collection=? AND source=? AND state IN (?, ?, ?, ?)",
                (collection, source, COMMITTED, PENDING, EMBEDDED, FAILED),
            )
        ]  # fmt: skip
        _write(conn, job, collection, [], [], ids)
        conn.execute("UPDATE jobs SET pruned=?, stale=stale+? WHERE id=?", (len(sources), len(ids), job))
        return ids

    def outstanding_of(self, part: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(ids to index, stale ids) of an intake part already recorded that still need the writer."""
        collection = part["collection"]
        ids = [c["id"] for entry in part["files"] for c in entry["chunks"]]
        to_index = [id_ for id_, (_, state) in self._by_ids(collection, ids).items() if state in (PENDING, EMBEDDED)]
        stale: list[str] = []
        for entry in part["files"]:
            stale.extend(
                r[0] for r in self.conn.execute(
                    "SELECT id FROM chunks WHERE collection=? AND source=? AND job=? AND state=?",
                    (collection, entry["source"], part["job"], DELETING),
                )
            )  # fmt: skip
        return to_index, stale


def _write(
    conn: sqlite3.Connection, job: str, collection: str,
    rows: list[dict[str, Any]], linked: list[str], stale: list[str], retag: Sequence[tuple[str, str]] = (),
) -> None:  # fmt: skip
    """In the caller's transaction: metadata updates, new or changed rows, the job's membership, stale rows."""
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


def _open_job(conn: sqlite3.Connection, part: dict[str, Any]) -> None:
    """The job row of a remote submission, made by whichever of its parts comes in first."""
    conn.execute(
        "INSERT OR IGNORE INTO jobs(id, collection, kind, sources, state, created, total, new, changed,"
        " unchanged, stale, skipped_files, skipped, received)"
        " VALUES (?, ?, ?, ?, 'submitting', ?, 0, 0, 0, 0, 0, 0, '[]', 0)",
        (part["job"], part["collection"], part["kind"], json.dumps(part.get("sources", [])),
         part.get("created", time.time())),
    )  # fmt: skip


def _count_part(
    conn: sqlite3.Connection, part: dict[str, Any], counts: dict[str, int], refused: list[dict[str, str]]
) -> tuple[dict[str, Any], list[dict[str, str]]] | None:
    """Add a part to its job; the job is queued once every part is in. Returns the job's
    --prune (spec, skipped sources) when this part completed a job that asked for one."""
    job = part["job"]
    conn.execute(
        "UPDATE jobs SET total=total+:total, new=new+:new, changed=changed+:changed,"
        " unchanged=unchanged+:unchanged, metadata_updated=coalesce(metadata_updated, 0)+:metadata_updated,"
        " stale=stale+:stale, received=coalesce(received, 0)+1 WHERE id=:job",
        {**counts, "job": job},
    )
    if refused:
        (old,) = conn.execute("SELECT skipped FROM jobs WHERE id=?", (job,)).fetchone()
        merged = json.loads(old or "[]") + refused
        conn.execute("UPDATE jobs SET skipped=?, skipped_files=? WHERE id=?", (json.dumps(merged), len(merged), job))
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
        return json.loads(complete[0]), json.loads(complete[1])
    return None
