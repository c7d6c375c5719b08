"""A query embedded outside the writer runs through ONNX Runtime (pipeline.queryembed):
the real model exported, checked against torch, kept owner-only in the data home, made
again when damaged, and never used when it does not match or could not be written."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import embedder as embedder_module
from pipeline import queryembed
from pipeline.config import Config
from pipeline.embedder import HashEmbedder, SentenceTransformerEmbedder, load_embedder
from pipeline.errors import ConfigError
from pipeline.queryembed import OnnxQueryEmbedder, load_query_embedder
from tests.conftest import env_for

ROOT = Path(__file__).resolve().parent.parent
MODEL = "all-MiniLM-L6-v2"
TEXTS = [
    "decode a JSON document into a Python object",
    "   leading and trailing spaces\t\n",
    "def upsert(self, ids, vectors):\n    return self._collection.upsert(ids=ids, embeddings=vectors)",
    "Größenänderung: naïve café, 東京, 🚀",
    " ".join(f"word{n}" for n in range(2000)),  # far past the model's 256 tokens
]


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    return load_embedder(MODEL, "cpu").embed(TEXTS)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> OnnxQueryEmbedder:
    models = tmp_path_factory.mktemp("home") / "models"
    embedder = load_query_embedder(MODEL, "cpu", "fp32", models)
    assert isinstance(embedder, OnnxQueryEmbedder)
    return embedder


def _names(folder: Path) -> list[str]:
    """What the folder holds besides the lock file that serializes exports."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".export.lock")


def test_a_query_embeds_in_onnx_runtime_as_in_torch(exported: OnnxQueryEmbedder, torch_vectors: np.ndarray) -> None:
    vectors = exported.embed(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384) == torch_vectors.shape
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    cosines = np.sum(vectors * torch_vectors, axis=1)
    assert cosines.min() > 0.99999, cosines
    # Owner-only, one file, no temporary file left beside it.
    folder = exported.path.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(exported.path.stat().st_mode) == 0o600
    assert _names(folder) == [exported.path.name]
    assert stat.S_IMODE((folder / ".export.lock").stat().st_mode) == 0o600


def _damage(path: Path, at: int, seed: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.random.default_rng(seed).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes())


def _load_logged(folder: Path, caplog: pytest.LogCaptureFixture, runtime: str = "onnx") -> OnnxQueryEmbedder:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.queryembed"):
        embedder = load_query_embedder(MODEL, "cpu", "fp32", folder, runtime)
    assert isinstance(embedder, OnnxQueryEmbedder)
    return embedder


def test_the_export_is_reused_and_a_damaged_one_made_again(
    exported: OnnxQueryEmbedder, torch_vectors: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    folder, before = exported.path.parent, exported.path.stat()
    again = _load_logged(folder, caplog)
    assert again.path == exported.path and caplog.text == ""
    assert (exported.path.stat().st_ino, exported.path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # Cut in half, as a full disk under some copy would leave it; then bytes overwritten in
    # the middle (the rows of tokens no probe uses: the file still loads and embeds).
    # A temporary folder left by an export that was killed is swept by the next export.
    dead = folder / f".{exported.path.stem.rsplit('-', 2)[0]}-0123456789abcdef.killed"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half an export")
    for damage in (lambda p: os.truncate(p, before.st_size // 2), lambda p: _damage(p, before.st_size // 2, 7)):
        damage(exported.path)
        mended = _load_logged(folder, caplog)
        assert not dead.exists()
        assert "its content is not the content it was written with" in caplog.text
        assert "exporting it again" in caplog.text
        assert _names(folder) == [exported.path.name] == [mended.path.name]
        assert np.sum(mended.embed(TEXTS) * torch_vectors, axis=1).min() > 0.99999


def test_an_export_that_embeds_otherwise_than_when_it_was_made_is_made_again(
    exported: OnnxQueryEmbedder, torch_vectors: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    """The content check passes (the file is renamed to its new digest), but the weights
    no longer give the vector torch gave at export, as under another ONNX Runtime that
    computed otherwise: the probe stamped into the file catches it."""
    folder = exported.path.parent
    path = _load_logged(folder, caplog).path
    # [CLS]'s row of the word embeddings, every probe's first token, negated in place.
    st_model = load_embedder(MODEL, "cpu")._model  # type: ignore[attr-defined]
    row = st_model[0].auto_model.embeddings.word_embeddings.weight[101].detach().numpy()
    data = path.read_bytes()
    at = data.find(row.tobytes())
    assert at > 0 and data.find(row.tobytes(), at + 1) == -1
    with open(path, "r+b") as f:
        f.seek(at)
        f.write((-row).tobytes())
    renamed = path.with_name(f"{path.stem.rsplit('-', 1)[0]}-{queryembed._digest(path)}.onnx")
    path.rename(renamed)
    mended = _load_logged(folder, caplog)
    assert "in cosine from torch's vector" in caplog.text and "exporting it again" in caplog.text
    assert _names(folder) == [mended.path.name]
    assert np.sum(mended.embed(TEXTS) * torch_vectors, axis=1).min() > 0.99999


@pytest.mark.parametrize("mismatch", ["vectors", "tokens"])
def test_an_export_that_does_not_match_torch_is_not_used_nor_tried_again(
    mismatch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if mismatch == "vectors":
        monkeypatch.setattr(queryembed, "_MIN_COSINE", 1.5)  # no export can pass this
        said = "the ONNX export embeds"
    else:  # a tokenizer.json that cuts text otherwise than sentence-transformers
        monkeypatch.setattr(OnnxQueryEmbedder, "token_ids", lambda self, text: [101, 102])
        said = "the ONNX export tokenizes"
    models = tmp_path / "models"
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        embedder = load_query_embedder(MODEL, "cpu", "fp32", models)
    assert isinstance(embedder, SentenceTransformerEmbedder)
    assert f"queries embedded in torch: {said}" in caplog.text
    # Neither the export nor its temporary folder; the failure, remembered.
    (failed,) = _names(models)
    assert failed.endswith(".failed") and said.rsplit(" ", 1)[1] in json.loads((models / failed).read_text())["reason"]
    # The next search does not pay for the attempt again (no export, no check: no time).
    caplog.clear()
    monkeypatch.setattr(queryembed, "_make", lambda *args: pytest.fail("exported again"))
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        again = load_query_embedder(MODEL, "cpu", "fp32", models)
    assert isinstance(again, SentenceTransformerEmbedder)
    assert "the ONNX export failed before" in caplog.text and f"delete {models / failed} to retry" in caplog.text


def test_a_folder_with_the_exports_name_is_passed_over_and_the_failure_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    made = b"an export"  # what _make writes, stood in for: its digest names the file it publishes
    (tmp_path / "digest").write_bytes(made)
    prefix = queryembed.export_prefix(models, MODEL, embedder_module.resolve_model(MODEL))
    (models / f"{prefix.name}-{queryembed._digest(tmp_path / 'digest')}.onnx").mkdir()

    def make(model: str, location: str, target: Path) -> object:
        target.write_bytes(made)
        return type("Made", (), {"path": target})()

    monkeypatch.setattr(queryembed, "_make", make)
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        first = load_query_embedder(MODEL, "cpu", "fp32", models)
    assert isinstance(first, SentenceTransformerEmbedder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not be exported to ONNX" in warnings[0] and "Is a directory" in warnings[0]
    # Later searches pass over the folder without a word above INFO, and try no export again.
    caplog.clear()
    monkeypatch.setattr(queryembed, "_make", lambda *args: pytest.fail("exported again"))
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        assert isinstance(load_query_embedder(MODEL, "cpu", "fp32", models), SentenceTransformerEmbedder)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "failed before" in caplog.text


# Writes past 20 MB fail (EFBIG, as on a full disk) in this process only.
FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))
from pipeline.queryembed import load_query_embedder
embedder = load_query_embedder("all-MiniLM-L6-v2", "cpu", "fp32", Path(sys.argv[1]), sys.argv[2])
print(json.dumps({"kind": type(embedder).__name__, "precision": embedder.precision}))
"""


def test_no_room_for_the_export_leaves_nothing_and_the_query_runs_in_torch(tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(models), "onnx"],
        env=env_for(tmp_path / "home"), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["kind"] == "SentenceTransformerEmbedder"
    assert "queries embedded in torch: the model could not be exported to ONNX" in done.stderr
    assert _names(models) == []  # nothing half-written, and no failure remembered: the disk may be freed


# Two searches of a fresh data home at once, in two processes: one exports, the other
# waits for it and loads what it published.
RACE = """
import json, sys
from pathlib import Path
from pipeline.queryembed import load_query_embedder
embedder = load_query_embedder("all-MiniLM-L6-v2", "cpu", "fp32", Path(sys.argv[1]))
print(json.dumps({"kind": type(embedder).__name__, "path": str(getattr(embedder, "path", ""))}))
"""


def test_two_processes_exporting_at_once_make_one_export(tmp_path: Path) -> None:
    models = tmp_path / "models"
    argv = [sys.executable, "-c", RACE, str(models)]
    env = env_for(tmp_path / "home")
    procs = [
        subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    assert [r["kind"] for r in results] == ["OnnxQueryEmbedder"] * 2
    assert results[0]["path"] == results[1]["path"]
    assert _names(models) == [Path(results[0]["path"]).name]


def test_where_onnx_runtime_does_not_apply_the_query_stays_in_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    assert isinstance(load_query_embedder("hash:384", "cpu", "fp32", models), HashEmbedder)
    assert isinstance(load_query_embedder(MODEL, "cpu", "fp32", models, runtime="torch"), SentenceTransformerEmbedder)
    monkeypatch.setattr(embedder_module, "cpu_has_bf16", lambda: True)
    bf16 = load_query_embedder(MODEL, "cpu", "bf16", models)
    assert isinstance(bf16, SentenceTransformerEmbedder) and bf16.precision == "bf16"
    assert not models.exists()
    with pytest.raises(ConfigError, match="query runtime must be one of onnx, onnx-int8, torch"):
        load_query_embedder(MODEL, "cpu", "fp32", models, runtime="tensorrt")


def _model_dir(root: Path, modules: list[str], prompts: dict[str, object] | None = None) -> str:
    root.mkdir()
    (root / "tokenizer.json").write_text("{}")
    types = [f"sentence_transformers.models.{m}" for m in modules]
    (root / "modules.json").write_text(json.dumps([{"idx": i, "type": t} for i, t in enumerate(types)]))
    if prompts is not None:
        (root / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    return str(root)


def test_models_the_export_does_not_cover_are_named(tmp_path: Path) -> None:
    assert queryembed._unsupported(_model_dir(tmp_path / "plain", ["Transformer", "Pooling", "Normalize"])) is None
    assert queryembed._unsupported(_model_dir(tmp_path / "unnormalised", ["Transformer", "Pooling"])) is None
    dense = queryembed._unsupported(_model_dir(tmp_path / "dense", ["Transformer", "Pooling", "Dense", "Normalize"]))
    assert dense == "its modules (Transformer, Pooling, Dense, Normalize) are not Transformer, Pooling and Normalize"
    prompted = _model_dir(tmp_path / "prompted", ["Transformer", "Pooling"], {"prompts": {"query": "query: "}})
    assert queryembed._unsupported(prompted) == "the model declares prompts"
    bare = _model_dir(tmp_path / "bare", ["Transformer", "Pooling"])
    os.remove(Path(bare) / "tokenizer.json")
    assert queryembed._unsupported(bare) == "the model has no tokenizer.json"
    assert queryembed._unsupported("some-org/some-model") == "some-org/some-model is not a local model directory"
    # Weights over one ONNX file's 2 GB (a sparse file: no disk used).
    large = Path(_model_dir(tmp_path / "large", ["Transformer", "Pooling", "Normalize"]))
    with open(large / "model.safetensors", "wb") as f:
        f.truncate(2 * 2**30)
    assert queryembed._unsupported(str(large)) == "its weights are larger than one ONNX file holds (2 GB)"


def test_the_export_name_follows_the_model_files(tmp_path: Path) -> None:
    model = Path(_model_dir(tmp_path / "m", ["Transformer", "Pooling"]))
    first = queryembed.export_prefix(tmp_path / "models", "org/m", str(model))
    assert first.parent == tmp_path / "models" and re.fullmatch(r"m-[0-9a-f]{8}-[0-9a-f]{16}", first.name)
    assert queryembed.export_prefix(tmp_path / "models", "org/m", str(model)) == first
    (model / "tokenizer.json").write_text('{"changed": true}')
    assert queryembed.export_prefix(tmp_path / "models", "org/m", str(model)) != first


def test_the_query_runtime_setting(tmp_path: Path) -> None:
    assert Config().query_runtime == "onnx"
    assert Config.from_env({"INDEXQ_QUERY_RUNTIME": " torch "}).query_runtime == "torch"
    assert Config.from_env({"INDEXQ_QUERY_RUNTIME": "onnx-int8"}).query_runtime == "onnx-int8"
    with pytest.raises(ConfigError, match="query runtime must be one of onnx, onnx-int8, torch, got 'gpu'"):
        Config.from_env({"INDEXQ_QUERY_RUNTIME": "gpu"})
    assert Config(home=tmp_path / "h").models_path == tmp_path / "h" / "models"


def _beside_export(exported: OnnxQueryEmbedder, folder: Path) -> Path:
    """A models folder holding a copy of the module's fp32 export (found by its name)."""
    folder.mkdir(mode=0o700)
    (folder / exported.path.name).write_bytes(exported.path.read_bytes())
    return folder


def test_int8_queries_are_made_once_from_the_export_and_checked(
    exported: OnnxQueryEmbedder, torch_vectors: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _beside_export(exported, tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        int8 = load_query_embedder(MODEL, "cpu", "fp32", folder, "onnx-int8")
    assert isinstance(int8, OnnxQueryEmbedder) and int8.precision == "int8"
    assert int8.path.name.startswith(exported.path.stem + "-int8-") and "query model published" in caplog.text
    assert _names(folder) == sorted([exported.path.name, int8.path.name])
    assert stat.S_IMODE(int8.path.stat().st_mode) == 0o600
    assert int8.path.stat().st_size < exported.path.stat().st_size / 3  # int8 weights: a quarter
    cosines = np.sum(int8.embed(TEXTS) * torch_vectors, axis=1)
    assert cosines.min() > 0.97 and cosines.max() < 0.99999, cosines  # near torch's vector, not it
    # Found again, not made again; damaged, made again from the export.
    again = _load_logged(folder, caplog, "onnx-int8")
    assert again.path == int8.path and again.precision == "int8" and caplog.text == ""
    _damage(int8.path, int8.path.stat().st_size // 2, 3)
    mended = _load_logged(folder, caplog, "onnx-int8")
    assert "its content is not the content it was written with" in caplog.text
    assert mended.precision == "int8" and _names(folder) == sorted([exported.path.name, mended.path.name])
    # The fp32 runtime beside it still loads the export, and leaves the int8 model alone.
    fp32 = _load_logged(folder, caplog, "onnx")
    assert fp32.precision == "fp32" and fp32.path.name == exported.path.name and caplog.text == ""
    assert _names(folder) == sorted([exported.path.name, mended.path.name])


def test_an_int8_model_too_far_from_fp32_is_not_used_nor_made_again(
    exported: OnnxQueryEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As on a CPU whose int8 arithmetic saturates: the queries stay in fp32, and the next
    search does not quantize again."""
    folder = _beside_export(exported, tmp_path / "models")
    monkeypatch.setattr(queryembed, "_INT8_COSINE", 1.5)  # no int8 model can pass this
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        embedder = load_query_embedder(MODEL, "cpu", "fp32", folder, "onnx-int8")
    assert isinstance(embedder, OnnxQueryEmbedder) and embedder.precision == "fp32"
    assert "queries embedded in fp32: the int8 model embeds" in caplog.text
    failed = f"{exported.path.stem}-int8.failed"
    assert _names(folder) == sorted([exported.path.name, failed])
    caplog.clear()
    monkeypatch.setattr(queryembed, "_quantize", lambda *args: pytest.fail("quantized again"))
    with caplog.at_level(logging.INFO, logger="pipeline.queryembed"):
        again = load_query_embedder(MODEL, "cpu", "fp32", folder, "onnx-int8")
    assert isinstance(again, OnnxQueryEmbedder) and again.precision == "fp32"
    assert "the int8 model failed before" in caplog.text


def test_no_room_for_the_int8_model_leaves_the_export_alone_and_queries_run_in_fp32(
    exported: OnnxQueryEmbedder, tmp_path: Path
) -> None:
    folder = _beside_export(exported, tmp_path / "models")  # 90 MB, made before the limit
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(folder), "onnx-int8"],  # the int8 model is 23 MB
        env=env_for(tmp_path / "home"), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"kind": "OnnxQueryEmbedder", "precision": "fp32"}
    assert "queries embedded in fp32: the int8 model could not be made" in done.stderr
    assert _names(folder) == [exported.path.name]  # nothing half-written, no failure remembered
