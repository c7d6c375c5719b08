"""Guards around every commit: memory, free disk, and validation of what is written.

A resource guard that trips makes the writer wait and try again (with back-off); it
never drops work. Validation refuses single chunks with a reason the ledger keeps.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipeline.config import GUARD_BACKOFF

logger = logging.getLogger(__name__)

_SCALARS = (str, int, float, bool)


def clean_text(text: str) -> str:
    """NUL bytes break Chroma's FTS5 index ("malformed inverted index"): strip them."""
    return text.replace("\x00", "")


def clean_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata Chroma accepts: scalar values, no NUL bytes; raises ValueError otherwise."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata key {key!r} is not a non-empty string")
        if key.startswith("chroma:"):
            raise ValueError(f"metadata key {key!r} is reserved by Chroma")
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


class ResourceGuard:
    """System memory and free disk, checked before each commit."""

    def __init__(self, chroma_path: Path, memory_threshold: float, min_free_mb: int) -> None:
        self.chroma_path = chroma_path
        self.memory_threshold = memory_threshold
        self.min_free_mb = min_free_mb

    def problem(self) -> str | None:
        memory = psutil.virtual_memory().percent
        if memory >= self.memory_threshold:
            return f"system memory at {memory:.0f}% (threshold {self.memory_threshold:g}%)"
        free_mb = shutil.disk_usage(self.chroma_path).free / 2**20
        if free_mb < self.min_free_mb:
            return f"{free_mb:.0f} MB free under {self.chroma_path} (minimum {self.min_free_mb} MB)"
        return None

    def wait_until_clear(self, stop: threading.Event) -> bool:
        """Block while a guard is tripped; False if a stop was asked for meanwhile."""
        delay, growth, longest = GUARD_BACKOFF
        while (problem := self.problem()) is not None:
            logger.warning("commit held back: %s; retrying in %.1fs", problem, delay)
            if stop.wait(delay):
                return False
            delay = min(delay * growth, longest)
        return not stop.is_set()
