"""Work cut into batches: micro-batches to embed, commit groups of at most ten, parts of an ``IN (...)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items``, each of ``size`` (the last may be shorter).

    ``itertools.batched`` would do, but it came with Python 3.12 and gives tuples.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]
