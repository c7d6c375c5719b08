"""Query embeddings from the running writer, over a Unix socket in the data home.

Loading the model is most of a search from the shell (importing torch and
sentence-transformers, then the weights: ~12 s on 2 cores). The writer has it loaded:
it answers ``{"text", "model", "device"}`` with the text's vector, so that ``indexq
search`` imports neither and no second copy of the model is made. ``ask`` returns None
whenever the writer cannot answer (none running, a stale socket left by a killed
writer, another model, device or precision, a text over ``MAX_QUERY_CHARS``, no answer within the
timeout); the caller then loads the model as before.

Frames are a 4-byte big-endian length and UTF-8 JSON, never pickle: the request; then
``{"accepted": true}`` at once (or ``{"error"}``), so that a hung writer is told from a
busy one; then ``{"vector": [...]}`` once the embedder is free. The socket is 0600
in the 0700 data home, and the server answers only peers of its own user (SO_PEERCRED
where the OS has it). It is local: with a shared queue or a Chroma server, a search on
the writer's machine uses it and one elsewhere loads the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DEFAULT_QUERY_TIMEOUT, MAX_QUERY_CHARS, QUERY_ACCEPT_TIMEOUT
from pipeline.embedder import Embedder, model_identity
from pipeline.errors import first_line
from pipeline.guards import unicode_problem

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
# A request is the text (<= MAX_QUERY_CHARS, up to 12 bytes each once JSON-escaped: a
# character past U+FFFF is a surrogate pair, \\ud83d\\ude80) and three names.
MAX_REQUEST_BYTES = MAX_QUERY_CHARS * 12 + 4096
# An answer is 384-4096 floats as JSON text; anything far larger is not ours.
MAX_ANSWER_BYTES = 1 << 20
# A peer's whole request must arrive within this long of its acceptance, and each answer
# frame must be taken within this long: a timeout per recv would let a peer that drips a
# byte now and then hold a slot for hours.
READ_TIMEOUT = 2.0
# Queries answered at once; more are closed at once (the caller loads the model itself).
MAX_CLIENTS = 8
# sun_path holds 108 bytes on Linux (104 on macOS), its NUL included.
_SUN_PATH_MAX = 104


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """``path`` as bind() and connect() can take it: a deep data home goes through /proc/self/fd."""
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        yield str(path)
        return
    if not Path("/proc/self/fd").is_dir():
        raise OSError(f"socket path too long for this system: {path}")
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _until(conn: socket.socket, deadline: float) -> None:
    """Give the next socket call on ``conn`` what is left until ``deadline`` (monotonic)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    conn.settimeout(left)


def _recv_exact(conn: socket.socket, size: int, deadline: float) -> bytes:
    chunks, left = [], size
    while left:
        _until(conn, deadline)
        chunk = conn.recv(min(left, 65536))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(conn: socket.socket, limit: int, deadline: float) -> Any:
    """One frame, all of it by ``deadline`` (monotonic)."""
    (size,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size, deadline))
    if size > limit:
        raise ValueError(f"frame of {size} bytes (at most {limit})")
    return json.loads(_recv_exact(conn, size, deadline).decode("utf-8"))


def _send_frame(conn: socket.socket, value: Any, deadline: float) -> None:
    body = json.dumps(value, separators=(",", ":")).encode("utf-8")
    _until(conn, deadline)
    conn.sendall(_LENGTH.pack(len(body)) + body)  # the timeout bounds the whole sendall


def _peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user id, where the OS says (Linux: SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return int(uid)


def same_model(asked: str, running: str) -> bool:
    """One model by two names (``all-MiniLM-L6-v2`` and the packaged copy, a symlink and its
    folder; ``embedder.model_identity``). A search sends its model's identity, so a relative
    path means the searching process's folder, not the writer's."""
    return model_identity(asked) == model_identity(running)


def same_device(asked: str, running: str) -> bool:
    """``auto`` takes the writer's device; ``cuda`` is the writer's ``cuda:0``; else exactly the one named."""
    return asked in ("auto", running) or (asked == "cuda" and running == "cuda:0")


class QueryServer:
    """Serves ``embedder``'s query vectors on ``path`` until ``close``; the embedder serializes its callers."""

    def __init__(self, path: Path, embedder: Embedder) -> None:
        self.path = path
        self.embedder = embedder
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._closed = threading.Event()
        self._spawn_failed = False  # logged once: at the thread limit it would fail on every query
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._inode = self._bind()
            self._sock.listen(MAX_CLIENTS)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._accept, name="indexq-query-server", daemon=True)
        self._thread.start()

    def _bind(self) -> int:
        # Bound under a temporary name, made 0600, then renamed over whatever a killed
        # writer left there (this process holds the writer lock: no live writer owns it).
        # The socket's name so never exists with the umask's mode.
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        with _reachable(temp) as where:
            self._sock.bind(where)
        try:
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)  # fails where a folder has the socket's name
            return os.stat(self.path).st_ino
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: try again shortly
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()  # busy: the caller loads the model itself
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="indexq-query", daemon=True).start()
            except RuntimeError as exc:  # the process's thread limit: this query loads the model
                self._slots.release()
                conn.close()
                if not self._spawn_failed:
                    self._spawn_failed = True
                    logger.warning("query socket: cannot start a thread (%s); searches load the model", exc)

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                uid = _peer_uid(conn)
                if uid is not None and uid != os.geteuid():
                    logger.warning("query socket: refused a peer of uid %d", uid)
                    return
                deadline = time.monotonic() + READ_TIMEOUT
                try:
                    text, refused = self.check(_recv_frame(conn, MAX_REQUEST_BYTES, deadline))
                except (ValueError, UnicodeDecodeError) as exc:
                    text, refused = "", f"bad request: {first_line(exc)}"
                if refused:
                    _send_frame(conn, {"error": refused}, deadline)
                    return
                _send_frame(conn, {"accepted": True}, deadline)
                # Waits for the micro-batch the writer may be embedding (the embedder's lock).
                vector = self.embedder.embed([text])[0]
                _send_frame(conn, {"vector": vector.tolist()}, time.monotonic() + READ_TIMEOUT)
        except OSError as exc:  # the caller gave up (its timeout) or went away
            logger.debug("query socket: %s", first_line(exc))
        except Exception:
            logger.exception("query socket: a query failed")
        finally:
            self._slots.release()

    def check(self, request: Any) -> tuple[str, str | None]:
        """The request's text, and why it is refused (None: it is answered)."""
        if not isinstance(request, dict):
            raise ValueError("not an object")
        text, model = request.get("text"), request.get("model")
        device, precision = request.get("device", "auto"), request.get("precision", "fp32")
        if not (isinstance(text, str) and isinstance(model, str) and isinstance(device, str)
                and isinstance(precision, str)):  # fmt: skip
            raise ValueError("text, model, device and precision must be strings")
        if len(text) > MAX_QUERY_CHARS:
            return text, f"text of {len(text)} characters (at most {MAX_QUERY_CHARS})"
        if (unicode := unicode_problem(text)) is not None:  # JSON spells a lone surrogate; no tokenizer takes one
            return text, f"text {unicode}"
        if not same_model(model, self.embedder.name):
            return text, f"this writer embeds with {self.embedder.name!r}, not {model!r}"
        if not same_device(device, self.embedder.device):
            return text, f"this writer embeds on {self.embedder.device!r}, not {device!r}"
        # A search embeds in fp32, or in bf16 when that is its setting: a writer in another
        # precision would give other vectors.
        running = getattr(self.embedder, "precision", "fp32")
        if precision != running:
            return text, f"this writer embeds in {running}, not {precision}"
        return text, None

    def close(self) -> None:
        """Stop answering and remove the socket (unless another writer has put its own there)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()


def serve(path: Path, embedder: Embedder) -> QueryServer | None:
    """The writer's query server; None (logged) if the socket cannot be made: search then loads the model."""
    try:
        server = QueryServer(path, embedder)
    except OSError as exc:
        logger.warning("query socket %s not served (%s): `indexq search` will load the model", path, first_line(exc))
        return None
    logger.info("serving query embeddings on %s", path)
    return server


def ask(
    path: Path, text: str, model: str, device: str = "auto", precision: str = "fp32",
    accept_timeout: float = QUERY_ACCEPT_TIMEOUT, timeout: float = DEFAULT_QUERY_TIMEOUT,
) -> np.ndarray | None:  # fmt: skip
    """The running writer's vector for ``text``, or None when it cannot give one (see the module's docstring)."""
    if len(text) > MAX_QUERY_CHARS or unicode_problem(text) is not None:
        return None
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return None
    except OSError:
        return None  # no writer has served this data home
    start = time.monotonic()
    accepted_by, deadline = start + accept_timeout, start + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn, _reachable(path) as where:
            conn.settimeout(accept_timeout)
            conn.connect(where)
            _send_frame(conn, {"text": text, "model": model, "device": device, "precision": precision}, accepted_by)
            answer = _recv_frame(conn, MAX_ANSWER_BYTES, accepted_by)
            if isinstance(answer, dict) and answer.get("accepted") is True:
                answer = _recv_frame(conn, MAX_ANSWER_BYTES, deadline)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        # ECONNREFUSED: a socket left by a killed writer; TimeoutError: a hung writer.
        logger.info("query socket %s did not answer (%s): loading the model", path, first_line(exc))
        return None
    if not isinstance(answer, dict) or "error" in answer:
        error = answer.get("error") if isinstance(answer, dict) else answer
        logger.info("query socket %s: %s; loading the model", path, error)
        return None
    vector = answer.get("vector")
    if not isinstance(vector, list) or not vector or not all(isinstance(x, (int, float)) for x in vector):
        logger.info("query socket %s: an answer without a vector; loading the model", path)
        return None
    return np.asarray(vector, dtype=np.float32)
