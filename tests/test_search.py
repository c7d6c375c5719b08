"""`indexq search` asks the running writer for the query's vector (pipeline.queryserver).

Real writers in subprocesses, real Chroma directories; the real model where the claim is
about it (same hits as an in-process search, no torch in the searching process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import api
from pipeline.config import MAX_QUERY_CHARS, Config
from pipeline.embedder import HashEmbedder, no_gpu_here
from pipeline.errors import BadInputError, NotFoundError
from pipeline.queryembed import OnnxQueryEmbedder
from pipeline.queryserver import MAX_CLIENTS, READ_TIMEOUT, QueryServer, ask, serve
from tests.conftest import BIN, Proc, copy_corpus, env_for, run_cli, start_worker, wait_for

QUERY = "decode a JSON document into a Python object"
MODEL_MODULES = ("torch", "sentence_transformers", "transformers")

# Searches in a fresh interpreter, as the shell does; prints the hits and which model
# libraries that process imported.
SEARCH_IN_SUBPROCESS = """
import json, sys
from pipeline import api
hits = api.search(sys.argv[1], sys.argv[2], 5)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "sentence_transformers", "transformers"})
print(json.dumps({"hits": hits, "loaded": loaded}))
"""


def _search_subprocess(home: Path, **extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SEARCH_IN_SUBPROCESS, QUERY, "code"],
        env=env_for(home, **extra), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _index(home: Path, corpus: Path, **extra: str) -> None:
    done = run_cli(home, "index", str(corpus), "--collection", "code", "--wait", timeout=900, **extra)
    assert done.returncode == 0, done.stderr
    assert " 0 failed" in done.stderr


def _writer(procs: list[Proc], home: Path, **extra: str) -> Proc:
    writer = start_worker(procs, home, **extra)
    writer.wait_started(timeout=600)
    wait_for(lambda: (home / "query.sock").exists(), 60, "the query socket")
    return writer


def _ids(hits: list[dict[str, Any]]) -> list[str]:
    return [h["id"] for h in hits]


@pytest.mark.e2e
def test_search_through_the_writer_equals_an_in_process_search(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", ["json/decoder.py", "json/__init__.py", "shlex.py"])
    writer = _writer(procs, home)
    _index(home, corpus)

    through = _search_subprocess(home)
    assert through["loaded"] == [], "the search loaded the model instead of asking the writer"
    assert len(through["hits"]) == 5
    cli = run_cli(home, "search", QUERY, "--collection", "code", "--json", timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == through["hits"]

    assert writer.terminate() == 0
    assert not (home / "query.sock").exists()
    # No writer: this process loads the model itself.
    local = api.search(QUERY, "code", 5, Config(home=home))
    # Through ONNX Runtime, the model exported to the data home (owner-only) on this first use.
    (export,) = (home / "models").glob("*.onnx")
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    assert isinstance(api._query_embedder(Config(home=home), "fp32"), OnnxQueryEmbedder)
    assert _ids(local) == _ids(through["hits"])
    for mine, theirs in zip(local, through["hits"], strict=True):
        assert mine["distance"] == pytest.approx(theirs["distance"], abs=1e-5)
        assert (mine["document"], mine["metadata"]) == (theirs["document"], theirs["metadata"])
    # A fresh process with the export in place, on a machine without a GPU: no torch at all.
    alone = _search_subprocess(home)
    if no_gpu_here():
        assert alone["loaded"] == [], "a search with the model exported still imported torch"
    assert _ids(alone["hits"]) == _ids(through["hits"])


def test_a_socket_left_by_a_killed_writer_does_not_break_search(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", ["json/decoder.py", "shlex.py"])
    writer = _writer(procs, home, INDEXQ_MODEL="hash:384")
    _index(home, corpus, INDEXQ_MODEL="hash:384")
    served = _search_subprocess(home, INDEXQ_MODEL="hash:384")["hits"]
    assert len(served) == 5

    writer.kill9()
    assert stat.S_ISSOCK((home / "query.sock").stat().st_mode)  # left behind
    assert ask(home / "query.sock", QUERY, "hash:384") is None
    stale = run_cli(home, "search", QUERY, "--collection", "code", "--json", INDEXQ_MODEL="hash:384")
    assert stale.returncode == 0, stale.stderr
    assert json.loads(stale.stdout) == served

    # The next writer puts its own socket in place of the stale one, and answers.
    _writer(procs, home, INDEXQ_MODEL="hash:384")
    vector = ask(home / "query.sock", QUERY, "hash:384")
    assert vector is not None
    assert vector.tolist() == HashEmbedder("hash:384").embed([QUERY])[0].tolist()


def test_the_socket_is_owner_only_and_answers_only_its_model(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    writer = _writer(procs, home, INDEXQ_MODEL="hash:384")
    path = home / "query.sock"
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700

    assert ask(path, "x", "hash:384") is not None
    assert ask(path, "x", "hash:385") is None  # another model: the search loads its own
    assert ask(path, "x", "hash:384", device="cuda:1") is None  # another device
    assert ask(path, "x", "hash:384", precision="fp16") is None  # search embeds in fp32
    assert ask(path, "x" * (MAX_QUERY_CHARS + 1), "hash:384") is None
    # An oversized frame is refused with an error, not read.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall((1 << 30).to_bytes(4, "big"))
        size = int.from_bytes(conn.recv(4), "big")
        assert "bad request" in json.loads(conn.recv(size))["error"]

    if os.geteuid() == 0:
        _another_user_is_refused(path)
        wait_for(lambda: "refused a peer of uid 65534" in writer.output(), 30, "the refusal in the writer's log")

    assert writer.terminate() == 0
    assert not path.exists()


def _another_user_is_refused(path: Path) -> None:
    """Even with the file modes opened up, a peer of another uid gets no answer (SO_PEERCRED)."""
    home_mode = stat.S_IMODE(path.parent.stat().st_mode)
    os.chmod(path, 0o666)
    os.chmod(path.parent, 0o711)
    # nobody reaches the socket from inside the home (tmp_path's parents are 0700).
    script = (
        "import os, socket, sys\n"
        "os.chdir(sys.argv[1]); os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.settimeout(30)\n"
        "s.connect('query.sock')\n"
        "try:\n"  # the server may close before the request is sent: a broken pipe
        "    s.sendall(b'\\x00\\x00\\x00\\x02{}')\n"
        "    print(repr(s.recv(100)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print('reset')\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", script, str(path.parent)], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    finally:
        os.chmod(path.parent, home_mode)
        os.chmod(path, 0o600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("b''", "reset")  # closed without a word


def test_search_with_no_writer_loads_the_model_itself(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "src", ["shlex.py"])
    writer = _writer(procs, home, INDEXQ_MODEL="hash:384")
    _index(home, corpus, INDEXQ_MODEL="hash:384")
    assert writer.terminate() == 0
    done = subprocess.run(
        [str(BIN / "indexq"), "search", QUERY, "-c", "code", "-k", "2", "--json"],
        env=env_for(home, INDEXQ_MODEL="hash:384"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 2


@pytest.fixture
def server(tmp_path: Path) -> Any:
    """A query server in this process, on the hash embedder (no writer, no Chroma)."""
    served = QueryServer(tmp_path / "query.sock", HashEmbedder("hash:384"))
    yield served
    served.close()


def _drip(path: Path, cut_off: list[float]) -> None:
    """A peer of the right user that sends a valid request one byte every 0.5 s (under the
    2 s a recv waits); records how long the server kept it."""
    body = json.dumps({"text": QUERY, "model": "hash:384"}).encode()
    frame = len(body).to_bytes(4, "big") + body  # ~80 bytes: ~40 s at this pace
    start = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        try:
            for byte in frame:
                conn.sendall(bytes([byte]))
                time.sleep(0.5)
            conn.settimeout(30)
            conn.recv(1)
        except OSError:
            pass  # EPIPE or a reset: the server closed it
        cut_off.append(time.monotonic() - start)


def test_a_peer_dripping_its_request_is_cut_off_and_search_answers(server: QueryServer) -> None:
    cut_off: list[float] = []
    drips = [threading.Thread(target=_drip, args=(server.path, cut_off)) for _ in range(MAX_CLIENTS)]
    for drip in drips:
        drip.start()
    time.sleep(0.5)
    assert ask(server.path, QUERY, "hash:384") is None  # every slot is held: busy
    for drip in drips:
        drip.join(timeout=60)
    # Cut off at the request's deadline, not after its last byte (~40 s) or never.
    assert len(cut_off) == MAX_CLIENTS and max(cut_off) < READ_TIMEOUT + 5, cut_off
    vector = ask(server.path, QUERY, "hash:384")
    assert vector is not None
    assert vector.tolist() == HashEmbedder("hash:384").embed([QUERY])[0].tolist()


def test_no_thread_for_a_query_frees_its_slot_and_the_server_goes_on(
    server: QueryServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The thread limit (RuntimeError from Thread.start) for the next MAX_CLIENTS queries.
    start, failures = threading.Thread.start, [MAX_CLIENTS]

    def start_or_fail(thread: threading.Thread) -> None:
        if thread.name == "indexq-query" and failures[0]:
            failures[0] -= 1
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    for _ in range(MAX_CLIENTS):
        assert ask(server.path, QUERY, "hash:384") is None  # this search loads the model
    assert ask(server.path, QUERY, "hash:384") is not None  # no slot leaked, still accepting
    assert [r.message for r in caplog.records].count(
        "query socket: cannot start a thread (can't start new thread); searches load the model"
    ) == 1


def test_an_empty_search_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    home = tmp_path / "never-made"
    for text in ("", "  \n\t"):
        result = run_cli(home, "search", text, "-c", "docs")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("Error: the search text is empty"), result.stderr
    assert not home.exists()
    with pytest.raises(BadInputError):
        api.search(" ", "docs", config=Config(home=home))


def test_a_search_text_that_is_not_utf8_or_a_bad_k_is_refused_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "never-made"
    # 0xE9 is Latin-1's é: not UTF-8, so Python reads the argument's byte as '\udce9'.
    done = subprocess.run(
        [str(BIN / "indexq").encode(), b"search", b"caf\xe9", b"-c", b"docs"],
        env=env_for(home), capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode().splitlines() == [
        "Error: the search text holds a lone UTF-16 surrogate ('\\udce9' at character 3)",
        "Hint: search with UTF-8 text (a command line's byte of another encoding reads as '\\udc80' to '\\udcff')",
    ]
    config = Config(home=home)
    with pytest.raises(BadInputError, match="lone UTF-16 surrogate"):
        api.search("\ud800bread", "docs", config=config)
    for k in (0, -1, 1001, 2.5, "3", True):
        with pytest.raises(BadInputError, match="k must be a whole number from 1 to 1000"):
            api.search("bread", "docs", k=k, config=config)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="no indexq data home"):  # numpy's integers pass as k
        api.search("bread", "docs", k=np.int64(3), config=config)  # type: ignore[arg-type]
    assert not home.exists()


def test_the_query_socket_refuses_a_lone_surrogate_and_answers_astral_characters(
    server: QueryServer, caplog: pytest.LogCaptureFixture
) -> None:
    # JSON can spell a lone surrogate; the tokenizer cannot take one: an answer, not a traceback.
    body = b'{"text":"\\ud800bread","model":"hash:384"}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server.path))
        conn.sendall(len(body).to_bytes(4, "big") + body)
        conn.settimeout(10)
        size = int.from_bytes(conn.recv(4), "big")
        answer = json.loads(conn.recv(size))
    assert answer == {"error": "text holds a lone UTF-16 surrogate ('\\ud800' at character 0)"}
    assert ask(server.path, "\ud800bread", "hash:384") is None  # not even sent
    # A character past U+FFFF is 12 bytes of escaped JSON: the longest query still fits.
    for text in ("\U0001f680" * MAX_QUERY_CHARS, "\U0001f680 launch"):
        vector = ask(server.path, text, "hash:384")
        assert vector is not None
        assert vector.tolist() == HashEmbedder("hash:384").embed([text])[0].tolist()
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_a_folder_where_the_socket_goes_leaves_no_bound_socket_behind(tmp_path: Path) -> None:
    (tmp_path / "query.sock").mkdir()
    assert serve(tmp_path / "query.sock", HashEmbedder("hash:384")) is None  # searches load the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query.sock"]


def test_search_shows_records_whatever_metadata_and_document_they_hold(tmp_path: Path) -> None:
    """A record's own metadata, or a collection another Chroma client filled, may hold a start
    line and no end line, or no document: shown, not a traceback."""
    import chromadb

    home = tmp_path / "home"
    assert run_cli(home, "resume").returncode == 0  # makes the data home
    client = chromadb.PersistentClient(path=str(home / "chroma"))
    col = client.get_or_create_collection("others", embedding_function=None)
    vectors = HashEmbedder("hash:384").embed(["to be or not to be", "no document here"])
    col.upsert(
        ids=["quote-7", "bare"], embeddings=vectors, documents=["to be or not to be", None],
        metadatas=[{"start_line": 12, "source": "hamlet"}, None],
    )  # fmt: skip
    del col, client
    shown = run_cli(home, "search", "to be or not to be", "-c", "others", INDEXQ_MODEL="hash:384")
    assert shown.returncode == 0, shown.stderr
    assert "hamlet:12\n   to be or not to be" in shown.stdout
    assert "bare\n" in shown.stdout
    hits = json.loads(run_cli(home, "search", "x", "-c", "others", "--json", INDEXQ_MODEL="hash:384").stdout)
    assert {h["id"]: h["document"] for h in hits} == {"quote-7": "to be or not to be", "bare": None}


def test_search_spells_out_what_a_terminal_would_act_on(tmp_path: Path) -> None:
    """A file name or a chunk holding escape sequences or a newline cannot colour the
    screen or forge a result line: such characters are printed spelled out (--json as is)."""
    import chromadb

    home = tmp_path / "home"
    assert run_cli(home, "resume").returncode == 0
    client = chromadb.PersistentClient(path=str(home / "chroma"))
    col = client.get_or_create_collection("others", embedding_function=None)
    source, text = "evil\x1b[31mRED\x1b[0m\n2. 0.000  FAKE.txt", "red \x1b[31malert\x1b[0m \u202ereversed"
    col.upsert(
        ids=["x"], embeddings=HashEmbedder("hash:384").embed([text]), documents=[text],
        metadatas=[{"source": source, "start_line": 1}],
    )  # fmt: skip
    del col, client
    shown = run_cli(home, "search", "alert", "-c", "others", INDEXQ_MODEL="hash:384")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "\u202e" not in shown.stdout
    assert shown.stdout.splitlines()[1:] == [
        "   red \\x1b[31malert\\x1b[0m \\u202ereversed",
    ]
    assert shown.stdout.splitlines()[0].endswith("  evil\\x1b[31mRED\\x1b[0m\\n2. 0.000  FAKE.txt:1")
    hits = json.loads(run_cli(home, "search", "alert", "-c", "others", "--json", INDEXQ_MODEL="hash:384").stdout)
    assert (hits[0]["metadata"]["source"], hits[0]["document"]) == (source, text)


def test_a_chroma_directory_without_its_database_is_refused_not_made_afresh(tmp_path: Path, procs: list[Proc]) -> None:
    """The ledger holds committed chunks and chroma/ is gone (a restore killed before it
    copied): a writer filled an empty directory and searches saw only its new chunks, and
    a search made the directory. Both now refuse and point at recover, which repairs it."""
    home = tmp_path / "home"
    hashed = {"INDEXQ_MODEL": "hash:384"}
    corpus = copy_corpus(tmp_path / "corpus", ["json/__init__.py"])
    writer = _writer(procs, home, **hashed)
    _index(home, corpus, **hashed)
    assert writer.terminate() == 0
    shutil.rmtree(home / "chroma")
    said = f"Error: the Chroma directory {home / 'chroma'} has no database, but the ledger holds"
    searched = run_cli(home, "search", "decode", "-c", "code", **hashed)
    assert (searched.returncode, searched.stderr.splitlines()[0].startswith(said)) == (1, True), searched.stderr
    assert not (home / "chroma").exists()
    refused = start_worker(procs, home, **hashed)
    assert refused.popen.wait(timeout=120) == 1
    assert said in refused.output() and "Hint: run `indexq recover`" in refused.output()
    assert not (home / "chroma" / "chroma.sqlite3").exists()
    assert run_cli(home, "recover", timeout=300, **hashed).returncode == 0
    found = run_cli(home, "search", "decode", "-c", "code", "--json", **hashed)
    assert found.returncode == 0 and json.loads(found.stdout), found.stderr
    fresh = tmp_path / "fresh"  # nothing committed yet: no collection, and no directory made
    assert run_cli(fresh, "resume").returncode == 0
    shutil.rmtree(fresh / "chroma", ignore_errors=True)
    nothing = run_cli(fresh, "search", "decode", "-c", "code", **hashed)
    no_collection = f"Error: no collection 'code' in {fresh / 'chroma'}"
    assert (nothing.returncode, nothing.stderr.splitlines()[0]) == (1, no_collection)
    assert not (fresh / "chroma").exists()


# Run as a script of its own: a child forked from pytest's worker (threads of its own)
# could hang on a lock one of them held at the fork, whatever Chroma does.
FORK_SEARCH = """
import multiprocessing, sys
from pathlib import Path
from pipeline import api
from pipeline.config import Config
from pipeline.errors import BadInputError

def child(home, answer):
    try:
        api.search("decode", "code", 3, Config(home=Path(home), model="hash:384"))
        answer.put("searched")
    except BadInputError as exc:
        answer.put(str(exc))

if __name__ == "__main__":
    home = sys.argv[1]
    assert api.search("decode", "code", 3, Config(home=Path(home), model="hash:384"))
    for method in ("fork", "spawn"):
        context = multiprocessing.get_context(method)
        answer = context.Queue()
        process = context.Process(target=child, args=(home, answer))
        process.start()
        print(method, answer.get(timeout=100), flush=True)
        process.join(timeout=30)
"""


def test_a_search_in_a_process_forked_after_one_is_refused_not_hung(tmp_path: Path, procs: list[Proc]) -> None:
    """Chroma's Rust runtime does not survive a fork: a search in a multiprocessing fork
    child waited forever, holding the commit lock, and the writer stopped committing."""
    home = tmp_path / "home"
    hashed = {"INDEXQ_MODEL": "hash:384"}
    corpus = copy_corpus(tmp_path / "corpus", ["json/__init__.py"])
    writer = _writer(procs, home, **hashed)
    _index(home, corpus, **hashed)
    assert writer.terminate() == 0  # the script searches in its own process, with no writer to ask
    script = tmp_path / "fork_search.py"
    script.write_text(FORK_SEARCH)
    done = subprocess.run(
        [sys.executable, str(script), str(home)], env=env_for(home, **hashed), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "fork this process was forked from one that had opened Chroma, whose runtime does not survive a fork",
        "spawn searched",
    ]
