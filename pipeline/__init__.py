"""indexq: crash-safe bulk indexing into ChromaDB.

The API for scripts::

    import pipeline
    job = pipeline.submit_paths(["./docs"], "docs")
    pipeline.wait(job)
    pipeline.search("how do I resume", "docs", k=3)
"""

from typing import TYPE_CHECKING, Any

from pipeline.config import Config
from pipeline.errors import (
    BadInputError,
    BusyError,
    ConfigError,
    EmptyCorpusError,
    IndexqError,
    JobFailedError,
    NotFoundError,
    WriterLockedError,
)
from pipeline.version import __version__

if TYPE_CHECKING:
    from pipeline.api import job, resume, search, status, submit_jsonl, submit_paths, submit_records, wait

# The API's functions are imported when first used: `pipeline.api` brings Huey, Redis's
# client and sqlite-utils (half a second of CPU), which the processes that only need a
# submodule (the integrity probe, a check, the maintenance tick) would pay for at every start.
_API = frozenset({"job", "resume", "search", "status", "submit_jsonl", "submit_paths", "submit_records", "wait"})

__all__ = [
    "BadInputError",
    "BusyError",
    "Config",
    "ConfigError",
    "EmptyCorpusError",
    "IndexqError",
    "JobFailedError",
    "NotFoundError",
    "WriterLockedError",
    "__version__",
    "job",
    "resume",
    "search",
    "status",
    "submit_jsonl",
    "submit_paths",
    "submit_records",
    "wait",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _API:
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
