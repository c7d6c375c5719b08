"""Monitoring: Prometheus metrics of the writer and the maintenance consumer, the Grafana
dashboard, the alert rules, and `indexq status --watch`.

Real writer and maintenance subprocesses (``hash:384`` embedder) serve their metrics on
free ports of 127.0.0.1; the tests scrape them with urllib, parse them with
prometheus_client's own parser and compare every figure with the ledger. Every wait
has a deadline; every process is killed when a test ends.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Config, parse_metrics_port
from pipeline.embedder import HashEmbedder
from pipeline.errors import ConfigError
from pipeline.ledger import Ledger
from pipeline.locks import CommitLock
from pipeline.metrics import COMMIT_SECONDS, EMBED_SECONDS, REFUSED_PAYLOADS, Collector
from pipeline.state import WriterState
from tests.conftest import BIN, Proc, env_for, ledger_query, run_cli, start_worker, wait_for
from tests.test_status import _forged_payloads, write_records

MODEL = {"INDEXQ_MODEL": "hash:384"}
# Maintenance takes its first backup and check at start, then leaves the commit lock to
# the test: nothing else falls due while a test runs.
QUIET_MAINTENANCE = {
    **MODEL,
    "INDEXQ_QUICK_CHECK_INTERVAL": "1h",
    "INDEXQ_DEEP_CHECK_INTERVAL": "2h",
    "INDEXQ_REQUEUE_INTERVAL": "1h",
}
ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "ops" / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-rules.yml"
README = (ROOT / "README.md").read_text()

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def start_writer(procs: list[Proc], home: Path, port: int) -> Proc:
    writer = start_worker(procs, home, str(BIN / "indexq"), "worker", "--metrics-port", str(port), **MODEL)
    writer.wait_started()
    return writer


def start_maintenance(procs: list[Proc], home: Path, port: int) -> Proc:
    argv = [str(BIN / "indexq"), "maintenance", "--metrics-port", str(port)]
    proc = start_worker(procs, home, *argv, **QUIET_MAINTENANCE)
    wait_for(lambda: "maintenance consumer pid" in proc.output() or proc.popen.poll() is not None, 120, "maintenance")
    assert proc.popen.poll() is None, proc.output()[-3000:]
    return proc


def ledger_figures(home: Path) -> dict[str, Any]:
    """What the ledger says now, in the terms of the metrics."""
    one = lambda sql, *params: ledger_query(home, sql, *params)[0][0]  # noqa: E731
    return {
        "states": dict(ledger_query(home, "SELECT state, count(*) FROM chunks GROUP BY state")),
        "meta": dict(ledger_query(home, "SELECT key, CAST(value AS INTEGER) FROM meta")),
        "embeds": one("SELECT coalesce(sum(embeds), 0) FROM chunks"),
        "repeated": one("SELECT count(*) FROM chunks WHERE embeds > 1"),
        "last_commit": one("SELECT max(committed_at) FROM chunks"),
        "jobs": dict(
            ((job, collection), n)
            for job, collection, n in ledger_query(
                home,
                "SELECT c.job, j.collection, count(*) FROM chunks c JOIN jobs j ON j.id = c.job"
                " WHERE c.state IN ('pending', 'embedded', 'deleting') GROUP BY c.job",
            )
        ),
    }


def events(home: Path, kind: str) -> list[tuple[float, int, dict[str, Any]]]:
    rows = ledger_query(home, "SELECT time, ok, detail FROM events WHERE kind=? ORDER BY id", kind)
    return [(when, ok, json.loads(detail or "{}")) for when, ok, detail in rows]


def queued_tasks(home: Path) -> int:
    conn = sqlite3.connect(f"file:{home / 'queue.db'}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM task WHERE queue='indexq-writer'").fetchone()[0])
    finally:
        conn.close()


def quiet(home: Path) -> dict[str, Any]:
    """The ledger once the writer is parked (two reads 0.5 s apart agree)."""
    before = ledger_figures(home)
    deadline = time.monotonic() + 60
    while True:
        time.sleep(0.5)
        now = ledger_figures(home)
        if now == before:
            return now
        assert time.monotonic() < deadline, "the ledger did not settle"
        before = now


@pytest.fixture
def commit_lock(tmp_path: Path) -> Iterator[Any]:
    locks: list[CommitLock] = []

    def hold(home: Path) -> Any:
        # As maintenance takes it: a writer committing back to back frees the lock for well
        # under a millisecond between commits, and the waiter's claim (commit.wait) stops it
        # before its next commit (tests/test_recovery.py has the check that once timed out).
        lock = CommitLock(home / "commit.lock")
        locks.append(lock)
        return lock.held(timeout=60)

    yield hold
    for lock in locks:
        lock.close()


# ---- the writer and maintenance, scraped during a real job -----------------------------


def assert_writer_matches_ledger(samples: Samples, ledger: dict[str, Any], home: Path, collection: str) -> None:
    states, meta = ledger["states"], ledger["meta"]
    for state in ("pending", "embedded", "committed", "deleting", "failed"):
        assert value(samples, "indexq_chunks", state=state) == states.get(state, 0), state
    outstanding = sum(states.get(s, 0) for s in ("pending", "embedded", "deleting"))
    assert value(samples, "indexq_outstanding_chunks") == outstanding
    assert value(samples, "indexq_chunks_committed_total", collection=collection) == states.get("committed", 0)
    assert value(samples, "indexq_chunks_failed_total", collection=collection) == states.get("failed", 0) == 0
    # Every embedding attempt, counted before the model runs: no chunk was embedded twice here.
    embedded = value(samples, "indexq_chunks_embedded_total", collection=collection)
    assert embedded == meta[f"embedded:{collection}"] == meta["embeddings"] == ledger["embeds"]
    assert value(samples, "indexq_embeddings_total") == meta["embeddings"]
    assert value(samples, "indexq_chunks_embedded_more_than_once") == ledger["repeated"] == 0
    assert value(samples, "indexq_commits_total") == meta["seq"]
    assert value(samples, "indexq_last_commit_timestamp_seconds") == pytest.approx(ledger["last_commit"] or 0.0)
    jobs = {
        (dict(labels)["job_id"], dict(labels)["collection"]): n
        for (name, labels), n in samples.items()
        if name == "indexq_job_outstanding_chunks"
    }
    assert jobs == ledger["jobs"]


def assert_queue_depth(port: int, home: Path) -> None:
    """The queue moves on its own (the scheduler enqueues the periodic requeue, the worker
    takes it): compare a scrape with reads of the queue just before and after it that agree."""
    for _ in range(20):
        before = queued_tasks(home)
        depth = value(scrape(port), "indexq_queue_depth")
        if queued_tasks(home) == before:
            assert depth == before
            return
    raise AssertionError("the writer's queue never stood still for a scrape")


def assert_maintenance_matches_ledger(samples: Samples, home: Path) -> None:
    backups = events(home, "backup")
    assert value(samples, "indexq_backups_total", result="ok") == sum(ok for _, ok, _ in backups) >= 1
    assert value(samples, "indexq_backups_total", result="failed") == sum(not ok for _, ok, _ in backups)
    newest_ok = max(when for when, ok, detail in backups if ok and detail.get("verified"))
    assert value(samples, "indexq_backup_last_success_timestamp_seconds") == pytest.approx(newest_ok)
    assert value(samples, "indexq_backup_last_verified") == 1
    checks = events(home, "check")
    for depth in ("quick", "deep"):
        done = [(when, ok) for when, ok, detail in checks if bool(detail.get("deep")) == (depth == "deep")]
        healthy = sum(ok for _, ok in done)
        assert value(samples, "indexq_checks_total", depth=depth, result="healthy") == healthy
        assert value(samples, "indexq_checks_total", depth=depth, result="damaged") == len(done) - healthy == 0
        assert value(samples, "indexq_check_last_timestamp_seconds", depth=depth) == pytest.approx(
            max((when for when, _ in done), default=0.0)
        )
    assert checks, "maintenance runs a check at start"
    assert value(samples, "indexq_recoveries_total", result="ok") == len(events(home, "recovery")) == 0
    alerts = events(home, "alert")
    assert value(samples, "indexq_alerts_total") == len(alerts)
    assert value(samples, "indexq_alert_last_timestamp_seconds") == pytest.approx(
        max((a[0] for a in alerts), default=0)
    )


@pytest.mark.e2e
def test_scrapes_during_a_job_agree_with_the_ledger_and_survive_a_restart(
    tmp_path: Path, procs: list[Proc], commit_lock: Any
) -> None:
    home = tmp_path / "home"
    writer_port, maintenance_port = free_port(), free_port()
    writer = start_writer(procs, home, writer_port)
    maintenance = start_maintenance(procs, home, maintenance_port)
    wait_for(lambda: events(home, "backup") and events(home, "check"), 180, "maintenance's first backup and check")
    total = 3000
    result = run_cli(home, "index", "--jsonl", str(write_records(tmp_path / "r.jsonl", total)), "-c", "notes", **MODEL)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()

    committed = lambda: ledger_figures(home)["states"].get("committed", 0)  # noqa: E731
    wait_for(lambda: committed() >= 100, 120, "the first commits")
    # Park the writer at its next commit: the ledger stands still while it is compared.
    with commit_lock(home):
        ledger = quiet(home)
        during = scrape(writer_port)
        assert 0 < ledger["states"]["committed"] < total, "scraped during the job"
        assert ledger["jobs"] == {(job, "notes"): total - ledger["states"]["committed"]}
        assert_writer_matches_ledger(during, ledger, home, "notes")
        assert_queue_depth(writer_port, home)
        # One observation per commit and per micro-batch, in this writer's lifetime.
        assert value(during, "indexq_commit_duration_seconds_count") == ledger["meta"]["seq"]
        assert value(during, "indexq_embedding_duration_seconds_count") >= ledger["meta"]["embeddings"] / 32
        assert value(during, "indexq_embedding_duration_seconds_sum") > 0
        assert value(during, "indexq_writer_up") == 1
        info = {n: labels for (n, labels), _ in during.items() if n == "indexq_writer_info"}
        assert {"model": "hash:384", "device": "cpu", "dimension": "384", "queue": "sqlite"}.items() <= dict(
            info["indexq_writer_info"]
        ).items()
        assert value(during, "indexq_commits_held_back", guard="memory") == 0
        assert value(during, "indexq_commits_held_back", guard="disk") == 0
        assert "indexq_commits_held_back_since_timestamp_seconds" not in names(during)
        assert value(during, "indexq_refused_payloads_total", kind="task") == 0
        maintained = scrape(maintenance_port)
        assert value(maintained, "indexq_writer_up") == 1
        assert_maintenance_matches_ledger(maintained, home)
        # Each process serves its own figures: nothing is counted by both.
        shared = names(during) & names(maintained)
        assert {n for n in shared if n.startswith("indexq_")} == {
            "indexq_writer_up", "indexq_refused_payloads_total", "indexq_metrics_errors_total"
        }  # fmt: skip

    wait_for(lambda: committed() == total, 180, "the job to finish")
    after = scrape(writer_port)
    assert_writer_matches_ledger(after, quiet(home), home, "notes")
    assert_queue_depth(writer_port, home)
    assert "indexq_job_outstanding_chunks" not in names(after)

    # Killed and started again: the ledger's figures are the same, the process's start over.
    writer.kill9()
    wait_for(lambda: value(scrape(maintenance_port), "indexq_writer_up") == 0, 30, "maintenance to see the writer gone")
    writer = start_writer(procs, home, writer_port)
    restarted = scrape(writer_port)
    assert_writer_matches_ledger(restarted, quiet(home), home, "notes")
    assert_queue_depth(writer_port, home)
    assert value(restarted, "indexq_chunks_committed_total", collection="notes") == total
    assert value(restarted, "indexq_commit_duration_seconds_count") == 0
    assert value(scrape(maintenance_port), "indexq_writer_up") == 1

    # Refused payloads: counted one by one by the writer, one alert (a minute apart) in the ledger.
    conn = sqlite3.connect(home / "queue.db", timeout=30)
    try:
        with conn:
            for payload in _forged_payloads():
                conn.execute("INSERT INTO task (queue, data, priority) VALUES ('indexq-writer', ?, 0)", (payload,))
    finally:
        conn.close()
    refusals = lambda: writer.output().count("ERROR pipeline.serializer: refused a queue payload")  # noqa: E731
    wait_for(lambda: refusals() == 2, 60, "the refusals")
    assert value(scrape(writer_port), "indexq_refused_payloads_total", kind="task") == 2
    maintained = scrape(maintenance_port)
    assert value(maintained, "indexq_alerts_total") == len(events(home, "alert")) == 1
    assert_maintenance_matches_ledger(maintained, home)

    assert writer.terminate() == 0
    assert maintenance.terminate() == 0


# ---- settings and refusals ------------------------------------------------------------


def test_metrics_port_settings() -> None:
    assert parse_metrics_port("INDEXQ_METRICS_PORT", "9464") == ("127.0.0.1", 9464)
    assert parse_metrics_port("INDEXQ_METRICS_PORT", " 0.0.0.0:9464 ") == ("0.0.0.0", 9464)
    assert parse_metrics_port("INDEXQ_METRICS_PORT", "[::1]:9464") == ("::1", 9464)
    assert parse_metrics_port("INDEXQ_METRICS_PORT", "") is None
    for bad in ("abc", "0", "65536", "host:", "9464:x", "-1"):
        with pytest.raises(ConfigError, match=r"^INDEXQ_METRICS_PORT must be a port \(1-65535\) or ADDRESS:PORT, "):
            parse_metrics_port("INDEXQ_METRICS_PORT", bad)
    for bad in ("::1", "::9464", "fe80::1:9464"):  # was the address ":" (or "fe80:") and a port
        with pytest.raises(ConfigError, match=r"^INDEXQ_METRICS_PORT: an IPv6 address goes in brackets, as in \[::1\]"):
            parse_metrics_port("INDEXQ_METRICS_PORT", bad)
    config = Config.from_env({"INDEXQ_METRICS_PORT": "10.1.2.3:9100"})
    assert (config.metrics_addr, config.metrics_port) == ("10.1.2.3", 9100)
    assert Config.from_env({}).metrics_port is None  # off unless set
    with pytest.raises(ConfigError, match="metrics port must be between 1 and 65535, got 0"):
        Config(metrics_port=0)


def test_a_bad_metrics_port_is_refused_naming_the_setting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    flag = run_cli(home, "worker", "--metrics-port", "abc", **MODEL)
    assert (flag.returncode, flag.stdout) == (2, "")
    hint = "Hint: for example 9464 (at 127.0.0.1), 0.0.0.0:9464 or [::1]:9464; unset, no metrics are served\n"
    assert flag.stderr == "Error: --metrics-port must be a port (1-65535) or ADDRESS:PORT, got 'abc'\n" + hint
    env = run_cli(home, "maintenance", **MODEL, INDEXQ_METRICS_PORT="70000")
    assert (env.returncode, env.stderr) == (2, "Error: INDEXQ_METRICS_PORT must be a port (1-65535) or ADDRESS:PORT,"
                                            " got '70000'\n" + hint)  # fmt: skip
    consumer = subprocess.run(
        [str(BIN / "huey_consumer"), "workers.writer.huey", "-w", "1", "-k", "thread"],
        env=env_for(home, **MODEL, INDEXQ_METRICS_PORT="nine"), capture_output=True, text=True, timeout=120,
        cwd=str(tmp_path),
    )  # fmt: skip
    assert consumer.returncode == 2, consumer.stderr
    assert "Error: INDEXQ_METRICS_PORT must be a port (1-65535) or ADDRESS:PORT, got 'nine'\n" in consumer.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["worker", "maintenance"])
def test_a_metrics_port_in_use_stops_the_start_with_exit_2(tmp_path: Path, command: str) -> None:
    home = tmp_path / "home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(home, command, "--metrics-port", str(port), **QUIET_MAINTENANCE)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert errors == [
        f"Error: cannot serve metrics on 127.0.0.1:{port} (--metrics-port, INDEXQ_METRICS_PORT):"
        " Address already in use",
        "Hint: another process listens there, or the address is not this machine's: choose another"
        " --metrics-port, or leave it unset",
    ]
    assert "Traceback" not in result.stderr
    # Nothing held: the same command starts at once on a free port (here: no port at all).
    lock = home / ("writer.lock" if command == "worker" else "maintenance.lock")
    assert not lock.exists() or lock.read_text() == ""


# ---- figures computed in the process, from a ledger made here -------------------------


def _home_with_work(tmp_path: Path) -> tuple[Config, Ledger]:
    config = Config(home=tmp_path / "home", model="hash:8")
    config.ensure_home()
    ledger = Ledger(config.ledger_path)
    job = ledger.jobs.create("docs", "records", ["test"])
    rows = [
        {"id": f"c{i}", "source": "test", "ordinal": i, "text": f"text {i}", "metadata": "{}", "hash": f"h{i}",
         "state": "pending", "embedding": None, "model": None}
        for i in range(5)
    ]  # fmt: skip
    ledger.sources.write(job, "docs", rows, [r["id"] for r in rows], [])
    ledger.begin_embedding("docs", ["c0", "c1", "c2", "c3"])
    ledger.begin_embedding("docs", ["c0"])  # resumed after a kill: c0 embedded twice
    ledger.store_embeddings("docs", [(f"c{i}", f"h{i}", b"\0" * 32) for i in range(4)], "hash:8")
    ledger.checkpoint("docs", [("c0", "h0", None), ("c1", "h1", None)])
    ledger.fail("docs", [("c2", "h2", "refused by Chroma")])
    return config, ledger


def _collect(collector: Collector) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


def test_writer_figures_from_the_ledger_and_the_process(tmp_path: Path) -> None:
    config, ledger = _home_with_work(tmp_path)
    state = WriterState(config)
    state.state["guard"] = {"guard": "disk", "value": 10.0, "limit": 256.0, "since": 1234.5, "summary": "disk"}
    samples = _collect(Collector(config, "writer", state, HashEmbedder("hash:8"), queue_depth=lambda: 7))
    assert value(samples, "indexq_chunks_committed_total", collection="docs") == 2
    assert value(samples, "indexq_chunks_failed_total", collection="docs") == 1
    assert value(samples, "indexq_chunks_embedded_total", collection="docs") == 5
    assert value(samples, "indexq_embeddings_total") == 5
    assert value(samples, "indexq_chunks_embedded_more_than_once") == 1
    assert value(samples, "indexq_commits_total") == 1
    assert value(samples, "indexq_chunks", state="pending") == 1
    assert value(samples, "indexq_chunks", state="embedded") == 1
    assert value(samples, "indexq_outstanding_chunks") == 2
    assert value(samples, "indexq_queue_depth") == 7
    assert value(samples, "indexq_commits_held_back", guard="disk") == 1
    assert value(samples, "indexq_commits_held_back", guard="memory") == 0
    assert value(samples, "indexq_commits_held_back_since_timestamp_seconds", guard="disk") == 1234.5
    assert value(samples, "indexq_disk_min_free_bytes") == 256 * 2**20
    assert value(samples, "indexq_metrics_errors_total", section="ledger") == 0
    ledger.close()


def test_maintenance_figures_follow_the_events_as_they_are_appended(tmp_path: Path) -> None:
    config, ledger = _home_with_work(tmp_path)
    collector = Collector(config, "maintenance")
    samples = _collect(collector)
    assert value(samples, "indexq_writer_up") == 0
    assert value(samples, "indexq_backup_last_success_timestamp_seconds") == 0
    assert ("indexq_backup_last_verified", frozenset()) not in samples  # no backup yet: neither 0 nor 1
    ledger.events.add("backup", True, "backup A", {"name": "A", "verified": True})
    ledger.events.add("check", False, "quick check found damage", {"deep": False})
    ledger.events.add("alert", False, "quick check found damage")
    ledger.events.add("recovery", True, "recovered", {})
    ledger.events.add("check", False, "deep check could not run", {"deep": True, "cannot_check": True})
    ledger.events.add("backup", False, "backup B: verification FAILED", {"name": "B", "verified": False})
    ledger.events.add("requeue", True, "0 tasks re-enqueued")  # not a figure
    samples = _collect(collector)
    backup_a = ledger.events.since("backup", 0)[-1]["time"]
    assert value(samples, "indexq_backups_total", result="ok") == 1
    assert value(samples, "indexq_backups_total", result="failed") == 1
    assert value(samples, "indexq_backup_last_success_timestamp_seconds") == backup_a
    assert value(samples, "indexq_backup_last_verified") == 0
    assert value(samples, "indexq_checks_total", depth="quick", result="damaged") == 1
    assert value(samples, "indexq_checks_total", depth="deep", result="cannot_check") == 1
    assert value(samples, "indexq_check_last_result", depth="quick", result="damaged") == 1
    assert value(samples, "indexq_check_last_result", depth="deep", result="cannot_check") == 1
    assert value(samples, "indexq_check_last_result", depth="deep", result="healthy") == 0
    assert value(samples, "indexq_recoveries_total", result="ok") == 1
    assert value(samples, "indexq_alerts_total") == 1
    # Read again: only new events are read, and counted once.
    ledger.events.add("check", True, "quick check healthy", {"deep": False})
    samples = _collect(collector)
    assert value(samples, "indexq_checks_total", depth="quick", result="damaged") == 1
    assert value(samples, "indexq_checks_total", depth="quick", result="healthy") == 1
    assert value(samples, "indexq_check_last_result", depth="quick", result="healthy") == 1
    assert value(samples, "indexq_check_last_result", depth="quick", result="damaged") == 0
    ledger.close()


def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name a writer and a maintenance consumer serve (in this process)."""
    config, ledger = _home_with_work(tmp_path)
    ledger.events.add("backup", True, "backup A", {"name": "A", "verified": True})
    state = WriterState(config)
    state.state["guard"] = {"guard": "memory", "value": 90.0, "limit": 80.0, "since": 1.0, "summary": "memory"}
    found = names(_collect(Collector(config, "writer", state, HashEmbedder("hash:8"), queue_depth=lambda: 0)))
    found |= names(_collect(Collector(config, "maintenance")))
    for metric in (COMMIT_SECONDS, EMBED_SECONDS, REFUSED_PAYLOADS):
        # No `_created` series: serve() turns them off.
        found |= {s.name for family in metric.collect() for s in family.samples if not s.name.endswith("_created")}
    ledger.close()
    return found


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bindexq_[a-z_]+\b", expr))


def test_the_readme_lists_every_metric_served_and_no_other(tmp_path: Path) -> None:
    section = README.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(indexq_[a-z_]+)", section, re.M))
    served = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported_names(tmp_path)}
    assert documented == served


# ---- the dashboard and the alert rules ------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard_over_metrics_that_exist(tmp_path: Path) -> None:
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    data = json.loads(DASHBOARD.read_text())
    assert (data["title"], data["uid"]) == ("indexq", "indexq-overview")
    assert isinstance(data["schemaVersion"], int) and data["schemaVersion"] >= 36
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: dict[tuple[int, int], int] = {}
    served = exported_names(tmp_path) | {"up"}
    for panel in data["panels"]:
        assert panel["type"] in ("row", "stat", "table", "timeseries"), panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "xywh") and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert cells.setdefault((x, y), panel["id"]) == panel["id"], f"{panel['title']} overlaps a panel"
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert _metric_names(target["expr"]), target["expr"]
            assert _metric_names(target["expr"]) <= served, target["expr"]
    # Grafana's own dashboard model (generated from its schema) takes every field we wrote:
    # a misspelt key, option or query field would be dropped here.
    plugins.register_default_plugins()
    decoded = json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))
    assert _lost(data, decoded) == ["/__requires"]


def _lost(wrote: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of what we wrote that the decoded model does not hold (or holds otherwise)."""
    if isinstance(wrote, dict):
        if not isinstance(kept, dict):
            return [path]
        lost = [f"{path}/{k}" for k in wrote if k not in kept]
        return lost + [p for k, v in wrote.items() if k in kept for p in _lost(v, kept[k], f"{path}/{k}")]
    if isinstance(wrote, list):
        if not isinstance(kept, list) or len(kept) != len(wrote):
            return [path]
        return [p for i, (a, b) in enumerate(zip(wrote, kept, strict=True)) for p in _lost(a, b, f"{path}[{i}]")]
    return [] if wrote == kept else [path]


REQUIRED_ALERTS = {
    "IndexqWriterDown", "IndexqJobStalled", "IndexqCommitsHeldBack", "IndexqBackupTooOld", "IndexqBackupUnverified",
    "IndexqCheckFoundDamage", "IndexqPayloadRefused",
}  # fmt: skip


def test_the_alert_rules_parse_and_use_metrics_that_exist(tmp_path: Path) -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules) and REQUIRED_ALERTS <= set(by_name)
    served = exported_names(tmp_path)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
        assert _metric_names(rule["expr"]) <= served, rule["expr"]
    assert "> 600" in by_name["IndexqCommitsHeldBack"]["expr"]  # 10 minutes
    assert "26 * 3600" in by_name["IndexqBackupTooOld"]["expr"]
    assert 'up{job="indexq-writer"} == 0' in by_name["IndexqWriterDown"]["expr"]


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # ops/test installs it (Debian package prometheus) where it can
        pytest.skip("promtool is not installed: the rules were parsed, not checked by promtool")
    for argv in (["check", "rules", RULES.name], ["test", "rules", "prometheus-rules.test.yml"]):
        result = subprocess.run([promtool, *argv], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout


def test_the_systemd_units_show_the_metrics_port() -> None:
    for unit, port in (("indexq-writer.service", 9464), ("indexq-maintenance.service", 9465)):
        assert f"#Environment=INDEXQ_METRICS_PORT={port}\n" in (DEPLOY / unit).read_text()


# ---- indexq status --watch ------------------------------------------------------------


def _ctrl_c_default() -> None:
    """In the child, before exec: SIGINT as a shell gives it (default, unblocked). A pytest-xdist
    worker may pass it on ignored or blocked, and the child would then never see the Ctrl-C
    these tests send (both timed out in CI after the suite's files were reordered)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.e2e
def test_status_watch_prints_snapshots_to_a_pipe_until_ctrl_c(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    start_worker(procs, home, **MODEL).wait_started()
    result = run_cli(home, "index", "--jsonl", str(write_records(tmp_path / "r.jsonl", 3000)), "-c", "notes", **MODEL)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    watch = subprocess.Popen(
        [str(BIN / "indexq"), "status", "--watch", "--interval", "0.5"], env=env_for(home, **MODEL),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_ctrl_c_default,
    )  # fmt: skip
    try:
        time.sleep(4)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
    assert watch.returncode == 0, err
    snapshots = [s for s in out.split("== indexq status ")[1:] if s.strip()]
    assert len(snapshots) >= 3, out
    clock = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for snapshot in snapshots[:3]:
        assert re.match(rf"{clock} \(every 0\.5s; Ctrl-C stops\)\n", snapshot), snapshot
        assert re.search(rf"^writer:      running, pid \d+ on \S+ since {clock}, model hash:384$", snapshot, re.M)
        assert "\nguard:       clear (commits flow)\n" in snapshot
        assert re.search(r"^queue:       \d+ tasks \(sqlite .*queue\.db\)$", snapshot, re.M)
        assert re.search(r"^rate:        .*chunks/s over the last minute$", snapshot, re.M)
        assert re.search(rf"^{job} +notes +(running|done) +3000 ", snapshot, re.M), snapshot
    # From the second snapshot on, the rate between refreshes: the writer was committing.
    rates = [float(m) for m in re.findall(r"^rate:        ([\d.]+) chunks/s now", out, re.M)]
    assert rates and max(rates) > 0, out


def test_status_watch_draws_a_live_view_on_a_terminal(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = Config(home=home)
    config.ensure_home()
    Ledger(config.ledger_path).close()  # a home, no writer
    leader, follower = pty.openpty()
    watch = subprocess.Popen(
        [str(BIN / "indexq"), "status", "--watch", "--interval", "0.3"], env=env_for(home, **MODEL, COLUMNS="120"),
        stdin=follower, stdout=follower, stderr=follower, start_new_session=True, preexec_fn=_ctrl_c_default,
    )  # fmt: skip
    os.close(follower)
    shown = b""

    def read(until: bytes, timeout: float) -> bytes:
        got = b""
        deadline = time.monotonic() + timeout
        while until not in got and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    got += os.read(leader, 65536)
                except OSError:  # EIO: the other end is closed
                    break
        return got

    try:
        shown = read(b"alerts", 60)  # the last row of a whole view
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=60) == 0
        shown += read(b"\0", 2)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
        os.close(leader)
    text = shown.decode(errors="replace")
    assert "indexq status" in text and "NOT RUNNING" in text and "outstanding" in text, text
    assert "\x1b[" in text, "drawn with terminal control sequences"


@pytest.mark.timeout(120)
def test_idle_clients_of_the_metrics_port_hold_no_more_than_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # ~1,000 connections that sent half a request held a thread and a descriptor each for
    # good: the writer reached its open-file limit and its commits stopped.
    from pipeline import metrics

    monkeypatch.setattr(metrics, "METRICS_CLIENT_TIMEOUT", 3.0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config, ledger = _home_with_work(tmp_path)
    ledger.close()
    server = metrics.serve(Config(home=config.home, model="hash:8", metrics_port=port), "maintenance")
    assert server is not None
    process = psutil.Process()
    before = process.num_fds()
    idle = []
    try:
        for _ in range(200):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /metr")  # half a request line, then nothing
            idle.append(conn)
        # The server's side of each: at most the bound once those over it are closed (the
        # test's own 200 count too). Before, the server held all 200: 400.
        bound = 200 + metrics.METRICS_CONNECTIONS + 2
        # Looked at before the client timeout lets the others go too.
        wait_for(lambda: process.num_fds() - before <= bound, 2, "the connections over the bound to be closed")
        for conn in idle:  # those over the bound at once, the others after the client timeout
            conn.settimeout(10)
            assert conn.recv(1024) == b""
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()
        assert "indexq_backups_total" in text
        # A client that sends a byte now and then is cut at the deadline all the same.
        dripping = socket.create_connection(("127.0.0.1", port))
        idle.append(dripping)
        cut_at = time.monotonic() + 30
        with pytest.raises(OSError):  # BrokenPipeError or ConnectionResetError once it is cut
            while time.monotonic() < cut_at:
                dripping.sendall(b"G")
                time.sleep(0.2)
        assert time.monotonic() < cut_at
    finally:
        for conn in idle:
            conn.close()
        server.close()
    assert "Traceback" not in capfd.readouterr().err  # a dropped client is no news
