"""Split text into chunks that fit the model, with content-defined boundaries.

Chunks are whole lines, counted with the model's own tokenizer, so no chunk is longer
than the model's maximum sequence length (a single over-long line is split by tokens).
Boundaries are content-defined: a chunk ends at a line whose hash picks it once the
chunk holds at least half its budget, so an edit changes the chunks around it and
the boundaries resynchronise after it, instead of shifting every later chunk. Each
chunk begins with an overlap of up to ``overlap`` tokens of whole lines from the end of
the chunk before it.

A document's heading lines (``headings``: Markdown, HTML, DOCX) start sections: a chunk
holding text ends before the next heading, and the chunk that opens with it carries
no overlap from the section before (a heading alone does not end a chunk, so
``# Install`` stays with ``## From source`` under it).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import re
from collections.abc import Collection, Sequence

from pipeline.embedder import Tokenizer
from pipeline.errors import ConfigError
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


# Line ends for str.splitlines that are control characters, which BERT's normalizer
# removes rather than reads as white space: a word on both sides becomes one token.
_REMOVED_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85]")


def _boundary(line: str) -> bool:
    stripped = line.strip()
    if not stripped:
        return False
    digest = hashlib.blake2b(stripped.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % _BOUNDARY_DIVISOR == 0


def _lines(text: str, starts: Sequence[int], budget: int) -> list[_Line]:
    """Lines with their token counts; lines over ``budget`` tokens split into pieces."""
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


def chunk_budget(tokenizer: Tokenizer, max_tokens: int | None, overlap: int) -> int:
    """Tokens per chunk for these settings; ConfigError, never a silent clamp, for values the
    model cannot take. Call it once the tokenizer is loaded, before anything is written."""
    limit = tokenizer.max_tokens
    if max_tokens is not None and max_tokens > limit:
        raise ConfigError(
            f"chunk size (--chunk-tokens, INDEXQ_CHUNK_TOKENS) must be at most {limit}, the limit of model"
            f" {tokenizer.model!r} (its maximum sequence length less 2 special tokens), got {max_tokens}",
            hint=f"leave it unset to use {limit}",
        )
    budget = max_tokens or limit
    if not 0 <= overlap < budget // 2:
        raise ConfigError(
            f"chunk overlap (--chunk-overlap, INDEXQ_CHUNK_OVERLAP) must be >= 0 and under half the chunk size"
            f" of {budget} tokens, got {overlap}",
            hint=f"use at most {budget // 2 - 1}",
        )
    return budget


def chunk_text(
    text: str,
    tokenizer: Tokenizer,
    max_tokens: int | None = None,
    overlap: int = 32,
    starts: Sequence[int] | None = None,
    headings: Collection[int] = (),
) -> list[Chunk]:
    """Chunks of ``text``, each at most ``max_tokens`` (default: the model's limit).

    Settings the model cannot take raise ConfigError (see ``chunk_budget``).

    ``starts`` (from ``tokenizer.token_starts``) saves tokenizing again a text that
    was tokenized in a batch. ``headings`` are the line numbers of heading lines.
    """
    budget = chunk_budget(tokenizer, max_tokens, overlap)
    if starts is None:
        (starts,) = tokenizer.token_starts([text])
    lines = _lines(text, starts, budget - overlap)
    groups: list[list[_Line]] = []
    current: list[_Line] = []
    tail_tokens = 0  # overlap carried into the current chunk
    used = 0
    has_text = False  # the current chunk holds text beyond its overlap that is not a heading
    previous = 0  # line number of the last piece: an over-long line is cut into pieces

    def close() -> None:
        nonlocal current, used, tail_tokens, has_text
        groups.append(current)
        current = _tail(current, overlap)
        used = tail_tokens = sum(t.tokens for t in current)
        has_text = False

    for line in lines:
        heading = line.number in headings
        if heading and line.number != previous and (has_text or (current and used == tail_tokens)):
            # A new section: close a chunk that holds text; drop an overlap from the section before.
            if has_text:
                groups.append(current)
            current, used, tail_tokens, has_text = [], 0, 0, False
        if used + line.tokens > budget and used > tail_tokens:
            close()
        current.append(line)
        used += line.tokens
        previous = line.number
        has_text = has_text or (not heading and bool(line.text.strip()))
        if not heading and used - tail_tokens >= budget // 2 and _boundary(line.text):
            close()
    if used > tail_tokens or (current and not groups):
        groups.append(current)
    if not (tokenizer.line_exact and not _REMOVED_BREAKS.search(text)):
        # Counting again is a third of the producer's tokenizing; a line_exact tokenizer
        # (all-MiniLM-L6-v2's) needs it only where a line ends in a character it removes.
        groups = _verified(groups, tokenizer, budget)
    chunks: list[Chunk] = []
    for group in groups:
        body = "".join(line.text for line in group)
        if body.strip():
            chunks.append(Chunk(len(chunks), body, group[0].number, group[-1].number, content_hash(body)))
    return chunks


def _tail(group: list[_Line], overlap: int) -> list[_Line]:
    tail: list[_Line] = []
    used = 0
    for line in reversed(group[1:]):
        if used + line.tokens > overlap:
            break
        tail.insert(0, line)
        used += line.tokens
    return tail


def _verified(groups: list[list[_Line]], tokenizer: Tokenizer, budget: int) -> list[list[_Line]]:
    """Re-count near-full chunks as a whole and split any that the model would truncate.

    Line counts come from one pass over the whole text; a tokenizer whose pieces can
    cross a line end (not WordPiece, whose pieces stop at white space) may count a
    chunk slightly differently on its own. Only chunks within 10 % of the budget can
    be affected, so only they are counted again.
    """
    near = max(8, budget // 10)
    suspects = [i for i, g in enumerate(groups) if sum(line.tokens for line in g) > budget - near]
    if not suspects:
        return groups
    counts = tokenizer.counts(["".join(line.text for line in groups[i]) for i in suspects])
    out: list[list[_Line]] = []
    over = {i for i, n in zip(suspects, counts, strict=True) if n > budget}
    for i, group in enumerate(groups):
        if i in over and len(group) > 1:
            half = len(group) // 2
            out.extend(_verified([group[:half], group[half:]], tokenizer, budget))
        else:
            out.append(group)
    return out
