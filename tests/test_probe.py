"""The deep check's recall probe, on a real Chroma collection: it passes a healthy index,
duplicates included, and names the vectors an index lost or cannot reach."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ops.probe import recall
from pipeline.store import Store


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _stored(tmp_path: Path, vectors: dict[str, np.ndarray]) -> object:
    store = Store(tmp_path / "chroma")
    ids = sorted(vectors)
    for i in range(0, len(ids), 10):
        part = ids[i : i + 10]
        store.upsert("docs", part, np.stack([vectors[x] for x in part]), part, [{"n": 1}] * len(part))
    return store.collection("docs", create=False)


def test_a_healthy_index_finds_every_sampled_vector_duplicates_included(tmp_path: Path) -> None:
    vectors = {f"id{i:03}": v for i, v in enumerate(_unit(np.random.default_rng(1), 120))}
    for n in range(4):  # the same text five times: one vector under five ids
        vectors[f"twin{n}"] = vectors["id007"].copy()
    col = _stored(tmp_path, vectors)
    # Asked for 2 neighbours, at most 2 of the 5 twins can come back as themselves.
    sample, failures = recall(col, vectors, sample_size=len(vectors), depth=2)
    assert len(sample) == len(vectors)
    assert failures == []


def test_a_vector_missing_from_the_index_is_named(tmp_path: Path) -> None:
    vectors = {f"id{i:03}": v for i, v in enumerate(_unit(np.random.default_rng(2), 30))}
    col = _stored(tmp_path, vectors)
    col.delete(ids=["id011"])  # the index lost it; the check still expects it
    sample, failures = recall(col, vectors)
    assert len(sample) == 30
    assert failures == ["id011"]


def test_a_vector_the_index_holds_elsewhere_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = {f"id{i:03}": v for i, v in enumerate(_unit(rng, 200))}
    col = _stored(tmp_path, vectors)
    # The index holds id042 at the opposite point: present, but not where it is searched for.
    col.upsert(ids=["id042"], embeddings=-vectors["id042"].reshape(1, -1), documents=["id042"], metadatas=[{"n": 1}])
    _, failures = recall(col, vectors, sample_size=len(vectors), depth=20)
    assert failures == ["id042"]
