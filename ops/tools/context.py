"""An experiment, not used by indexq: embed a chunk with a short header that says where
it comes from (path tail, heading, page), then the chunk itself.

A chunk of ``email/_header_value_parser.py`` rarely names its own file; a question
about header folding does. Embedding the path with the text lets the file's name vote.
``python -m ops.tools.retrieval`` measures it (variant ``context``): not a clear win
(README, "Retrieval"), so the writer embeds the chunk's text alone and nothing in
``pipeline`` imports this module.

If a future benchmark says otherwise, the design for wiring it into the product is
already here. Only the embedded text changes: the document stored in Chroma stays the
chunk. The header takes tokens from the model's window, so chunks would be cut
``HEADER_TOKENS`` shorter while it is on (``text_budget``, the chunker's budget); a
query's vector is not affected. Whether a chunk carries the header is decided once, by the
producer that chunks it, and travels in the chunk's hash: the producer stores
``chunk_hash`` (the hash of the text with its header), and the writer embeds
``to_embed`` of each row instead of its text. So the hash always covers what is
embedded (an unchanged re-submission re-embeds nothing; turning the header on or off
re-embeds each chunk once; a heading that changes re-embeds its chunks), and a writer
never has to agree with the producers on a setting. The module would then move back
into ``pipeline`` (the core may not import ``ops``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from pipeline.ids import content_hash

# Tokens kept free in every chunk for the header. A header is cut to this many
# characters (keeping its end, the most specific part): a WordPiece token spans at least
# one character, so it can never take more tokens than that.
HEADER_TOKENS = 32
# Trailing path parts named in the header: "email/message.py".
PATH_PARTS = 2


def header(metadata: Mapping[str, Any]) -> str:
    """Where a chunk comes from, in at most ``HEADER_TOKENS`` characters; '' when unknown."""
    parts = []
    source = metadata.get("source")
    if isinstance(source, str) and source:
        parts.append("/".join(PurePath(source).parts[-PATH_PARTS:]))
    heading = metadata.get("heading")
    if isinstance(heading, str) and heading.strip():
        parts.append(heading.strip())
    page = metadata.get("page")
    if isinstance(page, int) and not isinstance(page, bool):
        parts.append(f"page {page}")
    text = " > ".join(parts)
    return text[-HEADER_TOKENS:]


def embed_text(text: str, metadata: Mapping[str, Any]) -> str:
    """The header, a blank line, then the chunk's text (just the text when there is no header)."""
    head = header(metadata)
    return f"{head}\n\n{text}" if head else text


def text_budget(chunk_tokens: int | None, limit: int) -> int:
    """Tokens of text per chunk when the header is on: what was asked (or the model's
    limit), but never so many that the header would push the chunk past the limit."""
    return min(chunk_tokens or limit, limit - HEADER_TOKENS)


def chunk_hash(text: str, metadata: Mapping[str, Any], with_header: bool) -> str:
    """The ledger hash of a chunk: that of the text the writer will embed."""
    return content_hash(embed_text(text, metadata) if with_header else text)


def to_embed(text: str, metadata: Mapping[str, Any], hash_: str) -> str:
    """What the writer embeds for a row: the text with its header if the row's hash is that
    of the text with its header (the producer asked for it), else the text alone."""
    full = embed_text(text, metadata)
    return full if full != text and content_hash(full) == hash_ else text
