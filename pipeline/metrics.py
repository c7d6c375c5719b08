"""Prometheus metrics of the writer and the maintenance consumer.

Served over HTTP by ``serve`` when ``metrics_port`` is set. Most figures are read from
the ledger at scrape time, through a read-only connection in one read transaction:
counts by state, the per-collection counters the ledger keeps in ``meta``, the events
of backups, checks, recoveries and alerts. A restarted process therefore reports the
same totals as the one before it. What only the running process knows is measured in
it: commit and embedding latency, refused payloads, the guard state, the model's device.

The writer serves what concerns indexing; the maintenance consumer what concerns
backups, checks, recovery and alerts, and whether a writer holds the data home. No
ledger figure is served by both (``indexq_writer_up``, a gauge, aside; refused payloads
and scrape errors are each process's own), so a sum across targets never counts twice.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import logging
import shutil
import socket
import socketserver
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psutil
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from pipeline.config import Config
from pipeline.embedder import Embedder
from pipeline.errors import ConfigError, first_line
from pipeline.locks import writer_alive
from pipeline.rows import COMMITTED, DELETING, EMBEDDED, FAILED, OUTSTANDING, PENDING
from pipeline.state import WriterState

logger = logging.getLogger(__name__)

WRITER, MAINTENANCE = "writer", "maintenance"
STATES = (PENDING, EMBEDDED, COMMITTED, DELETING, FAILED)
# The per-collection counters of the ledger's meta table (key "KIND:COLLECTION").
TALLIES = ("committed", "embedded", "failed")
CHECK_DEPTHS = ("quick", "deep")
CHECK_RESULTS = ("healthy", "damaged", "cannot_check")
# Counting chunks embedded more than once reads every row (no index on `embeds`): about
# 0.5 s per 300,000 chunks here. Done at most once a minute, whatever the scrape rate.
SLOW_EVERY = 60.0
# A commit is one upsert of <= 10 records: ~25-40 ms on 2 cores, a few ms on a GPU host,
# seconds while a backup holds the commit lock.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A micro-batch of 32 chunks: ~1 s on 2 CPU cores, tens of ms on a GPU.
EMBED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# In-process figures, observed by the writer (pipeline.writer) and the queue serializer:
# one observation per commit or micro-batch, nothing per chunk. Registered with a
# process's registry only when it serves metrics.
COMMIT_SECONDS = Histogram(
    "indexq_commit_duration_seconds",
    "One commit: waiting for the commit lock, the Chroma upsert and the ledger checkpoint (this process).",
    buckets=COMMIT_BUCKETS,
    registry=None,
)
EMBED_SECONDS = Histogram(
    "indexq_embedding_duration_seconds",
    "The model embedding one micro-batch (this process).",
    buckets=EMBED_BUCKETS,
    registry=None,
)
REFUSED_PAYLOADS = Counter(
    "indexq_refused_payloads",
    "Queue payloads (kind=task) and intake parts (kind=intake) refused: bad signature, not ours (this process).",
    ["kind"],
    registry=None,
)
for _kind in ("task", "intake"):
    REFUSED_PAYLOADS.labels(_kind)  # present at 0 from the start, so that increase() sees the first


class _Events:
    """What the ledger's events say, read incrementally: events are only ever appended."""

    def __init__(self) -> None:
        self.last_id = 0
        self.backups: collections.Counter[str] = collections.Counter()
        self.backup_success = 0.0
        self.backup_verified: bool | None = None
        self.checks: collections.Counter[tuple[str, str]] = collections.Counter()
        self.last_check: dict[str, tuple[float, str]] = {}
        self.recoveries: collections.Counter[str] = collections.Counter()
        self.last_recovery = 0.0
        self.alerts = 0
        self.last_alert = 0.0

    def read(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute(
            "SELECT id, time, kind, ok,"
            " CASE WHEN json_valid(detail) THEN json_extract(detail, '$.deep') END,"
            " CASE WHEN json_valid(detail) THEN json_extract(detail, '$.cannot_check') END,"
            " CASE WHEN json_valid(detail) THEN json_extract(detail, '$.verified') END"
            " FROM events WHERE id > ? AND kind IN ('backup', 'check', 'recovery', 'alert') ORDER BY id",
            (self.last_id,),
        ).fetchall()
        for id_, when, kind, ok, deep, cannot_check, verified in rows:
            self.last_id = id_
            if kind == "backup":
                self.backups["ok" if ok else "failed"] += 1
                self.backup_verified = bool(ok) and bool(verified)
                if self.backup_verified:
                    self.backup_success = when
            elif kind == "check":
                depth = "deep" if deep else "quick"
                result = "healthy" if ok else ("cannot_check" if cannot_check else "damaged")
                self.checks[depth, result] += 1
                self.last_check[depth] = (when, result)
            elif kind == "recovery":
                self.recoveries["ok" if ok else "failed"] += 1
                self.last_recovery = when
            else:
                self.alerts += 1
                self.last_alert = when


class Collector:
    """The figures of one role (``writer`` or ``maintenance``), gathered at each scrape."""

    def __init__(
        self, config: Config, role: str, state: WriterState | None = None, embedder: Embedder | None = None,
        queue_depth: Callable[[], int] | None = None,
    ) -> None:  # fmt: skip
        if role not in (WRITER, MAINTENANCE):
            raise ValueError(f"role must be {WRITER!r} or {MAINTENANCE!r}, got {role!r}")
        self.config = config
        self.role = role
        self.state = state
        self.embedder = embedder
        self.queue_depth = queue_depth
        # Scrapes may come on several server threads at once: one at a time reads the ledger.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._events = _Events()
        self._slow: tuple[float, int] | None = None
        self._errors: collections.Counter[str] = collections.Counter()
        self._failing: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            found: list[Metric] = []
            sections: list[tuple[str, Callable[[], list[Metric]]]] = [("writer", self._writer)]
            if self.role == WRITER:
                sections += [("ledger", self._chunks), ("queue", self._queue)]
            else:
                sections += [("ledger", self._maintenance)]
            for name, section in sections:
                try:
                    found.extend(section())
                except Exception as exc:  # one figure that cannot be read must not hide the others
                    self._failed(name, exc)
                else:
                    if name in self._failing:
                        self._failing.discard(name)
                        logger.info("metrics: %s figures readable again", name)
            errors = CounterMetricFamily(
                "indexq_metrics_errors", "Scrapes that could not read a group of figures (this process).",
                labels=["section"],
            )  # fmt: skip
            for name, _ in sections:
                errors.add_metric([name], self._errors[name])
            found.append(errors)
        return iter(found)

    def _failed(self, name: str, exc: Exception) -> None:
        self._errors[name] += 1
        if name == "ledger":
            self._close()  # reopened at the next scrape (a ledger that did not exist yet, say)
        if name not in self._failing:
            self._failing.add(name)
            logger.warning("metrics: cannot read the %s figures: %s", name, first_line(exc))

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction of the ledger: every figure of a scrape from the same instant."""
        if self._conn is None:
            uri = self.config.ledger_path.as_uri() + "?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None, check_same_thread=False)
        conn = self._conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # ---- both roles ------------------------------------------------------------------

    def _writer(self) -> list[Metric]:
        up = GaugeMetricFamily("indexq_writer_up", "1 while a writer holds the data home's writer lock.")
        if self.role == MAINTENANCE:
            up.add_metric([], 1 if writer_alive(self.config.writer_lock_path) is not None else 0)
            return [up]
        up.add_metric([], 1)
        found: list[Metric] = [up]
        info = InfoMetricFamily("indexq_writer", "The running writer: model, device, engines, version.")
        info.add_metric(
            [],
            {
                "model": self.config.model,
                "device": str(getattr(self.embedder, "device", "cpu")),
                "dimension": str(getattr(self.embedder, "dimension", "")),
                "queue": self.config.queue_engine,
                "chroma": self.config.chroma_engine,
                "version": _version(),
            },
        )
        found.append(info)
        published = self.state.state if self.state is not None else {}
        if since := published.get("since"):
            found.append(_gauge("indexq_writer_start_time_seconds", "When the writer started (Unix time).", since))
        guard = published.get("guard") or {}
        held = GaugeMetricFamily(
            "indexq_commits_held_back", "1 while this guard holds every commit back (memory, disk).", labels=["guard"]
        )
        held_since = GaugeMetricFamily(
            "indexq_commits_held_back_since_timestamp_seconds",
            "Since when a guard holds commits back (Unix time); absent while commits flow.",
            labels=["guard"],
        )
        for name in ("memory", "disk"):
            held.add_metric([name], 1 if guard.get("guard") == name else 0)
            if guard.get("guard") == name:
                held_since.add_metric([name], float(guard.get("since", 0.0)))
        found += [held, held_since]
        config = self.config
        disk = shutil.disk_usage(config.chroma_dir if config.chroma_engine == "persistent" else config.home)
        found += [
            _gauge("indexq_memory_used_ratio", "System memory in use (0-1).", psutil.virtual_memory().percent / 100),
            _gauge(
                "indexq_memory_threshold_ratio",
                "Memory use at which the writer holds commits back (0-1).",
                self.config.memory_threshold / 100,
            ),
            _gauge("indexq_disk_free_bytes", "Free space where Chroma writes (with a server: the home).", disk.free),
            _gauge(
                "indexq_disk_min_free_bytes",
                "Free space under which the writer holds commits back.",
                self.config.min_free_mb * 2**20,
            ),
        ]
        return found

    # ---- the writer ------------------------------------------------------------------

    def _queue(self) -> list[Metric]:
        if self.queue_depth is None:
            return []
        return [_gauge("indexq_queue_depth", "Tasks waiting in the writer's queue.", self.queue_depth())]

    def _chunks(self) -> list[Metric]:
        with self._snapshot() as conn:
            states = dict(conn.execute("SELECT state, count(*) FROM chunks GROUP BY state").fetchall())
            meta = dict(conn.execute("SELECT key, CAST(value AS INTEGER) FROM meta").fetchall())
            (last_commit,) = conn.execute("SELECT max(committed_at) FROM chunks").fetchone()
            marks = ",".join("?" * len(OUTSTANDING))
            jobs = conn.execute(
                "SELECT c.job, coalesce(j.collection, ''), count(*) FROM chunks c LEFT JOIN jobs j ON j.id = c.job"
                f" WHERE c.state IN ({marks}) GROUP BY c.job",
                OUTSTANDING,
            ).fetchall()
            now = time.monotonic()
            if self._slow is None or now - self._slow[0] >= SLOW_EVERY:
                (repeated,) = conn.execute("SELECT count(*) FROM chunks WHERE embeds > 1").fetchone()
                self._slow = (now, int(repeated))
        chunks = GaugeMetricFamily("indexq_chunks", "Chunks in the ledger by state.", labels=["state"])
        for state in STATES:
            chunks.add_metric([state], states.get(state, 0))
        outstanding = sum(states.get(state, 0) for state in OUTSTANDING)
        job_outstanding = GaugeMetricFamily(
            "indexq_job_outstanding_chunks",
            "Chunks a job still owes the writer (pending, embedded or stale); absent once it owes none.",
            labels=["job_id", "collection"],
        )
        for job, collection, n in jobs:
            job_outstanding.add_metric([job or "", collection], n)
        tallies = {kind: CounterMetricFamily(
            f"indexq_chunks_{kind}", f"Chunks {kind} by collection (kept in the ledger).", labels=["collection"]
        ) for kind in TALLIES}  # fmt: skip
        collections_ = sorted({key.split(":", 1)[1] for key in meta if ":" in key})
        for collection in collections_:
            for kind in TALLIES:
                tallies[kind].add_metric([collection], meta.get(f"{kind}:{collection}", 0))
        return [
            chunks,
            _gauge("indexq_outstanding_chunks", "Chunks the ledger still owes Chroma (pending, embedded, stale).",
                   outstanding),
            job_outstanding,
            *tallies.values(),
            _counter("indexq_embeddings", "Embeddings computed in this data home since it was created.",
                     meta.get("embeddings", 0)),
            _gauge("indexq_chunks_embedded_more_than_once",
                   f"Chunks whose text was embedded twice or more (resume waste; read at most every {SLOW_EVERY:g}s).",
                   self._slow[1]),
            _counter("indexq_commits", "Commits (upserts of <= 10 records) since the data home was created.",
                     meta.get("seq", 0)),
            _gauge("indexq_last_commit_timestamp_seconds", "When a chunk was last committed (Unix time; 0: never).",
                   last_commit or 0.0),
        ]  # fmt: skip

    # ---- maintenance -----------------------------------------------------------------

    def _maintenance(self) -> list[Metric]:
        with self._snapshot() as conn:
            self._events.read(conn)
        events = self._events
        backups = CounterMetricFamily("indexq_backups", "Backups taken, by outcome (ok: verified).", labels=["result"])
        for result in ("ok", "failed"):
            backups.add_metric([result], events.backups[result])
        checks = CounterMetricFamily("indexq_checks", "Integrity checks by depth, result.", labels=["depth", "result"])
        check_time = GaugeMetricFamily(
            "indexq_check_last_timestamp_seconds", "When the last check of a depth ran (Unix time).", labels=["depth"]
        )
        check_result = GaugeMetricFamily(
            "indexq_check_last_result", "1 for the result of the last check of this depth.", labels=["depth", "result"]
        )
        for depth in CHECK_DEPTHS:
            when, last = events.last_check.get(depth, (0.0, ""))
            check_time.add_metric([depth], when)
            for result in CHECK_RESULTS:
                checks.add_metric([depth, result], events.checks[depth, result])
                check_result.add_metric([depth, result], 1 if last == result else 0)
        verified = GaugeMetricFamily(
            "indexq_backup_last_verified", "1 if the newest backup attempt was verified, 0 if not; absent before one."
        )
        if events.backup_verified is not None:
            verified.add_metric([], 1 if events.backup_verified else 0)
        recoveries = CounterMetricFamily("indexq_recoveries", "Recoveries by outcome.", labels=["result"])
        for result in ("ok", "failed"):
            recoveries.add_metric([result], events.recoveries[result])
        return [
            backups,
            _gauge("indexq_backup_last_success_timestamp_seconds",
                   "When the newest verified backup was taken (Unix time; 0: never).", events.backup_success),
            verified,
            checks,
            check_time,
            check_result,
            recoveries,
            _gauge("indexq_recovery_last_timestamp_seconds", "When the last recovery ran (Unix time; 0: never).",
                   events.last_recovery),
            _counter("indexq_alerts", "Alerts raised (logs/alerts.log, `indexq status`).", events.alerts),
            _gauge("indexq_alert_last_timestamp_seconds", "When the last alert was raised (Unix time; 0: never).",
                   events.last_alert),
        ]  # fmt: skip


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _version() -> str:
    try:
        return importlib.metadata.version("indexq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# A scrape is one short request: the endpoint serves this many connections at once and
# cuts a connection older than this (each read is bounded by it too). Without bounds,
# ~1,000 idle connections (a thread and a file descriptor each) took the writer to its
# open-file limit, and its commits stopped ("Too many open files") until they closed.
METRICS_CONNECTIONS = 16
METRICS_CLIENT_TIMEOUT = 10.0


class _Handler(WSGIRequestHandler):
    """One request, its socket bounded in time; no access log."""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(METRICS_CLIENT_TIMEOUT)  # each read and write of the request

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per request, at most METRICS_CONNECTIONS at once: beyond them a connection is
    closed at once, so that no client can hold the process's threads or descriptors."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: connections over the bound are closed, not left waiting

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # A deadline for the whole connection, not only for each read: a client that sends
        # a byte now and then would hold its slot for as long as it liked.
        deadline = threading.Timer(METRICS_CLIENT_TIMEOUT, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client dropped (timed out, cut, gone) is no news; socketserver would print a traceback.
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            logger.warning("metrics request from %s failed: %s", client_address[0], first_line(error or Exception()))


def _cut(request: socket.socket) -> None:
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


def _start(port: int, addr: str, registry: CollectorRegistry) -> tuple[Any, threading.Thread]:
    """prometheus_client's start_http_server, with the bounds above."""
    # As prometheus_client picks the address family: the first the address resolves to.
    family, _, _, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server = type("MetricsHTTPServer", (_Server,), {"address_family": family})
    httpd: Any = make_server(str(where[0]), port, make_wsgi_app(registry), server, handler_class=_Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


class MetricsServer:
    """The HTTP endpoint of one process; ``close`` stops it and frees the port."""

    def __init__(self, httpd: Any, thread: threading.Thread, collector: Collector, address: str) -> None:
        self.httpd, self.thread, self.collector = httpd, thread, collector
        self.url = f"http://{address}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        self.collector.close()


def serve(
    config: Config, role: str, state: WriterState | None = None, embedder: Embedder | None = None,
    queue_depth: Callable[[], int] | None = None,
) -> MetricsServer | None:  # fmt: skip
    """Serve ``role``'s metrics on ``config.metrics_addr:metrics_port``; None when no port is set.

    Raises ConfigError (exit 2) when the port cannot be had: taken by another process,
    or an address this machine does not have.
    """
    if config.metrics_port is None:
        return None
    collector = Collector(config, role, state, embedder, queue_depth)
    registry = CollectorRegistry()
    for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(standard)
    for own in (COMMIT_SECONDS, EMBED_SECONDS) if role == WRITER else ():
        registry.register(own)
    registry.register(REFUSED_PAYLOADS)
    registry.register(collector)
    # A `_created` series beside every counter doubles what is stored for nothing here.
    disable_created_metrics()
    address = f"[{config.metrics_addr}]" if ":" in config.metrics_addr else config.metrics_addr
    address = f"{address}:{config.metrics_port}"
    try:
        httpd, thread = _start(config.metrics_port, config.metrics_addr, registry)
    except OSError as exc:  # socket.gaierror (an address that does not resolve) among them
        raise ConfigError(
            f"cannot serve metrics on {address} (--metrics-port, INDEXQ_METRICS_PORT): {exc.strerror or exc}",
            hint="another process listens there, or the address is not this machine's:"
            " choose another --metrics-port, or leave it unset",
        ) from None
    thread.name = f"indexq-metrics-{role}"
    logger.info("%s metrics served on http://%s/metrics", role, address)
    return MetricsServer(httpd, thread, collector, address)
