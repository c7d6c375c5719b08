"""Units of the scale-out path without servers: signed JSON messages, intake parts, ledger ingest."""

from __future__ import annotations

import datetime
import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
from huey.registry import Message
from huey.storage import SqliteStorage

from pipeline.config import Config
from pipeline.errors import ConfigError, ForgedPayloadError
from pipeline.intake import Intake, part_key
from pipeline.ledger import Ledger
from pipeline.serializer import JsonSerializer


def message(**changes: Any) -> Message:
    base = Message("id-1", "tasks.indexing.index_chunks", None, 3, 5, None, ("docs", ["a", "b"]), {}, None, None, None)
    return base._replace(**changes)


def test_messages_round_trip_as_signed_json() -> None:
    serializer = JsonSerializer("key", salt="indexq-writer")
    eta = datetime.datetime(2026, 11, 26, 1, 2, 3, 456)
    original = message(eta=eta, on_complete=message(id="id-2"))
    data = serializer.serialize(original)
    assert data.startswith(b"iq1:") and b"docs" in data
    decoded = serializer.deserialize(data)
    assert decoded.eta == eta
    assert decoded.on_complete.id == "id-2"
    assert list(decoded.args[1]) == ["a", "b"]


@pytest.mark.parametrize(
    "forged",
    [
        pickle.dumps(message()),  # Huey's own format
        b"iq1:" + b"0" * 64 + b":" + json.dumps({"$message": {"id": "x"}}).encode(),  # wrong signature
        JsonSerializer("another key", salt="indexq-writer").serialize(message()),
        JsonSerializer("key", salt="indexq-maintenance").serialize(message()),  # another queue's key
        b"",
    ],
)
def test_payloads_not_signed_with_this_key_are_refused_and_logged(
    forged: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    serializer = JsonSerializer("key", salt="indexq-writer")
    with pytest.raises(ForgedPayloadError):
        serializer.deserialize(forged)
    assert "refused a queue payload" in caplog.text
    assert "it was not executed" in caplog.text


def test_signed_payload_that_is_not_a_message_is_refused() -> None:
    serializer = JsonSerializer("key", salt="s")
    with pytest.raises(ForgedPayloadError, match="not a task message"):
        serializer.deserialize(serializer.signer.dumps({"name": "os.system"}))


def test_arguments_that_cannot_travel_as_json_fail_at_enqueue() -> None:
    with pytest.raises(TypeError, match="cannot travel as JSON"):
        JsonSerializer("key", salt="s").serialize(message(args=(object(),)))


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://host:6379", "must be sqlite:///PATH or redis://HOST:PORT/DB"),
        ("redis://:6379/0", "must name a host"),
        ("redis://host:port/0", "bad port"),
        ("redis://host:6379/zero", "must end with a database number"),
        ("sqlite://", "must name a file"),
    ],
)
def test_bad_queue_urls_name_the_setting(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error) as info:
        Config.from_env({"INDEXQ_QUEUE_URL": url})
    assert str(info.value).startswith("INDEXQ_QUEUE_URL ")


@pytest.mark.parametrize("url", ["redis://host:6379/0", "chroma.local:8000", "http://host", "http://host:8000/x"])
def test_bad_chroma_urls_name_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match="INDEXQ_CHROMA_URL must be http://HOST:PORT"):
        Config.from_env({"INDEXQ_CHROMA_URL": url})


def test_engines_follow_the_urls(tmp_path: Path) -> None:
    local = Config(home=tmp_path)
    assert (local.queue_engine, local.chroma_engine, local.remote_producers) == ("sqlite", "persistent", False)
    shared = Config(home=tmp_path, queue_url="redis://10.0.0.5:6379/2", chroma_url="http://10.0.0.6:8000/")
    assert (shared.queue_engine, shared.chroma_engine, shared.remote_producers) == ("redis", "server", True)
    assert shared.chroma_url == "http://10.0.0.6:8000"
    assert Config(home=tmp_path, queue_url="sqlite:///q/queue.db").queue_path == Path("q/queue.db").absolute()
    assert Config(home=tmp_path, queue_url="sqlite:////var/q.db").queue_path == Path("/var/q.db")
    # Passwords never reach a message or `indexq status`.
    secret = Config(home=tmp_path, queue_url="redis://indexq:hunter2@10.0.0.5:6379/2")
    assert secret.queue_shown == "redis://indexq:***@10.0.0.5:6379/2"


def _part(job: str, files: list[tuple[str, list[str]]], final: bool = True, parts: int = 1) -> dict[str, Any]:
    entries = []
    for source, texts in files:
        chunks = [
            {"id": f"{source}#{n}", "ordinal": n, "text": t, "metadata": {"source": source}, "hash": f"h-{t}"}
            for n, t in enumerate(texts)
        ]
        entries.append({"source": source, "total": len(chunks), "chunks": chunks})
    part: dict[str, Any] = {"job": job, "collection": "docs", "kind": "paths", "sources": ["/x"], "final": final}
    part["files"] = entries
    if final:
        part["parts"] = parts
        part["skipped"] = []
    return part


def test_ingesting_a_part_twice_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    part = _part("20261126-000000-aaaaaa", [("a.py", ["one", "two"]), ("b.py", ["three"])])
    work = ledger.sources.ingest("k1", part, "m")
    assert work == (["a.py#0", "a.py#1", "b.py#0"], [])
    assert ledger.sources.ingest("k1", part, "m") is None  # a replayed ingest task
    # ...which still finds what the first one recorded but did not get enqueued.
    assert ledger.sources.outstanding_of(part) == (["a.py#0", "a.py#1", "b.py#0"], [])
    progress = ledger.jobs.progress("20261126-000000-aaaaaa")
    assert progress is not None
    assert (progress.state, progress.chunks, progress.pending) == ("running", 3, 3)
    (total, new) = ledger.conn.execute("SELECT total, new FROM jobs").fetchone()
    assert (total, new) == (3, 3)


def test_resubmission_through_the_intake_is_compared_with_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.sources.ingest("k1", _part("j1", [("a.py", ["one", "two", "three"])]), "m")
    to_index, stale = ledger.sources.ingest("k2", _part("j2", [("a.py", ["one", "TWO"])]), "m") or ([], [])
    assert to_index == ["a.py#0", "a.py#1"]  # #0 unchanged but still pending; #1 changed
    assert stale == ["a.py#2"]
    (new, changed, unchanged, n_stale) = ledger.conn.execute(
        "SELECT new, changed, unchanged, stale FROM jobs WHERE id='j2'"
    ).fetchone()
    assert (new, changed, unchanged, n_stale) == (0, 1, 1, 1)


def test_a_job_is_queued_only_once_all_its_parts_are_in(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    # The final part may be ingested first (a requeue after a kill): the job waits.
    ledger.sources.ingest("k2", _part("j", [("b.py", ["b"])], final=True, parts=2), "m")
    assert ledger.conn.execute("SELECT state FROM jobs").fetchone()[0] == "submitting"
    ledger.sources.ingest("k1", _part("j", [("a.py", ["a"])], final=False), "m")
    assert ledger.conn.execute("SELECT state FROM jobs").fetchone()[0] == "queued"


def test_prune_through_the_intake_waits_for_every_part_and_keeps_excluded_files(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    files = [(f"/t/{name}", [f"text of {name}"]) for name in ("a.py", "b.py", "gone.py", "notes.md", "x/unread.py")]
    ledger.sources.ingest("k0", _part("j1", [*files, ("/elsewhere/gone.py", ["other"])]), "m")
    # The resubmission: gone.py was deleted, notes.md is excluded by a glob now, unread.py
    # could not be read; the final part (with --prune) arrives first.
    final = _part("j2", [("/t/b.py", ["text of b.py"])], final=True, parts=2)
    final["prune"] = {"roots": ["/t"], "include": [], "exclude": ["*.md"]}
    final["skipped"] = [{"source": "/t/x/unread.py", "reason": "unreadable: Permission denied"}]
    work = ledger.sources.ingest("k2", final, "m")
    assert work is not None and work[1] == []  # nothing is pruned before every part is in
    _, stale = ledger.sources.ingest("k1", _part("j2", [("/t/a.py", ["text of a.py"])], final=False), "m") or ([], [])
    assert stale == ["/t/gone.py#0"]
    assert ledger.conn.execute("SELECT pruned, stale, state FROM jobs WHERE id='j2'").fetchone() == (1, 1, "queued")
    states = dict(ledger.conn.execute("SELECT source, state FROM chunks"))
    assert states["/t/gone.py"] == "deleting"
    assert {states[s] for s in ("/t/notes.md", "/t/x/unread.py", "/elsewhere/gone.py")} == {"pending"}


def test_a_record_id_another_source_holds_is_refused_at_ingest_and_listed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.sources.ingest("k1", _part("j1", [("id:c", ["c zero", "c one"])]), "m")  # ids id:c#0, id:c#1
    intruder = _part("j2", [("id:other", ["replacement"])])
    intruder["files"][0]["chunks"][0]["id"] = "id:c#1"
    to_index, _ = ledger.sources.ingest("k2", intruder, "m") or ([], [])
    assert to_index == []
    assert ledger.conn.execute("SELECT source, text FROM chunks WHERE id='id:c#1'").fetchone() == ("id:c", "c one")
    (skipped,) = ledger.conn.execute("SELECT skipped FROM jobs WHERE id='j2'").fetchone()
    assert json.loads(skipped) == [{"source": "id:other", "reason": "id 'id:c#1' is already held by id:c"}]


def test_metadata_only_change_through_the_intake_keeps_the_embedding(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.sources.ingest("k1", _part("j1", [("a.py", ["one"])]), "m")
    ledger.store_embeddings("docs", [("a.py#0", "h-one", b"\x01" * 8)], "m")
    ledger.checkpoint("docs", [("a.py#0", "h-one", None)])
    moved = _part("j2", [("a.py", ["one"])])
    moved["files"][0]["chunks"][0]["metadata"] = {"source": "a.py", "start_line": 3}
    to_index, _ = ledger.sources.ingest("k2", moved, "m") or ([], [])
    assert to_index == ["a.py#0"]
    row = ledger.conn.execute("SELECT state, embedding, metadata FROM chunks").fetchone()
    assert row == ("embedded", b"\x01" * 8, '{"source": "a.py", "start_line": 3}')
    assert ledger.conn.execute("SELECT metadata_updated, changed FROM jobs WHERE id='j2'").fetchone() == (1, 0)


def test_intake_parts_are_signed_and_checked(tmp_path: Path) -> None:
    storage = SqliteStorage("t", filename=str(tmp_path / "q.db"))
    intake = Intake(storage, "key")
    key = part_key("20261126-000000-aaaaaa", 0)
    intake.put(key, _part("20261126-000000-aaaaaa", [("a.py", ["one"])]))
    assert intake.keys() == [key]
    assert intake.read(key)["files"][0]["chunks"][0]["text"] == "one"  # type: ignore[index]
    storage.put_data("indexq.intake.x.000000", Intake(storage, "other key").signer.dumps({"format": 1}))
    with pytest.raises(ForgedPayloadError):
        intake.read("indexq.intake.x.000000")
    storage.put_data("indexq.intake.y.000000", intake.signer.dumps({"format": 1, "job": "y"}))
    with pytest.raises(ForgedPayloadError, match="not a well-formed part"):
        intake.read("indexq.intake.y.000000")
    # A signed part copied under another key (to replay old text) is refused, and kept aside.
    copy = part_key("20261126-000000-bbbbbb", 0)
    storage.put_data(copy, storage.peek_data(key))
    with pytest.raises(ForgedPayloadError, match="a copy, not a part"):
        intake.read(copy)
    assert intake.reject(copy) == "indexq.rejected." + copy
    assert copy not in intake.keys()
    intake.remove(key)
    assert intake.read(key) is None


def test_progress_lost_to_a_kill_is_published_again_at_start(tmp_path: Path) -> None:
    from pipeline.progress import Publisher

    config = Config(home=tmp_path)
    ledger = Ledger(config.ledger_path)
    ledger.sources.ingest("k1", _part("j1", [("a.py", ["one", "two"])]), "m")
    ledger.store_embeddings("docs", [("a.py#0", "h-one", b"\0" * 16), ("a.py#1", "h-two", b"\0" * 16)], "m")
    # Committed, then the writer died before publishing: nothing in the queue says so.
    ledger.checkpoint("docs", [("a.py#0", "h-one", None), ("a.py#1", "h-two", None)])
    intake = Intake(SqliteStorage("t", filename=str(tmp_path / "q.db")), "key")
    assert intake.progress("j1") is None
    publisher = Publisher(config, intake)
    publisher.start()  # a restarted writer: every unfinished job is republished
    publisher.close()
    published = intake.progress("j1")
    assert published is not None
    assert (published["state"], published["committed"], published["pending"]) == ("done", 2, 0)
    assert ledger.jobs.unfinished() == []  # published as finished: not refreshed again
    # Old finished entries go with the retention.
    assert intake.prune_progress(time.time() + 1) == 1
    assert intake.progress("j1") is None


@pytest.fixture
def silent_server() -> Any:
    """A TCP port that takes connections and never answers (a stopped server, a wrong protocol)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = False

    def accept() -> None:
        while not stop:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    import threading

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop = True
    listener.close()
    for conn in held:
        conn.close()


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_is_unreachable_not_a_hang(
    silent_server: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py and Chroma's HttpClient wait forever by default: `indexq index`, `status`,
    # `check` and `search` hung on such a server instead of exiting 5.
    from pipeline import queue, store
    from pipeline.errors import UnreachableError

    monkeypatch.setenv("INDEXQ_SECRET", "0123456789abcdef0123456789abcdef")
    monkeypatch.setattr(queue, "REDIS_SOCKET_TIMEOUT", 0.5)
    monkeypatch.setattr(store, "HTTP_READ_TIMEOUT", 0.5)
    config = Config(home=tmp_path / "home", queue_url=f"redis://127.0.0.1:{silent_server}/0", model="hash:384")
    with pytest.raises(UnreachableError, match=r"^cannot reach the queue at redis://127\.0\.0\.1:\d+/0: Timeout"):
        queue.QueueClient(config).ping()
    with pytest.raises(UnreachableError, match=r"^cannot reach the Chroma server at http://127\.0\.0\.1:\d+: "):
        store.Store(url=f"http://127.0.0.1:{silent_server}", model="hash:384")


def test_a_redis_that_stops_answering_is_exit_5_for_resume_and_waited_out_by_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `indexq resume` printed a traceback; `index --wait` died with one when Redis restarted.
    import redis.exceptions

    from pipeline import api
    from pipeline.errors import UnreachableError
    from pipeline.jobs import JobProgress

    monkeypatch.setenv("INDEXQ_SECRET", "0123456789abcdef0123456789abcdef")
    monkeypatch.setattr(api, "POLL_SECONDS", 0.01)
    config = Config(home=tmp_path / "home", queue_url="redis://127.0.0.1:1/0", model="hash:384")  # nothing listens
    with pytest.raises(UnreachableError, match=r"^cannot reach the queue at redis://127\.0\.0\.1:1/0: "):
        api.resume(config)
    done = JobProgress("job-1", "docs", "done", 3, 3, 0, 0, time.time(), 0)
    answers: list[Any] = [redis.exceptions.ConnectionError("Connection refused")] * 3 + [done]

    def progress(*args: Any) -> JobProgress:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(api, "_remote_progress", progress)
    assert api.wait("job-1", config) == done  # a restart is waited out
    monkeypatch.setattr(api, "WAIT_UNREACHABLE_SECONDS", 0.05)
    answers[:] = [redis.exceptions.ConnectionError("Connection refused")] * 1000
    with pytest.raises(UnreachableError):  # one that stays away ends the wait: exit 5
        api.wait("job-1", config)
