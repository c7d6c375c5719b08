"""Recovery that loses nothing acknowledged: the ledger's committed set is the target.

With the writer paused (the commit lock held throughout):

- FTS-only damage: the full-text index is rebuilt in place.
- Chunks missing from Chroma or unknown to the ledger, and nothing else wrong:
  replayed in place from the ledger (stored embeddings) / deleted.
- Any other damage: the damaged directory is moved to ``quarantine/NAME/``, the newest
  verified backup is restored, and every chunk committed after its watermark is
  replayed from the ledger; with no usable backup the collection is rebuilt from the
  ledger. Nothing is embedded again.

Every step can be killed and run again: the quarantine and the restore are renames.
A restore's partial replay is not only chunks missing: chunks changed since the backup
keep its older text, with ids that all match. So ``replay.pending`` is written before
the swap and removed when the replay ends; while it exists every check reports the
interrupted restore, and the next recovery finishes the replay from its watermark.
The run ends with a deep check, an event in the ledger and a line in the log.

The directory set aside may hold collections the ledger does not know (another
program's, through a plain Chroma client): they are not carried into the restored or
rebuilt directory. Recovery names them (``foreign`` in its result, a warning in the
log, the event's summary) and where they now are, in quarantine with the damaged
directory. They are read from chroma.sqlite3's ``collections`` table, read-only; a
table too damaged to read is said so, and never stops the recovery of the ledger's.

Nothing moves until recovery knows it can finish (``preflight``): the data home takes
a write, the Chroma directory is on its filesystem (quarantine and restore are
renames), and there is room for what the step writes (a backup's copy, replayed
chunks). Otherwise it raises StorageError (exit 6) and changes nothing. A check that
cannot read the disk is "cannot check", never a reason to recover. A restore copies
the backup beside the damaged directory first, and only then swaps the two.

Against a Chroma server there is no directory to quarantine or copy: damage beyond
missing or unknown chunks is repaired by dropping the damaged collections on the
server and rebuilding them from the ledger; ``--from BACKUP`` loads the backup's
ledger snapshot first, then replays what the live ledger committed after it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from ops.backup import checksum_problems, discredit, home_of, list_backups
from ops.integrity import INTERRUPTED_RESTORE, Report, busy, check_home
from pipeline import alerts
from pipeline import collection as settings_of
from pipeline.batches import batched
from pipeline.config import Config
from pipeline.errors import (
    CHROMA_NEARLY_FULL,
    BusyError,
    NotFoundError,
    RecoveryFailedError,
    StorageError,
    first_line,
    from_chroma,
    storage_error,
    storage_errors,
)
from pipeline.faults import fault_point
from pipeline.fsync import fsync_dir, fsync_tree, probe_write, write_json_atomic
from pipeline.ledger import Ledger
from pipeline.locks import CommitLock
from pipeline.rows import COMMITTED, FAILED

logger = logging.getLogger(__name__)

NONE, FTS, REPLAY, RESTORE, REBUILD = "none", "fts-rebuild", "replay", "restore", "rebuild"
# Room a recovery keeps beyond its estimate: Chroma's journal, reason.json, the generation file.
RECOVERY_MARGIN = 4 * 2**20
# Chroma's bytes for each ledger byte replayed (SQLite log and metadata, full-text index,
# HNSW entry), measured at 2.2 on the stdlib corpus with 384-dimension vectors.
REPLAY_OVERHEAD = 3


def plan(
    report: Report, config: Config, source: str | None = None, record: bool = True, home: str | None = None
) -> dict[str, Any]:
    """What recovery would do about a check report. A verified backup whose files no longer
    match their checksums is not restored (and, with ``record``, no longer counts as verified):
    the next older one is, or the ledger rebuilds the directory. Nor is a backup of another
    data home than ``home`` (the ledger's id)."""
    if source:
        backup = _asked_for(config, source, record, home)
        return {"action": RESTORE, "backup": backup["name"], "reason": "restore asked for"}
    if report.healthy:
        return {"action": NONE, "reason": "healthy"}
    layers = report.layers
    if layers == {"fts"}:
        return {"action": FTS, "reason": "full-text index damaged"}
    pending = _pending_replay(config)
    if pending is not None and layers <= {"ledger", "deep"} and all(_replayable(p.what) for p in report.problems):
        return {"action": REPLAY, "watermark": pending, "reason": f"{INTERRUPTED_RESTORE}; replaying after {pending}"}
    if layers == {"ledger"} and all("missing" in p.what or "does not know" in p.what for p in report.problems):
        return {"action": REPLAY, "reason": "chunks missing or unknown; the directory is sound"}
    reason = "; ".join(str(p) for p in report.problems[:3])
    if config.chroma_engine == "server":
        # The ledger holds every committed chunk with its embedding: rebuilding the
        # damaged collections from it is exact, and needs no backup.
        return {"action": REBUILD, "reason": reason + " (rebuilding the damaged collections from the ledger)"}
    for backup in reversed(list_backups(config)):  # the newest intact verified backup
        if _foreign(backup, home):
            logger.warning("backup %s was made of another data home: not restored", backup["name"])
        elif backup["verified"] and backup["kind"] == "full":
            if not (problems := _changed(backup, record)):
                return {"action": RESTORE, "backup": backup["name"], "reason": reason}
            logger.warning("backup %s changed since it was verified (%s): not restored", backup["name"], problems[0])
    return {"action": REBUILD, "reason": reason + " (no verified backup: rebuilding from the ledger)"}


def _asked_for(config: Config, source: str, record: bool = True, home: str | None = None) -> dict[str, Any]:
    """The backup named (by name or folder) for a restore, if it may be restored: verified,
    of this data home (the ledger's id ``home``), and its files as they were verified (with
    ``record``, one that changed is no longer verified). Otherwise one line, nothing restored."""
    backup = next((b for b in list_backups(config) if source in (b["name"], b["path"])), None)
    if backup is None:
        raise NotFoundError(f"no backup {source!r} in {config.backups_path}", hint="indexq backups lists them")
    if not backup["verified"]:
        why = f" ({backup['problems'][0]})" if backup["problems"] else ""
        raise RecoveryFailedError(f"backup {backup['name']} is not verified{why}; only verified backups are restored")
    if _foreign(backup, home):
        raise RecoveryFailedError(
            f"backup {backup['name']} was made of another data home; it was not restored",
            hint="restore one of this home's backups (indexq backups), or let `indexq recover` choose",
        )
    if problems := _changed(backup, record):
        raise RecoveryFailedError(
            f"backup {backup['name']} changed since it was verified ({problems[0]}); it was not restored",
            hint="restore another (indexq backups), or let `indexq recover` choose",
        )
    return backup


def _foreign(backup: dict[str, Any], home: str | None) -> bool:
    """Whether ``backup`` was made of another data home (one made before homes had an id: no)."""
    theirs = home_of(Path(backup["path"]))
    return home is not None and theirs is not None and theirs != home


def _changed(backup: dict[str, Any], record: bool) -> list[str]:
    """Files of a verified backup changed or gone since (checked again before each restore,
    since a restore trusts them); with ``record``, it is then no longer verified."""
    problems = checksum_problems(Path(backup["path"]))
    if problems and record:
        discredit(Path(backup["path"]), problems)
    return problems


def recover(config: Config, source: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Check, then repair; returns what was done. Raises BusyError if the lock stays busy."""
    config.require_home()
    with storage_errors(f"cannot recover {config.home}; nothing was changed", config.home):
        lock = CommitLock(config.commit_lock_path)
        ledger = Ledger(config.ledger_path)
    started = time.monotonic()
    try:
        with lock.held(timeout=config.lock_timeout):
            with storage_errors(f"cannot recover {config.home}; nothing was changed", config.home):
                _clean_leftovers(config)
                # Deep: the damage multiple writers leave (SQLite fine, vectors unreadable)
                # shows only when embeddings are read back. A disk that cannot be read
                # raises StorageError here: cannot check is no reason to move anything.
                try:
                    report = check_home(config, deep=True)
                except StorageError as exc:
                    raise StorageError(f"cannot recover {config.home}; nothing was changed: {exc}", exc.hint) from exc
                result: dict[str, Any] = {
                    **plan(report, config, source, record=not dry_run, home=ledger.home_id()),
                    "found": [str(p) for p in report.problems],
                }
                result["damaged"] = sorted({p.where for p in report.problems if p.layer in ("ledger", "deep")})
                if result["action"] != NONE:
                    try:
                        result["preflight"] = preflight(config, ledger, result, report)
                    except StorageError as exc:
                        if not dry_run:
                            _refused(config, result, exc)
                        raise
            if dry_run or result["action"] == NONE:
                return {**result, "dry_run": dry_run}
            logger.warning("recovery: %s (%s)", result["action"], result["reason"])
            unlisted = None
            try:
                result.update(_execute(config, ledger, result))
                # Said in the log and the event, not in the result: its contract lists ``foreign`` only.
                unlisted = result.pop("foreign_unlisted", None)
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"
                # Chroma's errors may not say why (a full disk fails its compaction with
                # "Failed to apply logs to the metadata segment"): judged by the free space.
                doing = f"recovery {result['action']} failed"
                error = storage_error(
                    exc, doing, config.home, unexplained=from_chroma(exc), nearly_full=CHROMA_NEARLY_FULL
                )
                why = busy(exc) if error is None else None
                if why is not None:  # another program took a lock on Chroma's database meanwhile: busy
                    logger.error("%s: another program holds a lock on Chroma's database (%s)", doing, why)
                    raise BusyError(
                        f"{doing}: another program holds a lock on {config.chroma_dir / 'chroma.sqlite3'} ({why});"
                        " this is not damage",
                        hint="run `indexq recover` again once that program lets go (`fuser` names it);"
                        " each step can be run again",
                    ) from exc
                if error is None:
                    logger.exception("recovery %s failed", result["action"])
                else:  # the estimate fell short, or the disk failed meanwhile
                    logger.error("%s", error)
                    _refused(config, result, error)
                    raise error from exc
            final = check_home(config, deep=True)
            result["pause_seconds"] = round(time.monotonic() - started, 3)
            result["healthy"] = final.healthy
            result["remaining"] = [str(p) for p in final.problems]
            if result["action"] == RESTORE and not final.healthy:
                # Not again: the next recovery takes an older backup, or rebuilds from the ledger.
                # Unless the disk is nearly full: Chroma may have failed for want of room.
                restored = next((b for b in list_backups(config) if b["name"] == result["backup"]), None)
                if restored is not None and shutil.disk_usage(config.home).free < CHROMA_NEARLY_FULL:
                    logger.warning("backup %s is not discredited: the disk is nearly full", restored["name"])
                elif restored is not None:
                    discredit(
                        Path(restored["path"]), [f"restoring it left the data home damaged: {result['remaining'][0]}"]
                    )
    finally:
        lock.close()
    summary = f"recovery {result['action']}: " + (
        "healthy after" if result["healthy"] else f"still damaged: {result['remaining'][:2]}"
    )
    if result.get("foreign"):
        summary += f"; {_foreign_note(result)}"
    elif unlisted:
        summary += f"; collections the ledger does not know in {result['quarantine']}/chroma {unlisted}"
    ledger.events.add("recovery", result["healthy"], summary, result)
    if not result["healthy"]:
        alerts.raise_alert(config, ledger, summary)
    ledger.close()
    logger.warning("%s (writer paused %.2fs)", summary, result["pause_seconds"])
    if not result["healthy"]:
        if "quarantine" in result:
            hint = f"the damaged directory is in {result['quarantine']}; see logs/alerts.log"
        else:  # repaired in place (or on a server): nothing was set aside
            hint = "nothing was moved to quarantine/; see logs/alerts.log, and `indexq recover --from BACKUP`"
        raise RecoveryFailedError(summary, hint=hint)
    return {**result, "dry_run": False}


def preflight(config: Config, ledger: Ledger, step: dict[str, Any], report: Report | None = None) -> dict[str, Any]:
    """Before anything moves: the home takes a write, renames stay on one filesystem, and
    there is room for what the step writes. Raises StorageError (or RecoveryFailedError) if not."""
    action = step["action"]
    home = config.home
    with storage_errors(f"cannot recover: the data home {home} cannot be written; nothing was changed", home):
        probe_write(home, "recovery")
    if config.chroma_engine == "server":
        return {"action": action}  # the server's disk is the server's; the ledger is only read
    chroma = config.chroma_dir
    if action in (FTS, REPLAY):
        _writable(chroma / "chroma.sqlite3", config.lock_timeout)
    if action in (RESTORE, REBUILD) and chroma.exists() and chroma.stat().st_dev != home.stat().st_dev:
        raise RecoveryFailedError(
            f"cannot recover: {chroma} is not on the filesystem of the data home {home}; nothing was changed",
            hint="quarantine and restore rename directories: keep the Chroma directory in the data home",
        )
    need = RECOVERY_MARGIN
    per_chunk = _chroma_bytes_per_chunk(config, ledger)
    if action == FTS:
        # The rebuild rewrites the full-text tables in one transaction, journal included.
        need += (chroma / "chroma.sqlite3").stat().st_size
    elif action == REPLAY:
        missing = sum(int(info.get("missing", 0)) for info in (report.collections if report else {}).values())
        need += _replay_bytes(ledger, None, per_chunk, sample=max(missing, 1))
    elif action == RESTORE:
        backup = next(b for b in list_backups(config) if b["name"] == step["backup"])
        need += _tree_bytes(Path(backup["path"]) / "chroma")
        need += _replay_bytes(ledger, backup["watermark"], per_chunk)
    else:  # REBUILD: every committed chunk, from the ledger
        need += _replay_bytes(ledger, None, per_chunk)
    free = shutil.disk_usage(home).free
    if free < need:
        raise StorageError(
            f"cannot recover ({action}): it needs about {_mb(need)} free on the filesystem of {home},"
            f" {_mb(free)} are free; nothing was changed",
            hint="free space on that filesystem, then run `indexq recover` again",
        )
    return {"action": action, "needs_bytes": need, "free_bytes": free}


def _writable(db: Path, timeout: float) -> None:
    """Raise BusyError if another program holds a lock on ``db`` that a repair in place would
    wait on past ``timeout`` (a write lock taken and given back at once; nothing written)."""
    if not db.exists():
        return
    conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if (why := busy(exc)) is None:
            raise
        raise BusyError(
            f"cannot recover: another program holds a lock on {db} ({why}); nothing was changed",
            hint="run `indexq recover` again once that program lets go (`fuser` names it)",
        ) from exc
    finally:
        conn.close()


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _replay_bytes(ledger: Ledger, after: int | None, per_chunk: float, sample: int | None = None) -> int:
    """What Chroma may take for the committed chunks after a watermark (or, with ``sample``,
    that many average ones): REPLAY_OVERHEAD times their bytes in the ledger (text,
    metadata, embedding), or as many as this home's Chroma directory holds a chunk in,
    whichever is more; and a quarter more for what a replay holds for a while (SQLite's
    journal, Chroma's log before it is compacted, an HNSW index grown ahead)."""
    sql = "SELECT count(*), coalesce(sum(length(text) + length(metadata) + length(embedding)), 0) FROM chunks"
    sql += " WHERE state='committed'" + ("" if after is None else " AND seq > ?")
    count, size = ledger.conn.execute(sql, () if after is None else (after,)).fetchone()
    if sample is not None:
        size, count = (size / count * sample if count else 0), sample
    return int(max(REPLAY_OVERHEAD * size, per_chunk * count) * 5 / 4)


def _chroma_bytes_per_chunk(config: Config, ledger: Ledger) -> float:
    """Bytes a committed chunk takes in this home's Chroma directory as it is (0 if none).

    Three times the ledger's bytes alone asked 74.9 MB for a restore (5,544 chunks to
    replay, hash:384, a tmpfs) that needed about 82 (the estimate below asked 91.4): Chroma's
    database keeps the pages its log freed, and its vector index grows ahead of its count."""
    (count,) = ledger.conn.execute("SELECT count(*) FROM chunks WHERE state='committed'").fetchone()
    if not count or not config.chroma_dir.is_dir():
        return 0.0
    try:
        return _tree_bytes(config.chroma_dir) / count
    except OSError:  # a damaged directory may not even be listed: the ledger's figure serves
        return 0.0


def _refused(config: Config, result: dict[str, Any], error: StorageError) -> None:
    """Record (if the ledger takes it) and alert that recovery could not run."""
    summary = f"recovery could not run: {error}"
    try:
        ledger = Ledger(config.ledger_path)
        try:
            ledger.events.add("recovery", False, summary, {**result, "error": str(error), "storage": True})
            alerts.raise_alert(config, ledger, summary)
        finally:
            ledger.close()
    except Exception as exc:
        if storage_error(exc) is None:
            raise
        logger.error("%s (could not record it: %s)", summary, first_line(exc))


def _execute(config: Config, ledger: Ledger, step: dict[str, Any]) -> dict[str, Any]:
    action = step["action"]
    # First, before anything changes: whatever happens next (even a kill), the writer
    # must reopen Chroma before its next commit instead of writing through a client
    # whose files were replaced or whose in-memory index is now stale.
    _new_generation(config)
    if action == FTS:
        _rebuild_fts(config.chroma_dir)
        return {}
    if action == REPLAY:
        result = replay(config, ledger, step.get("watermark"))
        _replayed(config)
        return result
    if config.chroma_engine == "server":
        return _rebuild_on_server(config, ledger, step)
    if action == RESTORE:
        backup = next(b for b in list_backups(config) if b["name"] == step["backup"])
        return _swap_in(config, ledger, backup, step["reason"])
    foreign = _not_ours(config.chroma_dir, ledger)
    quarantined = _quarantine(config, step["reason"])
    config.chroma_dir.mkdir(mode=0o700, exist_ok=True)
    result = {"quarantine": str(quarantined), **replay(config, ledger)}
    _replayed(config)  # every committed chunk: a restore's unfinished replay is done too
    return {**result, **_left_behind(config, quarantined, foreign)}


def restore_backup(config: Config, name: str, watermark: int | None = None) -> dict[str, Any]:
    """Restore the backup ``name`` and replay from the ledger every chunk committed after
    ``watermark`` (the backup's own unless given; 0 replays them all), the writer paused. The
    backup is refused as ``recover(config, source=name)`` refuses it (``_asked_for``). No check
    before or after, no event: ``recover`` is the operator's way; this is the restore step
    alone (the benchmark times it)."""
    lock = CommitLock(config.commit_lock_path)
    ledger = Ledger(config.ledger_path)
    try:
        with lock.held(timeout=config.lock_timeout):
            backup = _asked_for(config, name, home=ledger.home_id())
            _new_generation(config)
            return _swap_in(config, ledger, backup, f"restore of {name} asked for", watermark)
    finally:
        ledger.close()
        lock.close()


def _swap_in(
    config: Config, ledger: Ledger, backup: dict[str, Any], reason: str, watermark: int | None = None
) -> dict[str, Any]:
    """The backup's Chroma directory in place of the one there (to quarantine/), then the replay."""
    # Copied beside the damaged directory first: a copy that fails (a full disk)
    # leaves everything where it was.
    staging = _stage(config, Path(backup["path"]) / "chroma")
    after = backup["watermark"] if watermark is None else watermark
    # Before the swap: a kill from here until the replay ends leaves the backup's older
    # text on chunks committed since, which checks then report and recovery replays.
    write_json_atomic(config.pending_replay_path, {"watermark": after, "backup": backup["name"], "time": time.time()})
    foreign = _not_ours(config.chroma_dir, ledger)
    quarantined = _quarantine(config, reason)
    _restore(config, staging, quarantined)
    result = {"quarantine": str(quarantined), **replay(config, ledger, after)}
    _replayed(config)
    return {**result, **_left_behind(config, quarantined, foreign, backup["name"])}


def _collection_names(chroma: Path) -> list[str]:
    """The names in a Chroma directory's ``collections`` table, read-only (none without a database)."""
    db = chroma / "chroma.sqlite3"
    if not db.is_file():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return sorted(name for (name,) in conn.execute("SELECT name FROM collections"))
    finally:
        conn.close()


def _not_ours(chroma: Path, ledger: Ledger) -> list[str] | str:
    """The collections of the directory about to be set aside that the ledger does not know
    (another program's), or why they could not be listed (a damaged database): never raises,
    since naming them must not stop the recovery of the ledger's own."""
    try:
        known = set(settings_of.all_recorded(ledger.conn))
        return [name for name in _collection_names(chroma) if name not in known]
    except Exception as exc:
        return f"could not be listed: {type(exc).__name__}: {first_line(exc)}"


def _left_behind(
    config: Config, quarantined: Path, foreign: list[str] | str, backup: str | None = None
) -> dict[str, Any]:
    """``foreign`` for the result: what of another program's stayed with the damaged directory
    (in quarantine), said in the log, with the older copies the restored backup holds."""
    where = quarantined / "chroma"
    if isinstance(foreign, str):
        logger.warning("collections the ledger does not know in %s %s; any stay there", where, foreign)
        return {"foreign": [], "foreign_unlisted": foreign}
    if foreign:
        note = _foreign_note({"foreign": foreign, "quarantine": str(quarantined)})
        try:
            older = [name for name in foreign if name in _collection_names(config.chroma_dir)]
        except Exception:
            older = []
        if older:
            note += f" (backup {backup} restored an older copy of {', '.join(older)})"
        logger.warning("%s", note)
    return {"foreign": foreign}


def _foreign_note(result: dict[str, Any]) -> str:
    return (
        f"collections not indexq's, left in {Path(result['quarantine']) / 'chroma'} with the damaged directory:"
        f" {', '.join(result['foreign'])}"
    )


def _pending_replay(config: Config) -> int | None:
    """The watermark of a restore whose replay did not finish, if any."""
    try:
        return int(json.loads(config.pending_replay_path.read_text())["watermark"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # unreadable: replay every committed chunk, which is always right


def _replayable(what: str) -> bool:
    """Problems a replay from the ledger repairs: the interrupted restore itself, chunks
    missing or unknown, chunks whose stored text or vector differs from the ledger's."""
    return what == INTERRUPTED_RESTORE or any(w in what for w in ("missing", "does not know", "differ"))


def _replayed(config: Config) -> None:
    config.pending_replay_path.unlink(missing_ok=True)
    fsync_dir(config.home)


def _rebuild_on_server(config: Config, ledger: Ledger, step: dict[str, Any]) -> dict[str, Any]:
    """Drop the damaged collections on the server and rebuild them (from a backup's ledger, then the live one)."""
    from pipeline.store import Store

    watermark = None
    names = step.get("damaged") or []
    if step["action"] == RESTORE or not names:
        # Unreadable as a whole (or a restore asked for): every collection.
        names = ledger.collections()
    store = Store.open(config)
    try:
        for name in names:
            store.drop(name)
        if step["action"] == RESTORE:
            backup = next(b for b in list_backups(config) if b["name"] == step["backup"])
            # Opening a ledger may write to it: read a copy, never the backup itself.
            copy = config.home / f".restore-ledger-{uuid.uuid4().hex[:8]}.db"
            shutil.copy2(Path(backup["path"]) / "ledger.db", copy)
            snapshot = Ledger(copy)
            try:
                for name in names:
                    rows = snapshot.committed(name)
                    while batch := list(itertools.islice(rows, config.commit_batch)):
                        store.upsert_rows(name, batch)
            finally:
                snapshot.close()
                for leftover in config.home.glob(copy.name + "*"):
                    leftover.unlink()
            watermark = backup["watermark"]
        result = _replay(config, ledger, store, watermark)
    finally:
        store.close()
    return {"dropped": names, **result}


def replay(config: Config, ledger: Ledger, watermark: int | None = None) -> dict[str, Any]:
    """Make Chroma hold exactly the ledger's committed set, from stored embeddings."""
    from pipeline.store import Store

    store = Store.open(config)
    try:
        return _replay(config, ledger, store, watermark)
    finally:
        store.close()


def _replay(config: Config, ledger: Ledger, store: Any, watermark: int | None) -> dict[str, Any]:
    replayed = deleted = 0
    step = config.commit_batch
    for collection in ledger.collections():
        states = ledger.ids_by_state(collection)
        have = store.ids(collection)
        todo = {i for i, s in states.items() if s == COMMITTED and i not in have}
        if watermark is not None:
            todo |= {r.id for r in ledger.committed_after(collection, watermark)}
        for part in batched(sorted(todo), step):
            rows = ledger.rows(collection, part)
            if rows:
                store.upsert_rows(collection, rows)
                replayed += len(rows)
            fault_point("replay-batch")
        # Ids the ledger does not know, and failed chunks but those whose own text is the one
        # committed (they failed on new metadata) and, after a restore, in the backup: a
        # backup from before a chunk's edit failed holds its older text.
        failed = {i for i in have if states.get(i) == FAILED}
        kept = ledger.failed_on_committed_text(collection, watermark) if failed else set()
        gone = (have - set(states)) | (failed - kept)
        for part in batched(sorted(gone), step):
            store.delete(collection, part)
            deleted += len(part)
    logger.info("replayed %d chunks from the ledger, deleted %d unknown or failed ones", replayed, deleted)
    return {"replayed": replayed, "deleted": deleted, "watermark": watermark}


def _rebuild_fts(chroma: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(str(chroma / "chroma.sqlite3"), timeout=30)
    try:
        with conn:
            conn.execute("INSERT INTO embedding_fulltext_search(embedding_fulltext_search) VALUES ('rebuild')")
    finally:
        conn.close()


def _quarantine(config: Config, reason: str) -> Path:
    """Move the damaged directory aside, never delete it."""
    target = config.quarantine_path / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while target.exists():
        target = target.with_name(target.name + "-1")
    target.mkdir(parents=True, mode=0o700)
    # The reason first: the rename then is the last write, and needs no space.
    write_json_atomic(target / "reason.json", {"time": time.time(), "reason": reason})
    if config.chroma_dir.exists():
        os.rename(config.chroma_dir, target / "chroma")
    fsync_dir(config.home)
    logger.warning("quarantined the damaged Chroma directory in %s", target)
    return target


def _stage(config: Config, source: Path) -> Path:
    """Copy a backup's Chroma directory under a hidden name in the home, fsynced; removed if it fails.

    Hidden (``.chroma.staging-*``) while nothing has moved; named ``chroma.restoring-*``
    by ``_restore`` once the damaged directory is in quarantine.
    """
    staging = config.home / f".chroma.staging-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _restore(config: Config, staging: Path, quarantined: Path) -> None:
    """Rename the staged copy into place, fsync the parent."""
    restoring = config.home / staging.name.replace(".chroma.staging-", "chroma.restoring-")
    os.rename(staging, restoring)
    staging = restoring
    fault_point("restore-copied")
    if config.chroma_dir.exists():
        # Something recreated the directory meanwhile: keep it beside the damaged one.
        os.rename(config.chroma_dir, quarantined / f"chroma-recreated-{uuid.uuid4().hex[:6]}")
    os.rename(staging, config.chroma_dir)
    fsync_dir(config.home)


def _new_generation(config: Config) -> None:
    tmp = config.generation_path.with_name(".chroma.generation.tmp")
    tmp.write_text(uuid.uuid4().hex)
    os.rename(tmp, config.generation_path)
    fsync_dir(config.home)


def _clean_leftovers(config: Config) -> None:
    for pattern in (".chroma.staging-*", "chroma.restoring-*"):
        for path in config.home.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
