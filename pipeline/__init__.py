"""indexq: crash-safe bulk indexing into ChromaDB.

The API for scripts::

    import pipeline
    job = pipeline.submit_paths(["./docs"], "docs")
    pipeline.wait(job)
    pipeline.search("how do I resume", "docs", k=3)
"""

from pipeline.api import job, resume, search, status, submit_jsonl, submit_paths, submit_records, wait
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
