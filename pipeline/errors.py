"""The one exception tree of indexq.

Library code raises these; only the CLI turns them into a one-line message, a hint
and an exit code (``exit_code`` on each class).
"""

from __future__ import annotations


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


class EmptyCorpusError(BadInputError):
    """The submission holds no indexable text."""


class WriterLockedError(IndexqError):
    """Another writer holds the data home's writer lock."""

    exit_code = 3


class JobFailedError(IndexqError):
    """A job finished with chunks that could not be indexed."""

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


class ForgedPayloadError(IndexqError, ValueError):
    """A queue payload whose signature does not match this queue's key: never run."""

    exit_code = 1
