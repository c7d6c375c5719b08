"""The intake: chunks from producers on other machines, held in the queue until the writer has them.

With a shared (Redis) queue, producers cannot write the writer's ledger. A producer
instead stores each part of its submission, signed JSON, in the queue's key-value
store (``indexq.intake.JOB.PART``) and then enqueues an ``ingest`` task naming it.
The enqueue call returns only after the part is stored: that is the acknowledgement.

The writer reads a part, records its chunks in the ledger together with the part's
key (one transaction; the ledger-side "received" state), and only then deletes the
part. Huey pops tasks destructively, so an ingest task can die with the writer; the
part then stays in the intake, and the writer's start-up and periodic requeue enqueue
an ingest for every part still there. Ingesting a part twice is harmless: the ledger
already knows its key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from huey.constants import EmptyData

from pipeline.errors import ForgedPayloadError
from pipeline.signing import Signer

logger = logging.getLogger(__name__)

PREFIX = "indexq.intake."
REJECTED = "indexq.rejected."
# Job progress the writer publishes for producers on other machines (`index --wait`).
PROGRESS = "indexq.job."
FORMAT = 1


def part_key(job: str, number: int) -> str:
    # Job ids start with their creation time: keys sort in submission order.
    return f"{PREFIX}{job}.{number:06d}"


class Intake:
    """Parts in the queue's key-value store (Redis hash or SQLite kv table)."""

    def __init__(self, storage: Any, secret: str) -> None:
        self.storage = storage
        self.signer = Signer(secret, "indexq-intake")

    def put(self, key: str, part: dict[str, Any]) -> None:
        # The key is signed with the part: a signed part copied under another key
        # (to replay old text) is refused.
        self.storage.put_data(key, self.signer.dumps({"format": FORMAT, **part, "key": key}))

    def read(self, key: str) -> dict[str, Any] | None:
        """The part, None once ingested; raises ForgedPayloadError for one this key did not sign."""
        raw = self.storage.peek_data(key)
        if raw is EmptyData:
            return None
        part = self.signer.loads(raw)
        if not isinstance(part, dict) or part.get("format") != FORMAT or not _well_formed(part):
            raise ForgedPayloadError(f"intake part {key} is signed but not a well-formed part")
        if part.get("key") != key:
            raise ForgedPayloadError(f"intake part {key} was signed as {part.get('key')!r}: a copy, not a part")
        return part

    def reject(self, key: str) -> str:
        """Move a refused part aside (``indexq.rejected.KEY``), for an operator to look at."""
        raw = self.storage.peek_data(key)
        aside = REJECTED + key
        if raw is not EmptyData:
            self.storage.put_data(aside, raw)
        self.storage.delete_data(key)
        return aside

    def remove(self, key: str) -> None:
        self.storage.delete_data(key)

    def publish(self, progress: dict[str, Any]) -> None:
        self.storage.put_data(PROGRESS + progress["id"], self.signer.dumps({**progress, "published": time.time()}))

    def progress(self, job: str) -> dict[str, Any] | None:
        """What the writer last published about a job; None before it received a part."""
        raw = self.storage.peek_data(PROGRESS + job)
        if raw is EmptyData:
            return None
        value = self.signer.loads(raw)
        if not isinstance(value, dict) or value.get("id") != job:
            raise ForgedPayloadError(f"progress of job {job} is signed but not this job's")
        return value

    def prune_progress(self, older_than: float) -> int:
        """Forget the progress of jobs finished before ``older_than`` (a timestamp)."""
        removed = 0
        for key in self._names(PROGRESS):
            try:
                value = self.signer.loads(self.storage.peek_data(key))
            except (ForgedPayloadError, ValueError, TypeError):
                value = None
            if not isinstance(value, dict):
                value = {"state": "done", "published": 0}
            if value.get("state") in ("done", "failed") and value.get("published", 0) < older_than:
                self.storage.delete_data(key)
                removed += 1
        return removed

    def keys(self) -> list[str]:
        """Keys of every part not yet ingested, oldest first."""
        return self._names(PREFIX)

    def _names(self, prefix: str) -> list[str]:
        conn = getattr(self.storage, "conn", None)
        result_key = getattr(self.storage, "result_key", None)
        if conn is not None and isinstance(result_key, str) and hasattr(conn, "hkeys"):
            names = [k.decode() if isinstance(k, bytes) else k for k in conn.hkeys(result_key)]
        else:
            names = list(self.storage.result_items())
        return sorted(k for k in names if k.startswith(prefix))


def _well_formed(part: dict[str, Any]) -> bool:
    try:
        if not all(isinstance(part[k], str) for k in ("job", "collection", "kind")):
            return False
        if not isinstance(part["final"], bool) or not isinstance(part["files"], list):
            return False
        if part.get("full_text") not in (None, True, False):  # --full-text/--no-full-text, if asked
            return False
        for entry in part["files"]:
            # A part holds whole sources: chunks past the end of one are stale.
            if not isinstance(entry["source"], str) or entry["total"] != len(entry["chunks"]):
                return False
            for chunk in entry["chunks"]:
                if not (
                    isinstance(chunk["id"], str) and isinstance(chunk["ordinal"], int)
                    and isinstance(chunk["text"], str) and isinstance(chunk["hash"], str)
                    and isinstance(chunk["metadata"], dict)
                ):  # fmt: skip
                    return False
    except (KeyError, TypeError):
        return False
    return True
