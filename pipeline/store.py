"""Chroma behind a small interface: the one place that knows the client API.

Collections are created with cosine distance and with the settings recorded in the
ledger at their first submission (``pipeline.collection``: the full-text index on or
off). indexq computes every vector itself, but the collection's configuration names the
embedding function that computes the same ones (Chroma's ``sentence_transformer`` on
the model's local directory, normalised), so that a plain Chroma client's
``query(query_texts=...)`` embeds queries as ``indexq search`` does, offline; ``hash:``
test models name none. The client is a PersistentClient on the writer's own directory,
or an HttpClient on a Chroma server (``chroma run``) when ``chroma_url`` is set.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline import collection as settings_of
from pipeline.collection import CollectionSettings
from pipeline.config import Config, redact_url
from pipeline.embedder import is_hash_model, resolve_model
from pipeline.errors import BadInputError, UnreachableError, first_line
from pipeline.rows import Row

T = TypeVar("T")

logger = logging.getLogger(__name__)


# What indexq's embedder does (pipeline.embedder): the stored vectors are unit length.
NORMALIZE = True


def embedding_function_config(model: str | None) -> dict[str, Any] | None:
    """The configuration Chroma stores for ``model``'s embedding function; None for none."""
    if model is None or is_hash_model(model):
        return None
    return {"device": "cpu", "kwargs": {}, "model_name": resolve_model(model), "normalize_embeddings": NORMALIZE}


def _embedding_function(model: str | None) -> Any:
    """Chroma's sentence_transformer function for ``model``, lazy (see ``lazy_sentence_transformer``)."""
    config = embedding_function_config(model)
    if config is None:
        return None
    return lazy_sentence_transformer()(
        model_name=config["model_name"], device=config["device"], normalize_embeddings=config["normalize_embeddings"]
    )


@functools.cache
def lazy_sentence_transformer() -> type:
    """Register, in this process, a sentence_transformer function that loads its model on its
    first call rather than in its constructor.

    Chroma 1.5.9 rebuilds a collection's embedding function from the stored configuration
    on every upsert and query (``Collection.schema`` -> ``build_from_config``), and its own
    class loads the model in the constructor: the writer, which never asks Chroma to embed,
    would hold a second copy of the model (measured: ``sentence_transformers`` imported and
    the model built on the first upsert). Same name, same configuration, same vectors when
    called, so a plain client elsewhere reads the collection as before, and code in this
    process that does call it (``query_texts``) gets the model then.
    """
    from chromadb.utils.embedding_functions import known_embedding_functions
    from chromadb.utils.embedding_functions.sentence_transformer_embedding_function import (
        SentenceTransformerEmbeddingFunction,
    )

    class LazySentenceTransformer(SentenceTransformerEmbeddingFunction):
        def __init__(
            self, model_name: str = "all-MiniLM-L6-v2", device: str = "cpu", normalize_embeddings: bool = False,
            **kwargs: Any,
        ) -> None:  # fmt: skip
            # No super().__init__(): that is what loads the model.
            for key, value in kwargs.items():
                if not isinstance(value, (str, int, float, bool, list, dict, tuple)):
                    raise ValueError(f"Keyword argument {key} is not a primitive type")
            self.model_name = model_name
            self.device = device
            self.normalize_embeddings = normalize_embeddings
            self.kwargs = kwargs

        @property
        def _model(self) -> Any:  # read by the parent's __call__ only
            if self.model_name not in self.models:
                from sentence_transformers import SentenceTransformer

                self.models[self.model_name] = SentenceTransformer(
                    model_name_or_path=self.model_name, device=self.device, **self.kwargs
                )
            return self.models[self.model_name]

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> LazySentenceTransformer:
            return LazySentenceTransformer(
                model_name=config["model_name"], device=config["device"],
                normalize_embeddings=config["normalize_embeddings"], **config.get("kwargs", {}),
            )  # fmt: skip

    known_embedding_functions[SentenceTransformerEmbeddingFunction.name()] = LazySentenceTransformer
    return LazySentenceTransformer


Settings = CollectionSettings | Callable[[str], CollectionSettings]


# Seconds to connect to a Chroma server, and to wait between bytes of an answer. Chroma's
# HttpClient waits forever (httpx with timeout=None): a server that took the connection
# and never answered hung every command instead of exit 5. An upsert of 10 or a query
# answers in milliseconds; a check's read of a few thousand records in seconds.
HTTP_CONNECT_TIMEOUT = 10.0
HTTP_READ_TIMEOUT = 120.0


def _answers(url: str, settings: Any) -> None:
    """Raise unless the server at ``url`` answers an HTTP request in time (any status),
    asked as Chroma's HttpClient asks it (its TLS verification: CHROMA_SERVER_SSL_VERIFY)."""
    import httpx

    timeout = httpx.Timeout(HTTP_READ_TIMEOUT, connect=HTTP_CONNECT_TIMEOUT)
    verify = settings.chroma_server_ssl_verify
    with httpx.Client(timeout=timeout, **({} if verify is None else {"verify": verify})) as probe:
        probe.get(f"{url}/api/v2/heartbeat")


def _bound_requests(client: Any) -> None:
    """Give the HTTP session under Chroma's client its timeouts (chromadb offers no setting)."""
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if not isinstance(session, httpx.Client):  # another chromadb's internals: as it is, and said
        logger.warning("cannot bound the Chroma server's requests in time: this chromadb has no httpx session")
        return
    session.timeout = httpx.Timeout(HTTP_READ_TIMEOUT, connect=HTTP_CONNECT_TIMEOUT)


# The processes that opened a local Chroma directory: a child forked from one of them
# inherits its Rust runtime without the runtime's threads.
_opened_in: set[int] = set()


def _not_forked_from_a_chroma_process() -> None:
    """Refuse a local Chroma in a process forked after its parent opened one: Chroma's Rust
    runtime does not survive a fork, and its first query there waited forever (measured:
    ``pipeline.search`` in a ``multiprocessing`` fork child, holding the commit lock the
    writer then waited on). A child started with "spawn" or "forkserver" is fine."""
    if _opened_in and os.getpid() not in _opened_in:
        raise BadInputError(
            "this process was forked from one that had opened Chroma, whose runtime does not survive a fork",
            hint="start it with multiprocessing.get_context('spawn') (or 'forkserver'), or fork before the first"
            " search",
        )


class Store:
    def __init__(
        self, path: Path | None = None, url: str | None = None, model: str | None = None,
        settings: Settings | None = None,
    ) -> None:  # fmt: skip
        """``model``: whose embedding function new collections name (none without one);
        ``settings``: what a new collection is created with, or a function of its name."""
        import chromadb
        from chromadb.api.client import SharedSystemClient

        # Chroma keeps one client per path per process; after a restore swapped the
        # directory, that cached client would still write to the old (moved) files.
        SharedSystemClient.clear_system_cache()
        lazy_sentence_transformer()  # before Chroma rebuilds any collection's function
        chroma_settings = chromadb.Settings(anonymized_telemetry=False, allow_reset=False)
        self.path = path
        self.url = url
        if url:
            parts = urllib.parse.urlsplit(url)
            try:
                _answers(url, chroma_settings)  # HttpClient asks the server before its session can be bounded
                self.client = chromadb.HttpClient(
                    host=parts.hostname or "localhost", port=parts.port or 8000, ssl=parts.scheme == "https",
                    settings=chroma_settings,
                )  # fmt: skip
                _bound_requests(self.client)
                self.client.heartbeat()
            except Exception as exc:
                raise UnreachableError(
                    f"cannot reach the Chroma server at {redact_url(url)}: {first_line(exc)}",
                    hint="start it (`chroma run --path DIR --port PORT`) or check INDEXQ_CHROMA_URL",
                ) from exc
        else:
            assert path is not None
            _not_forked_from_a_chroma_process()
            self.client = chromadb.PersistentClient(path=str(path), settings=chroma_settings)
            _opened_in.add(os.getpid())
        self._collections: dict[str, Any] = {}
        self._configured: set[str] = set()  # collections whose embedding function was checked
        self.model = model
        self._settings = settings if settings is not None else CollectionSettings()

    @classmethod
    def open(cls, config: Config) -> Store:
        """The configured Chroma; collections created as recorded in the ledger, naming the configured model."""
        ledger = config.ledger_path

        def settings(name: str) -> CollectionSettings:
            return settings_of.read(ledger, name)

        where = {"url": config.chroma_url} if config.chroma_url else {"path": config.chroma_dir}
        return cls(**where, model=config.model, settings=settings)

    @property
    def where(self) -> str:
        """For messages: never a password."""
        return redact_url(self.url) if self.url else str(self.path)

    def drop(self, collection: str) -> None:
        """Delete a collection (server rebuilds); a missing one is fine."""
        from chromadb.errors import NotFoundError as ChromaNotFound

        self._forget(collection)
        try:
            self.client.delete_collection(collection)
        except (ChromaNotFound, ValueError):
            pass

    def _forget(self, name: str) -> None:
        """Drop this process's handle of a collection: the next use looks it up again."""
        self._collections.pop(name, None)
        self._configured.discard(name)

    def close(self) -> None:
        """Stop this process's Chroma system now, while the caller still holds the commit lock.

        Whatever Chroma does when it stops (it may write its segment files) then happens
        while the writer is paused, not later at process exit.
        """
        from chromadb.api.client import SharedSystemClient

        self._collections.clear()
        self._configured.clear()
        SharedSystemClient.clear_system_cache()

    def collection(self, name: str, create: bool = True) -> Any:
        if name not in self._collections:
            from chromadb.errors import NotFoundError as ChromaNotFound

            try:
                # embedding_function=None: never build the configured function in this process.
                col = self.client.get_collection(name, embedding_function=None)
            except ChromaNotFound:
                if not create:
                    return None
                col = self._create(name)
            self._collections[name] = col
        if create and name not in self._configured:
            # The writer's open, to write: a collection made before the configuration named the model.
            self._configure(self._collections[name])
            self._warn_full_text(name)
            self._warn_space(self._collections[name])
            self._configured.add(name)
        return self._collections[name]

    def _warn_full_text(self, name: str) -> None:
        """Say so when Chroma's collection has the full-text index otherwise than recorded (one
        made by another client before indexq's first commit): Chroma cannot change it, and a
        rebuild from the ledger would create the collection as recorded."""
        have, want = self.full_text(name), self.settings_for(name).full_text
        if have is not None and have != want:
            logger.warning(
                "collection %s has Chroma's full-text index %s, though it was recorded %s: it was made outside"
                " indexq, and Chroma cannot change it; a rebuild from the ledger would make it %s",
                name, "on" if have else "off", "on" if want else "off", "on" if want else "off",
            )  # fmt: skip

    @staticmethod
    def _warn_space(col: Any) -> None:
        """Say so when Chroma's collection measures another distance than cosine (one made by
        another client before indexq's first commit): the ranking is the same for indexq's unit
        vectors, but the distances searches report are not (Chroma's l2 is twice cosine's)."""
        config = col.configuration_json or {}
        space = (config.get("hnsw") or config.get("spann") or {}).get("space")
        if space and space != "cosine":
            logger.warning(
                "collection %s measures %s distance, not cosine: it was made outside indexq; searches rank the same,"
                " but report other distances; a rebuild from the ledger would make it cosine", col.name, space,
            )  # fmt: skip

    def settings_for(self, name: str) -> CollectionSettings:
        return self._settings(name) if callable(self._settings) else self._settings

    def _model_for(self, name: str, settings: CollectionSettings | None = None) -> str | None:
        """The model whose function a collection names: the one whose vectors it holds, as the
        ledger records it, else this store's (a process that recovers the collection may run
        with another setting than the writer that filled it)."""
        return (settings or self.settings_for(name)).model or self.model

    def _create(self, name: str) -> Any:
        settings = self.settings_for(name)
        ef = _embedding_function(self._model_for(name, settings))
        logger.info("creating collection %s (full-text index %s)", name, "on" if settings.full_text else "off")
        if settings.full_text:
            return self.client.get_or_create_collection(
                name, embedding_function=ef, metadata={"hnsw:space": "cosine"}
            )  # fmt: skip
        from chromadb.api.types import FtsIndexConfig, Schema, VectorIndexConfig

        # A schema and a configuration (metadata's hnsw:space) cannot both be given: the
        # schema then carries the distance and the embedding function too.
        schema = Schema().delete_index(config=FtsIndexConfig(), key="#document")
        schema.create_index(VectorIndexConfig(space="cosine", embedding_function=ef))
        return self.client.get_or_create_collection(name, embedding_function=None, schema=schema)

    def _configure(self, col: Any) -> None:
        """Name the collection's model's embedding function in its configuration when it names
        none (or the model's directory moved); one configured otherwise is left alone."""
        model = self._model_for(col.name)
        want = embedding_function_config(model)
        have = (col.configuration_json or {}).get("embedding_function") or {}
        if want is None or (have.get("type") == "known" and have.get("name") != "sentence_transformer"):
            return
        if have.get("type") == "known" and have.get("config") == want:
            return
        try:
            col.modify(configuration={"embedding_function": _embedding_function(model)})
            logger.info("collection %s: embedding function set to %s", col.name, want["model_name"])
        except Exception as exc:  # its vectors are still right; only plain clients' query_texts lack it
            logger.warning("collection %s: could not store its embedding function: %s", col.name, first_line(exc))

    def full_text(self, name: str) -> bool | None:
        """Whether a collection has Chroma's full-text index on documents (None: no such collection)."""
        col = self.collection(name, create=False)
        if col is None:
            return None
        # The serialized schema, not ``col.schema``: that would build the embedding function.
        schema = getattr(col._model, "serialized_schema", None) or {}
        fts = (schema.get("keys", {}).get("#document", {}).get("string") or {}).get("fts_index") or {}
        return bool(fts.get("enabled", True))

    def _on(self, name: str, create: bool, op: Callable[[Any], T]) -> T | None:
        """``op`` on the collection's handle (None: no such collection and ``create`` False).

        A handle this process holds goes stale when another Chroma client deletes the
        collection (or deletes and makes it again): every call on it then raises Chroma's
        NotFoundError, for as long as the process lives. The collection is looked up again
        once, and made again as recorded if this is a write; what it held is then missing,
        which ``indexq check`` names and ``indexq recover`` puts back."""
        from chromadb.errors import NotFoundError as ChromaNotFound

        col = self.collection(name, create)
        if col is None:
            return None
        try:
            return op(col)
        except ChromaNotFound:
            self._forget(name)
            col = self.collection(name, create)
            logger.warning(
                "collection %s was deleted by another Chroma client since this process opened it: %s", name,
                "no longer there" if col is None else "opened again (what it held before is missing until"
                " `indexq recover`)" if create else "opened again",
            )  # fmt: skip
            return None if col is None else op(col)

    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        embeddings: np.ndarray,
        documents: Sequence[str],
        metadatas: Sequence[dict[str, Any]],
    ) -> None:
        self._on(collection, True, lambda col: col.upsert(
            ids=list(ids), embeddings=embeddings, documents=list(documents), metadatas=list(metadatas)
        ))  # fmt: skip

    def upsert_rows(self, collection: str, rows: Sequence[Row]) -> None:
        """Ledger rows with their stored embeddings (the writer's commit and recovery's replay).

        Chroma merges an upsert's metadata into that of the record it replaces: a key the
        new metadata no longer has (a field taken out of a JSONL record, a heading gone from
        a Markdown file, the ordinal of a record now one chunk) would stay. Each such key of
        the records held under these ids is given as None, which Chroma takes as "remove".
        Read for every commit (about half a millisecond for ten ids beside some 30 ms for the
        upsert): whether Chroma already holds an id is not the ledger's to know after a kill
        between an upsert and its checkpoint."""
        ids = [r.id for r in rows]
        vectors = np.stack([np.frombuffer(r.embedding or b"", dtype=np.float32) for r in rows])

        def write(col: Any) -> None:
            held = col.get(ids=ids, include=["metadatas"])
            before = {id_: meta or {} for id_, meta in zip(held["ids"], held["metadatas"] or [], strict=True)}
            metadatas = [
                {**r.metadata, **dict.fromkeys(before.get(r.id, {}).keys() - r.metadata.keys())} for r in rows
            ]  # fmt: skip
            col.upsert(ids=ids, embeddings=vectors, documents=[r.text for r in rows], metadatas=metadatas)

        self._on(collection, True, write)

    def ids(self, collection: str) -> set[str]:
        def read(col: Any) -> set[str]:
            out: set[str] = set()
            total = col.count()
            for offset in range(0, total, 5000):
                out.update(col.get(include=[], limit=5000, offset=offset)["ids"])
            return out

        return self._on(collection, False, read) or set()

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        """Deletes neither create the collection nor name its embedding function: they are
        not this model's vectors (a writer of another model removes stale chunks too)."""
        self._on(collection, False, lambda col: col.delete(ids=list(ids)))

    def query(self, collection: str, embedding: np.ndarray, k: int) -> list[dict[str, Any]]:
        result = self._on(collection, False, lambda col: col.query(
            query_embeddings=embedding.reshape(1, -1), n_results=k, include=["documents", "metadatas", "distances"]
        ))  # fmt: skip
        if result is None:
            return []
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
