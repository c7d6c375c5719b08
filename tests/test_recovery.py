"""Real damage on real Chroma directories made by the real writer; check finds it, recovery repairs it.

The writer here embeds with the deterministic ``hash:384`` model: the vectors' values do
not matter to damage and recovery, and a collection past Chroma's first HNSW persist
(1,000 records) takes seconds to build instead of a minute.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.locks import CommitLock
from tests.conftest import (
    BIN,
    STDLIB,
    Proc,
    copy_corpus,
    dump_collection,
    ledger_query,
    reseal,
    run_cli,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.e2e

MODEL = {"INDEXQ_MODEL": "hash:384"}
COLLECTION = "stdlib-docs"


def submit(home: Path, *paths: Path) -> str:
    result = run_cli(home, "index", *map(str, paths), "-c", COLLECTION, "--include", "*.py", **MODEL)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def outstanding(home: Path) -> int:
    rows = ledger_query(home, "SELECT count(*) FROM chunks WHERE state IN ('pending', 'embedded', 'deleting')")
    return int(rows[0][0])


def committed_rows(home: Path) -> dict[str, tuple[str, str, bytes]]:
    rows = ledger_query(
        home, "SELECT id, text, metadata, embedding FROM chunks WHERE collection=? AND state='committed'", COLLECTION
    )
    return {i: (t, m, e) for i, t, m, e in rows}


def assert_equals_ledger(home: Path) -> None:
    """Recovery's promise: the collection is the ledger's committed set, field by field."""
    expected = committed_rows(home)
    records = dump_collection(home / "chroma", COLLECTION)
    assert sorted(records) == sorted(expected)
    for id_, (text, metadata, embedding) in expected.items():
        assert records[id_]["document"] == text
        assert records[id_]["metadata"] == json.loads(metadata)
        np.testing.assert_allclose(records[id_]["embedding"], np.frombuffer(embedding, dtype=np.float32), atol=1e-6)


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with a verified backup, then more commits after its watermark."""
    root = tmp_path_factory.mktemp("golden")
    home = root / "home"
    started: list[Proc] = []
    try:
        writer = start_worker(started, home, **MODEL)
        writer.wait_started()
        submit(home, STDLIB / "email", STDLIB / "json")
        wait_for(lambda: outstanding(home) == 0, 300, "the first job")
        backup = run_cli(home, "backup", "--json", **MODEL)
        assert backup.returncode == 0, backup.stderr
        assert json.loads(backup.stdout)["verified"] is True
        submit(home, STDLIB / "logging", STDLIB / "http")
        wait_for(lambda: outstanding(home) == 0, 300, "the second job")
        assert writer.terminate() == 0
    finally:
        for proc in started:
            proc.cleanup()
    assert len(committed_rows(home)) > 1100, "past Chroma's first HNSW persist at 1,000 records"
    assert run_cli(home, "check", **MODEL).returncode == 0  # healthy before any test damages a copy
    return home


@pytest.fixture
def home(golden: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(golden, copy)
    return copy


def vector_folder(home: Path) -> Path:
    conn = sqlite3.connect(home / "chroma" / "chroma.sqlite3")
    try:
        (segment,) = conn.execute("SELECT id FROM segments WHERE scope='VECTOR'").fetchone()
    finally:
        conn.close()
    return home / "chroma" / segment


def label_maps(home: Path) -> Path:
    return vector_folder(home) / "index_metadata.pickle"


def truncate(path: Path, keep: float) -> None:
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def overwrite_page(home: Path) -> None:
    db = home / "chroma" / "chroma.sqlite3"
    conn = sqlite3.connect(db)
    try:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='embeddings'").fetchone()
    finally:
        conn.close()
    with db.open("r+b") as handle:
        handle.seek((root - 1) * page_size)
        handle.write(random.Random(3).randbytes(page_size))


def damage_fts(home: Path) -> None:
    conn = sqlite3.connect(home / "chroma" / "chroma.sqlite3")
    with conn:
        conn.execute("UPDATE embedding_fulltext_search_data SET block = randomblob(length(block)) WHERE id > 10")
    conn.close()


DAMAGE: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "segment folder deleted": (lambda h: shutil.rmtree(vector_folder(h)), "hnsw", "restore"),
    "data_level0.bin truncated": (lambda h: truncate(vector_folder(h) / "data_level0.bin", 0.5), "hnsw", "restore"),
    "link_lists.bin truncated": (lambda h: truncate(vector_folder(h) / "link_lists.bin", 0.9), "hnsw", "restore"),
    "index_metadata.pickle deleted": (lambda h: label_maps(h).unlink(), "hnsw", "restore"),
    "index_metadata.pickle garbled": (lambda h: label_maps(h).write_bytes(b"\x80\x03garbage" * 50), "hnsw", "restore"),
    "sqlite page overwritten": (overwrite_page, "sqlite", "restore"),
    "fts shadow tables damaged": (damage_fts, "fts", "fts-rebuild"),
    "chroma.sqlite3 deleted": (lambda h: (h / "chroma" / "chroma.sqlite3").unlink(), "sqlite", "restore"),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_check_detects_and_recovery_restores_the_committed_set(home: Path, damage: str) -> None:
    harm, layer, action = DAMAGE[damage]
    harm(home)

    found = run_cli(home, "check", "--json", **MODEL)
    assert found.returncode == 1, found.stdout
    report = json.loads(found.stdout)
    assert report["healthy"] is False
    assert layer in {p["layer"] for p in report["problems"]}

    recovered = run_cli(home, "recover", "--json", **MODEL)
    assert recovered.returncode == 0, recovered.stderr
    result = json.loads(recovered.stdout)
    assert result["action"] == action and result["healthy"] is True
    if action == "restore":
        # Restored from the backup, then every chunk committed after its watermark replayed.
        assert result["replayed"] > 300
        quarantined = Path(result["quarantine"])
        assert quarantined.is_relative_to(home / "quarantine") and (quarantined / "reason.json").exists()
    # "healthy" is recovery's own deep check, made by a fresh probe process once it had finished.
    assert_equals_ledger(home)
    status = json.loads(run_cli(home, "status", "--json", **MODEL).stdout)
    assert status["last_recovery"]["ok"] is True
    assert status["last_recovery"]["detail"]["action"] == action
    assert "check found damage" in (home / "logs" / "alerts.log").read_text()


def rebuilt_from_the_ledger(home: Path) -> None:
    """`indexq recover` rebuilds the directory from the ledger, and it ends healthy (its
    closing deep check, a fresh probe process) and equal to the ledger."""
    result = run_cli(home, "recover", "--json", **MODEL)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["action"] == "rebuild" and done["healthy"] is True
    assert_equals_ledger(home)


def test_no_backup_rebuilds_from_the_ledger(home: Path) -> None:
    shutil.rmtree(home / "backups")
    truncate(vector_folder(home) / "data_level0.bin", 0.5)
    rebuilt_from_the_ledger(home)
    assert run_cli(home, "check", "--deep", **MODEL).returncode == 0  # and so says a check of its own


def _only_backup(home: Path) -> Path:
    (backup,) = [p for p in (home / "backups").iterdir() if not p.name.startswith(".")]
    return backup


def test_a_backup_changed_since_it_was_verified_is_not_restored(home: Path) -> None:
    backup = _only_backup(home)
    db = backup / "chroma" / "chroma.sqlite3"
    db.write_bytes(db.read_bytes().replace(b"json", b"JSON", 1))  # one byte flipped, after verification
    truncate(vector_folder(home) / "data_level0.bin", 0.5)
    # Asked for by name: refused in one line, nothing moved.
    asked = run_cli(home, "recover", "--from", backup.name, **MODEL)
    assert asked.returncode == 1
    assert asked.stderr.splitlines()[0] == (
        f"Error: backup {backup.name} changed since it was verified (chroma/chroma.sqlite3: checksum differs from"
        " the manifest); it was not restored"
    )
    assert not (home / "quarantine").exists()
    listed = json.loads(run_cli(home, "backups", "--json", **MODEL).stdout)
    assert [(b["name"], b["verified"]) for b in listed] == [(backup.name, False)]
    # Chosen by recovery: passed over (before, it was restored, and recovery failed on it for ever).
    rebuilt_from_the_ledger(home)


def test_a_manifest_that_disagrees_with_its_backup_is_not_restored(home: Path) -> None:
    from ops.recovery import restore_backup

    backup = _only_backup(home)
    watermark = json.loads((backup / "manifest.json").read_text())["watermark"]
    # Its files' checksums still hold, but a restore would replay only after this watermark.
    reseal(backup, watermark=watermark + 40)
    truncate(vector_folder(home) / "data_level0.bin", 0.5)
    asked = run_cli(home, "recover", "--from", backup.name, **MODEL)
    assert asked.returncode == 1
    assert asked.stderr.splitlines()[0] == (
        f"Error: backup {backup.name} changed since it was verified (manifest.json: watermark {watermark + 40},"
        f" its ledger snapshot's is {watermark}); it was not restored"
    )
    assert not (home / "quarantine").exists()
    # Nor may the manifest stop listing the ledger snapshot that would tell it.
    (backup / "verification.json").write_text(json.dumps({"verified": True, "problems": []}))
    manifest = json.loads((backup / "manifest.json").read_text())
    del manifest["files"]["ledger.db"]
    (backup / "manifest.json").write_text(json.dumps(manifest))
    listed = json.loads(run_cli(home, "backups", "--json", **MODEL).stdout)
    assert [(b["kind"], b["verified"]) for b in listed] == [("unknown", False)]
    assert "its list of files does not hold ledger.db" in listed[0]["problems"][0]
    asked = run_cli(home, "recover", "--from", backup.name, **MODEL)
    assert asked.returncode == 1 and f"backup {backup.name} is not verified" in asked.stderr
    # The restore step alone (the benchmark's) refuses it the same way.
    manifest["files"]["ledger.db"] = "0"
    (backup / "manifest.json").write_text(json.dumps(manifest))
    reseal(backup, watermark=watermark)
    (backup / "verification.json").write_text(json.dumps({"verified": True, "problems": []}))
    (backup / "chroma" / "chroma.sqlite3-journal").write_bytes(b"\0" * 512)  # a journal a restore would play
    from pipeline.errors import RecoveryFailedError

    with pytest.raises(RecoveryFailedError, match=re.escape("(chroma/chroma.sqlite3-journal: not in the manifest)")):
        restore_backup(Config(home=home, model="hash:384"), backup.name)
    assert not (home / "quarantine").exists()
    rebuilt_from_the_ledger(home)


def test_a_backup_whose_manifest_cannot_be_read_is_listed_as_failed_and_pruned(home: Path) -> None:
    from ops.backup import list_backups, prune

    backup = _only_backup(home)
    good = json.loads((backup / "manifest.json").read_text())
    # Fields of other types: listed as failed, not a crash of every command that lists backups.
    config = Config(home=home, model="hash:384")
    for odd_time in ('"yesterday"', "Infinity", "NaN"):
        spelled = json.dumps(good).replace(f'"time": {good["time"]}', f'"time": {odd_time}')
        (backup / "manifest.json").write_text(spelled)
        assert [(b["kind"], b["verified"]) for b in list_backups(config)] == [("unknown", False)], odd_time
    assert run_cli(home, "status", **MODEL).returncode == 0  # NaN: an age that cannot be rounded
    # A verification.json that is not one: unverified, so never restored, and listed.
    (backup / "manifest.json").write_text(json.dumps(good))
    verdict = (backup / "verification.json").read_text()
    for odd_verdict, shown in (
        ("[]", (None, [])),
        ('{"verified": 1, "problems": 5}', (None, [])),
        ('{"verified": true, "problems": 5}', (True, ["5"])),
    ):
        (backup / "verification.json").write_text(odd_verdict)
        assert [(b["verified"], b["problems"]) for b in list_backups(config)] == [shown], odd_verdict
    (backup / "verification.json").write_text(verdict)
    (backup / "manifest.json").write_text('{"name": "' + backup.name)  # cut short
    listed = json.loads(run_cli(home, "backups", "--json", **MODEL).stdout)
    assert [(b["name"], b["kind"], b["verified"], b["watermark"]) for b in listed] == [
        (backup.name, "unknown", False, None)
    ]
    assert listed[0]["problems"][0].startswith("manifest.json cannot be read: ")
    assert abs(listed[0]["time"] - json.loads((backup / "verification.json").read_text())["time"]) < 120
    assert f"{backup.name}  FAILED" in run_cli(home, "backups", **MODEL).stdout
    assert "FAILED verification" in run_cli(home, "status", **MODEL).stdout
    # Nothing restores it: recovery rebuilds from the ledger; retention removes it.
    truncate(vector_folder(home) / "data_level0.bin", 0.5)
    rebuilt_from_the_ledger(home)
    assert prune(Config(home=home, model="hash:384")) == [backup.name]
    assert not backup.exists() and list_backups(Config(home=home, model="hash:384")) == []


def test_a_backup_of_another_data_home_is_not_restored(home: Path) -> None:
    own = _only_backup(home)
    foreign = home / "backups" / "29991231T000000Z"  # the newest: what recovery would take first
    shutil.copytree(own, foreign)
    conn = sqlite3.connect(foreign / "ledger.db")
    conn.execute("UPDATE meta SET value='another-home' WHERE key='home'")
    conn.commit()
    conn.close()
    reseal(foreign, name=foreign.name, time=json.loads((own / "manifest.json").read_text())["time"] + 1)
    truncate(vector_folder(home) / "data_level0.bin", 0.5)
    asked = run_cli(home, "recover", "--from", foreign.name, **MODEL)
    assert asked.returncode == 1
    assert (
        asked.stderr.splitlines()[0]
        == f"Error: backup {foreign.name} was made of another data home; it was not restored"
    )
    assert not (home / "quarantine").exists()
    result = run_cli(home, "recover", "--json", **MODEL)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backup"] == own.name
    assert_equals_ledger(home)


def test_a_backup_whose_restore_leaves_damage_is_not_restored_again(home: Path) -> None:
    backup = _only_backup(home)
    # Damaged in a way its checksums do not tell (its manifest agrees): a restore cannot heal.
    overwrite_page(backup)  # a page of its chroma.sqlite3's embeddings table
    reseal(backup)
    truncate(vector_folder(home) / "data_level0.bin", 0.5)
    first = run_cli(home, "recover", "--json", **MODEL)
    assert first.returncode == 1
    assert "recovery restore: still damaged" in first.stderr
    listed = json.loads(run_cli(home, "backups", "--json", **MODEL).stdout)
    assert listed[0]["verified"] is False and "restoring it left the data home damaged" in listed[0]["problems"][0]
    rebuilt_from_the_ledger(home)


def test_no_folder_for_backups_or_a_damaged_database_is_one_line_and_checks_go_on(home: Path) -> None:
    shutil.rmtree(home / "backups")
    (home / "backups").write_text("not a folder\n")
    made = run_cli(home, "backup", **MODEL)
    assert made.returncode == 1 and "Traceback" not in made.stderr
    assert made.stderr.splitlines()[0].startswith(f"Error: cannot keep backups in {home / 'backups'}: [Errno 17]")
    assert run_cli(home, "backups", **MODEL).stdout.strip() == "no backups"
    assert run_cli(home, "status", **MODEL).returncode == 0
    assert run_cli(home, "check", **MODEL).returncode == 0
    (home / "backups").unlink()
    truncate(home / "chroma" / "chroma.sqlite3", 0.3)
    damaged = run_cli(home, "backup", **MODEL)
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr, damaged.stderr
    assert damaged.stderr.splitlines() == [
        f"Error: cannot back up {home / 'chroma'}: database disk image is malformed",
        "Hint: `indexq check` says what is damaged; `indexq recover` repairs it",
    ]


def test_dry_run_changes_nothing(home: Path) -> None:
    (home / "chroma" / "chroma.sqlite3").unlink()
    result = run_cli(home, "recover", "--dry-run", **MODEL)
    assert result.returncode == 0
    assert result.stdout.startswith("would restore: [sqlite]")
    assert not (home / "chroma" / "chroma.sqlite3").exists() and not (home / "quarantine").exists()


def test_busy_lock_is_reported_as_busy_not_damage(home: Path) -> None:
    lock = CommitLock(home / "commit.lock")
    before = time.time()  # the golden home's own healthy check is older, however soon after it this runs
    with lock.held():
        result = run_cli(home, "check", INDEXQ_LOCK_TIMEOUT="1", **MODEL)
    lock.close()
    assert result.returncode == 4
    assert result.stderr.startswith(f"Error: the commit lock {home / 'commit.lock'} stayed busy for 1s")
    assert not (home / "logs" / "alerts.log").exists()
    events = ledger_query(home, "SELECT count(*) FROM events WHERE kind='check' AND time >= ?", before)
    assert events[0][0] == 0


def test_a_check_gets_its_turn_while_the_writer_commits_back_to_back(tmp_path: Path, procs: list[Proc]) -> None:
    """With embedding nearly free (hash:384 here, a GPU for a user) the writer frees the commit
    lock for well under a millisecond between commits: a check that waits with a short
    timeout still gets in, pauses the writer, and the job goes on to the end."""
    home, total = tmp_path / "busy", 4000
    writer = start_worker(procs, home, **MODEL)
    writer.wait_started()
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": f"r{i}", "text": f"record {i} on topic {i % 23}"}) + "\n"
                               for i in range(total)))  # fmt: skip
    result = run_cli(home, "index", "--jsonl", str(records), "-c", COLLECTION, **MODEL)
    assert result.returncode == 0, result.stderr
    committed = lambda: ledger_query(home, "SELECT count(*) FROM chunks WHERE state='committed'")[0][0]  # noqa: E731
    wait_for(lambda: committed() >= 100, 120, "the first commits")
    for _ in range(3):
        check = run_cli(home, "check", INDEXQ_LOCK_TIMEOUT="2", **MODEL)
        assert check.returncode == 0, check.stderr
        during = committed()
        assert during < total, "the check ran while the writer was committing"
        wait_for(lambda: committed() > during, 60, "the writer to go on after the check")  # noqa: B023
    wait_for(lambda: committed() == total, 180, "the job to finish")
    assert ledger_query(home, "SELECT count(*) FROM events WHERE kind='check' AND ok=1")[0][0] >= 3


def _kill_at_fault(home: Path, argv: list[str], fault: str, appears: Callable[[], bool]) -> None:
    proc = subprocess.Popen(
        [str(BIN / "indexq"), *argv],
        env={**os.environ, "INDEXQ_HOME": str(home), "INDEXQ_FAULT_PAUSE": f"{fault}:60", **MODEL},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(appears, 120, f"{fault} to be reached")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_kill9_in_the_middle_of_a_backup_leaves_no_half_backup(home: Path) -> None:
    before = json.loads(run_cli(home, "backups", "--json").stdout)
    _kill_at_fault(home, ["backup"], "backup-copied", lambda: any((home / "backups").glob(".partial-*/ledger.db")))
    assert json.loads(run_cli(home, "backups", "--json").stdout) == before
    again = run_cli(home, "backup", "--json", **MODEL)
    assert again.returncode == 0, again.stderr
    names = [b["name"] for b in json.loads(run_cli(home, "backups", "--json").stdout)]
    assert len(names) == len(before) + 1
    assert not list((home / "backups").glob(".partial-*"))


def test_kill9_in_the_middle_of_a_recovery_then_run_again(home: Path) -> None:
    truncate(vector_folder(home) / "link_lists.bin", 0.5)
    _kill_at_fault(home, ["recover"], "restore-copied", lambda: any(home.glob("chroma.restoring-*/chroma.sqlite3")))
    assert not (home / "chroma").exists(), "killed between quarantine and restore"
    result = run_cli(home, "recover", "--json", **MODEL)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "restore"
    assert not list(home.glob("chroma.restoring-*"))
    assert run_cli(home, "check", "--deep", **MODEL).returncode == 0
    assert_equals_ledger(home)


def test_restore_while_the_writer_works(home: Path, procs: list[Proc]) -> None:
    # Slow commits (0.1 s each) keep the writer mid-job while the restore runs.
    writer = start_worker(procs, home, **MODEL, INDEXQ_FAULT_PAUSE="writer-commit:0.1")
    writer.wait_started()
    job = submit(home, STDLIB / "xml")
    total = outstanding(home)
    wait_for(lambda: outstanding(home) < total - 20, 120, "the writer to commit")
    backup = json.loads(run_cli(home, "backups", "--json").stdout)[0]["name"]
    result = run_cli(home, "recover", "--from", backup, "--json", **MODEL)
    assert result.returncode == 0, result.stderr
    assert outstanding(home) > 0, "the restore should land in the middle of the job"
    wait_for(lambda: outstanding(home) == 0, 300, f"job {job}")
    assert writer.terminate() == 0
    assert "the Chroma directory was restored" in writer.output()
    assert run_cli(home, "check", "--deep", **MODEL).returncode == 0
    assert_equals_ledger(home)


def test_retention_prunes_old_backups_but_keeps_the_newest_verified(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: rmtree deletes file by file, and a prune killed in the middle left a backup
    listed as verified with files missing. It is renamed out of the listing first."""
    import ops.backup
    from ops.backup import list_backups, prune

    config = Config(home=home, model="hash:384")
    for _ in range(2):
        assert run_cli(home, "backup", **MODEL).returncode == 0
    backups = list_backups(config)
    assert len(backups) == 3
    # The newest fails verification: the newest *verified* one must survive any age.
    newest = Path(backups[-1]["path"])
    (newest / "verification.json").write_text(json.dumps({"verified": False, "problems": ["test"]}))
    now = time.time() + 30 * 86400
    killed: list[str] = []  # a prune killed before any file of the two went
    monkeypatch.setattr(ops.backup.shutil, "rmtree", lambda path, **_: killed.append(Path(path).name))
    prune(config, now=now)
    assert sorted(killed) == sorted(f".deleting-{b['name']}" for b in (backups[0], backups[2]))
    assert [b["name"] for b in list_backups(config)] == [backups[1]["name"]]
    monkeypatch.undo()
    removed = prune(config, now=now)  # the leftovers
    left = [b["name"] for b in list_backups(config)]
    assert left == [backups[1]["name"]]
    assert set(removed) == {f".deleting-{backups[0]['name']}", f".deleting-{backups[2]['name']}"}
    assert sorted(p.name for p in config.backups_path.iterdir() if p.name != ".lock") == [backups[1]["name"]]


def test_maintenance_consumer_catches_up_on_a_missed_backup(home: Path, procs: list[Proc]) -> None:
    (old,) = json.loads(run_cli(home, "backups", "--json").stdout)
    manifest = Path(old["path"]) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["time"] -= 2 * 86400  # the last backup is two days old: one is due now
    manifest.write_text(json.dumps(data))

    consumer = start_worker(procs, home, str(BIN / "indexq"), "maintenance", **MODEL, INDEXQ_BACKUP_INTERVAL="24h")

    def new_backup() -> bool:
        from ops.backup import list_backups

        assert consumer.popen.poll() is None, consumer.output()[-2000:]
        return len(list_backups(Config(home=home, model="hash:384"))) == 2

    wait_for(new_backup, 180, "the missed backup")
    wait_for(lambda: "maintenance ran: backup" in consumer.output(), 180, "the first tick to finish")
    assert consumer.terminate() == 0
    newest = json.loads(run_cli(home, "backups", "--json").stdout)[-1]
    assert newest["verified"] is True
    status = json.loads(run_cli(home, "status", "--json").stdout)
    assert status["last_backup"]["name"] == newest["name"] and status["last_backup"]["verified"] is True
    assert status["last_check"]["ok"] is True


def test_a_check_whose_recovery_never_ran_is_run_again_by_the_next_consumer(tmp_path: Path) -> None:
    """A maintenance consumer killed between a check that found damage and the recovery:
    the next consumer's first tick checks again at once (and so recovers), not after a
    whole interval; once, and not when a recovery followed the check or auto-recover is off."""
    from ops.maintenance import _due
    from pipeline.ledger import Ledger

    config = Config(home=tmp_path / "home", model="hash:384")
    config.ensure_home()
    ledger = Ledger(config.ledger_path)
    try:
        ledger.events.add("check", True, "deep check healthy", {"deep": True})
        ledger.events.add("check", False, "quick check found damage", {"deep": False})
        killed_at = time.time()
        due = _due(config, killed_at, started=killed_at + 1)  # a consumer started after the kill
        assert due.quick_check and not due.deep_check
        # Its own check comes after it started: the usual intervals again.
        assert not _due(config, killed_at, started=killed_at - 10).quick_check
        assert not _due(
            Config(home=config.home, model="hash:384", auto_recover=False), killed_at, killed_at + 1
        ).quick_check
        # A deep check's damage is looked for by a deep check.
        ledger.events.add("check", False, "deep check found damage", {"deep": True})
        assert _due(config, time.time(), started=time.time() + 1).deep_check
        # A recovery after the check (even a failed one) leaves it to the intervals.
        ledger.events.add("recovery", False, "recovery failed", {})
        again = _due(config, time.time(), started=time.time() + 1)
        assert not again.quick_check and not again.deep_check
    finally:
        ledger.close()


def test_a_fresh_home_is_not_damage_before_the_writer_wrote_anything(tmp_path: Path) -> None:
    """Maintenance started beside a writer that has not created chroma.sqlite3 yet: no
    false damage, no rebuild, no failed backup, no alert."""
    from ops.maintenance import tick

    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "corpus", ["shlex.py"])
    assert run_cli(home, "index", str(corpus), "-c", "docs", INDEXQ_MODEL="hash:384").returncode == 0
    assert not (home / "chroma" / "chroma.sqlite3").exists()
    check = run_cli(home, "check", "--deep", INDEXQ_MODEL="hash:384")
    assert check.returncode == 0, check.stdout + check.stderr
    config = Config(home=home, model="hash:384")
    ran = tick(config)
    assert "backup failed" not in ran and "recovery" not in ran and "backup" not in ran
    assert ledger_query(home, "SELECT count(*) FROM events WHERE kind IN ('alert', 'recovery') OR ok=0") == [(0,)]
    assert not (home / "quarantine").exists() or not any((home / "quarantine").iterdir())
    # Once a chunk is committed, a missing database is damage again.
    conn = sqlite3.connect(home / "ledger.db")
    conn.execute("UPDATE chunks SET state='committed' WHERE rowid = (SELECT min(rowid) FROM chunks)")
    conn.commit()
    conn.close()
    assert run_cli(home, "check", INDEXQ_MODEL="hash:384").returncode == 1


def test_a_hot_journal_left_by_a_killed_writer_is_neither_damage_nor_cannot_check(home: Path) -> None:
    """A process SIGKILLed inside a write transaction of chroma.sqlite3 leaves a hot
    journal; the check rolls it back (as the next writer would) and finds the home healthy."""
    db = home / "chroma" / "chroma.sqlite3"
    script = (
        "import os, signal, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA journal_mode=DELETE')\n"
        "conn.execute('PRAGMA cache_size=4')  # spill: the journal reaches the disk\n"
        "conn.execute('BEGIN IMMEDIATE')\n"
        "conn.execute('CREATE TABLE indexq_probe AS SELECT * FROM embeddings')\n"
        "conn.execute('DELETE FROM embeddings_queue')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert (home / "chroma" / "chroma.sqlite3-journal").exists(), "no hot journal: the test proves nothing"
    check = run_cli(home, "check", **MODEL)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (home / "chroma" / "chroma.sqlite3-journal").exists()
    assert_equals_ledger(home)


def test_a_restore_killed_in_its_replay_is_reported_and_finished(tmp_path: Path, procs: list[Proc]) -> None:
    """Chunks changed after the backup keep the backup's older text until the replay
    reaches them; ids all match, so only a deep read-back would see it. A restore killed
    there leaves replay.pending: every check reports it, and recovery finishes the replay."""
    home = tmp_path / "home"
    records = tmp_path / "records.jsonl"

    def write(version: str) -> None:
        lines = (json.dumps({"id": f"r{n:03}", "text": f"record {n}, {version}"}) for n in range(60))
        records.write_text("\n".join(lines) + "\n")
        result = run_cli(home, "index", "--jsonl", str(records), "-c", COLLECTION, **MODEL)
        assert result.returncode == 0, result.stderr

    writer = start_worker(procs, home, **MODEL)
    writer.wait_started()
    write("first text")
    wait_for(lambda: outstanding(home) == 0, 120, "the first job")
    backup = json.loads(run_cli(home, "backup", "--json", **MODEL).stdout)
    write("second text")  # every chunk changes after the backup's watermark
    wait_for(lambda: outstanding(home) == 0, 120, "the second job")
    assert writer.terminate() == 0
    _kill_at_fault(
        home, ["recover", "--from", backup["name"]], "replay-batch", lambda: (home / "replay.pending").exists()
        and (home / "chroma" / "chroma.sqlite3").exists() and any((home / "quarantine").iterdir())
    )  # fmt: skip
    assert (home / "replay.pending").exists()
    check = run_cli(home, "check", "--json", **MODEL)
    assert check.returncode == 1
    assert "a restore was interrupted before its replay finished" in check.stdout
    fixed = run_cli(home, "recover", "--json", **MODEL)
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout)["action"] == "replay"
    assert not (home / "replay.pending").exists()
    assert run_cli(home, "check", "--deep", **MODEL).returncode == 0
    assert_equals_ledger(home)


def test_an_alert_is_one_line_whatever_its_message_holds(tmp_path: Path) -> None:
    from pipeline import alerts
    from pipeline.ledger import Ledger

    config = Config(home=tmp_path / "home")
    config.ensure_home()
    ledger = Ledger(config.ledger_path)
    try:
        alerts.raise_alert(config, ledger, "check found damage: *** in database main ***\nOn tree page 566 cell 3")
    finally:
        ledger.close()
    (line,) = config.alerts_path.read_text().splitlines()
    assert line.endswith(" CRITICAL check found damage: *** in database main *** On tree page 566 cell 3")
