"""The one writer: embed a micro-batch, then commit it to Chroma ten records at a time.

Every step leaves the ledger able to say what to do next after a kill at any instant:
an embedding attempt is counted before it starts; embeddings are stored as soon as
they exist (so a resumed run re-embeds at most the micro-batch that was in flight);
a row is marked committed only after Chroma accepted it, and a replayed upsert of the
same deterministic ids is harmless.

Where the model leaves CPU cores free, embedding and commits overlap, so that the
model's time hides behind Chroma's. On a CUDA GPU the task's thread itself queues the
next micro-batch on the GPU before it commits the current one, and collects the vectors
after: Chroma's upsert holds the GIL while its Rust threads work, so a second thread
feeding the GPU op by op waited on every commit (on an H100 it reached 197 chunks/s
against a bare loop's 267). With an embedder that computes at once and leaves the cores
free (``hash:``), a second thread embeds the next micro-batch meanwhile. Where the model
itself keeps every core busy (torch on a CPU), they take turns, as a bare loop does: the
model could not go on during an upsert anyway, and the two competing for the cores cost
more than they hid (on 2 cores the writer burned 370 s of CPU over 4,003 chunks against
313 taking turns, its model threads spinning while a core was taken). Never more than
one micro-batch is being embedded, so a kill still wastes at most one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from pipeline import alerts
from pipeline.batches import batched, longest_first
from pipeline.collection import held
from pipeline.config import Config
from pipeline.embedder import Embedder, load_embedder, model_identity
from pipeline.errors import ForgedPayloadError, IndexqError, StoreError, first_line
from pipeline.faults import fault_point
from pipeline.guards import ResourceGuard, check_vector, clean_metadata, clean_text
from pipeline.heap import HeapTrimmer
from pipeline.intake import Intake
from pipeline.ledger import Ledger
from pipeline.locks import CommitLock
from pipeline.metrics import COMMIT_SECONDS, EMBED_SECONDS, REFUSED_PAYLOADS
from pipeline.progress import Publisher
from pipeline.rows import DELETING, EMBEDDED, PENDING, Row
from pipeline.state import WriterState
from pipeline.store import Store

logger = logging.getLogger(__name__)


def _refusal_types() -> tuple[type[BaseException], ...]:
    from chromadb.errors import InvalidArgumentError

    return (ValueError, TypeError, InvalidArgumentError)


# What Chroma raises for a record it will never accept (as opposed to I/O trouble,
# which is retried by the task and, failing that, by the next requeue).
_REFUSALS = _refusal_types()


def no_database(config: Config) -> bool:
    """Whether the data home's Chroma is a local directory without its database yet (a
    server always has one)."""
    return config.chroma_url is None and not (config.chroma_dir / "chroma.sqlite3").exists()


def open_store(config: Config, ledger: Ledger | None = None) -> Store:
    """The data home's Chroma, made if there is none yet. A local directory without its
    database while the ledger holds committed chunks (a restore killed before it copied, a
    directory removed) is a StoreError: made afresh, a writer would fill an empty directory
    and searches would see only its new chunks, until a check found the rest missing."""
    if no_database(config) and (committed := _committed(config, ledger)):
        raise StoreError(
            f"the Chroma directory {config.chroma_dir} has no database, but the ledger holds"
            f" {committed:,} committed chunks",
            hint="run `indexq recover`: it restores the newest backup or rebuilds from the ledger",
        )
    try:
        return Store.open(config)
    except IndexqError:  # a server that does not answer, a process forked from a Chroma one: as they are
        raise
    except Exception as exc:  # Chroma refusing its own directory is damage, said plainly
        raise StoreError(
            f"cannot open Chroma at {config.chroma_shown}: {first_line(exc)}",
            hint="run `indexq check` and `indexq recover`",
        ) from exc


def _committed(config: Config, ledger: Ledger | None) -> int:
    if ledger is not None:
        return ledger.committed_count()
    if not config.ledger_path.exists():
        return 0
    opened = Ledger(config.ledger_path)
    try:
        return opened.committed_count()
    finally:
        opened.close()


def read_generation(config: Config) -> str | None:
    try:
        return config.generation_path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _generation_stamp(config: Config) -> tuple[int, int] | None:
    """(inode, mtime) of the generation file: a restore renames a new file into place, so
    a stat per commit tells the writer all it needs, without reading the file."""
    try:
        info = os.stat(config.generation_path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns


class Writer:
    def __init__(self, config: Config, embedder: Embedder | None = None, stop: threading.Event | None = None) -> None:
        self.config = config
        self.ledger = Ledger(config.ledger_path)
        self.embedder = embedder or load_embedder(config.model, config.device, config.precision)
        # The micro-batch of the device the model runs on, unless one was set.
        self.micro_batch = config.micro_batch_for(self.embedder.device)
        self.commit_lock = CommitLock(config.commit_lock_path)
        # Opened under the commit lock: a recovery that is swapping the directory
        # finishes first.
        with self.commit_lock.held():
            self.store = open_store(config, self.ledger)
            self._generation = read_generation(config)
            self._stamp = _generation_stamp(config)
        # Published when the writer starts serving (WriterHuey) and on each change of guard state.
        self.state = WriterState(config)
        settings = self.state.state["settings"]
        settings["device"] = self.embedder.device  # the one in use, not the one asked for
        settings["micro_batch"] = self.micro_batch
        settings["precision"] = getattr(self.embedder, "precision", config.precision)
        # The one thread that runs the model, while the task's thread commits or waits for it
        # (see the module's docstring).
        self._embedding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="indexq-embed")
        self.overlap = not self.embedder.cpu_bound
        settings["overlap"] = self.overlap
        turns = "overlaps" if self.overlap else "takes turns with"
        how = ", queued from the committing thread" if self.embedder.launches else ""
        logger.info("embedding %s the commits (model on %s%s)", turns, self.embedder.device, how)
        self.guard = ResourceGuard(
            config.chroma_dir, config.memory_threshold, config.min_free_mb, on_change=self.state.guard_changed
        )
        self.stop = stop or threading.Event()
        # Set with a shared queue: job progress is published there for remote producers.
        self.publisher: Publisher | None = None
        # The model's freed tensors handed back to the kernel every few seconds (glibc).
        self.heap = HeapTrimmer()
        # Collections found to hold this model's vectors (or none yet): checked once each.
        self._claimed: set[str] = set()

    def publish(self, jobs: set[str]) -> None:
        """Mark jobs whose progress changed, for the publisher (remote producers only)."""
        if self.publisher is not None:
            self.publisher.mark(jobs)

    def index(self, collection: str, ids: Sequence[str]) -> int:
        """Embed and commit those of ``ids`` still outstanding; returns how many were committed."""
        with self._publishing(collection, ids):
            committed = self._index(collection, ids)
            self.withdraw_failed(collection)
            return committed

    def withdraw_failed(self, collection: str | None = None, wait: bool = True) -> int:
        """Delete from Chroma the older text of each chunk whose new text failed (a file
        edited, then its chunk refused; ``Ledger.failed_after_a_commit``): Chroma must not
        answer searches with text the files no longer have, nor hold what a rebuild from the
        ledger would not. A chunk that failed on new metadata keeps its current text there.
        Chroma first, then the ledger, so a kill in between only repeats the delete (at the
        next task, start or requeue round). ``wait=False`` (the start, the requeue round): best
        effort, stopping while a guard holds commits, and an error is logged, never raised."""
        if not wait:
            try:
                return self._withdraw_failed(collection, wait)
            except Exception as exc:
                logger.warning("failed chunks not withdrawn from Chroma (tried again later): %s", first_line(exc))
                return 0
        return self._withdraw_failed(collection, wait)

    def _withdraw_failed(self, collection: str | None, wait: bool) -> int:
        done = 0
        for name, ids in self.ledger.failed_after_a_commit(collection).items():
            for group in batched(ids, self.config.commit_batch):
                if not wait and self.guard.problem() is not None:
                    return done
                if not self.guard.wait_until_clear(self.stop):
                    return done
                with self.commit_lock.held():
                    self._follow_restore()
                    self.store.delete(name, group)
                    self.ledger.withdrawn(name, group)
                done += len(group)
            logger.warning(
                "%d failed chunks of %s withdrawn from Chroma: it held their text from before the change that failed",
                len(ids), name,
            )  # fmt: skip
        return done

    @contextlib.contextmanager
    def _publishing(self, collection: str, ids: Sequence[str]) -> Iterator[None]:
        """Mark the jobs of ``ids`` for the publisher once the block is done (jobs read before it:
        a delete removes the rows that name them)."""
        jobs = self.ledger.jobs.of_chunks(collection, ids) if self.publisher is not None else set()
        try:
            yield
        finally:
            self.publish(jobs)

    def _index(self, collection: str, ids: Sequence[str]) -> int:
        if not self._holds_this_model(collection, ids):
            return 0
        # Vectors of another model must never reach the collection: embedded again here.
        for other, n in self.ledger.drop_foreign_embeddings(collection, ids, self.embedder.name).items():
            logger.warning(
                "%d chunks of %s were embedded with %r, not this writer's %r: embedding them again",
                n, collection, other, self.embedder.name,
            )  # fmt: skip
        rows = self._longest_first(self._valid(collection, self.ledger.load(collection, ids, (PENDING, EMBEDDED))))
        # Waves of one micro-batch, in that order: rows embedded before (a resumed task) first.
        waves = list(batched(rows, self.micro_batch))
        committed = 0
        ready: list[Row] = []
        embedding: Future[None] | _Launched | None = None
        try:
            for n, wave in enumerate(waves):
                if n == 0 and not self.stop.is_set():
                    embedding = self._embed_later(collection, wave)
                if embedding is not None:
                    embedding.result()  # this wave's embeddings are stored (or it raised)
                    embedding = None
                # The next wave embeds while this one commits, or once it is committed.
                ahead = waves[n + 1] if n + 1 < len(waves) else None
                if ahead is not None and self.overlap and not self.stop.is_set():
                    embedding = self._embed_later(collection, ahead)
                # Full groups only: the rest waits for the next wave (it is stored, nothing
                # is lost by a kill), so upserts carry commit_batch records, not a wave's tail.
                ready += [r for r in wave if r.state == EMBEDDED]
                last = n + 1 == len(waves)
                cut = len(ready) if last else len(ready) - len(ready) % self.config.commit_batch
                done, stopped = self._commit_wave(collection, ready[:cut])
                committed += done  # a stop mid-wave keeps the groups committed before it
                if stopped:
                    break
                ready = ready[cut:]
                if ahead is not None and not self.overlap and not self.stop.is_set():
                    embedding = self._embed_later(collection, ahead)
        except BaseException:
            # Never leave the model running past the task; the first error is the one raised.
            if isinstance(embedding, Future):
                wait([embedding])
            elif embedding is not None:
                with contextlib.suppress(Exception):
                    embedding.result()
            raise
        if embedding is not None:
            embedding.result()  # a stop waits for the micro-batch in hand: its rows are stored
        if self.stop.is_set() and committed < len(rows):
            logger.info("stopping with chunks of %s left for the next start", collection)
        return committed

    def _longest_first(self, rows: list[Row]) -> list[Row]:
        """Rows embedded before first (they only need committing), then the pending ones by the
        model's length of their text, longest first, ties in the task's order.

        A forward pass pads its texts to the longest among them, and a task in the order of
        its files mixes full chunks with the short last chunks of files: on the benchmark's
        corpus, 13.8 % of the tokens the model computed were padding, 1.3 % in this order
        (``python -m ops.tools.padding``), for 0.18 ms of tokenizing a chunk here. A
        micro-batch is still the most a kill can waste, and which rows are committed is still
        the ledger's to say, whatever the order they went in.
        """
        pending = [r for r in rows if r.state == PENDING]
        if len(pending) < 2:
            return rows
        order = longest_first(self.embedder.lengths([r.text for r in pending]))
        return [r for r in rows if r.state != PENDING] + [pending[i] for i in order]

    def _embed_later(self, collection: str, wave: Sequence[Row]) -> Future[None] | _Launched | None:
        """Embed the pending rows of ``wave``: queued on the GPU from this thread where the model
        launches, else on the embedding thread; ``result()`` stores them. None if it has none."""
        pending = [r for r in wave if r.state == PENDING]
        if not pending:
            return None
        if self.embedder.launches:
            return _Launched(self._embed(collection, pending))
        return self._embedding.submit(lambda: self._embed(collection, pending)())

    def _commit_wave(self, collection: str, ready: Sequence[Row]) -> tuple[int, bool]:
        """Commit embedded rows in groups of ``commit_batch``: (how many were committed, whether
        a stop came before the last group)."""
        committed = 0
        for group in batched(ready, self.config.commit_batch):
            if not self.guard.wait_until_clear(self.stop):
                return committed, True
            committed += self._commit_or_refuse(collection, group)
        return committed, False

    def ingest(self, intake: Intake, key: str) -> tuple[str, list[str], list[str]] | None:
        """Record an intake part in the ledger, then drop it from the intake: (collection, to index, stale).

        None when there is nothing to do: the part was ingested already, or it was
        refused (not signed with this queue's key), which is logged and raised as an alert.
        """
        try:
            part = intake.read(key)
        except ForgedPayloadError as exc:
            REFUSED_PAYLOADS.labels("intake").inc()
            aside = intake.reject(key)
            logger.error("refused intake part %s: %s; nothing was recorded, it was kept as %s", key, exc, aside)
            alerts.raise_alert(self.config, self.ledger, f"refused intake part {key}: {exc} (kept as {aside})")
            return None
        if part is None:
            return None
        if model_identity(part.get("model", self.config.model)) != model_identity(self.config.model):
            # Chunked for another model's tokenizer (no writer was running to check it
            # against): indexed all the same, but chunks may exceed this model's limit.
            logger.warning(
                "intake part %s was chunked for %r, this writer embeds with %r", key, part["model"], self.config.model
            )
        if self.publisher is not None:
            # Jobs whose rows this part takes over (a stale chunk written again) change too.
            ids = [c["id"] for entry in part["files"] for c in entry["chunks"]]
            self.publish(self.ledger.jobs.of_chunks(part["collection"], ids) | {part["job"]})
        work = self.ledger.sources.ingest(key, part, self.config.model)
        # Only now: a kill before this line leaves the part in the intake, to be ingested again.
        intake.remove(key)
        if work is None:
            # Recorded by an ingest that died before it enqueued the work (a kill, or
            # the queue away): enqueue again whatever of the part is still outstanding.
            work = self.ledger.sources.outstanding_of(part)
            logger.info("intake part %s was already recorded; %d chunks still outstanding", key, sum(map(len, work)))
            if not any(work):
                return None
            return part["collection"], *work
        to_index, stale = work
        self.publish({part["job"]})
        logger.info(
            "job %s: recorded part %s from %s (%d chunks to index, %d stale)",
            part["job"], key.rsplit(".", 1)[-1], part.get("host", "?"), len(to_index), len(stale),
        )  # fmt: skip
        return part["collection"], to_index, stale

    def _commit_or_refuse(self, collection: str, group: Sequence[Row]) -> int:
        """Commit a group; if Chroma refuses it, commit its rows one by one and fail the refused ones.

        A record Chroma will never accept must not hold its neighbours back forever.
        """
        try:
            self._commit(collection, group)
            return len(group)
        except _REFUSALS as exc:
            if len(group) == 1:
                logger.error("chunk %s of %s refused by Chroma: %s", group[0].id, collection, exc)
                self.ledger.fail(collection, [(group[0].id, group[0].hash, f"refused by Chroma: {first_line(exc)}")])
                return 0
        return sum(self._commit_or_refuse(collection, [row]) for row in group)

    def _holds_this_model(self, collection: str, ids: Sequence[str]) -> bool:
        """Whether ``collection`` holds this writer's model's vectors, or none yet (then it is
        recorded as this model's). Where it holds another's, the task's outstanding rows
        are failed, saying which: two models' vectors in one collection rank nonsense, and
        a resubmission with the right writer running tries them again."""
        if collection in self._claimed:
            return True
        other = self.ledger.sources.claim_model(collection, self.embedder.name)
        if other is None:
            self._claimed.add(collection)
            return True
        reason = f"collection {collection} holds vectors of {held(other)}; this writer embeds with {self.embedder.name}"
        rows = self.ledger.load(collection, ids, (PENDING, EMBEDDED))
        logger.error("%s: %d chunks failed (index into a new collection, or run the writer with that model)",
                     reason, len(rows))  # fmt: skip
        self.ledger.fail(collection, [(r.id, r.hash, reason) for r in rows])
        return False

    def _valid(self, collection: str, rows: list[Row]) -> list[Row]:
        good: list[Row] = []
        refused: list[tuple[str, str, str]] = []
        for row in rows:
            row.text = clean_text(row.text)
            try:
                row.metadata = clean_metadata(row.metadata)
            except ValueError as exc:
                refused.append((row.id, row.hash, str(exc)))
                continue
            if not row.text.strip():
                refused.append((row.id, row.hash, "empty text"))
                continue
            good.append(row)
        if refused:
            for id_, _, reason in refused:
                logger.error("chunk %s of %s refused: %s", id_, collection, reason)
            self.ledger.fail(collection, refused)
        return good

    def _embed(self, collection: str, batch: Sequence[Row]) -> Callable[[], None]:
        """Count the attempt, then start the model on ``batch``; what it returns waits for the
        vectors and stores them."""
        self.ledger.begin_embedding(collection, [r.id for r in batch])
        started = time.perf_counter()
        vectors_of = self.embedder.start([r.text for r in batch])
        launching = time.perf_counter() - started

        def store() -> None:
            waited = time.perf_counter()
            vectors = vectors_of()
            EMBED_SECONDS.observe(launching + time.perf_counter() - waited)  # the model's time on this side
            self._store(collection, batch, vectors)

        return store

    def _store(self, collection: str, batch: Sequence[Row], vectors: np.ndarray) -> None:
        stored: list[tuple[str, str, bytes]] = []
        refused: list[tuple[str, str, str]] = []
        for row, vector in zip(batch, vectors, strict=True):
            reason = check_vector(vector, self.embedder.dimension)
            if reason:
                refused.append((row.id, row.hash, reason))
                continue
            row.embedding = vector.astype(np.float32).tobytes()
            row.state = EMBEDDED
            stored.append((row.id, row.hash, row.embedding))
        self.ledger.store_embeddings(collection, stored, self.embedder.name)
        if refused:
            self.ledger.fail(collection, refused)
        logger.debug("embedded %d chunks of %s", len(stored), collection)

    def _commit(self, collection: str, group: Sequence[Row]) -> int:
        fault_point("writer-commit")
        # Chroma and the ledger change together under the commit lock, so a backup
        # that holds it sees them agree.
        with COMMIT_SECONDS.time(), self.commit_lock.held():
            self._follow_restore()
            self.store.upsert_rows(collection, group)
            seq = self.ledger.checkpoint(collection, [(r.id, r.hash, r.metadata_json) for r in group])
        logger.debug("commit %d: %d chunks of %s", seq, len(group), collection)
        return seq

    def _follow_restore(self) -> None:
        """Reopen Chroma if a recovery replaced the directory since the last commit."""
        stamp = _generation_stamp(self.config)
        if stamp == self._stamp:
            return
        generation = read_generation(self.config)
        if generation != self._generation:
            logger.warning("the Chroma directory was restored (generation %s): reopening it", generation)
            # Taken as followed only once reopened: a directory a killed recovery left without
            # its database is refused at every commit, not written through the old client.
            self.store = open_store(self.config, self.ledger)
            self._generation = generation
        self._stamp = stamp

    def delete(self, collection: str, ids: Sequence[str]) -> int:
        """Remove stale chunks from Chroma, then from the ledger."""
        with self._publishing(collection, ids):
            return self._delete(collection, ids)

    def _delete(self, collection: str, ids: Sequence[str]) -> int:
        rows = self.ledger.load(collection, ids, (DELETING,))
        done = 0
        for group in batched([r.id for r in rows], self.config.commit_batch):
            if not self.guard.wait_until_clear(self.stop):
                break
            with self.commit_lock.held():
                self._follow_restore()
                self.store.delete(collection, group)
                self.ledger.forget(collection, group)
            done += len(group)
        return done

    def close(self) -> None:
        self._embedding.shutdown(wait=True)
        self.heap.close()
        if self.publisher is not None:
            self.publisher.close()
        self.ledger.close()
        self.commit_lock.close()


class _Launched:
    """A micro-batch queued on the GPU by the committing thread: ``result`` waits for its
    vectors and stores them (once), as a Future of the embedding thread would."""

    def __init__(self, store: Callable[[], None]) -> None:
        self._store: Callable[[], None] | None = store

    def result(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store()
