"""Document formats: the text of a PDF, DOCX, HTML or Markdown file, with where each line sits.

A file's format is chosen by its extension (a PDF must also begin with ``%PDF-``).
Each parser yields a ``Document``: the text to chunk, the lines that are headings
(a chunk never runs from one section into the next when it can be helped), the
heading path and page in force at each line. Everything else is plain text.

Parsers read what anyone may have written: every limit here (pages, extracted text,
unpacked size, time) bounds what one file can cost the producer, and a file that
breaks a parser is skipped with its reason (``Unparsable``), never fatal to the job.
No parser holds a tree of the whole file: HTML and DOCX stream through lxml parser
targets (events, no tree), Markdown is parsed in windows of lines. What grows with a
file is its extracted text and one mark per line (at most ``MAX_TEXT_CHARS``).
"""

from __future__ import annotations

import array
import bisect
import codecs
import dataclasses
import functools
import io
import posixpath
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
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
# Every chunk of a section carries its heading path in its metadata (twice, with the
# LlamaIndex node): a title is cut at MAX_HEADING_CHARS and a path keeps its last
# MAX_HEADING_PATH_CHARS, so that one long heading line does not cost its length in every
# chunk it is split into (a 200 KB heading line made 72 MB of metadata from 181 chunks).
MAX_HEADING_CHARS = 200
MAX_HEADING_PATH_CHARS = 1000
# Bounds on one file, whatever it claims: pages read from a PDF, characters of text
# extracted (as much as a text file may hold), bytes a DOCX unpacks to (its XML is
# several times its text), and seconds spent parsing any format (a PDF built to be
# slow: many pages of operators; an HTML file of a million elements). A file over a
# bound is skipped with the bound in its reason.
MAX_PDF_PAGES = 5000
MAX_TEXT_CHARS = 16 * 2**20
MAX_UNPACKED_BYTES = 256 * 2**20
MAX_PARSE_SECONDS = 120.0
# Markdown is parsed a window of this many lines at a time, so that markdown-it's tokens
# and line tables stay small whatever the file holds. A window ends before its last
# top-level block, which the next window parses whole. (Lines are looked for in slices
# of _MARKDOWN_WINDOW_CHARS, doubled until the window's lines are in.)
MARKDOWN_WINDOW_LINES = 10_000
_MARKDOWN_WINDOW_CHARS = 512 * 2**10
# HTML is fed to its parser, and a DOCX part read, in pieces of this size; the deadline
# is checked between pieces and every few thousand elements.
_PIECE = 64 * 2**10
_EVERY = 4096
# Skip reasons that mean the file's content cannot be indexed (its old chunks are stale).
# A parse that ran out of time is not one of them: under load a good file may be slow.
GONE_REASONS = ("encrypted PDF", "cannot parse", "no text", "not a PDF", "more than")
# HTML elements whose content is not visible text.
_HTML_HIDDEN = frozenset(
    "head script style noscript template svg math iframe object canvas button select option".split()
)
# HTML's void elements have no content, so neither they nor a ``hidden`` attribute on one
# hides anything. libxml2 2.14 does not know some of them (embed, source, track, wbr) and
# nests the rest of the page inside: taken as hidden, they hid all that followed.
_HTML_VOID = frozenset(
    "area base basefont bgsound br col embed frame hr img input keygen link meta param source track wbr".split()
)
# HTML elements that begin a new line of text.
_HTML_BLOCKS = frozenset(
    "address article aside blockquote body br caption dd details dialog div dl dt fieldset figcaption figure"
    " footer form header hgroup hr li main nav ol p section summary table tbody td tfoot th thead tr ul".split()
)
_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
# A heading's inline markup is parsed (markdown-it) from its first this many characters:
# its title is cut at MAX_HEADING_CHARS anyway, and inline parsing can take time that
# grows with the square of a crafted heading's length (a heading of "![" a million times
# took 60 s; the deadline is now also checked at every inline token).
_MARKDOWN_TITLE_SOURCE = 20 * MAX_HEADING_CHARS
# Lone UTF-16 surrogates, which a PDF's font may map a glyph to: no tokenizer, SQLite or
# Chroma takes one, so extracted text gets U+FFFD in their place.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _short(title: str) -> str:
    """A heading's title as its path holds it: at most MAX_HEADING_CHARS."""
    return title if len(title) <= MAX_HEADING_CHARS else title[: MAX_HEADING_CHARS - 1] + "…"


def heading_path(stack: Sequence[tuple[int, str]]) -> str:
    """``Install > From source`` from (level, title) outermost first; over MAX_HEADING_PATH_CHARS,
    its last characters after ``…`` (the outermost title that does not fit is cut)."""
    path = HEADING_SEPARATOR.join(t for _, t in stack)
    return path if len(path) <= MAX_HEADING_PATH_CHARS else "…" + path[-(MAX_HEADING_PATH_CHARS - 1) :]


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
    body: Sequence[int] = ()  # lines that hold text and are not headings, ascending (an array: 8 bytes a line)

    def place(self, start: int, end: int) -> dict[str, Any]:
        """Metadata for a chunk of lines ``start..end``: lines, page where it starts, heading path."""
        meta: dict[str, Any] = {}
        if self.file_lines:
            numbers = self._file_line_numbers
            meta = {"start_line": start, "end_line": end} if numbers is None else {
                "start_line": numbers[start - 1], "end_line": numbers[end - 1]
            }  # fmt: skip
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

    @functools.cached_property
    def _file_line_numbers(self) -> Sequence[int] | None:
        """The file's line number of each line the chunker counts, or None where they agree.

        The chunker's lines are ``str.splitlines``', which also end at a form feed, a
        vertical tab, \\x1c-\\x1e, \\x85, U+2028 and U+2029; an editor or ``grep -n`` ends
        a line only at \\n, \\r\\n or \\r (CPython's own sources hold form feeds).
        """
        if not _ODD_LINE_ENDS.search(self.text):
            return None
        numbers, number = array.array("q"), 1
        for line in self.text.splitlines(keepends=True):
            numbers.append(number)
            if line.endswith(("\n", "\r")):
                number += 1
        return numbers


# Line ends of str.splitlines that are not a file's line ends.
_ODD_LINE_ENDS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


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


def _extracted(text: str) -> str:
    """Text as a parser gave it, made fit to index: no NUL bytes, no lone surrogates."""
    return _SURROGATE.sub("\ufffd", clean_text(text))


def _deadline() -> float:
    return time.monotonic() + MAX_PARSE_SECONDS


class _Builder:
    """Lines of extracted text, with the headings, heading paths and pages they fall under."""

    def __init__(self, deadline: float | None = None) -> None:
        self.lines: list[str] = []
        self.chars = 0
        self.stack: list[tuple[int, str]] = []  # (level, title) of the headings in force
        self.headings: set[int] = set()
        self.paths: list[tuple[int, str]] = []
        self.pages: list[tuple[int, int]] = []
        self.body = array.array("q")
        self.deadline = deadline

    def check(self, pending: int = 0) -> None:
        """Over time, or over the text bound with ``pending`` characters not yet added."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _TooSlow
        if self.chars + pending > MAX_TEXT_CHARS:
            raise Unparsable(f"larger than {MAX_TEXT_CHARS // 2**20} MB of extracted text")

    def page(self, number: int) -> None:
        self.pages.append((len(self.lines) + 1, number))

    def text(self, text: str) -> None:
        # One line per line the chunker will count (str.splitlines: \f and \u2028 end lines too).
        for line in _extracted(text).splitlines():
            line = line.rstrip()
            if line.strip():
                self.lines.append(line)
                self.body.append(len(self.lines))
                self.chars += len(line) + 1
        self.check()

    def heading(self, level: int, title: str) -> None:
        title = " ".join(_extracted(title).split())
        if not title:
            return
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, _short(title)))
        self.lines.append(title)
        self.headings.add(len(self.lines))
        self.paths.append((len(self.lines), heading_path(self.stack)))
        self.chars += len(title) + 1
        self.check()

    def document(self, what: str) -> Document:
        if not self.body:
            raise Unparsable("no text layer (a scanned PDF?)" if what == "PDF" else "empty")
        return Document(
            "\n".join(self.lines) + "\n", file_lines=False, headings=frozenset(self.headings),
            paths=tuple(self.paths), pages=tuple(self.pages), body=self.body,
        )  # fmt: skip


class _TooSlow(Exception):
    pass


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


def pdf(data: bytes) -> Document:
    """Text page by page; ``page`` is where each line is."""
    # The header may follow a little junk (the PDF specification allows 1 KB of it).
    if b"%PDF-" not in data[:1024]:
        raise Unparsable("not a PDF (no %PDF- header)")
    builder = _Builder(_deadline())
    return _guarded("PDF", lambda: _pdf(data, builder))


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

    shown = [0]  # characters of the page in hand so far

    def visit(text: str, *_: Any) -> None:  # called for each piece of text shown: a slow or huge page stops here
        shown[0] += len(text)
        builder.check(shown[0])

    for number, page in enumerate(reader.pages, start=1):
        builder.check()
        builder.page(number)
        shown[0] = 0
        builder.text(page.extract_text(visitor_text=visit))
    return builder.document("PDF")


# DOCX: WordprocessingML and OPC relationship names, as lxml spells them.
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_RELATIONSHIP = "{http://schemas.openxmlformats.org/package/2006/relationships}Relationship"
# What a run's children stand for in its text (as python-docx reads a run).
_DOCX_RUN_CHARS = {f"{_W}tab": "\t", f"{_W}ptab": "\t", f"{_W}cr": "\n", f"{_W}noBreakHyphen": "-"}
_DOCX_HEADING = re.compile(r"heading ?([0-9]+)")


def docx(data: bytes) -> Document:
    """Paragraphs and table rows in document order; paragraphs styled Title or Heading N are headings."""
    builder = _Builder(_deadline())
    return _guarded("DOCX", lambda: _docx(data, builder))


def _docx(data: bytes, builder: _Builder) -> Document:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        # What the archive declares first; then what is read, counted as it is read.
        if sum(info.file_size for info in archive.infolist()) > MAX_UNPACKED_BYTES:
            raise Unparsable(f"more than {MAX_UNPACKED_BYTES // 2**20} MB unpacked")
        budget = [MAX_UNPACKED_BYTES]
        main = _docx_part(archive, "", "officeDocument", budget, builder) or "word/document.xml"
        styles_part = _docx_part(archive, main, "styles", budget, builder)
        styles: dict[str, str] = {}
        if styles_part and styles_part in archive.NameToInfo:
            _xml(archive, styles_part, _DocxStyles(styles), budget, builder)
        _xml(archive, main, _DocxBody(builder, styles), budget, builder)
    return builder.document("DOCX")


def _docx_part(archive: zipfile.ZipFile, source: str, kind: str, budget: list[int], builder: _Builder) -> str | None:
    """The part that ``source`` (a part name; "" for the package) relates to by a relationship of ``kind``."""
    folder, name = posixpath.split(source)
    rels = posixpath.join(folder, "_rels", f"{name}.rels")
    if rels not in archive.NameToInfo:
        return None
    found: list[str] = []
    _xml(archive, rels, _DocxRelations(kind, found), budget, builder)
    if not found:
        return None
    return posixpath.normpath(posixpath.join("/", folder, found[0])).lstrip("/")


def _xml(archive: zipfile.ZipFile, part: str, target: Any, budget: list[int], builder: _Builder) -> None:
    """Stream one part of the archive through an lxml parser target: no tree is built."""
    from lxml import etree

    # No entities resolved, nothing fetched, libxml2's default depth and size limits.
    parser = etree.XMLParser(target=target, resolve_entities=False, no_network=True, huge_tree=False)
    with archive.open(part) as stream:
        while piece := stream.read(_PIECE):
            budget[0] -= len(piece)
            if budget[0] < 0:
                raise Unparsable(f"more than {MAX_UNPACKED_BYTES // 2**20} MB unpacked")
            parser.feed(piece)
            builder.check()
    parser.close()


class _DocxRelations:
    """Parser target: the targets of the relationships of one kind."""

    def __init__(self, kind: str, found: list[str]) -> None:
        self.kind = f"/{kind}"
        self.found = found

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if tag == _RELATIONSHIP and attrib.get("Type", "").endswith(self.kind) and "Target" in attrib:
            if attrib.get("TargetMode") != "External":
                self.found.append(attrib["Target"])

    def close(self) -> None:
        pass


class _DocxStyles:
    """Parser target: style id -> style name (``heading 1``) from styles.xml."""

    def __init__(self, styles: dict[str, str]) -> None:
        self.styles = styles
        self.current: str | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if tag == f"{_W}style":
            self.current = attrib.get(f"{_W}styleId")
        elif tag == f"{_W}name" and self.current is not None:
            self.styles.setdefault(self.current, attrib.get(f"{_W}val", ""))

    def end(self, tag: str) -> None:
        if tag == f"{_W}style":
            self.current = None

    def close(self) -> None:
        pass


class _DocxBody:
    """Parser target over word/document.xml: the body's paragraphs and its tables' rows.

    As python-docx reads them: paragraphs and tables that are children of the body, a
    table row as its cells' text joined by `` | ``; not text boxes, nested tables,
    deleted text or field codes. Only counters and the paragraph in hand are kept.
    """

    def __init__(self, builder: _Builder, styles: dict[str, str]) -> None:
        self.builder = builder
        self.styles = styles
        self.depth = 0
        self.events = 0
        self.body = 0  # depth of w:body
        self.table = 0  # depth of the body-level table in hand
        self.cell = 0  # depth of its cell in hand
        self.para = 0  # depth of the paragraph in hand (a body or cell paragraph)
        self.nested = 0  # paragraphs open inside it (text boxes): not its text
        self.run = 0  # depth of the run in hand
        self.in_text = False
        self.style: str | None = None
        self.pieces: list[str] = []
        self.size = 0  # characters in pieces
        self.cells: list[str] = []
        self.cell_lines: list[str] = []
        self.row_size = 0  # characters in cells and cell_lines: the row in hand, not yet in the builder

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self.depth += 1
        depth = self.depth
        self.events += 1
        if self.events % _EVERY == 0:
            self.builder.check(self.size + self.row_size)
        if tag == f"{_W}p":
            if self.para:
                self.nested += 1
            elif depth == self.body + 1 or (self.cell and depth == self.cell + 1):
                self.para, self.style, self.run = depth, None, 0
        elif not self.para:
            if tag == f"{_W}body" and not self.body:
                self.body = depth
            elif tag == f"{_W}tbl" and not self.table and self.body and depth == self.body + 1:
                self.table = depth
            elif tag == f"{_W}tr" and self.table and depth == self.table + 1:
                self.cells, self.row_size = [], 0
            elif tag == f"{_W}tc" and self.table and depth == self.table + 2:
                self.cell, self.cell_lines = depth, []
        elif self.nested:
            return
        elif tag == f"{_W}r":
            self.run = depth
        elif self.run and depth == self.run + 1:
            if tag == f"{_W}t":
                self.in_text = True
            elif tag in _DOCX_RUN_CHARS:
                self._add(_DOCX_RUN_CHARS[tag])
            elif tag == f"{_W}br" and attrib.get(f"{_W}type", "textWrapping") == "textWrapping":
                self._add("\n")
        elif tag == f"{_W}pStyle" and depth == self.para + 2:
            self.style = attrib.get(f"{_W}val")

    def data(self, text: str) -> None:
        if self.in_text:
            self._add(text)

    def _add(self, text: str) -> None:
        self.pieces.append(text)
        self.size += len(text)
        if self.size > 2**16 and len(self.pieces) > 1024:  # a long paragraph of many runs
            self.pieces[:] = ["".join(self.pieces)]
            self.builder.check(self.size + self.row_size)

    def end(self, tag: str) -> None:
        depth = self.depth
        self.depth -= 1
        if tag == f"{_W}p" and self.para:
            if self.nested:
                self.nested -= 1
            elif depth == self.para:
                self._paragraph()
        elif tag == f"{_W}t":
            self.in_text = False
        elif tag == f"{_W}r" and depth == self.run:
            self.run = 0
        elif tag == f"{_W}tc" and depth == self.cell:
            self.cells.append("\n".join(self.cell_lines).strip())
            self.cell = 0
        elif tag == f"{_W}tr" and self.table and depth == self.table + 1:
            self.builder.text(" | ".join(self.cells))
            self.cells, self.row_size = [], 0
        elif tag == f"{_W}tbl" and depth == self.table:
            self.table = 0

    def _paragraph(self) -> None:
        text = "".join(self.pieces)
        self.pieces, self.size, self.para = [], 0, 0
        if self.cell:
            self.cell_lines.append(text)
            self.row_size += len(text) + 1
            self.builder.check(self.row_size)  # a row's cells are joined only at its end
            return
        style = self.style
        level = _docx_level(self.styles.get(style, style)) if style else None
        if level is None:
            self.builder.text(text)
        else:
            self.builder.heading(level, text)

    def close(self) -> None:
        pass


def _docx_level(style: str | None) -> int | None:
    """Title is 0, ``Heading N`` (the name as Word stores it: ``heading 1``; or its id ``Heading1``) is N."""
    name = (style or "").strip().lower()
    if name == "title":
        return 0
    match = _DOCX_HEADING.fullmatch(name)
    return int(match.group(1)) if match else None


def html(data: bytes) -> Document:
    """Visible text (no head, script, style or hidden elements); h1-h6 are headings."""
    builder = _Builder(_deadline())
    return _guarded("HTML", lambda: _html(data, builder))


def _html(data: bytes, builder: _Builder) -> Document:
    from lxml import etree

    if not data.strip():
        raise Unparsable("empty")
    # UTF-8 when it is (checked piece by piece, not decoded whole); otherwise decoded here
    # by its BOM or declared charset, a byte the charset has no character for becoming
    # U+FFFD. (libxml2 left to decode stops at such a byte: the rest of the page was lost.)
    decoder = None if _is_utf8(data) else codecs.getincrementaldecoder(_html_charset(data))(errors="replace")
    parser = etree.HTMLParser(target=_HtmlText(builder), encoding="utf-8", no_network=True)
    for i in range(0, len(data), _PIECE):
        piece = data[i : i + _PIECE]
        parser.feed(piece if decoder is None else decoder.decode(piece).encode("utf-8"))
        builder.check()
    if decoder is not None:
        parser.feed(decoder.decode(b"", final=True).encode("utf-8"))
    try:
        parser.close()
    except etree.XMLSyntaxError:  # nothing libxml2 could call a document: no text either
        pass
    return builder.document("HTML")


# Where a page that is not UTF-8 says what it is, looked for in its first bytes (the HTML
# standard's prescan reads 1,024): a <meta> with a charset attribute, or one with
# http-equiv="Content-Type" and a content naming a charset; or an XML declaration at the
# very start.
_HTML_PRESCAN = 4096
_HTML_META = re.compile(rb"<meta\b([^>]*)>", re.IGNORECASE)
_HTML_ATTRIBUTE = re.compile(rb"""([^\s=/>]+)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)""")
_CONTENT_CHARSET = re.compile(rb"""charset\s*=\s*["']?([^\s"';]+)""", re.IGNORECASE)
_XML_ENCODING = re.compile(rb"""<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._:-]+)""")
# Python's codec for a label, where browsers read the label as a larger encoding (WHATWG
# Encoding: ASCII and Latin-1 are windows-1252, Shift_JIS is windows-31j, and so on).
_WHATWG = {
    "ascii": "cp1252", "iso8859-1": "cp1252", "iso8859-9": "cp1254", "iso8859-11": "cp874", "tis-620": "cp874",
    "shift_jis": "cp932", "gb2312": "gb18030", "gbk": "gb18030", "euc_kr": "cp949", "big5": "big5hkscs",
}  # fmt: skip


def _declared_charset(head: bytes) -> str:
    """The charset label a page declares in ``head`` (its first bytes), or ""."""
    if match := _XML_ENCODING.match(head.lstrip()):
        return match.group(1).decode("ascii")
    for meta in _HTML_META.finditer(head):
        attributes = {
            name.lower(): value.strip(b"\"'") for name, value in _HTML_ATTRIBUTE.findall(meta.group(1))
        }  # fmt: skip
        if attributes.get(b"charset"):
            return attributes[b"charset"].strip().decode("ascii", "replace")
        if attributes.get(b"http-equiv", b"").lower() == b"content-type":
            if match := _CONTENT_CHARSET.search(attributes.get(b"content", b"")):
                return match.group(1).decode("ascii", "replace")
    return ""


def _html_charset(data: bytes) -> str:
    """The Python codec for a page that is not UTF-8, as a browser would choose it: its BOM,
    else its declared charset (as WHATWG reads the label), else windows-1252; a UTF-16 label
    in ASCII-readable markup means UTF-8."""
    for bom, name in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return name
    label = _declared_charset(data[:_HTML_PRESCAN])
    try:
        name = codecs.lookup(label).name if label else "cp1252"
    except LookupError:
        return "cp1252"
    if name.startswith(("utf-16", "utf-32")):
        return "utf-8"
    return _WHATWG.get(name, name)


def _is_utf8(data: bytes) -> bool:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for i in range(0, len(data), _PIECE):
            decoder.decode(data[i : i + _PIECE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


class _HtmlText:
    """Parser target: visible text and headings go to the builder as libxml2 reads them.

    Only counters and the line in hand are kept: no tree, no stack of elements, so
    neither the number of elements nor their nesting depth costs memory or recursion.
    """

    def __init__(self, builder: _Builder) -> None:
        self.builder = builder
        self.events = 0
        self.hidden = 0  # depth inside an element whose content is not shown
        self.pre = 0  # depth inside <pre>: text kept as written
        self.level = 0  # the heading in hand (h1-h6), 0 for none
        self.inside = 0  # depth inside that heading
        self.pieces: list[str] = []  # text of the line (or heading, or <pre>) in hand
        self.size = 0

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self.events += 1
        if self.events % _EVERY == 0:
            self.builder.check(self.size)
        if self.hidden:
            self.hidden += 1
        elif (tag in _HTML_HIDDEN or "hidden" in attrib) and tag not in _HTML_VOID:
            self.hidden = 1
        elif self.level:
            self.inside += 1
            if tag in _HTML_BLOCKS:
                self._add(" ")
        elif self.pre:
            self.pre += 1
        elif tag in _HTML_HEADINGS:
            self._flush()
            self.level, self.inside = _HTML_HEADINGS[tag], 1
        elif tag == "pre":
            self._flush()
            self.pre = 1
        elif tag in _HTML_BLOCKS:
            self._flush()

    def end(self, tag: str) -> None:
        if self.hidden:
            self.hidden -= 1
        elif self.level:
            self.inside -= 1
            if self.inside <= 0:
                self.builder.heading(self.level, "".join(self.pieces))
                self.level, self.pieces, self.size = 0, [], 0
            elif tag in _HTML_BLOCKS:
                self._add(" ")
        elif self.pre:
            self.pre -= 1
            if not self.pre:
                self.builder.text("".join(self.pieces))
                self.pieces, self.size = [], 0
        elif tag in _HTML_BLOCKS:
            self._flush()

    def data(self, text: str) -> None:
        if not self.hidden:
            self._add(text)

    def _add(self, text: str) -> None:
        self.pieces.append(text)
        self.size += len(text)
        if len(self.pieces) > 4096:  # a long line of many elements: one string, not thousands
            self.pieces[:] = ["".join(self.pieces)]
            self.builder.check(self.size)

    def _flush(self) -> None:
        if self.pieces:
            self.builder.text(" ".join("".join(self.pieces).split()))
            self.pieces, self.size = [], 0

    def close(self) -> None:
        if self.level:
            self.builder.heading(self.level, "".join(self.pieces))
            self.level, self.pieces, self.size = 0, [], 0
        elif self.pre:
            self.builder.text("".join(self.pieces))
            self.pieces, self.size = [], 0
        self._flush()


def markdown(text: str) -> Document:
    """The file's own text and line numbers; ATX and setext headings (not ``#`` in code) start sections."""
    deadline = _deadline()
    return _guarded("Markdown", lambda: _markdown(text, deadline))


def _markdown(text: str, deadline: float) -> Document:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")  # nesting depth capped at 20 (maxNesting): no deep recursion
    # Blocks only: inline parsing (most of the cost) runs on heading titles alone.
    md.core.ruler.enableOnly(["normalize", "block"])

    def check(*_: Any) -> bool:  # the first block rule: called at every block, it matches none
        if time.monotonic() > deadline:
            raise _TooSlow
        return False

    md.block.ruler.before("table", "deadline", check)
    # And at every inline token of a heading's title: a crafted one is slow inside one call.
    md.inline.ruler.before("text", "deadline", lambda state, silent: check())
    env: dict[str, Any] = {}  # link reference definitions, shared by the windows
    titles: list[tuple[int, int, str]] = []  # (line, level, inline source) of each heading
    headings: set[int] = set()
    body = array.array("q")
    for first, lines, found in _markdown_windows(md, text, env):
        for start, stop, level, source in found:
            headings.update(range(start, stop + 1))
            titles.append((start, level, source))
        body.extend(n for n, line in enumerate(lines, start=first + 1) if line.strip() and n not in headings)
    paths: list[tuple[int, str]] = []
    stack: list[tuple[int, str]] = []
    for line, level, source in titles:
        if time.monotonic() > deadline:
            raise _TooSlow
        children: list[Any] = []
        md.inline.parse(source[:_MARKDOWN_TITLE_SOURCE], md, env, children)
        title = " ".join(_inline_text(children).split())
        if not title:
            continue
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, _short(title)))
        paths.append((line, heading_path(stack)))
    return Document(text, headings=frozenset(headings), paths=tuple(paths), body=body)


def _markdown_windows(
    md: Any, text: str, env: dict[str, Any]
) -> Iterator[tuple[int, list[str], list[tuple[int, int, int, str]]]]:
    """(lines before it, its lines, its headings) for each window of the text; a heading
    is (first line, last line, level, inline source), lines 1-based in the file.

    A window's last top-level block may go on past it: the next window starts there, so
    a file of blocks shorter than a window is parsed as a whole would be. A single block
    longer than a window (a huge list or code block) is cut where the window ends; a
    fenced code block or HTML block cut so goes on in the next window, whose source
    begins with the block's opening line again (``# comment`` in code stays code).
    """
    pos, first, opener = 0, 0, ""
    while pos < len(text):
        size = _MARKDOWN_WINDOW_CHARS
        while True:  # the window's lines and one more, whole (the last one read may be cut)
            window = text[pos : pos + size].splitlines(keepends=True)
            whole = pos + size >= len(text)
            if whole or len(window) > MARKDOWN_WINDOW_LINES + 1:
                break
            size *= 2
        if len(window) > MARKDOWN_WINDOW_LINES + 1:
            del window[MARKDOWN_WINDOW_LINES + 1 :]
            whole = False
        lines = [line.splitlines()[0] for line in window]
        shift = 1 if opener else 0  # the source's line of the window's first line
        tokens = md.parse("\n".join([opener, *lines] if opener else lines), env)
        keep, carried, opener = len(lines), opener, ""
        if not whole:
            # The line after the window tells whether the window's last block goes on.
            keep = MARKDOWN_WINDOW_LINES
            tops = [t for t in tokens if t.level == 0 and t.nesting >= 0 and t.map]
            last = tops[-1].map if tops else None
            if last is not None and last[0] > shift:
                keep = min(keep, last[0] - shift)  # the next window parses that block whole
            elif last is not None and last[1] - shift > keep and tops[-1].type in ("fence", "html_block"):
                opener = carried or lines[0]  # one block longer than the window
        found = [
            (first + t.map[0] - shift + 1, first + t.map[1] - shift, int(t.tag[1]), tokens[i + 1].content)
            for i, t in enumerate(tokens)
            if t.type == "heading_open" and t.map and shift <= t.map[0] < keep + shift
        ]
        yield first, lines[:keep], found
        pos += sum(len(line) for line in window[:keep])
        first += keep


def _inline_text(children: Iterable[Any]) -> str:
    out: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline", "text_special"):  # text_special: an entity or escape, decoded
            out.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            out.append(" ")
        elif child.children:
            out.append(_inline_text(child.children))
    return "".join(out)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
