"""The one exception tree of indexq.

Library code raises these; only the edges (the CLI, a consumer started by
huey_consumer) turn them into a one-line message and a hint (``describe``) and an exit
code: ``exit_code`` on each class, the one place exit codes are defined (the README's
"Exit codes" table lists them for users; a test holds the two together).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from collections.abc import Iterator


class IndexqError(Exception):
    """Base of every error indexq raises on purpose."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class BadInputError(IndexqError):
    """Input or configuration that cannot be used; nothing was written."""

    exit_code = 2


class ConfigError(BadInputError):
    """A setting has a value indexq cannot use."""

    setting: str | None = None  # the Config field it is about, where one is (Config.from_env names its variable)


class EmptyCorpusError(BadInputError):
    """The submission holds no indexable text."""


class WriterLockedError(IndexqError):
    """Another writer holds the data home's writer lock."""

    exit_code = 3


class JobFailedError(IndexqError):
    """A job finished with chunks that could not be indexed."""

    exit_code = 1


class DamageFoundError(IndexqError):
    """A check found damage (each problem was reported with its layer and where)."""

    exit_code = 1


class BackupFailedError(IndexqError):
    """A backup failed its verification: it will never be restored."""

    exit_code = 1


class NothingToBackUpError(IndexqError):
    """The data home holds no Chroma database to back up."""

    exit_code = 1


class RecoveryFailedError(IndexqError):
    """Recovery could not run (an unverified backup, a Chroma directory on another
    filesystem) or did not end healthy."""

    exit_code = 1


class BusyError(IndexqError):
    """A lock could not be taken in time: busy, not damaged."""

    exit_code = 4


class NotFoundError(IndexqError):
    """A job or collection that does not exist."""

    exit_code = 1


class StoreError(IndexqError):
    """Chroma refused an operation: its directory may be damaged."""

    exit_code = 1


class UnreachableError(IndexqError):
    """A server (Redis, Chroma) did not answer: unavailable, not damaged."""

    exit_code = 5


class StorageError(IndexqError):
    """The data home could not be read or written (disk full, read-only, permission,
    I/O error): nothing was judged damaged and nothing half-done was left."""

    exit_code = 6
    # What the disk said, without what was being done ("no space left (database or disk is full)").
    reason: str = ""


class ForgedPayloadError(IndexqError, ValueError):
    """A queue payload whose signature does not match this queue's key: never run."""

    exit_code = 1


# What a storage problem looks like, whoever reports it: the OS (errno), SQLite (its
# result code, through Python's sqlite3, Huey or sqlite-utils) or chromadb, whose Rust
# core passes only a message ("(code: 13) database or disk is full", "Read-only file
# system (os error 30)"). Each kind: (errnos, SQLite codes, message fragments, what it
# is, what to do). Corruption (SQLITE_CORRUPT, SQLITE_NOTADB) and a missing file are
# deliberately absent: those are damage, not storage trouble.
FULL, READ_ONLY, DENIED, IO, CANNOT_OPEN = (
    "no space left", "read-only", "permission denied", "I/O error", "cannot open a database file"
)  # fmt: skip
_HINTS = {
    FULL: "free space on that filesystem (or raise its quota) and run it again; nothing was judged damaged",
    READ_ONLY: "remount it read-write, or give a writable --home (INDEXQ_HOME)",
    DENIED: "run indexq as the data home's owner, or fix the permissions of the data home",
    IO: "check the disk (free space, dmesg); nothing was judged damaged",
    CANNOT_OPEN: "check that the data home exists, is writable and has free space",
}
_STORAGE_KINDS: tuple[tuple[frozenset[int], frozenset[int], tuple[str, ...], str], ...] = (
    # SQLITE_IOERR_SHMSIZE (4874): no room to grow a WAL database's -shm file.
    (frozenset({errno.ENOSPC, errno.EDQUOT}), frozenset({13, 4874}),
     ("database or disk is full", "no space left on device", "disk quota exceeded", "(os error 28)"), FULL),
    (frozenset({errno.EROFS}), frozenset({8}), ("read-only file system", "readonly database", "(os error 30)"),
     READ_ONLY),
    (frozenset({errno.EACCES, errno.EPERM}), frozenset({3}), ("permission denied", "(os error 13)"), DENIED),
    (frozenset({errno.EIO}), frozenset({10}), ("disk i/o error", "input/output error", "(os error 5)"), IO),
    (frozenset(), frozenset({14}), ("unable to open database file",), CANNOT_OPEN),
)  # fmt: skip
# Below this much free space, SQLite's "unable to open database file" or an I/O error
# is the full disk.
NEARLY_FULL = 2**20
# A recovery's own failure, an error whose cause Chroma did not pass on ("Error in
# compaction: Failed to apply logs to the metadata segment"), is a full disk below this
# much free: Chroma writes in large pieces (an HNSW index grows by a fifth at a time), and
# a replay failed so with 2 MB free, was taken for damage and discredited the backup it
# had restored. (Elsewhere NEARLY_FULL holds: the writer's and the maintenance consumer's
# back-off restart once RESTART_ROOM is free, which must stay above their bound.)
CHROMA_NEARLY_FULL = 64 * 2**20


def _kind(exc: BaseException) -> str | None:
    code = getattr(exc, "sqlite_errorcode", None) if isinstance(exc, sqlite3.Error) else None
    number = exc.errno if isinstance(exc, OSError) else None
    text = str(exc).lower()
    for errnos, codes, fragments, kind in _STORAGE_KINDS:
        if number in errnos or (code is not None and (code in codes or code & 0xFF in codes)):
            return kind
        if number is None and code is None and any(f in text for f in fragments):
            return kind
    return None


def _filesystem(path: str | os.PathLike[str]) -> tuple[int, bool] | None:
    """(free bytes, read-only) of the filesystem that holds ``path`` or its nearest existing parent."""
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        return shutil.disk_usage(where).free, bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        return None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What ``exc`` says, on one line of at most ``limit`` characters (its type's name if it
    says nothing): tracebacks of a server or of Rust code come as many lines."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def describe(exc: IndexqError) -> str:
    """What a person is told: ``Error: message``, then ``Hint: what to do`` when there is one."""
    return f"Error: {exc}" + (f"\nHint: {exc.hint}" if exc.hint else "")


def storage_error(
    exc: BaseException,
    doing: str = "cannot use the data home",
    path: str | os.PathLike[str] | None = None,
    *,
    unexplained: bool = False,
    nearly_full: int = NEARLY_FULL,
) -> StorageError | None:
    """The StorageError that ``exc`` stands for if it is a storage problem (disk full,
    read-only, permission, I/O), else None. ``doing`` opens the message.

    The whole chain of causes is looked at: Huey, sqlite-utils and chromadb wrap the
    error that says what really happened. ``path`` (where the failed read or write went)
    lets the filesystem name the cause SQLite only describes ("unable to open database
    file" on a read-only mount); with ``unexplained`` (for Chroma's calls, whose errors
    may not say why), any error met while it has less than ``nearly_full`` free is a full disk.
    """
    if isinstance(exc, StorageError):
        return exc
    kind = detail = None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and kind is None:
        seen.add(id(cause))
        kind, detail = _kind(cause), first_line(cause)
        cause = cause.__cause__ or cause.__context__
    fs = _filesystem(path) if path is not None else None
    if kind is None:
        if not unexplained or fs is None or fs[0] >= nearly_full:
            return None
        kind, detail = FULL, f"{fs[0] // 1024} KB free; {first_line(exc)}"
    elif fs is not None and kind in (CANNOT_OPEN, IO):
        kind = READ_ONLY if fs[1] else FULL if fs[0] < NEARLY_FULL else kind
    error = StorageError(f"{doing}: {kind} ({detail})", hint=_HINTS[kind])
    error.reason = f"{kind} ({detail})"
    error.__cause__ = exc
    return error


def from_chroma(exc: BaseException) -> bool:
    """Whether chromadb raised ``exc`` or one of its causes (its client may then be unusable:
    see ``pipeline.backoff``)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if type(cause).__module__.split(".")[0] == "chromadb":
            return True
        cause = cause.__cause__ or cause.__context__
    return False


@contextlib.contextmanager
def storage_errors(
    doing: str = "cannot use the data home", path: str | os.PathLike[str] | None = None
) -> Iterator[None]:
    """Raise a storage problem inside the block as StorageError (exit 6); anything else as it is."""
    try:
        yield
    except IndexqError:
        raise
    except Exception as exc:
        error = storage_error(exc, doing, path)
        if error is None:
            raise
        raise error from exc
