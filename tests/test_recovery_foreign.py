"""Other programs beside indexq in its Chroma directory: a lock they hold is busy, not damage;
their collections are named when recovery sets the directory aside; a collection they made
under the ledger's name (another dimension) is restored, not replayed into for ever."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Proc, copy_corpus, ledger_query, run_cli, start_worker, wait_for

pytestmark = pytest.mark.e2e

MODEL = {"INDEXQ_MODEL": "hash:384"}
COLLECTION = "col"
# A lock another program holds is waited for this long (INDEXQ_LOCK_TIMEOUT), then busy.
FAST = {**MODEL, "INDEXQ_LOCK_TIMEOUT": "1"}


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small home, every chunk committed, with a verified backup."""
    root = tmp_path_factory.mktemp("foreign")
    home = root / "home"
    corpus = copy_corpus(root / "corpus", ["json/decoder.py", "json/scanner.py"])
    started: list[Proc] = []
    try:
        writer = start_worker(started, home, **MODEL)
        writer.wait_started()
        submitted = run_cli(home, "index", str(corpus), "-c", COLLECTION, **MODEL)
        assert submitted.returncode == 0, submitted.stderr

        def done() -> bool:
            rows = ledger_query(home, "SELECT count(*) FROM chunks WHERE state != 'committed'")
            return int(rows[0][0]) == 0

        wait_for(done, 120, "the job")
        assert writer.terminate() == 0
    finally:
        for proc in started:
            proc.cleanup()
    backup = run_cli(home, "backup", **MODEL)
    assert backup.returncode == 0, backup.stderr
    return home


@pytest.fixture
def home(golden: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(golden, copy)
    return copy


def chroma_client(home: Path) -> object:
    """A plain Chroma client on the home's directory, as another program would open it."""
    import chromadb
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()
    return chromadb.PersistentClient(path=str(home / "chroma"), settings=chromadb.Settings(anonymized_telemetry=False))


def close_clients() -> None:
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()


def names(chroma: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{chroma / 'chroma.sqlite3'}?mode=ro", uri=True)
    try:
        return sorted(n for (n,) in conn.execute("SELECT name FROM collections"))
    finally:
        conn.close()


@pytest.fixture
def locked(home: Path) -> Iterator[sqlite3.Connection]:
    """Another program's connection to chroma.sqlite3; the test takes its lock."""
    conn = sqlite3.connect(home / "chroma" / "chroma.sqlite3", isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["exclusive", "write"])
def test_another_programs_lock_is_busy_and_recovery_moves_nothing(
    home: Path, locked: sqlite3.Connection, how: str
) -> None:
    # An exclusive lock stops every read (the SQLite layer); a write in progress stops the
    # full-text check, which is spelled as an INSERT (the fts layer). Neither is damage.
    if how == "exclusive":
        locked.execute("BEGIN EXCLUSIVE")
    else:
        locked.execute("BEGIN IMMEDIATE")
        locked.execute("UPDATE collections SET name = name")
    before = sorted(p.name for p in home.iterdir())
    for command in (["check"], ["recover"]) if how == "exclusive" else (["recover"],):
        result = run_cli(home, *command, **FAST)
        assert result.returncode == 4, (command, result.stdout, result.stderr)
        assert "another program holds a lock on" in result.stderr and "this is not damage" in result.stderr
        assert "damaged" not in result.stdout and "Traceback" not in result.stderr
    assert not (home / "quarantine").exists()
    assert sorted(p.name for p in home.iterdir()) == before


def test_recovery_names_the_collections_it_leaves_in_quarantine(home: Path) -> None:
    client = chroma_client(home)
    other = client.create_collection("other", embedding_function=None)  # type: ignore[attr-defined]
    other.add(ids=["a", "b", "c"], embeddings=[[1.0, 0.0, 0.0]] * 3, documents=["x", "y", "z"])
    close_clients()
    # Damage to indexq's own collection: its vector segment folder gone.
    conn = sqlite3.connect(home / "chroma" / "chroma.sqlite3")
    (segment,) = conn.execute(
        "SELECT s.id FROM segments s JOIN collections c ON c.id = s.collection WHERE c.name=? AND s.scope='VECTOR'",
        (COLLECTION,),
    ).fetchone()
    conn.close()
    shutil.rmtree(home / "chroma" / segment)

    result = run_cli(home, "recover", "--json", **FAST)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert (done["action"], done["healthy"], done["foreign"]) == ("restore", True, ["other"])
    where = Path(done["quarantine"]) / "chroma"
    assert f"collections not indexq's, left in {where} with the damaged directory: other" in result.stderr
    assert names(where) == [COLLECTION, "other"]
    assert names(home / "chroma") == [COLLECTION]
    (summary,) = ledger_query(home, "SELECT summary FROM events WHERE kind='recovery'")[-1]
    assert f"collections not indexq's, left in {where} with the damaged directory: other" in summary


def test_a_collection_another_program_recreated_with_another_dimension_is_restored(home: Path) -> None:
    client = chroma_client(home)
    client.delete_collection(COLLECTION)  # type: ignore[attr-defined]
    mine = client.create_collection(COLLECTION, embedding_function=None)  # type: ignore[attr-defined]
    mine.add(ids=["x1"], embeddings=[[1.0, 2.0, 3.0]])
    close_clients()

    result = run_cli(home, "recover", "--json", **FAST)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    done = json.loads(result.stdout)
    # Not a replay, which Chroma refuses vector by vector at every attempt: a restore.
    assert (done["action"], done["healthy"]) == ("restore", True)
    assert any("not the collection indexq created" in found for found in done["found"])
    assert names(Path(done["quarantine"]) / "chroma") == [COLLECTION]  # the other program's, set aside
