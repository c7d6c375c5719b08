"""`indexq status` tells the truth: the writer's own settings and guards, masked URLs,
refused payloads as alerts, a private data home, and settings that are refused, not clamped.

Real CLI subprocesses and a real writer (``hash:384`` embedder) on real SQLite and
Chroma in tmp_path; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from pipeline.config import Config
from tests.conftest import BIN, Proc, copy_corpus, env_for, ledger_query, run_cli, start_worker, wait_for

MODEL = {"INDEXQ_MODEL": "hash:384"}
SECRET_URL = "http://u:pw123@127.0.0.1:1"
MASKED_URL = "http://u:***@127.0.0.1:1"
CLOCK = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def write_records(path: Path, n: int) -> Path:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": f"r{i}", "text": f"record {i} about topic {i % 17}"}) + "\n")
    return path


def outstanding(home: Path) -> int:
    (n,) = ledger_query(home, "SELECT count(*) FROM chunks WHERE state IN ('pending', 'embedded', 'deleting')")[0]
    return int(n)


def status(home: Path) -> str:
    result = run_cli(home, "status", **MODEL)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status_json(home: Path) -> dict:
    result = run_cli(home, "status", "--json", **MODEL)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---- 11: credentials in a Chroma URL are never shown ---------------------------------


def test_a_chroma_url_password_is_masked_in_status_check_and_search(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**MODEL, "INDEXQ_CHROMA_URL": SECRET_URL}
    assert run_cli(home, "resume", **env).returncode == 0  # a data home
    shown = run_cli(home, "status", **env)
    assert shown.returncode == 0, shown.stderr
    assert f"chroma:      server {MASKED_URL}\n" in shown.stdout
    as_json = run_cli(home, "status", "--json", **env)
    assert json.loads(as_json.stdout)["engines"]["chroma_at"] == MASKED_URL
    assert json.loads(as_json.stdout)["chroma"] == MASKED_URL
    for argv in (["check"], ["check", "--deep"], ["search", "anything", "-c", "docs"]):
        result = run_cli(home, *argv, **env)
        assert result.returncode == 5, result.stderr
        assert result.stderr.startswith(f"Error: cannot reach the Chroma server at {MASKED_URL}: "), result.stderr
    # The flag is masked as well as the variable.
    flagged = run_cli(home, "check", "--chroma-url", SECRET_URL, **MODEL)
    assert flagged.returncode == 5
    assert MASKED_URL in flagged.stderr
    for result in (shown, as_json, flagged):
        assert "pw123" not in result.stdout + result.stderr


# ---- 12: the writer's effective settings and guard state -----------------------------


@pytest.mark.e2e
def test_status_shows_the_running_writers_settings_and_the_guard_holding_commits_back(
    tmp_path: Path, procs: list[Proc]
) -> None:
    home = tmp_path / "home"
    records = write_records(tmp_path / "records.jsonl", 30)
    # 1.01 %: below what any machine that runs this test has in use, so every commit is held back.
    argv = [str(BIN / "indexq"), "worker", "--memory-threshold", "1.01", "--micro-batch", "8", "--commit-batch", "5"]
    writer = start_worker(procs, home, *argv, **MODEL)
    writer.wait_started()
    submitted = run_cli(home, "index", "--jsonl", str(records), "-c", "held-docs", **MODEL)
    assert submitted.returncode == 0, submitted.stderr
    wait_for(lambda: "guard:       commits held back" in status(home), 60, "the guard in status")
    text = status(home)
    assert f"writer:      running (pid {writer.popen.pid} on " in text
    # The writer's settings, not the defaults of the process that runs `indexq status`.
    assert (
        "settings:    model hash:384 on cpu, memory threshold 1.01 %, min free disk 256 MB, micro-batch 8,"
        " commit batch 5\n" in text
    )
    match = re.search(rf"^guard:       commits held back since ({CLOCK}): memory (\d+) % >= 1\.01 %$", text, re.M)
    assert match, text
    assert abs(int(match.group(2)) - psutil.virtual_memory().percent) < 10
    assert re.search(r"^memory:      \d+% used \(threshold 1\.01%\)$", text, re.M), text
    info = status_json(home)
    guard = info["writer"]["guard"]
    assert (guard["guard"], guard["limit"]) == ("memory", 1.01)
    assert guard["value"] > 1.01 and guard["summary"].startswith("memory ")
    assert info["writer"]["settings"]["micro_batch"] == 8
    assert info["memory"]["threshold"] == 1.01
    assert ledger_query(home, "SELECT count(*) FROM chunks WHERE state='committed'")[0][0] == 0
    # One line in the writer's log for the change of state, not one per retry.
    assert writer.output().count("commits held back: memory") == 1

    # Killed: its state file stays behind, and status does not take it for a live writer.
    writer.kill9()
    assert (home / "writer.state").exists()
    stale = status(home)
    assert "writer:      not running\n" in stale
    assert "guard:" not in stale and "settings:" not in stale
    assert "threshold 80%" in stale
    assert status_json(home)["writer"] == {"alive": False}

    # A writer with room to work: the guard is clear, the job completes.
    again = start_worker(procs, home, **MODEL)
    again.wait_started()
    wait_for(lambda: outstanding(home) == 0, 120, "the job")
    text = status(home)
    assert "guard:       clear (commits are not held back)\n" in text
    assert "memory threshold 80 %" in text
    (embedded,) = ledger_query(home, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='embeddings'")[0]
    (twice,) = ledger_query(home, "SELECT count(*) FROM chunks WHERE embeds > 1")[0]
    assert f"embeddings:  {embedded} computed, {twice} chunks embedded more than once\n" in text
    assert int(embedded) >= 30
    assert again.terminate() == 0


def test_a_guard_publishes_when_it_starts_and_stops_holding_commits_back(tmp_path: Path) -> None:
    from pipeline.guards import Hold, ResourceGuard
    from pipeline.state import WriterState, read_state

    config = Config(home=tmp_path / "home", model="hash:32")
    config.ensure_home()
    state = WriterState(config)
    seen: list[Hold | None] = []

    def record(hold: Hold | None) -> None:
        seen.append(hold)
        state.guard_changed(hold)

    guard = ResourceGuard(config.chroma_dir, 0.001, 0, on_change=record)
    stop = threading.Event()
    timer = threading.Timer(1.2, lambda: setattr(guard, "memory_threshold", 100.0))
    timer.start()
    try:
        assert guard.wait_until_clear(stop) is True
    finally:
        timer.cancel()
    assert seen[0] is not None and seen[0].guard == "memory" and seen[0].limit == 0.001
    assert seen[-1] is None
    # Several polls while held, one publication per change (a value that moved a whole unit may add one).
    assert len(seen) <= 3
    holder = {"pid": os.getpid(), "host": state.state["host"]}
    published = read_state(config, holder)
    assert published is not None and published["guard"] is None
    assert published["settings"]["memory_threshold"] == 80.0
    assert stat.S_IMODE(config.writer_state_path.stat().st_mode) == 0o600
    # A state file whose pid does not hold the writer lock is not trusted.
    assert read_state(config, {**holder, "pid": os.getpid() + 1}) is None
    assert read_state(config, None) is None


def test_a_guard_that_trips_on_a_full_disk_still_reaches_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk guard trips when the disk is full, when writer.state cannot be written anew
    (a temporary file, then a rename): it is rewritten in its own blocks, so status does not
    go on saying "clear" while commits are held back."""
    import errno
    import time

    import pipeline.state
    from pipeline.guards import Hold
    from pipeline.state import WriterState, read_state

    config = Config(home=tmp_path / "home", model="hash:32")
    config.ensure_home()
    state = WriterState(config)
    state.publish()
    holder = {"pid": os.getpid(), "host": state.state["host"]}

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.state, "write_json_atomic", full)
    state.guard_changed(Hold("disk", 0.0, 5.0, time.time()))
    published = read_state(config, holder)
    assert published is not None and published["guard"]["guard"] == "disk"
    state.guard_changed(None)
    published = read_state(config, holder)
    assert published is not None and published["guard"] is None


def test_status_text_shows_embeddings_computed_and_embedded_more_than_once(tmp_path: Path) -> None:
    from pipeline.writer import Writer

    home = tmp_path / "home"
    records = write_records(tmp_path / "records.jsonl", 5)
    assert run_cli(home, "index", "--jsonl", str(records), "-c", "counted", **MODEL).returncode == 0
    ids = [i for (i,) in ledger_query(home, "SELECT id FROM chunks ORDER BY id")]
    writer = Writer(Config(home=home, model="hash:384"))
    try:
        # As a writer killed in the middle of a micro-batch leaves it: two attempts counted, none stored.
        writer.ledger.begin_embedding("counted", ids[:2])
        assert writer.index("counted", ids) == 5
    finally:
        writer.close()
    shown = status(home)
    assert "embeddings:  7 computed, 2 chunks embedded more than once\n" in shown
    # The job table's columns line up under their header (job ids are 25 characters).
    header, row = shown.split("\n\n", 1)[1].splitlines()[:2]
    assert [header.index(c) for c in ("collection", "state")] == [row.index("counted"), row.index("done")], shown
    info = status_json(home)
    assert (info["embeddings_total"], info["embedded_more_than_once"]) == (7, 2)


def _forged_payloads() -> list[bytes]:
    from huey.registry import Message

    from pipeline.serializer import JsonSerializer

    message = Message("f1", "tasks.indexing.index_chunks", None, 0, 0, None, ("docs", ["x"]), {}, None, None, None)
    return [
        JsonSerializer("not-the-key", salt="indexq-writer").serialize(message),
        pickle.dumps(("os.system", "touch owned")),
    ]


@pytest.mark.e2e
def test_a_refused_forged_payload_raises_an_alert_in_status(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    writer = start_worker(procs, home, **MODEL)
    writer.wait_started()
    conn = sqlite3.connect(home / "queue.db", timeout=30)
    try:
        with conn:
            for payload in _forged_payloads():
                conn.execute("INSERT INTO task (queue, data, priority) VALUES ('indexq-writer', ?, 0)", (payload,))
    finally:
        conn.close()
    wait_for(lambda: writer.output().count("ERROR pipeline.serializer: refused a queue payload") == 2, 60, "refusals")
    text = status(home)
    alerts = [line for line in text.splitlines() if line.startswith("ALERT")]
    # Two refusals within a minute: one alert (each refusal is in the log).
    assert len(alerts) == 1, text
    refusal = r"refused a queue payload: payload of \d+ bytes has a bad signature \(wrong key or altered\);"
    assert re.fullmatch(rf"ALERT        {CLOCK} {refusal} it was not executed", alerts[0]), alerts
    assert "refused a queue payload" in (home / "logs" / "alerts.log").read_text()
    assert status_json(home)["alerts"][0]["summary"].startswith("refused a queue payload")
    assert writer.popen.poll() is None
    assert writer.terminate() == 0


# ---- 12: files 0600, folders 0700 -----------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    modes = {}
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(folder, name)
            if not path.is_symlink():
                modes[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return modes


def test_a_preexisting_open_home_is_made_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "logs").mkdir(parents=True)
    (home / "logs" / "old.log").write_text("from an older version\n")
    home.chmod(0o755)
    (home / "logs").chmod(0o775)
    (home / "logs" / "old.log").chmod(0o644)
    assert run_cli(home, "resume", **MODEL).returncode == 0
    modes = _modes(home)
    assert modes["."] == 0o700 and modes["logs"] == 0o700
    assert modes["logs/old.log"] == 0o600
    assert {m & 0o077 for m in modes.values()} == {0}


@pytest.mark.e2e
def test_every_file_the_writer_chroma_and_backups_create_is_private(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    writer = start_worker(procs, home, **MODEL)
    writer.wait_started()
    # Past Chroma's first HNSW persist (1,000 records), so that the segment files exist.
    records = write_records(tmp_path / "records.jsonl", 1100)
    assert run_cli(home, "index", "--jsonl", str(records), "-c", "private-docs", **MODEL).returncode == 0
    wait_for(lambda: outstanding(home) == 0, 240, "the job")
    backup = run_cli(home, "backup", "--json", **MODEL)
    assert backup.returncode == 0, backup.stderr
    name = json.loads(backup.stdout)["name"]
    assert writer.terminate() == 0
    modes = _modes(home)
    segment_files = [p for p in modes if p.startswith("chroma/") and p.endswith("data_level0.bin")]
    assert segment_files, sorted(modes)
    for rel in (
        "chroma/chroma.sqlite3", segment_files[0], "ledger.db", "queue.db", "writer.state", "logs/writer.log",
        f"backups/{name}/manifest.json", f"backups/{name}/chroma/chroma.sqlite3", f"backups/{name}/ledger.db",
    ):  # fmt: skip
        assert modes[rel] == 0o600, (rel, oct(modes[rel]))
    for rel in (".", "chroma", "backups", f"backups/{name}", f"backups/{name}/chroma"):
        assert modes[rel] == 0o700, (rel, oct(modes[rel]))
    loose = {rel: oct(mode) for rel, mode in modes.items() if mode & 0o077}
    assert loose == {}


# ---- 12: settings that cannot be honoured are errors, not clamps ---------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--chunk-tokens", "255"],
            "Error: chunk size (--chunk-tokens, INDEXQ_CHUNK_TOKENS) must be at most 254, the limit of model"
            " 'hash:384' (its maximum sequence length less 2 special tokens), got 255\n"
            "Hint: leave it unset to use 254\n",
        ),
        (
            ["--chunk-overlap", "300"],
            "Error: chunk overlap (--chunk-overlap, INDEXQ_CHUNK_OVERLAP) must be >= 0 and under half the chunk"
            " size of 254 tokens, got 300\nHint: use at most 126\n",
        ),
        (
            ["--chunk-tokens", "100", "--chunk-overlap", "50"],
            "Error: chunk overlap must be >= 0 and under half the chunk size, got 50\n",
        ),
    ],
)
def test_chunk_settings_the_model_cannot_take_are_refused_before_anything_is_written(
    tmp_path: Path, option: list[str], message: str
) -> None:
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "corpus", ["textwrap.py"])
    for argv in (["index", str(corpus)], ["index", "--jsonl", str(write_records(tmp_path / "r.jsonl", 3))]):
        result = run_cli(home, *argv, "-c", "clamped", *option, **MODEL)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message)
        if (home / "ledger.db").exists():
            assert ledger_query(home, "SELECT count(*) FROM jobs")[0][0] == 0
            assert ledger_query(home, "SELECT count(*) FROM chunks")[0][0] == 0
        if (home / "queue.db").exists():
            conn = sqlite3.connect(home / "queue.db")
            try:
                assert conn.execute("SELECT count(*) FROM task").fetchone()[0] == 0
            finally:
                conn.close()


def test_recover_from_an_empty_name_is_an_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_cli(home, "resume", **MODEL).returncode == 0  # a data home
    result = run_cli(home, "recover", "--from", "", **MODEL)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "Error: --from must name a backup, got ''\nHint: `indexq backups` lists them\n"


def test_the_writer_runs_on_the_device_picked_and_refuses_one_torch_does_not_see(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """The real model: `auto` picks CUDA, then MPS, then the CPU, and status names it; a
    GPU asked for by name that is not there is exit 2 in one line, never a silent CPU."""
    import torch

    home = tmp_path / "home"
    writer = start_worker(procs, home)
    writer.wait_started()
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert f"embedding model all-MiniLM-L6-v2 loaded on {expected}" in writer.output()
    status = run_cli(home, "status")
    assert f"model all-MiniLM-L6-v2 on {expected}," in status.stdout
    assert json.loads(run_cli(home, "status", "--json").stdout)["writer"]["settings"]["device"] == expected
    assert writer.terminate() == 0
    if torch.cuda.is_available():
        return
    refused = run_cli(home, "worker", "--device", "cuda")
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[0] == (
        "Error: device 'cuda' was asked for (--device, INDEXQ_DEVICE), but torch sees no CUDA GPU"
    )
    assert "Traceback" not in refused.stderr


def pending_job_counted_slowly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, str, list[float]]:
    """A submitted job no writer takes (it stays pending) whose every count takes 0.2 s, as
    a job of ~80,000 chunks does; the moments of its counts are appended to the list."""
    import time

    from pipeline import api
    from pipeline.jobs import Jobs

    (tmp_path / "doc.txt").write_text("a line of text to index\n" * 40)
    config = Config(home=tmp_path / "home", model="hash:384")
    job = api.submit_paths([tmp_path / "doc.txt"], "docs", config=config)
    counts: list[float] = []
    real = Jobs.progress

    def slow(self: Jobs, job_id: str) -> object:
        counts.append(time.monotonic())
        time.sleep(0.2)
        return real(self, job_id)

    monkeypatch.setattr(Jobs, "progress", slow)
    return config, job, counts


def test_waiting_on_a_job_counts_its_progress_less_often_when_counting_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer waiting on a big job must not take the writer's CPU: a count that takes
    0.2 s is repeated every 10 s (100 times its duration, at most 10 s), not every half second."""
    from pipeline import api

    config, job, counts = pending_job_counted_slowly(tmp_path, monkeypatch)
    progress = api.wait(job, config, timeout=3)
    assert progress.pending > 0 and progress.state == "running"
    # One count at the start, the next at the deadline (3 s): a half-second poll would count 5 times.
    assert len(counts) == 2, counts


def test_waiting_on_a_job_sees_it_done_between_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two counts of a big job, the wait looks only whether a chunk is still
    outstanding: a job finished right after a count returns then, not at the next count."""
    import time

    from pipeline import api

    config, job, counts = pending_job_counted_slowly(tmp_path, monkeypatch)

    def commit_all() -> None:
        with sqlite3.connect(config.ledger_path, timeout=30) as conn:
            conn.execute("UPDATE chunks SET state='committed', committed_at=? WHERE state='pending'", (time.time(),))

    finisher = threading.Timer(0.5, commit_all)
    finisher.start()
    try:
        progress = api.wait(job, config, timeout=30)
    finally:
        finisher.join()
    assert progress.state == "done" and progress.pending == 0 and progress.committed > 0
    assert len(counts) == 2 and counts[1] - counts[0] < 5, counts  # not the count due 10 s later


def test_a_job_runs_while_its_producer_submits_or_a_chunk_is_outstanding(tmp_path: Path) -> None:
    import socket

    from pipeline import api
    from pipeline.ledger import Ledger

    text = "".join(f"line {n} of a text to index, about topic {n % 7}\n" for n in range(2000))
    (tmp_path / "doc.txt").write_text(text)
    config = Config(home=tmp_path / "home", model="hash:384")
    job = api.submit_paths([tmp_path / "doc.txt"], "docs", config=config)
    ledger = Ledger(config.ledger_path)
    try:
        assert ledger.jobs.running(job)  # queued, every chunk pending
        assert ledger.jobs.progress(job).chunks > 2  # type: ignore[union-attr]
        ledger.conn.execute("UPDATE chunks SET state='committed' WHERE rowid > 1")
        assert ledger.jobs.running(job)  # one left
        ledger.conn.execute("UPDATE chunks SET state='committed'")
        assert not ledger.jobs.running(job)
        ledger.conn.execute("UPDATE chunks SET state='deleting', job=? WHERE rowid = 1", (job,))
        assert ledger.jobs.running(job)  # a stale chunk still to delete
        ledger.conn.execute("UPDATE chunks SET state='committed'")
        ledger.conn.execute(
            "UPDATE jobs SET state='submitting', pid=?, host=? WHERE id=?", (os.getpid(), socket.gethostname(), job)
        )
        assert ledger.jobs.running(job)  # its producer (this process) still submits
        dead = psutil.Popen(["true"])
        dead.wait()
        ledger.conn.execute("UPDATE jobs SET pid=? WHERE id=?", (dead.pid, job))
        assert not ledger.jobs.running(job)  # abandoned
        ledger.conn.execute("UPDATE jobs SET state='failed' WHERE id=?", (job,))
        assert not ledger.jobs.running(job)
        assert not ledger.jobs.running("no-such-job")
    finally:
        ledger.close()


def test_the_watch_view_of_a_producers_machine_has_no_job_table() -> None:
    # A producer's machine has no ledger: its status has no "jobs" (KeyError, exit 1, before).
    from ops.watch import View, plain

    info = {
        "home": "/h", "producer_only": True, "queue_depth": 3, "intake_parts": 0,
        "engines": {"queue": "redis", "queue_at": "redis://127.0.0.1:6379/0"}, "writer": {"alive": False},
    }  # fmt: skip
    shown = plain(View(), info, None, 2.0)
    assert "queue:       3 tasks (redis redis://127.0.0.1:6379/0), 0 intake parts waiting" in shown
    assert "follow a job here with `indexq index --wait`" in shown


def test_a_ledger_that_is_not_a_database_is_one_line_from_every_command(tmp_path: Path) -> None:
    """Every command printed SQLite's traceback ("file is not a database")."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ledger.db").write_bytes(b"garbage, not SQLite\n" * 10)
    said = f"Error: the ledger {home / 'ledger.db'} is damaged: file is not a database"
    for argv in (
        ["status"],
        ["status", "--json"],
        ["check", "--deep"],
        ["recover"],
        ["worker"],
        ["search", "x", "-c", "docs"],
    ):
        result = run_cli(home, *argv, timeout=60, **MODEL)
        assert (result.returncode, result.stderr.splitlines()[0]) == (1, said), (argv, result.stderr)
        assert "Traceback" not in result.stderr
    assert (home / "ledger.db").read_bytes() == b"garbage, not SQLite\n" * 10


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_output_that_cannot_be_written_is_not_blamed_on_the_data_home(tmp_path: Path) -> None:
    """`indexq status > /dev/full` said the data home's disk was full (exit 6)."""
    home = tmp_path / "home"
    assert run_cli(home, "resume").returncode == 0
    for argv in (["status"], ["status", "--json"], ["backups"], ["status", "--watch", "--interval", "0.1"]):
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [str(BIN / "indexq"), *argv], env=env_for(home), stdout=full, stderr=subprocess.PIPE, text=True,
                timeout=60,
            )  # fmt: skip
        assert (result.returncode, result.stderr) == (1, "Error: cannot write the output: No space left on device\n")


def test_the_watch_view_shows_the_last_recovery(tmp_path: Path) -> None:
    """After a repair the watch still showed the check that found the damage, and no recovery."""
    import time

    from ops.watch import View, plain
    from pipeline import api

    home = tmp_path / "home"
    assert run_cli(home, "resume").returncode == 0
    info = api.status(Config(home=home))
    assert "\nrecovery:    none\n" in plain(View(), info, None, 2.0)
    info["last_recovery"] = {"time": time.time() - 30, "summary": "recovery restore: healthy after"}
    assert re.search(r"\nrecovery:    recovery restore: healthy after, 3\ds ago\n", plain(View(), info, None, 2.0))
