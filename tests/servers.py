"""Real servers for the scale-out tests: redis-server and `chroma run` on loopback ports.

Each is started on a free port in tmp_path and stopped (its whole process group) when
the test module ends, so no test leaves a server running.
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, Proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(work: Path, port: int) -> Proc:
    """redis-server on a loopback port, its append-only file in ``work``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `bash ops/test` installs it (Debian package redis-server)")
    # appendfsync always: an acknowledged enqueue survives a crash of Redis itself,
    # the setting the README asks of a production queue.
    server = Proc(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
         "--appendonly", "yes", "--appendfsync", "always"],
        work / "redis.log",
    )  # fmt: skip

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        server.wait_until(ready, "redis-server", timeout=60)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    server = start_redis(tmp_path_factory.mktemp("redis"), port)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("chroma-server")
    port = free_port()
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
    server = Proc(
        [str(BIN / "chroma"), "run", "--path", str(work / "data"), "--host", "127.0.0.1", "--port", str(port)],
        work / "chroma.log",
        env,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        server.wait_until(ready, "chroma run", timeout=60)
        yield url
    finally:
        server.stop()
