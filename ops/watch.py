"""``indexq status --watch``: a live view for the operator without Prometheus.

Refreshed every few seconds from the same figures as ``indexq status`` (the caller
passes the function that reads them): commit rate, queue depth, outstanding chunks,
the writer and its guard, maintenance, and the jobs. On a terminal it redraws one
view in place (rich); with stdout redirected it prints a plain snapshot per refresh,
so that a log or a pipe gets every one of them. Ctrl-C ends it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from pipeline.errors import IndexqError

JOB_COLUMNS = ("job", "collection", "state", "chunks", "committed", "pending", "failed")


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _ago(when: float | None) -> str:
    if not when:
        return "never"
    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


class View:
    """What one refresh shows: (label, text) rows and the job table, from a status dict."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None

    def rows(self, info: dict[str, Any]) -> list[tuple[str, str]]:
        rows = [("writer", _writer(info["writer"])), ("guard", _guard(info["writer"]))]
        engines = info["engines"]
        queue = f"{info['queue_depth']} tasks ({engines['queue']} {engines['queue_at']})"
        if engines["queue"] == "redis":
            queue += f", {info['intake_parts']} intake parts waiting"
        rows.append(("queue", queue))
        if info.get("producer_only"):
            return [*rows, ("jobs", "on the writer's machine: follow a job here with `indexq index --wait`")]
        chunks = info["chunks"]
        committed = chunks.get("committed", 0)
        now = time.monotonic()
        current = ""
        if self._last is not None and now > self._last[0]:
            current = f"{max(0, committed - self._last[1]) / (now - self._last[0]):.1f} chunks/s now, "
        self._last = (now, committed)
        outstanding = sum(chunks.get(state, 0) for state in ("pending", "embedded", "deleting"))
        memory, disk, check, alerts = info["memory"], info["disk"], info["last_check"], info["alerts"]
        recovery = info.get("last_recovery")
        rows += [
            ("rate", f"{current}{info['recent_rate']:.1f} chunks/s over the last minute"),
            ("last commit", _ago(info["last_commit"])),
            ("chunks", ", ".join(f"{n} {state}" for state, n in sorted(chunks.items())) or "none"),
            ("outstanding", f"{outstanding} chunks"),
            ("embeddings", f"{info['embeddings_total']} computed, "
                           f"{info['embedded_more_than_once']} chunks more than once"),
            ("memory", f"{memory['percent']:.0f} % used (threshold {memory['threshold']:g} %)"),
            ("disk", f"{disk['free_mb']} MB free (minimum {disk['min_free_mb']} MB)"),
            ("backup", _backup(info["last_backup"])),
            ("check", f"{check['summary']}, {_ago(check['time'])}" if check else "none"),
            # After a repair the last check may still be the one that found the damage.
            ("recovery", f"{recovery['summary']}, {_ago(recovery['time'])}" if recovery else "none"),
            ("alerts", f"{len(alerts)} in the last day"
                       + (f", newest {_ago(alerts[0]['time'])}: {alerts[0]['summary']}" if alerts else "")),
        ]  # fmt: skip
        return rows

    @staticmethod
    def jobs(info: dict[str, Any]) -> list[tuple[str, ...]]:
        # A producer's machine has no ledger, so no jobs (its status says where to follow them).
        jobs = info.get("jobs", [])
        return [tuple(str(job[column if column != "job" else "id"]) for column in JOB_COLUMNS) for job in jobs]


def _writer(writer: dict[str, Any]) -> str:
    if not writer["alive"]:
        return "NOT RUNNING"
    text = f"running, pid {writer.get('pid')} on {writer.get('host')} since {_clock(writer.get('since', 0))}"
    if settings := writer.get("settings"):
        text += f", model {settings['model']}"
    return text


def _guard(writer: dict[str, Any]) -> str:
    if not writer["alive"]:
        return "-"
    guard = writer.get("guard")
    if not guard:
        return "clear (commits flow)"
    return f"commits HELD BACK since {_clock(guard['since'])}: {guard['summary']}"


def _backup(backup: dict[str, Any] | None) -> str:
    if not backup:
        return "none"
    state = {True: "verified", False: "FAILED verification", None: "unverified"}[backup["verified"]]
    return f"{backup['name']}, {_ago(backup['time'])}, {state}"


def plain(view: View, info: dict[str, Any] | None, error: str | None, interval: float) -> str:
    """One snapshot as text, for a redirected stdout."""
    lines = [f"== indexq status {_clock(time.time())} (every {interval:g}s; Ctrl-C stops)"]
    if error is not None:
        return "\n".join([*lines, f"error:       {error}", ""])
    assert info is not None
    lines += [f"{label + ':':<12} {text}" for label, text in view.rows(info)]
    jobs = view.jobs(info)
    if jobs:
        # Job ids are 25 characters (UTC time to the millisecond and a random suffix).
        lines.append("{:<25} {:<20} {:<10} {:>7} {:>9} {:>7} {:>6}".format(*JOB_COLUMNS))
        lines += ["{:<25} {:<20.20} {:<10} {:>7} {:>9} {:>7} {:>6}".format(*job) for job in jobs]
    return "\n".join([*lines, ""])


def _rich(view: View, info: dict[str, Any] | None, error: str | None, interval: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    summary = Table.grid(padding=(0, 2))
    summary.title = f"indexq status {_clock(time.time())}  (every {interval:g}s; Ctrl-C stops)"
    summary.add_column(style="bold")
    summary.add_column()
    if error is not None:
        summary.add_row("error", Text(error, style="red"))
        return summary
    assert info is not None
    for label, text in view.rows(info):
        alarming = "HELD BACK" in text or "NOT RUNNING" in text or "FAILED" in text
        summary.add_row(label, Text(text, style="red" if alarming else ""))
    rows = view.jobs(info)
    if not rows:
        return summary
    jobs = Table(*JOB_COLUMNS, title="jobs", title_justify="left")
    for row in rows:
        jobs.add_row(*row)
    return Group(summary, jobs)


def _snapshot(fetch: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """The status now, or why it could not be read (shown, and tried again at the next refresh)."""
    try:
        return fetch(), None
    except IndexqError as exc:
        return None, str(exc)


def watch(fetch: Callable[[], dict[str, Any]], interval: float, out: TextIO | None = None) -> None:
    """Show ``fetch()`` every ``interval`` seconds until Ctrl-C; live on a terminal, snapshots otherwise."""
    out = out if out is not None else sys.stdout
    view = View()
    try:
        if not out.isatty():
            while True:
                text = plain(view, *_snapshot(fetch), interval) + "\n"
                try:
                    out.write(text)
                    out.flush()
                except BrokenPipeError:  # `| head`: the reader has had enough
                    raise
                except OSError as exc:  # `> /dev/full`: not the data home's disk
                    raise IndexqError(f"cannot write the output: {exc.strerror or exc}") from None
                time.sleep(interval)
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(file=out), auto_refresh=False, transient=False) as live:
            while True:
                live.update(_rich(view, *_snapshot(fetch), interval), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        return
