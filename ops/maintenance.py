"""What the maintenance consumer does, also callable one at a time from the CLI.

``tick`` runs whatever is due, judged from what the ledger recorded, so a maintenance
consumer that crashed or was restarted catches up on a missed backup at once instead
of waiting a whole interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ops import alerts
from ops.backup import create_backup, newest_verified, prune
from ops.integrity import Report, check_home
from pipeline.config import Config
from pipeline.errors import BusyError, IndexqError, NotFoundError, UnreachableError
from pipeline.ledger import Ledger
from pipeline.locks import CommitLock

logger = logging.getLogger(__name__)

# Wait after a failed backup before trying again (a broken directory or a full disk
# would otherwise be hit with a full copy every minute).
BACKUP_RETRY = 3600.0


def require_home(config: Config) -> None:
    if not config.ledger_path.exists():
        raise NotFoundError(f"no indexq data home at {config.home}", hint="set --home or INDEXQ_HOME")


def run_check(config: Config, deep: bool = False) -> Report:
    """Check under the commit lock; records the result. Raises BusyError, never calls busy damage."""
    require_home(config)
    lock = CommitLock(config.commit_lock_path)
    try:
        with lock.held(timeout=config.lock_timeout):
            paused = time.monotonic()
            report = check_home(config, deep=deep)
            report.pause_seconds = time.monotonic() - paused
    finally:
        lock.close()
    ledger = Ledger(config.ledger_path)
    try:
        kind = "deep" if deep else "quick"
        if report.healthy:
            summary = f"{kind} check healthy ({report.seconds:.1f}s)"
        else:
            summary = f"{kind} check found damage: " + "; ".join(str(p) for p in report.problems[:3])
        ledger.add_event("check", report.healthy, summary, {"deep": deep, **report.as_dict()})
        if not report.healthy:
            alerts.raise_alert(config, ledger, summary)
    finally:
        ledger.close()
    return report


def backup_and_prune(config: Config) -> dict[str, Any]:
    backup = create_backup(config)
    backup["pruned"] = prune(config)
    return backup


def _last(ledger: Ledger, kind: str, deep: bool | None = None, horizon: float = 0.0) -> float:
    """When the last event of a kind happened (0 if never); a deep check counts as a quick one."""
    if deep is None:
        event = ledger.last_event(kind)
        return float(event["time"]) if event else 0.0
    for event in ledger.events(kind, horizon):
        if bool(event["detail"].get("deep")) == deep or (not deep and event["detail"].get("deep")):
            return float(event["time"])
    return 0.0


def tick(config: Config, now: float | None = None) -> list[str]:
    """Run every maintenance job that is due; returns what ran."""
    from pipeline.api import resume
    from workers.queue import WriterHuey

    now = time.time() if now is None else now
    ran: list[str] = []
    ledger = Ledger(config.ledger_path)
    try:
        newest = newest_verified(config)
        # Events older than twice the longest interval cannot make anything not due.
        horizon = now - 2 * max(config.deep_check_interval, config.quick_check_interval)
        last_deep = _last(ledger, "check", deep=True, horizon=horizon)
        last_quick = _last(ledger, "check", deep=False, horizon=horizon)
        last_requeue = _last(ledger, "requeue")
        failed = ledger.last_event("backup", ok=False)
        last_failure = float(failed["time"]) if failed else 0.0
    finally:
        ledger.close()
    # Due when the newest verified backup is older than the interval; after a failed
    # attempt, wait BACKUP_RETRY before the next one instead of retrying every minute.
    due = newest is None or now - newest["time"] >= config.backup_interval
    if due and now - last_failure >= min(BACKUP_RETRY, config.backup_interval):
        try:
            backup_and_prune(config)
            ran.append("backup")
        except BusyError as exc:
            logger.warning("backup postponed: %s", exc)
        except Exception as exc:  # a failed backup must not stop the checks below
            logger.exception("backup failed")
            ledger = Ledger(config.ledger_path)
            ledger.add_event("backup", False, f"backup failed: {exc}")
            alerts.raise_alert(config, ledger, f"backup failed: {exc}")
            ledger.close()
            ran.append("backup failed")
    try:
        deep = now - last_deep >= config.deep_check_interval
        if deep or now - last_quick >= config.quick_check_interval:
            report = run_check(config, deep=deep)
            ran.append("deep check" if deep else "quick check")
            if not report.healthy and config.auto_recover:
                from ops.recovery import recover

                recover(config)
                ran.append("recovery")
    except (BusyError, UnreachableError) as exc:  # neither is damage: try again next tick
        logger.warning("maintenance postponed: %s", exc)
        ran.append("busy")
    except IndexqError as exc:  # recovery failed: alerted and recorded; requeue still runs
        logger.error("maintenance: %s", exc)
        ran.append("recovery failed")
    if now - last_requeue >= config.requeue_interval:
        queue = WriterHuey(config)
        try:
            queue.ping()
        except UnreachableError as exc:
            logger.warning("requeue postponed: %s", exc)
            ran.append("requeue postponed")
            return ran
        tasks = resume(config) if not queue.pending_count() else 0
        ledger = Ledger(config.ledger_path)
        ledger.add_event("requeue", True, f"{tasks} tasks re-enqueued")
        ledger.close()
        ran.append("requeue")
    return ran
