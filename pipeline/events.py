"""What maintenance did (backups, checks, recoveries, requeues, alerts), kept in the ledger for status.

Reached as ``Ledger.events``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from pipeline.rows import Transaction

_COLUMNS = "time, kind, ok, summary, detail"


def _event(row: tuple[Any, ...]) -> dict[str, Any]:
    when, kind, ok, summary, detail = row
    return {"time": when, "kind": kind, "ok": bool(ok), "summary": summary, "detail": json.loads(detail or "{}")}


class Events:
    def __init__(self, conn: sqlite3.Connection, tx: Transaction) -> None:
        self.conn = conn
        self._tx = tx

    def add(self, kind: str, ok: bool, summary: str, detail: dict[str, Any] | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO events({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (time.time(), kind, int(ok), summary, json.dumps(detail or {})),
            )

    def last(self, kind: str, ok: bool | None = None) -> dict[str, Any] | None:
        """The newest event of ``kind`` (only successes or failures with ``ok``), or None."""
        sql = f"SELECT {_COLUMNS} FROM events WHERE kind=?"
        params: tuple[Any, ...] = (kind,)
        if ok is not None:
            sql += " AND ok=?"
            params += (int(ok),)
        row = self.conn.execute(sql + " ORDER BY time DESC, id DESC LIMIT 1", params).fetchone()
        return _event(row) if row else None

    def since(self, kind: str, since: float) -> list[dict[str, Any]]:
        """Events of ``kind`` at or after ``since``, newest first."""
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM events WHERE kind=? AND time>=? ORDER BY time DESC", (kind, since)
        )
        return [_event(r) for r in rows]
