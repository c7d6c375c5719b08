"""Shared fixtures: data homes in tmp_path, real corpora, real writer subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Three test workers share two cores: torch's OpenMP threads, one per core, spin waiting for
# a core another process holds (measured here: a quarter more CPU for the same embeddings).
# One thread in each process (this one, and every subprocess it starts) does the same work
# in less CPU, with results equal up to float rounding. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

BIN = Path(sys.executable).parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real text that exists wherever Python does: ~150 chunks, ~5 s of embedding here.
CORPUS_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
                "textwrap.py", "shlex.py", "fnmatch.py"]  # fmt: skip


# `ops/test` runs the suite on pytest-xdist workers a whole file at a time (--dist loadfile:
# module fixtures are built once), handed out in collection order (--no-loadscope-reorder).
# The longest files go first, so that none of them starts last while the other workers sit
# idle (measured with --durations on 2 cores); a file not named keeps its place after these.
# (Not --dist loadgroup to split test_recovery.py: xdist 3.8 cannot group on pytest 9.)
LONGEST_FIRST = ["test_recovery.py", "test_e2e.py", "test_scaleout.py", "test_storage.py", "test_status.py",
                 "test_sources.py", "test_torture.py", "test_bench.py", "test_metrics.py"]  # fmt: skip


# A crowded or slow machine shows up as end-to-end tests waiting out their timeouts (a writer
# holds its commits under 256 MB of free disk or over 80 % of memory in use). So the run says
# what the machine had at its start and end, and a run past its budget fails the tests it has
# not begun at once instead of waiting on each: it ends, with its report, well inside CI's limit.
SUITE_BUDGET_S = float(os.environ.get("INDEXQ_TEST_BUDGET_S", 60 * 60))
SUITE_STARTED = time.monotonic()
_STATE_AT_START = pytest.StashKey[str]()


def machine_state(where: Path) -> str:
    import psutil

    memory = psutil.virtual_memory()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{shutil.disk_usage(where).free / 2**30:.1f} GB free under {where}, memory {memory.percent:.0f}% in use"
        f" ({memory.available / 2**30:.1f} GB available), load {load} on {os.cpu_count()} CPUs"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STATE_AT_START] = machine_state(Path(tempfile.gettempdir()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    spent = time.monotonic() - SUITE_STARTED
    if spent > SUITE_BUDGET_S:
        pytest.fail(
            f"not run: the suite is past its budget ({spent / 60:.0f} of {SUITE_BUDGET_S / 60:.0f} minutes;"
            " INDEXQ_TEST_BUDGET_S); see the first failures and the machine's state in the summary",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    now = machine_state(Path(tempfile.gettempdir()))
    terminalreporter.write_line(f"machine at the start: {config.stash.get(_STATE_AT_START, 'not read')}")
    terminalreporter.write_line(f"machine at the end:   {now}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker: the usual order
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file stays in one piece


def copy_corpus(target: Path, files: list[str] = CORPUS_FILES) -> Path:
    for rel in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STDLIB / rel, dest)
    return target


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INDEXQ_", "CHROMADB_"))}
    env.update({"INDEXQ_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "indexq"), *args], env=env_for(home, **extra), capture_output=True, text=True, timeout=timeout
    )


class Proc:
    """A subprocess (a writer, a consumer, a server) in its own process group, its output
    appended to a log file; killed if a test forgets."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log = log
        self.handle = log.open("ab")
        self.popen = subprocess.Popen(
            argv, env=env, stdout=self.handle, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.popen.poll() is not None:
                raise AssertionError(f"{what} exited {self.popen.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def wait_started(self, timeout: float = 120) -> None:
        """Until the writer has taken its lock and requeued what the ledger owes."""
        self.wait_until(lambda: "tasks requeued from the ledger" in self.output(), "writer", timeout)

    def kill9(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self.handle.close()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the process itself; its exit code (a graceful stop is 0)."""
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the whole group, SIGKILL if it lingers."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.handle.close()

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.kill9()
        self.handle.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.cleanup()


def start_worker(procs: list[Proc], home: Path, *argv: str, **extra: str) -> Proc:
    home.mkdir(parents=True, exist_ok=True)
    command = list(argv) or [str(BIN / "indexq"), "worker"]
    log = home.parent / f"{home.name}-writer-{len(procs)}.log"
    proc = Proc(command, log, env_for(home, **extra), cwd=home.parent)
    procs.append(proc)
    return proc


def ledger_query(home: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{home / 'ledger.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_for(predicate: Any, timeout: float = 180, what: str = "condition") -> None:
    """Until ``predicate()``, asked every 0.1 s. A predicate that starts a CLI process would
    cost a second of CPU each time on a 2-core machine, taken from the writer it waits on:
    poll the ledger (``job_state``, ``ledger_query``) instead."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def job_state(home: Path, job: str) -> str:
    """The job's state as `indexq status` computes it ('running', 'done', 'failed', ...), read
    from the ledger in this process; 'missing' for a job the ledger does not hold."""
    from pipeline.ledger import Ledger

    ledger = Ledger(home / "ledger.db")
    try:
        progress = ledger.jobs.progress(job)
    finally:
        ledger.close()
    return "missing" if progress is None else progress.state


def reseal(backup: Path, **fields: object) -> None:
    """Rewrite a backup's manifest with the checksums of its files as they are now (and
    ``fields``), and its verdict with that manifest's digest: as if verified so."""
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest.update(fields)
    for rel in manifest["files"]:
        manifest["files"][rel] = hashlib.sha256((backup / rel).read_bytes()).hexdigest()
    (backup / "manifest.json").write_text(json.dumps(manifest))
    if (backup / "verification.json").exists():
        verdict = json.loads((backup / "verification.json").read_text())
        verdict["manifest_sha256"] = hashlib.sha256((backup / "manifest.json").read_bytes()).hexdigest()
        (backup / "verification.json").write_text(json.dumps(verdict))


def dump_collection(chroma: Path, name: str) -> dict[str, dict[str, Any]]:
    """Open Chroma in this process (no writer running) and read every record."""
    from chromadb.api.client import SharedSystemClient

    from pipeline.store import Store

    # Chroma caches one client per path in a process: start from what is on disk.
    SharedSystemClient.clear_system_cache()
    return Store(chroma).dump(name)
