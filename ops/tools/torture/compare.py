"""The independent reader (chromadb alone, in a fresh interpreter) and the comparison."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ops.tools.torture import ATOL, STAGE_TIMEOUT
from ops.tools.torture.procs import HarnessError

# The independent reader: chromadb only, in a fresh interpreter (-I: no PYTHONPATH, no
# indexq). Writes ids, documents, metadata and count as JSON, embeddings as .npy.
READER = r"""
import json, sys
import numpy as np
import chromadb
path, name, out = sys.argv[1:4]
client = chromadb.PersistentClient(path=path, settings=chromadb.Settings(anonymized_telemetry=False))
try:
    col = client.get_collection(name, embedding_function=None)
except Exception as exc:
    sys.exit(f"no collection {name!r} in {path}: {exc}")
count = col.count()
ids, docs, metas, embs = [], [], [], []
while True:
    page = col.get(include=["documents", "metadatas", "embeddings"], limit=500, offset=len(ids))
    if not page["ids"]:
        break
    ids += page["ids"]
    docs += page["documents"]
    metas += [dict(m or {}) for m in page["metadatas"]]
    embs += [np.asarray(e, dtype=np.float32) for e in page["embeddings"]]
with open(out + ".json", "w") as f:
    json.dump({"count": count, "ids": ids, "documents": docs, "metadatas": metas}, f)
np.save(out + ".npy", np.stack(embs) if embs else np.zeros((0, 0), np.float32))
"""


def chroma_dir(path: Path) -> Path:
    """A Chroma directory, or a data home's ``chroma/``."""
    return path / "chroma" if not (path / "chroma.sqlite3").exists() and (path / "chroma").is_dir() else path


def read_collection(chroma: Path, collection: str, out: Path) -> dict[str, Any]:
    """Every record of one collection, read by chromadb alone in a fresh interpreter."""
    argv = [sys.executable, "-I", "-c", READER, str(chroma), collection, str(out)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=STAGE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"timed out after {STAGE_TIMEOUT:.0f}s reading {chroma}") from None
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:500]}
    data = dict(json.loads(Path(f"{out}.json").read_text()))
    data["embeddings"] = np.load(f"{out}.npy")
    return data


def compare(a: dict[str, Any], b: dict[str, Any], atol: float = ATOL) -> dict[str, Any]:
    """Records of ``b`` against ``a``: lost, extra and wrong ones, with a few ids of each."""
    if "error" in a or "error" in b:
        return {
            "error": "; ".join(f"{side}: {d['error']}" for side, d in (("clean", a), ("tortured", b)) if "error" in d)
        }
    index_a = {id_: i for i, id_ in enumerate(a["ids"])}
    index_b = {id_: i for i, id_ in enumerate(b["ids"])}
    found: dict[str, list[str]] = {k: [] for k in ("lost", "extra", "documents", "metadata", "embeddings")}
    found["lost"] = sorted(set(index_a) - set(index_b))
    found["extra"] = sorted(set(index_b) - set(index_a))
    for id_ in sorted(set(index_a) & set(index_b)):
        i, j = index_a[id_], index_b[id_]
        if a["documents"][i] != b["documents"][j]:
            found["documents"].append(id_)
        if a["metadatas"][i] != b["metadatas"][j]:
            found["metadata"].append(id_)
        ea, eb = a["embeddings"][i], b["embeddings"][j]
        if ea.shape != eb.shape or not np.all(np.abs(ea - eb) <= atol):
            found["embeddings"].append(id_)
    unreadable = [
        f"{side}: count() says {d['count']}, {len(d['ids'])} records read, {len(set(d['ids']))} distinct ids"
        for side, d in (("clean", a), ("tortured", b))
        if not d["count"] == len(d["ids"]) == len(set(d["ids"]))
    ]
    return {
        "clean": len(index_a),
        "tortured": len(index_b),
        "lost": len(found["lost"]),
        "extra": len(found["extra"]),
        "wrong_documents": len(found["documents"]),
        "wrong_metadata": len(found["metadata"]),
        "wrong_embeddings": len(found["embeddings"]),
        "inconsistent": unreadable,
        "examples": {k: v[:5] for k, v in found.items() if v},
        "atol": atol,
    }


def differs(comparison: dict[str, Any]) -> bool:
    keys = ("lost", "extra", "wrong_documents", "wrong_metadata", "wrong_embeddings")
    return "error" in comparison or bool(comparison["inconsistent"]) or any(comparison[k] for k in keys)


def compare_homes(clean: Path, tortured: Path, collection: str, scratch: Path) -> dict[str, Any]:
    a = read_collection(chroma_dir(clean), collection, scratch / "clean")
    b = read_collection(chroma_dir(tortured), collection, scratch / "tortured")
    return compare(a, b)
