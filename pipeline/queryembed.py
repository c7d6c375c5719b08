"""A query's embedding outside the writer: the model exported once to ONNX Runtime on a CPU.

One short query through torch costs about 14 ms on a 2-core CPU, most of it eager
execution's overhead per operation rather than arithmetic; the same graph in ONNX Runtime
takes about 6 ms, with the same vector (cosine to torch's at least 0.9999997 over the
benchmark's queries). Bulk embedding stays in torch: over 480 chunks ONNX Runtime was
slower (22.6 against 26.9 chunks/s), since sentence-transformers sorts a batch by length.

The export is made on the first query of a data home, from the local model (nothing is
downloaded), checked against torch on probe texts before it is used, and written to
``models/`` in the data home under a name that changes with the model's files. Where it
does not apply (a GPU, fp16 or bf16, a model other than Transformer, Pooling and
Normalize, no tokenizer.json) or fails (no ``onnx`` package, a full disk, a check that
does not match), the query is embedded in torch as before, and the reason is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import QUERY_RUNTIMES
from pipeline.embedder import (
    Embedder,
    _max_seq_length,
    _offline,
    check_precision,
    is_hash_model,
    load_embedder,
    pick_device,
    resolve_model,
)
from pipeline.errors import ConfigError, first_line
from pipeline.fsync import fsync_dir

logger = logging.getLogger(__name__)

# Bumped when the exported graph or its inputs change: older exports are then not used.
EXPORT_FORMAT = 1
_OPSET = 17
# The module types the export covers (modules.json); any other pipeline stays in torch.
_MODULES = ("Transformer", "Pooling", "Normalize")
# Texts the export must embed as torch does before it is used: spaces around, Unicode,
# code, an empty line, and one longer than any model's input (truncation).
_PROBES = (
    "how do I resume an interrupted index",
    "  def upsert(self, ids, vectors):\n\treturn None  ",
    "Größenänderung — naïve café, 東京, emoji 🚀",
    "",
    " ".join(f"token{n} value_{n * 7}" for n in range(600)),
)
_MIN_COSINE = 0.99999
# The export carries torch's vector of _PROBES[0] in its metadata: every load embeds that
# text again and compares, so a file damaged after its export (a flipped byte in the
# weights loads without an error) is made again instead of answering queries wrongly.
_PROBE_KEY = "indexq.probe"
_HEX = "[0-9a-f]" * 16


class OnnxQueryEmbedder:
    """The exported model in an ONNX Runtime session on the CPU; thread-safe (ORT's run is)."""

    precision = "fp32"
    device = "cpu"

    def __init__(self, name: str, path: Path, location: str, max_seq_length: int) -> None:
        import onnxruntime
        import tokenizers

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings go to stderr, not to logging
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._tokenizer = tokenizers.Tokenizer.from_file(str(Path(location) / "tokenizer.json"))
        # tokenizer.json may carry its own padding and truncation (all-MiniLM-L6-v2's pads
        # to 128): a query is cut as sentence-transformers cuts it, and never padded.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_seq_length)
        self.name = name
        self.path = path
        stamped = self._session.get_modelmeta().custom_metadata_map.get(_PROBE_KEY)
        if stamped is None:
            raise ValueError(f"it carries no {_PROBE_KEY} vector")
        expected = np.asarray(json.loads(stamped), dtype=np.float32)
        probe = self._vector(_PROBES[0])
        cosine = _cosine(probe, expected) if probe.shape == expected.shape else 0.0
        if not cosine >= _MIN_COSINE:  # NaN from damaged weights included
            raise ValueError(f"it embeds its probe text {cosine:.6f} in cosine from torch's vector")
        self.dimension = int(probe.shape[-1])

    def token_ids(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def _vector(self, text: str) -> np.ndarray:
        encoding = self._tokenizer.encode(text)
        fields = {
            "input_ids": encoding.ids,
            "attention_mask": encoding.attention_mask,
            "token_type_ids": encoding.type_ids,
        }
        feed = {name: np.asarray([fields[name]], dtype=np.int64) for name in self._inputs}
        return np.asarray(self._session.run(None, feed)[0][0], dtype=np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):  # one at a time: no padding, no attention to pads
            out[row] = self._vector(text)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def load_query_embedder(model: str, device: str, precision: str, cache_dir: Path, runtime: str = "onnx") -> Embedder:
    """The embedder for one process's queries: ONNX Runtime where it applies and works
    (``runtime`` "onnx", the default), else the model in torch as the writer runs it.
    bf16 is used only where this machine computes it, else fp32 (a bf16 query is 0.99995
    in cosine from an fp32 one, so fp32 serves as well)."""
    if runtime not in QUERY_RUNTIMES:
        raise ConfigError(f"query runtime must be one of {', '.join(QUERY_RUNTIMES)}, got {runtime!r}")
    precision = query_precision(precision, device)
    if runtime == "onnx" and precision == "fp32" and not is_hash_model(model) and pick_device(device) == "cpu":
        onnx = _onnx_embedder(model, cache_dir)
        if onnx is not None:
            return onnx
    return load_embedder(model, device, precision)


def query_precision(precision: str, device: str) -> str:
    """``precision`` where this machine computes it for ``device``, else fp32."""
    if precision != "fp32":
        try:
            check_precision(precision, pick_device(device))
        except ConfigError:
            return "fp32"
    return precision


def _onnx_embedder(model: str, cache_dir: Path) -> OnnxQueryEmbedder | None:
    location = resolve_model(model)
    reason = _unsupported(location)
    if reason:
        logger.info("queries embedded in torch: %s", reason)
        return None
    prefix = export_prefix(cache_dir, model, location)
    max_seq = _max_seq_length(location)
    for path in sorted(cache_dir.glob(f"{prefix.name}-{_HEX}.onnx")):
        try:
            if _digest(path) != path.stem.rsplit("-", 1)[1]:
                raise ValueError("its content is not the content it was written with")
            return OnnxQueryEmbedder(model, path, location, max_seq)
        except Exception as exc:  # a damaged export: made again below
            logger.warning(
                "the exported query model %s could not be loaded (%s): exporting it again", path, first_line(exc)
            )
            with contextlib.suppress(OSError):
                path.unlink()
    try:
        return _export(model, location, prefix, max_seq)
    except Exception as exc:
        logger.warning("queries embedded in torch: the model could not be exported to ONNX (%s)", first_line(exc))
        return None


def _unsupported(location: str) -> str | None:
    """Why this model's queries stay in torch, or None."""
    root = Path(location)
    if not root.is_dir():
        return f"{location} is not a local model directory"
    if not (root / "tokenizer.json").is_file():
        return "the model has no tokenizer.json"
    try:
        modules = json.loads((root / "modules.json").read_text())
        kinds = tuple(str(m["type"]).rsplit(".", 1)[-1] for m in modules)
        st_config = root / "config_sentence_transformers.json"
        prompts = json.loads(st_config.read_text()) if st_config.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its modules.json could not be read ({first_line(exc)})"
    if kinds not in (_MODULES, _MODULES[:2]):
        return f"its modules ({', '.join(kinds)}) are not Transformer, Pooling and Normalize"
    if prompts.get("prompts") or prompts.get("default_prompt_name"):
        return "the model declares prompts"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


def export_prefix(cache_dir: Path, model: str, location: str) -> Path:
    """``cache_dir/NAME-KEY``; the export is ``NAME-KEY-DIGEST.onnx``. KEY changes with any
    of the model's files (path, size, modification time) and with EXPORT_FORMAT, so a
    reinstalled model is exported again; DIGEST is the start of the export's own SHA-256,
    checked at every load (a damaged file is made again)."""
    digest = hashlib.sha256(f"{EXPORT_FORMAT}\0{_OPSET}\0{Path(location).resolve()}".encode())
    for file in sorted(Path(location).rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"\0{file.relative_to(location)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or "model")[:64]
    return cache_dir / f"{stem}-{digest.hexdigest()[:16]}"


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _graph(st_model: Any, names: list[str]) -> Any:
    """sentence-transformers' forward pass with plain tensors in and the embedding out."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st_model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.st(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    return Graph().eval()


def _features(st_model: Any, text: str) -> dict[str, Any]:
    """sentence-transformers' own model inputs for one text (``preprocess`` from 6.0)."""
    prepare = getattr(st_model, "preprocess", None) or st_model.tokenize
    return dict(prepare([text]))


_export_lock = threading.Lock()


def _export(model: str, location: str, prefix: Path, max_seq: int) -> OnnxQueryEmbedder | None:
    """Export, check against torch on _PROBES, then publish atomically (owner-only file)."""
    _offline()
    import torch
    from sentence_transformers import SentenceTransformer

    with _export_lock:
        st_model = SentenceTransformer(location, device="cpu")
        if int(st_model.max_seq_length or 0) != max_seq:
            logger.info("queries embedded in torch: the model's sequence length is not its config's")
            return None
        sample = _features(st_model, _PROBES[0])
        names: list[str] = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
        prefix.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{prefix.name}.", dir=prefix.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            axes: dict[str, dict[int, str]] = {n: {0: "texts", 1: "tokens"} for n in names}
            axes["embedding"] = {0: "texts"}
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _graph(st_model, names),
                    tuple(sample[n] for n in names),
                    str(tmp),
                    input_names=names,
                    output_names=["embedding"],
                    dynamic_axes=axes,
                    opset_version=_OPSET,
                    dynamo=False,
                )
            _stamp(tmp, st_model.encode([_PROBES[0]], convert_to_numpy=True, show_progress_bar=False)[0])
            onnx = OnnxQueryEmbedder(model, tmp, location, max_seq)
            problem = _compare(onnx, st_model)
            if problem:
                logger.warning("queries embedded in torch: the ONNX export %s", problem)
                return None
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            path = prefix.parent / f"{prefix.name}-{_digest(tmp)}.onnx"
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    stem = prefix.name.rsplit("-", 1)[0]
    for stale in prefix.parent.glob(f"{stem}-{_HEX}-{_HEX}.onnx"):  # this model's older exports
        if stale != path:
            with contextlib.suppress(OSError):
                stale.unlink()
    logger.info("query model exported to ONNX Runtime: %s", path)
    onnx.path = path  # the session holds the graph already
    return onnx


def _stamp(path: Path, vector: np.ndarray) -> None:
    """Write torch's vector of _PROBES[0] into the export's metadata (_PROBE_KEY)."""
    import onnx

    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = _PROBE_KEY, json.dumps([float(x) for x in vector])
    onnx.save(graph, str(path))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def _compare(onnx: OnnxQueryEmbedder, st_model: Any) -> str | None:
    """Why the export may not stand in for torch on _PROBES, or None."""
    ours = onnx.embed(list(_PROBES))
    theirs = st_model.encode(list(_PROBES), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    for text, mine, want in zip(_PROBES, ours, theirs, strict=True):
        expected = _features(st_model, text)["input_ids"][0].tolist()
        if onnx.token_ids(text) != expected:
            return f"tokenizes {text[:30]!r} differently from sentence-transformers"
        cosine = _cosine(mine, want)
        if not cosine >= _MIN_COSINE:
            return f"embeds {text[:30]!r} {cosine:.6f} in cosine from torch (at least {_MIN_COSINE} needed)"
    return None
