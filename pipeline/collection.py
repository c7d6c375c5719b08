"""What a collection is created with, chosen at its first submission and kept in the ledger.

The writer creates a Chroma collection on its first commit, long after the user chose
how (``indexq index --no-full-text``): the choice is recorded in the ledger's
``collection_settings`` table, in the transaction of the submission's first rows (or of
a remote part's ingest), and every path that creates the collection (the writer,
recovery's rebuild, a replay after a restore) reads it back from there. A collection
the ledger has rows for but no setting was made before the setting existed: it has the
defaults. Asking for another setting later is refused before anything is written.

The model whose vectors a collection holds is recorded beside, by the writer's first
task for the collection (``claim_model``); until then, in a ledger from before models
were recorded, the models of its committed rows tell (``models_of``). Vectors of two
models in one collection rank nonsense, so a writer, a submission or a search with
another model is refused, and so is any writer or submission to a collection that
already holds two models' vectors (made before this check existed).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

from pipeline.config import DEFAULT_FULL_TEXT
from pipeline.embedder import model_identity
from pipeline.errors import ConfigError

TABLE = "collection_settings"


@dataclasses.dataclass(frozen=True)
class CollectionSettings:
    # Chroma's full-text (FTS5 trigram) index on documents: ``where_document`` needs it.
    # Off, documents are still stored and returned.
    full_text: bool = DEFAULT_FULL_TEXT
    # The model whose vectors it holds (``embedder.model_identity``); None until the
    # writer's first task for it records one.
    model: str | None = None

    def as_dict(self) -> dict[str, bool | str | None]:
        return dataclasses.asdict(self)


def _create(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (collection TEXT PRIMARY KEY, full_text INTEGER NOT NULL, model TEXT)"
    )
    if "model" not in _columns(conn):  # made before the model was recorded
        conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN model TEXT")


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}


def _rows(conn: sqlite3.Connection, collection: str | None = None) -> list[tuple[str, int, str | None]]:
    """(collection, full_text, model) as recorded, for ``collection`` or for all; none in a
    ledger that no submission with settings has touched yet (the table is made by the first)."""
    columns = _columns(conn)
    if not columns:
        return []
    model = "model" if "model" in columns else "NULL"
    sql, params = f"SELECT collection, full_text, {model} FROM {TABLE}", []
    if collection is not None:
        sql, params = f"{sql} WHERE collection=?", [collection]
    return conn.execute(sql, params).fetchall()


def recorded(conn: sqlite3.Connection, collection: str) -> CollectionSettings | None:
    """The settings recorded for ``collection``; defaults for one indexed before settings were
    recorded; None for a collection the ledger does not know yet."""
    for _, full_text, model in _rows(conn, collection):
        return CollectionSettings(full_text=bool(full_text), model=model)
    if conn.execute("SELECT 1 FROM chunks WHERE collection=? LIMIT 1", (collection,)).fetchone():
        return CollectionSettings()
    return None


def check(
    conn: sqlite3.Connection, collection: str, full_text: bool | None, model: str | None = None
) -> CollectionSettings:
    """The settings a submission to ``collection`` gets; ConfigError if it asked for others
    than the collection already has (``full_text`` None: whatever it has, else the default),
    or embeds with another ``model`` than the one whose vectors it holds."""
    have = recorded(conn, collection)
    if have is None:
        return CollectionSettings() if full_text is None else CollectionSettings(full_text=full_text)
    if full_text is not None and full_text != have.full_text:
        raise ConfigError(
            f"collection {collection!r} was created with the full-text index {'on' if have.full_text else 'off'};"
            f" it cannot be turned {'on' if full_text else 'off'} now",
            hint="leave out --full-text/--no-full-text (and INDEXQ_FULL_TEXT), or index into a new collection",
        )
    if model is not None:
        check_model(conn, collection, model)
    return have


def models_of(conn: sqlite3.Connection, collection: str) -> list[str]:
    """The models (``model_identity``) whose vectors ``collection`` holds: the one recorded,
    else, in a ledger from before models were recorded, those of its committed rows
    (sorted); none for a collection with no vectors yet."""
    for _, _, model in _rows(conn, collection):
        if model is not None:
            return [model]
    committed = conn.execute(
        "SELECT DISTINCT model FROM chunks WHERE collection=? AND state='committed' AND model IS NOT NULL",
        (collection,),
    )
    return sorted({model_identity(name) for (name,) in committed})


def mismatch(conn: sqlite3.Connection, collection: str, model: str, mixed_ok: bool = False) -> list[str] | None:
    """Why ``model`` cannot write to (or, with ``mixed_ok``, search) ``collection``: None
    where the collection holds its vectors or none; else the models whose vectors it holds."""
    have = models_of(conn, collection)
    if not have or have == [model_identity(model)] or (mixed_ok and model_identity(model) in have):
        return None
    return have


def held(models: list[str]) -> str:
    """The models of ``mismatch`` for a message."""
    return f"several models ({' and '.join(models)})" if len(models) > 1 else f"the model {models[0]}"


def check_model(conn: sqlite3.Connection, collection: str, model: str, mixed_ok: bool = False) -> None:
    """ConfigError if ``collection`` holds the vectors of another model than ``model``, or of
    several (a search with one of them, ``mixed_ok``, is let through)."""
    other = mismatch(conn, collection, model, mixed_ok)
    if other is None:
        return
    if len(other) > 1:
        raise ConfigError(
            f"collection {collection!r} holds vectors of {held(other)}, made before indexq"
            " checked this; they cannot be ranked together",
            hint="index into a new collection with one model",
        )
    raise ConfigError(
        f"collection {collection!r} holds vectors of {held(other)}, not of {model}",
        hint=f"set INDEXQ_MODEL={other[0]} (or --model), or index into a new collection",
    )


def claim_model(conn: sqlite3.Connection, collection: str, model: str) -> list[str] | None:
    """In the caller's transaction, before a writer's first commit to ``collection``: None if
    it holds ``model``'s vectors or none, recording the model when none was recorded yet;
    else the model, or models, whose vectors it holds (``mismatch``)."""
    other = mismatch(conn, collection, model)
    if other is not None:
        return other
    have = recorded(conn, collection)
    if have is not None and have.model is not None:
        return None
    want = model_identity(model)
    _create(conn)
    conn.execute(
        f"INSERT INTO {TABLE}(collection, full_text, model) VALUES (?, ?, ?)"
        " ON CONFLICT(collection) DO UPDATE SET model=excluded.model WHERE model IS NULL",
        (collection, int((have or CollectionSettings()).full_text), want),
    )
    return None


def record(conn: sqlite3.Connection, collection: str, full_text: bool | None) -> None:
    """In the caller's transaction: check, then record the settings of a collection the ledger
    does not know yet (settings left unasked are recorded too, so they never change)."""
    settings = check(conn, collection, full_text)
    _create(conn)
    conn.execute(
        f"INSERT OR IGNORE INTO {TABLE}(collection, full_text) VALUES (?, ?)", (collection, int(settings.full_text))
    )


def read(ledger_path: Path, collection: str) -> CollectionSettings:
    """For whoever creates or opens the collection in Chroma (the writer, recovery): what was
    recorded, else the defaults; the model is also that of the committed rows of a ledger
    from before models were recorded, where they are of one."""
    if not ledger_path.exists():
        return CollectionSettings()
    conn = sqlite3.connect(str(ledger_path), timeout=120)
    try:
        settings = recorded(conn, collection) or CollectionSettings()
        models = models_of(conn, collection)
        return dataclasses.replace(settings, model=models[0]) if len(models) == 1 else settings
    finally:
        conn.close()


def all_recorded(conn: sqlite3.Connection) -> dict[str, CollectionSettings]:
    """collection -> settings, for every collection the ledger has rows or settings for (status)."""
    found = {c: CollectionSettings() for (c,) in conn.execute("SELECT DISTINCT collection FROM chunks")}
    for collection, full_text, model in _rows(conn):
        found[collection] = CollectionSettings(full_text=bool(full_text), model=model)
    return dict(sorted(found.items()))
