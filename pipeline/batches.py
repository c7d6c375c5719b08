"""Work cut into batches: micro-batches to embed, commit groups of at most ten, parts of an ``IN (...)``;
and the order that makes a micro-batch pad little."""

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


def longest_first(lengths: Sequence[int]) -> list[int]:
    """The positions of ``lengths``, longest first, ties in their order (a stable sort).

    Micro-batches cut from texts in this order hold texts of about one length, so that a
    forward pass, which pads its texts to the longest among them, computes little padding.
    """
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])
