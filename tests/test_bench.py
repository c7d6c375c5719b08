"""A smoke run of the benchmark harness, to keep it working. Nothing here asserts a timing.

hash:384 keeps it short: every stage runs, with no model to load in each process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import dump_collection, env_for

pytestmark = pytest.mark.e2e


def run_tool(tmp_path: Path, module: str, *argv: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``python -m MODULE ARGV --output JSON`` from the repository root, its temporary files
    in tmp_path: the finished process (it must have succeeded) and the JSON it wrote."""
    output = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", module, *argv, "--output", str(output)],
        env={**env_for(tmp_path / "unused"), "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(output.read_text())


def test_bench_smoke(tmp_path: Path) -> None:
    result, data = run_tool(tmp_path, "ops.tools.bench", "--chunks", "40", "--model", "hash:384", "--keep")
    # A stage that fails is recorded and the others still run: none may have failed here.
    assert {k: v["error"] for k, v in data.items() if isinstance(v, dict) and "error" in v} == {}
    assert data["corpus_chunks"] >= 40
    assert data["model"] == "hash:384"
    assert data["device"] == {"writer": "cpu", "bare": "cpu"}
    assert data["pipeline"]["chunks"] == data["bare"]["chunks"] == data["corpus_chunks"]
    # End to end as a user runs it: the writer's start and the bare process's start both count.
    assert data["pipeline"]["seconds"] > data["pipeline"]["commit_seconds"]
    assert data["bare"]["wall_seconds"] > data["bare"]["seconds"]
    assert data["end_to_end_ratio"] > 0
    assert data["full_text"]["chunks"] == data["corpus_chunks"]
    assert all(data["full_text"][f"{k}_{f}_chunks_per_s"] > 0 for k in ("bare", "pipeline") for f in ("on", "off"))
    assert data["pipeline"]["resubmit_chunks_embedded"] == 0
    # The commit path against both bare loops: one metadata key, and indexq's records.
    assert data["commit_path"]["ratio"] > 0 and data["commit_path"]["ratio_records"] > 0
    assert data["resume"]["chunks_embedded_twice"] <= 32
    assert data["query"]["collection_size"] == data["corpus_chunks"]
    # Both kinds of query, each kind's texts all asked: questions, and code fragments longer in tokens.
    from ops.tools.retrieval import QUESTIONS

    for kind in ("questions", "fragments"):
        assert data["query"][kind]["queries"] == len(QUESTIONS)
        assert data["query"][kind]["chroma_p50_ms"] > 0
    assert data["query"]["fragments"]["tokens_p50"] > data["query"]["questions"]["tokens_p50"]
    assert "query p50 / p95, code fragments" in result.stdout
    assert data["query"]["embed_runtime"] == "hash"
    assert data["operations"]["restore_replay_chunks"] == data["corpus_chunks"]
    assert data["memory"]["small_chunks"] < data["memory"]["large_chunks"]
    for key in ("bare", "producer"):
        assert data[key]["chunks_per_s"] > 0
    assert data["producer_memory"]["max_file_one_line_mb"] > data["producer_memory"]["tiny_file_mb"] > 0
    assert "end-to-end ratio pipeline/bare" in result.stdout
    assert "device: writer / bare loop" in result.stdout
    # The bare loop with indexq's records wrote what the writer wrote: the same ids, the
    # same metadata (the plain bare loop, positions and one key).
    assert data["bare_records"]["chunks"] == data["corpus_chunks"]
    assert "throughput ratio pipeline/bare loop with indexq's records" in result.stdout
    (work,) = tmp_path.glob("indexq-bench-*")
    pipeline = dump_collection(work / "pipeline-home" / "chroma", "bench")
    records = dump_collection(work / "bare-records-chroma", "bench")
    plain = dump_collection(work / "bare-chroma", "bench")
    assert len(pipeline) == data["corpus_chunks"]
    assert {k: v["metadata"] for k, v in records.items()} == {k: v["metadata"] for k, v in pipeline.items()}
    assert {k: v["document"] for k, v in records.items()} == {k: v["document"] for k, v in pipeline.items()}
    assert sorted(plain) == sorted(map(str, range(len(pipeline))))
    assert {tuple(v["metadata"]) for v in plain.values()} == {("ordinal",)}


def test_tenths_give_the_rate_over_each_tenth_of_a_run() -> None:
    from ops.tools.bench import TENTHS_MIN, tenths

    # 2,001 commits: 100 chunks/s for the first half, 50 chunks/s for the second, in any order.
    times = [i / 100 for i in range(1001)] + [10 + i / 50 for i in range(1, 1001)]
    assert tenths(list(reversed(times))) == [100.0] * 5 + [50.0] * 5
    assert tenths(times[: TENTHS_MIN - 1]) == []
    # A bare loop stamps a whole micro-batch with one time: 1,200 chunks in batches of 256.
    assert tenths([float(i // 256) for i in range(1200)]) == []


def test_padding_tool_orders_as_the_writer_and_pads_less(tmp_path: Path) -> None:
    """`python -m ops.tools.padding` runs (the real model, the benchmark's corpus) and the
    writer's order pads less than the corpus's order."""
    result, data = run_tool(tmp_path, "ops.tools.padding", "--chunks", "80", "--rounds", "1")
    assert data["chunks"] >= 80 and data["device"] == "cpu" and data["micro_batch"] == 32
    assert 0 <= data["longest first"]["padding_share"] < data["file order"]["padding_share"]
    assert all(len(data[k]["chunks_per_s"]) == 1 for k in ("file order", "longest first"))
    assert "padding" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--chunks", "0"], "Invalid value for '--chunks': 0 is not in the range x>=1."),  # was a 40,000-chunk run
        (["--chunks", "-5"], "Invalid value for '--chunks': -5 is not in the range x>=1."),
        (["--stages", " , "], "Invalid value for --stages: name at least one of producer, bare,"),
        (["--model", ""], "Invalid value for --model: an empty model: leave --model out for the default model"),
        (["--model", "no-such-model", "--chunks", "5"], "Error: model 'no-such-model' could not be loaded offline"),
    ],
)
def test_the_benchmark_refuses_bad_arguments_before_it_writes_anything(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    from click.testing import CliRunner

    from ops.tools.bench import main

    output = tmp_path / "results.json"
    result = CliRunner().invoke(main, [*argv, "--output", str(output)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not output.exists()
