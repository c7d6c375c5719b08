"""Producers: chunk a corpus, write pending ledger rows, then enqueue work for the writer.

The order is what makes an acknowledged chunk safe: rows reach the ledger (fsynced)
before their task is enqueued, so a lost task only delays them until the next
requeue. Unchanged chunks are not written again; changed ones are reset to pending;
chunks a file no longer has are marked for deletion. Text already embedded under the
same model anywhere in the collection reuses that embedding.

With a shared (Redis) queue the producer may run on another machine: it then hands
each part of its submission to the writer through the intake (``pipeline.intake``)
and the writer makes the same comparison when it records the part in its ledger.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.chunking import Chunk, chunk_text
from pipeline.config import Config
from pipeline.corpus import Record, Skipped, check_paths, jsonl_values, read_groups, spooled, validate_records, walk
from pipeline.embedder import load_tokenizer
from pipeline.errors import ConfigError, EmptyCorpusError
from pipeline.ids import chunk_id, content_hash, new_job_id, validate_collection
from pipeline.intake import part_key
from pipeline.ledger import Ledger

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
    # Handed to a remote writer through the intake: new/changed/unchanged/stale are
    # then counted by the writer as it records the parts (see `indexq status`).
    remote: bool = False

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
        # Remote producers: whole sources, for the writer to compare with its ledger.
        self.files: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.linked) + len(self.stale)


class Producer:
    def __init__(self, config: Config, huey: Any = None) -> None:
        from workers.queue import WriterHuey

        config.ensure_home()
        self.config = config
        self.huey = huey or WriterHuey(config)
        self.remote = config.remote_producers
        # A remote producer never opens a ledger: the writer's is on another machine.
        self.ledger: Ledger | None = None if self.remote else Ledger(config.ledger_path)
        self.intake = self.huey.intake if self.remote else None
        if self.remote:
            self._check_writer_model()
        self.tokenizer = load_tokenizer(config.model)

    def _check_writer_model(self) -> None:
        """Chunks are sized with the producer's tokenizer: it must be the writer's model's."""
        with self.huey.reaching():
            writer = self.huey.serving_writer()
        if writer and writer.get("model") and writer["model"] != self.config.model:
            raise ConfigError(
                f"the writer on {writer.get('host')} embeds with {writer['model']!r}, this producer would chunk"
                f" for {self.config.model!r}: chunks would not fit the writer's model",
                hint=f"set INDEXQ_MODEL={writer['model']} (or --model) on this producer",
            )

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    # ---- entry points ------------------------------------------------------------

    def submit_paths(
        self, paths: Sequence[str | os.PathLike[str]], collection: str,
        include: Sequence[str] = (), exclude: Sequence[str] = (),
    ) -> Submission:  # fmt: skip
        validate_collection(collection)
        roots = check_paths(paths)
        job = _LazyJob(self.ledger, collection, "paths", [str(p) for p in roots])
        sub = Submission("", collection, remote=self.remote)
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
            sub = Submission("", collection, remote=self.remote)
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
        records = [
            {"id": make_id(c), "ordinal": c.ordinal, "text": c.text, "metadata": metadata(c), "hash": c.hash}
            for c in chunks
        ]
        sub.chunks += len(records)
        batch.linked.extend(r["id"] for r in records)
        if self.ledger is None:
            batch.files.append({"source": source, "total": len(records), "chunks": records})
            return
        plan = self.ledger.plan_source(sub.collection, source, records, self.config.model)
        batch.rows.extend(plan.rows)
        batch.to_index.extend(plan.to_index)
        batch.stale.extend(plan.stale)
        sub.new += plan.new
        sub.changed += plan.changed
        sub.unchanged += plan.unchanged
        sub.stale += len(plan.stale)

    def _flush(self, job: _LazyJob, sub: Submission, batch: _Batch, final: bool = False) -> None:
        if self.ledger is None:
            self._hand_over(job, sub, batch, final)
            return
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

    def _hand_over(self, job: _LazyJob, sub: Submission, batch: _Batch, final: bool) -> None:
        """Store a part in the intake, then enqueue its ingest: the part is safe before the task exists."""
        if not batch.files and not final:
            return
        if final and not sub.chunks:
            return  # an empty corpus: nothing was sent, _finish raises
        sub.job = job.id()
        part: dict[str, Any] = {
            "job": sub.job, "collection": sub.collection, "kind": job.kind, "sources": job.sources,
            "created": job.created, "host": os.uname().nodename, "files": batch.files, "final": final,
            "model": self.config.model,
        }  # fmt: skip
        if final:
            part["parts"] = job.parts + 1
            part["skipped"] = [s.as_dict() for s in sub.skipped]
        key = part_key(sub.job, job.parts)
        assert self.intake is not None
        with self.huey.reaching(f"job {sub.job} is incomplete: submit the same paths again once the queue is back"):
            self.intake.put(key, part)
            self.huey.tasks.ingest(key)
        job.parts += 1

    def _finish(self, job: _LazyJob, sub: Submission, batch: _Batch, empty: str) -> Submission:
        self._flush(job, sub, batch, final=True)
        if not sub.chunks and not sub.stale:
            reasons = _reason_counts(sub.skipped)
            raise EmptyCorpusError(empty + (f" ({reasons} skipped)" if reasons else ""))
        if self.ledger is None:
            logger.info(
                "job %s: %d chunks for %s handed to the writer in %d parts (%d files skipped)",
                sub.job, sub.chunks, sub.collection, job.parts, len(sub.skipped),
            )  # fmt: skip
            return sub
        counts = {k: getattr(sub, k) for k in ("new", "changed", "unchanged", "stale")}
        self.ledger.finish_submission(sub.job, {"total": sub.chunks, **counts}, [s.as_dict() for s in sub.skipped])
        logger.info(
            "job %s: %d chunks for %s (%d new, %d changed, %d unchanged, %d stale, %d files skipped)",
            sub.job, sub.chunks, sub.collection, sub.new, sub.changed, sub.unchanged, sub.stale, len(sub.skipped),
        )  # fmt: skip
        return sub


class _LazyJob:
    """The job row is created with the first flush: an empty corpus leaves no job behind."""

    def __init__(self, ledger: Ledger | None, collection: str, kind: str, sources: list[str]) -> None:
        self._args = (collection, kind, sources)
        self.kind, self.sources = kind, sources
        self._ledger = ledger
        self._id: str | None = None
        self.created = time.time()
        self.parts = 0  # intake parts handed over so far

    def id(self) -> str:
        if self._id is None:
            self._id = self._ledger.create_job(*self._args) if self._ledger else new_job_id()
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
