"""The clean run, the tortured run (kills, restarts, the ending), and the report they make."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from typing import Any

import click

from ops.tools.torture import (
    ACTIVITY_WINDOW,
    AFTER_SIGN,
    COLLECTION,
    MAINTENANCE_ENV,
    MAINTENANCE_READY,
    MAX_DELAY,
    SIGN_TIMEOUT,
    START_TIMEOUT,
    TICK_DONE,
    TICK_FAILED,
    TICK_START,
    VICTIMS,
    WRITER_READY,
)
from ops.tools.torture.compare import compare_homes, differs
from ops.tools.torture.corpus import Corpus, Submission
from ops.tools.torture.procs import Child, HarnessError, Home, LedgerView, Settings, ready, wait_until
from ops.tools.torture.report import machine


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


class Activity:
    """When the writer's counters last moved: the commit sequence, the embeddings computed."""

    def __init__(self, ledger: LedgerView) -> None:
        self.ledger = ledger
        self.last = ledger.counters()
        self.moved = {"committing": 0.0, "embedding": 0.0}

    def poll(self) -> None:
        now = self.ledger.counters()
        for i, what in enumerate(("committing", "embedding")):
            if now[i] != self.last[i]:
                self.moved[what] = time.monotonic()
        self.last = now

    def recent(self, window: float = ACTIVITY_WINDOW) -> str | None:
        """What the writer was last seen doing, if it was within ``window`` seconds."""
        when, what = max((t, w) for w, t in self.moved.items())
        return what if time.monotonic() - when <= window else None


def ticking(maintenance: Child) -> bool:
    """The maintenance consumer is in one of its rounds."""
    out = maintenance.output()
    return out.rfind(TICK_START) > max(out.rfind(TICK_DONE), out.rfind(TICK_FAILED))


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
        self.activity = Activity(self.home.ledger)

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
            writer = self.home.writer if self.home.writer and self.home.writer.alive() else self.home.start_writer()
            if self.home.ledger.outstanding() == 0:
                # Nothing to write: make work first, so that the kill can land in an embedding or a commit.
                if self.producer:
                    self.producer[0].wait(self.home.timeout(), "a producer to finish")
                self.reap()
                self.start_producer(self.next_submission(work=True))
            return writer
        if name == "maintenance":
            m = self.home.maintenance
            if m and m.alive() and ready(m, MAINTENANCE_READY) and not ticking(m) and self.rng.random() < 0.75:
                # Between its rounds (one a minute), a fresh consumer runs whatever is due at once.
                if m.stop() != 0:
                    self.problems.append(f"the maintenance consumer exited {m.popen.returncode} on SIGTERM")
                self.done["maintenance restarts (SIGTERM)"] += 1
            m = self.home.maintenance
            return m if m and m.alive() else self.home.start_maintenance()
        if name == "producer":
            self.reap()
            if self.producer is None:
                # The whole tree is the longest submission (several ledger flushes): the best
                # chance of a kill in the middle of one.
                whole = Submission("tree", [self.s.corpus])
                self.start_producer(whole if self.rng.random() < 0.4 else self.next_submission())
            return self.producer[0] if self.producer else None
        backup = self.newest_verified()
        if backup is None:
            return None
        self.recovery = (self.home.spawn("recovery", "recover", "--from", backup, "--json"), self.generation())
        return self.recovery[0]

    def next_submission(self, work: bool = False) -> Submission:
        """An owed re-run or restore, or a re-submission, an edit or a cut; with ``work``, one that gives the
        writer something to do."""
        restores = [sub for sub in self.owed if sub.kind == "restore"]
        if work and restores:
            self.owed.remove(restores[0])
            return restores[0]
        if self.owed and not work and self.rng.random() < 0.6:
            return self.owed.popleft()
        weights = [0, 3, 2, 0] if work else [4, 2, 1, 1]
        kind = self.rng.choices(["part", "edit", "truncate", "tree"], weights=weights)[0]
        if kind in ("edit", "truncate") and (sub := self.corpus.mutate(kind, self.rng)):
            self.owed.append(Submission("restore", sub.paths))
            return sub
        return Submission("tree", [self.s.corpus]) if kind == "tree" else self.corpus.part(self.rng)

    def start_producer(self, sub: Submission) -> None:
        if sub.kind == "restore":
            self.corpus.restore(sub.paths)
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
        """Wait for a moment to kill at: a random delay, or just after a sign of progress.

        The writer's random delay starts once it has work, and its counters are followed
        all along, to tell a kill in a commit from one in an embedding.
        """
        strategy = self.rng.choice(["delay", "sign"])
        self.activity = Activity(self.home.ledger)
        if strategy == "delay":
            if name == "writer":
                self.wait(proc, lambda: self.home.ledger.outstanding() > 0, SIGN_TIMEOUT)
            self.wait(proc, lambda: False, self.rng.uniform(0, MAX_DELAY[name]))
        else:
            self.wait(proc, self.sign(name, proc), SIGN_TIMEOUT)
            self.wait(proc, lambda: False, self.rng.uniform(0, AFTER_SIGN[name]))
        return strategy

    def wait(self, proc: Child, until: Callable[[], bool], seconds: float) -> None:
        end = time.monotonic() + seconds
        while proc.alive() and time.monotonic() < end:
            self.activity.poll()
            if until():
                return
            time.sleep(0.01)

    def sign(self, name: str, proc: Child) -> Callable[[], bool]:
        ledger, home = self.home.ledger, self.home.path
        if name == "writer":
            return lambda: ready(proc, WRITER_READY) and self.activity.recent() is not None
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
            self.activity.poll()
            return self.activity.recent() or ("waiting" if self.home.ledger.outstanding() else "idle")
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
        return "tick" if ticking(proc) else "idle"

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
            self.kills.append({"victim": name, "phase": phase, "aim": strategy, "time": round(time.time(), 2)})
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
            "each": run.kills,
        },
        "finished": dict(run.done),
        "events": run.home.ledger.events(),
        "damage_repaired": run.home.ledger.damage(),
        "problems": problems,
        "seconds": {
            "clean": round(clean_seconds, 1),
            "torture": round(torture_seconds, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    report["passed"] = not differs(comparison) and check["healthy"] and not problems
    return report
