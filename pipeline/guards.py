"""Guards around every commit: memory, free disk, and validation of what is written.

A resource guard that trips makes the writer wait and try again (with back-off); it
never drops work. Validation refuses single chunks with a reason the ledger keeps.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeline.config import GUARD_BACKOFF
from pipeline.errors import first_line

logger = logging.getLogger(__name__)

_SCALARS = (str, int, float, bool)
# Metadata keys one record may have. Chroma (1.5.9, SQLite) writes a record's metadata in
# one statement of 6 variables a key, the document included, under SQLite's 32,766: a
# record of 5,461 keys or more is taken by the upsert and then fails every compaction of
# its collection for good ("Failed to apply logs to the metadata segment"). indexq adds
# up to 5 keys (content_hash, ordinal, document_id, _node_content, _node_type); 1,000
# leaves room for both. Long keys and values (16 MB) were measured to be no problem.
# Producers refuse a record over MAX_METADATA_KEYS; the writer refuses a chunk over
# MAX_CHUNK_METADATA_KEYS (indexq's own keys with the record's), whoever enqueued it.
MAX_METADATA_KEYS = 1000
MAX_CHUNK_METADATA_KEYS = MAX_METADATA_KEYS + 24


def clean_text(text: str) -> str:
    """NUL bytes break Chroma's FTS5 index ("malformed inverted index"): strip them."""
    return text.replace("\x00", "")


def unicode_problem(text: str) -> str | None:
    """What keeps ``text`` from being UTF-8, or None: a lone UTF-16 surrogate, which JSON may
    spell (``\\ud800``) and Python makes of a command-line byte that is not UTF-8 (``\\udce9``
    for 0xE9). No tokenizer, SQLite or Chroma takes one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone UTF-16 surrogate ({text[exc.start]!a} at character {exc.start})"
    return None


def clean_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata Chroma accepts: scalar values, no NUL bytes, at most MAX_CHUNK_METADATA_KEYS
    keys; raises ValueError otherwise."""
    if len(metadata) > MAX_CHUNK_METADATA_KEYS:
        raise ValueError(
            f"metadata has {len(metadata)} keys, more than the {MAX_CHUNK_METADATA_KEYS} a chunk may carry"
            " (Chroma cannot compact a record of about 5,460)"
        )
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata key {key!r} is not a non-empty string")
        if "\x00" in key:  # stripped, it could be another key of the record
            raise ValueError(f"metadata key {key!r} holds a NUL character")
        if key.startswith("chroma:"):
            raise ValueError(f"metadata key {key!r} is reserved by Chroma")
        if key.startswith(("#", "$")):  # Chroma's own keys (#document) and operators ($and)
            raise ValueError(f"metadata key {key!r} starts with {key[0]!r}, which Chroma refuses")
        if value is None:
            continue
        if not isinstance(value, _SCALARS):
            raise ValueError(
                f"metadata {key!r} has a {type(value).__name__}; only str, int, float and bool are allowed"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metadata {key!r} is not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError(f"metadata {key!r} does not fit in 64 bits")
        out[clean_text(key)] = clean_text(value) if isinstance(value, str) else value
    return out


def check_vector(vector: np.ndarray, dimension: int) -> str | None:
    """The reason a vector must not be written, or None."""
    if vector.shape != (dimension,):
        return f"embedding has dimension {vector.shape[-1] if vector.ndim else 0}, expected {dimension}"
    if not np.all(np.isfinite(vector)):
        return "embedding holds NaN or infinity"
    return None


@dataclasses.dataclass(frozen=True)
class Hold:
    """A resource guard holding commits back: which one, since when, what it measured."""

    guard: str  # "memory" (percent of system memory in use) or "disk" (MB free)
    value: float
    limit: float
    since: float  # time.time() when this guard began to hold commits back

    def describe(self) -> str:
        if self.guard == "memory":
            return f"memory {self.value:.0f} % >= {self.limit:g} %"
        return f"disk {self.value:.0f} MB free < {self.limit:g} MB"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "summary": self.describe()}


class ResourceGuard:
    """System memory and free disk, checked before each commit.

    ``on_change`` is called with the new Hold when a guard starts holding commits back
    (or its measured value moves by a whole unit), and with None when commits are
    released: never on the commit path itself, only while waiting.
    """

    def __init__(
        self, chroma_path: Path, memory_threshold: float, min_free_mb: int,
        on_change: Callable[[Hold | None], None] | None = None,
    ) -> None:  # fmt: skip
        self.chroma_path = chroma_path
        self.memory_threshold = memory_threshold
        self.min_free_mb = min_free_mb
        self.on_change = on_change
        self.hold: Hold | None = None

    def measure(self) -> Hold | None:
        """The guard that would hold a commit back now, or None."""
        memory = psutil.virtual_memory().percent
        if memory >= self.memory_threshold:
            return Hold("memory", memory, self.memory_threshold, time.time())
        free_mb = shutil.disk_usage(self.chroma_path).free / 2**20
        if free_mb < self.min_free_mb:
            return Hold("disk", free_mb, self.min_free_mb, time.time())
        return None

    def problem(self) -> str | None:
        hold = self.measure()
        if hold is None:
            return None
        if hold.guard == "memory":
            return f"system memory at {hold.value:.0f}% (threshold {hold.limit:g}%)"
        return f"{hold.value:.0f} MB free under {self.chroma_path} (minimum {hold.limit:g} MB)"

    def wait_until_clear(self, stop: threading.Event) -> bool:
        """Block while a guard is tripped; False if a stop was asked for meanwhile."""
        delay, growth, longest = GUARD_BACKOFF
        while (hold := self.measure()) is not None:
            self._held(hold, delay)
            if stop.wait(delay):
                return False
            delay = min(delay * growth, longest)
        if self.hold is not None:
            logger.warning(
                "commits released after %.0fs held back (%s)", time.time() - self.hold.since, self.hold.describe()
            )
            self.hold = None
            self._changed(None)
        return not stop.is_set()

    def _held(self, hold: Hold, delay: float) -> None:
        # One log line and one publication per change of state, not one per poll.
        previous = self.hold
        if previous is not None and previous.guard == hold.guard:
            hold = dataclasses.replace(hold, since=previous.since)
            if round(hold.value) == round(previous.value):
                logger.debug("commit still held back: %s; retrying in %.1fs", hold.describe(), delay)
                return
            self.hold = hold
        else:
            self.hold = hold
            logger.warning("commits held back: %s; retrying with back-off", hold.describe())
        self._changed(hold)

    def _changed(self, hold: Hold | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(hold)
        except Exception as exc:  # telling status is best effort: it must never stop the writer
            logger.warning("could not publish the guard state: %s", first_line(exc))
