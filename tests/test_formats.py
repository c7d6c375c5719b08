"""Document formats: real PDF, DOCX, HTML and Markdown files built here, indexed by the real
CLI and writer (``hash:384`` embedder), read back from Chroma with their page and heading."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from pipeline import formats
from pipeline.chunking import chunk_text
from pipeline.embedder import load_tokenizer
from tests.conftest import Proc, dump_collection, ledger_query, run_cli, start_worker, wait_for

MODEL = {"INDEXQ_MODEL": "hash:384"}
COLLECTION = "docs"
# Small chunks, so that a page or a section holds several.
CHUNKING = ("--chunk-tokens", "48", "--chunk-overlap", "8")


def make_pdf(pages: list[list[str]], password: str | None = None) -> bytes:
    """A PDF whose pages show these lines (Helvetica, one text object a page)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject({
            NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        })
    )  # fmt: skip
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        ops = ["BT /F1 11 Tf 14 TL 72 720 Td", *(f"({line}) Tj T*" for line in lines), "ET"]
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("User guide", 0)
    document.add_heading("Install", 1)
    document.add_paragraph("Install the wheel with pip and a virtual environment.")
    document.add_heading("From source", 2)
    document.add_paragraph("Clone the repository and run the build script.")
    document.add_heading("Use", 1)
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "indexq index"
    table.rows[0].cells[1].text = "enqueue a job"
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


HTML = b"""<!doctype html><html><head><title>Head title noise</title>
<style>body { color: red }</style><script>trackVisitor()</script></head>
<body><nav><h1>Handbook</h1></nav><!-- a comment -->
<p>The handbook says <b>hello</b> to every reader.</p><div hidden>invisible words</div>
<h2>Backups</h2><p>Backups are verified in a fresh process.</p><script>alert(1)</script>
<pre>indexq backup
  --json</pre></body></html>
"""

MARKDOWN = """Intro paragraph before any heading.

# Install

## From source

Run make in the source tree.

```sh
# not a heading: a comment in code
make install
```

# Use

Index a tree and wait.
"""


def page_lines(page: int, words: int = 3, tag: str = "") -> list[str]:
    """Lines whose every word names its page: a chunk's text says which page it began on."""
    return [" ".join(f"p{page}{tag}w{line}x{n}" for n in range(words)) for line in range(10)]


def pdf_pages(third: str = "") -> list[list[str]]:
    return [page_lines(1), page_lines(2), page_lines(3, tag=third)]


def build_corpus(root: Path) -> Path:
    root.mkdir()
    (root / "manual.pdf").write_bytes(make_pdf(pdf_pages()))
    (root / "guide.docx").write_bytes(make_docx())
    (root / "page.html").write_bytes(HTML)
    (root / "readme.md").write_text(MARKDOWN)
    (root / "locked.pdf").write_bytes(make_pdf([["a secret line"]], password="secret"))
    (root / "broken.docx").write_bytes(make_docx()[:400])
    (root / "scan.pdf").write_bytes(make_pdf([[], []]))
    (root / "fake.pdf").write_text("just text named like a PDF\n")
    return root


def index(home: Path, corpus: Path) -> dict[str, Any]:
    result = run_cli(home, "index", str(corpus), "-c", COLLECTION, *CHUNKING, "--json", **MODEL)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def wait_done(home: Path, job: str) -> None:
    """Until the writer owes the job nothing (its state as `indexq status` computes it)."""

    def done() -> bool:
        sql = "SELECT count(*) FROM chunks WHERE job=? AND state IN ('pending', 'embedded', 'deleting')"
        return ledger_query(home, sql, job) == [(0,)]

    wait_for(done, 120, f"job {job}")
    assert ledger_query(home, "SELECT count(*) FROM chunks WHERE job=? AND state='failed'", job) == [(0,)]


def embeddings(home: Path) -> int:
    return int(ledger_query(home, "SELECT value FROM meta WHERE key='embeddings'")[0][0])


def by_source(records: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for record in records.values():
        out.setdefault(Path(record["metadata"]["source"]).name, []).append(record)
    for chunks in out.values():
        chunks.sort(key=lambda r: r["metadata"]["ordinal"])
    return out


def first_page(text: str) -> int:
    """The page named by the first word of a PDF chunk (``p2w3x0`` is on page 2)."""
    return int(text.split()[0][1])


def test_documents_are_indexed_with_pages_and_headings_and_reindexed_by_change(
    tmp_path: Path, procs: list[Proc]
) -> None:
    corpus = build_corpus(tmp_path / "corpus")
    home = tmp_path / "home"
    writer = start_worker(procs, home, **MODEL)
    sub = index(home, corpus)
    reasons = {Path(s["source"]).name: s["reason"] for s in sub["skipped"]}
    assert reasons == {
        "locked.pdf": "encrypted PDF (a password is needed to read it)",
        "broken.docx": "cannot parse DOCX: File is not a zip file",
        "scan.pdf": "no text layer (a scanned PDF?)",
        "fake.pdf": "not a PDF (no %PDF- header)",
    }
    wait_done(home, sub["job"])
    first = embeddings(home)
    assert first == sub["chunks"] == sub["new"]

    # Unchanged files: nothing is embedded again, no chunk changes.
    again = index(home, corpus)
    assert (again["new"], again["changed"], again["unchanged"], again["stale"]) == (0, 0, sub["chunks"], 0)
    wait_done(home, again["job"])
    assert embeddings(home) == first

    # Page 3 of the PDF changes and the DOCX breaks: only page 3's chunks are embedded
    # again, and the DOCX's chunks go (a file that no longer parses, like an emptied one).
    (corpus / "manual.pdf").write_bytes(make_pdf(pdf_pages(third="edited")))
    (corpus / "guide.docx").write_bytes(make_docx()[:300])
    before = dump_collection_live(home)
    third = index(home, corpus)
    assert {Path(s["source"]).name: s["reason"] for s in third["skipped"]}["guide.docx"] == (
        "cannot parse DOCX: File is not a zip file"
    )
    wait_done(home, third["job"])
    assert writer.terminate() == 0
    records = dump_collection(home / "chroma", COLLECTION)
    docs = by_source(records)
    assert "guide.docx" not in docs
    assert third["stale"] >= len(before["guide.docx"]) >= 2
    changed = {i for i, r in records.items() if i not in _ids(before) or _text(before, i) != r["document"]}
    assert changed and all(records[i]["metadata"]["page"] >= 2 for i in changed)
    assert all("edited" in records[i]["document"] for i in changed)
    assert third["changed"] + third["new"] == len(changed)
    assert embeddings(home) == first + len(changed)

    # PDF: the text of its pages, in order; `page` is where each chunk begins; no line numbers.
    pdf = docs["manual.pdf"]
    assert len(pdf) >= 4
    assert {c["metadata"]["page"] for c in pdf} == {1, 2, 3}
    for chunk in pdf:
        assert chunk["metadata"]["page"] == first_page(chunk["document"])
        assert "start_line" not in chunk["metadata"] and "heading" not in chunk["metadata"]
        assert "Tj" not in chunk["document"] and "BT" not in chunk["document"]
    words = " ".join(c["document"] for c in pdf).split()
    assert words[0] == "p1w0x0" and words[-1] == "p3editedw9x2"

    # HTML: visible text only, with its heading path.
    html = docs["page.html"]
    text = "\n".join(c["document"] for c in html)
    for noise in ("Head title noise", "color: red", "trackVisitor", "alert(1)", "a comment", "invisible words"):
        assert noise not in text
    assert "The handbook says hello to every reader." in text
    assert "indexq backup\n  --json" in text
    heading = {line: c["metadata"].get("heading") for c in html for line in c["document"].splitlines()}
    assert heading["The handbook says hello to every reader."] == "Handbook"
    assert heading["Backups are verified in a fresh process."] == "Handbook > Backups"
    assert all("start_line" not in c["metadata"] for c in html)

    # Markdown: the file's own text and lines, a chunk per section, its heading path.
    md = docs["readme.md"]
    sections = [(c["metadata"].get("heading"), c["document"].split("\n", 1)[0]) for c in md]
    assert sections == [
        (None, "Intro paragraph before any heading."),
        ("Install > From source", "# Install"),
        ("Use", "# Use"),
    ]
    lines = MARKDOWN.splitlines(keepends=True)
    assert (md[1]["metadata"]["start_line"], md[1]["metadata"]["end_line"]) == (3, 13)
    assert md[1]["document"] == "".join(lines[2:13])
    assert "# not a heading: a comment in code" in md[1]["document"]

    # `indexq search` names a chunk's page and heading path beside its source.
    found = run_cli(home, "search", "handbook", "-c", COLLECTION, "-k", str(len(records)), **MODEL)
    assert found.returncode == 0, found.stderr
    wheres = {line.split("  ", 1)[1] for line in found.stdout.splitlines() if line[:1].isdigit()}
    assert f"{corpus.resolve() / 'readme.md'}:3-13 (Install > From source)" in wheres
    assert {f"{corpus.resolve() / 'manual.pdf'} page {n}" for n in (1, 2, 3)} <= wheres
    assert f"{corpus.resolve() / 'page.html'} (Handbook > Backups)" in wheres


def dump_collection_live(home: Path) -> dict[str, list[dict[str, Any]]]:
    """Chunks as the ledger holds them (the writer is running: Chroma is its alone)."""
    rows = ledger_query(
        home, "SELECT id, source, text FROM chunks WHERE collection=? AND state='committed'", COLLECTION
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for id_, source, text in rows:
        out.setdefault(Path(source).name, []).append({"id": id_, "document": text})
    return out


def _ids(grouped: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {c["id"] for chunks in grouped.values() for c in chunks}


def _text(grouped: dict[str, list[dict[str, Any]]], id_: str) -> str:
    return next(c["document"] for chunks in grouped.values() for c in chunks if c["id"] == id_)


def test_markdown_sections_start_chunks_without_overlap_from_the_section_before() -> None:
    tokenizer = load_tokenizer("hash:384")
    text = "Title\n=====\n\n" + "alpha beta gamma\n" * 12 + "## Part two\n\n" + "delta epsilon\n" * 3
    doc = formats.markdown(text)
    chunks = chunk_text(doc.text, tokenizer, 48, 8, headings=doc.headings)
    places = [doc.place(c.start_line, c.end_line) for c in chunks]
    assert chunks[-1].text == "## Part two\n\n" + "delta epsilon\n" * 3
    assert places[-1] == {"start_line": 16, "end_line": 20, "heading": "Title > Part two"}
    assert chunks[0].text.startswith("Title\n=====\n") and places[0]["heading"] == "Title"
    assert all(p["heading"] == "Title" for p in places[:-1])
    # Without headings the same text is chunked as plain text: across the heading.
    plain = chunk_text(text, tokenizer, 48, 8)
    assert [c.text for c in plain] != [c.text for c in chunks]


def test_bounds_skip_a_file_with_their_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.corpus import content_gone

    data = make_pdf(pdf_pages())
    monkeypatch.setattr(formats, "MAX_PDF_PAGES", 2)
    with pytest.raises(formats.Unparsable, match=r"^more than 2 pages \(3\)$") as pages:
        formats.pdf(data)
    monkeypatch.setattr(formats, "MAX_PDF_PAGES", 10)
    monkeypatch.setattr(formats, "MAX_PARSE_SECONDS", 0.0)
    with pytest.raises(formats.Unparsable, match=r"^parse took over 0 s$") as slow:
        formats.pdf(data)
    monkeypatch.setattr(formats, "MAX_UNPACKED_BYTES", 2**20)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", b" " * (2 * 2**20))
    with pytest.raises(formats.Unparsable, match=r"^more than 1 MB unpacked$") as unpacked:
        formats.docx(bomb.getvalue())
    # A file over a bound has lost its content (old chunks are stale); a slow parse has not.
    assert content_gone(pages.value.reason) and content_gone(unpacked.value.reason)
    assert not content_gone(slow.value.reason)


def docx_of(document_xml: bytes) -> bytes:
    """A DOCX made by python-docx whose word/document.xml is replaced by this one."""
    base = io.BytesIO()
    import docx

    docx.Document().save(base)
    out = io.BytesIO()
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, document_xml if info.filename == "word/document.xml" else src.read(info))
    return out.getvalue()


W_DOCUMENT = b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>%s</w:body></w:document>'


def test_every_parser_stops_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.corpus import content_gone

    monkeypatch.setattr(formats, "MAX_PARSE_SECONDS", 0.0)
    for kind, data in (("html", HTML), ("docx", make_docx()), ("markdown", MARKDOWN), ("pdf", make_pdf(pdf_pages()))):
        with pytest.raises(formats.Unparsable, match=r"^parse took over 0 s$") as slow:
            formats.parse(kind, data)
        assert not content_gone(slow.value.reason)


def test_html_and_docx_stream_through_parser_targets_without_a_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither parser asks lxml for a tree (no BeautifulSoup, no python-docx, no etree.fromstring/parse):
    libxml2 calls a target for each element, which keeps counters and the line in hand."""
    import sys

    from lxml import etree

    document = make_docx()  # python-docx writes it; reading it needs neither python-docx nor a tree

    def no_tree(*_: Any, **__: Any) -> None:
        raise AssertionError("a tree was built")

    for name in ("fromstring", "parse", "XML", "HTML", "iterparse"):
        monkeypatch.setattr(etree, name, no_tree)
    for module in ("bs4", "docx"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it fails
    assert formats.html(HTML).text.startswith("Handbook\nThe handbook says hello to every reader.\n")
    assert formats.docx(document).paths == (
        (1, "User guide"), (2, "User guide > Install"), (4, "User guide > Install > From source"),
        (6, "User guide > Use"),
    )  # fmt: skip


def test_docx_streamed_reads_paragraphs_runs_and_tables_as_python_docx_does() -> None:
    body = (
        b'<w:p><w:pPr><w:pStyle w:val="Heading2"/><w:tabs><w:tab w:val="left" w:pos="720"/></w:tabs></w:pPr>'
        b"<w:r><w:t>Setup</w:t></w:r></w:p>"
        b'<w:p><w:r><w:t xml:space="preserve">a </w:t><w:tab/><w:t>b</w:t><w:br/><w:t>c</w:t>'
        b'<w:br w:type="page"/><w:instrText>PAGE</w:instrText></w:r>'
        b"<w:del><w:r><w:delText>gone</w:delText></w:r></w:del>"
        b"<w:hyperlink><w:r><w:t>link</w:t></w:r></w:hyperlink></w:p>"
        b"<w:tbl><w:tr><w:tc><w:p><w:r><w:t>c1</w:t></w:r></w:p></w:tc>"
        b"<w:tc><w:p><w:r><w:t>c2</w:t></w:r></w:p><w:tbl><w:tr><w:tc><w:p><w:r><w:t>nested</w:t></w:r></w:p>"
        b"</w:tc></w:tr></w:tbl></w:tc></w:tr></w:tbl>"
    )
    doc = formats.docx(docx_of(W_DOCUMENT % body))
    assert doc.text == "Setup\na \tb\nclink\nc1 | c2\n"
    assert doc.paths == ((1, "Setup"),) and doc.headings == frozenset({1})


def test_docx_unpacked_size_is_counted_while_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    data = docx_of(W_DOCUMENT % (b"<w:p><w:r><w:t>word</w:t></w:r></w:p>" * 40_000))
    monkeypatch.setattr(formats, "MAX_UNPACKED_BYTES", 2**20)
    with pytest.raises(formats.Unparsable, match=r"^more than 1 MB unpacked$"):
        formats.docx(data)  # by the sizes the archive declares
    # An archive that declares no sizes (as a lying header would): what is read is counted.
    monkeypatch.setattr(zipfile.ZipFile, "infolist", lambda self: [])
    with pytest.raises(formats.Unparsable, match=r"^more than 1 MB unpacked$"):
        formats.docx(data)
    monkeypatch.setattr(formats, "MAX_UNPACKED_BYTES", 2 * 2**20)
    assert formats.docx(data).text == "word\n" * 40_000


def test_deep_nesting_parses_without_recursion() -> None:
    depth = 100_000
    html = b"<div>" * depth + b"<h2>Deep <b>heading</b></h2><p>deep text</p>" + b"</div>" * depth
    doc = formats.html(html)
    assert doc.text == "Deep heading\ndeep text\n" and doc.paths == ((1, "Deep heading"),)
    assert formats.html(b"<span>" * depth + b"x").text == "x\n"
    # markdown-it stops nesting at 20 levels (maxNesting); inline titles are flat tokens.
    assert formats.markdown("> " * depth + "quoted\n\n# Next\n").paths == ((3, "Next"),)
    brackets = "[" * depth + "title" + "]" * depth
    assert formats.markdown(f"# {brackets}\n").paths == ((1, brackets[: formats.MAX_HEADING_CHARS - 1] + "…"),)
    stars = "*" * ((formats._MARKDOWN_TITLE_SOURCE - 1) // 2)  # a title's source is parsed up to that length
    assert formats.markdown(f"# {stars}x{stars}\n").paths == ((1, "x"),)
    assert formats.markdown("- " * depth + "item\n").body
    xml = W_DOCUMENT % (b"<w:sdt>" * depth + b"</w:sdt>" * depth + b"<w:p><w:r><w:t>after</w:t></w:r></w:p>")
    assert formats.docx(docx_of(xml)).text == "after\n"


def test_markdown_in_windows_finds_what_one_parse_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows end before their last top-level block: headings, paths and body lines are those of
    one parse, and a fenced block longer than a window keeps its ``# comment`` lines code."""
    text = MARKDOWN * 3 + "\nSetext\n======\n\n[ref]: https://example.org\n\n## [ref] link\n"
    whole = formats.markdown(text)
    monkeypatch.setattr(formats, "MARKDOWN_WINDOW_LINES", 4)
    monkeypatch.setattr(formats, "_MARKDOWN_WINDOW_CHARS", 16)
    windows = formats.markdown(text)
    assert (windows.headings, windows.paths, list(windows.body)) == (whole.headings, whole.paths, list(whole.body))
    assert whole.paths[-1] == (len(text.splitlines()), "Setext > ref link")
    fence = "# Top\n\n```\n" + "# code\n" * 20 + "```\n\n## After\n"
    doc = formats.markdown(fence)
    assert doc.paths == ((1, "Top"), (26, "Top > After"))  # a 22-line block, windows of 4


def test_a_markdown_parser_failure_skips_the_file_and_the_job_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.corpus import content_gone, read_groups

    for name in ("a.md", "b.md", "c.txt", "d.md"):
        (tmp_path / name).write_text(f"# {name}\n\ntext of {name}\n")
    real = formats._markdown

    def flaky(text: str, deadline: float) -> formats.Document:
        if "b.md" in text:
            raise RecursionError("maximum recursion depth exceeded")
        if "d.md" in text:
            raise formats.Unparsable("larger than 16 MB of extracted text")
        return real(text, deadline)

    monkeypatch.setattr(formats, "_markdown", flaky)
    files = sorted(tmp_path.iterdir())
    read = {path.name: doc for group in read_groups(files) for path, doc in group}
    assert {n: getattr(d, "reason", None) for n, d in read.items()} == {
        "a.md": None, "b.md": "cannot parse Markdown: maximum recursion depth exceeded", "c.txt": None,
        "d.md": "larger than 16 MB of extracted text",
    }  # fmt: skip
    assert read["a.md"].paths == ((1, "a.md"),)  # type: ignore[union-attr]
    assert content_gone("cannot parse Markdown: maximum recursion depth exceeded")


def test_a_long_heading_is_cut_in_the_path_every_chunk_carries() -> None:
    # One heading line of 200 KB: before, each of its ~180 chunks carried all of it (twice).
    title = " ".join(f"word{n}" for n in range(30_000))
    cut = title[: formats.MAX_HEADING_CHARS - 1] + "…"
    for doc in (formats.markdown(f"# {title}\n\nbody\n"), formats.html(f"<h1>{title}</h1><p>body</p>".encode())):
        assert doc.paths[0][1] == cut
        assert title in doc.text  # the heading's text itself is still indexed, all of it
        assert doc.place(1, 3)["heading"] == cut
    # Six levels of 300 characters: the path keeps its innermost titles, after "…".
    levels = "".join(f"<h{n}>{chr(96 + n) * 300}</h{n}>" for n in range(1, 7)) + "<p>body</p>"
    path = formats.html(levels.encode()).paths[-1][1]
    assert len(path) == formats.MAX_HEADING_PATH_CHARS and path.startswith("…")
    assert path.endswith(" > " + "f" * (formats.MAX_HEADING_CHARS - 1) + "…")


def test_a_pdf_pypdf_reads_past_flaws_in_leaves_the_error_one_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "trunc.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n")  # no xref, no %%EOF
    result = run_cli(tmp_path / "home", "index", str(corpus), "-c", "docs", INDEXQ_MODEL="hash:384")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"Error: no indexable text under {corpus} (1 cannot parse PDF skipped)"]


def make_pdf_font(content: bytes, font: dict[str, Any], cmap: bytes | None = None) -> bytes:
    """A one-page PDF showing ``content`` (content-stream operators) in a font of these entries,
    with this ToUnicode CMap."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    entries = {NameObject(k): NameObject(v) for k, v in font.items()}
    if cmap is not None:
        unicode_map = DecodedStreamObject()
        unicode_map.set_data(cmap)
        entries[NameObject("/ToUnicode")] = writer._add_object(unicode_map)
    page = writer.add_blank_page(612, 792)
    stream = DecodedStreamObject()
    stream.set_data(content)
    page[NameObject("/Contents")] = writer._add_object(stream)
    page[NameObject("/Resources")] = DictionaryObject(
        {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(DictionaryObject(entries))})}
    )
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


HELVETICA = {"/Type": "/Font", "/Subtype": "/Type1", "/BaseFont": "/Helvetica"}
# A ToUnicode map that sends "A" to a lone surrogate, as a broken or hostile font may.
SURROGATE_CMAP = b"""/CIDInit /ProcSet findresource begin 12 dict begin begincmap /CMapName /X def
1 begincodespacerange <00> <FF> endcodespacerange
2 beginbfchar <41> <D800> <42> <0042> endbfchar
endcmap CMapName currentdict /CMap defineresource pop end end"""


def test_a_pdf_font_that_maps_to_a_lone_surrogate_is_read_with_a_replacement_character() -> None:
    # The tokenizer raised TypeError on the surrogate: the producer crashed and the job was lost.
    doc = formats.pdf(make_pdf_font(b"BT /F1 12 Tf 72 720 Td (AB hello) Tj ET", HELVETICA, SURROGATE_CMAP))
    assert "\ufffd" in doc.text and "hello" in doc.text
    doc.text.encode("utf-8")  # no lone surrogate left
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    assert chunk_text(doc.text, tokenizer, 48, 8)


def test_an_aes_encrypted_pdf_with_only_an_owner_password_is_read() -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf([["restricted but readable"]]))))
    writer.encrypt(user_password="", owner_password="owner", algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    assert formats.pdf(out.getvalue()).text == "restricted but readable\n"


def test_a_pdf_page_over_the_text_bound_stops_while_its_text_is_extracted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted as pypdf shows each piece, not once the whole page is a string (1.15 GB for one page).
    monkeypatch.setattr(formats, "MAX_TEXT_CHARS", 500)
    added: list[str] = []
    monkeypatch.setattr(formats._Builder, "text", lambda self, text: added.append(text))
    content = b"BT /F1 12 Tf 72 720 Td " + (b"(" + b"a" * 100 + b") Tj 0 -14 Td ") * 20 + b"ET"
    with pytest.raises(formats.Unparsable, match=r"^larger than 0 MB of extracted text$"):
        formats.pdf(make_pdf_font(content, HELVETICA))
    assert added == []


def test_a_docx_table_row_counts_its_cells_against_the_text_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cells of a row were joined, and counted, only at the row's end: 250 cells of 1 MB
    # took the producer to 2 GB. Here the row goes on past the bound into XML that does not
    # parse: counted cell by cell, the bound is met first.
    monkeypatch.setattr(formats, "MAX_TEXT_CHARS", 1000)
    cell = b"<w:tc><w:p><w:r><w:t>" + b"x" * 400 + b"</w:t></w:r></w:p></w:tc>"
    row = b"<w:tbl><w:tr>" + cell * 400 + b"<w:tc><w:p><oops" + b"</w:tr></w:tbl>"
    with pytest.raises(formats.Unparsable, match=r"^larger than 0 MB of extracted text$"):
        formats.docx(docx_of(W_DOCUMENT % row))


def test_html_void_elements_and_undecodable_bytes_hide_no_text() -> None:
    # libxml2 2.14 nests what follows an <embed> (or <source hidden>, <wbr hidden>) inside it.
    for void in (b"<embed src='v.mp4'>", b"<video><source src='v.mp4' hidden></video>", b"<wbr hidden>"):
        doc = formats.html(b"<h1>Intro</h1><p>before</p>" + void + b"<h2>Install</h2><p>after it</p>")
        assert doc.text == "Intro\nbefore\nInstall\nafter it\n", void
        assert doc.paths[-1] == (3, "Intro > Install")
    # A byte the declared charset has no character for stopped libxml2: the rest was lost.
    later = b"".join(b"<p>later %d</p>" % n for n in range(50))
    for head, byte, word in (
        (b'<meta charset="windows-1252">', b"\x81", "caf\u00e9"),
        (b'<meta charset="us-ascii">', b"", "caf\u00e9"),  # read as windows-1252, as browsers do
        (b'<meta http-equiv="Content-Type" content="text/html; charset=shift_jis">', b"\xff", "caf"),
        (b'<meta charset="utf-8">', b"\xff", "caf"),
        (b"", b"\x81", "caf\u00e9"),
    ):
        doc = formats.html(b"<html><head>" + head + b"</head><body><p>caf\xe9 " + byte + b" one</p>" + later)
        assert doc.text.startswith(word) and doc.text.endswith("later 49\n"), (head, doc.text[:40])
    assert formats.html("<p>Grüße</p>".encode("utf-16")).text == "Grüße\n"
    # Labels as browsers read them, and only a meta's own charset (or Content-Type) counts.
    page = '<meta charset="shift_jis"><p>①② ～ text</p>'
    assert formats.html(page.encode("cp932")).text == "①② ～ text\n"
    page = '<meta name="x" content="charset=utf-8"><meta charset="koi8-r"><p>Привет</p>'
    assert formats.html(page.encode("koi8-r")).text == "Привет\n"


def test_markdown_heading_titles_decode_entities_and_escapes_and_parse_a_bounded_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = formats.markdown("# Caf&eacute; &amp; Bar\n\n## C\\# guide\n\n## Step &#49;: *install*\n\nbody\n")
    assert [path for _, path in doc.paths] == ["Café & Bar", "Café & Bar > C# guide", "Café & Bar > Step 1: install"]
    # Inline parsing of a crafted heading grows with the square of its length ("![" a million
    # times: 60 s in one call): it reads a prefix long enough for the title it keeps.
    from markdown_it.parser_inline import ParserInline

    sizes: list[int] = []
    parse = ParserInline.parse
    monkeypatch.setattr(ParserInline, "parse", lambda self, src, *a: (sizes.append(len(src)), parse(self, src, *a))[1])
    doc = formats.markdown("# " + "![" * 1_000_000 + "\n\nbody\n")
    assert sizes == [formats._MARKDOWN_TITLE_SOURCE]
    assert doc.paths == ((1, "![" * 99 + "!…"),)


def test_line_numbers_are_the_files_own_whatever_else_str_splitlines_ends_a_line_at() -> None:
    # A form feed (CPython's sources hold them), a vertical tab or U+2028 ends a line for
    # str.splitlines, not for an editor or grep -n: the chunks' lines were off by one each.
    text = "one\x0ctwo\nthree\u2028four\x0bfive\r\nsix\rseven\n"
    doc = formats.Document(text)
    assert [doc.place(n, n)["start_line"] for n in range(1, 8)] == [1, 1, 2, 2, 2, 3, 4]
    assert doc.place(2, 7) == {"start_line": 1, "end_line": 4}
    assert formats.Document("a\nb\r\nc\rd\n").place(2, 4) == {"start_line": 2, "end_line": 4}
