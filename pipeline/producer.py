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

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.chunking import Chunk, chunk_budget, chunk_text
from pipeline.config import Config
from pipeline.corpus import (
    GROUP_BYTES,
    Private,
    Problems,
    Record,
    Skipped,
    check_paths,
    check_record,
    content_gone,
    covered_by,
    gone,
    jsonl_values,
    read_groups,
    shown,
    walk,
)  # fmt: skip
from pipeline.embedder import Tokenizer, load_tokenizer, model_identity
from pipeline.errors import BadInputError, ConfigError, EmptyCorpusError, StorageError, storage_errors
from pipeline.faults import fault_point
from pipeline.ids import chunk_id, content_hash, new_job_id, validate_collection
from pipeline.intake import part_key
from pipeline.ledger import Ledger
from pipeline.queue import QueueClient
from pipeline.spool import Spool

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
    # Text unchanged, metadata not (lines moved above it): updated without re-embedding.
    metadata_updated: int = 0
    stale: int = 0
    # Files indexed from under the paths that no longer exist (--prune): their chunks
    # are counted in ``stale``.
    pruned: int = 0
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    # Handed to a remote writer through the intake: new/changed/unchanged/stale (and
    # pruned) are then counted by the writer as it records the parts (`indexq status`).
    remote: bool = False
    # --prune handed to a remote writer: roots and filters.
    prune: dict[str, list[str]] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["skipped"] = [s.as_dict() for s in self.skipped]
        del data["prune"]  # what was asked, not what happened
        return data


class _Batch:
    """Rows, job links, stale ids and work gathered until the next flush."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.retag: list[tuple[str, str]] = []
        self.linked: list[str] = []
        self.stale: list[str] = []
        self.to_index: list[str] = []
        # Remote producers: whole sources, for the writer to compare with its ledger.
        self.files: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.linked) + len(self.stale)


class Producer:
    def __init__(self, config: Config, queue: QueueClient | None = None) -> None:
        config.ensure_home()
        self.config = config
        self.queue = queue or QueueClient(config)
        self.remote = config.remote_producers
        # A remote producer never opens a ledger: the writer's is on another machine.
        self.ledger: Ledger | None = None if self.remote else Ledger(config.ledger_path)
        self.intake = self.queue.intake if self.remote else None
        if self.remote:
            self._check_writer_model()
        self.tokenizer = load_tokenizer(config.model)
        # A chunk size or overlap the model cannot take fails here, before anything is written.
        chunk_budget(self.tokenizer, config.chunk_tokens, config.chunk_overlap)

    def _check_writer_model(self) -> None:
        """Chunks are sized with the producer's tokenizer: it must be the writer's model's."""
        with self.queue.reaching():
            writer = self.queue.serving_writer()
        if writer and writer.get("model") and model_identity(writer["model"]) != model_identity(self.config.model):
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
        prune: bool = False, follow_symlinks: bool = False,
    ) -> Submission:  # fmt: skip
        """Index the files under ``paths``; with ``prune``, remove files indexed from under
        them that no longer exist. One path or one glob may be given alone, not in a list."""
        self._check_collection(collection)
        paths = _listed(paths, "paths", (str, os.PathLike))
        include, exclude = _listed(include, "include", (str,)), _listed(exclude, "exclude", (str,))
        roots = check_paths(paths)
        private = Private(self._private())
        for root in roots:
            for folder, what in private.folders.items():
                if root == folder:
                    raise BadInputError(f"{root} is {what}: it is never indexed")
                if root.is_relative_to(folder):
                    raise BadInputError(f"{root} lies in {what} {folder}: it is never indexed")
            try:
                owner = private.owner(root)
            except OSError:  # unreadable: the walk says so
                owner = None
            if owner is not None:
                raise BadInputError(
                    f"{shown(root)} is {owner} or lies in it, reached another way (a bind mount or a hard link):"
                    " it is never indexed"
                )
        sub = Submission("", collection, remote=self.remote)
        # Files and folders that exist but could not be read keep their chunks (and what
        # lies under them is not pruned).
        unreadable: set[str] = set()
        with self._spool() as spool:
            files = walk(roots, tuple(include), tuple(exclude), follow_symlinks, private)
            for group in read_groups(files):
                readable = [doc.text for _, doc in group if not isinstance(doc, Skipped)]
                starts = iter(token_starts(self.tokenizer, readable))
                for path, doc in group:
                    source = str(path)
                    if isinstance(doc, Skipped):
                        logger.info("skipped %s: %s", doc.source, doc.reason)
                        sub.skipped.append(doc)
                        if content_gone(doc.reason):
                            if not spool.has_source(source):
                                spool.add(source, source, [])  # what it had is stale
                        else:
                            unreadable.add(source)
                        continue
                    chunks = chunk_text(
                        doc.text, self.tokenizer, self.config.chunk_tokens, self.config.chunk_overlap,
                        starts=next(starts), headings=doc.headings,
                    )  # fmt: skip
                    records = [file_record(source, c, doc.place(c.start_line, c.end_line)) for c in chunks]
                    spool.add(source, source, records)
            if prune:
                spec = {"roots": [str(r) for r in roots], "include": list(include), "exclude": list(exclude)}
                if self.ledger is None:
                    sub.prune = spec  # the writer prunes against its ledger once every part is in
                else:
                    self._prune(spool, sub, collection, spec, covered_by(unreadable))
            empty = f"no indexable text under {', '.join(map(shown, roots))}"
            return self._write(spool, sub, "paths", [str(p) for p in roots], empty)

    def submit_jsonl(self, path: str | os.PathLike[str], collection: str) -> Submission:
        self._check_collection(collection)
        (resolved,) = check_paths([path])
        return self._submit_records(jsonl_values(resolved), collection, str(resolved), "jsonl")

    def submit_records(self, records: Iterable[Any], collection: str, source: str = "records") -> Submission:
        """Records ``{"id"?, "text", "metadata"?}`` or LangChain/LlamaIndex documents (``check_record``);
        without an id, source and text make one."""
        self._check_collection(collection)
        if isinstance(records, (str, bytes, dict)) or not isinstance(records, Iterable):
            raise BadInputError(f"records must be a list (or another iterable) of them, got {type(records).__name__}")
        values = ((n, raw, f"record {n}") for n, raw in enumerate(records))
        return self._submit_records(values, collection, source, "records")

    # ---- internals ---------------------------------------------------------------

    def _private(self) -> dict[Path, str]:
        """Real paths of the folders a walk never enters: the data home (its queue key,
        ledger and spool) and a Chroma directory kept elsewhere."""
        folders = {Path(os.path.realpath(self.config.home)): "the data home"}
        if self.config.chroma_url is None and self.config.chroma_path is not None:
            folders.setdefault(Path(os.path.realpath(self.config.chroma_path)), "the Chroma directory")
        return folders

    def _check_collection(self, collection: str) -> None:
        """A bad name, or settings or a model other than the collection's, before any input is read
        (checked again before the rows are written: another submission may settle them meanwhile;
        a writer that claims the collection for another model after that fails the rows instead)."""
        validate_collection(collection)
        if self.ledger is not None:
            self.ledger.sources.settings(collection, self.config.full_text, self.config.model)

    @contextlib.contextmanager
    def _spool(self) -> Iterator[Spool]:
        with Spool(self.config.home / "tmp") as spool:
            yield spool

    def _submit_records(
        self, values: Iterable[tuple[int, Any, str]], collection: str, label: str, kind: str
    ) -> Submission:
        # Every record is checked, chunked and given its ids in a private spool first,
        # so a bad record or two records claiming one id fail the submission before a
        # single row is written.
        sub = Submission("", collection, remote=self.remote)
        problems = Problems(label)
        with self._spool() as spool:
            for position, raw, where in values:
                try:
                    record = check_record(raw, position, where)
                except ValueError as exc:
                    problems.add(str(exc))
                    continue
                if not record.text.strip():
                    sub.skipped.append(Skipped(f"{label}:{record.position}", "empty text"))
                    continue
                # Without an id, a record is known by its text: resubmitting it (in any
                # order, with lines added around it) is then idempotent.
                base = record.id or chunk_id(label, content_hash(record.text))
                source = f"id:{base}"
                earlier = spool.has_source(source)
                if earlier:
                    if record.id:
                        problems.add(f"{where}: duplicate id {record.id!r} (also {earlier})")
                    else:
                        sub.skipped.append(Skipped(f"{label}:{record.position}", "same text as an earlier record"))
                    continue
                (starts,) = token_starts(self.tokenizer, [record.text])
                chunks = chunk_text(
                    record.text, self.tokenizer, self.config.chunk_tokens, self.config.chunk_overlap, starts=starts
                )
                place = f"the record on {where}"
                records = [_record_chunk(record, base, c, len(chunks)) for c in chunks]
                collision = spool.add(source, place, records)
                if collision:
                    problems.add(f"{where}: {collision}")
            problems.raise_any()
            return self._write(spool, sub, kind, [label], f"{label} holds no record with text", problems)

    def _check_owners(self, spool: Spool, collection: str, problems: Problems) -> None:
        """An id the ledger already holds for another source (a record's own id equal to a
        chunk id of an earlier record, ``c`` and ``c#1``) would silently replace it."""
        assert self.ledger is not None
        for batch in spool.ids():
            owners = self.ledger.sources.owners(collection, [id_ for id_, _, _ in batch])
            for id_, source, place in batch:
                owner = owners.get(id_)
                if owner is not None and owner != source:
                    problems.add(f"{place}: id {id_!r} is already held in {collection!r} by {_spelled(owner)}")

    def _prune(
        self, spool: Spool, sub: Submission, collection: str, spec: dict[str, list[str]], kept: Callable[[str], bool]
    ) -> None:
        """Files indexed from under the roots that the walk no longer found: their chunks are stale."""
        assert self.ledger is not None
        candidates = self.ledger.sources.under(collection, spec["roots"])

        def seen(source: str) -> bool:
            # A file at that very real path after all: made after this walk passed by (and
            # indexed by another producer meanwhile, say), it is not gone. One reached now
            # through a link, or a folder where it was, is gone.
            on_disk = os.path.isfile(source) and os.path.realpath(source) == source
            return spool.has_source(source) is not None or kept(source) or on_disk

        for source in gone(candidates, seen, map(Path, spec["roots"]), spec["include"], spec["exclude"]):
            spool.add(source, source, [])
            sub.pruned += 1

    def _write(
        self, spool: Spool, sub: Submission, kind: str, sources: list[str], empty: str, owners: Problems | None = None
    ) -> Submission:
        """Everything is known good: write the ledger (or hand the parts over), then enqueue.
        With ``owners``, records whose ids another source holds are refused first."""
        with self._alone():
            if self.ledger is not None:  # settings other than the collection's are refused before anything is written
                self.ledger.sources.settings(sub.collection, self.config.full_text, self.config.model)
                if owners is not None:
                    self._check_owners(spool, sub.collection, owners)
                    owners.raise_any()
            return self._write_alone(spool, sub, kind, sources, empty)

    @contextlib.contextmanager
    def _alone(self) -> Iterator[None]:
        """The data home's producer lock, while a submission is compared with the ledger and
        written: two producers that plan the same ids at once would each plan against the
        ledger as it was (chunks of both versions kept, an id's owner check passed by
        both). A remote producer writes no ledger: the writer records its parts one by one."""
        if self.ledger is None:
            yield
            return
        path = self.config.producer_lock_path
        with storage_errors(f"cannot submit to the data home {self.config.home}", self.config.home):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # No time limit: a large submission holds it for as long as its writes take.
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                logger.warning("waiting for another producer (pid %s) to finish writing its submission", holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(OSError):  # who holds it: for a waiter's message only
                mark = f"{os.getpid()}\n".encode()
                os.pwrite(fd, mark, 0)  # first: a waiter never reads an empty file
                os.ftruncate(fd, len(mark))
            yield
        finally:
            os.close(fd)

    def _write_alone(self, spool: Spool, sub: Submission, kind: str, sources: list[str], empty: str) -> Submission:
        job = _LazyJob(self.ledger, sub.collection, kind, sources)
        batch = _Batch()
        try:
            with storage_errors(f"cannot submit to the data home {self.config.home}", self.config.home):
                for source, _, chunks in spool.sources():
                    self._add(sub, batch, source, chunks)
                    if len(batch) >= FLUSH_EVERY:
                        self._flush(job, sub, batch)
                        batch = _Batch()
                return self._finish(job, sub, batch, empty)
        except StorageError as exc:
            job.fail(str(exc))  # what was written is indexed; the job says why it stopped
            raise

    def _add(self, sub: Submission, batch: _Batch, source: str, records: list[dict[str, Any]]) -> None:
        if self.ledger is None:
            sub.chunks += len(records)
            batch.linked.extend(r["id"] for r in records)
            # The part is JSON itself: metadata travels as an object (the intake refuses a
            # part whose metadata is not one), not as the spool's JSON text. A remote producer
            # cannot see the ledger: the intake refuses a chunk whose id another source holds.
            chunks = [{**r, "metadata": json.loads(r["metadata"])} for r in records]
            batch.files.append({"source": source, "total": len(chunks), "chunks": chunks})
            return
        plan = self.ledger.sources.plan(sub.collection, source, records, self.config.model)
        if plan.collisions:
            # A record holds one of the file's chunk ids (a record may be given any id: one
            # copied from an export, say; records' own collisions were refused under this same
            # lock): the file is skipped whole, never written over the record, and what it
            # had is kept.
            id_, owner = plan.collisions[0]
            ordinal = next(n for n, r in enumerate(records) if r["id"] == id_)
            reason = f"the id {id_!r} of its chunk {ordinal} is already held by {_spelled(owner)}"
            logger.warning("skipped %s: %s", source, reason)
            sub.skipped.append(Skipped(source, reason))
            return
        sub.chunks += len(records)
        batch.linked.extend(r["id"] for r in records)
        batch.rows.extend(plan.rows)
        batch.retag.extend(plan.retag)
        batch.to_index.extend(plan.to_index)
        batch.stale.extend(plan.stale)
        sub.new += plan.new
        sub.changed += plan.changed
        sub.unchanged += plan.unchanged
        sub.metadata_updated += plan.metadata_updated
        sub.stale += len(plan.stale)

    def _flush(self, job: _LazyJob, sub: Submission, batch: _Batch, final: bool = False) -> None:
        if self.ledger is None:
            self._hand_over(job, sub, batch, final)
            return
        if not len(batch):
            return
        sub.job = job.id()
        self.ledger.sources.write(
            sub.job, sub.collection, batch.rows, batch.linked, batch.stale, batch.retag, self.config.full_text
        )
        # Enqueue only after the rows are durable in the ledger.
        self.queue.enqueue_work(sub.collection, batch.to_index, batch.stale)
        fault_point("submission-flushed")

    def _hand_over(self, job: _LazyJob, sub: Submission, batch: _Batch, final: bool) -> None:
        """Store a part in the intake, then enqueue its ingest: the part is safe before the task exists."""
        if not batch.files and not final:
            return
        if final and not batch.files and not job.parts and not sub.prune:
            return  # an empty corpus: nothing was sent, _finish raises
        sub.job = job.id()
        part: dict[str, Any] = {
            "job": sub.job, "collection": sub.collection, "kind": job.kind, "sources": job.sources,
            "created": job.created, "host": os.uname().nodename, "files": batch.files, "final": final,
            "model": self.config.model,
        }  # fmt: skip
        if self.config.full_text is not None:  # a new collection's settings; the writer refuses others
            part["full_text"] = self.config.full_text
        if final:
            part["parts"] = job.parts + 1
            part["skipped"] = [s.as_dict() for s in sub.skipped]
            if sub.prune:
                part["prune"] = sub.prune
        key = part_key(sub.job, job.parts)
        assert self.intake is not None
        with self.queue.reaching(f"job {sub.job} is incomplete: submit the same paths again once the queue is back"):
            self.intake.put(key, part)
            self.queue.tasks.ingest(key)
        job.parts += 1

    def _finish(self, job: _LazyJob, sub: Submission, batch: _Batch, empty: str) -> Submission:
        self._flush(job, sub, batch, final=True)
        if not sub.chunks and not sub.stale and not job.parts:
            reasons = _reason_counts(sub.skipped)
            raise EmptyCorpusError(empty + (f" ({reasons} skipped)" if reasons else ""))
        if self.ledger is None:
            logger.info(
                "job %s: %d chunks for %s handed to the writer in %d parts (%d files skipped)",
                sub.job, sub.chunks, sub.collection, job.parts, len(sub.skipped),
            )  # fmt: skip
            return sub
        counts = {k: getattr(sub, k) for k in ("new", "changed", "unchanged", "metadata_updated", "stale")}
        self.ledger.jobs.finish(sub.job, {"total": sub.chunks, **counts}, [s.as_dict() for s in sub.skipped])
        logger.info(
            "job %s: %d chunks for %s (%d new, %d changed, %d unchanged, %d metadata updated, %d stale,"
            " %d files skipped, %d pruned)", sub.job, sub.chunks, sub.collection, sub.new, sub.changed,
            sub.unchanged, sub.metadata_updated, sub.stale, len(sub.skipped), sub.pruned,
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

    def fail(self, reason: str) -> None:
        """Best effort: the disk that stopped the submission may refuse this too (it is
        then shown as abandoned once this producer has exited)."""
        if self._id is not None and self._ledger is not None:
            with contextlib.suppress(Exception):
                self._ledger.jobs.fail(self._id, reason)

    def id(self) -> str:
        if self._id is None:
            self._id = self._ledger.jobs.create(*self._args) if self._ledger else new_job_id()
        return self._id


def file_record(source: str, chunk: Chunk, place: dict[str, Any] | None = None) -> dict[str, Any]:
    """A file's chunk as the writer will upsert it: its id, text and metadata (where it lies,
    its hashes, and LlamaIndex's copy of the node)."""
    metadata = {
        "source": source, "ordinal": chunk.ordinal, "start_line": chunk.start_line,
        "end_line": chunk.end_line, "content_hash": chunk.hash, "document_id": document_id(source),
    }  # fmt: skip
    if place is not None:
        # Where a document puts the chunk (pipeline.formats): the file's lines, or for text
        # extracted from a PDF, DOCX or HTML file its page and heading path instead.
        del metadata["start_line"], metadata["end_line"]
        metadata.update(place)
    id_ = chunk_id(source, chunk.ordinal)
    # _node_keys last: LlamaIndex reads its copy of every key above.
    return {"id": id_, "ordinal": chunk.ordinal, "text": chunk.text,
            "metadata": {**metadata, **_node_keys(id_, metadata)}, "hash": chunk.hash}  # fmt: skip


def _record_chunk(record: Record, base: str, chunk: Chunk, total: int) -> dict[str, Any]:
    meta = {k: v for k, v in record.metadata.items() if k not in NODE_KEYS}  # stale if copied from elsewhere
    meta.setdefault("content_hash", chunk.hash)
    if total > 1:
        meta.setdefault("ordinal", chunk.ordinal)
    # Its own document_id groups records into one document (LlamaIndex nodes of one source).
    meta.setdefault("document_id", base)
    id_ = base if chunk.ordinal == 0 else f"{base}#{chunk.ordinal}"
    meta.update(_node_keys(id_, meta))
    return {"id": id_, "ordinal": chunk.ordinal, "text": chunk.text, "metadata": meta, "hash": chunk.hash}


def _listed(value: Any, what: str, kinds: tuple[type, ...]) -> list[Any]:
    """``value`` as a list: one string (or path) alone is one item, not its characters."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    elif isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
        raise BadInputError(f"{what} must be a list, got {type(value).__name__}")
    items = list(value)
    for item in items:
        if not isinstance(item, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise BadInputError(f"{what}: {item!r} is a {type(item).__name__}, not a {wanted}")
    return items


def document_id(source: str) -> str:
    """A file's ``document_id``: from its resolved path, so every chunk of it and every
    re-submission agree, and not equal to a record id by accident (records use their id)."""
    return chunk_id(source, "document")


# What LlamaIndex's vector stores read a node from. Without them, its Chroma reader falls
# back to its deprecated legacy path, whose nodes have no ref_doc_id.
NODE_KEYS = ("_node_content", "_node_type")


def _node_keys(id_: str, metadata: dict[str, Any]) -> dict[str, str]:
    """The chunk as LlamaIndex writes a TextNode into Chroma (``node_to_metadata_dict``):
    its id, a copy of its metadata, and its document as source ("1"; "4": a document).

    The text is left out (Chroma's document holds it), as LlamaIndex itself does; keys
    sorted, so that a re-submission gives the same string and nothing is re-embedded.
    """
    node = {
        "id_": id_,
        "metadata": {k: v for k, v in metadata.items() if k not in NODE_KEYS},
        "relationships": {"1": {"node_id": metadata["document_id"], "node_type": "4"}},
    }
    return {"_node_content": json.dumps(node, sort_keys=True, ensure_ascii=False), "_node_type": "TextNode"}


def _spelled(source: str) -> str:
    return f"record {source[3:]!r}" if source.startswith("id:") else source


# Text tokenized in one call at most: one 16 MB line would otherwise become tens of
# millions of offset objects at once (4.75 GB RSS for a 30 MB line, measured).
_SEGMENT_CHARS = 256 * 1024


def _segments(text: str) -> Iterator[tuple[int, str]]:
    """(offset, piece) of at most _SEGMENT_CHARS, cut at a line end, else at white space.

    The model's tokenizer splits at white space first, so such cuts change no token.
    """
    start = 0
    while len(text) - start > _SEGMENT_CHARS:
        end = start + _SEGMENT_CHARS
        cut = text.rfind("\n", start, end) + 1
        if cut <= start:
            cut = max(text.rfind(" ", start, end), text.rfind("\t", start, end)) + 1
        if cut <= start:
            cut = end  # no white space at all: a token may be split, the chunk re-counted
        yield start, text[start:cut]
        start = cut
    yield start, text[start:]


def token_starts(tokenizer: Tokenizer, texts: list[str]) -> list[array[int]]:
    """Token start offsets of each text, counted in bounded segments and held compactly."""
    out = [array("q") for _ in texts]
    pending: list[tuple[int, int, str]] = []
    size = 0

    def run() -> None:
        for (index, offset, _), starts in zip(pending, tokenizer.token_starts([p for _, _, p in pending]), strict=True):
            out[index].extend(offset + s for s in starts)

    for index, text in enumerate(texts):
        for offset, piece in _segments(text):
            pending.append((index, offset, piece))
            size += len(piece)
            if size >= GROUP_BYTES:
                run()
                pending, size = [], 0
    if pending:
        run()
    return out


def _reason_counts(skipped: list[Skipped]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        key = s.reason.split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
