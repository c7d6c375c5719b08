"""Split text into chunks that fit the model, with content-defined boundaries.

Chunks are whole lines, counted with the model's own tokenizer, so no chunk is longer
than the model's maximum sequence length (a single over-long line is split by tokens).
Boundaries are content-defined: a chunk ends at a line whose hash picks it once the
chunk holds at least half its budget, so an edit changes the chunks around it and
the boundaries resynchronise after it, instead of shifting every later chunk. Each
chunk begins with an overlap of up to ``overlap`` tokens of whole lines from the end of
the chunk before it.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib

from pipeline.embedder import Tokenizer
from pipeline.ids import content_hash

# One line in this many (by hash) may end a chunk once it is half full. With lines of
# ~10 tokens this puts most ends between half and three quarters of the budget.
_BOUNDARY_DIVISOR = 6


@dataclasses.dataclass(frozen=True)
class Chunk:
    ordinal: int
    text: str
    start_line: int  # 1-based, inclusive
    end_line: int
    hash: str


@dataclasses.dataclass
class _Line:
    number: int
    text: str
    tokens: int


def _boundary(line: str) -> bool:
    stripped = line.strip()
    if not stripped:
        return False
    digest = hashlib.blake2b(stripped.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % _BOUNDARY_DIVISOR == 0


def _lines(text: str, tokenizer: Tokenizer, budget: int) -> list[_Line]:
    """Lines with their token counts; lines over ``budget`` tokens split into pieces."""
    offsets = tokenizer.offsets(text)
    starts = [start for start, _ in offsets]
    out: list[_Line] = []
    position = 0
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        end = position + len(line)
        first = bisect.bisect_left(starts, position)
        last = bisect.bisect_left(starts, end)
        count = last - first
        if count <= budget:
            out.append(_Line(number, line, count))
        else:
            # Cut the line at token starts, `budget` tokens a piece.
            cuts = [starts[i] - position for i in range(first, last, budget)][1:]
            pieces = [line[a:b] for a, b in zip([0, *cuts], [*cuts, len(line)], strict=True)]
            for index, piece in enumerate(pieces):
                tokens = min(budget, count - index * budget)
                out.append(_Line(number, piece, tokens))
        position = end
    return out


def chunk_text(text: str, tokenizer: Tokenizer, max_tokens: int | None = None, overlap: int = 32) -> list[Chunk]:
    """Chunks of ``text``, each at most ``max_tokens`` (default: the model's limit)."""
    budget = min(max_tokens or tokenizer.max_tokens, tokenizer.max_tokens)
    overlap = min(overlap, budget // 2 - 1) if overlap > 0 else 0
    lines = _lines(text, tokenizer, budget - overlap)
    groups: list[list[_Line]] = []
    current: list[_Line] = []
    tail: list[_Line] = []  # overlap carried into the next chunk
    used = 0
    for line in lines:
        if current and used + line.tokens > budget:
            groups.append(current)
            tail = _tail(current, overlap)
            current, used = list(tail), sum(t.tokens for t in tail)
        current.append(line)
        used += line.tokens
        own = used - sum(t.tokens for t in tail)
        if own >= budget // 2 and _boundary(line.text):
            groups.append(current)
            tail = _tail(current, overlap)
            current, used = list(tail), sum(t.tokens for t in tail)
    if current and len(current) > len(tail):
        groups.append(current)
    chunks: list[Chunk] = []
    for group in groups:
        body = "".join(line.text for line in group)
        if not body.strip():
            continue
        chunks.append(Chunk(len(chunks), body, group[0].number, group[-1].number, content_hash(body)))
    return _verified(chunks, tokenizer, budget)


def _tail(group: list[_Line], overlap: int) -> list[_Line]:
    tail: list[_Line] = []
    used = 0
    for line in reversed(group[1:]):
        if used + line.tokens > overlap:
            break
        tail.insert(0, line)
        used += line.tokens
    return tail


def _verified(chunks: list[Chunk], tokenizer: Tokenizer, budget: int) -> list[Chunk]:
    """Re-count each chunk as a whole: joined lines may tokenize differently."""
    counts = tokenizer.counts([c.text for c in chunks]) if chunks else []
    too_long = [c.ordinal for c, n in zip(chunks, counts, strict=True) if n > budget]
    if too_long:
        raise AssertionError(f"chunker produced chunks over {budget} tokens: {too_long}")
    return chunks
