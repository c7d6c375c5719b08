"""Subprocesses in their own process groups, data homes, and read-only looks at a ledger."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import psutil

from ops.tools.torture import COLLECTION, OUTSTANDING, STAGE_TIMEOUT
from ops.tools.torture.corpus import Submission


class HarnessError(click.ClickException):
    """The harness could not do its job (not a finding about indexq): exit 2."""

    exit_code = 2


# ---- processes ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the harness dies, so nothing outlives a killed run (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """One subprocess in its own process group, its output appended to a log."""

    def __init__(self, role: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.role, self.argv, self.log = role, argv, log
        self.offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
            self.popen = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process wrote since it started."""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def probe_cmdlines(self) -> list[str]:
        """Command lines of the Chroma probes (checks, verifications) it is running."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        lines = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                line = " ".join(child.cmdline())
                if "ops.probe" in line:
                    lines.append(line)
        return lines

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=60)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, then wait; SIGKILL and a HarnessError if it does not stop in time."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise HarnessError(
                f"the {self.role} did not stop within {timeout:.0f}s of SIGTERM; see {self.log}"
            ) from None

    def wait(self, timeout: float, what: str) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise HarnessError(f"timed out after {timeout:.0f}s: {what}; see {self.log}") from None


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


class LedgerView:
    """Read-only looks at a data home's ledger (its layout is part of indexq's interface)."""

    def __init__(self, home: Path) -> None:
        self.path = home / "ledger.db"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error:
            return []
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error:
            return []  # not created yet, or busy past the timeout: nothing seen this time
        finally:
            conn.close()

    def counters(self) -> tuple[int, int]:
        """(commit sequence number, embeddings computed): either moving is the writer working."""
        values = dict(self.query("SELECT key, CAST(value AS INTEGER) FROM meta WHERE key IN ('seq', 'embeddings')"))
        return int(values.get("seq", 0)), int(values.get("embeddings", 0))

    def states(self) -> dict[str, int]:
        return dict(self.query("SELECT state, count(*) FROM chunks WHERE collection=? GROUP BY state", COLLECTION))

    def outstanding(self) -> int:
        return sum(n for state, n in self.states().items() if state in OUTSTANDING)

    def job_state(self, pid: int) -> str | None:
        rows = self.query("SELECT state FROM jobs WHERE pid=? ORDER BY created DESC LIMIT 1", pid)
        return str(rows[0][0]) if rows else None

    def events(self) -> dict[str, int]:
        """Maintenance events: backup, check, recovery, alert, each ok or failed."""
        rows = self.query("SELECT kind, ok, count(*) FROM events GROUP BY kind, ok")
        return {f"{kind}{'' if ok else ' failed'}": n for kind, ok, n in rows}

    def damage(self) -> dict[str, int]:
        """What the checks found during the run (damage a kill left, repaired by recovery), without ids."""
        rows = self.query("SELECT summary FROM events WHERE kind='check' AND ok=0")
        return dict(Counter(re.sub(r", e\.g\. .*|\d+(\.\d+)?s\b", "", summary) for (summary,) in rows))


@dataclasses.dataclass
class Settings:
    work: Path
    corpus: Path
    kills: int
    embedder: str
    micro_batch: int
    seed: int
    deadline: float


class Home:
    """One data home and the processes that work on it."""

    def __init__(self, name: str, settings: Settings, extra_env: dict[str, str] | None = None) -> None:
        self.name, self.s = name, settings
        self.path = settings.work / name / "home"
        self.logs = settings.work / name / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ledger = LedgerView(self.path)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("INDEXQ_", "CHROMADB_"))}
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **base, "PATH": f"{bindir}{os.pathsep}{base.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "INDEXQ_HOME": str(self.path), "INDEXQ_MODEL": settings.embedder,
            "INDEXQ_MICRO_BATCH": str(settings.micro_batch), **(extra_env or {}),
        }  # fmt: skip
        self.indexq = str(Path(sys.executable).parent / "indexq")
        self.children: list[Child] = []
        self.writer: Child | None = None
        self.maintenance: Child | None = None

    def spawn(self, role: str, *args: str) -> Child:
        child = Child(role, [self.indexq, *args], self.env, self.logs / f"{role}.log")
        self.children.append(child)
        self.children = [c for c in self.children if c.alive() or c is child]
        return child

    def cli(self, *args: str, timeout: float = STAGE_TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self.indexq, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise HarnessError(f"timed out after {timeout:.0f}s: indexq {' '.join(args)} ({self.name})") from None

    def start_writer(self) -> Child:
        self.writer = self.spawn("writer", "worker")
        return self.writer

    def start_maintenance(self) -> Child:
        self.maintenance = self.spawn("maintenance", "maintenance")
        return self.maintenance

    def submit(self, sub: Submission) -> Child:
        return self.spawn("producer", "index", *map(str, sub.paths), "--collection", COLLECTION)

    def drain(self, what: str) -> None:
        """Until the ledger owes nothing to Chroma (no pending, embedded or deleting chunk)."""
        for role, proc in (("writer", self.writer), ("maintenance consumer", self.maintenance)):
            if proc is not None and not proc.alive():
                raise HarnessError(f"the {role} of the {self.name} run exited {proc.popen.returncode}; see {proc.log}")
        wait_until(lambda: self.ledger.outstanding() == 0, self.timeout(), what, poll=0.5)

    def timeout(self, stage: float = STAGE_TIMEOUT) -> float:
        return max(1.0, min(stage, self.s.deadline - time.monotonic()))

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        if result.returncode != 0:
            raise HarnessError(f"indexq status failed on the {self.name} home: {result.stderr.strip()[-300:]}")
        return dict(json.loads(result.stdout))

    def close(self) -> None:
        """Kill whatever still runs: every exit path of the harness ends here."""
        for child in self.children:
            if child.alive():
                child.kill9()


def ready(proc: Child, line: str) -> bool:
    return line in proc.output()
