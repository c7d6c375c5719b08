"""Retrieval benchmark: do the right files come back for the questions a developer asks?

    python -m ops.tools.retrieval                      # every variant, about ten minutes here
    python -m ops.tools.retrieval --variants none,path2

Copies standard-library packages (email, json, http, logging) into a scratch corpus,
chunks it through indexq's producer into a scratch data home (the chunks, their text and
metadata are the ledger's rows, exactly what the writer embeds), embeds the chunks with
the real model once per variant of the embedded text, and ranks every chunk against each
question by cosine similarity (exact: no approximate index in the way). Figures:

- hit@3: an answer file among the top 3 chunks (what ``indexq search -n 3`` shows);
- MRR: the mean of 1/rank of the first answer file, files ranked by their best chunk.

The questions (``QUESTIONS``) were written by reading the code, not from the chunks.
Prints a table and writes JSON. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from ops.tools.context import HEADER_TOKENS, embed_text
from pipeline.config import DEFAULT_MODEL, Config
from pipeline.embedder import load_embedder, load_tokenizer
from pipeline.ids import content_hash
from pipeline.ledger import Ledger
from pipeline.producer import Producer
from pipeline.rows import PENDING

PACKAGES = ("email", "json", "http", "logging")
SUFFIXES = (".py", ".rst")
COLLECTION = "retrieval"
K = 3
EMBED_BATCH = 64

# (question, files that answer it), paths relative to the corpus root.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    # email
    ("How do I parse a raw email message from bytes?", ("email/__init__.py", "email/parser.py")),
    ("How can I feed an email to the parser bit by bit as it arrives from a socket?", ("email/feedparser.py",)),
    ("How do I format the current date for the Date header of an email?", ("email/utils.py",)),
    ("How do I generate a unique Message-ID for an outgoing email?", ("email/utils.py",)),
    (
        "How do I split 'John Smith <john@example.com>' into the name and the address?",
        ("email/utils.py", "email/_parseaddr.py"),
    ),
    ("How do I turn the date string of a received email into a datetime?", ("email/utils.py", "email/_parseaddr.py")),
    (
        "How do I decode a header like =?utf-8?q?caf=C3=A9?= into readable text?",
        ("email/header.py", "email/_encoded_words.py"),
    ),
    (
        "How do I attach a PDF file to an email?",
        ("email/message.py", "email/contentmanager.py", "email/mime/application.py"),
    ),
    (
        "How do I build an email with both a plain text and an HTML version of the body?",
        ("email/message.py", "email/mime/multipart.py"),
    ),
    ("How do I turn a message object back into bytes to send it over SMTP?", ("email/generator.py",)),
    (
        "How are long header lines folded to stay under the maximum line length?",
        ("email/_header_value_parser.py", "email/header.py", "email/policy.py", "email/_policybase.py"),
    ),
    ("How do I loop over every part of a multipart message?", ("email/iterators.py", "email/message.py")),
    ("How do I get the body of an email, preferring plain text over HTML?", ("email/message.py",)),
    ("How do I list the attachments of an email I received?", ("email/message.py",)),
    (
        "What happens when a multipart message has no boundary parameter?",
        ("email/errors.py", "email/feedparser.py"),
    ),
    ("How do I base64-encode the payload of a MIME part?", ("email/encoders.py", "email/base64mime.py")),
    ("How does quoted-printable encoding of a body work?", ("email/quoprimime.py", "email/encoders.py")),
    ("How do I register a new character set and its codec for emails?", ("email/charset.py",)),
    ("Which policy do I use to get CRLF line endings for SMTP?", ("email/policy.py",)),
    (
        "What is the difference between the compat32 policy and the default policy?",
        ("email/_policybase.py", "email/policy.py"),
    ),
    ("How do I read the charset parameter of the Content-Type header?", ("email/message.py",)),
    ("How do I set the filename parameter on the Content-Disposition header?", ("email/message.py",)),
    (
        "How is an address header parsed into objects with a username and a domain?",
        ("email/headerregistry.py", "email/_header_value_parser.py"),
    ),
    ("How do I attach an image and have its subtype guessed from the bytes?", ("email/mime/image.py",)),
    ("How is the type of an audio file detected when I attach it?", ("email/mime/audio.py",)),
    (
        "How do I forward an email as an attachment of another message (message/rfc822)?",
        ("email/mime/message.py", "email/contentmanager.py"),
    ),
    (
        "How are RFC 2231 parameters like filename*=utf-8''r%C3%A9sum%C3%A9.pdf decoded?",
        ("email/utils.py", "email/_header_value_parser.py", "email/message.py"),
    ),
    ("How do I print the tree of MIME types of a message for debugging?", ("email/iterators.py",)),
    ("How do I parse only the headers of an email and skip the body?", ("email/parser.py",)),
    ("How does set_content choose between quoted-printable and base64 for a text part?", ("email/contentmanager.py",)),
    ("Which class handles each header name, such as To or Date?", ("email/headerregistry.py",)),
    (
        "How do I encode a non-ASCII subject so that it is valid in a header?",
        ("email/header.py", "email/_encoded_words.py", "email/charset.py"),
    ),
    (
        "How do the parser, the generator and the policies of the email package fit together?",
        ("email/architecture.rst",),
    ),
    ("How are uuencoded payloads decoded?", ("email/message.py",)),
    (
        "How do I get the decoded bytes of a part whatever its Content-Transfer-Encoding?",
        ("email/message.py", "email/contentmanager.py"),
    ),
    ("How do I format a name and an address for the From header, quoting the name?", ("email/utils.py",)),
    ("How do I get every address from the To and Cc headers as a list?", ("email/utils.py",)),
    (
        "Why does a line starting with 'From ' in the body get a '>' in front of it?",
        ("email/generator.py", "email/_policybase.py"),
    ),
    # json
    ("How do I pretty-print a JSON file from the command line?", ("json/tool.py",)),
    ("How do I make JSON serialization work for my own objects, such as a datetime?", ("json/encoder.py",)),
    ("How do I sort the keys and indent the output when I dump JSON?", ("json/__init__.py", "json/encoder.py")),
    ("Where does the JSON parser report the line and column of a syntax error?", ("json/decoder.py",)),
    ("How are escape sequences and surrogate pairs in JSON strings decoded?", ("json/decoder.py",)),
    ("How do I load JSON objects into an OrderedDict or my own class?", ("json/decoder.py", "json/__init__.py")),
    ("How does loading JSON from bytes tell UTF-8 from UTF-16 or UTF-32?", ("json/__init__.py",)),
    ("What happens to NaN and infinity when floats are written as JSON?", ("json/encoder.py",)),
    ("How does the parser decide which kind of JSON value comes next?", ("json/scanner.py",)),
    # http
    ("How do I start a simple web server that serves the files of a directory?", ("http/server.py",)),
    ("How do I send a POST request with a body and headers on a plain HTTP connection?", ("http/client.py",)),
    ("How is a response with chunked transfer encoding read?", ("http/client.py",)),
    ("How do I open an HTTPS connection with my own SSL context?", ("http/client.py",)),
    ("How do I set a cookie with an expiry date and the HttpOnly flag?", ("http/cookies.py",)),
    (
        "How are cookies kept between requests and sent back only to the right domains?",
        ("http/cookiejar.py",),
    ),
    ("How do I load cookies from a Netscape cookies.txt file?", ("http/cookiejar.py",)),
    ("What are the numeric code and the phrase of the 404 status?", ("http/__init__.py",)),
    ("How do I run CGI scripts from a development web server?", ("http/server.py",)),
    ("How does a request handler read the request line and send back an error page?", ("http/server.py",)),
    ("How do I tunnel an HTTP connection through a proxy with CONNECT?", ("http/client.py",)),
    ("What is raised when the server closes the connection before sending a status line?", ("http/client.py",)),
    # logging
    ("How do I rotate log files when they reach a maximum size?", ("logging/handlers.py",)),
    ("How do I start a new log file every midnight and keep a week of old ones?", ("logging/handlers.py",)),
    ("How do I configure logging from a dictionary loaded from YAML?", ("logging/config.py",)),
    ("How do I send log messages to syslog?", ("logging/handlers.py",)),
    ("How do I log from many threads through a queue so slow handlers do not block?", ("logging/handlers.py",)),
    ("How do I email error logs to an administrator?", ("logging/handlers.py",)),
    ("How do I use {}-style format strings instead of % in log formats?", ("logging/__init__.py",)),
    ("How do I add a custom level name such as TRACE?", ("logging/__init__.py",)),
    ("How do messages propagate from a child logger to its parents' handlers?", ("logging/__init__.py",)),
    ("How do I read an INI-style logging configuration file?", ("logging/config.py",)),
    ("How do I include the exception traceback in a log message?", ("logging/__init__.py",)),
    ("How do I change the logging configuration of a running program over a socket?", ("logging/config.py",)),
]


# ---- what is embedded: one function per variant -----------------------------------------------


def _tail(source: str, parts: int) -> str:
    return "/".join(Path(source).parts[-parts:])


Header = Callable[[str, Mapping[str, Any]], str]


def _plain(text: str, metadata: Mapping[str, Any]) -> str:
    return text


def _path(parts: int, label: str = "") -> Header:
    def build(text: str, metadata: Mapping[str, Any]) -> str:
        return f"{label}{_tail(metadata['source'], parts)}\n\n{text}"

    return build


def _full(text: str, metadata: Mapping[str, Any]) -> str:
    # LlamaIndex's default for files: "file_path: <absolute path>", a blank line, the text.
    return f"file_path: {metadata['source']}\n\n{text}"


def _product(text: str, metadata: Mapping[str, Any]) -> str:
    return embed_text(text, metadata)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    build: Header
    # Leave room in the chunk for a header (chunks cut shorter by the header's reserve).
    reserve: bool
    about: str


VARIANTS = {
    v.name: v
    for v in (
        Variant("none", _plain, False, "the chunk's text only, full-size chunks (indexq 0.x)"),
        Variant("none-short", _plain, True, "text only, chunks cut short by the header reserve (control)"),
        Variant("name", _path(1), True, "file name, blank line, text"),
        Variant("path2", _path(2), True, "last 2 path parts (email/message.py), blank line, text"),
        Variant("path3", _path(3), True, "last 3 path parts, blank line, text"),
        Variant("file-path2", _path(2, "file: "), True, "'file: ' and the last 2 path parts, blank line, text"),
        Variant("abs-path", _full, True, "LlamaIndex style: 'file_path: ' and the absolute path"),
        Variant("path2-long", _path(2), False, "path2 on full-size chunks: the model cuts their ends"),
        Variant("context", _product, True, "path2, heading, page (ops.tools.context), blank line, text"),
    )
}
DEFAULT_VARIANTS = ("none", "path2", "none-short", "name", "abs-path", "path2-long", "context")


# ---- figures --------------------------------------------------------------------------------


def evaluate(rankings: Sequence[Sequence[str]], answers: Sequence[Collection[str]], k: int = K) -> dict[str, Any]:
    """hit@k and MRR for questions whose chunks' files are ranked best first (a file may repeat).

    hit@k: an answer file among the first k chunks. MRR: 1/rank of the first answer file
    among the distinct files in ranking order (0 when none comes back).
    """
    hits, reciprocal, ranks = 0, 0.0, []
    for ranking, good in zip(rankings, answers, strict=True):
        hits += any(f in good for f in ranking[:k])
        files = list(dict.fromkeys(ranking))
        rank = next((i + 1 for i, f in enumerate(files) if f in good), None)
        ranks.append(rank)
        reciprocal += 1 / rank if rank else 0.0
    n = len(rankings)
    return {
        "questions": n,
        f"hit@{k}": round(hits / n, 3) if n else 0.0,
        "mrr": round(reciprocal / n, 3) if n else 0.0,
        "hits": hits,
        "ranks": ranks,
    }


def rank(query_vectors: np.ndarray, chunk_vectors: np.ndarray, chunk_files: Sequence[str]) -> list[list[str]]:
    """For each query, the files of all chunks, most similar first (vectors are unit length)."""
    scores = query_vectors @ chunk_vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")
    return [[chunk_files[i] for i in row] for row in order]


# ---- corpus, chunks, embeddings ----------------------------------------------------------------


def build_corpus(target: Path, packages: Sequence[str] = PACKAGES) -> int:
    """Copy the packages' sources from this Python's standard library; returns the file count."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for package in packages:
        for path in sorted((stdlib / package).rglob("*")):
            if path.suffix in SUFFIXES and "__pycache__" not in path.parts and path.is_file():
                dest = target / path.relative_to(stdlib)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                count += 1
    return count


@dataclasses.dataclass
class Chunks:
    texts: list[str]
    metadata: list[dict[str, Any]]
    files: list[str]  # relative to the corpus root
    budget: int


def chunk(corpus: Path, home: Path, model: str, chunk_tokens: int | None) -> Chunks:
    """Chunk the corpus through the producer into a scratch home; the ledger's pending rows."""
    config = Config(home=home, model=model, chunk_tokens=chunk_tokens)
    producer = Producer(config)
    try:
        producer.submit_paths([corpus], COLLECTION)
    finally:
        producer.close()
    ledger = Ledger(config.ledger_path)
    try:
        rows = ledger.load(COLLECTION, list(ledger.ids_by_state(COLLECTION)), (PENDING,))
    finally:
        ledger.close()
    rows.sort(key=lambda r: (r.metadata["source"], r.metadata.get("ordinal", 0)))
    root = corpus.resolve()
    files = [Path(r.metadata["source"]).relative_to(root).as_posix() for r in rows]
    budget = chunk_tokens or load_tokenizer(model).max_tokens
    return Chunks([r.text for r in rows], [r.metadata for r in rows], files, budget)


def embed(embedder: Any, texts: list[str]) -> np.ndarray:
    parts = [embedder.embed(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
    return np.concatenate(parts) if parts else np.empty((0, embedder.dimension), dtype=np.float32)


def load_questions(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """JSON lines ``{"question": ..., "answers": [file, ...]}``, files relative to the corpus root."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            out.append((item["question"], tuple(item["answers"])))
    return out


def run(
    corpus: Path,
    work: Path,
    questions: Sequence[tuple[str, Sequence[str]]],
    variants: Sequence[str],
    model: str,
    log: Callable[[str], None] = lambda _: None,
    on_variant: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Chunk, embed each variant, rank, and score: the results as JSON-ready data."""
    tokenizer = load_tokenizer(model)
    reserve = HEADER_TOKENS
    chunkings: dict[bool, Chunks] = {}
    for short in sorted({VARIANTS[v].reserve for v in variants}):
        log(f"chunking {corpus} ({'budget less the header reserve' if short else 'full budget'})")
        tokens = tokenizer.max_tokens - reserve if short else None
        chunkings[short] = chunk(corpus, work / f"home-{'short' if short else 'full'}", model, tokens)
    log(f"loading {model}")
    embedder = load_embedder(model, "cpu" if model.startswith("hash:") else "auto")
    queries = embed(embedder, [q for q, _ in questions])
    answers = [set(a) for _, a in questions]
    results: dict[str, Any] = {
        "model": model,
        "device": embedder.device,
        "questions": len(questions),
        "files": len({f for c in chunkings.values() for f in c.files}),
        "header_reserve_tokens": reserve,
        "variants": {},
    }
    # Two variants that embed the same texts (the product's header and path2 on code) are embedded once.
    done: dict[str, tuple[np.ndarray, float]] = {}
    for name in variants:
        variant = VARIANTS[name]
        chunks = chunkings[variant.reserve]
        texts = [variant.build(t, m) for t, m in zip(chunks.texts, chunks.metadata, strict=True)]
        counts = tokenizer.counts(texts)
        key = content_hash("\x00".join(texts))
        if key not in done:
            log(f"embedding {len(texts)} chunks: {name}")
            started = time.perf_counter()
            done[key] = embed(embedder, texts), time.perf_counter() - started
        vectors, seconds = done[key]
        figures = evaluate(rank(queries, vectors, chunks.files), answers)
        results["variants"][name] = {
            "about": variant.about,
            "chunks": len(texts),
            "chunk_budget": chunks.budget,
            "mean_tokens": round(sum(counts) / len(counts), 1) if counts else 0,
            # What the model cuts: embedded text past its window (the chunk's end is lost).
            "truncated": sum(c > tokenizer.max_tokens for c in counts),
            "embed_seconds": round(seconds, 1),
            **figures,
        }
        log(f"  {name}: hit@{K} {figures[f'hit@{K}']}, MRR {figures['mrr']}")
        if on_variant is not None:
            on_variant(results)
    results["misses"] = _misses(results, questions)
    return results


def _misses(results: dict[str, Any], questions: Sequence[tuple[str, Sequence[str]]]) -> dict[str, list[str]]:
    """For each variant, the questions whose answer was not in the top K."""
    out = {}
    for name, figures in results["variants"].items():
        out[name] = [q for (q, _), r in zip(questions, figures["ranks"], strict=True) if r is None or r > K]
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        f"retrieval: {results['questions']} questions, {results['files']} files, model {results['model']}"
        f" on {results['device']}",
        f"{'variant':<12} {'chunks':>6} {'budget':>6} {'tokens':>6} {'cut':>4} {'hit@' + str(K):>6} {'MRR':>6}"
        f" {'embed s':>8}  what is embedded",
    ]
    for name, v in results["variants"].items():
        lines.append(
            f"{name:<12} {v['chunks']:>6} {v['chunk_budget']:>6} {v['mean_tokens']:>6} {v['truncated']:>4}"
            f" {v[f'hit@{K}']:>6.3f} {v['mrr']:>6.3f} {v['embed_seconds']:>8}  {v['about']}"
        )
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--variants",
    default=",".join(DEFAULT_VARIANTS),
    show_default=True,
    help=f"Comma-separated, from: {', '.join(VARIANTS)}.",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Embedding model (hash:384: a smoke run).")
@click.option(
    "--corpus",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=f"Index this folder instead of copying {', '.join(PACKAGES)} (needs --questions).",
)
@click.option(
    "--questions",
    "questions_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='JSON lines {"question": ..., "answers": [path relative to the corpus, ...]} [the built-in set].',
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON results [bench-results/retrieval-<time>.json].",
)
def main(variants: str, model: str, corpus: Path | None, questions_path: Path | None, output: Path | None) -> None:
    """Measure hit@3 and MRR of each variant of the embedded text on the same questions.

    \b
    Example:
      python -m ops.tools.retrieval --variants none,context
    """
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown) or '(none given)'}", param_hint="--variants")
    if corpus is not None and questions_path is None:
        raise click.BadParameter("a corpus of your own needs its --questions", param_hint="--corpus")
    questions = load_questions(questions_path) if questions_path else QUESTIONS
    output = output or Path("bench-results") / time.strftime("retrieval-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m ops.tools.retrieval", *sys.argv[1:]])

    def save(results: dict[str, Any]) -> None:
        """Written after each variant: a long run that is stopped keeps what it measured."""
        output.write_text(json.dumps({**results, "command": command}, indent=2) + "\n")

    work = Path(tempfile.mkdtemp(prefix="indexq-retrieval-"))
    try:
        if corpus is None:
            corpus = work / "corpus"
            build_corpus(corpus)
        results = run(corpus, work, questions, names, model, log=lambda m: click.echo(m, err=True), on_variant=save)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save(results)
    click.echo(report(results))
    click.echo(f"results: {output}", err=True)


if __name__ == "__main__":
    main()
