"""A chunk row of the ledger: its states, how it is read, and how ids are asked for.

Shared by ``pipeline.ledger`` and the modules that work on the same connection
(``pipeline.jobs``, ``pipeline.sources``), so that none of them imports another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline.batches import batched

PENDING = "pending"  # needs an embedding
EMBEDDED = "embedded"  # embedding stored, not yet in Chroma
COMMITTED = "committed"  # in Chroma
DELETING = "deleting"  # stale: to be removed from Chroma, then from the ledger
FAILED = "failed"  # refused by validation; the reason is in `error`
OUTSTANDING = (PENDING, EMBEDDED, DELETING)

# What the writer and recovery read of a chunk, in the order of ``Row``'s fields.
ROW_COLUMNS = "collection, id, text, metadata, hash, state, embedding"

# SQLite allows 32766 host parameters; stay far below for IN (...) lists.
_IN_CHUNK = 500

# The ledger's short write transaction (``Ledger._tx``), handed to the modules that share its connection.
Transaction = Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]


@dataclasses.dataclass
class Row:
    collection: str
    id: str
    text: str
    metadata: dict[str, Any]
    hash: str
    state: str
    embedding: bytes | None
    # The metadata as the ledger holds it (JSON text): a checkpoint marks the row committed
    # only if it still is (a producer may give new metadata to a row while it is committed).
    metadata_json: str | None = None

    @classmethod
    def of(cls, values: Sequence[Any]) -> Row:
        """A row selected as ``ROW_COLUMNS``."""
        collection, id_, text, metadata, hash_, state, embedding = values
        return cls(collection, id_, text, json.loads(metadata or "{}"), hash_, state, embedding, metadata)


def id_lists(ids: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """``ids`` in parts small enough for one ``IN (...)``, each with its ``?,?,...`` marks."""
    for part in batched(ids, _IN_CHUNK):
        yield part, ",".join("?" * len(part))
