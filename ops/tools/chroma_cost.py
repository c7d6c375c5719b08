"""What one upsert of 10 records costs Chroma itself, and where the time goes.

    python -m ops.tools.chroma_cost               # about a minute here
    python -m ops.tools.chroma_cost --upserts 300 --rounds 5
    python -m ops.tools.chroma_cost --dir /dev/shm    # the same without the disk

Upserts of 10 records (random unit vectors of 384 floats, ~800-character code-like
documents, the ids and metadata indexq's writer gives a file's chunks: eight keys, the
LlamaIndex node among them) into fresh persistent directories, one variant at a time and
interleaved over rounds: ids and vectors only, with metadata, with documents and one
metadata key (the records of the benchmark's bare loop), with documents and indexq's keys
but LlamaIndex's node, with documents, one key and LlamaIndex's node, with documents
(indexq's records), with documents and the full-text index off: where a record's cost
lies, key by key. Then the
parts of a commit measured apart with plain SQLite: a rollback-journal transaction of
ten rows (the log), and ten documents into an FTS5 trigram table (the full-text index).
Last, whether Python's other threads can run while Chroma upserts: a thread that only
sleeps 0.5 ms at a time counts its wake-ups beside the upserts and beside plain sleep.
(The writer embeds on one thread while it commits on another; a GPU needs the GIL to
launch each kernel.) A measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import json
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.chunking import Chunk
from pipeline.collection import CollectionSettings
from pipeline.ids import content_hash
from pipeline.producer import NODE_KEYS, file_record
from pipeline.store import Store

BATCH = 10
DIM = 384
DOC_CHARS = 800
WORDS = ("def", "return", "self", "import", "class", "value", "for", "in", "if", "else", "None", "list",
         "config", "path", "commit", "ledger", "chunk", "write", "read", "error", "raise", "with")  # fmt: skip
# (name, metadata: none, "one" key, "plain" (indexq's without LlamaIndex's node), "node"
# (one key and the node) or "indexq"'s, documents, full-text index)
VARIANTS = (
    ("ids + vectors", "", False, True),
    ("+ metadata", "indexq", False, True),
    ("+ documents, one key (bare loop)", "one", True, True),
    ("+ documents, keys but the node", "plain", True, True),
    ("+ documents, one key + node", "node", True, True),
    ("+ documents (indexq default)", "indexq", True, True),
    ("+ documents, full-text off", "indexq", True, False),
)


def _metadata(kind: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The keys a variant upserts of a record's metadata (``kind`` as in VARIANTS)."""
    if kind == "one":
        return {"ordinal": metadata["ordinal"]}
    if kind == "plain":
        return {k: v for k, v in metadata.items() if k not in NODE_KEYS}
    if kind == "node":
        return {"ordinal": metadata["ordinal"], **{k: metadata[k] for k in NODE_KEYS}}
    return metadata


def _document(rng: random.Random) -> str:
    words: list[str] = []
    while sum(map(len, words)) + len(words) < DOC_CHARS:
        words.append(rng.choice(WORDS) + (str(rng.randrange(1000)) if rng.random() < 0.3 else ""))
    return " ".join(words)[:DOC_CHARS]


def _records(n: int, seed: int) -> list[tuple[str, np.ndarray, str, dict[str, Any]]]:
    """(id, vector, document, metadata) as the writer upserts a file's chunks (seven a file)."""
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = []
    for i in range(n):
        text = _document(rng)
        chunk = Chunk(i % 7, text, (i % 7) * 20 + 1, (i % 7) * 20 + 20, content_hash(text))
        record = file_record(f"/src/r{seed}/file{i // 7}.py", chunk)
        out.append((record["id"], vectors[i], text, record["metadata"]))
    return out


def _variant(
    work: Path, name: str, metadata: str, documents: bool, full_text: bool, upserts: int, seed: int
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="cost-", dir=work))
    store = Store(folder, settings=CollectionSettings(full_text=full_text))
    col = store.collection("cost")
    records = _records((upserts + 5) * BATCH, seed)
    times: list[float] = []
    for n in range(upserts + 5):
        group = records[n * BATCH : (n + 1) * BATCH]
        kwargs: dict[str, Any] = {"ids": [r[0] for r in group], "embeddings": np.stack([r[1] for r in group])}
        if metadata:
            kwargs["metadatas"] = [_metadata(metadata, r[3]) for r in group]
        if documents:
            kwargs["documents"] = [r[2] for r in group]
        start = time.perf_counter()
        col.upsert(**kwargs)
        if n >= 5:  # the first few warm the collection up
            times.append(time.perf_counter() - start)
    store.close()
    db = sqlite3.connect(folder / "chroma.sqlite3")
    rows = {
        table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("embeddings_queue", "embedding_metadata", "embedding_fulltext_search")
    }
    db.close()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"name": name, "times": times, "rows": rows, "bytes": size, "records": (upserts + 5) * BATCH}


def _sqlite_parts(work: Path, repeats: int) -> dict[str, float]:
    """Milliseconds per commit of ten records for the log alone and for the full-text index alone."""
    rng = random.Random(7)
    docs = [_document(rng) for _ in range(repeats * BATCH)]
    blob = np.zeros(DIM, dtype=np.float32).tobytes()

    def timed(setup: str, statement: Callable[[sqlite3.Connection, int], None], path: str) -> float:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE")  # what Chroma's chroma.sqlite3 uses
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(setup)
        spent = []
        for n in range(repeats):
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            statement(conn, n)
            conn.execute("COMMIT")
            spent.append(time.perf_counter() - start)
        conn.close()
        return statistics.median(spent) * 1000

    def log(conn: sqlite3.Connection, n: int) -> None:
        conn.executemany("INSERT INTO log(id, vector) VALUES (?, ?)", [(f"{n}-{i}", blob) for i in range(BATCH)])

    def fts(conn: sqlite3.Connection, n: int) -> None:
        conn.executemany("INSERT INTO f(doc) VALUES (?)", [(d,) for d in docs[n * BATCH : (n + 1) * BATCH]])

    return {
        "log: one journaled transaction of 10 vector rows": timed(
            "CREATE TABLE log(id TEXT, vector BLOB)", log, str(work / "log.db")
        ),
        "full-text: 10 documents into FTS5 trigram, on disk": timed(
            "CREATE VIRTUAL TABLE f USING fts5(doc, tokenize='trigram')", fts, str(work / "fts.db")
        ),
        "full-text: the same in memory (CPU only)": timed(
            "CREATE VIRTUAL TABLE f USING fts5(doc, tokenize='trigram')", fts, ":memory:"
        ),
    }


def _other_thread(work: Path, upserts: int) -> dict[str, float]:
    """Wake-ups per second of a thread sleeping 0.5 ms at a time, beside upserts of indexq's
    default records and beside a plain sleep of 2 s; the longest gap between two."""
    store = Store(Path(tempfile.mkdtemp(prefix="gil-", dir=work)))
    col = store.collection("gil")
    records = _records(upserts * BATCH, 99)
    wakes: list[float] = []
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            time.sleep(0.0005)
            wakes.append(time.perf_counter())

    def rate(during: Callable[[], None]) -> tuple[float, float]:
        del wakes[:]
        done.clear()
        ticker = threading.Thread(target=tick)
        start = time.perf_counter()
        ticker.start()
        during()
        spent = time.perf_counter() - start
        done.set()
        ticker.join()
        gaps = [b - a for a, b in zip([start, *wakes], wakes, strict=False)]
        return len(wakes) / spent, max(gaps, default=spent) * 1000

    def upsert_all() -> None:
        for n in range(upserts):
            group = records[n * BATCH : (n + 1) * BATCH]
            col.upsert(
                ids=[r[0] for r in group], embeddings=np.stack([r[1] for r in group]),
                documents=[r[2] for r in group], metadatas=[r[3] for r in group],
            )  # fmt: skip

    busy, busy_gap = rate(upsert_all)
    idle, idle_gap = rate(lambda: time.sleep(2.0))
    store.close()
    return {
        "wakeups_per_s_beside_upserts": round(busy, 1),
        "wakeups_per_s_beside_sleep": round(idle, 1),
        "share": round(busy / idle, 3),
        "longest_gap_ms_beside_upserts": round(busy_gap, 1),
        "longest_gap_ms_beside_sleep": round(idle_gap, 1),
    }


@click.command()
@click.option("--upserts", default=150, show_default=True, help="Upserts of 10 records per variant and round.")
@click.option("--rounds", default=3, show_default=True, help="Rounds (variants interleaved) to tame a noisy machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--dir", "where", type=click.Path(exists=True, file_okay=False, writable=True, path_type=Path),
    help="Folder for the scratch collections (default: the system's temporary folder); a tmpfs such as"
    " /dev/shm shows what the disk's share is.",
)  # fmt: skip
def main(upserts: int, rounds: int, as_json: bool, where: Path | None) -> None:
    results: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="chroma-cost-", dir=where) as tmp:
        work = Path(tmp)
        for round_ in range(rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for name, metadata, documents, full_text in order:
                results[name].append(_variant(work, name, metadata, documents, full_text, upserts, round_))
        parts = _sqlite_parts(work, upserts)
        other = _other_thread(work, upserts)
    table = []
    for name, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        last = runs[-1]
        table.append({
            "variant": name,
            "ms_per_upsert_p50": round(statistics.median(times) * 1000, 2),
            "ms_per_upsert_mean": round(statistics.fmean(times) * 1000, 2),
            "ms_per_upsert_max": round(max(times) * 1000, 1),
            "records_per_s": round(BATCH / statistics.fmean(times)),
            "bytes_per_record": round(last["bytes"] / last["records"]),
            "fts_rows": last["rows"]["embedding_fulltext_search"],
            "metadata_rows_per_record": round(last["rows"]["embedding_metadata"] / last["records"], 1),
            "log_rows": last["rows"]["embeddings_queue"],
        })  # fmt: skip
    out = {
        "upserts": upserts, "rounds": rounds, "dir": str(where or tempfile.gettempdir()), "variants": table,
        "sqlite_ms_per_commit": parts, "other_thread": other,
    }  # fmt: skip
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"Upserts of {BATCH} records, {upserts} per variant x {rounds} rounds (ms per upsert):")
    click.echo(f"{'variant':<34} {'p50':>7} {'mean':>7} {'max':>7} {'rec/s':>6} {'B/rec':>6} {'fts rows':>8} "
               f"{'meta/rec':>8} {'log rows':>8}")  # fmt: skip
    for row in table:
        click.echo(
            f"{row['variant']:<34} {row['ms_per_upsert_p50']:>7} {row['ms_per_upsert_mean']:>7}"
            f" {row['ms_per_upsert_max']:>7} {row['records_per_s']:>6} {row['bytes_per_record']:>6}"
            f" {row['fts_rows']:>8} {row['metadata_rows_per_record']:>8} {row['log_rows']:>8}"
        )
    click.echo("Plain SQLite, median ms per commit of 10 records:")
    for what, ms in parts.items():
        click.echo(f"  {what:<55} {ms:7.2f}")
    click.echo(
        f"A Python thread beside the upserts woke {other['wakeups_per_s_beside_upserts']:g}/s against"
        f" {other['wakeups_per_s_beside_sleep']:g}/s beside a sleep ({other['share']:.1%}); longest gap"
        f" {other['longest_gap_ms_beside_upserts']:g} ms against {other['longest_gap_ms_beside_sleep']:g} ms"
    )


if __name__ == "__main__":
    main()
