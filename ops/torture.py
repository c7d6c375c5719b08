"""Torture test: one job run clean and run under kill -9, compared by an independent reader.

    python -m ops.torture --kills 200 --embedder hash:384
    bash ops/torture --kills 20          # sets up .venv first

The clean run indexes a corpus with one writer and nothing else. The tortured run
indexes the same tree, at the same path, into another data home, with the writer, the
maintenance consumer (backups, checks and requeues every few seconds), producers that
also re-submit, edit and truncate parts of the tree (and put them back), and operator
restores (`indexq recover --from BACKUP`); N times it picks one of them and SIGKILLs
its process group at a random moment, often right after it was seen making progress,
then restarts it as a user would. Then everything is let finish, stopped cleanly and
checked (`indexq check --deep`), and a separate Python process that uses nothing but
chromadb reads both collections: lost, extra and wrong records, and the chunks the
tortured writer embedded more than once (the bound: one micro-batch per writer kill).
Exit 0: equal. Exit 1: any difference, loss, failed check or broken bound. Exit 2:
the harness itself failed (a stage timed out, bad usage); its work folder is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import psutil

from pipeline.config import DEFAULT_MICRO_BATCH

DEFAULT_KILLS = 50
DEFAULT_EMBEDDER = "hash:384"
DEFAULT_FILES = 60
DEFAULT_SEED = 1
DEFAULT_TIMEOUT = 3600.0
COLLECTION = "torture"
# Largest difference between two copies of one embedding that still counts as equal.
ATOL = 1e-5
# Share of the kills each victim gets (every victim gets at least one).
VICTIMS = {"writer": 0.35, "producer": 0.3, "maintenance": 0.23, "recovery": 0.12}
# Maintenance of the tortured run: due every few seconds, so that every restart of the
# consumer (which runs what is due at once) backs up, checks or requeues.
MAINTENANCE_ENV = {
    "INDEXQ_BACKUP_INTERVAL": "10s",
    "INDEXQ_QUICK_CHECK_INTERVAL": "5s",
    "INDEXQ_DEEP_CHECK_INTERVAL": "20s",
    "INDEXQ_REQUEUE_INTERVAL": "15s",
    "INDEXQ_RETENTION": "60s",
}
# Longest random wait before a kill (s): about one round of the victim's work here.
MAX_DELAY = {"writer": 3.0, "producer": 3.0, "maintenance": 10.0, "recovery": 12.0}
# Longest wait for a sign of progress to aim a kill at (s); the kill lands anyway after it.
SIGN_TIMEOUT = 15.0
# Longest wait after that sign (s): within the commit, the probe, the restore it announced.
AFTER_SIGN = {"writer": 0.1, "producer": 0.5, "maintenance": 2.0, "recovery": 1.0}
# A process start (imports, model) and one stage of the ending (s).
START_TIMEOUT = 180.0
STAGE_TIMEOUT = 900.0
# Files of the default corpus: Python sources from the standard library, none huge.
MAX_FILE_BYTES = 120_000
OUTSTANDING = ("pending", "embedded", "deleting")
# Lines that say a process is ready (the writer's and the maintenance consumer's logs).
WRITER_READY = "tasks requeued from the ledger"
MAINTENANCE_READY = "maintenance consumer pid"
TICK_START = "Executing tasks.maintenance.maintain"
TICK_DONE = " executed in "
TICK_FAILED = "Unhandled exception in task"

# The independent reader: chromadb only, in a fresh interpreter (-I: no PYTHONPATH, no
# indexq). Writes ids, documents, metadata and count as JSON, embeddings as .npy.
READER = r"""
import json, sys
import numpy as np
import chromadb
path, name, out = sys.argv[1:4]
client = chromadb.PersistentClient(path=path, settings=chromadb.Settings(anonymized_telemetry=False))
try:
    col = client.get_collection(name, embedding_function=None)
except Exception as exc:
    sys.exit(f"no collection {name!r} in {path}: {exc}")
count = col.count()
ids, docs, metas, embs = [], [], [], []
while True:
    page = col.get(include=["documents", "metadatas", "embeddings"], limit=500, offset=len(ids))
    if not page["ids"]:
        break
    ids += page["ids"]
    docs += page["documents"]
    metas += [dict(m or {}) for m in page["metadatas"]]
    embs += [np.asarray(e, dtype=np.float32) for e in page["embeddings"]]
with open(out + ".json", "w") as f:
    json.dump({"count": count, "ids": ids, "documents": docs, "metadatas": metas}, f)
np.save(out + ".npy", np.stack(embs) if embs else np.zeros((0, 0), np.float32))
"""


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


# ---- the corpus and what producers submit ------------------------------------------


def copy_stdlib(target: Path, files: int) -> None:
    """A fixed sample of the standard library's Python sources, with their folders."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}
    found = sorted(
        p for p in stdlib.rglob("*.py")
        if not skip & set(p.relative_to(stdlib).parts) and 0 < p.stat().st_size <= MAX_FILE_BYTES
    )  # fmt: skip
    random.Random(0).shuffle(found)
    for path in sorted(found[:files]):
        dest = target / path.relative_to(stdlib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


@dataclasses.dataclass
class Submission:
    """One producer command: ``kind`` is tree, part, edit, truncate or restore."""

    kind: str
    paths: list[Path]

    def label(self, root: Path) -> str:
        return f"{self.kind} " + " ".join(str(p.relative_to(root)) or "." for p in self.paths)


class Corpus:
    """The tree both runs index, and the changes the tortured run makes to it and undoes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = sorted(p for p in root.rglob("*") if p.is_file())
        self.dirs = sorted({p.parent for p in self.files if p.parent != root})
        self.originals: dict[Path, bytes] = {}

    def text_lines(self, path: Path) -> list[str] | None:
        try:
            return path.read_bytes().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            return None

    def mutate(self, kind: str, rng: random.Random) -> Submission | None:
        """Edit one line, or cut a file in half, keeping the original to restore."""
        choices = [p for p in self.files if p not in self.originals]
        rng.shuffle(choices)
        for path in choices[:20]:
            lines = self.text_lines(path)
            if not lines or len(lines) < 8:
                continue
            self.originals[path] = path.read_bytes()
            if kind == "edit":
                # Same number of lines: the chunks of the file change, no line moves.
                lines[rng.randrange(len(lines) // 4, len(lines))] = f"# torture edit {rng.randrange(10**9)}"
            else:
                lines = [*lines[: len(lines) // 2], ""]
            path.write_bytes("\n".join(lines).encode("utf-8"))
            return Submission(kind, [path])
        return None

    def restore(self, path: Path) -> None:
        if path in self.originals:
            path.write_bytes(self.originals.pop(path))

    def part(self, rng: random.Random) -> Submission:
        if self.dirs and rng.random() < 0.5:
            return Submission("part", [rng.choice(self.dirs)])
        return Submission("part", sorted(rng.sample(self.files, min(len(self.files), rng.randint(1, 3)))))


# ---- the runs ----------------------------------------------------------------------


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


def clean_run(s: Settings) -> tuple[Home, dict[str, Any]]:
    """One writer, one submission of the whole tree, nothing else."""
    home = Home("clean", s)
    try:
        writer = home.start_writer()
        wait_until(lambda: ready(writer, WRITER_READY) or not writer.alive(), home.timeout(START_TIMEOUT), "the writer")
        if not writer.alive():
            raise HarnessError(f"the clean run's writer exited {writer.popen.returncode}: {writer.output()[-500:]}")
        producer = home.submit(Submission("tree", [s.corpus]))
        rc = producer.wait(home.timeout(), "the clean run's producer")
        if rc != 0:
            raise HarnessError(f"the clean run's producer exited {rc}: {producer.output().strip()[-500:]}")
        home.drain("the clean run's writer to commit every chunk")
        rc = writer.stop()
        if rc != 0:
            raise HarnessError(f"the clean run's writer exited {rc} on SIGTERM; see {writer.log}")
        return home, home.status()
    finally:
        home.close()


class Torture:
    """The tortured run: every kill and restart, and the ending."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.rng = random.Random(s.seed)
        self.home = Home("tortured", s, MAINTENANCE_ENV)
        self.corpus = Corpus(s.corpus)
        self.kills: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.producer: tuple[Child, Submission] | None = None
        self.owed: deque[Submission] = deque()
        self.recovery: tuple[Child, str | None] | None = None
        self.done: Counter[str] = Counter()

    # -- victims --

    def plan(self) -> list[str]:
        names = list(VICTIMS)
        counts = {v: max(1, int(self.s.kills * w)) for v, w in VICTIMS.items()} if self.s.kills >= len(names) else {}
        victims = [v for v, n in counts.items() for _ in range(n)]
        while len(victims) < self.s.kills:
            victims.append(self.rng.choices(names, weights=list(VICTIMS.values()))[0])
        victims = victims[: self.s.kills]
        self.rng.shuffle(victims)
        return victims

    def newest_verified(self) -> str | None:
        backups = self.home.path / "backups"
        names = (
            sorted(p.name for p in backups.glob("[0-9]*") if (p / "verification.json").exists())
            if backups.exists()
            else []
        )
        for name in reversed(names):
            with contextlib.suppress(OSError, ValueError):
                if json.loads((backups / name / "verification.json").read_text()).get("verified"):
                    return name
        return None

    def generation(self) -> str | None:
        with contextlib.suppress(OSError):
            return (self.home.path / "chroma.generation").read_text()
        return None

    def victim(self, name: str) -> Child | None:
        """The running process of that kind, started if none runs (None: cannot start now)."""
        if name == "writer":
            return self.home.writer if self.home.writer and self.home.writer.alive() else self.home.start_writer()
        if name == "maintenance":
            m = self.home.maintenance
            return m if m and m.alive() else self.home.start_maintenance()
        if name == "producer":
            self.reap()
            if self.producer is None:
                self.start_producer(self.next_submission())
            return self.producer[0] if self.producer else None
        backup = self.newest_verified()
        if backup is None:
            return None
        self.recovery = (self.home.spawn("recovery", "recover", "--from", backup, "--json"), self.generation())
        return self.recovery[0]

    def next_submission(self) -> Submission:
        if self.owed and self.rng.random() < 0.6:
            return self.owed.popleft()
        idle = self.home.ledger.outstanding() == 0
        kind = self.rng.choices(["part", "edit", "truncate", "tree"], weights=[2, 3, 2, 1] if idle else [4, 2, 1, 1])[0]
        if kind in ("edit", "truncate") and (sub := self.corpus.mutate(kind, self.rng)):
            for path in sub.paths:
                self.owed.append(Submission("restore", [path]))
            return sub
        return Submission("tree", [self.s.corpus]) if kind == "tree" else self.corpus.part(self.rng)

    def start_producer(self, sub: Submission) -> None:
        if sub.kind == "restore":
            for path in sub.paths:
                self.corpus.restore(path)
        self.producer = (self.home.submit(sub), sub)

    def reap(self) -> None:
        """Note a producer that ended on its own; one that failed is owed a re-run."""
        if self.producer and not self.producer[0].alive():
            proc, sub = self.producer
            self.producer = None
            self.done[f"{sub.kind} submissions"] += 1
            if proc.popen.returncode != 0:
                self.problems.append(f"producer exited {proc.popen.returncode}: {proc.output().strip()[-300:]}")
                if sub.kind not in ("edit", "truncate"):
                    self.owed.append(sub)
        if self.recovery and not self.recovery[0].alive():
            proc = self.recovery[0]
            self.recovery = None
            rc = proc.popen.returncode
            self.done["restores finished"] += 1
            # 4: busy (the commit lock stayed taken), not a failure.
            if rc not in (0, 4):
                self.problems.append(f"indexq recover exited {rc}: {proc.output().strip()[-300:]}")

    # -- moments --

    def aim(self, name: str, proc: Child) -> str:
        """Wait for a moment to kill at: a random delay, or just after a sign of progress."""
        strategy = self.rng.choice(["delay", "sign"])
        if strategy == "delay":
            end = time.monotonic() + self.rng.uniform(0, MAX_DELAY[name])
            while time.monotonic() < end and proc.alive():
                time.sleep(0.01)
            return strategy
        sign = self.sign(name, proc)
        deadline = time.monotonic() + SIGN_TIMEOUT
        while proc.alive() and time.monotonic() < deadline and not sign():
            time.sleep(0.01)
        time.sleep(self.rng.uniform(0, AFTER_SIGN[name]))
        return strategy

    def sign(self, name: str, proc: Child) -> Callable[[], bool]:
        ledger, home = self.home.ledger, self.home.path
        if name == "writer":
            before = ledger.counters()
            return lambda: ready(proc, WRITER_READY) and ledger.counters() != before
        if name == "producer":
            return lambda: ledger.job_state(proc.pid) is not None
        if name == "maintenance":
            backups = set(p.name for p in (home / "backups").glob("*")) if (home / "backups").exists() else set()
            return lambda: bool(proc.probe_cmdlines() or set(p.name for p in (home / "backups").glob("*")) - backups)
        generation = self.generation()
        return lambda: bool(list(home.glob("chroma.restoring-*"))) or self.generation() != generation

    def phase(self, name: str, proc: Child) -> str:
        """What the victim was seen doing at the kill."""
        home = self.home.path
        if name == "writer":
            if not ready(proc, WRITER_READY):
                return "starting"
            before = self.home.ledger.counters()
            time.sleep(0.05)
            seq, embeddings = self.home.ledger.counters()
            if seq != before[0]:
                return "committing"
            if embeddings != before[1]:
                return "embedding"
            return "waiting" if self.home.ledger.outstanding() else "idle"
        if name == "producer":
            state = self.home.ledger.job_state(proc.pid)
            return {None: "starting", "submitting": "submitting"}.get(state, "finishing")
        probes = proc.probe_cmdlines()
        checking = any(f"--chroma {home / 'chroma'} " in line + " " for line in probes)
        if name == "recovery":
            if list(home.glob("chroma.restoring-*")):
                return "restoring"
            moved = self.recovery is not None and self.generation() != self.recovery[1]
            if moved:
                return "final check" if probes else "replaying"
            return "checking" if probes else "starting"
        if not ready(proc, MAINTENANCE_READY):
            return "starting"
        if list((home / "backups").glob(".partial-*")):
            return "backup"
        if probes:
            return "check" if checking else "verifying backup"
        out = proc.output()
        return "tick" if out.rfind(TICK_START) > out.rfind(TICK_DONE) else "idle"

    # -- the run --

    def run(self) -> None:
        self.home.start_writer()
        self.home.start_maintenance()
        self.start_producer(Submission("tree", [self.s.corpus]))
        plan = self.plan()
        while plan:
            if time.monotonic() > self.s.deadline:
                raise HarnessError(f"the run's time is up after {len(self.kills)} of {self.s.kills} kills")
            self.reap()
            self.watch()
            name = plan[0]
            if name == "recovery" and self.recovery is None and self.newest_verified() is None:
                # No verified backup yet to restore: another victim first.
                if any(v != "recovery" for v in plan):
                    plan.append(plan.pop(0))
                else:
                    time.sleep(0.5)
                continue
            proc = self.recovery[0] if name == "recovery" and self.recovery else self.victim(name)
            if proc is None:
                continue
            strategy = self.aim(name, proc)
            if not proc.alive():
                continue  # it finished first (a producer, a restore): try again
            phase = self.phase(name, proc)
            proc.kill9()
            plan.pop(0)
            self.kills.append({"victim": name, "phase": phase, "aim": strategy})
            self.after_kill(name)
            click.echo(f"kill {len(self.kills)}/{self.s.kills}: {name} ({phase})", err=True)
            self.keep_busy()

    def after_kill(self, name: str) -> None:
        if name == "producer" and self.producer:
            sub = self.producer[1]
            self.producer = None
            # As a user would: run the killed command again (an edit is undone by its owed restore).
            if sub.kind not in ("edit", "truncate"):
                self.owed.append(sub)
        elif name == "recovery":
            self.recovery = None
        elif name in ("writer", "maintenance"):
            time.sleep(self.rng.uniform(0, 0.5))
            (self.home.start_writer if name == "writer" else self.home.start_maintenance)()

    def watch(self) -> None:
        """A writer or maintenance consumer that exited without being killed is a finding; restart it."""
        for role, proc, start in (
            ("writer", self.home.writer, self.home.start_writer),
            ("maintenance consumer", self.home.maintenance, self.home.start_maintenance),
        ):
            if proc is not None and not proc.alive():
                self.problems.append(f"the {role} exited {proc.popen.returncode} on its own: {proc.output()[-300:]}")
                start()

    def keep_busy(self) -> None:
        """Between kills, a producer usually runs: re-submissions, edits, owed re-runs."""
        self.reap()
        if self.producer is None and self.rng.random() < 0.7:
            self.start_producer(self.next_submission())

    def finish(self) -> dict[str, Any]:
        """Let everything finish: owed submissions, the writer's queue, one maintenance round."""
        home = self.home
        self.reap()
        if self.recovery:
            self.recovery[0].wait(home.timeout(), "a restore to finish")
        if self.producer:
            self.producer[0].wait(home.timeout(), "a producer to finish")
        self.reap()
        self.watch()
        while self.owed:
            sub = self.owed.popleft()
            self.start_producer(sub)
            assert self.producer is not None
            self.producer[0].wait(home.timeout(), f"the owed submission {sub.label(self.s.corpus)}")
            self.reap()
            self.watch()
        if self.corpus.originals:
            raise HarnessError(f"files left edited: {sorted(map(str, self.corpus.originals))}")
        home.drain("the tortured run's writer to commit every chunk")
        # A fresh maintenance consumer runs whatever is due at once: a check of the final
        # state (and recovery, had a kill left damage behind), a backup, a requeue.
        assert home.maintenance is not None
        if home.maintenance.stop() != 0:
            self.problems.append(f"the maintenance consumer did not exit 0 on SIGTERM; see {home.maintenance.log}")
        round_ = home.start_maintenance()
        wait_until(
            lambda: any(x in round_.output() for x in (TICK_DONE, TICK_FAILED)) or not round_.alive(),
            home.timeout(), "a maintenance round",
        )  # fmt: skip
        if TICK_DONE not in round_.output():
            self.problems.append(f"the last maintenance round failed; see {round_.log}")
        home.drain("the writer after the last maintenance round")
        stops = {"maintenance": round_.stop(), "writer": home.writer.stop() if home.writer else 0}
        for role, rc in stops.items():
            if rc != 0:
                self.problems.append(f"the {role} exited {rc} on SIGTERM")
        check = home.cli("check", "--deep", "--json")
        return {"exit_code": check.returncode, "healthy": check.returncode == 0, "output": check.stdout[-2000:]}


# ---- the independent reader and the comparison -------------------------------------


def chroma_dir(path: Path) -> Path:
    """A Chroma directory, or a data home's ``chroma/``."""
    return path / "chroma" if not (path / "chroma.sqlite3").exists() and (path / "chroma").is_dir() else path


def read_collection(chroma: Path, collection: str, out: Path) -> dict[str, Any]:
    """Every record of one collection, read by chromadb alone in a fresh interpreter."""
    argv = [sys.executable, "-I", "-c", READER, str(chroma), collection, str(out)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=STAGE_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"timed out after {STAGE_TIMEOUT:.0f}s reading {chroma}") from None
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:500]}
    data = dict(json.loads(Path(f"{out}.json").read_text()))
    data["embeddings"] = np.load(f"{out}.npy")
    return data


def compare(a: dict[str, Any], b: dict[str, Any], atol: float = ATOL) -> dict[str, Any]:
    """Records of ``b`` against ``a``: lost, extra and wrong ones, with a few ids of each."""
    if "error" in a or "error" in b:
        return {
            "error": "; ".join(f"{side}: {d['error']}" for side, d in (("clean", a), ("tortured", b)) if "error" in d)
        }
    index_a = {id_: i for i, id_ in enumerate(a["ids"])}
    index_b = {id_: i for i, id_ in enumerate(b["ids"])}
    found: dict[str, list[str]] = {k: [] for k in ("lost", "extra", "documents", "metadata", "embeddings")}
    found["lost"] = sorted(set(index_a) - set(index_b))
    found["extra"] = sorted(set(index_b) - set(index_a))
    for id_ in sorted(set(index_a) & set(index_b)):
        i, j = index_a[id_], index_b[id_]
        if a["documents"][i] != b["documents"][j]:
            found["documents"].append(id_)
        if a["metadatas"][i] != b["metadatas"][j]:
            found["metadata"].append(id_)
        ea, eb = a["embeddings"][i], b["embeddings"][j]
        if ea.shape != eb.shape or not np.all(np.abs(ea - eb) <= atol):
            found["embeddings"].append(id_)
    unreadable = [
        f"{side}: count() says {d['count']}, {len(d['ids'])} records read, {len(set(d['ids']))} distinct ids"
        for side, d in (("clean", a), ("tortured", b))
        if not d["count"] == len(d["ids"]) == len(set(d["ids"]))
    ]
    return {
        "clean": len(index_a),
        "tortured": len(index_b),
        "lost": len(found["lost"]),
        "extra": len(found["extra"]),
        "wrong_documents": len(found["documents"]),
        "wrong_metadata": len(found["metadata"]),
        "wrong_embeddings": len(found["embeddings"]),
        "inconsistent": unreadable,
        "examples": {k: v[:5] for k, v in found.items() if v},
        "atol": atol,
    }


def differs(comparison: dict[str, Any]) -> bool:
    keys = ("lost", "extra", "wrong_documents", "wrong_metadata", "wrong_embeddings")
    return "error" in comparison or bool(comparison["inconsistent"]) or any(comparison[k] for k in keys)


def compare_homes(clean: Path, tortured: Path, collection: str, scratch: Path) -> dict[str, Any]:
    a = read_collection(chroma_dir(clean), collection, scratch / "clean")
    b = read_collection(chroma_dir(tortured), collection, scratch / "tortured")
    return compare(a, b)


# ---- the report --------------------------------------------------------------------


def _row(name: str, value: Any) -> str:
    return f"  {name:<36} {value}"


def table(r: dict[str, Any]) -> str:
    c = r["comparison"]
    lines = [f"indexq torture test: {r.get('command', '')}"]
    if "machine" in r:
        m = r["machine"]
        lines.append(f"  {m['cores']} cores, chromadb {m['chromadb']}, python {m['python']}, embedder {r['embedder']}")
    if "error" in c:
        lines.append(_row("reading the collections", f"FAILED: {c['error']}"))
    else:
        lines += [
            _row("records, clean / tortured", f"{c['clean']} / {c['tortured']}"),
            _row("lost", c["lost"]),
            _row("extra", c["extra"]),
            _row("wrong documents", c["wrong_documents"]),
            _row("wrong metadata", c["wrong_metadata"]),
            _row(f"wrong embeddings (atol {c['atol']:g})", c["wrong_embeddings"]),
        ]
        lines += [_row("inconsistent reading", x) for x in c["inconsistent"]]
        lines += [_row(f"  e.g. {k}", ", ".join(v)) for k, v in c["examples"].items()]
    if "deep_check" in r:
        lines.append(_row("deep check of the tortured home", "healthy" if r["deep_check"]["healthy"] else
                          f"FAILED (exit {r['deep_check']['exit_code']})"))  # fmt: skip
        w = r["waste"]
        bound = f"bound {w['bound']}: {w['writer_kills']} writer kills x micro-batch {w['micro_batch']}"
        lines.append(_row("chunks embedded more than once", f"{w['embedded_more_than_once']} ({bound})"))
        lines.append(_row("embeddings, clean / tortured", f"{w['clean_embeddings']} / {w['tortured_embeddings']}"))
        by_victim = r["kills"]["by_victim"]
        lines.append(_row("kills", f"{r['kills']['total']} in {r['seconds']['torture']:.0f}s"))
        for victim, n in by_victim.items():
            phases = ", ".join(f"{p} {k}" for p, k in r["kills"]["by_phase"][victim].items())
            lines.append(_row(f"  {victim}", f"{n}: {phases}"))
        lines.append(_row("submissions finished", ", ".join(f"{k} {n}" for k, n in r["finished"].items()) or "none"))
        lines.append(_row("maintenance events", ", ".join(f"{k} {n}" for k, n in sorted(r["events"].items()))))
        lines += [_row("problem", p) for p in r["problems"]]
    lines.append(_row("result", "PASS" if r["passed"] else "FAIL"))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import platform

    import chromadb

    return {"cores": os.cpu_count(), "chromadb": chromadb.__version__, "python": platform.python_version()}


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every child is killed on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def torture(s: Settings, command: str) -> dict[str, Any]:
    started = time.monotonic()
    click.echo(f"clean run in {s.work / 'clean'}", err=True)
    clean_home, clean_status = clean_run(s)
    clean_seconds = time.monotonic() - started
    run = Torture(s)
    click.echo(f"tortured run in {s.work / 'tortured'}: {s.kills} kills", err=True)
    try:
        began = time.monotonic()
        run.run()
        torture_seconds = time.monotonic() - began
        click.echo("letting everything finish", err=True)
        check = run.finish()
    finally:
        run.home.close()
    status = run.home.status()
    comparison = compare_homes(clean_home.path, run.home.path, COLLECTION, s.work)
    writer_kills = sum(1 for k in run.kills if k["victim"] == "writer")
    waste = {
        "embedded_more_than_once": status["embedded_more_than_once"],
        "writer_kills": writer_kills,
        "micro_batch": s.micro_batch,
        "bound": writer_kills * s.micro_batch,
        "clean_embeddings": clean_status["embeddings_total"],
        "tortured_embeddings": status["embeddings_total"],
    }
    problems = list(run.problems)
    failed = status["chunks"].get("failed", 0) + clean_status["chunks"].get("failed", 0)
    if failed:
        problems.append(f"{failed} chunks failed")
    if waste["embedded_more_than_once"] > waste["bound"]:
        problems.append("more chunks embedded twice than one micro-batch per writer kill")
    by_phase: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for k in run.kills:
        by_phase[k["victim"]][k["phase"]] += 1
    report = {
        "command": command,
        "machine": machine(),
        "embedder": s.embedder,
        "seed": s.seed,
        "workdir": str(s.work),
        "comparison": comparison,
        "deep_check": check,
        "waste": waste,
        "kills": {
            "total": len(run.kills),
            "by_victim": dict(Counter(k["victim"] for k in run.kills)),
            "by_phase": {v: dict(p.most_common()) for v, p in by_phase.items()},
            "by_aim": dict(Counter(k["aim"] for k in run.kills)),
        },
        "finished": dict(run.done),
        "events": run.home.ledger.events(),
        "problems": problems,
        "seconds": {
            "clean": round(clean_seconds, 1),
            "torture": round(torture_seconds, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    report["passed"] = not differs(comparison) and check["healthy"] and not problems
    return report


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--kills", default=DEFAULT_KILLS, show_default=True, type=click.IntRange(1), help="SIGKILLs to deal.")
@click.option("--embedder", default=DEFAULT_EMBEDDER, show_default=True,
              help="Model of both runs: hash:DIM (fast, deterministic) or a sentence-transformers model.")  # fmt: skip
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder to index (copied into the work folder) [a sample of the standard library].")  # fmt: skip
@click.option("--files", default=DEFAULT_FILES, show_default=True, type=click.IntRange(1),
              help="Standard-library files in the default corpus.")  # fmt: skip
@click.option("--micro-batch", default=DEFAULT_MICRO_BATCH, show_default=True, type=click.IntRange(1),
              help="The writer's micro-batch (the re-embedding bound is one per writer kill).")  # fmt: skip
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Seed of the victims, moments and edits.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder (created; must be empty) [a new temporary folder].")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the work folder (it is always kept on a failure).")
@click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, type=click.FloatRange(60),
              help="Seconds the whole run may take before it stops with exit 2.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option(
    "--compare",
    "homes",
    nargs=2,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="CLEAN TORTURED",
    help="Only compare two data homes (or Chroma directories) already there.",
)
@click.option("--collection", default=COLLECTION, show_default=True, help="Collection --compare reads.")
def main(
    kills: int, embedder: str, corpus: Path | None, files: int, micro_batch: int, seed: int, workdir: Path | None,
    keep: bool, timeout: float, as_json: bool, homes: tuple[Path, Path] | None, collection: str,
) -> None:  # fmt: skip
    """Kill -9 the writer, producers, the maintenance consumer and restores N times at
    random moments, let everything finish, and compare with a clean run of the same job.

    \b
    Examples:
      python -m ops.torture --kills 200 --embedder hash:384
      python -m ops.torture --kills 20 --files 20 --json
      python -m ops.torture --compare ./home-a ./home-b --collection docs
    Exit 0: the collections are equal and the deep check is healthy; 1: anything lost,
    extra or different, a failed check, or more re-embedding than one micro-batch per
    writer kill; 2: the harness failed (a stage timed out); its work folder is kept.
    """
    command = " ".join(["python -m ops.torture", *sys.argv[1:]])
    if homes:
        with tempfile.TemporaryDirectory(prefix="indexq-compare-") as scratch:
            comparison = compare_homes(homes[0], homes[1], collection, Path(scratch))
        report = {"command": command, "comparison": comparison, "passed": not differs(comparison)}
        _print(report, as_json)
        sys.exit(0 if report["passed"] else 1)
    if workdir is not None:
        if workdir.exists() and any(workdir.iterdir()):
            raise click.BadParameter(f"{workdir} is not empty", param_hint="--workdir")
        workdir.mkdir(parents=True, exist_ok=True)
        work = workdir.absolute()
    else:
        work = Path(tempfile.mkdtemp(prefix="indexq-torture-"))
    settings = Settings(
        work=work, corpus=work / "corpus", kills=kills, embedder=embedder, micro_batch=micro_batch, seed=seed,
        deadline=time.monotonic() + timeout,
    )  # fmt: skip
    passed = False
    try:
        with terminate_as_exit():
            if corpus is not None:
                shutil.copytree(corpus, settings.corpus, symlinks=True)
            else:
                copy_stdlib(settings.corpus, files)
            report = torture(settings, command)
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        passed = bool(report["passed"])
        _print(report, as_json)
    except KeyboardInterrupt:
        click.echo(f"interrupted; work folder kept: {work}", err=True)
        sys.exit(130)
    except HarnessError as exc:
        raise HarnessError(f"{exc.message} (work folder kept: {work})") from None
    finally:
        if passed and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif passed:
            click.echo(f"work folder kept: {work}", err=True)
    if not passed:
        click.echo(f"work folder kept: {work}", err=True)
        sys.exit(1)


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(table(report))


if __name__ == "__main__":
    main()
