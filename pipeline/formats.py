"""Document formats: the text of a PDF, DOCX, HTML or Markdown file, with where each line sits.

A file's format is chosen by its extension (a PDF must also begin with ``%PDF-``).
Each parser yields a ``Document``: the text to chunk, the lines that are headings
(a chunk never runs from one section into the next when it can be helped), the
heading path and page in force at each line. Everything else is plain text.

Parsers read what anyone may have written: every limit here (pages, extracted text,
unpacked size, time) bounds what one file can cost the producer, and a file that
breaks a parser is skipped with its reason (``Unparsable``), never fatal to the job.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import time
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.guards import clean_text

# Extension -> format. Anything else is read as UTF-8 text.
FORMATS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "markdown",
    ".markdown": "markdown",
}
# Formats read as bytes by their parser (not UTF-8 text; a NUL byte is no sign of binary).
BINARY_FORMATS = ("pdf", "docx")
# A heading path is spelled ``Install > From source``.
HEADING_SEPARATOR = " > "
# Bounds on one file, whatever it claims: pages read from a PDF, characters of text
# extracted (as much as a text file may hold), bytes a DOCX unpacks to (its XML is
# several times its text), and seconds spent parsing (a PDF built to be slow: many
# pages of operators). A file over a bound is skipped with the bound in its reason.
MAX_PDF_PAGES = 5000
MAX_TEXT_CHARS = 16 * 2**20
MAX_UNPACKED_BYTES = 256 * 2**20
MAX_PARSE_SECONDS = 120.0
# Skip reasons that mean the file's content cannot be indexed (its old chunks are stale).
# A parse that ran out of time is not one of them: under load a good file may be slow.
GONE_REASONS = ("encrypted PDF", "cannot parse", "no text", "not a PDF", "more than")
# HTML elements whose content is not visible text.
_HTML_HIDDEN = frozenset(
    "head script style noscript template svg math iframe object embed canvas button select option".split()
)
# HTML elements that begin a new line of text.
_HTML_BLOCKS = frozenset(
    "address article aside blockquote body br caption dd details dialog div dl dt fieldset figcaption figure"
    " footer form header hgroup hr li main nav ol p section summary table tbody td tfoot th thead tr ul".split()
)
_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}


class Unparsable(Exception):
    """A file its parser cannot read; ``reason`` is the skip reason (internal to the corpus reader)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Document:
    """Text to chunk and where its lines sit (line numbers are 1-based, as the chunker counts them)."""

    text: str
    # The line numbers are the file's own (text, Markdown); for extracted text they are
    # not, so chunks of a PDF, DOCX or HTML file carry no start_line/end_line.
    file_lines: bool = True
    headings: frozenset[int] = frozenset()  # heading lines: sections start there
    paths: tuple[tuple[int, str], ...] = ()  # (line, heading path in force from it)
    pages: tuple[tuple[int, int], ...] = ()  # (line, page number from it)
    body: tuple[int, ...] = ()  # lines that hold text and are not headings

    def place(self, start: int, end: int) -> dict[str, Any]:
        """Metadata for a chunk of lines ``start..end``: lines, page where it starts, heading path."""
        meta: dict[str, Any] = {"start_line": start, "end_line": end} if self.file_lines else {}
        if self.pages:
            meta["page"] = _at(self.pages, start)
        if self.paths:
            # The section of its first line of text: a chunk that opens with headings
            # (`# Install`, `## From source`) belongs to the innermost one.
            i = bisect.bisect_left(self.body, start)
            line = self.body[i] if i < len(self.body) and self.body[i] <= end else start
            path = _at(self.paths, line)
            if path:
                meta["heading"] = path
        return meta


def _at(marks: tuple[tuple[int, Any], ...], line: int) -> Any:
    """The value of the last mark at or before ``line`` (None before the first)."""
    i = bisect.bisect_right(marks, line, key=lambda mark: mark[0]) - 1
    return marks[i][1] if i >= 0 else None


def format_of(suffix: str) -> str | None:
    return FORMATS.get(suffix.lower())


def parse(kind: str, data: bytes | str) -> Document:
    """The document in ``data`` (bytes for PDF, DOCX and HTML; text for Markdown); raises Unparsable."""
    if kind == "markdown":
        assert isinstance(data, str)
        return markdown(data)
    assert isinstance(data, bytes)
    if kind == "pdf":
        return pdf(data)
    if kind == "docx":
        return docx(data)
    if kind == "html":
        return html(data)
    raise ValueError(f"unknown format {kind!r}")


class _Builder:
    """Lines of extracted text, with the headings, heading paths and pages they fall under."""

    def __init__(self, deadline: float | None = None) -> None:
        self.lines: list[str] = []
        self.chars = 0
        self.stack: list[tuple[int, str]] = []  # (level, title) of the headings in force
        self.headings: set[int] = set()
        self.paths: list[tuple[int, str]] = []
        self.pages: list[tuple[int, int]] = []
        self.body: list[int] = []
        self.deadline = deadline

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _TooSlow
        if self.chars > MAX_TEXT_CHARS:
            raise Unparsable(f"larger than {MAX_TEXT_CHARS // 2**20} MB of extracted text")

    def page(self, number: int) -> None:
        self.pages.append((len(self.lines) + 1, number))

    def text(self, text: str) -> None:
        # One line per line the chunker will count (str.splitlines: \f and \u2028 end lines too).
        for line in clean_text(text).splitlines():
            line = line.rstrip()
            if line.strip():
                self.lines.append(line)
                self.body.append(len(self.lines))
                self.chars += len(line) + 1
        self.check()

    def heading(self, level: int, title: str) -> None:
        title = " ".join(clean_text(title).split())
        if not title:
            return
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))
        self.lines.append(title)
        self.headings.add(len(self.lines))
        self.paths.append((len(self.lines), HEADING_SEPARATOR.join(t for _, t in self.stack)))
        self.chars += len(title) + 1

    def document(self, what: str) -> Document:
        if not self.body:
            raise Unparsable("no text layer (a scanned PDF?)" if what == "PDF" else "empty")
        return Document(
            "\n".join(self.lines) + "\n", file_lines=False, headings=frozenset(self.headings),
            paths=tuple(self.paths), pages=tuple(self.pages), body=tuple(self.body),
        )  # fmt: skip


class _TooSlow(Exception):
    pass


def pdf(data: bytes) -> Document:
    """Text page by page; ``page`` is where each line is."""
    # The header may follow a little junk (the PDF specification allows 1 KB of it).
    if b"%PDF-" not in data[:1024]:
        raise Unparsable("not a PDF (no %PDF- header)")
    builder = _Builder(time.monotonic() + MAX_PARSE_SECONDS)
    return _guarded("PDF", lambda: _pdf(data, builder))


def _guarded(what: str, parse: Callable[[], Document]) -> Document:
    """Run a parser; whatever a malformed file makes it raise becomes the file's skip reason."""
    try:
        return parse()
    except (Unparsable, ImportError, MemoryError):
        raise
    except _TooSlow:
        raise Unparsable(f"parse took over {MAX_PARSE_SECONDS:.0f} s") from None
    except Exception as exc:  # a malformed file can raise anything from deep inside a parser
        raise Unparsable(f"cannot parse {what}: {_first_line(exc)}") from None


def _pdf(data: bytes, builder: _Builder) -> Document:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted:
        # An owner password alone (printing, copying restricted) leaves the text readable.
        try:
            opened = bool(reader.decrypt(""))
        except Exception:  # an encryption pypdf cannot open without an optional library
            opened = False
        if not opened:
            raise Unparsable("encrypted PDF (a password is needed to read it)")
    count = len(reader.pages)
    if count > MAX_PDF_PAGES:
        raise Unparsable(f"more than {MAX_PDF_PAGES} pages ({count})")

    def visit(*_: Any) -> None:  # called for each piece of text shown: a slow page stops here
        builder.check()

    for number, page in enumerate(reader.pages, start=1):
        builder.check()
        builder.page(number)
        builder.text(page.extract_text(visitor_text=visit))
    return builder.document("PDF")


def docx(data: bytes) -> Document:
    """Paragraphs and table rows in document order; paragraphs styled Title or Heading N are headings."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Unparsable(f"cannot parse DOCX: {_first_line(exc)}") from None
    if unpacked > MAX_UNPACKED_BYTES:
        raise Unparsable(f"more than {MAX_UNPACKED_BYTES // 2**20} MB unpacked")
    return _guarded("DOCX", lambda: _docx(data, _Builder()))


def _docx(data: bytes, builder: _Builder) -> Document:
    import docx as python_docx
    from docx.table import Table

    document = python_docx.Document(io.BytesIO(data))
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                builder.text(" | ".join(cell.text.strip() for cell in row.cells))
            continue
        level = _docx_level(block.style.name if block.style is not None else "")
        if level is None:
            builder.text(block.text)
        else:
            builder.heading(level, block.text)
    return builder.document("DOCX")


def _docx_level(style: str | None) -> int | None:
    if style == "Title":
        return 0
    if style and style.startswith("Heading "):
        rest = style.removeprefix("Heading ")
        if rest.isdigit():
            return int(rest)
    return None


def html(data: bytes) -> Document:
    """Visible text (no head, script, style or hidden elements); h1-h6 are headings."""
    return _guarded("HTML", lambda: _html(data, _Builder()))


def _html(data: bytes, builder: _Builder) -> Document:
    from bs4 import BeautifulSoup
    from bs4.element import NavigableString, PreformattedString, Tag

    soup = BeautifulSoup(data, "lxml")
    words: list[str] = []

    def flush() -> None:
        if words:
            builder.text(" ".join(" ".join(words).split()))
            words.clear()

    # An explicit stack, not recursion: nesting depth is the author's to choose.
    stack: list[tuple[Any, bool]] = [(soup.body or soup, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            flush()
        elif isinstance(node, PreformattedString):  # comments, doctypes, CDATA
            continue
        elif isinstance(node, NavigableString):
            words.append(str(node))
        elif isinstance(node, Tag):
            name = node.name
            if name in _HTML_HIDDEN or node.has_attr("hidden"):
                continue
            if name in _HTML_HEADINGS:
                flush()
                builder.heading(_HTML_HEADINGS[name], node.get_text(" "))
            elif name == "pre":
                flush()
                builder.text(node.get_text())
            else:
                if name in _HTML_BLOCKS:
                    flush()
                    stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.contents))
    flush()
    return builder.document("HTML")


def markdown(text: str) -> Document:
    """The file's own text and line numbers; ATX and setext headings (not ``#`` in code) start sections."""
    from markdown_it import MarkdownIt

    # Lines as the chunker counts them (str.splitlines), each ended by "\n" for the parser.
    tokens = MarkdownIt("commonmark").parse("\n".join(text.splitlines()))
    headings: set[int] = set()
    paths: list[tuple[int, str]] = []
    stack: list[tuple[int, str]] = []
    for i, token in enumerate(tokens):
        if token.type != "heading_open" or token.map is None:
            continue
        level = int(token.tag[1])
        title = " ".join(_inline_text(tokens[i + 1].children or []).split())
        first, last = token.map  # 0-based, end exclusive: a setext heading has its underline
        headings.update(range(first + 1, last + 1))
        if not title:
            continue
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        paths.append((first + 1, HEADING_SEPARATOR.join(t for _, t in stack)))
    body = tuple(n for n, line in enumerate(text.splitlines(), start=1) if line.strip() and n not in headings)
    return Document(text, headings=frozenset(headings), paths=tuple(paths), body=body)


def _inline_text(children: Iterable[Any]) -> str:
    out: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline"):
            out.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            out.append(" ")
        elif child.children:
            out.append(_inline_text(child.children))
    return "".join(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
