"""The Python API for scripts: submit, wait, status, search, resume.

Every function takes an optional ``config``; without one, ``Config.from_env()`` is used
(``INDEXQ_HOME`` and friends). Errors are the ``pipeline.errors`` classes. Those that may
create files in the data home do so with a private umask (0600 files, 0700 folders).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import operator
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psutil

from pipeline.config import DEFAULT_STATUS_JOBS, MAX_SEARCH_RESULTS, MAX_STATUS_JOBS, Config, private_umask
from pipeline.errors import (
    BadInputError,
    ConfigError,
    IndexqError,
    NotFoundError,
    StoreError,
    UnreachableError,
    first_line,
)
from pipeline.ids import validate_collection
from pipeline.jobs import JobProgress, poll_interval
from pipeline.ledger import Ledger
from pipeline.locks import writer_alive
from pipeline.producer import Producer
from pipeline.queue import QueueClient
from pipeline.state import live_state, read_state

if TYPE_CHECKING:
    from pipeline.embedder import Embedder

# How often wait() looks at the ledger at most (a big job less often: jobs.poll_interval).
POLL_SECONDS = 0.5
# On the writer's machine wait() sees a job end without counting it (Jobs.running), so its
# counts, for the progress bar only, may cost less: at most 1 % of one core.
WAIT_COUNT_FACTOR = 100
# A producer following its job through a shared queue waits this long for a Redis that
# stopped answering (a restart) before it gives up with exit 5; the job goes on meanwhile.
WAIT_UNREACHABLE_SECONDS = 120.0


def _config(config: Config | None) -> Config:
    if config is None:
        return Config.from_env()
    if not isinstance(config, Config):
        raise ConfigError(
            f"config must be a pipeline.Config, got {type(config).__name__}",
            hint="Config.from_env(), or Config(home=...); None reads INDEXQ_* from the environment",
        )
    return config


def _flag(value: Any, name: str) -> bool:
    """A yes/no argument: ``prune="false"`` is a string, and truthy (it pruned)."""
    if not isinstance(value, bool):
        raise BadInputError(f"{name} must be True or False, got {value!r}")
    return value


def _whole(value: Any, name: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` (numpy's integers too; not a bool or a string)."""
    try:
        whole = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        whole = None
    if whole is None or not low <= whole <= high:
        raise BadInputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return whole


@private_umask()
def submit_paths(
    paths: Sequence[str | os.PathLike[str]], collection: str, include: Sequence[str] = (),
    exclude: Sequence[str] = (), config: Config | None = None, prune: bool = False, follow_symlinks: bool = False,
) -> str:  # fmt: skip
    """Index files and directories (recursively) into ``collection``; returns the job id.

    ``prune`` removes the chunks of files indexed from under ``paths`` that no longer
    exist; ``follow_symlinks`` follows symlinks that lead outside ``paths``.
    """
    cfg = _config(config)
    prune, follow_symlinks = _flag(prune, "prune"), _flag(follow_symlinks, "follow_symlinks")
    producer = Producer(cfg)
    try:
        return producer.submit_paths(paths, collection, include, exclude, prune, follow_symlinks).job
    finally:
        producer.close()


@private_umask()
def submit_records(
    records: Iterable[Any], collection: str, source: str = "records", config: Config | None = None
) -> str:
    """Index records ``{"id"?, "text", "metadata"?}``; returns the job id.

    LangChain ``Document`` and LlamaIndex ``Document``/``TextNode`` objects are taken as
    they are (their id, text and metadata; a node's ``ref_doc_id`` as ``document_id``).
    A record without an id is identified by ``source`` and its text.
    """
    cfg = _config(config)
    if not isinstance(source, str) or not source.strip():
        raise BadInputError(f"source must be a non-empty string, got {source!r}")
    producer = Producer(cfg)
    try:
        return producer.submit_records(records, collection, source).job
    finally:
        producer.close()


@private_umask()
def submit_jsonl(path: str | os.PathLike[str], collection: str, config: Config | None = None) -> str:
    """Index a JSONL file of records; returns the job id."""
    cfg = _config(config)
    if not isinstance(path, (str, os.PathLike)):
        raise BadInputError(f"path must be a string or a path, got {type(path).__name__}")
    producer = Producer(cfg)
    try:
        return producer.submit_jsonl(path, collection).job
    finally:
        producer.close()


def _existing_ledger(config: Config) -> Ledger:
    config.require_home()
    return Ledger(config.ledger_path)


def _remote_progress(cfg: Config, job_id: str, queue: Any = None) -> JobProgress | None:
    """A job's progress as the writer published it in the shared queue (None: not received yet)."""
    queue = queue or QueueClient(cfg)
    value = queue.intake.progress(job_id)
    if value is None:
        return None
    # Only the fields this version knows: a writer of another version may publish more.
    fields = {f.name for f in dataclasses.fields(JobProgress)}
    return JobProgress(**{k: v for k, v in value.items() if k in fields})


def job(job_id: str, config: Config | None = None) -> JobProgress:
    cfg = _config(config)
    if cfg.remote_producers:
        progress = _remote_progress(cfg, job_id)
        if progress is None:
            raise NotFoundError(
                f"the writer has not published job {job_id!r}",
                hint="it has not received any part of it yet; is the writer running?",
            )
        return progress
    ledger = _existing_ledger(cfg)
    try:
        progress = ledger.jobs.progress(job_id)
    finally:
        ledger.close()
    if progress is None:
        raise NotFoundError(f"no job {job_id!r}", hint="indexq status lists the jobs")
    return progress


def failure_reasons(job_id: str, config: Config | None = None) -> list[tuple[str, int]]:
    """(reason, chunks) for the failed chunks of a job of this data home, the most frequent
    first (a few); none for a job submitted to a writer elsewhere."""
    cfg = _config(config)
    if cfg.remote_producers:
        return []
    ledger = _existing_ledger(cfg)
    try:
        return ledger.jobs.failure_reasons(job_id)
    finally:
        ledger.close()


def _say(progress: bool, line: str) -> None:
    """A line for whoever follows a job: on stderr beside its progress bar, else to the log."""
    if progress:
        print(line, file=sys.stderr)
    else:
        logging.getLogger(__name__).warning("%s", line)


def wait(
    job_id: str, config: Config | None = None, timeout: float | None = None, progress: bool = False
) -> JobProgress:
    """Block until every chunk of the job is committed (or failed); returns its progress.

    With ``timeout``, returns the progress so far when it expires. With a shared queue
    (a producer on another machine) the progress is what the writer publishes there;
    a job it has not received yet is waited for rather than unknown.
    """
    cfg = _config(config)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 <= timeout < float("inf")
    ):
        raise BadInputError(f"timeout must be None or a number of seconds, 0 or more, got {timeout!r}")
    remote = cfg.remote_producers
    queue = QueueClient(cfg) if remote else None
    ledger = None if remote else _existing_ledger(cfg)
    bar = None
    warned = False
    deadline = None if timeout is None else time.monotonic() + timeout
    state: JobProgress | None = None
    count_at = 0.0  # when the job is counted next (the bar's figures); done is seen sooner
    lost: float | None = None  # since when the shared queue has not answered
    lost_said = False
    serving: Any = True
    try:
        while True:
            now = time.monotonic()
            if ledger is not None and state is not None and now < count_at and (deadline is None or now < deadline):
                # Between counts, only whether it is still running: nothing to report yet.
                if ledger.jobs.running(job_id):
                    time.sleep(POLL_SECONDS)
                    continue
            counting = time.perf_counter()
            if queue is None:
                state = ledger.jobs.progress(job_id) if ledger is not None else None
            else:
                try:
                    with queue.reaching():
                        state = _remote_progress(cfg, job_id, queue)
                        serving = queue.serving_writer() if progress and not warned else True
                except UnreachableError as exc:
                    # A Redis restart: the job goes on meanwhile (the writer requeues what it
                    # lost), so wait it out; one that stays away ends the wait (exit 5).
                    lost = lost if lost is not None else time.monotonic()
                    if time.monotonic() - lost > WAIT_UNREACHABLE_SECONDS or (
                        deadline is not None and time.monotonic() >= deadline
                    ):
                        raise
                    if not lost_said:
                        lost_said = True
                        _say(progress, f"{exc}; waiting up to {WAIT_UNREACHABLE_SECONDS:.0f} s for it")
                    time.sleep(POLL_SECONDS)
                    continue
                if lost_said:
                    _say(progress, f"the queue at {cfg.queue_shown} answers again")
                lost, lost_said = None, False
            counted = time.perf_counter() - counting
            count_at = time.monotonic() + poll_interval(POLL_SECONDS, counted, WAIT_COUNT_FACTOR)
            if state is None and not remote:
                raise NotFoundError(f"no job {job_id!r}", hint="indexq status lists the jobs")
            if progress and state is not None:
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=state.chunks, unit="chunk", desc=job_id, file=sys.stderr, dynamic_ncols=True)
                bar.total = state.chunks
                # The figures first: update() draws the bar, with whatever postfix it has then.
                bar.set_postfix(pending=state.pending, failed=state.failed, refresh=False)
                bar.update(state.committed + state.failed - bar.n)
            timed_out = deadline is not None and time.monotonic() >= deadline
            # An abandoned submission (its producer died) never completes: re-run it.
            if state is not None and (state.state in ("done", "failed", "abandoned") or timed_out):
                return state
            if timed_out:
                raise NotFoundError(f"the writer has not received job {job_id!r} yet", hint="is the writer running?")
            if progress and not warned:
                if queue is not None and serving is None:
                    warned = True
                    print(f"waiting for a writer: none serves {cfg.queue_shown} (start one with `indexq worker`)",
                          file=sys.stderr)  # fmt: skip
                elif queue is None and writer_alive(cfg.writer_lock_path) is None:
                    warned = True
                    print(f"waiting for a writer: none is running on {cfg.home} (start one with `indexq worker`)",
                          file=sys.stderr)  # fmt: skip
            # A remote job is counted where the writer publishes it: as often as it is counted.
            pause = POLL_SECONDS if ledger is not None else poll_interval(POLL_SECONDS, counted)
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)
    finally:
        if bar is not None:
            bar.close()
        if ledger is not None:
            ledger.close()


@private_umask()
def status(config: Config | None = None, jobs: int = DEFAULT_STATUS_JOBS) -> dict[str, Any]:
    """Jobs, queue depth, writer, commits, memory and disk, as a JSON-ready dict."""

    cfg = _config(config)
    jobs = _whole(jobs, "jobs", 0, MAX_STATUS_JOBS)
    if not cfg.remote_producers:
        cfg.require_home()  # a mistyped home is said so, not made
    cfg.ensure_home()
    if cfg.remote_producers and not cfg.ledger_path.exists():
        # A producer's machine: no ledger here, only the queue and what its writer publishes there.
        queue = QueueClient(cfg)
        info = _queue_info(cfg, queue)
        with queue.reaching():
            lease = queue.serving_writer()
            state = live_state(queue.serving_writer_state(), lease)
        return {"home": str(cfg.home), "producer_only": True, **info, "writer": _writer_info(lease, state)}
    ledger = Ledger(cfg.ledger_path)
    try:
        holder = writer_alive(cfg.writer_lock_path)
        writer = _writer_info(holder, read_state(cfg, holder))
        # The thresholds the running writer applies, not this process's defaults.
        applied = writer.get("settings") or {}
        progress = [p for p in (ledger.jobs.progress(j) for j in ledger.jobs.recent(jobs)) if p is not None]
        commits = ledger.commit_stats()
        memory = psutil.virtual_memory()
        disk = shutil.disk_usage(cfg.chroma_dir if cfg.chroma_engine == "persistent" else cfg.home)
        return {
            "home": str(cfg.home),
            "chroma": cfg.chroma_shown,
            **_queue_info(cfg),
            "writer": writer,
            "last_commit": commits["last_commit"],
            "recent_rate": round(commits["recent_rate"], 2),
            "chunks": ledger.counts(),
            "embeddings_total": ledger.embeddings_total(),
            "embedded_more_than_once": ledger.embedded_more_than_once(),
            "memory": {"percent": memory.percent, "threshold": applied.get("memory_threshold", cfg.memory_threshold)},
            "disk": {"free_mb": disk.free // 2**20, "min_free_mb": applied.get("min_free_mb", cfg.min_free_mb)},
            "jobs": [p.as_dict() for p in progress],
            **_maintenance(cfg, ledger),
        }
    finally:
        ledger.close()


def _writer_info(holder: dict[str, Any] | None, state: dict[str, Any] | None) -> dict[str, Any]:
    """Alive or not (pid, host, since), and what the live writer published: its effective
    settings and ``guard`` (None, or which guard holds commits back, since when, value and limit)."""
    info: dict[str, Any] = {"alive": holder is not None}
    info.update({k: holder[k] for k in ("pid", "host", "since") if holder and k in holder})
    if holder is not None:
        info["settings"] = state["settings"] if state else None
        info["guard"] = state["guard"] if state else None
    return info


def _queue_info(cfg: Config, queue: Any = None) -> dict[str, Any]:
    """Engines in use, queue depth and intake parts waiting (raises UnreachableError)."""
    queue = queue or QueueClient(cfg)
    queue.ping()
    return {
        "engines": {
            "queue": cfg.queue_engine,
            "queue_at": cfg.queue_shown,
            "chroma": cfg.chroma_engine,
            "chroma_at": cfg.chroma_shown,
        },
        "queue_depth": queue.pending_count(),
        "intake_parts": len(queue.intake.keys()),
    }


def _maintenance(config: Config, ledger: Ledger) -> dict[str, Any]:
    """Last backup, check and recovery, and the alerts of the last day."""
    from ops.backup import list_backups
    from ops.maintenance import last_check

    backups = list_backups(config)
    newest = backups[-1] if backups else None
    verified = [b for b in backups if b["verified"]]
    return {
        "last_backup": newest and {
            "name": newest["name"], "time": newest["time"], "age_seconds": round(time.time() - newest["time"]),
            "verified": newest["verified"], "pause_seconds": newest["pause_seconds"],
        },
        "newest_verified_backup": verified[-1]["name"] if verified else None,
        "last_check": last_check(config, ledger),
        "last_recovery": ledger.events.last("recovery"),
        "alerts": [{k: a[k] for k in ("time", "summary")} for a in ledger.events.since("alert", time.time() - 86400)],
    }  # fmt: skip


# The query model of this process: (model, device, precision, runtime, export folder) -> it.
_query_embedders: dict[tuple[str, ...], Embedder] = {}
_query_embedders_lock = threading.Lock()


def _query_embedder(cfg: Config, precision: str) -> Embedder:
    """The model for this process's queries, loaded on the first and kept for the next
    (ONNX Runtime on a CPU in fp32, or int8 with INDEXQ_QUERY_RUNTIME=onnx-int8, or torch; pipeline.queryembed)."""
    from pipeline.queryembed import load_query_embedder, query_precision

    precision = query_precision(precision, cfg.device)
    key = (cfg.model, cfg.device, precision, cfg.query_runtime, str(cfg.models_path))
    with _query_embedders_lock:
        embedder = _query_embedders.get(key)
        if embedder is None:
            embedder = load_query_embedder(
                cfg.model, cfg.device, precision, cfg.models_path, cfg.query_runtime, cfg.min_free_mb
            )
            _query_embedders.clear()  # one model kept: a script that changes settings frees the old
            _query_embedders[key] = embedder
        return embedder


@private_umask()
def search(text: str, collection: str, k: int = 5, config: Config | None = None) -> list[dict[str, Any]]:
    """The ``k`` chunks nearest to ``text``: id, distance, document, metadata."""
    from pipeline.embedder import is_hash_model, model_identity
    from pipeline.guards import unicode_problem
    from pipeline.locks import CommitLock
    from pipeline.queryserver import ask
    from pipeline.writer import no_database, open_store

    if not isinstance(text, str):
        raise BadInputError(f"the search text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadInputError("the search text is empty", hint="search for some words")
    validate_collection(collection)
    if (problem := unicode_problem(text)) is not None:
        raise BadInputError(
            f"the search text {problem}",
            hint="search with UTF-8 text (a command line's byte of another encoding reads as '\\udc80' to '\\udcff')",
        )
    k = _whole(k, "k", 1, MAX_SEARCH_RESULTS)
    cfg = _config(config)
    ledger = _existing_ledger(cfg)
    try:  # a query embedded by another model than the collection's ranks nonsense
        ledger.sources.check_model(collection, cfg.model)
        # Nothing committed and no database: said so, no directory made. With chunks committed,
        # a missing database is judged under the commit lock (a recovery renames it meanwhile).
        if no_database(cfg) and not ledger.committed_count():
            raise NotFoundError(f"no collection {collection!r} in {cfg.chroma_shown}")
    finally:
        ledger.close()
    # The running writer embeds the query with the model it holds (no torch imported
    # here, no second copy of the model); with no writer to ask, the model is loaded here.
    # In fp32, or bf16 when that is the setting (fp16 is for a GPU's bulk work; a hash: model
    # has no precision).
    precision = "bf16" if cfg.precision == "bf16" and not is_hash_model(cfg.model) else "fp32"
    # Opening Chroma from a second process is only safe while the writer is between
    # commits: the commit lock is held for the open and the query (milliseconds). Its files
    # are opened first, so that a data home that cannot be written fails before a model loads.
    lock = CommitLock(cfg.commit_lock_path)
    try:
        # The model as one spelling: a relative path means this process's folder, not the writer's.
        vector = ask(cfg.query_socket_path, text, model_identity(cfg.model), cfg.device, precision)
        if vector is None:
            vector = _query_embedder(cfg, precision).embed([text])[0]
        with lock.held(timeout=cfg.lock_timeout):
            store = open_store(cfg)
            try:
                if not store.exists(collection):
                    raise NotFoundError(f"no collection {collection!r} in {store.where}")
                return store.query(collection, vector, k)
            except IndexqError:
                raise
            except Exception as exc:  # a model of another dimension, or a damaged directory
                raise StoreError(
                    f"search in {collection!r} failed: {first_line(exc)}",
                    hint="use the model the collection was indexed with; `indexq check` tells damage",
                ) from exc
            finally:
                store.close()
    finally:
        lock.close()


@private_umask()
def resume(config: Config | None = None) -> int:
    """Enqueue every outstanding chunk again; returns the number of tasks enqueued."""
    queue = QueueClient(_config(config))
    with queue.reaching():  # a Redis that does not answer: exit 5, not a traceback
        return queue.requeue()
