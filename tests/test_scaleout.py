"""Scale-out on real engines: a real redis-server queue and a real `chroma run` server.

Producers run as separate processes with their own (empty) data homes, as they would
on other machines: they share only the Redis URL and the signing key with the writer.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import (
    BIN,
    Proc,
    copy_corpus,
    dump_collection,
    env_for,
    job_state,
    ledger_query,
    run_cli,
    start_worker,
    wait_for,
)
from tests.jsondoc import fields
from tests.servers import chroma_url, redis_url  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e

SECRET = "test-secret-" + "0" * 32
# Three producers, three corpora (~270 chunks together): ~10 s of embedding here.
CORPORA = [
    ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py"],
    ["textwrap.py", "shlex.py", "fnmatch.py"],
    ["heapq.py", "glob.py", "bisect.py", "colorsys.py"],
]


def engines(redis: str, db: int, chroma: str | None = None, **extra: str) -> dict[str, str]:
    env = {"INDEXQ_QUEUE_URL": f"{redis}/{db}", "INDEXQ_SECRET": SECRET, **extra}
    if chroma:
        env["INDEXQ_CHROMA_URL"] = chroma
    return env


def server_dump(url: str, collection: str) -> dict[str, dict[str, Any]]:
    from pipeline.store import Store

    store = Store(url=url)
    try:
        return store.dump(collection)
    finally:
        store.close()


def assert_server_equals_ledger(url: str, home: Path, collection: str) -> int:
    """The promise: the collection on the server is the ledger's committed set, field by field."""
    rows = ledger_query(
        home, "SELECT id, text, metadata, embedding FROM chunks WHERE collection=? AND state='committed'", collection
    )
    records = server_dump(url, collection)
    assert sorted(records) == sorted(r[0] for r in rows)
    for id_, text, metadata, embedding in rows:
        assert records[id_]["document"] == text
        assert records[id_]["metadata"] == json.loads(metadata)
        np.testing.assert_allclose(records[id_]["embedding"], np.frombuffer(embedding, dtype=np.float32), atol=1e-6)
    return len(rows)


def committed(home: Path, collection: str) -> int:
    if not (home / "ledger.db").exists():
        return 0
    sql = "SELECT count(*) FROM chunks WHERE collection=? AND state='committed'"
    return int(ledger_query(home, sql, collection)[0][0])


def test_producers_on_many_machines_writer_killed_server_equals_ledger(
    tmp_path: Path,
    procs: list[Proc],
    redis_url: str,  # noqa: F811
    chroma_url: str,  # noqa: F811
) -> None:
    collection = "scaleout"
    extra = engines(redis_url, 1, chroma_url, INDEXQ_MICRO_BATCH="16")
    writer_home = tmp_path / "writer"
    writer = start_worker(procs, writer_home, **extra)
    writer.wait_started()

    # Three producers at once, each with its own data home, as on three machines.
    producers = []
    for n, files in enumerate(CORPORA):
        corpus = copy_corpus(tmp_path / f"corpus-{n}", files)
        home = tmp_path / f"producer-{n}"
        producers.append((home, subprocess.Popen(
            [str(BIN / "indexq"), "index", str(corpus), "--collection", collection, "--json"],
            env=env_for(home, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )))  # fmt: skip
    acknowledged = {}
    for home, popen in producers:
        out, err = popen.communicate(timeout=300)
        assert popen.returncode == 0, err
        sub = json.loads(out)
        assert sub["remote"] is True
        fields("index", sub)  # as docs/json.md says
        acknowledged[sub["job"]] = sub["chunks"]
        # A remote producer never opens a ledger: the writer's is the only one.
        assert not (home / "ledger.db").exists()
    total = sum(acknowledged.values())
    assert total > 200

    # kill -9 the writer twice while it works, restart it each time.
    kills = 0
    for threshold in (30, 120):
        wait_for(lambda t=threshold: committed(writer_home, collection) >= t, 300, f"{threshold} commits")
        assert committed(writer_home, collection) < total, "the job finished before the kill"
        writer.kill9()
        kills += 1
        writer = start_worker(procs, writer_home, **extra)
        writer.wait_started()

    wait_for(lambda: all(job_state(writer_home, job) == "done" for job in acknowledged), 600, "every job done")
    shown = {j["id"]: j["state"] for j in json.loads(run_cli(writer_home, "status", "--json", **extra).stdout)["jobs"]}
    assert all(shown.get(job) == "done" for job in acknowledged), shown
    # Every acknowledged chunk once: the ledger's jobs hold exactly what producers sent,
    # and the collection on the server equals the ledger's committed set.
    rows = ledger_query(writer_home, "SELECT job, count(*) FROM job_chunks GROUP BY job")
    assert dict(rows) == acknowledged
    assert assert_server_equals_ledger(chroma_url, writer_home, collection) == total
    (wasted,) = ledger_query(writer_home, "SELECT count(*) FROM chunks WHERE embeds > 1")[0]
    assert wasted <= kills * 16

    status = json.loads(run_cli(writer_home, "status", "--json", **extra).stdout)
    assert status["engines"]["queue"] == "redis"
    assert status["engines"]["chroma"] == "server"
    assert status["engines"]["chroma_at"] == chroma_url
    assert status["intake_parts"] == 0
    # On a producer's machine: only the queue and what the writer publishes there (docs/json.md).
    shown = json.loads(run_cli(producers[0][0], "status", "--json", **extra).stdout)
    assert shown["producer_only"] is True
    assert "producer_only" in fields("status", shown)
    text = run_cli(writer_home, "status", **extra).stdout
    assert f"chroma:      server {chroma_url}" in text
    # On a producer's machine, status shows the shared queue and creates no ledger.
    producer_home = producers[0][0]
    shown = run_cli(producer_home, "status", **extra)
    assert shown.returncode == 0, shown.stderr
    assert f"queue:       redis {redis_url}/1: 0 tasks, 0 intake parts waiting" in shown.stdout
    assert "the ledger and jobs are on the writer's machine" in shown.stdout
    # ... and the writer serving it, with the settings it published beside its lease.
    assert f"writer:      running (pid {writer.popen.pid} on " in shown.stdout
    assert "settings:    model " in shown.stdout and "guard:       " in shown.stdout
    assert not (producer_home / "ledger.db").exists()
    assert writer.terminate() == 0


class _Payload:
    """What an attacker who can write to Redis would push: a pickle that runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_forged_payloads_are_refused_and_logged_not_executed(
    tmp_path: Path,
    procs: list[Proc],
    redis_url: str,  # noqa: F811
) -> None:
    import redis

    extra = engines(redis_url, 2, INDEXQ_MODEL="hash:384")
    writer_home = tmp_path / "writer"
    writer = start_worker(procs, writer_home, **extra)
    writer.wait_started()
    conn = redis.Redis.from_url(f"{redis_url}/2")
    marker = tmp_path / "owned"
    queue_key = "huey.redis.indexqwriter"
    # 1. A pickle, as Huey's default serializer would have run it.
    conn.lpush(queue_key, pickle.dumps(_Payload(marker)))
    # 2. Our own format, a well-formed task message, signed with the wrong key.
    from huey.registry import Message

    from pipeline.serializer import JsonSerializer

    forged = JsonSerializer("not-the-key", salt="indexq-writer").serialize(
        Message("f1", "tasks.indexing.index_chunks", None, 0, 0, None, ("scaleout", ["x"]), {}, None, None, None)
    )
    conn.lpush(queue_key, forged)
    # 3. An intake part written straight into Redis, unsigned; `resume` enqueues its ingest.
    conn.hset("huey.results.indexqwriter", "indexq.intake.20990101-000000-bad.000000", b'{"job": "bad"}')
    assert run_cli(writer_home, "resume", **extra).returncode == 0
    # 4. Junk where Huey would look for revocations: must not stall indexing.
    conn.hset("huey.results.indexqwriter", "rt:tasks.indexing.index_chunks", b"junk")
    conn.hset("huey.results.indexqwriter", "rt:tasks.indexing.ingest", b"junk")

    def log() -> str:
        return writer.output()

    wait_for(lambda: log().count("refused a queue payload") >= 2 and "refused intake part" in log(), 60, "refusals")
    assert not marker.exists()
    assert ledger_query(writer_home, "SELECT count(*) FROM chunks")[0][0] == 0
    alerts = (writer_home / "logs" / "alerts.log").read_text()
    assert "refused intake part indexq.intake.20990101-000000-bad.000000" in alerts
    # Kept aside for an operator, not silently deleted.
    assert conn.hget("huey.results.indexqwriter", "indexq.rejected.indexq.intake.20990101-000000-bad.000000")

    # The writer goes on working: a real submission from a producer completes, and the
    # producer on its "machine" follows it with --wait through what the writer publishes.
    corpus = copy_corpus(tmp_path / "corpus", CORPORA[1])
    argv = ["index", str(corpus), "--collection", "after-forgery", "--wait"]
    # A producer chunking for another model than the writer's is stopped before it sends anything.
    other_model = run_cli(tmp_path / "producer-0", *argv, **{**extra, "INDEXQ_MODEL": "all-MiniLM-L6-v2"})
    assert other_model.returncode == 2
    assert "embeds with 'hash:384', this producer would chunk for 'all-MiniLM-L6-v2'" in other_model.stderr
    assert "Hint: set INDEXQ_MODEL=hash:384" in other_model.stderr
    result = run_cli(tmp_path / "producer", *argv, **extra)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    (chunks,) = ledger_query(writer_home, "SELECT count(*) FROM job_chunks WHERE job=?", job)[0]
    assert chunks > 10
    assert f"job {job} done: {chunks} committed, 0 failed" in result.stderr
    assert committed(writer_home, "after-forgery") == chunks
    # The same corpus again from another machine, its model spelled another way: compared in
    # the writer, nothing embedded.
    embedded = ledger_query(writer_home, "SELECT value FROM meta WHERE key='embeddings'")[0][0]
    again = run_cli(tmp_path / "producer-2", *argv, **{**extra, "INDEXQ_MODEL": "hash:0384"})
    assert again.returncode == 0, again.stderr
    assert f"done: {chunks} committed, 0 failed" in again.stderr
    assert ledger_query(writer_home, "SELECT value FROM meta WHERE key='embeddings'")[0][0] == embedded
    (unchanged,) = ledger_query(writer_home, "SELECT unchanged FROM jobs WHERE id=?", again.stdout.strip())[0]
    assert unchanged == chunks
    assert not marker.exists()
    assert writer.terminate() == 0


def test_a_second_writer_on_the_same_queue_is_refused_whatever_its_data_home(
    tmp_path: Path,
    procs: list[Proc],
    redis_url: str,  # noqa: F811
) -> None:
    extra = engines(redis_url, 4, INDEXQ_MODEL="hash:384")
    first = start_worker(procs, tmp_path / "machine-a", **extra)
    first.wait_started()
    # Another machine's writer (another data home, so the home's flock cannot see it).
    second = start_worker(procs, tmp_path / "machine-b", **extra)
    assert second.popen.wait(timeout=120) == 3
    assert "Error: another writer serves this queue: pid" in second.output()
    assert f"(data home {tmp_path / 'machine-a'})" in second.output()
    # The same data home after a kill -9 takes its own lease over at once.
    first.kill9()
    again = start_worker(procs, tmp_path / "machine-a", **extra)
    again.wait_started()
    assert again.terminate() == 0
    # A clean stop releases the lease: the other machine may now serve the queue.
    other = start_worker(procs, tmp_path / "machine-b", **extra)
    other.wait_started()
    assert other.terminate() == 0
    # Under Huey's own consumer too (it never calls our stop): the lease goes with it.
    consumer = start_worker(
        procs, tmp_path / "machine-c", str(BIN / "huey_consumer"), "workers.writer.huey", "-w", "1", "-k", "thread",
        **extra,
    )  # fmt: skip
    consumer.wait_started()
    assert consumer.terminate() == 0
    last = start_worker(procs, tmp_path / "machine-a", **extra)
    last.wait_started()
    assert last.terminate() == 0


def test_a_second_writer_on_a_sqlite_queue_is_refused_whatever_its_data_home(tmp_path: Path, procs: list[Proc]) -> None:
    """A data home's queue.db named by another home's writer (INDEXQ_QUEUE_URL), and a queue
    file of its own elsewhere: one writer drains it, the second exits 3 naming the first."""
    hash_model = {"INDEXQ_MODEL": "hash:384"}
    first = start_worker(procs, tmp_path / "a", **hash_model)
    first.wait_started()
    second = start_worker(
        procs, tmp_path / "b", INDEXQ_QUEUE_URL=f"sqlite:///{tmp_path / 'a' / 'queue.db'}", **hash_model
    )  # fmt: skip
    assert second.popen.wait(timeout=120) == 3
    assert f"Error: another writer holds {tmp_path / 'a' / 'writer.lock'}: pid {first.popen.pid}" in second.output()
    assert first.terminate() == 0
    shared = {"INDEXQ_QUEUE_URL": f"sqlite:///{tmp_path / 'queues' / 'q.db'}", **hash_model}
    (tmp_path / "queues").mkdir()
    owner = start_worker(procs, tmp_path / "c", **shared)
    owner.wait_started()
    other = start_worker(procs, tmp_path / "d", **shared)
    assert other.popen.wait(timeout=120) == 3
    assert f"another writer holds {tmp_path / 'queues' / 'q.db.writer.lock'}" in other.output()
    # The same queue through a symlink: the same lock.
    (tmp_path / "alias.db").symlink_to(tmp_path / "queues" / "q.db")
    aliased = start_worker(procs, tmp_path / "e", INDEXQ_QUEUE_URL=f"sqlite:///{tmp_path / 'alias.db'}", **hash_model)
    assert aliased.popen.wait(timeout=120) == 3
    assert f"another writer holds {tmp_path / 'queues' / 'q.db.writer.lock'}" in aliased.output()
    assert owner.terminate() == 0
    # A writer whose URL names its own queue through a link starts (one lock, not two).
    (tmp_path / "f").mkdir()
    (tmp_path / "own.db").symlink_to(tmp_path / "f" / "queue.db")
    own = start_worker(procs, tmp_path / "f", INDEXQ_QUEUE_URL=f"sqlite:///{tmp_path / 'own.db'}", **hash_model)
    own.wait_started()
    assert own.terminate() == 0
    # Once the first has stopped, the other home's writer may drain that queue.
    again = start_worker(procs, tmp_path / "d", **shared)
    again.wait_started()
    assert again.terminate() == 0


def test_shared_queue_without_a_shared_key_is_refused(tmp_path: Path, redis_url: str) -> None:  # noqa: F811
    result = run_cli(tmp_path / "p", "index", str(tmp_path), "--collection", "abc", INDEXQ_QUEUE_URL=f"{redis_url}/3")
    assert result.returncode == 2
    assert result.stderr.startswith("Error: a shared queue (redis://127.0.0.1:")
    assert "INDEXQ_SECRET is not set" in result.stderr


def test_unreachable_servers_exit_5_and_change_nothing(tmp_path: Path) -> None:
    from tests.servers import free_port

    closed = free_port()
    corpus = copy_corpus(tmp_path / "corpus", CORPORA[1])
    result = run_cli(
        tmp_path / "p", "index", str(corpus), "--collection", "abc",
        **engines(f"redis://127.0.0.1:{closed}", 0),
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert result.stderr.startswith(f"Error: cannot reach the queue at redis://127.0.0.1:{closed}/0")
    assert not (tmp_path / "p" / "ledger.db").exists()
    missing = run_cli(tmp_path / "p", "check")
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[0] == f"Error: no indexq data home at {tmp_path / 'p'}"
    assert run_cli(tmp_path / "w", "resume").returncode == 0  # a data home with its ledger
    result = run_cli(tmp_path / "w", "check", INDEXQ_CHROMA_URL=f"http://127.0.0.1:{closed}")
    assert result.returncode == 5
    assert f"Error: cannot reach the Chroma server at http://127.0.0.1:{closed}" in result.stderr
    assert "Hint: the check was not made" in result.stderr


def test_logical_backup_check_and_rebuild_on_a_chroma_server(
    tmp_path: Path,
    procs: list[Proc],
    chroma_url: str,  # noqa: F811
) -> None:
    import chromadb

    collection = "server-recovery"
    extra = {"INDEXQ_CHROMA_URL": chroma_url, "INDEXQ_MODEL": "hash:384"}
    home = tmp_path / "writer"
    writer = start_worker(procs, home, **extra)
    writer.wait_started()
    corpus = copy_corpus(tmp_path / "corpus", CORPORA[0] + CORPORA[1])
    result = run_cli(home, "index", str(corpus), "--collection", collection, "--wait", **extra)
    assert result.returncode == 0, result.stderr
    total = assert_server_equals_ledger(chroma_url, home, collection)

    backup = run_cli(home, "backup", "--json", **extra)
    assert backup.returncode == 0, backup.stderr
    info = json.loads(backup.stdout)
    assert (info["kind"], info["verified"], info["collections"]) == ("logical", True, {collection: total})
    assert sorted(p.name for p in Path(info["path"]).iterdir()) == ["ledger.db", "manifest.json", "verification.json"]

    # Damage on the server: records gone, one vector altered, one record nobody wrote.
    host, port = chroma_url.rsplit(":", 1)
    client = chromadb.HttpClient(host=host.split("//")[1], port=int(port))
    col = client.get_collection(collection)
    ids = sorted(col.get(include=[])["ids"])
    col.delete(ids=ids[:3])
    col.upsert(ids=[ids[3]], embeddings=[np.ones(384).tolist()], documents=["altered"])
    col.upsert(ids=["intruder"], embeddings=[np.ones(384).tolist()], documents=["not ours"])

    found = run_cli(home, "check", "--deep", **extra)
    assert found.returncode == 1
    assert "3 committed chunks missing" in found.stdout
    assert "1 chunks the ledger does not know" in found.stdout
    assert "1 chunks differ from the ledger" in found.stdout

    # The writer keeps running: recovery pauses it through the commit lock.
    fixed = run_cli(home, "recover", "--json", **extra)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["action"] == "rebuild"
    assert "dropped" in fields("recover", json.loads(fixed.stdout))  # as docs/json.md says
    assert assert_server_equals_ledger(chroma_url, home, collection) == total
    assert run_cli(home, "check", "--deep", **extra).returncode == 0

    # A restore from the logical backup: the backup's ledger, then what was committed since.
    more = copy_corpus(tmp_path / "more", CORPORA[2])
    assert run_cli(home, "index", str(more), "--collection", collection, "--wait", **extra).returncode == 0
    client.delete_collection(collection)
    restored = run_cli(home, "recover", "--from", info["name"], "--json", **extra)
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["action"] == "restore"
    assert assert_server_equals_ledger(chroma_url, home, collection) > total
    assert writer.terminate() == 0


def test_redis_killed_mid_job_loses_nothing_acknowledged(tmp_path: Path, procs: list[Proc]) -> None:
    from tests.servers import free_port, start_redis

    port = free_port()
    work = tmp_path / "redis"
    work.mkdir()
    redis_server = start_redis(work, port)
    try:
        collection = "redis-crash"
        # Redis's crash is the model's business no more than the ledger's: hash:384, and
        # commits slowed to 0.2 s each so that the kill lands in the middle of the job.
        extra = engines(
            f"redis://127.0.0.1:{port}", 0, INDEXQ_MICRO_BATCH="16", INDEXQ_MODEL="hash:384",
            INDEXQ_FAULT_PAUSE="writer-commit:0.2",
        )  # fmt: skip
        writer_home = tmp_path / "writer"
        writer = start_worker(procs, writer_home, **extra)
        writer.wait_started()
        corpus = tmp_path / "corpus"
        for files in CORPORA:
            copy_corpus(corpus, files)
        result = run_cli(tmp_path / "producer", "index", str(corpus), "--collection", collection, "--json", **extra)
        assert result.returncode == 0, result.stderr
        acknowledged = json.loads(result.stdout)["chunks"]
        wait_for(lambda: committed(writer_home, collection) >= 30, 300, "the first commits")
        assert committed(writer_home, collection) < acknowledged, "the job finished before the kill"
        # kill -9 Redis itself mid-job; it comes back from its append-only file.
        redis_server.kill9()
        # Long enough that the writer's consumer reads the queue while Redis is away: its
        # scheduler every second, its workers for their next task (within the lease's 30 s).
        time.sleep(8)
        redis_server = start_redis(work, port)
        wait_for(lambda: committed(writer_home, collection) == acknowledged, 600, "every acknowledged chunk")
        assert writer.popen.poll() is None, "the writer must ride out the outage"
        rows = ledger_query(writer_home, "SELECT count(*) FROM job_chunks")[0][0]
        assert rows == acknowledged
        # Chroma (the writer's directory) equals the ledger's committed set.
        from tests.conftest import dump_collection

        assert writer.terminate() == 0
        records = dump_collection(writer_home / "chroma", collection)
        expected = ledger_query(
            writer_home, "SELECT id, embedding FROM chunks WHERE collection=? AND state='committed'", collection
        )
        assert sorted(records) == sorted(r[0] for r in expected)
        for id_, blob in expected:
            np.testing.assert_allclose(records[id_]["embedding"], np.frombuffer(blob, dtype=np.float32), atol=1e-6)
        # The outage was seen (and ridden out), not missed: a task holds up to 1,024 chunks
        # now, so the job may be one task and the scheduler the one that meets the outage.
        output = writer.output()
        assert "Error reading from queue" in output or "Error reading schedule" in output
    finally:
        redis_server.stop()


def test_a_remote_producers_documents_land_as_a_local_producers_do(
    tmp_path: Path,
    procs: list[Proc],
    redis_url: str,  # noqa: F811
) -> None:
    """PDF, DOCX, HTML and Markdown (and the files that must be skipped), a collection made
    with the full-text index off: through the intake of a shared queue, the same records,
    metadata (LlamaIndex's node, document ids, pages and headings), skips and settings
    as from a producer on the writer's machine."""
    from pipeline.store import Store
    from tests.test_formats import CHUNKING, build_corpus

    corpus = build_corpus(tmp_path / "corpus")
    argv = ("index", str(corpus), "-c", "docs", "--no-full-text", *CHUNKING, "--json")
    submitted, homes = [], []
    for name, extra in (
        ("local", {"INDEXQ_MODEL": "hash:384"}),
        ("remote", engines(redis_url, 3, INDEXQ_MODEL="hash:384")),
    ):
        home = tmp_path / f"{name}-writer"
        start_worker(procs, home, **extra).wait_started()
        producer = home if name == "local" else tmp_path / "producer"  # a remote producer: its own empty home
        result = run_cli(producer, *argv, **extra)
        assert result.returncode == 0, result.stderr
        submitted.append(json.loads(result.stdout))
        homes.append((home, extra))
    local, remote = submitted
    assert (local["remote"], remote["remote"]) == (False, True)
    # The writer counts new, changed... for a remote job (docs/json.md): the rest is the same.
    counted = ("job", "remote", "new", "changed", "unchanged", "metadata_updated", "stale", "pruned")
    assert {k: v for k, v in local.items() if k not in counted} == {k: v for k, v in remote.items() if k not in counted}
    assert remote["new"] == 0 and local["new"] == local["chunks"]
    assert local["chunks"] > 0 and len(local["skipped"]) == 4  # locked, broken, scanned and fake
    for (home, extra), sub in zip(homes, submitted, strict=True):
        wait_for(lambda h=home, e=extra, j=sub["job"]: json_status(h, e, j) == "done", 120, f"job {sub['job']}")
        assert ledger_query(home, "SELECT collection, full_text FROM collection_settings") == [("docs", 0)]
    for proc in procs:
        proc.stop()
    here, there = (dump_collection(home / "chroma", "docs") for home, _ in homes)
    assert len(here) == local["chunks"] and sorted(here) == sorted(there)
    for id_, record in here.items():
        assert (record["document"], record["metadata"]) == (there[id_]["document"], there[id_]["metadata"])
        np.testing.assert_array_equal(record["embedding"], there[id_]["embedding"])
        assert record["metadata"]["_node_type"] == "TextNode" and record["metadata"]["document_id"]
    assert {r["metadata"].get("page") for r in here.values()} >= {1, 2, 3}
    assert any(r["metadata"].get("heading") for r in here.values())
    for home, _ in homes:
        assert Store(home / "chroma").full_text("docs") is False


def json_status(home: Path, extra: dict[str, str], job: str) -> str:
    result = run_cli(home, "status", "--json", **extra)
    return str({j["id"]: j["state"] for j in json.loads(result.stdout)["jobs"]}.get(job))
