"""LangChain and LlamaIndex read what indexq wrote, and hand their own documents to it (issue 12, items 3 and 4).

The readers are the real ``langchain-chroma`` and ``llama-index-vector-stores-chroma``
packages (dev extras; the tests that need them are skipped only when they are not
installed), on real Chroma directories written by a real writer subprocess. They query
with indexq's own embedder behind each framework's embeddings interface: offline, and
the same vectors as ``indexq search``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipeline
from pipeline.embedder import load_embedder
from tests.conftest import Proc, copy_corpus, dump_collection, ledger_query, run_cli, start_worker, wait_for

HASH = {"INDEXQ_MODEL": "hash:384"}
NODE_KEYS = ("_node_content", "_node_type")


def _needs(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")


def _drain(procs: list[Proc], home: Path, **env: str) -> None:
    """Start a writer, wait until the ledger owes nothing, stop it (exit 0)."""
    writer = start_worker(procs, home, **env)
    writer.wait_started()

    def idle() -> bool:
        rows = ledger_query(home, "SELECT count(*) FROM chunks WHERE state IN ('pending', 'embedded', 'deleting')")
        return rows[0][0] == 0

    wait_for(idle, what="the writer to drain the ledger")
    assert writer.terminate() == 0


def _index(home: Path, path: Path, **env: str) -> dict[str, Any]:
    result = run_cli(home, "index", str(path), "-c", "docs", "--json", **env)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def _client(home: Path) -> Any:
    """A plain chromadb client on the data home's directory (no writer running)."""
    import chromadb
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()
    return chromadb.PersistentClient(path=str(home / "chroma"))


def _by_source(collection: Any) -> dict[str, set[str]]:
    got = collection.get(include=["metadatas"])
    out: dict[str, set[str]] = {}
    for id_, meta in zip(got["ids"], got["metadatas"], strict=True):
        out.setdefault(meta.get("source", meta.get("document_id")), set()).add(id_)
    return out


def _langchain_embeddings(model: str) -> Any:
    from langchain_core.embeddings import Embeddings

    class IndexqEmbeddings(Embeddings):
        """indexq's embedder as LangChain embeddings."""

        def __init__(self) -> None:
            self.embedder = load_embedder(model, "cpu")

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return [list(map(float, v)) for v in self.embedder.embed(texts)]

        def embed_query(self, text: str) -> list[float]:
            return self.embed_documents([text])[0]

    return IndexqEmbeddings()


def _llama_embed_model(model: str) -> Any:
    from llama_index.core.embeddings import BaseEmbedding

    embedder = load_embedder(model, "cpu")

    class IndexqEmbedding(BaseEmbedding):
        """indexq's embedder as a LlamaIndex embed model."""

        def _get_text_embedding(self, text: str) -> list[float]:
            return list(map(float, embedder.embed([text])[0]))

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._get_text_embedding(query)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_text_embedding(query)

    return IndexqEmbedding(model_name=model)


# ---- item 3: both frameworks read an indexq collection (real model) -------------------


@pytest.mark.e2e
def test_langchain_and_llamaindex_read_and_delete_by_document(tmp_path: Path, procs: list[Proc]) -> None:
    _needs("langchain_chroma", "llama_index.vector_stores.chroma")
    from langchain_chroma import Chroma
    from llama_index.core import VectorStoreIndex
    from llama_index.vector_stores.chroma import ChromaVectorStore

    corpus = copy_corpus(tmp_path / "src", ["shlex.py", "fnmatch.py", "textwrap.py", "json/decoder.py"])
    home = tmp_path / "home"
    _index(home, corpus)
    _drain(procs, home)
    model = "all-MiniLM-L6-v2"
    client = _client(home)
    collection = client.get_collection("docs")
    sources = _by_source(collection)
    assert sorted(Path(s).name for s in sources) == ["decoder.py", "fnmatch.py", "shlex.py", "textwrap.py"]

    # One document_id per file, the same on every chunk of it, different between files.
    got = collection.get(include=["metadatas"])
    doc_of: dict[str, set[str]] = {}
    for meta in got["metadatas"]:
        doc_of.setdefault(meta["source"], set()).add(meta["document_id"])
    assert all(len(ids) == 1 for ids in doc_of.values())
    assert len({next(iter(ids)) for ids in doc_of.values()}) == len(doc_of)

    # LangChain: a vector store over the collection indexq wrote.
    store = Chroma(client=client, collection_name="docs", embedding_function=_langchain_embeddings(model))
    docs = store.similarity_search("split a command line into words the way a POSIX shell does, with quotes", k=3)
    assert Path(docs[0].metadata["source"]).name == "shlex.py", [d.metadata["source"] for d in docs]
    assert docs[0].id in sources[docs[0].metadata["source"]]
    assert docs[0].page_content == collection.get(ids=[docs[0].id])["documents"][0]

    # LlamaIndex: its supported path (the node from _node_content), so the node knows its document.
    vector_store = ChromaVectorStore(chroma_collection=collection)
    index = VectorStoreIndex.from_vector_store(vector_store, embed_model=_llama_embed_model(model))
    hits = index.as_retriever(similarity_top_k=3).retrieve("match file names against Unix shell-style wildcards")
    node = hits[0].node
    source = node.metadata["source"]
    assert Path(source).name == "fnmatch.py", [h.node.metadata.get("source") for h in hits]
    assert node.node_id in sources[source]
    assert node.ref_doc_id == node.metadata["document_id"] == next(iter(doc_of[source]))
    assert not set(NODE_KEYS) & set(node.metadata)
    assert node.get_content() == collection.get(ids=[node.node_id])["documents"][0]

    # Document-level delete removes exactly that file's chunks.
    vector_store.delete(node.ref_doc_id)
    after = _by_source(client.get_collection("docs"))
    assert after == {s: ids for s, ids in sources.items() if s != source}


# ---- item 3: a collection indexed before document_id gets it without re-embedding ---------


def _strip_framework_keys(home: Path) -> None:
    """Make the home look as an indexq without document_id left it: ledger and Chroma."""
    conn = sqlite3.connect(home / "ledger.db")
    with conn:
        for id_, metadata in conn.execute("SELECT id, metadata FROM chunks").fetchall():
            old = {k: v for k, v in json.loads(metadata).items() if k not in ("document_id", *NODE_KEYS)}
            conn.execute("UPDATE chunks SET metadata=? WHERE id=?", (json.dumps(old, sort_keys=True), id_))
    conn.close()
    collection = _client(home).get_collection("docs")
    ids = collection.get()["ids"]
    collection.update(ids=ids, metadatas=[dict.fromkeys(("document_id", *NODE_KEYS)) for _ in ids])


def test_resubmission_adds_document_id_without_embedding(tmp_path: Path, procs: list[Proc]) -> None:
    corpus = copy_corpus(tmp_path / "src", ["shlex.py", "fnmatch.py"])
    home = tmp_path / "home"
    first = _index(home, corpus, **HASH)
    _drain(procs, home, **HASH)
    fresh = dump_collection(home / "chroma", "docs")
    assert all(r["metadata"]["document_id"] for r in fresh.values())

    _strip_framework_keys(home)
    stripped = dump_collection(home / "chroma", "docs")
    assert not any("document_id" in r["metadata"] for r in stripped.values())
    embedded = _embeddings_total(home)

    again = _index(home, corpus, **HASH)
    assert (again["new"], again["changed"], again["metadata_updated"]) == (0, 0, first["chunks"])
    _drain(procs, home, **HASH)
    assert _embeddings_total(home) == embedded
    upgraded = dump_collection(home / "chroma", "docs")
    assert sorted(upgraded) == sorted(fresh)
    for id_, record in upgraded.items():
        assert record["metadata"] == fresh[id_]["metadata"], id_
        assert record["document"] == fresh[id_]["document"]
        np.testing.assert_array_equal(record["embedding"], fresh[id_]["embedding"])
    # And a third submission finds everything as it is.
    third = _index(home, corpus, **HASH)
    assert (third["unchanged"], third["metadata_updated"]) == (first["chunks"], 0)


def _embeddings_total(home: Path) -> int:
    result = run_cli(home, "status", "--json", **HASH)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["embeddings_total"])


# ---- item 4: submit_records takes framework objects ------------------------------------


def _config(home: Path) -> pipeline.Config:
    return pipeline.Config(home=home, model="hash:384")


def _rows(home: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """id -> (text, metadata) of the ledger's rows; empty when nothing was written."""
    try:
        rows = ledger_query(home, "SELECT id, text, metadata FROM chunks")
    except sqlite3.OperationalError:
        return {}
    return {id_: (text, json.loads(meta)) for id_, text, meta in rows}


def _jobs(home: Path) -> int:
    try:
        return int(ledger_query(home, "SELECT count(*) FROM jobs")[0][0])
    except sqlite3.OperationalError:
        return 0


class LangChainLike:
    def __init__(self, page_content: Any, metadata: Any = None, id: Any = None) -> None:
        self.page_content, self.metadata, self.id = page_content, metadata or {}, id


class NodeLike:
    """As LlamaIndex's TextNode: id_, text, metadata, ref_doc_id."""

    def __init__(self, id_: str, text: Any, metadata: Any = None, ref_doc_id: str | None = None) -> None:
        self.id_, self.text, self.metadata, self.ref_doc_id = id_, text, metadata or {}, ref_doc_id


class ContentOnly:
    """A node that has only node_id and get_content()."""

    def __init__(self, node_id: str, content: str) -> None:
        self.node_id, self._content, self.metadata = node_id, content, {"kind": "content-only"}

    def get_content(self) -> str:
        return self._content


def test_duck_typed_documents_are_records(tmp_path: Path) -> None:
    home = tmp_path / "home"
    records = [
        LangChainLike("a LangChain-like document", {"source": "a.txt", "page": 2}, id="lc-1"),
        LangChainLike("no id: known by its text", {"source": "b.txt"}),
        NodeLike("node-1", "first node of the manual", {"section": "intro"}, ref_doc_id="manual"),
        NodeLike("node-2", "second node of the manual", ref_doc_id="manual"),
        ContentOnly("c-1", "content from get_content"),
        {"id": "plain", "text": "a plain dict record"},
    ]
    job = pipeline.submit_records(records, "notes", config=_config(home))
    rows = _rows(home)
    assert len(rows) == 6 and job
    assert rows["lc-1"][0] == "a LangChain-like document"
    assert {k: rows["lc-1"][1][k] for k in ("source", "page", "document_id")} == {
        "source": "a.txt", "page": 2, "document_id": "lc-1",
    }  # fmt: skip
    (derived,) = [id_ for id_, (text, _) in rows.items() if text == "no id: known by its text"]
    assert rows[derived][1]["document_id"] == derived
    assert rows["node-1"][1]["document_id"] == rows["node-2"][1]["document_id"] == "manual"
    assert rows["node-1"][1]["section"] == "intro"
    assert rows["c-1"][0] == "content from get_content" and rows["c-1"][1]["kind"] == "content-only"
    assert rows["plain"][1]["document_id"] == "plain"
    for id_, (_, meta) in rows.items():
        node = json.loads(meta["_node_content"])
        assert (node["id_"], node["relationships"]["1"]["node_id"]) == (id_, meta["document_id"])
        assert node["metadata"] == {k: v for k, v in meta.items() if k not in NODE_KEYS}

    # The same objects again (the id-less one by its text): nothing new, nothing changed.
    pipeline.submit_records(records, "notes", config=_config(home))
    assert _rows(home) == rows


class Exploding:
    id_ = "boom"

    @property
    def text(self) -> str:
        raise RuntimeError("no text here")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (LangChainLike(None), 'record 1: "text" must be a string'),
        (LangChainLike("t", {"tags": ["a"]}, id="x"), "record 1: metadata 'tags' has a list"),
        (NodeLike("n", "t", {"document_id": 7}), 'record 1: metadata "document_id" must be a non-empty string'),
        (LangChainLike("t", id=3.5), 'record 1: "id" must be a non-empty string or an integer'),
        (object(), "record 1: expected a JSON object, got object"),
        (Exploding(), "record 1: cannot read the Exploding: no text here"),
    ],
)
def test_bad_framework_objects_fail_whole(tmp_path: Path, bad: Any, message: str) -> None:
    home = tmp_path / "home"
    good = LangChainLike("a good one", id="good")
    with pytest.raises(pipeline.BadInputError) as caught:
        pipeline.submit_records([good, bad], "notes", config=_config(home))
    assert str(caught.value).startswith(f"records: {message}"), str(caught.value)
    assert "\n" not in str(caught.value)
    assert _rows(home) == {} and _jobs(home) == 0


def test_bad_object_through_the_cli_is_one_line(tmp_path: Path) -> None:
    """The CLI takes JSONL only; a record there with a non-string document_id is one Error line, exit 2."""
    records = tmp_path / "r.jsonl"
    records.write_text('{"id": "a", "text": "t", "metadata": {"document_id": 5}}\n')
    result = run_cli(tmp_path / "home", "index", "--jsonl", str(records), "-c", "notes", **HASH)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        f'Error: {records}: line 1: metadata "document_id" must be a non-empty string'
    )


def test_real_framework_documents_round_trip(tmp_path: Path, procs: list[Proc]) -> None:
    """Real LangChain and LlamaIndex objects in; the same frameworks read them back out."""
    _needs("langchain_core", "langchain_chroma", "llama_index.core", "llama_index.vector_stores.chroma")
    from langchain_chroma import Chroma
    from langchain_core.documents import Document as LangChainDocument
    from llama_index.core.schema import Document as LlamaDocument
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
    from llama_index.vector_stores.chroma import ChromaVectorStore

    manual = RelatedNodeInfo(node_id="manual")
    records = [
        LangChainDocument(page_content="LangChain says hello", metadata={"source": "lc.txt"}, id="lc-1"),
        LangChainDocument(page_content="a LangChain document without an id", metadata={"source": "lc2.txt"}),
        LlamaDocument(text="a whole LlamaIndex document", id_="guide", metadata={"file_name": "guide.md"}),
        TextNode(id_="n1", text="the manual, part one", relationships={NodeRelationship.SOURCE: manual}),
        TextNode(id_="n2", text="the manual, part two", relationships={NodeRelationship.SOURCE: manual}),
    ]
    home = tmp_path / "home"
    config = _config(home)
    job = pipeline.submit_records(records, "notes", config=config)
    _drain(procs, home, **HASH)
    assert pipeline.job(job, config=config).state == "done"

    client = _client(home)
    collection = client.get_collection("notes")
    store = ChromaVectorStore(chroma_collection=collection)
    nodes = {n.node_id: n for n in store.get_nodes(node_ids=["n1", "n2", "guide", "lc-1"])}
    assert {i: n.ref_doc_id for i, n in nodes.items()} == {"n1": "manual", "n2": "manual", "guide": "guide",
                                                           "lc-1": "lc-1"}  # fmt: skip
    assert nodes["guide"].get_content() == "a whole LlamaIndex document"
    assert nodes["guide"].metadata["file_name"] == "guide.md"

    lc = Chroma(client=client, collection_name="notes", embedding_function=_langchain_embeddings("hash:384"))
    (doc,) = lc.get_by_ids(["lc-1"])
    assert (doc.page_content, doc.metadata["source"]) == ("LangChain says hello", "lc.txt")
    # hash:384 gives the same vector for the same text: the nearest chunk to a text is itself.
    (nearest,) = lc.similarity_search("a LangChain document without an id", k=1)
    assert nearest.metadata["source"] == "lc2.txt" and nearest.id

    store.delete("manual")
    assert sorted(collection.get()["ids"]) == sorted(["lc-1", nearest.id, "guide"])
