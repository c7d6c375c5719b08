"""Benchmark harness: indexq's pipeline against a bare embed-and-add loop, same corpus, same machine.

    python -m ops.tools.bench --quick          # about two minutes here
    python -m ops.tools.bench --chunks 40000   # the full size

Measures, in one run: the bare baseline, the pipeline (real producer, real writer
subprocess), their throughput ratio, the producer rate, re-submission, resume waste
after a kill -9, query latency, and the writer's peak RSS at two corpus sizes 10x
apart. Prints a table and writes JSON. A benchmark, not a test: nothing asserts.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import psutil

from ops.backup import create_backup
from ops.maintenance import run_check
from ops.recovery import restore_backup
from ops.tools.torture.procs import Child, wait_until
from pipeline.config import DEFAULT_MICRO_BATCH, Config
from pipeline.ledger import Ledger

QUICK_CHUNKS = 600
FULL_CHUNKS = 40_000
COLLECTION = "bench"
QUERIES = 60
# Targets from the issue, shown beside each figure.
TARGETS = {
    "throughput_ratio": ">= 0.95",
    "producer_chunks_per_s": ">= 2000",
    "resubmit_chunks_embedded": "0",
    "resume": f"<= micro-batch ({DEFAULT_MICRO_BATCH})",
    "query": "p50 <= 15 at 40k chunks",
    "rss_growth": "<= 15 %",
    "rss_peak_mb": "< 1536",
    "producer_rss_mb": "< 768",
}


def build_corpus(target: Path, chunks: int, config: Config) -> tuple[int, list[Any]]:
    """Copy standard-library sources into ``target`` until they make ``chunks`` chunks."""
    from pipeline.chunking import chunk_text
    from pipeline.corpus import read_text
    from pipeline.embedder import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    total, kept = 0, []
    for path in files:
        text = read_text(path)
        if not isinstance(text, str):
            continue
        pieces = chunk_text(text, tokenizer, config.chunk_tokens, config.chunk_overlap)
        dest = target / path.relative_to(stdlib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        kept.extend(pieces)
        total += len(pieces)
        if total >= chunks:
            break
    return total, kept


def bare_baseline(chunks: list[Any], work: Path, config: Config) -> dict[str, Any]:
    """One process: embed micro-batches, upsert 10 at a time. No queue, ledger or guards."""
    import numpy as np

    from pipeline.embedder import load_embedder
    from pipeline.store import Store

    embedder = load_embedder(config.model)
    store = Store(work / "bare-chroma")
    collection = store.collection(COLLECTION)
    started = time.perf_counter()
    for start in range(0, len(chunks), config.micro_batch):
        batch = chunks[start : start + config.micro_batch]
        vectors = embedder.embed([c.text for c in batch])
        for offset in range(0, len(batch), 10):
            group = batch[offset : offset + 10]
            collection.upsert(
                ids=[f"{start + offset + i}" for i in range(len(group))],
                embeddings=np.asarray(vectors[offset : offset + 10]),
                documents=[c.text for c in group],
                metadatas=[{"ordinal": c.ordinal} for c in group],
            )
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "chunks_per_s": round(len(chunks) / seconds, 2)}


class Writer(Child):
    """`indexq worker` on a data home (a Child of the torture harness), started when this returns."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        home.mkdir(parents=True, exist_ok=True)
        argv = [str(Path(sys.executable).parent / "indexq"), "worker"]
        super().__init__("writer", argv, {**env, "INDEXQ_HOME": str(home)}, home.parent / f"{home.name}-writer.log")
        wait_until(
            lambda: "tasks requeued from the ledger" in self.output() or not self.alive(), 180, "the writer to start"
        )
        if not self.alive():
            raise click.ClickException(f"writer did not start; see {self.log}")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return psutil.Process(self.pid).memory_info().rss / 2**20


def _committed(home: Path) -> int:
    """Committed chunks, read without writing anything (the poll must not slow the writer)."""
    conn = sqlite3.connect(f"file:{home / 'ledger.db'}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM chunks WHERE state='committed'").fetchone()[0])
    finally:
        conn.close()


def _wait_until(predicate: Callable[[], bool], timeout: float = 7200, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException("timed out waiting for the writer")
        time.sleep(poll)


def submit(config: Config, corpus: Path) -> tuple[str, int, float]:
    from pipeline.producer import Producer

    producer = Producer(config)
    try:
        started = time.perf_counter()
        sub = producer.submit_paths([corpus], COLLECTION)
        return sub.job, sub.chunks, time.perf_counter() - started
    finally:
        producer.close()


def producer_rate(corpus: Path, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Chunking + ledger + enqueue into a fresh home with no writer running."""
    config = Config.from_env(env, home=work / "producer-home")
    _, chunks, seconds = submit(config, corpus)
    return {"chunks": chunks, "seconds": round(seconds, 2), "chunks_per_s": round(chunks / seconds, 1)}


def pipeline_run(corpus: Path, home: Path, env: dict[str, str], expected: int) -> dict[str, Any]:
    """Real producer and real writer: first enqueue to last commit."""
    config = Config.from_env(env, home=home)
    writer = Writer(home, env)
    try:
        started = time.perf_counter()
        _, chunks, submit_seconds = submit(config, corpus)
        _wait_until(lambda: _committed(home) >= chunks)
        seconds = time.perf_counter() - started
        result: dict[str, Any] = {
            "chunks": chunks,
            "seconds": round(seconds, 2),
            "chunks_per_s": round(chunks / seconds, 2),
            "submit_seconds": round(submit_seconds, 2),
            "writer_peak_rss_mb": round(writer.peak_rss_mb(), 1),
        }
        if chunks != expected:
            result["warning"] = f"producer made {chunks} chunks, the harness expected {expected}"
        # Re-submission of the unchanged corpus, writer still running.
        ledger = Ledger(home / "ledger.db")
        embedded_before = ledger.embeddings_total()
        started = time.perf_counter()
        job, _, _ = submit(config, corpus)
        _wait_until(lambda: (p := ledger.jobs.progress(job)) is not None and p.state in ("done", "failed"))
        result["resubmit_seconds"] = round(time.perf_counter() - started, 2)
        result["resubmit_chunks_embedded"] = ledger.embeddings_total() - embedded_before
        ledger.close()
    finally:
        writer.stop()
    return result


def resume_waste(corpus: Path, work: Path, env: dict[str, str], seed: int) -> dict[str, Any]:
    """Kill -9 the writer at a random moment mid-job, restart, count chunks embedded twice."""
    home = work / "resume-home"
    config = Config.from_env(env, home=home)
    writer = Writer(home, env)
    _, chunks, _ = submit(config, corpus)
    rng = random.Random(seed)
    threshold = rng.randint(1, max(1, chunks // 2))
    _wait_until(lambda: _committed(home) >= threshold)
    time.sleep(rng.uniform(0, 1.0))
    writer.kill9()
    at_kill = _committed(home)
    writer = Writer(home, env)
    _wait_until(lambda: _committed(home) >= chunks)
    writer.stop()
    ledger = Ledger(home / "ledger.db")
    twice = ledger.embedded_more_than_once()
    ledger.close()
    return {"chunks": chunks, "killed_at_committed": at_kill, "chunks_embedded_twice": twice}


def operations(home: Path, env: dict[str, str]) -> dict[str, Any]:
    """Backup (and the writer pause it costs), deep check, restore-and-replay rate."""
    config = Config.from_env(env, home=home)
    started = time.perf_counter()
    backup = create_backup(config)
    backup_seconds = time.perf_counter() - started
    started = time.perf_counter()
    report = run_check(config, deep=True)
    check_seconds = time.perf_counter() - started
    # Worst case of a restore: the backup copied into place, then its whole content
    # replayed (watermark 0).
    started = time.perf_counter()
    replayed = restore_backup(config, backup["name"], watermark=0)["replayed"]
    restore_seconds = time.perf_counter() - started
    return {
        "backup_seconds": round(backup_seconds, 2),
        "backup_writer_pause_seconds": backup["pause_seconds"],
        "backup_verified": backup["verified"],
        "deep_check_seconds": round(check_seconds, 2),
        "deep_check_healthy": report.healthy,
        "restore_replay_chunks": replayed,
        "restore_replay_chunks_per_s": round(replayed / restore_seconds, 1),
    }


def query_latency(home: Path, chunks: list[Any], config: Config) -> dict[str, Any]:
    """In-process: embed the query and search the benchmark collection."""
    from chromadb.api.client import SharedSystemClient

    from pipeline.embedder import load_embedder
    from pipeline.store import Store

    SharedSystemClient.clear_system_cache()
    embedder = load_embedder(config.model)
    store = Store(home / "chroma")
    rng = random.Random(1)
    samples = [" ".join(rng.choice(chunks).text.split()[:12]) for _ in range(QUERIES + 5)]
    for text in samples[:5]:  # warm-up
        store.query(COLLECTION, embedder.embed([text])[0], 5)
    times = []
    for text in samples[5:]:
        started = time.perf_counter()
        store.query(COLLECTION, embedder.embed([text])[0], 5)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "collection_size": store.collection(COLLECTION).count(),
        "queries": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[int(len(times) * 0.95) - 1], 2),
    }


def machine() -> dict[str, Any]:
    import chromadb
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "chromadb": chromadb.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _row(name: str, value: Any, target: str = "") -> str:
    return f"{name:<38} {value!s:>14}   {target}"


def report(results: dict[str, Any]) -> str:
    def get(*path: str) -> Any:
        value: Any = results
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return "n/a"
            value = value[key]
        return value

    m = results["machine"]
    size = get("query", "collection_size")
    lines = [
        f"indexq benchmark: {get('corpus_chunks')} chunks, {m['cores']} cores, {m['memory_gb']} GB, {m['cpu']}",
        _row("bare baseline (chunks/s)", get("bare", "chunks_per_s")),
        _row("pipeline (chunks/s)", get("pipeline", "chunks_per_s")),
        _row("throughput ratio pipeline/bare", get("throughput_ratio"), TARGETS["throughput_ratio"]),
        _row("producer (chunks/s)", get("producer", "chunks_per_s"), TARGETS["producer_chunks_per_s"]),
        _row("re-submission (s)", get("pipeline", "resubmit_seconds")),
        _row(
            "re-submission (chunks embedded)",
            get("pipeline", "resubmit_chunks_embedded"),
            TARGETS["resubmit_chunks_embedded"],
        ),
        _row("resume waste (chunks embedded twice)", get("resume", "chunks_embedded_twice"), TARGETS["resume"]),
        _row(
            f"query p50 / p95 (ms, {size} chunks)",
            f"{get('query', 'p50_ms')} / {get('query', 'p95_ms')}",
            TARGETS["query"],
        ),
        _row(f"writer peak RSS (MB, {get('memory', 'small_chunks')} chunks)", get("memory", "small_rss_mb")),
        _row(
            f"writer peak RSS (MB, {get('memory', 'large_chunks')} chunks)",
            get("memory", "large_rss_mb"),
            TARGETS["rss_peak_mb"],
        ),
        _row("RSS growth over 10x corpus (%)", get("memory", "growth_percent"), TARGETS["rss_growth"]),
        _row("producer peak RSS (MB, one tiny file)", get("producer_memory", "tiny_file_mb")),
        _row(
            f"producer peak RSS (MB, {get('producer_memory', 'file_mb')} MB one-line file)",
            get("producer_memory", "max_file_one_line_mb"),
            TARGETS["producer_rss_mb"],
        ),
        _row(
            f"producer peak RSS (MB, {get('producer_memory', 'jsonl_bytes_mb')} MB JSONL)",
            get("producer_memory", "jsonl_mb"),
            TARGETS["producer_rss_mb"],
        ),
        _row("backup incl. verification (s)", get("operations", "backup_seconds")),
        _row("writer pause during backup (s)", get("operations", "backup_writer_pause_seconds")),
        _row("deep check (s)", get("operations", "deep_check_seconds")),
        _row("restore + replay (chunks/s)", get("operations", "restore_replay_chunks_per_s")),
    ]
    errors = [f"{k}: {v['error']}" for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return "\n".join(lines + [f"FAILED {e}" for e in errors])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help=f"Small corpus ({QUICK_CHUNKS} chunks): about two minutes here.")
@click.option("--chunks", type=int, default=None, help=f"Corpus size in chunks [{FULL_CHUNKS}].")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON results file [bench-results/bench-TIMESTAMP.json].",
)
@click.option("--seed", default=7, show_default=True, help="Seed for the kill moment and the queries.")
@click.option("--keep", is_flag=True, help="Keep the working directory (data homes, logs).")
def main(quick: bool, chunks: int | None, output: Path | None, seed: int, keep: bool) -> None:
    """Measure the pipeline against a bare loop on the same corpus and machine.

    \b
    Example:
      python -m ops.tools.bench --quick
    """
    size = chunks or (QUICK_CHUNKS if quick else FULL_CHUNKS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INDEXQ_", "CHROMADB_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    config = Config.from_env(env, home=Path(tempfile.gettempdir()) / "unused")
    work = Path(tempfile.mkdtemp(prefix="indexq-bench-"))
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m ops.tools.bench", *sys.argv[1:]])}
    output = output or Path("bench-results") / time.strftime("bench-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)

    def stage(name: str, label: str, run: Callable[[], Any]) -> None:
        """Run one measurement; a failure is recorded and the others still run. Saved after each."""
        click.echo(label, err=True)
        try:
            results[name] = run()
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            click.echo(f"  failed: {results[name]['error']}", err=True)
        output.write_text(json.dumps(results, indent=2) + "\n")

    try:
        click.echo(f"building a corpus of ~{size} chunks in {work}", err=True)
        total, corpus_chunks = build_corpus(work / "corpus", size, config)
        small_total, _ = build_corpus(work / "corpus-small", max(1, size // 10), config)
        results["corpus_chunks"] = total
        stage("producer", "producer rate", lambda: producer_rate(work / "corpus", work, env))
        stage("bare", "bare baseline", lambda: bare_baseline(corpus_chunks, work, config))
        stage("pipeline", "pipeline", lambda: pipeline_run(work / "corpus", work / "pipeline-home", env, total))
        stage(
            "throughput_ratio",
            "ratio",
            lambda: round(results["pipeline"]["chunks_per_s"] / results["bare"]["chunks_per_s"], 3),
        )
        stage("memory", "writer memory on a corpus 10x smaller", lambda: memory(results, work, env, small_total))
        stage("resume", "resume after kill -9", lambda: resume_waste(work / "corpus-small", work, env, seed))
        stage("query", "query latency", lambda: query_latency(work / "pipeline-home", corpus_chunks, config))
        stage(
            "producer_memory",
            "producer memory on huge inputs",
            lambda: producer_memory(work, env, size >= QUICK_CHUNKS),
        )
        stage(
            "operations",
            "operations: backup, deep check, restore and replay",
            lambda: operations(work / "pipeline-home", env),
        )
    finally:
        if keep:
            click.echo(f"kept {work}", err=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    click.echo(report(results))
    click.echo(f"results: {output}", err=True)


def _peak_rss_mb(argv: list[str], env: dict[str, str]) -> float:
    """Peak RSS of a command, read from /proc (VmHWM) until it exits; it must succeed."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        with contextlib.suppress(OSError, psutil.Error):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        time.sleep(0.02)
    if proc.returncode != 0:
        raise click.ClickException(
            f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}"
        )
    return round(peak, 1)


def producer_memory(work: Path, env: dict[str, str], full: bool = True) -> dict[str, Any]:
    """Producer peak RSS on the inputs that once grew it without bound: the largest file
    allowed as one line without white space, and a large JSONL file (both 1/16 of that
    when not ``full``: a smoke run)."""
    import base64

    from pipeline.corpus import MAX_FILE_BYTES

    indexq = str(Path(sys.executable).parent / "indexq")
    run_env = {**env, "INDEXQ_MODEL": "hash:384"}
    results: dict[str, Any] = {}
    tiny = work / "pm-tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("one short line\n")
    big = work / "pm-big"
    big.mkdir()
    size = MAX_FILE_BYTES if full else MAX_FILE_BYTES // 16
    (big / "one-line.txt").write_bytes(base64.b64encode(random.Random(1).randbytes(size * 3 // 4 - 3)))
    records = work / "pm-records.jsonl"
    with records.open("w") as handle:
        for n in range(200_000 if full else 12_500):
            handle.write(json.dumps({"id": f"r{n}", "text": f"record {n}: " + "some words " * 30}) + "\n")
    for name, args in (
        ("tiny_file_mb", [str(tiny)]),
        ("max_file_one_line_mb", [str(big)]),
        ("jsonl_mb", ["--jsonl", str(records)]),
    ):
        home = work / f"pm-home-{name}"
        results[name] = _peak_rss_mb([indexq, "index", *args, "-c", "memory"], {**run_env, "INDEXQ_HOME": str(home)})
    results["file_mb"] = round(size / 2**20, 1)
    results["jsonl_bytes_mb"] = round(records.stat().st_size / 2**20, 1)
    return results


def memory(results: dict[str, Any], work: Path, env: dict[str, str], small_total: int) -> dict[str, Any]:
    small = pipeline_run(work / "corpus-small", work / "small-home", env, small_total)
    large_rss, small_rss = results["pipeline"]["writer_peak_rss_mb"], small["writer_peak_rss_mb"]
    return {
        "small_chunks": small["chunks"],
        "small_rss_mb": small_rss,
        "large_chunks": results["pipeline"]["chunks"],
        "large_rss_mb": large_rss,
        "growth_percent": round((large_rss - small_rss) / small_rss * 100, 1),
    }


if __name__ == "__main__":
    main()
