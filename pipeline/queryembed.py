"""A query's embedding outside the writer: the model exported once to ONNX Runtime on a CPU.

One short query through torch costs about 15 ms on this 2-core CPU, most of it eager
execution's overhead per operation rather than arithmetic; the same graph in ONNX Runtime
takes about 7.5 ms, with the same vector (cosine to torch's 0.9999998 at the least over
the benchmark's queries). Bulk embedding stays in torch: over 480 chunks ONNX Runtime was
slower (22.6 against 26.9 chunks/s), since sentence-transformers sorts a batch by length.

The export is made by the first query of a data home that needs it, from the local model
(nothing is downloaded), checked against torch on probe texts, and published in
``models/`` under a name that changes with the model's files. Where it does not apply (a
GPU, fp16 or bf16, a model named by hub id, a model other than Transformer, Pooling and
Normalize, no tokenizer.json, weights over ONNX's 2 GB) or fails (no ``onnx`` package, no
room on the disk, a check that does not match), the query is embedded in torch as
before, and the reason is logged. A failure that would recur is remembered
(``NAME-KEY.failed``) so that later searches do not pay for the attempt again.

With the runtime "onnx-int8", the export's linear layers are quantized to int8 once
(ONNX Runtime's dynamic quantization, per channel; ``EXPORT-int8-DIGEST.onnx`` beside
it), published the same way and checked against it: about 0.6 of fp32's time per query
here, the vector moved by about half a percent. Where it cannot be made, or computes too
far from fp32 on this CPU, the fp32 export serves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_QUERY_RUNTIME, QUERY_RUNTIMES
from pipeline.embedder import (
    Embedder,
    already,
    check_precision,
    is_hash_model,
    load_embedder,
    max_seq_length,
    offline,
    pick_device,
    resolve_model,
    unit_rows,
)
from pipeline.errors import ConfigError, first_line
from pipeline.fsync import fsync_dir

logger = logging.getLogger(__name__)

# Bumped when the exported graph or its inputs change: older exports are then not used.
EXPORT_FORMAT = 1
_OPSET = 17
# The module types the export covers (modules.json); any other pipeline stays in torch.
_MODULES = ("Transformer", "Pooling", "Normalize")
# One ONNX file holds at most 2 GB (protobuf); larger weights would need external data.
_MAX_WEIGHT_BYTES = 1900 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Texts the export must embed as torch does before it is published: spaces around,
# Unicode, code, the tokenizer's special tokens written out as text, an empty line, and
# one longer than any model's input (truncation).
_PROBES = (
    "how do I resume an interrupted index",
    "  def upsert(self, ids, vectors):\n\treturn None  ",
    "Größenänderung — naïve café, 東京, emoji 🚀",
    "see [SEP] and [MASK] or <s> </s> <mask> <pad> <|endoftext|> [CLS] [UNK]",
    "",
    " ".join(f"token{n} value_{n * 7}" for n in range(600)),
)
_MIN_COSINE = 0.99999
# The export carries torch's vector of _PROBES[0] in its metadata: every load embeds that
# text again and compares, so an export that computes otherwise than when it was made
# (another ONNX Runtime, weights changed under a matching name) is made again.
_PROBE_KEY = "indexq.probe"
_STAMP_COSINE = 0.99999
# An int8 model (per-channel dynamic quantization) moves a query by about half a percent:
# cosine to fp32 0.995 mean, 0.992 least over the retrieval benchmark's 71 questions and
# 0.993 / 0.981 over 60 twelve-word code snippets, top-10 overlap 95 %. Below this, its
# quantized arithmetic is not what it was made for (a CPU whose kernels saturate, say).
_INT8_COSINE = 0.97
_HEX = "[0-9a-f]" * 16
# Errors of the moment (the disk, its permissions): not remembered as a failed export.
_PASSING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
# The same in words, from code that does not raise OSError. The last: a model file just
# written and read back cut short, as ONNX's C++ writer leaves it on a full disk, silently.
_PASSING_TEXTS = ("No space left", "File too large", "Disk quota", "Wire format was corrupt")


class OnnxQueryEmbedder:
    """The exported model in an ONNX Runtime session on the CPU; thread-safe (ORT's run is).
    ``precision``: "fp32" as exported, or "int8" (its linear layers quantized)."""

    device = "cpu"
    cpu_bound = True  # for the Embedder protocol: queries only, never the writer's bulk
    launches = False

    def __init__(self, name: str, path: Path, location: str, max_seq_length: int, precision: str = "fp32") -> None:
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
        self.location = location
        self.max_seq_length = max_seq_length
        self.precision = precision
        stamped = self._session.get_modelmeta().custom_metadata_map.get(_PROBE_KEY)
        if stamped is None:
            raise ValueError(f"it carries no {_PROBE_KEY} vector")
        self.stamp = np.asarray(json.loads(stamped), dtype=np.float32)
        probe = self._vector(_PROBES[0])
        cosine = _cosine(probe, self.stamp) if probe.shape == self.stamp.shape else 0.0
        if not cosine >= (_STAMP_COSINE if precision == "fp32" else _INT8_COSINE):  # NaN (damaged weights) too
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
        return unit_rows(out)

    def start(self, texts: list[str]) -> Callable[[], np.ndarray]:
        return already(self.embed(texts))

    def lengths(self, texts: list[str]) -> list[int]:
        return [0] * len(texts)  # one text at a time: nothing is padded


def load_query_embedder(
    model: str,
    device: str,
    precision: str,
    cache_dir: Path,
    runtime: str = DEFAULT_QUERY_RUNTIME,
    min_free_mb: int = 0,
) -> Embedder:
    """The embedder for one process's queries: ONNX Runtime where it applies and works
    (``runtime`` "onnx", or "onnx-int8" for its int8 quantization where that is made and
    passes its check, else fp32), else the model in torch as the writer runs it. bf16 only where
    this machine computes it, else fp32 (``query_precision``). An export leaves at least
    ``min_free_mb`` free on the disk of ``cache_dir`` (the writer's own margin)."""
    if runtime not in QUERY_RUNTIMES:
        raise ConfigError(f"query runtime must be one of {', '.join(QUERY_RUNTIMES)}, got {runtime!r}")
    precision = query_precision(precision, device)
    if runtime.startswith("onnx") and precision == "fp32" and not is_hash_model(model) and pick_device(device) == "cpu":
        onnx = _onnx_embedder(model, cache_dir, min_free_mb, int8=runtime == "onnx-int8")
        if onnx is not None and runtime == "onnx-int8" and onnx.precision == "fp32":
            return _int8_embedder(onnx, min_free_mb) or onnx
        if onnx is not None:
            return onnx
    return load_embedder(model, device, precision)


def query_precision(precision: str, device: str) -> str:
    """``precision`` where this machine computes it for ``device``, else fp32 (a bf16
    query is 0.99995 in cosine from an fp32 one, so fp32 serves as well)."""
    if precision != "fp32":
        try:
            check_precision(precision, pick_device(device))
        except ConfigError:
            return "fp32"
    return precision


def _onnx_embedder(model: str, cache_dir: Path, min_free_mb: int, int8: bool = False) -> OnnxQueryEmbedder | None:
    """The fp32 export, made if need be; with ``int8``, its int8 model where one is made
    already (it checks itself against torch's vector: the fp32 file is not loaded)."""
    location = resolve_model(model)
    reason = _unsupported(location)
    if reason:
        logger.info("queries embedded in torch: %s", reason)
        return None
    prefix = export_prefix(cache_dir, model, location)
    for fp32 in sorted(prefix.parent.glob(f"{prefix.name}-{_HEX}.onnx")) if int8 else ():
        found = _published(model, fp32.with_name(f"{fp32.stem}-int8"), location, precision="int8")
        if found is not None:
            return found
    found = _published(model, prefix, location)
    if found is not None:
        return found
    try:
        with _export_lock, _locked(cache_dir):
            # Another process may have published it while this one waited for the lock.
            return _published(model, prefix, location) or _export(model, location, prefix, min_free_mb)
    except Exception as exc:
        logger.warning("queries embedded in torch: the model could not be exported to ONNX (%s)", first_line(exc))
        return None


def _published(
    model: str, prefix: Path, location: str, max_seq: int | None = None, precision: str = "fp32"
) -> OnnxQueryEmbedder | None:
    """The export of ``prefix`` if one is there and sound; a damaged one is removed."""
    for path in sorted(prefix.parent.glob(f"{prefix.name}-{_HEX}.onnx")):
        if not path.is_file():  # a folder by that name: publishing over it fails, and is remembered
            continue
        try:
            if _digest(path) != path.stem.rsplit("-", 1)[1]:
                raise ValueError("its content is not the content it was written with")
            return OnnxQueryEmbedder(model, path, location, max_seq or max_seq_length(location), precision)
        except Exception as exc:  # a damaged export: made again by the caller
            logger.warning(
                "the exported query model %s could not be loaded (%s): exporting it again", path, first_line(exc)
            )
            with contextlib.suppress(OSError):
                path.unlink()
    return None


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One export at a time per folder, across processes (a waiter then finds it made)."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(cache_dir / ".export.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
        declared = json.loads(st_config.read_text()) if st_config.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its modules.json could not be read ({first_line(exc)})"
    if kinds not in (_MODULES, _MODULES[:2]):
        return f"its modules ({', '.join(kinds)}) are not Transformer, Pooling and Normalize"
    if not isinstance(declared, dict) or declared.get("prompts") or declared.get("default_prompt_name"):
        return "the model declares prompts"
    if _weight_bytes(root) > _MAX_WEIGHT_BYTES:
        return "its weights are larger than one ONNX file holds (2 GB)"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


def _weight_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)


def export_prefix(cache_dir: Path, model: str, location: str) -> Path:
    """``cache_dir/NAME-PLACE-KEY``; the export is ``NAME-PLACE-KEY-DIGEST.onnx``. PLACE
    names the model's folder, KEY changes with any of its files (path, size, modification
    time) and with EXPORT_FORMAT, so a reinstalled model is exported again; DIGEST is the
    start of the export's own SHA-256, checked at every load."""
    place = hashlib.sha256(str(Path(location).resolve()).encode()).hexdigest()[:8]
    digest = hashlib.sha256(f"{EXPORT_FORMAT}\0{_OPSET}\0{place}".encode())
    for file in sorted(Path(location).rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"\0{file.relative_to(location)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name).lstrip(".")[:64] or "model"
    return cache_dir / f"{stem}-{place}-{digest.hexdigest()[:16]}"


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


def _export(model: str, location: str, prefix: Path, min_free_mb: int) -> OnnxQueryEmbedder | None:
    """Export, check against torch on _PROBES, publish (``_build``)."""
    try:
        import onnx  # noqa: F401  (torch.onnx writes the file with it)
    except ImportError:
        logger.info("queries embedded in torch: the onnx package is not installed")
        return None
    # An fp16 checkpoint becomes an fp32 export: room for twice the weights, and the margin.
    needed = _weight_bytes(Path(location)) * 2.2 + min_free_mb * 2**20
    family = prefix.name.rsplit("-", 1)[0]
    return _build(
        prefix, needed, lambda target: _make(model, location, target), "the ONNX export", "queries embedded in torch",
        stale=f"{family}-{_HEX}-{_HEX}*.onnx",  # this model's older exports, and their int8 models
    )  # fmt: skip


def _build(
    prefix: Path,
    needed: float,
    make: Callable[[Path], OnnxQueryEmbedder | str],
    what: str,
    instead: str,
    stale: str,
) -> OnnxQueryEmbedder | None:
    """Make a model file with ``make`` in a temporary folder beside ``prefix`` and publish it
    atomically (owner-only) as ``PREFIX-DIGEST.onnx``, removing the files ``stale`` matches
    that were made for something else. Called with the folder's export lock held, so any
    temporary folder there is a dead one's. A failure that would recur is remembered."""
    folder = prefix.parent
    failed = folder / f"{prefix.name}.failed"
    before = _remembered(failed)
    if before is not None:
        logger.info("%s: %s failed before (%s); delete %s to retry", instead, what, before, failed)
        return None
    family = prefix.name.rsplit("-", 1)[0]
    for dead in folder.glob(f".{family}-*"):  # left by an export that was killed
        shutil.rmtree(dead, ignore_errors=True)
    if shutil.disk_usage(folder).free < needed:
        raise OSError(errno.ENOSPC, f"less than {needed / 2**20:.0f} MB free in {folder} for {what}")
    work = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.", dir=folder))
    try:
        made = make(work / "model.onnx")
        if isinstance(made, str):
            _remember(failed, made)
            logger.warning("%s: %s %s", instead, what, made)
            return None
        path = folder / f"{prefix.name}-{_digest(made.path)}.onnx"
        os.chmod(made.path, 0o600)  # written under the process's umask
        os.replace(made.path, path)
        fsync_dir(folder)
        made.path = path  # the session holds the graph already
    except Exception as exc:
        if not _passing(exc) and shutil.disk_usage(folder).free >= needed:
            _remember(failed, first_line(exc))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for old in folder.glob(stale):
        if old != path and not old.name.startswith(f"{path.stem}-"):  # nor what was made from it
            with contextlib.suppress(OSError):
                old.unlink()
    logger.info("query model published: %s", path)
    return made


def _int8_embedder(fp32: OnnxQueryEmbedder, min_free_mb: int) -> OnnxQueryEmbedder | None:
    """The export with its linear layers quantized to int8 (ONNX Runtime's dynamic
    quantization, per channel), made once beside it as ``EXPORT-int8-DIGEST.onnx`` and
    checked against it on _PROBES; None (the fp32 export serves) where it cannot be made
    or where this machine computes it too far from fp32."""
    prefix = fp32.path.with_name(f"{fp32.path.stem}-int8")
    found = _published(fp32.name, prefix, fp32.location, fp32.max_seq_length, "int8")
    if found is not None:
        return found
    try:
        with _export_lock, _locked(prefix.parent):
            return _published(fp32.name, prefix, fp32.location, fp32.max_seq_length, "int8") or _build(
                # The quantizer's full-size copy (see _quantize) and the int8 model, a quarter.
                prefix, fp32.path.stat().st_size * 1.3 + min_free_mb * 2**20, lambda target: _quantize(fp32, target),
                "the int8 model", "queries embedded in fp32", stale=f"{prefix.name}-{_HEX}.onnx",
            )  # fmt: skip
    except Exception as exc:
        logger.warning("queries embedded in fp32: the int8 model could not be made (%s)", first_line(exc))
        return None


def _quantizer_advice(record: logging.LogRecord) -> bool:
    """False for what ONNX Runtime's quantizer logs (a root-logger filter)."""
    return f"onnxruntime{os.sep}quantization" not in record.pathname


def _quantize(fp32: OnnxQueryEmbedder, target: Path) -> OnnxQueryEmbedder | str:
    """The int8 model of ``fp32`` at ``target``, or why it cannot stand in for it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer's advice (pre-process the model first, and the like) goes to the root
    # logger itself: held back there, and only its, while it runs.
    root = logging.getLogger()
    root.addFilter(_quantizer_advice)
    # Its shape inference writes a full-size copy beside the file it is given and reads it
    # back: given a link in the temporary folder, that copy is made there, and swept with it.
    source = target.with_name("fp32.onnx")
    source.symlink_to(fp32.path)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.removeFilter(_quantizer_advice)
    _stamp(target, fp32.stamp)  # torch's vector, not fp32's: the check at load is against torch
    with open(target, "rb") as f:
        os.fsync(f.fileno())
    try:
        made = OnnxQueryEmbedder(fp32.name, target, fp32.location, fp32.max_seq_length, "int8")
    except ValueError as exc:  # its probe, too far from torch's vector
        return str(exc).removeprefix("it ")
    ours, theirs = made.embed(list(_PROBES)), fp32.embed(list(_PROBES))
    for text, mine, want in zip(_PROBES, ours, theirs, strict=True):
        cosine = _cosine(mine, want)
        if not cosine >= _INT8_COSINE:
            return f"embeds {text[:30]!r} {cosine:.6f} in cosine from fp32 (at least {_INT8_COSINE} needed)"
    return made


def _make(model: str, location: str, target: Path) -> OnnxQueryEmbedder | str:
    """The checked export at ``target``, or why it cannot stand in for torch."""
    offline()
    import torch
    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(location, device="cpu")
    max_seq = max_seq_length(location)
    if int(st_model.max_seq_length or 0) != max_seq:
        return "the model's sequence length is not its config's"
    sample = _features(st_model, _PROBES[0])
    names: list[str] = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    axes: dict[str, dict[int, str]] = {n: {0: "texts", 1: "tokens"} for n in names}
    axes["embedding"] = {0: "texts"}
    # The exporter's warnings (tracing, deprecation) say nothing to a person searching.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _graph(st_model, names),
            tuple(sample[n] for n in names),
            str(target),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=_OPSET,
            dynamo=False,
        )
    _stamp(target, st_model.encode([_PROBES[0]], convert_to_numpy=True, show_progress_bar=False)[0])
    with open(target, "rb") as f:
        os.fsync(f.fileno())
    made = OnnxQueryEmbedder(model, target, location, max_seq)
    return _compare(made, st_model) or made


def _passing(exc: BaseException) -> bool:
    """An error of the moment (the disk, its permissions), anywhere in the chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _PASSING_ERRNOS:
            return True
        if any(text in str(seen) for text in _PASSING_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _remember(failed: Path, reason: str) -> None:
    """Record a failed export so that later searches skip it, while ONNX Runtime's
    version is the same (best effort: a home that cannot take it just tries again)."""
    import onnxruntime

    record = {"reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "onnxruntime": onnxruntime.__version__}
    with contextlib.suppress(OSError):
        failed.write_text(json.dumps(record) + "\n")


def _remembered(failed: Path) -> str | None:
    """The reason of an earlier failed export under this ONNX Runtime, or None."""
    import onnxruntime

    try:
        record = json.loads(failed.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("onnxruntime") != onnxruntime.__version__:
        return None
    return str(record.get("reason", "unknown"))[:300]


def _stamp(path: Path, vector: np.ndarray) -> None:
    """Write torch's vector of _PROBES[0] into the export's metadata (_PROBE_KEY)."""
    import onnx

    graph = onnx.load(str(path))
    for old in [p for p in graph.metadata_props if p.key == _PROBE_KEY]:  # carried over by the quantizer
        graph.metadata_props.remove(old)
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
