"""One source, one identity; nothing half-done; the tree is the boundary (invariants 6, 7, 9).

Each test reproduces a hole that adversarial testing found (issue 9) with the real CLI,
a real writer subprocess (``hash:384`` embedder: the model is not the point here) and
real Chroma directories, and compares with a clean run of the same tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, Proc, dump_collection, env_for, ledger_query, run_cli, start_worker, wait_for

HASH = {"INDEXQ_MODEL": "hash:384"}
LINES = [f"line {n}: some words about topic {n % 7} to give each chunk a body" for n in range(400)]


def _tree(root: Path) -> Path:
    (root / "xml").mkdir(parents=True)
    for i in range(3):
        (root / "xml" / f"f{i}.txt").write_text("\n".join(f"file {i} {line}" for line in LINES) + "\n")
    (root / "notes.md").write_text("\n".join(LINES[:120]) + "\n")
    return root


def _index(home: Path, *args: str, code: int = 0) -> dict[str, Any]:
    result = run_cli(home, "index", *args, "--json", **HASH)
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout) if code == 0 else {"stderr": result.stderr}


def _drain(procs: list[Proc], home: Path) -> None:
    """Start a writer if none runs and wait until the ledger has nothing outstanding."""
    if not any(p.popen.poll() is None and p.log.name.startswith(home.name) for p in procs):
        start_worker(procs, home, **HASH).wait_started()

    def idle() -> bool:
        rows = ledger_query(home, "SELECT count(*) FROM chunks WHERE state IN ('pending', 'embedded', 'deleting')")
        return rows[0][0] == 0

    wait_for(idle, what="the writer to drain the ledger")


def _records(home: Path, collection: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """id -> (document, metadata) as Chroma holds them (writer stopped)."""
    return {k: (v["document"], v["metadata"]) for k, v in dump_collection(home / "chroma", collection).items()}


def _chunk_rows(home: Path) -> int:
    try:
        return int(ledger_query(home, "SELECT count(*) FROM chunks")[0][0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _stop(procs: list[Proc]) -> None:
    for proc in procs:
        if proc.popen.poll() is None:
            assert proc.terminate() == 0


def _clean_run(procs: list[Proc], tmp_path: Path, *paths: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    clean = tmp_path / "clean"
    _index(clean, *map(str, paths), "-c", "docs")
    _drain(procs, clean)
    _stop(procs)
    return _records(clean, "docs")


# ---- 1. a record's own id never replaces another record's chunk --------------------


def test_record_id_equal_to_a_chunk_id_is_refused_with_its_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    long_text = "x " * 2000  # several chunks: c, c#1, ...
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"id": "c", "text": long_text}) + "\n" + json.dumps({"id": "c#1", "text": "hi"}) + "\n")
    out = _index(home, "--jsonl", str(both), "-c", "notes", code=2)
    assert out["stderr"].splitlines() == [
        f"Error: {both}: line 2: id 'c#1' is also chunk 1 of the record on line 1",
        "Hint: nothing was enqueued; fix the records and submit again",
    ]
    assert not (home / "ledger.db").exists() or ledger_query(home, "SELECT count(*) FROM chunks") == [(0,)]

    # Across submissions: c is split in one job, c#1 arrives alone in the next.
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"id": "c", "text": long_text}) + "\n")
    chunks = _index(home, "--jsonl", str(first), "-c", "notes")["chunks"]
    assert chunks > 2
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps({"id": "other", "text": "fine"}) + "\n" + json.dumps({"id": "c#1", "text": "x"}))
    out = _index(home, "--jsonl", str(second), "-c", "notes", code=2)
    assert out["stderr"].splitlines()[0] == (
        f"Error: {second}: the record on line 2: id 'c#1' is already held in 'notes' by record 'c'"
    )
    assert ledger_query(home, "SELECT count(*), count(DISTINCT source) FROM chunks") == [(chunks, 1)]
    assert ledger_query(home, "SELECT count(*) FROM jobs") == [(1,)]


def test_a_file_whose_chunk_id_a_record_holds_is_skipped_and_the_record_kept(tmp_path: Path) -> None:
    """A record may be given any id, a file chunk's among them (copied from an export):
    indexing the file then must not replace the acknowledged record."""
    from pipeline.ids import chunk_id

    home, tree = tmp_path / "home", tmp_path / "tree"
    tree.mkdir()
    (tree / "victim.txt").write_text("the file's own text about penguins\n")
    (tree / "other.txt").write_text("another file about walruses\n")
    taken = chunk_id(str((tree / "victim.txt").resolve()), 0)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": taken, "text": "record text about giraffes"}) + "\n")
    _index(home, "--jsonl", str(records), "-c", "notes")
    out = _index(home, str(tree), "-c", "notes", "--prune")
    assert out["skipped"] == [{
        "source": str((tree / "victim.txt").resolve()),
        "reason": f"the id {taken!r} of its chunk 0 is already held by record {taken!r}",
    }]  # fmt: skip
    assert ledger_query(home, "SELECT text FROM chunks WHERE id=?", taken) == [("record text about giraffes",)]
    assert {r[0] for r in ledger_query(home, "SELECT source FROM chunks")} == {
        f"id:{taken}",
        str((tree / "other.txt").resolve()),
    }


# ---- 2. one file, one source, whatever path spells it -------------------------------


def test_every_spelling_of_a_path_is_one_source(tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    (tmp_path / "alias").symlink_to(corpus)
    first = _index(home, str(corpus / "xml"), "-c", "docs")
    assert first["new"] == first["chunks"] > 0
    spellings = [corpus / "xml" / ".." / "xml", tmp_path / "alias" / "xml", Path(os.path.relpath(corpus / "xml"))]
    for spelling in spellings:
        again = _index(home, str(spelling), "-c", "docs")
        assert (again["new"], again["unchanged"]) == (0, first["chunks"]), spelling
    rows = ledger_query(home, "SELECT count(*), count(DISTINCT source), min(source) FROM chunks")
    assert rows == [(first["chunks"], 3, str(corpus.resolve() / "xml" / "f0.txt"))]


# ---- 3. metadata follows an edit, without re-embedding -------------------------------


def test_moved_lines_update_metadata_without_embedding_again(procs: list[Proc], tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    _index(home, str(corpus), "-c", "docs")
    _drain(procs, home)
    (embeddings_before,) = ledger_query(home, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='embeddings'")[0]
    target = corpus / "xml" / "f1.txt"
    target.write_text("a new first line\nand a second one\n" + target.read_text())
    again = _index(home, str(corpus), "-c", "docs")
    assert again["metadata_updated"] > 10 and again["changed"] <= 2
    _drain(procs, home)
    _stop(procs)
    (embeddings_after,) = ledger_query(home, "SELECT CAST(value AS INTEGER) FROM meta WHERE key='embeddings'")[0]
    # Only the changed chunks were embedded again, never the ones whose lines moved.
    assert embeddings_after - embeddings_before == again["changed"] + again["new"]
    tortured = _records(home, "docs")
    assert tortured == _clean_run(procs, tmp_path, corpus)


# ---- 4 and 5. emptied, binary and vanished files ---------------------------------------


def test_emptied_binary_and_non_utf8_files_lose_their_chunks(procs: list[Proc], tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    (corpus / "soon-unreadable.txt").write_text("kept while it cannot be read\n" * 5)
    _index(home, str(corpus), "-c", "docs")
    _drain(procs, home)
    (corpus / "xml" / "f0.txt").write_text("")
    (corpus / "xml" / "f1.txt").write_bytes(b"\x89PNG\x00\x01" * 100)
    (corpus / "xml" / "f2.txt").write_bytes("caf\xe9\n".encode("latin-1") * 50)
    again = _index(home, str(corpus), "-c", "docs")
    reasons = {Path(s["source"]).name: s["reason"] for s in again["skipped"]}
    assert reasons == {"f0.txt": "empty", "f1.txt": "binary", "f2.txt": "not UTF-8 (byte 3)"}
    assert again["stale"] > 0
    _drain(procs, home)
    _stop(procs)
    sources = {meta["source"] for _, meta in _records(home, "docs").values()}
    assert sources == {str(corpus.resolve() / "notes.md"), str(corpus.resolve() / "soon-unreadable.txt")}


def test_prune_keeps_a_file_made_and_indexed_after_its_walk_passed_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune compares its walk with the ledger as it is after the walk: a file another
    producer indexed meanwhile is in the ledger and not in the walk, yet it is not gone."""
    import pipeline.producer as producer_module
    from pipeline.config import Config
    from pipeline.producer import Producer

    config = Config(home=tmp_path / "home", model="hash:384")
    tree = _tree(tmp_path / "tree")
    first = Producer(config)
    try:
        first.submit_paths([tree], "docs")
    finally:
        first.close()
    late = tree / "aaa" / "new.txt"
    real_walk = producer_module.walk

    def walk_then_another_producer(*args: Any, **kwargs: Any) -> Any:
        yield from real_walk(*args, **kwargs)
        monkeypatch.setattr(producer_module, "walk", real_walk)  # the other producer's own walk
        late.parent.mkdir()
        late.write_text("made while the prune walked\n")
        other = Producer(config)
        try:
            other.submit_paths([late], "docs")
        finally:
            other.close()

    monkeypatch.setattr(producer_module, "walk", walk_then_another_producer)
    pruning = Producer(config)
    try:
        sub = pruning.submit_paths([tree], "docs", prune=True)
    finally:
        pruning.close()
    assert (sub.pruned, sub.stale) == (0, 0)
    assert ledger_query(config.home, "SELECT state FROM chunks WHERE source=?", str(late)) == [("pending",)]


def test_prune_removes_files_that_are_gone_and_only_with_the_flag(procs: list[Proc], tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    other = _tree(tmp_path / "other")
    _index(home, str(corpus), str(other), "-c", "docs")
    _drain(procs, home)
    (corpus / "xml" / "f2.txt").unlink()
    (other / "xml" / "f2.txt").unlink()  # gone too, but not under the path pruned below
    without = _index(home, str(corpus), "-c", "docs")
    assert (without["stale"], without["pruned"]) == (0, 0)
    # notes.md still exists but is excluded now: kept, like any file that is not gone.
    result = run_cli(home, "index", str(corpus / "xml" / ".."), "-c", "docs", "--prune", "--exclude", "*.md", **HASH)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1].endswith("stale; 0 files skipped; 1 files pruned")
    _drain(procs, home)
    _stop(procs)
    sources = {meta["source"] for _, meta in _records(home, "docs").values()}
    assert str(corpus.resolve() / "xml" / "f2.txt") not in sources
    assert str(other.resolve() / "xml" / "f2.txt") in sources
    assert len(sources) == 7


# ---- 8. the indexed tree is the boundary -----------------------------------------------


def test_symlinks_leading_outside_the_tree_are_skipped_unless_asked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    (corpus / "innocent.txt").symlink_to(secret)
    (corpus / "linked-dir").symlink_to(secret.parent)
    (corpus / "inside-link.txt").symlink_to(corpus / "notes.md")  # inside: the same file, once
    (corpus / "xml-again").symlink_to(corpus / "xml")  # inside: found under its own path
    (corpus / "dangling").symlink_to(tmp_path / "nowhere")
    sub = _index(home, str(corpus), "-c", "docs")
    reasons = {Path(s["source"]).name: s["reason"] for s in sub["skipped"]}
    assert reasons == {
        "innocent.txt": f"symlink to {secret.resolve()}, outside the paths given (--follow-symlinks)",
        "linked-dir": f"symlink to {secret.parent.resolve()}, outside the paths given (--follow-symlinks)",
        "dangling": "broken symlink",
    }
    texts = " ".join(r[0] for r in ledger_query(home, "SELECT text FROM chunks"))
    assert "secret-hash" not in texts
    assert ledger_query(home, "SELECT count(DISTINCT source) FROM chunks") == [(4,)]

    followed = _index(home, str(corpus), "-c", "docs", "--follow-symlinks")
    assert followed["new"] == 1  # the one line of the outside file, once for two links
    assert ledger_query(home, "SELECT source FROM chunks WHERE text LIKE '%secret-hash%'") == [(str(secret.resolve()),)]


def test_fifos_and_devices_are_skipped_and_counted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    os.mkfifo(corpus / "pipe")
    (corpus / "zero").symlink_to("/dev/zero")
    sub = _index(home, str(corpus), "-c", "docs", "--follow-symlinks")
    reasons = {Path(s["source"]).name: s["reason"] for s in sub["skipped"]}
    assert reasons == {"pipe": "not a regular file", "zero": "not a regular file"}


# ---- 9 and 10. bad records, huge inputs, killed producers ------------------------------


def test_lone_surrogate_fails_the_submission_before_anything_is_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    records = tmp_path / "r.jsonl"
    good = "".join(json.dumps({"id": f"r{n}", "text": f"record {n} " * 50}) + "\n" for n in range(600))
    records.write_text(good + '{"id": "bad", "text": "half a pair: \\ud800 here"}\n')
    out = _index(home, "--jsonl", str(records), "-c", "notes", code=2)
    assert out["stderr"].splitlines()[0] == (
        f"Error: {records}: line 601: \"text\" holds a lone UTF-16 surrogate ('\\ud800' at character 13)"
    )
    assert "Traceback" not in out["stderr"]
    assert not (home / "ledger.db").exists() or ledger_query(home, "SELECT count(*) FROM jobs") == [(0,)]


def test_jsonl_lines_are_bounded_and_devices_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    zero = run_cli(home, "index", "--jsonl", "/dev/zero", "-c", "notes", timeout=60, **HASH)
    assert (zero.returncode, zero.stderr.splitlines()[0]) == (2, "Error: /dev/zero is not a regular file")
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:
        handle.write(b'{"id": "a", "text": "fine"}\n')
        handle.write(b"x" * (17 * 2**20))  # one line past the 16 MB limit, no line end
    out = _index(home, "--jsonl", str(huge), "-c", "notes", code=2)
    assert out["stderr"].splitlines()[0] == f"Error: {huge}: line 2: longer than 16 MB"


def test_jsonl_with_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    records = tmp_path / "bom.jsonl"
    records.write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "first"}\n{"id": "b", "text": "second"}\n')
    assert _index(home, "--jsonl", str(records), "-c", "notes")["new"] == 2


def test_a_producer_killed_mid_submission_leaves_an_abandoned_job_that_a_rerun_completes(
    procs: list[Proc], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # > 512 chunks: more than one ledger flush
        (corpus / f"f{i:02}.txt").write_text("\n".join(f"{i} {line}" for line in LINES) + "\n")
    env = env_for(home, INDEXQ_FAULT_PAUSE="submission-flushed:60", **HASH)
    producer = subprocess.Popen(
        [str(BIN / "indexq"), "index", str(corpus), "-c", "docs"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _chunk_rows(home) > 0, what="the first flush")
        time.sleep(0.5)
    finally:
        os.killpg(producer.pid, signal.SIGKILL)
        producer.communicate(timeout=30)
    status = run_cli(home, "status", "--json")
    assert status.returncode == 0, status.stderr
    (job,) = json.loads(status.stdout)["jobs"]
    assert job["state"] == "abandoned"
    assert len(list((home / "tmp").glob("spool-*.db"))) == 1  # the killed producer's
    rerun = _index(home, str(corpus), "-c", "docs")
    assert list((home / "tmp").glob("spool-*.db")) == []  # removed by the next producer
    assert rerun["unchanged"] > 0 and rerun["new"] > 0
    _drain(procs, home)
    _stop(procs)
    states = {j["id"]: j["state"] for j in json.loads(run_cli(home, "status", "--json").stdout)["jobs"]}
    assert states == {job["id"]: "abandoned", rerun["job"]: "done"}
    assert _records(home, "docs") == _clean_run(procs, tmp_path, corpus)


@pytest.mark.parametrize("size_mb", [15])
def test_a_large_single_line_file_is_chunked_within_bounds(tmp_path: Path, size_mb: int) -> None:
    home = tmp_path / "home"
    big = tmp_path / "big" / "one-line.txt"
    big.parent.mkdir()
    word = b"lorem ipsum dolor sit amet "
    big.write_bytes(word * (size_mb * 2**20 // len(word)))
    sub = _index(home, str(big.parent), "-c", "docs")
    assert sub["chunks"] > 1000 and sub["skipped"] == []
    (longest,) = ledger_query(home, "SELECT max(length(text)) FROM chunks")[0]
    assert longest < 2000


# ---- 11. the data home, folders that cannot be read, loops, names, FIFOs ----------------


def _unprivileged(home: Path, *args: str, code: int = 0) -> dict[str, Any]:
    """``indexq index`` as a user that permissions bind: root drops its override for the run."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root ignores file permissions and setpriv is missing")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    result = subprocess.run(
        [*prefix, str(BIN / "indexq"), "index", *args, "--json"],
        env=env_for(home, **HASH), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout) if code == 0 else {"stderr": result.stderr}


def test_the_data_home_inside_the_indexed_tree_is_never_walked(tmp_path: Path) -> None:
    corpus = _tree(tmp_path / "corpus")
    (tmp_path / "alias").symlink_to(corpus)
    home = tmp_path / "alias" / "indexq-data"  # the home spelled through a symlink
    (corpus / "to-home").symlink_to(corpus / "indexq-data")
    (corpus / "key.txt").symlink_to(corpus / "indexq-data" / "queue.key")
    clean = _index(tmp_path / "clean", str(corpus), "-c", "docs")
    for extra in ((), ("--follow-symlinks",)):
        sub = _index(home, str(corpus), "-c", "docs", *extra)
        assert (corpus / "indexq-data" / "queue.key").exists()
        assert sub["skipped"] == [] and sub["chunks"] == clean["chunks"]
        sources = {r[0] for r in ledger_query(home, "SELECT DISTINCT source FROM chunks")}
        assert sources == {
            str(corpus.resolve() / "notes.md"),
            *(str(corpus.resolve() / "xml" / f"f{i}.txt") for i in range(3)),
        }
    for inside in (home, home / "queue.key"):
        out = _index(home, str(inside), "-c", "docs", code=2)
        assert out["stderr"].splitlines()[0] in (
            f"Error: {corpus.resolve() / 'indexq-data'} is the data home: it is never indexed",
            f"Error: {inside.resolve()} lies in the data home {corpus.resolve() / 'indexq-data'}: it is never indexed",
        )


@pytest.mark.parametrize(("mode", "skipped"), [(0o000, ["xml"]), (0o644, ["xml/f0.txt", "xml/f1.txt", "xml/f2.txt"])])
def test_a_folder_that_cannot_be_read_is_skipped_and_keeps_its_chunks(
    tmp_path: Path, mode: int, skipped: list[str]
) -> None:
    """Mode 000: the folder cannot be listed; 644: listed, but nothing in it can be opened."""
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    first = _index(home, str(corpus), "-c", "docs")
    (corpus / "xml").chmod(mode)
    try:
        again = _unprivileged(home, str(corpus), "-c", "docs", "--prune")
    finally:
        (corpus / "xml").chmod(0o755)
    real = corpus.resolve()
    assert again["skipped"] == [{"source": str(real / s), "reason": "unreadable: Permission denied"} for s in skipped]
    assert (again["stale"], again["pruned"], again["unchanged"]) == (0, 0, again["chunks"])
    states = ledger_query(home, "SELECT state, count(*) FROM chunks GROUP BY state")
    assert states == [("pending", first["chunks"])]


def test_a_symlink_loop_is_skipped_and_named_alone_is_one_error_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    (corpus / "loop").symlink_to("loop")
    (corpus / "xml" / "a").symlink_to("b")
    (corpus / "xml" / "b").symlink_to("a")
    sub = _index(home, str(corpus), "-c", "docs")
    assert sorted((Path(s["source"]).name, s["reason"]) for s in sub["skipped"]) == [
        ("a", "symlink loop"), ("b", "symlink loop"), ("loop", "symlink loop"),
    ]  # fmt: skip
    assert (
        sub["chunks"]
        == _index(tmp_path / "clean", str(corpus / "xml"), str(corpus / "notes.md"), "-c", "docs")["chunks"]
    )
    out = _index(home, str(corpus / "loop"), "-c", "docs", code=2)
    assert out["stderr"] == f"Error: symlink loop: {corpus / 'loop'}\n"


def test_a_file_name_that_is_not_utf8_is_skipped(tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    (corpus / os.fsdecode(b"caf\xe9.txt")).write_text("a file whose name is Latin-1\n")
    (corpus / os.fsdecode(b"d\xe9j\xe0")).mkdir()
    (corpus / os.fsdecode(b"d\xe9j\xe0") / "inside.txt").write_text("text in a folder named in Latin-1\n")
    sub = _index(home, str(corpus), "-c", "docs")
    real = corpus.resolve()
    assert sub["skipped"] == [
        {"source": f"{real}/d\\xe9j\\xe0", "reason": "folder name is not UTF-8"},
        {"source": f"{real}/caf\\xe9.txt", "reason": "file name is not UTF-8"},
    ]
    assert ledger_query(home, "SELECT count(DISTINCT source) FROM chunks") == [(4,)]


def test_jsonl_naming_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    for named in (fifo, tmp_path / "link"):
        result = run_cli(home, "index", "--jsonl", str(named), "-c", "notes", timeout=30, **HASH)
        assert (result.returncode, result.stderr) == (
            2, f"Error: {fifo} is not a regular file\nHint: --jsonl takes a file of JSON lines\n",
        )  # fmt: skip


def test_a_remote_prune_keeps_what_lies_under_a_folder_the_producer_could_not_read(tmp_path: Path) -> None:
    """The writer prunes a remote producer's job: a folder it skipped as unreadable keeps its files."""
    from pipeline.ledger import Ledger

    def part(job: str, files: list[dict[str, Any]], skipped: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "job": job, "collection": "docs", "kind": "paths", "sources": ["/corpus"], "created": 0.0,
            "files": files, "final": True, "parts": 1, "skipped": skipped, "model": "hash:384",
            "prune": {"roots": ["/corpus"], "include": [], "exclude": []},
        }  # fmt: skip

    files = [
        {"source": s, "total": 1, "chunks": [{"id": s, "ordinal": 0, "text": s, "metadata": {}, "hash": s}]}
        for s in ("/corpus/a.txt", "/corpus/sub/b.txt", "/corpus/sub/deeper/c.txt", "/corpus/gone.txt")
    ]
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        ledger.sources.ingest("first", part("j1", files, []), "hash:384")
        unreadable = [{"source": "/corpus/sub", "reason": "unreadable: Permission denied"}]
        result = ledger.sources.ingest("second", part("j2", files[:1], unreadable), "hash:384")
    finally:
        ledger.close()
    assert result is not None and result[1] == ["/corpus/gone.txt"]


def test_a_file_or_folder_swapped_for_a_symlink_after_the_walk_is_not_read(tmp_path: Path) -> None:
    """The walk checks a path; the read must read that file, not where a symlink put there
    since leads (a file outside the paths read under an inside name)."""
    from pipeline.corpus import Skipped, read_document

    tmp_path = tmp_path.resolve()  # the walk's paths are real ones
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("the api key is hunter2\n")
    inside = tmp_path / "tree" / "sub" / "f.txt"
    inside.parent.mkdir(parents=True)
    inside.write_text("ordinary text\n")
    assert not isinstance(read_document(inside), Skipped)
    inside.unlink()
    inside.symlink_to(secret)  # the file, swapped after the walk
    skipped = read_document(inside)
    assert isinstance(skipped, Skipped)
    assert skipped.reason == "unreadable: it became a symlink after the walk found it"
    inside.unlink()
    inside.parent.rename(tmp_path / "tree" / "moved")
    inside.parent.symlink_to(secret.parent)  # a folder on the way, swapped
    (secret.parent / "f.txt").write_text("another secret\n")
    skipped = read_document(inside)
    assert isinstance(skipped, Skipped)
    assert skipped.reason.startswith("unreadable: it was moved or replaced after the walk found it")


def test_two_producers_writing_one_record_at_once_leave_one_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Producer A holds its write back a moment; B submits the same record, shorter. B's plan
    must see A's chunks (and make its extra ones stale), not the ledger of before A."""
    import threading

    from pipeline.config import Config
    from pipeline.producer import Producer

    config = Config(home=tmp_path / "home", model="hash:384")
    config.ensure_home()
    long_text, short_text = "alpha words " * 2000, "beta words " * 200
    inside, real = threading.Event(), Producer._write_alone

    def slowly(self: Producer, *args: Any) -> Any:
        if not inside.is_set():
            inside.set()  # A is writing; B starts now
            time.sleep(1.0)
        return real(self, *args)

    monkeypatch.setattr(Producer, "_write_alone", slowly)

    def submit(text: str) -> None:
        producer = Producer(config)
        try:
            producer.submit_records([{"id": "r1", "text": text}], "notes")
        finally:
            producer.close()

    first = threading.Thread(target=submit, args=(long_text,))
    first.start()
    assert inside.wait(30)
    submit(short_text)
    first.join()
    rows = ledger_query(config.home, "SELECT id, text, state FROM chunks ORDER BY id")
    live = [(id_, text) for id_, text, state in rows if state != "deleting"]
    assert len(rows) > len(live) > 0
    assert all(text.startswith("beta") for _, text in live), live[:3]


def test_prune_removes_a_file_now_reached_through_a_link_or_turned_into_a_folder(tmp_path: Path) -> None:
    """A path on disk is not enough to keep a file's chunks: a folder moved and a link to it
    left behind, or a file replaced by a folder, leave its old source gone."""
    from pipeline.config import Config
    from pipeline.producer import Producer

    config = Config(home=tmp_path / "home", model="hash:384")
    tree = (tmp_path / "tree").resolve()
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f.txt").write_text("first file\n")
    (tree / "g.txt").write_text("second file\n")

    def submit(prune: bool = False) -> Any:
        producer = Producer(config)
        try:
            return producer.submit_paths([tree], "docs", prune=prune)
        finally:
            producer.close()

    submit()
    (tree / "a").rename(tree / "b")
    (tree / "a").symlink_to(tree / "b")
    (tree / "g.txt").unlink()
    (tree / "g.txt").mkdir()
    (tree / "g.txt" / "h.txt").write_text("third file\n")
    assert submit(prune=True).pruned == 2
    live = ledger_query(config.home, "SELECT DISTINCT source FROM chunks WHERE state != 'deleting'")
    assert sorted(s for (s,) in live) == [str(tree / "b" / "f.txt"), str(tree / "g.txt" / "h.txt")]


# ---- 12. deep trees, hard links and bind mounts, files gone mid-walk, overlapping paths --


def test_a_tree_a_thousand_folders_deep_is_walked(tmp_path: Path) -> None:
    """Python 3.11's os.walk recursed once per level: 1,000 levels (2,000 characters of
    path) raised RecursionError, and the whole job failed with a traceback."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "top.txt").write_text("a file at the top\n")
    deep = corpus
    for _ in range(1100):  # not mkdir(parents=True): it recurses too
        deep = deep / "a"
        deep.mkdir()
    (deep / "f.txt").write_text("a file eleven hundred folders down\n")
    try:
        sub = _index(tmp_path / "home", str(corpus), "-c", "docs")
        assert (sub["chunks"], sub["skipped"]) == (2, [])
        sources = {s for (s,) in ledger_query(tmp_path / "home", "SELECT DISTINCT source FROM chunks")}
        assert sources == {str(corpus.resolve() / "top.txt"), str(deep.resolve() / "f.txt")}
    finally:  # shutil.rmtree recurses as well: pytest's clean-up of old runs would fail on it
        (deep / "f.txt").unlink()
        while deep != corpus:
            deep.rmdir()
            deep = deep.parent


def test_the_data_home_through_a_hard_link_is_never_indexed(tmp_path: Path) -> None:
    """A hard link to the queue's signing key is the key under another name: the walk passes
    it over, and naming it is refused, as for the home's own path."""
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    clean = _index(home, str(corpus), "-c", "docs")
    os.link(home / "queue.key", corpus / "key.txt")
    sub = _index(home, str(corpus), "-c", "docs")
    assert (sub["chunks"], sub["skipped"]) == (clean["chunks"], [])
    sources = {s for (s,) in ledger_query(home, "SELECT DISTINCT source FROM chunks")}
    assert str(corpus.resolve() / "key.txt") not in sources
    out = _index(home, str(corpus / "key.txt"), "-c", "docs", code=2)
    assert out["stderr"].splitlines()[0] == (
        f"Error: {corpus.resolve() / 'key.txt'} is the data home or lies in it, reached another way"
        " (a bind mount or a hard link): it is never indexed"
    )


def test_the_data_home_through_a_bind_mount_is_never_indexed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    corpus = _tree(tmp_path / "corpus")
    clean = _index(home, str(corpus), "-c", "docs")
    mount = corpus / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(home), str(mount)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts need privileges this run does not have")
    try:
        sub = _index(home, str(corpus), "-c", "docs")
        assert (sub["chunks"], sub["skipped"]) == (clean["chunks"], [])
        sources = {s for (s,) in ledger_query(home, "SELECT DISTINCT source FROM chunks")}
        assert not any("/mnt/" in s for s in sources), sources
        for inside in (mount, mount / "queue.key", mount / "logs"):
            out = _index(home, str(inside), "-c", "docs", code=2)
            assert "reached another way (a bind mount or a hard link): it is never indexed" in out["stderr"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_file_removed_while_the_walk_runs_keeps_its_chunks(tmp_path: Path) -> None:
    """Between its folder's listing and its turn, a file removed (an editor's save, a
    rename) is unreadable for this run, not gone: only --prune takes a file's chunks."""
    from pipeline.corpus import Skipped, content_gone, walk

    tree = (tmp_path / "tree").resolve()
    tree.mkdir()
    for name in ("a.txt", "b.txt"):
        (tree / name).write_text(f"{name} text\n")
    files = walk([tree])
    assert next(files) == tree / "a.txt"
    (tree / "b.txt").rename(tree / "c.txt")  # listed as b.txt, gone by its turn
    rest = list(files)
    assert rest == [Skipped(str(tree / "b.txt"), "unreadable: it was removed or renamed while the walk ran")]
    assert not content_gone(rest[0].reason)


def test_overlapping_paths_take_the_same_files_in_either_order(tmp_path: Path) -> None:
    """A folder named and a folder inside it: the files are those either path's globs take,
    for the walk and for --prune alike, whatever the order the paths are given in."""
    corpus = tmp_path / "corpus"
    (corpus / "x" / "sub").mkdir(parents=True)
    (corpus / "x" / "top.txt").write_text("a file at the top\n")
    for name in ("s.md", "t.md"):
        (corpus / "x" / "sub" / name).write_text(f"{name} in sub\n")
    outer, inner = str(corpus / "x"), str(corpus / "x" / "sub")
    real = corpus.resolve() / "x" / "sub"
    for n, order in enumerate(((outer, inner), (inner, outer))):
        home = tmp_path / f"home{n}"
        assert _index(home, *order, "-c", "docs", "--include", "sub/*")["chunks"] == 2
        sources = ledger_query(home, "SELECT DISTINCT source FROM chunks ORDER BY source")
        assert sources == [(str(real / "s.md"),), (str(real / "t.md"),)]
    (corpus / "x" / "sub" / "s.md").unlink()
    assert _index(tmp_path / "home1", inner, outer, "-c", "docs", "--include", "sub/*", "--prune")["pruned"] == 1


def test_proc_files_are_read_and_a_pipe_named_as_a_path_is_refused() -> None:
    """/proc/sys refuses one read of 16 MB (ENOMEM): files are read a piece at a time. A
    pipe (``/dev/stdin`` in ``cmd | indexq index /dev/stdin``) has no real path to index."""
    from pipeline.corpus import check_paths, read_text
    from pipeline.errors import BadInputError

    assert read_text(Path("/proc/sys/kernel/ostype")) == "Linux\n"
    read, write = os.pipe()
    try:
        with pytest.raises(BadInputError, match=rf"^/proc/self/fd/{read} is a pipe, not a file or folder to index$"):
            check_paths([f"/proc/self/fd/{read}"])
    finally:
        os.close(read)
        os.close(write)


def test_a_symlink_through_a_regular_file_is_a_broken_symlink() -> None:
    """``notdir -> regular/x``: the identity check of the data home met ENOTDIR and called it
    unreadable (chunks kept, the target named) instead of a broken symlink (chunks stale)."""
    import tempfile

    from pipeline.corpus import Private, Skipped, walk

    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch).resolve() / "tree"
        tree.mkdir()
        (tree / "regular").write_text("a file\n")
        (tree / "notdir").symlink_to(tree / "regular" / "x")
        found = list(walk([tree], private=Private({Path(scratch) / "home": "the data home"})))
        assert found == [Skipped(str(tree / "notdir"), "broken symlink"), tree / "regular"]
