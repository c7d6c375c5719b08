"""What the maintenance consumer does, also callable one at a time from the CLI.

``tick`` runs whatever is due, judged from what the ledger recorded, so a maintenance
consumer that crashed or was restarted catches up on a missed backup at once instead
of waiting a whole interval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any

from ops.backup import create_backup, newest_verified, prune
from ops.integrity import Report, check_home, nothing_written
from ops.recovery import recover
from pipeline import alerts
from pipeline.config import Config
from pipeline.errors import BusyError, IndexqError, StorageError, UnreachableError, first_line, storage_error
from pipeline.ledger import Ledger, check_ledger
from pipeline.locks import CommitLock
from pipeline.queue import QueueClient

logger = logging.getLogger(__name__)

# Wait after a failed backup before trying again (a broken directory or a full disk
# would otherwise be hit with a full copy every minute).
BACKUP_RETRY = 3600.0
# The last check's outcome is also kept in HOME/check.state, a file of this size
# rewritten in place: its blocks exist, so a disk too full to take the ledger's event
# still takes it, and status cannot go on saying "healthy" while checks cannot run.
CHECK_STATE = "check.state"
CHECK_STATE_SIZE = 4096
# When this process (a maintenance consumer) started: a check that found damage before
# it, with no recovery after, is run again by its first tick (see _due).
STARTED = time.time()


def run_check(config: Config, deep: bool = False) -> Report:
    """Check under the commit lock; records the result.

    Raises BusyError and StorageError (the disk refused a read or a write: cannot
    check), never calling either damage; a check that could not run is recorded as
    such when the ledger can still be written, so that status does not say "healthy".
    """
    config.require_home()
    kind = "deep" if deep else "quick"
    try:
        check_ledger(config.ledger_path)  # a damaged ledger is said so in one line (DamageFoundError) first
        lock = CommitLock(config.commit_lock_path)
        try:
            with lock.held(timeout=config.lock_timeout):
                paused = time.monotonic()
                report = check_home(config, deep=deep)
                report.pause_seconds = time.monotonic() - paused
        finally:
            lock.close()
    except Exception as exc:
        error = storage_error(exc, f"cannot check {config.home} (this is not damage)", config.home)
        if error is None:
            raise
        summary = f"{kind} check could not run: {error}"
        _keep_check_state(config, {"time": time.time(), "ok": False, "summary": summary, "cannot_check": True})
        record_quietly(config, "check", False, summary, {"deep": deep, "cannot_check": True, "error": str(error)})
        raise error from exc
    for note in report.notes:  # not damage, and nothing recovery could change: said, not alerted
        logger.warning("%s check: %s", kind, note)
    if report.healthy:
        summary = f"{kind} check healthy ({report.seconds:.1f}s)" + "".join(f"; note: {n}" for n in report.notes)
    else:
        summary = f"{kind} check found damage: " + "; ".join(str(p) for p in report.problems[:3])
    _keep_check_state(config, {"time": time.time(), "ok": report.healthy, "summary": summary})
    ledger = Ledger(config.ledger_path)
    try:
        ledger.events.add("check", report.healthy, summary, {"deep": deep, **report.as_dict()})
        if not report.healthy:
            alerts.raise_alert(config, ledger, summary)
    finally:
        ledger.close()
    return report


def _keep_check_state(config: Config, state: dict[str, Any]) -> None:
    """Rewrite check.state in place (best effort: a read-only home keeps what it had)."""
    state["summary"] = state["summary"][:1000]
    data = json.dumps(state).encode()[: CHECK_STATE_SIZE - 1].ljust(CHECK_STATE_SIZE - 1) + b"\n"
    try:
        fd = os.open(config.home / CHECK_STATE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < CHECK_STATE_SIZE:
                os.posix_fallocate(fd, 0, CHECK_STATE_SIZE)  # the first time, while there is room
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        logger.info("could not keep %s: %s", CHECK_STATE, exc)


def last_check(config: Config, ledger: Ledger) -> dict[str, Any] | None:
    """The newest of the ledger's last check event and check.state: time, ok, summary, cannot_check."""
    found: list[dict[str, Any]] = []
    if event := ledger.events.last("check"):
        cannot = bool((event.get("detail") or {}).get("cannot_check"))
        found.append({k: event[k] for k in ("time", "ok", "summary")} | {"cannot_check": cannot})
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):  # absent, or torn by a crash
        state = json.loads((config.home / CHECK_STATE).read_bytes())
        found.append({"time": float(state["time"]), "ok": bool(state["ok"]), "summary": str(state["summary"]),
                      "cannot_check": bool(state.get("cannot_check"))})  # fmt: skip
    return max(found, key=lambda c: c["time"]) if found else None


def record_quietly(config: Config, kind: str, ok: bool, summary: str, detail: dict[str, Any]) -> bool:
    """Record an event if the ledger can still be written (a full disk may refuse even that)."""
    try:
        ledger = Ledger(config.ledger_path)
        try:
            ledger.events.add(kind, ok, summary, detail)
        finally:
            ledger.close()
    except Exception as exc:
        if storage_error(exc) is None:
            raise
        logger.info("could not record the %s event either: %s", kind, first_line(exc))
        return False
    return True


def backup_and_prune(config: Config) -> dict[str, Any]:
    backup = create_backup(config)
    backup["pruned"] = prune(config)
    return backup


def _last(ledger: Ledger, kind: str, deep: bool | None = None, horizon: float = 0.0) -> float:
    """When the last event of a kind happened (0 if never); a deep check counts as a quick one."""
    if deep is None:
        event = ledger.events.last(kind)
        return float(event["time"]) if event else 0.0
    for event in ledger.events.since(kind, horizon):
        if bool(event["detail"].get("deep")) == deep or (not deep and event["detail"].get("deep")):
            return float(event["time"])
    return 0.0


@dataclasses.dataclass(frozen=True)
class _Due:
    """What the ledger's events say is due now."""

    backup: bool
    deep_check: bool
    quick_check: bool
    requeue: bool


def _due(config: Config, now: float, started: float = STARTED) -> _Due:
    ledger = Ledger(config.ledger_path)
    try:
        newest = newest_verified(config)
        # Events older than twice the longest interval cannot make anything not due.
        horizon = now - 2 * max(config.deep_check_interval, config.quick_check_interval)
        last_deep = _last(ledger, "check", deep=True, horizon=horizon)
        last_quick = _last(ledger, "check", deep=False, horizon=horizon)
        last_requeue = _last(ledger, "requeue")
        failed = ledger.events.last("backup", ok=False)
        last_failure = float(failed["time"]) if failed else 0.0
        unrepaired = _unrepaired(ledger, started) if config.auto_recover else None
    finally:
        ledger.close()
    # Due when the newest verified backup is older than the interval; after a failed
    # attempt, wait BACKUP_RETRY before the next one instead of retrying every minute.
    backup = newest is None or now - newest["time"] >= config.backup_interval
    if backup and not config.chroma_url and nothing_written(config.chroma_dir, config.ledger_path):
        backup = False  # a fresh home: the writer has not written anything to protect yet
    backup = backup and now - last_failure >= min(BACKUP_RETRY, config.backup_interval)
    deep = now - last_deep >= config.deep_check_interval or unrepaired is True
    quick = not deep and (now - last_quick >= config.quick_check_interval or unrepaired is False)
    return _Due(backup, deep, quick, now - last_requeue >= config.requeue_interval)


def _unrepaired(ledger: Ledger, started: float) -> bool | None:
    """Whether the last check, if it found damage before ``started`` and no recovery came
    after it, was deep (None otherwise). Its consumer was killed between the check and
    the recovery, and the check is not due again for a whole interval: the next consumer
    runs it again at once (once: its own check is after ``started``)."""
    check = ledger.events.last("check")
    if check is None or check["ok"] or check["time"] >= started or (check.get("detail") or {}).get("cannot_check"):
        return None
    recovery = ledger.events.last("recovery")
    if recovery is not None and recovery["time"] >= check["time"]:
        return None
    return bool((check.get("detail") or {}).get("deep"))


def tick(config: Config, now: float | None = None) -> list[str]:
    """Run every maintenance job that is due; returns what ran."""
    due = _due(config, time.time() if now is None else now)
    ran: list[str] = []
    if due.backup:
        ran += _backup(config)
    if due.deep_check or due.quick_check:
        ran += _check(config, deep=due.deep_check)
    if due.requeue:
        ran += _requeue(config)
    return ran


def _backup(config: Config) -> list[str]:
    """A backup and retention; a failure is recorded and alerted, and the checks still run."""
    try:
        backup_and_prune(config)
        return ["backup"]
    except BusyError as exc:
        logger.warning("backup postponed: %s", exc)
        return []
    except Exception as exc:  # a failed backup must not stop the checks
        error = storage_error(exc, "backup failed", config.backups_path)
        if error is None:
            logger.exception("backup failed")
        else:  # not enough space for one, or the disk refused: no traceback
            logger.warning("%s", error)
        summary = str(error) if error is not None else f"backup failed: {exc}"
        try:
            ledger = Ledger(config.ledger_path)
            try:
                ledger.events.add("backup", False, summary, {"storage": error is not None})
                alerts.raise_alert(config, ledger, summary)
            finally:
                ledger.close()
        except Exception as again:
            if error is None or storage_error(again) is None:
                raise
            raise error from exc  # nothing can be written: the consumer backs off
        return ["backup failed"]


def _check(config: Config, deep: bool) -> list[str]:
    """A check, and recovery if it found damage (with auto_recover)."""
    ran: list[str] = []
    try:
        report = run_check(config, deep=deep)
        ran.append("deep check" if deep else "quick check")
        if not report.healthy and config.auto_recover:
            recover(config)
            ran.append("recovery")
    except (BusyError, UnreachableError) as exc:  # neither is damage: try again next tick
        logger.warning("maintenance postponed: %s", exc)
        ran.append("busy")
    except StorageError:  # cannot check, or cannot recover: the consumer backs off, once logged
        raise
    except IndexqError as exc:  # recovery failed: alerted and recorded; requeue still runs
        logger.error("maintenance: %s", exc)
        ran.append("recovery failed")
    return ran


def _requeue(config: Config) -> list[str]:
    """Re-enqueue what the writer's queue lost (only when the queue is empty)."""
    queue = QueueClient(config)
    try:
        queue.ping()
    except UnreachableError as exc:
        logger.warning("requeue postponed: %s", exc)
        return ["requeue postponed"]
    tasks = queue.requeue() if not queue.pending_count() else 0
    ledger = Ledger(config.ledger_path)
    try:
        ledger.events.add("requeue", True, f"{tasks} tasks re-enqueued")
    finally:
        ledger.close()
    return ["requeue"]
