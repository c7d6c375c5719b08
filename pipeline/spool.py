"""A submission held on disk until every part of it is known good.

A producer chunks its whole corpus into a private SQLite file in the data home's
``tmp/`` before it writes a single ledger row: a record that cannot be used, an id
that two records would share, or a producer killed while chunking leaves nothing
behind. Sources and chunk ids are unique here, so a collision is found by SQLite
instead of a set held in memory: memory stays flat however large the corpus.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

# Rows read back per query while the submission is written.
_READ_BATCH = 512


def _remove_orphans(folder: Path) -> None:
    """Spools of producers that were killed (their pid is gone) are worthless: remove them."""
    for path in folder.glob("spool-*-*.db"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


class Spool:
    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        _remove_orphans(folder)
        fd, name = tempfile.mkstemp(prefix=f"spool-{os.getpid()}-", suffix=".db", dir=folder)
        os.close(fd)
        self.path = Path(name)
        # A scratch file: it is deleted on close and worthless after a crash, so no
        # journal and no fsync.
        self.conn = sqlite3.connect(name, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("BEGIN")
        self.conn.execute("CREATE TABLE sources(n INTEGER PRIMARY KEY, source TEXT UNIQUE NOT NULL, place TEXT)")
        self.conn.execute(
            "CREATE TABLE chunks(n INTEGER PRIMARY KEY, source INTEGER NOT NULL, id TEXT UNIQUE NOT NULL,"
            " ordinal INTEGER, text TEXT, metadata TEXT, hash TEXT)"
        )
        self.conn.execute("CREATE INDEX chunks_source ON chunks(source, ordinal)")
        self.chunks = 0

    def close(self) -> None:
        self.conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_source(self, source: str) -> str | None:
        """Where the source was added (a line, a record), or None."""
        row = self.conn.execute("SELECT place FROM sources WHERE source=?", (source,)).fetchone()
        return row[0] if row else None

    def add(self, source: str, place: str, chunks: list[dict[str, Any]]) -> str | None:
        """Add a source and its chunks (id, ordinal, text, metadata, hash); the problem if one
        of its ids is already taken (nothing of the source is then kept)."""
        self.conn.execute("SAVEPOINT source")
        try:
            (n,) = self.conn.execute(
                "INSERT INTO sources(source, place) VALUES (?, ?) RETURNING n", (source, place)
            ).fetchone()
            for chunk in chunks:
                try:
                    self.conn.execute(
                        "INSERT INTO chunks(source, id, ordinal, text, metadata, hash) VALUES (?, ?, ?, ?, ?, ?)",
                        (n, chunk["id"], chunk["ordinal"], chunk["text"],
                         json.dumps(chunk["metadata"], sort_keys=True), chunk["hash"]),
                    )  # fmt: skip
                except sqlite3.IntegrityError:
                    self.conn.execute("ROLLBACK TO source")
                    self.conn.execute("RELEASE source")
                    return f"id {chunk['id']!r} is also {self.owner(chunk['id'])}"
        except BaseException:
            self.conn.execute("ROLLBACK TO source")
            self.conn.execute("RELEASE source")
            raise
        self.conn.execute("RELEASE source")
        self.chunks += len(chunks)
        return None

    def owner(self, id_: str) -> str:
        """Which chunk of which source holds an id, in words."""
        ordinal, place = self.conn.execute(
            "SELECT c.ordinal, s.place FROM chunks c JOIN sources s ON s.n = c.source WHERE c.id=?", (id_,)
        ).fetchone()
        return f"chunk {ordinal} of {place}" if ordinal else f"the id of {place}"

    def sources(self) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        """(source, place, chunks) in the order they were added, read a few at a time."""
        last = 0
        while True:
            batch = self.conn.execute(
                "SELECT n, source, place FROM sources WHERE n > ? ORDER BY n LIMIT ?", (last, _READ_BATCH)
            ).fetchall()
            if not batch:
                return
            for n, source, place in batch:
                chunks = [
                    {"id": i, "ordinal": o, "text": t, "metadata": m, "hash": h}
                    for i, o, t, m, h in self.conn.execute(
                        "SELECT id, ordinal, text, metadata, hash FROM chunks WHERE source=? ORDER BY ordinal", (n,)
                    )
                ]
                yield source, place, chunks
                last = n

    def ids(self) -> Iterator[list[tuple[str, str, str]]]:
        """(id, source, place) of every chunk, in batches."""
        last = 0
        while True:
            batch = self.conn.execute(
                "SELECT c.n, c.id, s.source, s.place FROM chunks c JOIN sources s ON s.n = c.source"
                " WHERE c.n > ? ORDER BY c.n LIMIT ?",
                (last, _READ_BATCH),
            ).fetchall()
            if not batch:
                return
            last = batch[-1][0]
            yield [(i, s, p) for _, i, s, p in batch]
