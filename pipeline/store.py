"""Chroma behind a small interface: the one place that knows the client API.

Collections are created without an embedding function (indexq computes every vector,
and Chroma's default function would download a model) and with cosine distance.
The client is a PersistentClient on the writer's own directory, or an HttpClient on
a Chroma server (``chroma run``) when ``chroma_url`` is set.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, redact_url
from pipeline.errors import UnreachableError, first_line
from pipeline.rows import Row

logger = logging.getLogger(__name__)


class Store:
    def __init__(self, path: Path | None = None, url: str | None = None) -> None:
        import chromadb
        from chromadb.api.client import SharedSystemClient

        # Chroma keeps one client per path per process; after a restore swapped the
        # directory, that cached client would still write to the old (moved) files.
        SharedSystemClient.clear_system_cache()
        settings = chromadb.Settings(anonymized_telemetry=False, allow_reset=False)
        self.path = path
        self.url = url
        if url:
            parts = urllib.parse.urlsplit(url)
            try:
                self.client = chromadb.HttpClient(
                    host=parts.hostname or "localhost", port=parts.port or 8000, ssl=parts.scheme == "https",
                    settings=settings,
                )  # fmt: skip
                self.client.heartbeat()
            except Exception as exc:
                raise UnreachableError(
                    f"cannot reach the Chroma server at {redact_url(url)}: {first_line(exc)}",
                    hint="start it (`chroma run --path DIR --port PORT`) or check INDEXQ_CHROMA_URL",
                ) from exc
        else:
            assert path is not None
            self.client = chromadb.PersistentClient(path=str(path), settings=settings)
        self._collections: dict[str, Any] = {}

    @classmethod
    def open(cls, config: Config) -> Store:
        return cls(url=config.chroma_url) if config.chroma_url else cls(path=config.chroma_dir)

    @property
    def where(self) -> str:
        """For messages: never a password."""
        return redact_url(self.url) if self.url else str(self.path)

    def drop(self, collection: str) -> None:
        """Delete a collection (server rebuilds); a missing one is fine."""
        from chromadb.errors import NotFoundError as ChromaNotFound

        self._collections.pop(collection, None)
        try:
            self.client.delete_collection(collection)
        except (ChromaNotFound, ValueError):
            pass

    def close(self) -> None:
        """Stop this process's Chroma system now, while the caller still holds the commit lock.

        Whatever Chroma does when it stops (it may write its segment files) then happens
        while the writer is paused, not later at process exit.
        """
        from chromadb.api.client import SharedSystemClient

        self._collections.clear()
        SharedSystemClient.clear_system_cache()

    def collection(self, name: str, create: bool = True) -> Any:
        if name not in self._collections:
            if create:
                self._collections[name] = self.client.get_or_create_collection(
                    name, embedding_function=None, metadata={"hnsw:space": "cosine"}
                )
            else:
                from chromadb.errors import NotFoundError as ChromaNotFound

                try:
                    self._collections[name] = self.client.get_collection(name, embedding_function=None)
                except ChromaNotFound:
                    return None
        return self._collections[name]

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        embeddings: np.ndarray,
        documents: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
    ) -> None:
        self.collection(collection).upsert(
            ids=list(ids), embeddings=embeddings, documents=list(documents), metadatas=list(metadatas)
        )

    def upsert_rows(self, collection: str, rows: Sequence[Row]) -> None:
        """Ledger rows with their stored embeddings (the writer's commit and recovery's replay)."""
        vectors = np.stack([np.frombuffer(r.embedding or b"", dtype=np.float32) for r in rows])
        self.upsert(collection, [r.id for r in rows], vectors, [r.text for r in rows], [r.metadata for r in rows])

    def ids(self, collection: str) -> set[str]:
        col = self.collection(collection, create=False)
        if col is None:
            return set()
        out: set[str] = set()
        total = col.count()
        for offset in range(0, total, 5000):
            out.update(col.get(include=[], limit=5000, offset=offset)["ids"])
        return out

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        self.collection(collection).delete(ids=list(ids))

    def query(self, collection: str, embedding: np.ndarray, k: int) -> list[dict[str, Any]]:
        col = self.collection(collection, create=False)
        if col is None:
            return []
        result = col.query(
            query_embeddings=embedding.reshape(1, -1), n_results=k, include=["documents", "metadatas", "distances"]
        )
        hits = []
        for id_, doc, meta, dist in zip(
            result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0], strict=True
        ):
            hits.append({"id": id_, "distance": float(dist), "document": doc, "metadata": dict(meta or {})})
        return hits

    def exists(self, collection: str) -> bool:
        return self.collection(collection, create=False) is not None

    def dump(self, collection: str) -> dict[str, dict[str, Any]]:
        """id -> {document, metadata, embedding}: every record, for checks and tests."""
        col = self.collection(collection, create=False)
        if col is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        total = col.count()
        for offset in range(0, total, 1000):
            page = col.get(include=["documents", "metadatas", "embeddings"], limit=1000, offset=offset)
            for id_, doc, meta, emb in zip(
                page["ids"], page["documents"], page["metadatas"], page["embeddings"], strict=True
            ):
                out[id_] = {"document": doc, "metadata": dict(meta or {}), "embedding": np.asarray(emb)}
        return out
