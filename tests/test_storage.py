"""A data home the disk cannot read or write: a full filesystem, a read-only one.

"Cannot check" is not damage (invariant 8): a check on a full disk exits 6 and records
no damage, recovery moves nothing it cannot finish, every command answers in one line
with exit 6, and the writer and the maintenance consumer back off with one log line per
state change. Each test mounts a real small tmpfs under tmp_path (root only) and
unmounts it when done; the writer embeds with the deterministic ``hash:384`` model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    BIN,
    Proc,
    copy_corpus,
    ledger_query,
    reseal,
    run_cli,
    start_worker,
    wait_for,
)

# The writer's guard would hold every commit back on a small filesystem (default 256 MB).
ENV = {"INDEXQ_MODEL": "hash:384", "INDEXQ_MIN_FREE_MB": "0"}
COLLECTION = "storage-docs"
FS_SIZE = "48m"
MORE = ["argparse.py", "difflib.py", "inspect.py", "tarfile.py"]


# ---- a real small filesystem ------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True, timeout=30)
        # Lazy: a process the test leaves behind lets go when the procs fixture kills it.
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def fill(fs: Path, leave: int = 0) -> Path:
    """Fill the filesystem until ``leave`` bytes are free (or it refuses more)."""
    filler = fs / f"filler-{time.monotonic_ns()}"
    want = max(shutil.disk_usage(fs).free - leave, 0)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 2**20
        while want > 0:
            try:
                want -= os.write(fd, block[: min(want, len(block))])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


def unfill(fs: Path) -> None:
    for filler in fs.glob("filler-*"):
        filler.unlink()


def remount(fs: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(fs)], check=True, capture_output=True, timeout=30)


# ---- a healthy home with a verified backup, built once ----------------------------------


def outstanding(home: Path) -> int:
    rows = ledger_query(home, "SELECT count(*) FROM chunks WHERE state IN ('pending', 'embedded', 'deleting')")
    return int(rows[0][0])


def committed(home: Path) -> int:
    return int(ledger_query(home, "SELECT count(*) FROM chunks WHERE state='committed'")[0][0])


def submit(home: Path, *paths: Path) -> str:
    result = run_cli(home, "index", *map(str, paths), "-c", COLLECTION, "--include", "*.py", **ENV)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("healthy")
    home = root / "home"
    started: list[Proc] = []
    try:
        writer = start_worker(started, home, **ENV)
        writer.wait_started()
        submit(home, copy_corpus(root / "corpus"))
        wait_for(lambda: outstanding(home) == 0, 120, "the job")
        backup = run_cli(home, "backup", "--json", **ENV)
        assert backup.returncode == 0, backup.stderr
        assert json.loads(backup.stdout)["verified"] is True
        assert writer.terminate() == 0
    finally:
        for proc in started:
            proc.cleanup()
    return home


@pytest.fixture
def home(healthy: Path, small_fs: Path) -> Path:
    copy = small_fs / "home"
    shutil.copytree(healthy, copy)
    return copy


def tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def assert_nothing_moved(home: Path) -> None:
    """No quarantine, no restore copy: recovery did not start."""
    assert not (home / "quarantine").exists()
    assert not list(home.glob("chroma.restoring-*")) and not list(home.glob(".chroma.staging-*"))


def assert_one_line_error(result: subprocess.CompletedProcess[str], start: str, *, only: bool = True) -> str:
    """Exit 6, no traceback, one `Error:` line starting with ``start``, then its `Hint:`."""
    assert result.returncode == 6, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    line = lines[errors[0]]
    assert line.startswith(start), line
    assert lines[errors[0] + 1].startswith("Hint: "), result.stderr
    if only:
        assert len(lines) == 2, result.stderr
    return line


# ---- the one classification -------------------------------------------------------------


def test_storage_errors_are_told_from_damage() -> None:
    from pipeline.errors import StorageError, from_chroma, storage_error

    full = storage_error(sqlite3.OperationalError("database or disk is full"), "cannot write /h")
    assert isinstance(full, StorageError) and full.exit_code == 6
    assert str(full) == "cannot write /h: no space left (database or disk is full)"
    assert full.reason == "no space left (database or disk is full)"
    for exc, kind in [
        (OSError(errno.ENOSPC, "No space left on device", "/h/x"), "no space left"),
        (OSError(errno.EROFS, "Read-only file system", "/h"), "read-only"),
        (PermissionError(errno.EACCES, "Permission denied", "/h"), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "I/O error"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "read-only"),
        (sqlite3.OperationalError("disk I/O error"), "I/O error"),
        (Exception("error returned from database: (code: 13) database or disk is full"), "no space left"),
        (Exception("Failed to write segment: Read-only file system (os error 30)"), "read-only"),
        (RuntimeError("task failed"), None),
    ]:
        found = storage_error(exc)
        assert (found.reason.split(" (")[0] if found else None) == kind, exc
    # Wrapped: Huey and chromadb raise their own exception from the one that says why.
    wrapped = RuntimeError("enqueue failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert storage_error(wrapped) is not None
    # Damage stays damage: a malformed file, a missing one, a lock that is held.
    for exc in [
        sqlite3.DatabaseError("database disk image is malformed"),
        sqlite3.DatabaseError("file is not a database"),
        FileNotFoundError(errno.ENOENT, "No such file or directory", "/h/chroma.sqlite3"),
        sqlite3.OperationalError("database is locked"),
        Exception("Error loading hnsw index"),
    ]:
        assert storage_error(exc) is None, exc
    assert not from_chroma(wrapped)


def test_an_error_chroma_does_not_explain_is_a_full_disk_with_little_room(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import errors

    compaction = Exception("Error in compaction: Failed to apply logs to the metadata segment")
    # A recovery's replay failed so with 2 MB free; taken for damage, it discredited a backup.
    from pipeline.backoff import RESTART_ROOM

    assert errors.NEARLY_FULL < RESTART_ROOM
    for free, full in ((2 * 2**20, True), (errors.CHROMA_NEARLY_FULL - 1, True), (errors.CHROMA_NEARLY_FULL, False)):
        monkeypatch.setattr(errors, "_filesystem", lambda path, free=free: (free, False))
        found = errors.storage_error(compaction, "x", "/h", unexplained=True, nearly_full=errors.CHROMA_NEARLY_FULL)
        assert (found is not None and found.reason.startswith("no space left")) is full, free
        assert errors.storage_error(compaction, "x", "/h") is None  # only Chroma's errors are judged so
        # The writer's back-off keeps the 1 MiB bound: it restarts once RESTART_ROOM is free,
        # so a larger bound would restart it in a loop on a disk with room for the restart.
        found = errors.storage_error(compaction, "x", "/h", unexplained=True)
        assert (found is not None) is (free < errors.NEARLY_FULL)


# ---- 6: a check on a full disk is "cannot check"; recovery moves nothing ---------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_full_disk_is_cannot_check_and_recovery_moves_nothing(home: Path, small_fs: Path, procs: list[Proc]) -> None:
    # A running writer holds the ledger open, so small reads and writes of it still work
    # on the full disk, while Chroma, opened afresh by the check, fails for want of space.
    writer = start_worker(procs, home, **ENV)
    writer.wait_started()
    assert run_cli(home, "check", **ENV).returncode == 0
    chroma = home / "chroma"
    before = tree(chroma)
    fill(small_fs)

    found = run_cli(home, "check", "--deep", **ENV)
    assert_one_line_error(found, f"Error: cannot check {chroma} (this is not damage): no space left (")
    recovered = run_cli(home, "recover", **ENV)
    assert_one_line_error(recovered, f"Error: cannot recover {home}; nothing was changed: cannot check {chroma}")
    assert tree(chroma) == before
    assert_nothing_moved(home)
    alerts = home / "logs" / "alerts.log"
    assert not alerts.exists() or "damage" not in alerts.read_text()

    shown = run_cli(home, "status", **ENV)
    assert shown.returncode == 0, shown.stderr
    assert f"last check:  deep check could not run: cannot check {chroma} (this is not damage)" in shown.stdout
    last = json.loads(run_cli(home, "status", "--json", **ENV).stdout)["last_check"]
    assert last["ok"] is False and last["cannot_check"] is True

    unfill(small_fs)
    assert run_cli(home, "check", "--deep", **ENV).returncode == 0
    assert writer.popen.poll() is None, writer.output()[-2000:]
    assert writer.terminate() == 0


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_recovery_without_room_for_the_restore_changes_nothing_and_says_why(home: Path, small_fs: Path) -> None:
    (home / "chroma" / "chroma.sqlite3").unlink()  # damage that needs the backup restored
    chroma = tree(home / "chroma")
    fill(small_fs, leave=300 * 1024)  # the backup's copy does not fit

    for argv in (["recover", "--dry-run"], ["recover"]):
        refused = run_cli(home, *argv, **ENV)
        line = assert_one_line_error(refused, "Error: cannot recover (restore): it needs about ", only=False)
        assert line.endswith("are free; nothing was changed"), line
        assert tree(home / "chroma") == chroma
        assert_nothing_moved(home)
    last = json.loads(run_cli(home, "status", "--json", **ENV).stdout)["last_recovery"]
    assert last["ok"] is False and last["summary"].startswith("recovery could not run: cannot recover (restore)")

    unfill(small_fs)
    recovered = run_cli(home, "recover", "--json", **ENV)
    assert recovered.returncode == 0, recovered.stderr
    result = json.loads(recovered.stdout)
    assert result["action"] == "restore" and result["healthy"] is True
    assert result["preflight"]["needs_bytes"] <= result["preflight"]["free_bytes"]
    assert run_cli(home, "check", "--deep", **ENV).returncode == 0


# ---- 7: one line and exit 6, never a traceback ------------------------------------------


def _commands(home: Path, corpus: Path) -> dict[str, list[str]]:
    return {
        "status": ["status"],
        "check": ["check"],
        "check --deep": ["check", "--deep"],
        "backup": ["backup"],
        "resume": ["resume"],
        "recover": ["recover"],
        "search": ["search", "anything", "-c", COLLECTION],
        "index": ["index", str(corpus), "-c", COLLECTION],
        "worker": ["worker"],
        "maintenance": ["maintenance"],
    }


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_every_command_on_a_full_disk_says_so_in_one_line(home: Path, small_fs: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(tmp_path / "corpus", ["shlex.py"])
    fill(small_fs)
    expected = {
        "status": f"Error: cannot use the data home {home}: no space left (",
        "check": f"Error: cannot check {home / 'chroma'} (this is not damage): no space left (",
        "backup": f"Error: not enough free space for a backup in {home / 'backups'}: it needs about ",
        "resume": f"Error: cannot open the queue of the data home {home}: no space left (",
        "recover": f"Error: cannot recover {home}; nothing was changed: ",
        "search": f"Error: cannot use the data home {home}: no space left (",
        "worker": f"Error: cannot open the queue of the data home {home}: no space left (",
        "maintenance": f"Error: cannot open the maintenance queue of the data home {home}: no space left (",
    }
    for name, argv in _commands(home, corpus).items():
        result = run_cli(home, *argv, timeout=120, **ENV)
        line = assert_one_line_error(result, expected.get(name, "Error: "))
        assert "no space left" in line or "not enough free space" in line, (name, line)
    # A new home on the full disk: refused the same way, and no half-written key file left.
    fresh = small_fs / "fresh"
    assert_one_line_error(
        run_cli(fresh, "index", str(corpus), "-c", COLLECTION, **ENV),
        f"Error: cannot open the queue of the data home {fresh}: no space left (",
    )
    assert_one_line_error(
        run_cli(fresh, "resume", **ENV), f"Error: cannot open the queue of the data home {fresh}: no space left ("
    )
    assert not list(fresh.glob(".queue.key.*"))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_read_only_home_or_parent_says_so_in_one_line(home: Path, small_fs: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(tmp_path / "corpus", ["shlex.py"])
    remount(small_fs, "ro")
    for name, argv in _commands(home, corpus).items():
        result = run_cli(home, *argv, timeout=120, **ENV)
        line = assert_one_line_error(result, "Error: ")
        assert ": read-only (" in line, (name, line)
    orphan = small_fs / "new-home"
    line = assert_one_line_error(
        run_cli(orphan, "index", str(corpus), "-c", COLLECTION, **ENV),
        f"Error: cannot use the data home {orphan}: ",
    )
    assert ": read-only (" in line
    # The real model, never exported to this home: refused before a model is loaded or an
    # export tried (no warning line, no torch).
    result = run_cli(home, "search", "anything", "-c", "never-indexed", timeout=120, INDEXQ_MIN_FREE_MB="0")
    assert ": read-only (" in assert_one_line_error(result, f"Error: cannot use the data home {home}: ")
    assert not (home / "models").exists()


def _log_lines(output: str) -> list[str]:
    # The fault pause that slows commits down logs each commit it delays: not the writer's own.
    return [line for line in output.splitlines() if "fault point" not in line]


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_the_writer_backs_off_on_a_full_disk_with_one_line_per_state_change(
    home: Path, small_fs: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    writer = start_worker(procs, home, **ENV, INDEXQ_FAULT_PAUSE="writer-commit:0.2")
    writer.wait_started()
    start = committed(home)
    job = submit(home, copy_corpus(tmp_path / "more", MORE))
    # The job's own count: by the time outstanding() looks, the writer may have committed some.
    total = start + int(ledger_query(home, "SELECT count(*) FROM job_chunks WHERE job=?", job)[0][0])
    wait_for(lambda: committed(home) >= start + 20, 120, "the writer to commit")
    fill(small_fs)

    wait_for(lambda: "writer paused: " in writer.output(), 120, "the writer to meet the full disk")
    assert outstanding(home) > 0, "the full disk should land in the middle of the job"
    paused = len(_log_lines(writer.output()))
    time.sleep(10)  # Huey alone logged ~170 lines a second here, each poll with a traceback
    lines = _log_lines(writer.output())
    assert len(lines) - paused <= 2, "\n".join(lines[paused:])
    for noise in ("Traceback", "Error reading from queue", "--- Logging error ---"):
        assert noise not in writer.output()
    assert sum("writer paused: " in line for line in lines) == 1
    assert writer.popen.poll() is None

    unfill(small_fs)
    wait_for(lambda: outstanding(home) == 0, 180, "the job to finish once there is room")
    assert committed(home) == total
    output = writer.output()
    assert "writer resumed: " in output or "writer: the disk has room again; restarting" in output
    assert writer.terminate() == 0
    assert run_cli(home, "check", "--deep", **ENV).returncode == 0


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_the_maintenance_consumer_backs_off_on_a_full_disk(home: Path, small_fs: Path, procs: list[Proc]) -> None:
    consumer = start_worker(
        procs, home, str(BIN / "indexq"), "maintenance", **ENV,
        INDEXQ_BACKUP_INTERVAL="24h", INDEXQ_QUICK_CHECK_INTERVAL="1",
    )  # fmt: skip
    wait_for(lambda: "maintenance ran: " in consumer.output(), 120, "the first tick")
    fill(small_fs)
    # The next tick comes within a minute: its enqueue or its check meets the full disk.
    wait_for(lambda: "maintenance paused: " in consumer.output(), 150, "the consumer to meet the full disk")
    paused = len(consumer.output().splitlines())
    time.sleep(5)
    output = consumer.output()
    assert len(output.splitlines()) - paused <= 2, output
    for noise in ("Traceback", "Error reading from queue", "--- Logging error ---", "found damage"):
        assert noise not in output
    assert output.count("maintenance paused: ") == 1
    assert consumer.popen.poll() is None
    unfill(small_fs)
    assert consumer.terminate() == 0
    events = ledger_query(home, "SELECT count(*) FROM events WHERE kind='recovery'")
    assert events[0][0] == 0, "a full disk must never start a recovery"


# ---- recovery and backups that meet a full disk midway --------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_restore_whose_replay_runs_out_of_room_is_a_full_disk_and_the_backup_stays_verified(
    home: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from chromadb.errors import InternalError

    from ops import recovery
    from ops.backup import list_backups
    from pipeline.config import Config
    from pipeline.errors import StorageError

    config = Config.from_env(ENV, home=home)
    (home / "chroma" / "chroma.sqlite3").unlink()  # damage that needs the backup restored

    def no_room(*args: object, **kwargs: object) -> None:  # what Chroma's compaction says on a full disk
        raise InternalError("Error in compaction: Failed to apply logs to the metadata segment")

    monkeypatch.setattr(recovery, "replay", no_room)
    with pytest.raises(StorageError, match=r"^recovery restore failed: no space left \("):
        recovery.recover(config)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    # Not damage: the backup it restored is as verified as before, and the replay is owed.
    assert [b["verified"] for b in list_backups(config)] == [True]
    assert config.pending_replay_path.exists()
    monkeypatch.undo()
    result = recovery.recover(config)
    assert result["action"] == "replay" and result["healthy"] is True
    assert not config.pending_replay_path.exists()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_what_a_killed_backup_left_does_not_block_the_next_one(home: Path, small_fs: Path) -> None:
    from ops.backup import create_backup, prune
    from pipeline.config import Config

    config = Config.from_env(ENV, home=home)
    # A backup killed in its verification: its scratch copy, and the backup never verified.
    (verified,) = list(config.backups_path.glob("2*"))
    unverified = config.backups_path / "20200101T000000Z"
    shutil.copytree(verified, unverified)
    (unverified / "verification.json").unlink()
    manifest = json.loads((unverified / "manifest.json").read_text())
    manifest.update(name=unverified.name, time=manifest["time"] - 60)  # within the retention
    (unverified / "manifest.json").write_text(json.dumps(manifest))
    leftover = config.backups_path / f".verify-{unverified.name}"
    leftover.mkdir()
    home_bytes = sum(f.stat().st_size for f in (home / "chroma").rglob("*") if f.is_file())
    home_bytes += (home / "ledger.db").stat().st_size
    # As much as leaves room for one copy of the home, not for the copy and its verification.
    filler = max(shutil.disk_usage(small_fs).free - int(1.5 * home_bytes), 0)
    (leftover / "copy").write_bytes(b"\0" * filler)

    made = create_backup(config)  # before, exit 6: "not enough free space for a backup"
    assert made["verified"] is True and not leftover.exists()
    # The unverified one, older than a verified one, can never be restored: pruned.
    assert unverified.name in prune(config) and not unverified.exists()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_backup_whose_manifest_changed_since_its_verification_is_listed_as_failed(home: Path) -> None:
    from ops.backup import list_backups
    from pipeline.config import Config

    config = Config.from_env(ENV, home=home)
    (backup,) = list_backups(config)
    manifest = Path(backup["path"]) / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["watermark"] = 99_999
    manifest.write_text(json.dumps(edited))
    (listed,) = list_backups(config)
    assert listed["verified"] is False and listed["problems"] == ["manifest.json changed since the backup was verified"]


def test_a_verdict_that_cannot_be_read_now_keeps_its_backup_out_of_the_listing_and_the_prune(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken as "unverified", a verified backup was pruned once a newer one was verified.
    from ops.backup import list_backups, prune
    from pipeline.config import Config

    config = Config.from_env(ENV, home=home)
    (verified,) = list(config.backups_path.glob("2*"))
    older = config.backups_path / "20200101T000000Z"
    shutil.copytree(verified, older)
    reseal(older, name=older.name, time=json.loads((older / "manifest.json").read_text())["time"] - 60)
    assert [b["verified"] for b in list_backups(config)] == [True, True]
    read_text = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == older / "verification.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert [b["name"] for b in list_backups(config)] == [verified.name]
    assert prune(config) == [] and older.exists()
