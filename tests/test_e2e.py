"""End to end: real `indexq worker` / `huey_consumer` subprocesses, real Chroma, the real model."""

from __future__ import annotations

import random
import re
import signal
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
    job_state,
    ledger_query,
    run_cli,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.e2e

COLLECTION = "stdlib-sample"
MICRO_BATCH = "16"
HASH = {"INDEXQ_MODEL": "hash:384"}


def submit(home: Path, corpus: Path, collection: str = COLLECTION, **env: str) -> str:
    result = run_cli(home, "index", str(corpus), "--collection", collection, "--include", "*.py", **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_job(home: Path, job: str, timeout: float = 300) -> None:
    wait_for(lambda: job_state(home, job) in ("done", "failed"), timeout, f"job {job}")


def committed_ids(home: Path, collection: str = COLLECTION) -> set[str]:
    rows = ledger_query(home, "SELECT id FROM chunks WHERE collection=? AND state='committed'", collection)
    return {r[0] for r in rows}


def assert_same_collection(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert sorted(a) == sorted(b)
    for id_ in a:
        assert a[id_]["document"] == b[id_]["document"], id_
        assert a[id_]["metadata"] == b[id_]["metadata"], id_
        np.testing.assert_allclose(a[id_]["embedding"], b[id_]["embedding"], atol=1e-4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, dict[str, Any]]:
    """An uninterrupted run of the job: what every interrupted run must equal."""
    home = tmp_path_factory.mktemp("baseline") / "home"
    started: list[Proc] = []
    try:
        writer = start_worker(started, home, INDEXQ_MICRO_BATCH=MICRO_BATCH)
        job = submit(home, corpus)
        wait_job(home, job)
        assert writer.terminate() == 0
    finally:
        for proc in started:
            proc.cleanup()
    records = dump_collection(home / "chroma", COLLECTION)
    assert len(records) > 100, "the sample corpus should give well over 100 chunks"
    assert committed_ids(home) == set(records)
    return records


def test_kill9_writer_repeatedly_then_resume_equals_uninterrupted_run(
    tmp_path: Path, corpus: Path, baseline: dict[str, dict[str, Any]], procs: list[Proc]
) -> None:
    home = tmp_path / "home"
    rng = random.Random(7)
    job = None
    kills = 0
    for _ in range(3):
        writer = start_worker(procs, home, INDEXQ_MICRO_BATCH=MICRO_BATCH)
        if job is None:
            job = submit(home, corpus)
        writer.wait_started()
        before = len(committed_ids(home))
        # Kill while it is working: after at least one more commit, at a random instant.
        wait_for(lambda b=before: len(committed_ids(home)) > b, 120, "a commit")
        time.sleep(rng.uniform(0.0, 1.5))
        writer.kill9()
        kills += 1
    assert len(committed_ids(home)) < len(baseline), "the kills should land before the job is done"
    writer = start_worker(procs, home, INDEXQ_MICRO_BATCH=MICRO_BATCH)
    assert job is not None
    wait_job(home, job)
    assert writer.terminate() == 0

    records = dump_collection(home / "chroma", COLLECTION)
    assert_same_collection(records, baseline)
    assert committed_ids(home) == set(baseline)
    # The ledger counts every embedding attempt: a kill wastes at most the micro-batch in flight.
    twice = ledger_query(home, "SELECT count(*) FROM chunks WHERE embeds > 1")[0][0]
    assert twice <= kills * int(MICRO_BATCH)
    status = run_cli(home, "status", "--json")
    assert f'"embedded_more_than_once": {twice}' in status.stdout


def test_second_writer_is_refused_while_first_works(
    tmp_path: Path, corpus: Path, baseline: dict[str, dict[str, Any]], procs: list[Proc]
) -> None:
    home = tmp_path / "home"
    first = start_worker(
        procs, home, str(BIN / "huey_consumer"), "workers.writer.huey", "-w", "1", "-k", "thread",
        INDEXQ_MICRO_BATCH=MICRO_BATCH,
    )  # fmt: skip
    first.wait_started()
    job = submit(home, corpus)
    wait_for(lambda: len(committed_ids(home)) > 0, 120, "the first writer to commit")

    second = run_cli(home, "worker", timeout=60)
    assert second.returncode == 3
    holder = f"pid {first.popen.pid} on "
    assert re.search(rf"^Error: another writer holds .*writer\.lock: {holder}", second.stderr, re.M), second.stderr

    third = start_worker(procs, home, str(BIN / "huey_consumer"), "workers.writer.huey", "-w", "1", "-k", "thread")
    assert third.popen.wait(timeout=60) == 3
    assert f"another writer holds {home / 'writer.lock'}: {holder}" in third.output()

    wait_job(home, job)
    assert first.terminate() == 0
    assert_same_collection(dump_collection(home / "chroma", COLLECTION), baseline)


def test_writer_refuses_more_than_one_thread_worker(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    proc = start_worker(procs, home, str(BIN / "huey_consumer"), "workers.writer.huey", "-w", "2", "-k", "thread")
    assert proc.popen.wait(timeout=60) == 2
    assert "the writer runs exactly one thread worker, got workers=2" in proc.output()
    assert not (home / "chroma" / "chroma.sqlite3").exists()


def test_writer_refuses_to_recycle_its_worker(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    argv = [str(BIN / "huey_consumer"), "workers.writer.huey", "-w", "1", "-k", "thread", "--max-tasks", "100"]
    proc = start_worker(procs, home, *argv)
    assert proc.popen.wait(timeout=60) == 2
    assert "Error: the writer does not recycle its worker: drop --max-tasks" in proc.output()


ONE_THREAD = "the maintenance consumer runs exactly one thread worker"


@pytest.mark.parametrize(
    ("module", "flags", "message"),
    [
        ("workers.writer.huey", ["-n"], "the writer needs Huey's scheduler for its requeue of what the ledger owes"),
        ("workers.maintenance.huey", ["-w", "2"], f"{ONE_THREAD}, got workers=2 worker_type='thread'"),
        ("workers.maintenance.huey", ["-w", "0"], f"{ONE_THREAD}, got workers=0 worker_type='thread'"),
        ("workers.maintenance.huey", ["-k", "greenlet"], f"{ONE_THREAD}, got workers=1 worker_type='greenlet'"),
        ("workers.maintenance.huey", ["-n"], "the maintenance consumer needs Huey's scheduler for its backups"),
    ],
)
def test_consumers_refuse_options_they_cannot_run_with(
    tmp_path: Path, procs: list[Proc], module: str, flags: list[str], message: str
) -> None:
    """Two maintenance threads took two backups of one watermark; -w 0 or -n ran nothing
    while the consumer held its lock and looked healthy; -k greenlet was a traceback."""
    home = tmp_path / "home"
    proc = start_worker(procs, home, str(BIN / "huey_consumer"), module, *flags)
    assert proc.popen.wait(timeout=60) == 2
    output = proc.output()
    assert f"Error: {message}" in output and "Traceback" not in output, output
    assert not (home / "backups").exists() or not any((home / "backups").iterdir())


def _embeddings_total(home: Path) -> int:
    return int(ledger_query(home, "SELECT value FROM meta WHERE key='embeddings'")[0][0])


def _chunks(home: Path) -> dict[str, tuple[str, str]]:
    rows = ledger_query(home, "SELECT id, hash, source FROM chunks WHERE collection=?", COLLECTION)
    return {id_: (hash_, source) for id_, hash_, source in rows}


def test_resubmission_embeds_nothing_and_changed_file_only_its_changed_chunks(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """What is embedded again is the ledger's decision, whatever the model: the deterministic
    hash:384 embedder counts the same as the real one, in a fraction of the CPU."""
    corpus = copy_corpus(tmp_path / "corpus", ["json/decoder.py", "json/encoder.py", "textwrap.py"])
    home = tmp_path / "home"
    writer = start_worker(procs, home, **HASH)
    wait_job(home, submit(home, corpus, **HASH))
    first = _chunks(home)
    embedded = _embeddings_total(home)
    assert embedded == len(first)

    # Unchanged corpus: nothing embedded again.
    wait_job(home, submit(home, corpus, **HASH), timeout=60)
    assert _embeddings_total(home) == embedded
    assert _chunks(home) == first

    # Edit one line in the middle of one file and cut the end off another.
    decoder = corpus / "json/decoder.py"
    lines = decoder.read_text().splitlines(keepends=True)
    lines[120] = "# an edited line that changes this chunk\n"
    decoder.write_text("".join(lines))
    textwrap_py = corpus / "textwrap.py"
    text = textwrap_py.read_text()
    textwrap_py.write_text(text[: len(text) // 3])
    wait_job(home, submit(home, corpus, **HASH))
    after = _chunks(home)
    assert writer.terminate() == 0

    changed = {i for i, (h, _) in after.items() if first.get(i, ("",))[0] != h}
    stale = set(first) - set(after)
    # Only the edited region of decoder.py and the new last chunk of textwrap.py change;
    # encoder.py is untouched, and what textwrap.py lost is removed.
    names = {Path(after[i][1]).name for i in changed}
    assert "decoder.py" in names and names <= {"decoder.py", "textwrap.py"}
    assert 1 <= len([i for i in changed if after[i][1].endswith("decoder.py")]) <= 3
    assert stale and all(first[i][1].endswith("textwrap.py") for i in stale)
    assert _embeddings_total(home) == embedded + len(changed)

    records = dump_collection(home / "chroma", COLLECTION)
    assert set(records) == set(after) == committed_ids(home)
    assert "an edited line that changes this chunk" in "".join(r["document"] for r in records.values())


def test_sigterm_finishes_the_commit_in_hand_then_stops(tmp_path: Path, corpus: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    writer = start_worker(procs, home, INDEXQ_MICRO_BATCH=MICRO_BATCH)
    job = submit(home, corpus)
    writer.wait_started()
    wait_for(lambda: len(committed_ids(home)) > 0, 120, "a commit")
    writer.popen.send_signal(signal.SIGTERM)
    assert writer.popen.wait(timeout=60) == 0
    assert "Shutting down gracefully" in writer.output()
    # What the ledger calls committed is exactly what Chroma holds: no commit was cut.
    ids = committed_ids(home)
    assert set(dump_collection(home / "chroma", COLLECTION)) == ids
    total = ledger_query(home, "SELECT count(*) FROM chunks")[0][0]
    assert 0 < len(ids) < total, "the stop should land in the middle of the job"

    writer = start_worker(procs, home, INDEXQ_MICRO_BATCH=MICRO_BATCH)
    wait_job(home, job)
    assert writer.terminate() == 0
    assert len(committed_ids(home)) > len(ids)
