"""Chroma-level probes, run in a subprocess: a damaged segment can kill its reader.

    python -m ops.probe (--chroma DIR | --chroma-url URL) --ledger FILE [--deep]
    (or INDEXQ_CHROMA_URL=URL python -m ops.probe --ledger FILE)

Prints one JSON object: per collection, the ids Chroma has against the ledger's
committed set, and with --deep, embeddings and documents read back against the ledger
and self-recall on a sample; under ``unlike``, collections of the ledger's names that
indexq did not create (vectors of another dimension). Exit 0 whatever it finds; a crash
is the caller's finding. A disk that refuses (full, read-only, I/O) is reported as
``storage``: cannot check; another program's lock on Chroma's database as ``busy``.
"""

from __future__ import annotations

import collections
import json
import random
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.batches import batched
from pipeline.ledger import Ledger
from pipeline.rows import COMMITTED

# How many stored vectors the deep check searches for, and among how many nearest
# neighbours each must find itself (or a duplicate of its text, at distance zero).
RECALL_SAMPLE = 50
RECALL_DEPTH = 50
# A vector not found at RECALL_DEPTH is looked for again among this many, where it must be
# found at its own place (distance zero). Chroma's HNSW graph leaves a few vectors hard to
# reach around many copies of one vector (the same chunk text hundreds of times): measured,
# 3,000 random vectors and 451 copies of one, 127 of the 3,000 were not among their own 50
# nearest, 4 not among 1,000, and a rebuild from the ledger makes the same graph. Counted
# as damage, that sent a healthy collection to recovery at every deep check.
RECALL_WIDE = 1000
# Tolerance for an embedding read back from Chroma against the ledger's copy.
ATOL = 1e-5
_SHOWN = 5


def probe(chroma: Path | None, ledger_path: Path, deep: bool, url: str | None = None) -> dict[str, Any]:
    return findings(chroma, ledger_path, deep, url)[0]


def findings(
    chroma: Path | None, ledger_path: Path, deep: bool, url: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """What ``probe`` returns, and the collections not as indexq created them (name -> what
    is wrong): vectors of another dimension than the ledger's, a collection another program
    recreated under the ledger's name."""
    from pipeline.store import Store

    ledger = Ledger(ledger_path)
    store = Store(chroma, url=url)
    out: dict[str, Any] = {}
    unlike: dict[str, str] = {}
    # One read transaction: a producer changing rows meanwhile cannot make the
    # ledger disagree with itself between two reads (WAL gives a snapshot).
    ledger.conn.execute("BEGIN")
    try:
        for name in ledger.collections():
            states = ledger.ids_by_state(name)
            committed = {i for i, s in states.items() if s == COMMITTED}
            if not committed and not store.exists(name):
                continue
            have = store.ids(name)
            if (why := _unlike(store, ledger, name)) is not None:
                unlike[name] = why
            missing = sorted(committed - have)
            unknown = sorted(have - set(states))
            result: dict[str, Any] = {
                "count": len(have),
                "committed": len(committed),
                "missing": len(missing),
                "missing_ids": missing[:_SHOWN],
                "unknown": len(unknown),
                "unknown_ids": unknown[:_SHOWN],
            }
            if deep:
                result.update(_deep(store, ledger, name, sorted(committed & have)))
            out[name] = result
    finally:
        ledger.close()
    return out, unlike


def _unlike(store: Any, ledger: Ledger, name: str) -> str | None:
    """Why collection ``name`` is not the one indexq created, if it is not: Chroma fixed its
    dimension with its first vector, and the ledger's committed vectors have another."""
    col = store.collection(name, create=False)
    have = getattr(getattr(col, "_model", None), "dimension", None) if col is not None else None
    if not isinstance(have, int):
        return None  # no such collection, or empty: a replay fills it
    sizes = [
        size // 4
        for (size,) in ledger.conn.execute(
            "SELECT length(embedding) FROM chunks WHERE collection=? AND state=? AND embedding IS NOT NULL LIMIT 1",
            (name, COMMITTED),
        )
    ]
    if not sizes or have in sizes:
        return None
    return (
        f"Chroma's collection takes vectors of dimension {have}, the ledger's committed chunks have"
        f" {', '.join(map(str, sorted(sizes)))}: not the collection indexq created (another program made it)"
    )


def _deep(store: Any, ledger: Ledger, name: str, ids: list[str]) -> dict[str, Any]:
    col = store.collection(name, create=False)
    mismatched: list[str] = []
    vectors: dict[str, np.ndarray] = {}
    for part in batched(ids, 500):
        got = col.get(ids=part, include=["embeddings", "documents", "metadatas"])
        stored = {r.id: r for r in ledger.rows(name, part)}
        for id_, emb, doc, meta in zip(got["ids"], got["embeddings"], got["documents"], got["metadatas"], strict=True):
            row = stored.get(id_)
            if row is None:
                continue
            expected = np.frombuffer(row.embedding or b"", dtype=np.float32)
            vector = np.asarray(emb, dtype=np.float32)
            vectors[id_] = vector
            if vector.shape != expected.shape or not np.allclose(vector, expected, atol=ATOL) or doc != row.text:
                mismatched.append(id_)
            elif dict(meta or {}) != row.metadata:
                mismatched.append(id_)
        missing_back = set(part) - set(got["ids"])
        mismatched.extend(sorted(missing_back))
    sample, recall_failures = recall(col, vectors)
    # The most copies of one vector (one chunk text stored under many ids): see RECALL_WIDE.
    copies = max(collections.Counter(hash(v.tobytes()) for v in vectors.values()).values(), default=0)
    return {
        "mismatched": len(mismatched),
        "mismatched_ids": mismatched[:_SHOWN],
        "recall_sample": len(sample),
        "recall_failures": len(recall_failures),
        "recall_failure_ids": recall_failures[:_SHOWN],
        "copies": copies,
    }


def recall(
    col: Any,
    vectors: dict[str, np.ndarray],
    sample_size: int = RECALL_SAMPLE,
    depth: int = RECALL_DEPTH,
    wide: int = RECALL_WIDE,
) -> tuple[list[str], list[str]]:
    """Search the collection for a sample of ``vectors`` (its own, read back and checked
    against the ledger); return the sample and the ids not among their own ``depth``
    nearest neighbours, nor at their own place among ``wide``: vectors its index lost or
    cannot reach."""
    sample = random.Random(0).sample(sorted(vectors), min(sample_size, len(vectors)))
    # HNSW is approximate: with one result asked for, its search keeps Chroma's default 10
    # candidates and now and then misses an exact vector of a healthy index (seen once in
    # CI at 485 records). Asking for RECALL_DEPTH makes it search that many: a healthy
    # index finds the vector, a damaged one still does not.
    failures = []
    for id_ in sample:
        if not _found(col, id_, vectors[id_], min(depth, len(vectors)), anywhere=True) and not (
            wide > depth and _found(col, id_, vectors[id_], min(wide, len(vectors)), anywhere=False)
        ):
            failures.append(id_)
    return sample, failures


def _found(col: Any, id_: str, vector: np.ndarray, depth: int, anywhere: bool) -> bool:
    """Whether a search for ``vector`` among ``depth`` neighbours finds ``id_`` (anywhere
    among them, or only at distance zero) or a duplicate of its text (the same vector under
    another id, at distance zero)."""
    hit = col.query(query_embeddings=vector.reshape(1, -1), n_results=depth, include=["distances"])
    return any(d <= 1e-4 or (anywhere and i == id_) for i, d in zip(hit["ids"][0], hit["distances"][0], strict=True))


@click.command()
@click.option("--chroma", type=click.Path(path_type=Path))
# run_probe passes a server's URL in the environment, out of sight of `ps`.
@click.option("--chroma-url", envvar="INDEXQ_CHROMA_URL")
@click.option("--ledger", "ledger_path", type=click.Path(path_type=Path), required=True)
@click.option("--deep", is_flag=True)
def main(chroma: Path | None, chroma_url: str | None, ledger_path: Path, deep: bool) -> None:
    from ops.integrity import busy
    from pipeline.errors import UnreachableError, first_line, storage_error

    try:
        collections, unlike = findings(chroma, ledger_path, deep, url=chroma_url)
        result: dict[str, Any] = {"collections": collections, "unlike": unlike}
    except UnreachableError as exc:  # a server that does not answer is not damage
        result = {"unreachable": str(exc)}
    except Exception as exc:  # Chroma refusing to load a segment is a finding, not a crash
        storage = storage_error(exc, path=chroma, unexplained=True)
        if storage is not None:  # ... unless the disk refused (full, read-only, I/O): cannot check
            result = {"storage": storage.reason, "hint": storage.hint}
        elif (why := busy(exc)) is not None:  # ... or another program holds a lock: busy
            result = {"busy": why}
        else:
            result = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
