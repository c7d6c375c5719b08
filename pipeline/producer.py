"""Producers: chunk a corpus, write pending ledger rows, then enqueue work for the writer.

The order is what makes an acknowledged chunk safe: rows reach the ledger (fsynced)
before their task is enqueued, so a lost task only delays them until the next
requeue. Unchanged chunks are not written again; changed ones are reset to pending;
chunks a file no longer has are marked for deletion. Text already embedded under the
same model anywhere in the collection reuses that embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.chunking import Chunk, chunk_text
from pipeline.config import Config
from pipeline.corpus import Record, Skipped, check_paths, jsonl_values, read_groups, spooled, validate_records, walk
from pipeline.embedder import load_tokenizer
from pipeline.errors import EmptyCorpusError
from pipeline.ids import chunk_id, content_hash, validate_collection
from pipeline.ledger import COMMITTED, DELETING, EMBEDDED, FAILED, PENDING, Ledger

logger = logging.getLogger(__name__)

# Chunks written per ledger transaction (and enqueued right after it).
FLUSH_EVERY = 512


@dataclasses.dataclass
class Submission:
    job: str
    collection: str
    chunks: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    stale: int = 0
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["skipped"] = [s.as_dict() for s in self.skipped]
        return data


class _Batch:
    """Rows, job links, stale ids and work gathered until the next flush."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.linked: list[str] = []
        self.stale: list[str] = []
        self.to_index: list[str] = []

    def __len__(self) -> int:
        return len(self.linked) + len(self.stale)


class Producer:
    def __init__(self, config: Config, huey: Any = None) -> None:
        from workers.queue import WriterHuey

        config.ensure_home()
        self.config = config
        self.huey = huey or WriterHuey(config)
        self.ledger = Ledger(config.ledger_path)
        self.tokenizer = load_tokenizer(config.model)

    def close(self) -> None:
        self.ledger.close()

    # ---- entry points ------------------------------------------------------------

    def submit_paths(
        self, paths: Sequence[str | os.PathLike[str]], collection: str,
        include: Sequence[str] = (), exclude: Sequence[str] = (),
    ) -> Submission:  # fmt: skip
        validate_collection(collection)
        roots = check_paths(paths)
        job = _LazyJob(self.ledger, collection, "paths", [str(p) for p in roots])
        sub = Submission("", collection)
        batch = _Batch()
        for group in read_groups(walk(roots, tuple(include), tuple(exclude))):
            readable = [(path, text) for path, text in group if isinstance(text, str)]
            starts = iter(self.tokenizer.token_starts([text for _, text in readable]))
            for path, text in group:
                if isinstance(text, Skipped):
                    logger.info("skipped %s: %s", text.source, text.reason)
                    sub.skipped.append(text)
                    continue
                source = str(path)
                chunks = chunk_text(
                    text, self.tokenizer, self.config.chunk_tokens, self.config.chunk_overlap, starts=next(starts)
                )
                self._add(
                    sub, batch, source, chunks,
                    lambda c, s=source: _file_chunk(s, c), lambda c, s=source: chunk_id(s, c.ordinal),
                )  # fmt: skip
                if len(batch) >= FLUSH_EVERY:
                    self._flush(job, sub, batch)
                    batch = _Batch()
        return self._finish(job, sub, batch, f"no indexable text under {', '.join(map(str, roots))}")

    def submit_jsonl(self, path: str | os.PathLike[str], collection: str) -> Submission:
        validate_collection(collection)
        (resolved,) = check_paths([path])
        return self._submit_records(jsonl_values(resolved), collection, str(resolved), "jsonl")

    def submit_records(self, records: Iterable[dict[str, Any]], collection: str, source: str = "records") -> Submission:
        """Records ``{"id"?, "text", "metadata"?}``; without an id, source and position make one."""
        validate_collection(collection)
        values = ((n, raw, f"record {n}") for n, raw in enumerate(records))
        return self._submit_records(values, collection, source, "records")

    # ---- internals ---------------------------------------------------------------

    def _submit_records(
        self, values: Iterable[tuple[int, Any, str]], collection: str, label: str, kind: str
    ) -> Submission:
        # Validate every record first, into a private spool file, so a bad record
        # fails the submission before a single row is written.
        tmp = self.config.home / "tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile("w+", encoding="utf-8", dir=tmp) as spool:
            validate_records(values, spool, label)
            job = _LazyJob(self.ledger, collection, kind, [label])
            sub = Submission("", collection)
            batch = _Batch()
            derived: set[str] = set()
            for record in spooled(spool):
                if not record.text.strip():
                    sub.skipped.append(Skipped(f"{label}:{record.position}", "empty text"))
                    continue
                # Without an id, a record is known by its text: resubmitting it (in any
                # order, with lines added around it) is then idempotent.
                base = record.id or chunk_id(label, content_hash(record.text))
                if not record.id:
                    if base in derived:
                        sub.skipped.append(Skipped(f"{label}:{record.position}", "same text as an earlier record"))
                        continue
                    derived.add(base)
                chunks = chunk_text(record.text, self.tokenizer, self.config.chunk_tokens, self.config.chunk_overlap)
                self._add(
                    sub, batch, f"id:{base}", chunks,
                    functools.partial(_record_chunk, record, total=len(chunks)),
                    lambda c, b=base: b if c.ordinal == 0 else f"{b}#{c.ordinal}",
                )  # fmt: skip
                if len(batch) >= FLUSH_EVERY:
                    self._flush(job, sub, batch)
                    batch = _Batch()
            return self._finish(job, sub, batch, f"{label} holds no record with text")

    def _add(
        self, sub: Submission, batch: _Batch, source: str, chunks: list[Chunk], metadata: Any, make_id: Any
    ) -> None:
        existing = self.ledger.by_source(sub.collection, source)
        for chunk in chunks:
            id_ = make_id(chunk)
            batch.linked.append(id_)
            sub.chunks += 1
            old = existing.get(chunk.ordinal)
            if old and old[0] == id_ and old[1] == chunk.hash and old[2] != DELETING:
                sub.unchanged += 1
                if old[2] in (PENDING, EMBEDDED):
                    batch.to_index.append(id_)
                continue
            if old and old[2] != DELETING:
                sub.changed += 1
            else:
                sub.new += 1
            reused = self.ledger.reusable_embedding(sub.collection, chunk.hash, self.config.model)
            batch.rows.append({
                "id": id_, "source": source, "ordinal": chunk.ordinal, "text": chunk.text,
                "metadata": _json(metadata(chunk)), "hash": chunk.hash,
                "state": EMBEDDED if reused else PENDING, "embedding": reused,
                "model": self.config.model if reused else None,
            })  # fmt: skip
            batch.to_index.append(id_)
        gone = [
            old[0]
            for ordinal, old in existing.items()
            if ordinal >= len(chunks) and old[2] in (COMMITTED, PENDING, EMBEDDED, FAILED)
        ]
        batch.stale.extend(gone)
        sub.stale += len(gone)

    def _flush(self, job: _LazyJob, sub: Submission, batch: _Batch) -> None:
        if not len(batch):
            return
        sub.job = job.id()
        self.ledger.write_submission(sub.job, sub.collection, batch.rows, batch.linked, batch.stale)
        # Enqueue only after the rows are durable in the ledger.
        step = self.config.micro_batch
        for start in range(0, len(batch.to_index), step):
            self.huey.tasks.index_chunks(sub.collection, batch.to_index[start : start + step])
        for start in range(0, len(batch.stale), step):
            self.huey.tasks.delete_chunks(sub.collection, batch.stale[start : start + step])

    def _finish(self, job: _LazyJob, sub: Submission, batch: _Batch, empty: str) -> Submission:
        self._flush(job, sub, batch)
        if not sub.chunks and not sub.stale:
            reasons = _reason_counts(sub.skipped)
            raise EmptyCorpusError(empty + (f" ({reasons} skipped)" if reasons else ""))
        counts = {k: getattr(sub, k) for k in ("new", "changed", "unchanged", "stale")}
        self.ledger.finish_submission(sub.job, {"total": sub.chunks, **counts}, [s.as_dict() for s in sub.skipped])
        logger.info(
            "job %s: %d chunks for %s (%d new, %d changed, %d unchanged, %d stale, %d files skipped)",
            sub.job, sub.chunks, sub.collection, sub.new, sub.changed, sub.unchanged, sub.stale, len(sub.skipped),
        )  # fmt: skip
        return sub


class _LazyJob:
    """The job row is created with the first flush: an empty corpus leaves no job behind."""

    def __init__(self, ledger: Ledger, collection: str, kind: str, sources: list[str]) -> None:
        self._args = (collection, kind, sources)
        self._ledger = ledger
        self._id: str | None = None

    def id(self) -> str:
        if self._id is None:
            self._id = self._ledger.create_job(*self._args)
        return self._id


def _file_chunk(source: str, chunk: Chunk) -> dict[str, Any]:
    return {
        "source": source, "ordinal": chunk.ordinal, "start_line": chunk.start_line,
        "end_line": chunk.end_line, "content_hash": chunk.hash,
    }  # fmt: skip


def _record_chunk(record: Record, chunk: Chunk, total: int) -> dict[str, Any]:
    meta = dict(record.metadata)
    meta.setdefault("content_hash", chunk.hash)
    if total > 1:
        meta.setdefault("ordinal", chunk.ordinal)
    return meta


def _reason_counts(skipped: list[Skipped]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        key = s.reason.split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True)
