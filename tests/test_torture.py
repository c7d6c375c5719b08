"""The torture test (`ops/tools/torture`): a small run must find nothing, and its comparison must find
every difference planted with plain chromadb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import env_for

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = "torture"


def torture(tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.tools.torture", *args],
        env={**env_for(tmp_path / "unused"), "TMPDIR": str(tmp_path)},
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.e2e
def test_small_torture_run_loses_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # A smoke run (8 kills: every victim gets one or more); the torture itself is a long run of the tool (README).
    args = ["--kills", "8", "--embedder", "hash:384", "--files", "20", "--seed", "3", "--timeout", "480"]
    result = torture(tmp_path, *args, "--workdir", str(work), "--json", timeout=540)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout)
    c = report["comparison"]
    assert c["clean"] == c["tortured"] > 100
    assert [c[k] for k in ("lost", "extra", "wrong_documents", "wrong_metadata", "wrong_embeddings")] == [0] * 5
    assert c["inconsistent"] == []
    assert report["deep_check"]["healthy"]
    assert report["problems"] == []
    kills = report["kills"]
    assert kills["total"] == 8
    assert set(kills["by_victim"]) == {"writer", "producer", "maintenance", "recovery"}
    waste = report["waste"]
    assert waste["embedded_more_than_once"] <= waste["bound"] == waste["writer_kills"] * 32
    assert "result                               PASS" not in result.stdout  # --json: no table
    assert not work.exists(), "a passing run removes its work folder"


# ---- the comparison, on collections written with plain chromadb -------------------------


def write_collection(path: Path, records: dict[str, dict[str, Any]]) -> None:
    import chromadb
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()
    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    col = client.get_or_create_collection(COLLECTION, embedding_function=None, metadata={"hnsw:space": "cosine"})
    ids = sorted(records)
    col.upsert(
        ids=ids,
        embeddings=np.stack([records[i]["embedding"] for i in ids]),
        documents=[records[i]["document"] for i in ids],
        metadatas=[records[i]["metadata"] for i in ids],
    )
    SharedSystemClient.clear_system_cache()


def sample(n: int = 40) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(5)
    return {
        f"c{i:03d}": {
            "document": f"chunk {i} of a file",
            "metadata": {"source": "/corpus/a.py", "ordinal": i, "start_line": 10 * i + 1},
            "embedding": rng.random(16, dtype=np.float32),
        }
        for i in range(n)
    }


def test_comparison_finds_each_planted_difference(tmp_path: Path) -> None:
    clean = sample()
    write_collection(tmp_path / "clean", clean)
    tortured = {k: {**v, "metadata": dict(v["metadata"])} for k, v in clean.items()}
    del tortured["c001"]
    tortured["c002"]["document"] = "chunk 2 of a file, edited"
    tortured["c003"]["metadata"]["start_line"] = 999
    tortured["c004"]["embedding"] = clean["c004"]["embedding"] + np.float32(1e-3)
    tortured["c005"]["embedding"] = clean["c005"]["embedding"] + np.float32(1e-7)  # within the tolerance
    tortured["c999"] = {**clean["c006"], "metadata": {"source": "/corpus/b.py"}}
    # A data home (HOME/chroma) on one side, a bare Chroma directory on the other.
    write_collection(tmp_path / "home" / "chroma", tortured)

    result = torture(tmp_path, "--compare", str(tmp_path / "clean"), str(tmp_path / "home"), "--json")
    assert result.returncode == 1, result.stderr
    c = json.loads(result.stdout)["comparison"]
    assert (c["clean"], c["tortured"]) == (40, 40)
    expected = {"lost": 1, "extra": 1, "wrong_documents": 1, "wrong_metadata": 1, "wrong_embeddings": 1}
    assert {k: c[k] for k in expected} == expected
    assert c["examples"] == {
        "lost": ["c001"], "extra": ["c999"], "documents": ["c002"], "metadata": ["c003"], "embeddings": ["c004"],
    }  # fmt: skip

    table = torture(tmp_path, "--compare", str(tmp_path / "clean"), str(tmp_path / "home"))
    assert table.returncode == 1
    assert "  lost                                 1\n" in table.stdout
    assert table.stdout.rstrip().endswith("result                               FAIL")


def test_comparison_of_equal_collections_passes_and_a_missing_one_fails(tmp_path: Path) -> None:
    records = sample(12)
    write_collection(tmp_path / "a", records)
    write_collection(tmp_path / "b", records)
    same = torture(tmp_path, "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "records, clean / tortured            12 / 12" in same.stdout
    assert same.stdout.rstrip().endswith("PASS")

    missing = torture(tmp_path, "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--collection", "other")
    assert missing.returncode == 1
    assert "no collection 'other'" in missing.stdout


def test_every_option_is_in_the_readme() -> None:
    import click

    from ops.tools.torture.__main__ import main

    readme = (ROOT / "README.md").read_text()
    assert "python -m ops.tools.torture" in readme
    assert main.help and "Example" in main.help
    for param in main.params:
        if isinstance(param, click.Option):
            assert max(param.opts, key=len) in readme, f"{param.opts} of ops.tools.torture is not in the README"
