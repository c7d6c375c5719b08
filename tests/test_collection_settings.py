"""What a collection is created with: the full-text index setting chosen at the first
submission (kept through the writer and recovery's rebuild, refused when changed), and
the embedding function named in its configuration, so that a plain Chroma client's
``query_texts`` finds what ``indexq search`` finds.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Proc, copy_corpus, dump_collection, env_for, ledger_query, run_cli, start_worker, wait_for
from tests.test_recovery import overwrite_page

pytestmark = pytest.mark.e2e

HASH = {"INDEXQ_MODEL": "hash:384"}
FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py"]


def schema_of(chroma: Path, name: str) -> dict[str, Any]:
    """The collection's schema as Chroma stored it."""
    conn = sqlite3.connect(chroma / "chroma.sqlite3")
    try:
        (raw,) = conn.execute("SELECT schema_str FROM collections WHERE name=?", (name,)).fetchone()
    finally:
        conn.close()
    return json.loads(raw)


def full_text_enabled(chroma: Path, name: str) -> bool:
    return bool(schema_of(chroma, name)["keys"]["#document"]["string"]["fts_index"]["enabled"])


def plain_client(chroma: Path, script: str, **env: str) -> dict[str, Any]:
    """Run ``script`` with a plain chromadb client in a fresh interpreter that never imports indexq."""
    prelude = textwrap.dedent(f"""
        import json, sys
        import chromadb
        client = chromadb.PersistentClient(path={str(chroma)!r}, settings=chromadb.Settings(anonymized_telemetry=False))
    """)
    epilogue = "\nassert not any(m == 'pipeline' or m.startswith(('pipeline.', 'ops.')) for m in sys.modules)\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script) + epilogue],
        env={**env_for(chroma.parent), **env}, capture_output=True, text=True, timeout=300, cwd=chroma.parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_full_text_off_is_kept_refused_when_changed_and_survives_a_rebuild(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", FILES)
    writer = start_worker(procs, home, **HASH)
    writer.wait_started()
    first = run_cli(home, "index", str(corpus), "-c", "lean", "--no-full-text", "--wait", **HASH)
    assert first.returncode == 0, first.stderr
    default = run_cli(home, "index", str(corpus), "-c", "usual", "--wait", **HASH)
    assert default.returncode == 0, default.stderr
    assert writer.terminate() == 0
    chroma = home / "chroma"
    assert not full_text_enabled(chroma, "lean")
    assert full_text_enabled(chroma, "usual")  # the default stays on

    # Documents are stored and returned; where_document is refused; hash: names no embedding function.
    seen = plain_client(
        chroma,
        """
        col = client.get_collection("lean")
        got = col.get(limit=3, include=["documents"])
        try:
            col.get(where_document={"$contains": "json"})
            refused = ""
        except Exception as exc:
            refused = str(exc)
        print(json.dumps({"documents": got["documents"], "refused": refused,
                          "ef": col.configuration_json.get("embedding_function")}))
    """,
    )
    assert len(seen["documents"]) == 3 and all(d.strip() for d in seen["documents"])
    assert "FTS indexing is disabled" in seen["refused"]
    assert (seen["ef"] or {}).get("type") != "known"  # None, or "legacy" when a schema made the collection
    rows = ledger_query(home, "SELECT collection, full_text FROM collection_settings ORDER BY collection")
    assert rows == [("lean", 0), ("usual", 1)]

    # Asking an existing collection for the other setting: exit 2, one line, nothing written.
    before = ledger_query(home, "SELECT count(*), max(updated) FROM chunks"), ledger_query(home, "SELECT * FROM jobs")
    (corpus / "new.py").write_text("def added():\n    return 'a file the refused submission must not write'\n")
    for name, flag in (("lean", "--full-text"), ("usual", "--no-full-text")):
        refused = run_cli(home, "index", str(corpus), "-c", name, flag, **HASH)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith("Error: collection ") and "full-text index" in refused.stderr
        assert refused.stdout == ""
    env_refused = run_cli(home, "index", str(corpus), "-c", "lean", **HASH, INDEXQ_FULL_TEXT="on")
    assert env_refused.returncode == 2, env_refused.stderr
    after = ledger_query(home, "SELECT count(*), max(updated) FROM chunks"), ledger_query(home, "SELECT * FROM jobs")
    assert after == before
    # Saying nothing, or the same, is fine.
    assert run_cli(home, "index", str(corpus), "-c", "lean", **HASH).returncode == 0
    assert run_cli(home, "index", str(corpus), "-c", "lean", "--no-full-text", **HASH).returncode == 0

    # Recovery's rebuild from the ledger (damage, no backup) creates the collection as it was.
    writer = start_worker(procs, home, **HASH)
    writer.wait_started()
    wait_for(lambda: ledger_query(home, "SELECT count(*) FROM chunks WHERE state != 'committed'")[0][0] == 0)
    assert writer.terminate() == 0
    overwrite_page(home)  # damage that check finds and recovery repairs
    result = run_cli(home, "recover", "--json", **HASH)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "rebuild"
    assert not full_text_enabled(chroma, "lean")
    assert full_text_enabled(chroma, "usual")
    committed = dict(ledger_query(home, "SELECT id, text FROM chunks WHERE collection='lean' AND state='committed'"))
    records = dump_collection(chroma, "lean")
    assert {i: r["document"] for i, r in records.items()} == committed


def test_plain_chroma_client_query_texts_finds_what_indexq_search_finds(tmp_path: Path, procs: list[Proc]) -> None:
    """Real model: a collection made before the configuration named the model (as older
    indexq made them) is given its embedding function when the writer opens it."""
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", FILES[:2])
    chroma = home / "chroma"
    plain_client(
        chroma,
        """
        client.create_collection("older", embedding_function=None, metadata={"hnsw:space": "cosine"})
        print(json.dumps({}))
    """,
    )
    writer = start_worker(procs, home)
    writer.wait_started(timeout=300)
    for name in ("fresh", "older"):
        result = run_cli(home, "index", str(corpus), "-c", name, "--wait", timeout=600)
        assert result.returncode == 0, result.stderr
    # indexq search through the running writer (its model loaded once), then the plain
    # client on both collections in one process once the writer has stopped.
    query = "decode a JSON document into Python objects"
    expected = {}
    for name in ("fresh", "older"):
        found = run_cli(home, "search", query, "-c", name, "-k", "5", "--json", timeout=300)
        assert found.returncode == 0, found.stderr
        expected[name] = [hit["id"] for hit in json.loads(found.stdout)]
    assert writer.terminate() == 0
    got = plain_client(chroma, f"""
        import numpy as np
        out = {{}}
        for name in ("fresh", "older"):
            col = client.get_collection(name)
            ids = col.query(query_texts=[{query!r}], n_results=5)["ids"][0]
            # The configured function embeds a stored document as indexq did.
            page = col.get(limit=20, include=["documents", "embeddings"])
            ef = col.configuration["embedding_function"]
            fresh = np.asarray(ef(page["documents"]))
            cosines = (fresh * np.asarray(page["embeddings"])).sum(axis=1)
            ef_json = col.configuration_json["embedding_function"]
            out[name] = {{"ids": ids, "min_cosine": float(cosines.min()), "ef": ef_json}}
        print(json.dumps(out))
    """, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    for name in ("fresh", "older"):
        assert got[name]["ids"] == expected[name]
        assert got[name]["min_cosine"] > 0.9999
        assert got[name]["ef"]["name"] == "sentence_transformer"
        assert got[name]["ef"]["config"]["normalize_embeddings"] is True
    records = dump_collection(chroma, "fresh")
    assert all(np.isclose(np.linalg.norm(r["embedding"]), 1.0, atol=1e-5) for r in records.values())


# A Store on the real model's name, both kinds of collection (full-text on: configuration;
# off: schema), upserts and a query; then: was the model loaded by Chroma in this process?
_NO_SECOND_MODEL = """
import sys, numpy as np
from pathlib import Path
from pipeline.collection import CollectionSettings
from pipeline.store import Store
from chromadb.utils.embedding_functions.sentence_transformer_embedding_function import (
    SentenceTransformerEmbeddingFunction as Real,
)
for name, full_text in (("with-fts", True), ("without-fts", False)):
    store = Store(Path(sys.argv[1]) / name, model="all-MiniLM-L6-v2", settings=CollectionSettings(full_text=full_text))
    for _ in range(2):
        store.upsert(name, ["a", "b"], np.ones((2, 384), dtype=np.float32), ["x", "y"], [{"k": 1}, {"k": 2}])
    store.query(name, np.ones(384, dtype=np.float32), 1)
    assert store.collection(name).configuration_json["embedding_function"]["name"] == "sentence_transformer"
print("sentence_transformers" in sys.modules, len(Real.models))
"""


def test_the_configured_embedding_function_never_loads_a_second_model(tmp_path: Path) -> None:
    """Chroma rebuilds a collection's function on every upsert and query; the stored one must
    stay configuration in indexq's processes (the writer holds its own model)."""
    done = subprocess.run(
        [sys.executable, "-c", _NO_SECOND_MODEL, str(tmp_path)], capture_output=True, text=True,
        env=env_for(tmp_path / "home"), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "0"]


def test_a_collection_keeps_its_model_and_refuses_another(tmp_path: Path, procs: list[Proc]) -> None:
    """Vectors of two models in one collection rank nonsense: the writer's first task records
    the collection's model; a submission or a search with another is refused (exit 2,
    nothing written); a writer of another model of the same size fails the chunks, saying
    why, commits nothing and withdraws the changed chunks' older text; indexing again with
    the right writer retries them."""
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", FILES)
    writer = start_worker(procs, home, **HASH)
    writer.wait_started()
    first = run_cli(home, "index", str(corpus), "-c", "code", "--wait", **HASH)
    assert first.returncode == 0, first.stderr
    assert writer.terminate() == 0
    assert ledger_query(home, "SELECT model FROM collection_settings WHERE collection='code'") == [("hash:384",)]
    committed = dict(ledger_query(home, "SELECT id, embedding FROM chunks WHERE collection='code'"))

    # Another model: the submission and the search are refused before anything is written or read.
    before = ledger_query(home, "SELECT * FROM chunks ORDER BY id"), ledger_query(home, "SELECT * FROM jobs")
    for other in ("hash:64", "all-MiniLM-L6-v2"):
        refused = run_cli(home, "index", str(corpus), "-c", "code", INDEXQ_MODEL=other)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith("Error: collection 'code' holds vectors of the model hash:384, not of ")
        search = run_cli(home, "search", "json decoder", "-c", "code", INDEXQ_MODEL=other)
        assert search.returncode == 2 and "holds vectors of the model hash:384" in search.stderr, search.stderr
    assert (ledger_query(home, "SELECT * FROM chunks ORDER BY id"), ledger_query(home, "SELECT * FROM jobs")) == before
    # Another spelling of the same model is the same model.
    assert run_cli(home, "search", "json decoder", "-c", "code", INDEXQ_MODEL="hash:0384").returncode == 0

    # A writer of another model with vectors of the same size (all-MiniLM-L6-v2, 384): the
    # changed chunks fail with the reason, the rest of the job is unchanged, Chroma holds
    # only hash:384's vectors.
    (corpus / "json" / "decoder.py").write_text((corpus / "json" / "decoder.py").read_text() + "\n# an edit\n")
    (corpus / "json" / "added.py").write_text("def added():\n    return 'a chunk this writer must not commit'\n")
    writer = start_worker(procs, home)
    writer.wait_started()
    mixed = run_cli(home, "index", str(corpus), "-c", "code", "--wait", timeout=300, **HASH)
    assert mixed.returncode == 1, mixed.stderr
    assert "holds vectors of the model hash:384; this writer embeds with all-MiniLM-L6-v2" in mixed.stderr
    assert "indexing again retries it" in mixed.stderr
    assert writer.terminate() == 0
    failed = ledger_query(home, "SELECT id FROM chunks WHERE collection='code' AND state='failed'")
    assert len(failed) >= 2  # the edited file's last chunk and the new file's
    records = dump_collection(home / "chroma", "code")
    # Chroma is the ledger's committed set: the edited chunk's text from before the edit is
    # withdrawn with it, not left to answer searches.
    assert set(records) == {i for (i,) in ledger_query(home, "SELECT id FROM chunks WHERE state='committed'")}
    assert set(records) < set(committed)
    for id_, record in records.items():  # as committed by hash:384 (Chroma returns them to within float rounding)
        assert np.allclose(record["embedding"], np.frombuffer(committed[id_], np.float32), atol=1e-6)

    # Indexing again, unchanged, with the collection's model running: the failed chunks are
    # tried again and committed; Chroma equals the ledger's committed set.
    writer = start_worker(procs, home, **HASH)
    writer.wait_started()
    again = run_cli(home, "index", str(corpus), "-c", "code", "--wait", **HASH)
    assert again.returncode == 0, again.stderr
    assert writer.terminate() == 0
    states = ledger_query(home, "SELECT state, count(*) FROM chunks WHERE collection='code' GROUP BY state")
    assert [s for s, _ in states] == ["committed"]
    rows = dict(ledger_query(home, "SELECT id, text FROM chunks WHERE collection='code'"))
    assert {i: r["document"] for i, r in dump_collection(home / "chroma", "code").items()} == rows
    assert any("a chunk this writer must not commit" in text for text in rows.values())

    # Recovery run with another model's settings (here the default) rebuilds the collection
    # naming the model whose vectors it holds: hash:384 names no embedding function.
    overwrite_page(home)
    recovered = run_cli(home, "recover", "--json")
    assert recovered.returncode == 0, recovered.stderr
    assert json.loads(recovered.stdout)["action"] == "rebuild"
    seen = plain_client(home / "chroma", """
        print(json.dumps({"ef": client.get_collection("code").configuration_json.get("embedding_function")}))
    """)  # fmt: skip
    assert (seen["ef"] or {}).get("name") != "sentence_transformer", seen


def test_a_collection_made_outside_indexq_with_the_other_full_text_setting_is_reported(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Chroma cannot change a collection's full-text index: one a plain client made before
    indexq's first commit keeps its own, and the writer says so in its log."""
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", FILES[:1])
    (home / "chroma").mkdir(parents=True)
    plain_client(home / "chroma", """
        client.create_collection("early", embedding_function=None, metadata={"hnsw:space": "cosine"})
        print(json.dumps({}))
    """)  # fmt: skip
    writer = start_worker(procs, home, **HASH)
    writer.wait_started()
    result = run_cli(home, "index", str(corpus), "-c", "early", "--no-full-text", "--wait", **HASH)
    assert result.returncode == 0, result.stderr
    assert writer.terminate() == 0
    assert full_text_enabled(home / "chroma", "early")  # as the plain client made it
    assert "collection early has Chroma's full-text index on, though it was recorded off" in writer.output()
