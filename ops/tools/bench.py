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
import itertools
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import psutil

from ops.backup import create_backup
from ops.maintenance import run_check
from ops.recovery import restore_backup
from ops.tools.torture.procs import Child, wait_until
from pipeline.config import (
    DEFAULT_MICRO_BATCH,
    DEFAULT_PRECISION,
    DEFAULT_QUERY_RUNTIME,
    PRECISIONS,
    QUERY_RUNTIMES,
    Config,
)
from pipeline.errors import BadInputError, IndexqError, first_line
from pipeline.ledger import Ledger

QUICK_CHUNKS = 600
FULL_CHUNKS = 40_000
COLLECTION = "bench"
QUERY_WARM_UP = 5  # queries of each kind before the timed ones
# The stages main runs, in order (--stages picks some).
STAGES = (
    "producer", "bare", "bare_records", "pipeline", "query", "memory", "commit_path", "full_text", "resume",
    "producer_memory", "operations",
)  # fmt: skip
# Figures computed from bare and pipeline: run when both are.
DERIVED = ("device", "end_to_end_ratio", "throughput_ratio")
# Targets from the issue, shown beside each figure.
TARGETS = {
    "end_to_end_ratio": ">= 0.97",
    "throughput_ratio": ">= 0.95",
    "commit_path_ratio": ">= 0.95",
    "producer_chunks_per_s": ">= 2000",
    "resubmit_chunks_embedded": "0",
    "resume": f"<= micro-batch ({DEFAULT_MICRO_BATCH})",
    "query": "p50 <= 10 at 40k chunks",
    "rss_growth": "<= 10 %",
    "rss_peak_mb": "< 1536",
    "producer_rss_mb": "< 768",
}


def corpus_roots() -> list[tuple[str, Path]]:
    """Where the corpus comes from, in this order: the standard library (its test/ included,
    its site-packages not), then the site-packages of the Python running the benchmark."""
    paths = sysconfig.get_paths()
    return [("stdlib", Path(paths["stdlib"])), ("site-packages", Path(paths["purelib"]))]


def corpus_files() -> Iterator[tuple[Path, Path]]:
    """(source, path in the corpus) for every ``*.py`` file of ``corpus_roots``, sorted by path
    within each root: the same files on every run with the same Python and packages."""
    from pipeline.corpus import selected

    for label, root in corpus_roots():
        files = sorted(p for p in root.rglob("*.py") if p.is_file())
        for path in files:
            rel = path.relative_to(root)
            # The stdlib's own site-packages is not this environment's; what a walk would
            # skip (__pycache__, .venv, ...) the producer would skip too.
            if (label == "stdlib" and "site-packages" in rel.parts) or not selected(str(path), [root]):
                continue
            yield path, Path(label) / rel


def build_corpus(target: Path, chunks: int, config: Config, sources: list[str] | None = None) -> tuple[int, list[Any]]:
    """Copy Python sources (``corpus_files``) into ``target`` until they make ``chunks`` chunks;
    ``sources``, if given, gets each chunk's file as the producer names it."""
    from pipeline.chunking import chunk_text
    from pipeline.corpus import read_text
    from pipeline.embedder import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    total, kept = 0, []
    for path, rel in corpus_files():
        text = read_text(path)
        if not isinstance(text, str):
            continue
        pieces = chunk_text(text, tokenizer, config.chunk_tokens, config.chunk_overlap)
        if not pieces:
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        kept.extend(pieces)
        if sources is not None:
            sources.extend([str(dest.resolve())] * len(pieces))
        total += len(pieces)
        if total >= chunks:
            break
    if total < chunks:
        click.echo(f"  the sources on this machine make {total} chunks, fewer than {chunks}", err=True)
    return total, kept


# The bare loop as a user would write it: its own process, importing only what it uses.
# argv: chunks.jsonl, Chroma directory, model, device, micro-batch (empty: the writer's
# default for the device), full text ("on", "off" or empty: Chroma's default), precision.
# A chunk's record: its position as id and its ordinal as metadata, unless the line gives
# an id and metadata (indexq's, for the stage "bare_records").
BARE_SCRIPT = """
import json, os, sys, time
from pathlib import Path
import numpy as np
from pipeline.config import Config
from pipeline.embedder import load_embedder
from pipeline.store import Store

source, chroma, model, device, micro_batch, full_text, precision = sys.argv[1:8]
chunks = [json.loads(line) for line in Path(source).read_text().splitlines()]
loading = time.perf_counter()
embedder = load_embedder(model, device, precision)
if full_text:
    from pipeline.collection import CollectionSettings
    store = Store(Path(chroma), settings=CollectionSettings(full_text=full_text == "on"))
else:
    store = Store(Path(chroma))
collection = store.collection("bench")
size = int(micro_batch) if micro_batch else Config().micro_batch_for(embedder.device)
started = time.perf_counter()
done = []  # seconds into the loop at which each micro-batch was committed
for start in range(0, len(chunks), size):
    batch = chunks[start : start + size]
    vectors = embedder.embed([c["text"] for c in batch])
    for offset in range(0, len(batch), 10):
        group = batch[offset : offset + 10]
        collection.upsert(
            ids=[c.get("id") or str(start + offset + i) for i, c in enumerate(group)],
            embeddings=np.asarray(vectors[offset : offset + 10]),
            documents=[c["text"] for c in group],
            metadatas=[c.get("metadata") or {"ordinal": c["ordinal"]} for c in group],
        )
    done.extend([time.perf_counter() - started] * len(batch))
seconds = time.perf_counter() - started
hwm = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
print(json.dumps({
    "chunks": len(chunks), "seconds": round(seconds, 2), "chunks_per_s": round(len(chunks) / seconds, 2),
    "load_seconds": round(started - loading, 2), "device": embedder.device, "micro_batch": size,
    "peak_rss_mb": round(int(hwm[0].split()[1]) / 1024, 1) if hwm else None, "done": done,
}))
"""


def bare_baseline(
    chunks: list[Any],
    work: Path,
    config: Config,
    env: dict[str, str],
    full_text: str = "",
    name: str = "bare",
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """As a user runs it: one process (its start and the model's load included) that embeds
    micro-batches and upserts 10 at a time. No queue, ledger or guards. The chunks are made
    here and handed over as JSON: the pipeline's chunking is counted, the bare loop's is not.
    With ``sources`` (each chunk's file), it upserts the ids and metadata indexq's writer gives
    them (``pipeline.producer.file_record``: eight keys, the LlamaIndex node among them)
    instead of one key."""
    from pipeline.producer import file_record

    source = work / f"{name}-chunks.jsonl"
    with source.open("w") as handle:
        for n, c in enumerate(chunks):
            line: dict[str, Any] = {"text": c.text, "ordinal": c.ordinal}
            if sources is not None:
                record = file_record(sources[n], c)
                line.update(id=record["id"], metadata=record["metadata"])
            handle.write(json.dumps(line) + "\n")
    argv = [sys.executable, "-c", BARE_SCRIPT, str(source), str(work / f"{name}-chroma"), config.model, config.device]
    argv += [str(config.micro_batch or ""), full_text, config.precision]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise click.ClickException(f"the bare loop failed: {proc.stderr[-800:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tenths_chunks_per_s"] = tenths(result.pop("done"))
    result["wall_seconds"] = round(wall, 2)
    result["wall_chunks_per_s"] = round(len(chunks) / wall, 2)
    return result


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
        return _vmhwm_mb(self.pid)


# Runs shorter than this are not split into tenths.
TENTHS_MIN = 1_000


def tenths(times: Sequence[float]) -> list[float]:
    """Chunks/s over each tenth of a run, from the moment each chunk was committed (sorted,
    the first being the start): where a gap between two runs arises, not only its size."""
    ordered = sorted(times)
    if len(ordered) < TENTHS_MIN:
        return []  # a tenth shorter than a few micro-batches says nothing
    edges = [round(i * (len(ordered) - 1) / 10) for i in range(11)]
    spans = [(b - a, ordered[b] - ordered[a]) for a, b in itertools.pairwise(edges)]
    if any(seconds <= 0 for _, seconds in spans):
        return []  # a tenth inside one micro-batch (a GPU's 256 on a short run) says nothing
    return [round(chunks / seconds, 2) for chunks, seconds in spans]


def _vmhwm_mb(pid: int) -> float:
    """A live process's peak RSS (VmHWM), else its RSS now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(psutil.Process(pid).memory_info().rss / 2**20)


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
    """As a user runs it: `indexq worker` started, then `indexq index --wait` until it returns
    (end to end); from the ledger, the rate from the first commit to the last."""
    config = Config.from_env(env, home=home)
    home.mkdir(parents=True, exist_ok=True)
    run_env = {**env, "INDEXQ_HOME": str(home)}
    indexq = str(Path(sys.executable).parent / "indexq")
    started = time.perf_counter()
    writer = Child("writer", [indexq, "worker"], run_env, home.parent / f"{home.name}-writer.log")
    try:
        index_out = home.parent / f"{home.name}-index.json"
        with (home.parent / f"{home.name}-index.log").open("w") as log, index_out.open("w") as out:
            proc = subprocess.Popen(
                [indexq, "index", str(corpus), "--collection", COLLECTION, "--wait", "--json"],
                env=run_env, stdout=out, stderr=log, text=True,
            )  # fmt: skip
            # `index --wait` waits for a writer however long it takes: one that refused to
            # start (a precision its device lacks) would hold the benchmark for ever.
            while proc.poll() is None and writer.alive():
                time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                raise click.ClickException(f"the writer exited while indexing; see {writer.log}")
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise click.ClickException(f"indexq index --wait exited {proc.returncode}; see {log.name}")
        job = json.loads(index_out.read_text().strip().splitlines()[0])["job"]
        ledger = Ledger(home / "ledger.db")
        progress = ledger.jobs.progress(job)
        assert progress is not None
        chunks = progress.committed
        # The writer was starting while the job was submitted: its rate is taken from the
        # first commit to the last.
        committed_at = [t for (t,) in ledger.conn.execute("SELECT committed_at FROM chunks WHERE committed_at")]
        first, last = min(committed_at), max(committed_at)
        commit_seconds = max(last - first, 1e-3)
        result: dict[str, Any] = {
            "chunks": chunks,
            "seconds": round(seconds, 2),
            "chunks_per_s": round(chunks / seconds, 2),
            "commit_seconds": round(commit_seconds, 2),
            "commit_chunks_per_s": round(chunks / commit_seconds, 2),
            "writer_peak_rss_mb": round(_vmhwm_mb(writer.pid), 1),
            "tenths_chunks_per_s": tenths(committed_at),
            **_writer_settings(config),
        }
        if chunks != expected:
            result["warning"] = f"the writer committed {chunks} chunks, the harness expected {expected}"
        # Re-submission of the unchanged corpus, writer still running.
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


# The full-text stage: embedding made free (hash:384), so that Chroma's cost shows; at most
# FULL_TEXT_CHUNKS chunks (four runs of them), the index off then on, for the bare loop and
# the pipeline as a user runs it (`indexq index --no-full-text` through INDEXQ_FULL_TEXT).
FULL_TEXT_MODEL = "hash:384"
FULL_TEXT_CHUNKS = 10_000


def full_text(work: Path, size: int, env: dict[str, str]) -> dict[str, Any]:
    """Chroma's full-text index on documents off against on: bare loop and pipeline, same chunks."""
    run_env = {**env, "INDEXQ_MODEL": FULL_TEXT_MODEL}
    config = Config.from_env(run_env, home=work / "unused")
    corpus = work / "corpus-full-text"
    total, chunks = build_corpus(corpus, min(size, FULL_TEXT_CHUNKS), config)
    result: dict[str, Any] = {"model": FULL_TEXT_MODEL, "chunks": total}
    for flag in ("off", "on"):
        bare = bare_baseline(chunks, work, config, run_env, full_text=flag, name=f"ft-{flag}-bare")
        home = work / f"ft-{flag}-home"
        pipeline = pipeline_run(corpus, home, {**run_env, "INDEXQ_FULL_TEXT": str(flag == "on").lower()}, total)
        result[f"bare_{flag}_chunks_per_s"] = bare["chunks_per_s"]
        result[f"pipeline_{flag}_chunks_per_s"] = pipeline["commit_chunks_per_s"]
        result[f"pipeline_{flag}_end_to_end_chunks_per_s"] = pipeline["chunks_per_s"]
    result["bare_off_over_on"] = round(result["bare_off_chunks_per_s"] / result["bare_on_chunks_per_s"], 3)
    result["pipeline_off_over_on"] = round(result["pipeline_off_chunks_per_s"] / result["pipeline_on_chunks_per_s"], 3)
    result["pipeline_off_over_bare_on"] = round(result["pipeline_off_chunks_per_s"] / result["bare_on_chunks_per_s"], 3)
    return result


def _writer_settings(config: Config) -> dict[str, Any]:
    """The device the running writer embeds on and its micro-batch, as it publishes them in ``writer.state``."""
    settings = json.loads(config.writer_state_path.read_text())["settings"]
    return {"device": settings["device"], "micro_batch": settings["micro_batch"], "precision": settings["precision"]}


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
    """In-process: embed the query and search the benchmark collection, for two kinds of
    query taken in turn: the retrieval benchmark's developer questions (``QUESTIONS``, the
    headline figures), and code fragments, the first 12 words of a random chunk (many more
    tokens: a query's embedding costs about its token count)."""
    from chromadb.api.client import SharedSystemClient

    from ops.tools.retrieval import QUESTIONS
    from pipeline.embedder import is_hash_model, load_tokenizer
    from pipeline.queryembed import OnnxQueryEmbedder, load_query_embedder
    from pipeline.store import Store

    SharedSystemClient.clear_system_cache()
    # As pipeline.search embeds a query when no writer runs (ONNX Runtime unless
    # INDEXQ_QUERY_RUNTIME=torch; in int8 with onnx-int8), exported into this data home on first use.
    embedder = load_query_embedder(config.model, config.device, config.precision, home / "models", config.query_runtime)
    store = Store(home / "chroma")
    rng = random.Random(1)
    kinds = {
        "questions": [question for question, _ in QUESTIONS],
        "fragments": [" ".join(rng.choice(chunks).text.split()[:12]) for _ in QUESTIONS],
    }
    for texts in kinds.values():
        for text in texts[:QUERY_WARM_UP]:
            store.query(COLLECTION, embedder.embed([text])[0], 5)
    spent: dict[str, tuple[list[float], list[float], list[float]]] = {kind: ([], [], []) for kind in kinds}
    for turn in zip(*kinds.values(), strict=True):  # in turn: a slower moment of the machine hits both
        for kind, text in zip(kinds, turn, strict=True):
            totals, embeds, searches = spent[kind]
            started = time.perf_counter()
            vector = embedder.embed([text])[0]
            embedded = time.perf_counter()
            store.query(COLLECTION, vector, 5)
            done = time.perf_counter()
            totals.append((done - started) * 1000)
            embeds.append((embedded - started) * 1000)
            searches.append((done - embedded) * 1000)
    tokenizer = load_tokenizer(config.model)

    def figures(kind: str) -> dict[str, Any]:
        totals, embeds, searches = (sorted(values) for values in spent[kind])
        return {
            "queries": len(totals),
            "tokens_p50": statistics.median(tokenizer.counts(kinds[kind])),
            "p50_ms": round(statistics.median(totals), 2),
            "p95_ms": round(_p95(totals), 2),
            "embed_p50_ms": round(statistics.median(embeds), 2),
            "chroma_p50_ms": round(statistics.median(searches), 2),
            "chroma_p95_ms": round(_p95(searches), 2),
        }

    return {
        "collection_size": store.collection(COLLECTION).count(),
        "embed_runtime": (
            ("onnx" if embedder.precision == "fp32" else f"onnx-{embedder.precision}")
            if isinstance(embedder, OnnxQueryEmbedder)
            else "hash"
            if is_hash_model(config.model)
            else "torch"
        ),
        **{kind: figures(kind) for kind in kinds},
    }


def _p95(ordered: list[float]) -> float:
    return ordered[max(0, int(len(ordered) * 0.95) - 1)]


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
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _revision() -> str:
    """The commit measured, ``-dirty`` when the working tree had changes."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=30,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        if found.returncode == 0:
            return found.stdout.strip()
    return "unknown"


def _row(name: str, value: Any, target: str = "") -> str:
    return f"{name:<50} {value!s:>14}   {target}"


def _listed(values: Any) -> str:
    return " ".join(f"{v:g}" for v in values) if isinstance(values, list) else str(values)


def _ratio(results: dict[str, Any], bare: str) -> Any:
    """The writer's first-to-last-commit rate over a bare loop's rate (its loop alone)."""
    try:
        return round(results["pipeline"]["commit_chunks_per_s"] / results[bare]["chunks_per_s"], 3)
    except (KeyError, TypeError, ZeroDivisionError):
        return "n/a"


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
        _row("model", f"{get('model')} ({results.get('precision', 'fp32')})"),
        _row("Chroma's full-text index", results.get("full_text_index", "default")),
        _row("GPU", m.get("gpu")),
        _row("device: writer / bare loop", f"{get('device', 'writer')} / {get('device', 'bare')}"),
        _row("bare loop, process start to exit (chunks/s)", get("bare", "wall_chunks_per_s")),
        _row("pipeline, worker start to index --wait (chunks/s)", get("pipeline", "chunks_per_s")),
        _row("end-to-end ratio pipeline/bare", get("end_to_end_ratio"), TARGETS["end_to_end_ratio"]),
        _row("bare loop, loop only (chunks/s)", get("bare", "chunks_per_s")),
        _row("pipeline, first to last commit (chunks/s)", get("pipeline", "commit_chunks_per_s")),
        _row("throughput ratio pipeline/bare", get("throughput_ratio"), TARGETS["throughput_ratio"]),
        _row(
            "bare loop with indexq's records, start to exit / loop only (chunks/s)",
            f"{get('bare_records', 'wall_chunks_per_s')} / {get('bare_records', 'chunks_per_s')}",
        ),
        _row("throughput ratio pipeline/bare loop with indexq's records", _ratio(results, "bare_records")),
        _row("  bare loop by tenths of the corpus (chunks/s)", _listed(get("bare", "tenths_chunks_per_s"))),
        _row("  pipeline by tenths of the corpus (chunks/s)", _listed(get("pipeline", "tenths_chunks_per_s"))),
        _row(
            "commit path bare / pipeline, first to last commit (chunks/s)",
            f"{get('commit_path', 'bare_chunks_per_s')} / {get('commit_path', 'pipeline_chunks_per_s')}",
        ),
        _row(
            "commit path pipeline, submit to last commit (chunks/s)",
            get("commit_path", "pipeline_submit_to_last_commit_chunks_per_s"),
        ),
        _row("commit path ratio (hash:384)", get("commit_path", "ratio"), TARGETS["commit_path_ratio"]),
        _row(
            "commit path bare loop with indexq's records (chunks/s) / ratio",
            f"{get('commit_path', 'bare_records_chunks_per_s')} / {get('commit_path', 'ratio_records')}",
        ),
        _row(
            f"full text off / on, bare loop (chunks/s, {get('full_text', 'model')}, {get('full_text', 'chunks')})",
            f"{get('full_text', 'bare_off_chunks_per_s')} / {get('full_text', 'bare_on_chunks_per_s')}",
        ),
        _row(
            "full text off / on, pipeline first to last commit (chunks/s)",
            f"{get('full_text', 'pipeline_off_chunks_per_s')} / {get('full_text', 'pipeline_on_chunks_per_s')}",
        ),
        _row("pipeline with full text off / bare loop with it on", get("full_text", "pipeline_off_over_bare_on")),
        _row("producer (chunks/s)", get("producer", "chunks_per_s"), TARGETS["producer_chunks_per_s"]),
        _row("re-submission (s)", get("pipeline", "resubmit_seconds")),
        _row(
            "re-submission (chunks embedded)",
            get("pipeline", "resubmit_chunks_embedded"),
            TARGETS["resubmit_chunks_embedded"],
        ),
        _row("resume waste (chunks embedded twice)", get("resume", "chunks_embedded_twice"), TARGETS["resume"]),
        *[
            row
            for kind, label in (("questions", "questions"), ("fragments", "code fragments"))
            for row in (
                _row(
                    f"query p50 / p95, {label} ({get('query', kind, 'tokens_p50')} tokens; ms, {size} chunks)",
                    f"{get('query', kind, 'p50_ms')} / {get('query', kind, 'p95_ms')}",
                    TARGETS["query"],
                ),
                _row(
                    f"  of which embedding ({get('query', 'embed_runtime')}) / Chroma, p50 (ms)",
                    f"{get('query', kind, 'embed_p50_ms')} / {get('query', kind, 'chroma_p50_ms')}",
                ),
            )
        ],
        _row(f"writer peak RSS (MB, {get('memory', 'small_chunks')} chunks)", get("memory", "small_rss_mb")),
        _row(
            f"writer peak RSS (MB, {get('memory', 'large_chunks')} chunks)",
            get("memory", "large_rss_mb"),
            TARGETS["rss_peak_mb"],
        ),
        _row("RSS growth over 10x corpus (%)", get("memory", "growth_percent"), TARGETS["rss_growth"]),
        _row(f"bare loop peak RSS (MB, {get('bare', 'chunks')} chunks)", get("bare", "peak_rss_mb")),
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
@click.option(
    "--chunks", type=click.IntRange(min=1), default=None, help=f"Corpus size in chunks, 1 or more [{FULL_CHUNKS}]."
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="JSON results file [bench-results/bench-TIMESTAMP.json].",
)
@click.option("--seed", default=7, show_default=True, help="Seed for the kill moment and the queries.")
@click.option("--keep", is_flag=True, help="Keep the working directory (data homes, logs).")
@click.option(
    "--model", default=None, help="Model of the bare loop and the writer [the default model]; hash:384 for a smoke run."
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=DEFAULT_PRECISION,
    show_default=True,
    help="Precision of the bare loop, the writer and the queries (bf16: a CPU or GPU that has it).",
)
@click.option(
    "--query-runtime",
    type=click.Choice(QUERY_RUNTIMES),
    default=DEFAULT_QUERY_RUNTIME,
    show_default=True,
    help="How the query stage embeds its queries (INDEXQ_QUERY_RUNTIME).",
)
@click.option(
    "--stages",
    default=",".join(STAGES),
    show_default=True,
    help="The stages to run, comma-separated (the ratios and the device come with bare and pipeline).",
)
@click.option(
    "--full-text",
    "full_text_index",
    type=click.Choice(["on", "off"]),
    default=None,
    help="Chroma's full-text index for the bare loop and the pipeline [indexq's default, on].",
)
def main(
    quick: bool,
    chunks: int | None,
    output: Path | None,
    seed: int,
    keep: bool,
    model: str | None,
    precision: str,
    query_runtime: str,
    stages: str,
    full_text_index: str | None,
) -> None:
    """Measure the pipeline against a bare loop on the same corpus and machine.

    \b
    Example:
      python -m ops.tools.bench --quick
    """
    size = chunks if chunks is not None else QUICK_CHUNKS if quick else FULL_CHUNKS
    chosen = {name.strip() for name in stages.split(",") if name.strip()}
    if chosen - set(STAGES):
        raise click.BadParameter(f"unknown stage(s) {', '.join(sorted(chosen - set(STAGES)))}", param_hint="--stages")
    if not chosen:
        raise click.BadParameter(f"name at least one of {', '.join(STAGES)}", param_hint="--stages")
    if model is not None and not model.strip():
        raise click.BadParameter("an empty model: leave --model out for the default model", param_hint="--model")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INDEXQ_", "CHROMADB_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if model:
        env["INDEXQ_MODEL"] = model
    env["INDEXQ_PRECISION"] = precision
    env["INDEXQ_QUERY_RUNTIME"] = query_runtime
    if full_text_index:
        env["INDEXQ_FULL_TEXT"] = str(full_text_index == "on").lower()
    config = Config.from_env(env, home=Path(tempfile.gettempdir()) / "unused")
    work = Path(tempfile.mkdtemp(prefix="indexq-bench-"))
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m ops.tools.bench", *sys.argv[1:]])}
    results["model"] = config.model
    results["precision"] = config.precision
    results["full_text_index"] = full_text_index or "default"
    results["revision"] = _revision()
    output = output or Path("bench-results") / time.strftime("bench-%Y%m%d-%H%M%S.json")
    output.parent.mkdir(parents=True, exist_ok=True)

    def stage(name: str, label: str, run: Callable[[], Any]) -> None:
        """Run one measurement; a failure is recorded and the others still run. Saved after each."""
        if name not in chosen and not (name in DERIVED and {"bare", "pipeline"} <= chosen):
            return
        click.echo(label, err=True)
        started = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            click.echo(f"  failed: {results[name]['error']}", err=True)
        results.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - started, 1)
        output.write_text(json.dumps(results, indent=2) + "\n")

    try:
        click.echo(f"building a corpus of ~{size} chunks in {work}", err=True)
        corpus_sources: list[str] = []
        total, corpus_chunks = build_corpus(work / "corpus", size, config, corpus_sources)
        small_sources: list[str] = []
        small_total, small_chunks = build_corpus(work / "corpus-small", max(1, size // 10), config, small_sources)
        results["corpus_chunks"] = total
        stage("producer", "producer rate", lambda: producer_rate(work / "corpus", work, env))
        stage("bare", "bare baseline", lambda: bare_baseline(corpus_chunks, work, config, env, full_text_index or ""))
        stage(
            "bare_records",
            "bare baseline with indexq's records",
            lambda: bare_baseline(
                corpus_chunks, work, config, env, full_text_index or "", name="bare-records", sources=corpus_sources
            ),
        )
        stage("pipeline", "pipeline", lambda: pipeline_run(work / "corpus", work / "pipeline-home", env, total))
        stage("device", "device", lambda: {"writer": results["pipeline"]["device"], "bare": results["bare"]["device"]})
        stage(
            "end_to_end_ratio",
            "ratio",
            lambda: round(results["pipeline"]["chunks_per_s"] / results["bare"]["wall_chunks_per_s"], 3),
        )
        stage(
            "throughput_ratio",
            "ratio",
            lambda: round(results["pipeline"]["commit_chunks_per_s"] / results["bare"]["chunks_per_s"], 3),
        )
        stage("query", "query latency", lambda: query_latency(work / "pipeline-home", corpus_chunks, config))
        stage("memory", "writer memory on a corpus 10x smaller", lambda: memory(results, work, env, small_total))
        # The commit path on the corpus up to COMMIT_PATH_MAX chunks, else on the one 10x smaller.
        cp_corpus, cp_chunks, cp_sources = (
            ("corpus", corpus_chunks, corpus_sources)
            if total <= COMMIT_PATH_MAX
            else ("corpus-small", small_chunks, small_sources)
        )
        stage(
            "commit_path",
            "commit path (hash:384)",
            lambda: commit_path(work / cp_corpus, cp_chunks, work, env, cp_sources),
        )
        stage("full_text", "full-text index off vs on (hash:384)", lambda: full_text(work, size, env))
        stage("resume", "resume after kill -9", lambda: resume_waste(work / "corpus-small", work, env, seed))
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
    except BadInputError as exc:  # the corpus cannot be built: a model that does not load
        raise click.UsageError(first_line(exc)) from None
    except IndexqError as exc:  # a full disk: its own exit code (6), one line
        click.echo(f"Error: {first_line(exc)}", err=True)
        sys.exit(exc.exit_code)
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


# The commit-path stage: embedding made free (hash:384), so only the writer's own work
# around each commit separates the pipeline from a bare loop. Rounds alternate the two
# and the medians are reported: the machine is shared and timings are noisy.
COMMIT_PATH_MODEL = "hash:384"
COMMIT_PATH_ROUNDS = 3
# Three rounds of both loops on 40,000 chunks would take an hour here.
COMMIT_PATH_MAX = 5_000


def _commit_path_pipeline(corpus: Path, home: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """A writer running, `indexq index` of the corpus: chunks/s from the first commit to the last
    (the writer's commit path), chunks/s from submit to the last commit, submit seconds."""
    config = Config.from_env(env, home=home)
    writer = Writer(home, env)
    try:
        started = time.perf_counter()
        _, count, submit_seconds = submit(config, corpus)
        _wait_until(lambda: _committed(home) >= count, poll=0.05)
        overall = count / (time.perf_counter() - started)
    finally:
        writer.stop()
    ledger = Ledger(home / "ledger.db")
    try:
        first, last = ledger.conn.execute("SELECT min(committed_at), max(committed_at) FROM chunks").fetchone()
    finally:
        ledger.close()
    return count / max(last - first, 1e-3), overall, submit_seconds


def commit_path(
    corpus: Path, chunks: list[Any], work: Path, env: dict[str, str], sources: list[str] | None = None
) -> dict[str, Any]:
    """hash:384: the real writer subprocess (submit to last commit, as a user runs it) against a
    bare loop (hash vectors, Chroma upserts of 10 into a fresh directory) over the same chunks:
    with one metadata key, and (given ``sources``) with the ids and metadata indexq's writer
    gives them, so that indexq's own cost shows apart from its records' cost in Chroma."""
    import numpy as np

    from pipeline.embedder import load_embedder
    from pipeline.producer import file_record
    from pipeline.store import Store

    run_env = {**env, "INDEXQ_MODEL": COMMIT_PATH_MODEL}
    embedder = load_embedder(COMMIT_PATH_MODEL)
    plain = [(f"{n}", {"ordinal": c.ordinal}) for n, c in enumerate(chunks)]
    records = None
    if sources is not None:
        records = [(r["id"], r["metadata"]) for r in (file_record(s, c) for s, c in zip(sources, chunks, strict=True))]

    def loop(path: Path, keyed: list[tuple[str, dict[str, Any]]]) -> float:
        store = Store(path)
        collection = store.collection(COLLECTION)
        started = time.perf_counter()
        for start in range(0, len(chunks), 10):
            group = chunks[start : start + 10]
            collection.upsert(
                ids=[id_ for id_, _ in keyed[start : start + 10]],
                embeddings=np.asarray(embedder.embed([c.text for c in group])),
                documents=[c.text for c in group],
                metadatas=[meta for _, meta in keyed[start : start + 10]],
            )
        rate = len(chunks) / (time.perf_counter() - started)
        store.close()
        return rate

    bare, bare_records, pipeline, as_run, submits = [], [], [], [], []
    for round_ in range(COMMIT_PATH_ROUNDS):
        bare.append(loop(work / f"cp-bare-{round_}", plain))
        if records is not None:
            bare_records.append(loop(work / f"cp-bare-records-{round_}", records))
        rate, overall, submit_seconds = _commit_path_pipeline(corpus, work / f"cp-home-{round_}", run_env)
        pipeline.append(rate)
        as_run.append(overall)
        submits.append(submit_seconds)
    bare_rate, pipeline_rate = statistics.median(bare), statistics.median(pipeline)
    return {
        "model": COMMIT_PATH_MODEL,
        "chunks": len(chunks),
        "rounds": COMMIT_PATH_ROUNDS,
        "bare_chunks_per_s": round(bare_rate, 1),
        "pipeline_chunks_per_s": round(pipeline_rate, 1),
        "ratio": round(pipeline_rate / bare_rate, 3),
        "bare_runs": [round(r, 1) for r in bare],
        "pipeline_runs": [round(r, 1) for r in pipeline],
        # The bare loop upserting indexq's ids and metadata (eight keys): indexq's own cost.
        "bare_records_chunks_per_s": round(statistics.median(bare_records), 1) if bare_records else None,
        "ratio_records": round(pipeline_rate / statistics.median(bare_records), 3) if bare_records else None,
        "bare_records_runs": [round(r, 1) for r in bare_records],
        # Submit to last commit: the producer's chunking included, which the bare loop is spared.
        "pipeline_submit_to_last_commit_chunks_per_s": round(statistics.median(as_run), 1),
        "submit_seconds": round(statistics.median(submits), 2),
    }


if __name__ == "__main__":
    main()
