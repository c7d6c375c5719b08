"""Bad input: one clear line, a documented exit code, and nothing half-done."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Config
from pipeline.queue import QueueClient


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def invoke(home: Path, *args: str, **env: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, list(args), env={"INDEXQ_HOME": str(home), **env}, catch_exceptions=False, prog_name="indexq"
    )
    return result.exit_code, result.stdout, result.stderr


def jobs(home: Path) -> list[tuple[str, str]]:
    if not (home / "ledger.db").exists():
        return []
    with sqlite3.connect(home / "ledger.db") as conn:
        return conn.execute("SELECT id, state FROM jobs").fetchall()


def queued(home: Path) -> int:
    return QueueClient(Config(home=home)).pending_count()


def chunk_count(home: Path) -> int:
    with sqlite3.connect(home / "ledger.db") as conn:
        return int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])


def test_missing_path(home: Path, tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_text("some text\n")
    code, out, err = invoke(home, "index", str(tmp_path / "real.txt"), str(tmp_path / "nope"), "-c", "docs")
    assert code == 2
    assert err == f"Error: no such file or directory: {tmp_path / 'nope'}\n"
    assert out == ""
    assert jobs(home) == [] and queued(home) == 0


def test_invalid_collection_is_rejected_before_anything_is_enqueued(home: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    code, _, err = invoke(home, "index", str(tmp_path / "a.txt"), "--collection", "no spaces!")
    assert code == 2
    assert err.startswith("Error: invalid collection name 'no spaces!': it must have 3-512 characters")
    assert len(err.splitlines()) == 1
    assert jobs(home) == [] and queued(home) == 0


def test_binary_non_utf8_and_unreadable_files_are_skipped_and_counted(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("a perfectly good line of text\n" * 20)
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02" * 50)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    locked = corpus / "locked.txt"
    locked.write_text("secret\n")
    if os.geteuid() == 0:
        # root reads anything: make this one file fail the way an unreadable file does.
        real = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied")
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    else:
        locked.chmod(0)
    code, out, err = invoke(home, "index", str(corpus), "-c", "docs", "--json")
    assert code == 0, err
    sub = json.loads(out)
    assert sub["chunks"] >= 1
    reasons = {Path(s["source"]).name: s["reason"] for s in sub["skipped"]}
    assert reasons == {
        "image.bin": "binary",
        "latin1.txt": "not UTF-8 (byte 3)",
        "locked.txt": "unreadable: Permission denied",
    }
    assert [state for _, state in jobs(home)] == ["queued"]
    assert queued(home) == 1


def test_malformed_jsonl_is_reported_with_line_numbers_and_nothing_is_written(home: Path, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text(
        '{"id": "a", "text": "first record"}\n'
        "{not json}\n"
        '{"id": "c", "text": "third", "metadata": {"tags": ["x"]}}\n'
        '{"text": 5}\n'
    )
    code, _, err = invoke(home, "index", "--jsonl", str(records), "-c", "notes")
    assert code == 2
    assert err.splitlines()[0] == (
        f"Error: {records}: line 2: not valid JSON (Expecting property name enclosed in double quotes); "
        "line 3: metadata 'tags' has a list; only str, int, float and bool are allowed; "
        'line 4: "text" must be a string'
    )
    assert err.splitlines()[1] == "Hint: nothing was enqueued; fix the records and submit again"
    assert jobs(home) == [] and queued(home) == 0 and chunk_count(home) == 0


def test_jsonl_records_are_indexed_with_their_ids(home: Path, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text(
        '{"id": "a", "text": "first record", "metadata": {"lang": "en", "n": 1}}\n\n{"text": "no id here"}\n'
        '{"id": 7, "text": "   "}\n'
    )
    code, out, err = invoke(home, "index", "--jsonl", str(records), "-c", "notes", "--json")
    assert code == 0, err
    sub = json.loads(out)
    assert (sub["chunks"], sub["new"]) == (2, 2)
    assert sub["skipped"] == [{"source": f"{records}:4", "reason": "empty text"}]
    with sqlite3.connect(home / "ledger.db") as conn:
        rows = dict(conn.execute("SELECT id, metadata FROM chunks"))
    meta = json.loads(rows["a"])
    assert {k: v for k, v in meta.items() if not k.startswith("_node_")} == {
        "lang": "en", "n": 1, "content_hash": meta["content_hash"], "document_id": "a",
    }  # fmt: skip
    assert len(rows) == 2


def test_empty_corpus(home: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blank.txt").write_text("\n\n   \n")
    (corpus / "data.bin").write_bytes(b"\x00\x01")
    code, _, err = invoke(home, "index", str(corpus), "-c", "docs")
    assert code == 2
    assert err == f"Error: no indexable text under {corpus} (1 binary, 1 empty skipped)\n"
    assert jobs(home) == [] and queued(home) == 0


def test_bad_configuration_names_the_setting(home: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text\n")
    code, _, err = invoke(home, "index", str(tmp_path / "a.txt"), "-c", "docs", INDEXQ_CHUNK_OVERLAP="-1")
    assert code == 2
    assert err.startswith("Error: INDEXQ_CHUNK_OVERLAP: chunk overlap must be >= 0")
    code, _, err = invoke(home, "worker", "--commit-batch", "50")
    assert code == 2
    assert err == "Error: commit batch size must be between 1 and 10, got 50\n"


def test_index_needs_paths_or_jsonl(home: Path) -> None:
    code, _, err = invoke(home, "index", "-c", "docs")
    assert code == 2
    assert err == "Error: give PATHS to index, or --jsonl FILE\nHint: see 'indexq index --help'\n"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["worker"], {"INDEXQ_PRECISION": "junk"},
         "Invalid value for INDEXQ_PRECISION (from the environment): 'junk' is not one of 'fp32', 'fp16', 'bf16'."),
        (["worker", "--precision", "junk"], {},
         "Invalid value for '--precision': 'junk' is not one of 'fp32', 'fp16', 'bf16'."),
        (["worker"], {"INDEXQ_MICRO_BATCH": "many"},
         "Invalid value for INDEXQ_MICRO_BATCH (from the environment): 'many' is not a valid integer."),
        # An option read from either of two variables names the one that was set.
        (["worker"], {"CHROMADB_MEMORY_THRESHOLD": "junk"},
         "Invalid value for CHROMADB_MEMORY_THRESHOLD (from the environment): 'junk' is not a valid float."),
        (["worker"], {"INDEXQ_MEMORY_THRESHOLD": "junk", "CHROMADB_MEMORY_THRESHOLD": "80"},
         "Invalid value for INDEXQ_MEMORY_THRESHOLD (from the environment): 'junk' is not a valid float."),
        (["index", "x"], {}, "Missing option '--collection' / '-c'."),
        (["search", "x", "-k", "junk"], {}, "Invalid value for '-k': 'junk' is not a valid integer range."),
        (["nope"], {}, "No such command 'nope'."),
    ],
)  # fmt: skip
def test_bad_usage_is_one_error_line_and_a_hint(home: Path, args: list[str], env: dict[str, str], message: str) -> None:
    """As every other error (README, "Exit codes"): no usage block, exit 2, nothing made."""
    code, out, err = invoke(home, *args, **env)
    command = "indexq" if args == ["nope"] else f"indexq {args[0]}"
    assert (code, out, err) == (2, "", f"Error: {message}\nHint: see '{command} --help'\n")
    assert not home.exists()


def test_unknown_home_and_job(home: Path) -> None:
    import pipeline
    from pipeline.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no indexq data home at"):
        pipeline.job("nope", Config(home=home))
    Config(home=home).ensure_home()
    with pytest.raises(NotFoundError, match="no indexq data home at"):  # a folder, no ledger
        pipeline.status(Config(home=home))
    pipeline.resume(Config(home=home))  # makes the queue and the ledger: a data home
    pipeline.status(Config(home=home))
    with pytest.raises(NotFoundError, match="no job 'nope'"):
        pipeline.wait("nope", Config(home=home))


def test_resubmitting_records_with_changes_replaces_and_removes(home: Path) -> None:
    import pipeline

    config = Config(home=home)
    pipeline.submit_records([{"id": "x", "text": "one"}, {"id": "y", "text": "two"}], "notes", config=config)
    long_text = "word " * 600  # more than one chunk: x, x#1, ...
    sub_job = pipeline.submit_records([{"id": "x", "text": long_text}], "notes", config=config)
    with sqlite3.connect(home / "ledger.db") as conn:
        states = dict(conn.execute("SELECT id, state FROM chunks"))
    assert states["x"] == "pending" and states["x#1"] == "pending"
    # Records are identified by id: "y" was not resubmitted, so it stays.
    assert states["y"] == "pending"
    assert pipeline.job(sub_job, config).chunks >= 2


def test_a_record_with_too_many_metadata_keys_is_refused_with_its_line(home: Path, tmp_path: Path) -> None:
    from pipeline.corpus import MAX_METADATA_KEYS

    records = tmp_path / "records.jsonl"
    most = {f"k{n}": n for n in range(MAX_METADATA_KEYS)}
    records.write_text(
        json.dumps({"id": "most", "text": "as many keys as allowed", "metadata": most}) + "\n"
        + json.dumps({"id": "many", "text": "one key too many", "metadata": {**most, "one more": 1}}) + "\n"
        + json.dumps({"id": "huge", "text": "ten thousand", "metadata": {f"k{n}": n for n in range(10_000)}}) + "\n"
    )  # fmt: skip
    code, out, err = invoke(home, "index", "--jsonl", str(records), "-c", "notes")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"Error: {records}: line 2: metadata has {MAX_METADATA_KEYS + 1} keys, more than the {MAX_METADATA_KEYS}"
        " allowed; line 3: metadata has 10000 keys, more than the 1000 allowed",
        "Hint: nothing was enqueued; fix the records and submit again",
    ]
    assert jobs(home) == [] and queued(home) == 0


def test_chroma_takes_records_at_the_metadata_key_limit(tmp_path: Path) -> None:
    """The limit is measured against Chroma: 10 records of MAX_METADATA_KEYS keys, with the
    keys indexq adds, are written, and the collection takes the next upsert (over 5,460 keys
    a record jams every compaction of its collection)."""
    import chromadb

    from pipeline.chunking import Chunk
    from pipeline.corpus import MAX_METADATA_KEYS, Record
    from pipeline.producer import _record_chunk

    assert MAX_METADATA_KEYS == 1000
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    collection = client.get_or_create_collection("notes")
    record = Record("r", "text", {f"key {n}": "v" * 20 for n in range(MAX_METADATA_KEYS)}, 1)
    chunk = Chunk(text="text", ordinal=1, start_line=1, end_line=1, hash="h")
    metadata = _record_chunk(record, "r", chunk, 2)["metadata"]
    assert len(metadata) == MAX_METADATA_KEYS + 5
    ids = [f"r{n}" for n in range(10)]
    collection.upsert(ids=ids, embeddings=[[0.1] * 4] * 10, metadatas=[metadata] * 10, documents=["text"] * 10)
    collection.upsert(ids=["after"], embeddings=[[0.2] * 4], metadatas=[{"n": 1}], documents=["after"])
    assert collection.count() == 11
    assert len(collection.get(ids=["r9"], include=["metadatas"])["metadatas"][0]) == MAX_METADATA_KEYS + 5


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"id": "a\u0000b", "text": "t"}, '"id" holds a NUL character (at character 1)'),
        ({"id": "c", "text": "t", "metadata": {"document_id": "doc\u0000"}},
         "metadata 'document_id' holds a NUL character (at character 3)"),
        # Stripped, the key would be another of the record's ("a"): which value wins?
        ({"id": "d", "text": "t", "metadata": {"a": 1, "a\u0000": 2}}, "metadata key 'a\\x00' holds a NUL character"),
    ],
)  # fmt: skip
def test_a_nul_in_an_id_is_refused_with_its_line(
    home: Path, tmp_path: Path, record: dict[str, Any], problem: str
) -> None:
    """Chroma's metadata loses NUL bytes; the ledger would keep the id with one (check --deep: damage)."""
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "fine", "text": "fine"}) + "\n" + json.dumps(record) + "\n")
    code, out, err = invoke(home, "index", "--jsonl", str(records), "-c", "notes")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"Error: {records}: line 2: {problem}",
        "Hint: nothing was enqueued; fix the records and submit again",
    ]
    assert jobs(home) == [] and queued(home) == 0


def test_a_huge_integer_or_metadata_that_is_no_object_is_refused_with_its_line(home: Path, tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text(
        '{"id": "a", "text": "first record"}\n'
        '{"id": ' + "1" * 5000 + ', "text": "hi"}\n'
        '{"id": "c", "text": "third", "metadata": {"n": '
        + "9" * 5000
        + "}}\n"
        + "".join(f'{{"id": "m{n}", "text": "t", "metadata": {v}}}\n' for n, v in enumerate(("false", "0", '""')))
        + '{"id": "ok", "text": "t", "metadata": null}\n'
    )
    code, _, err = invoke(home, "index", "--jsonl", str(records), "-c", "notes")
    assert code == 2, err
    limit = sys.get_int_max_str_digits()
    assert err.splitlines()[0] == (
        f"Error: {records}: line 2: a number of more than {limit} digits; line 3: a number of more than {limit}"
        ' digits; line 4: "metadata" must be an object; line 5: "metadata" must be an object; line 6:'
        ' "metadata" must be an object'
    )
    assert jobs(home) == [] and queued(home) == 0


def test_the_python_api_refuses_what_it_cannot_take_in_one_line(home: Path, tmp_path: Path) -> None:
    """Wrong types from a caller are BadInputError or ConfigError naming what is wrong,
    and a single string is one path or one glob, not a list of its characters."""
    from pipeline import api
    from pipeline.errors import BadInputError, ConfigError

    config = Config(home=home, model="hash:384")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.md").write_text("markdown doc text\n")
    (tree / "b.txt").write_text("plain text that --include '*.md' leaves out\n")
    api.submit_paths(str(tree), "inc", include="*.md", config=config)
    with sqlite3.connect(home / "ledger.db") as conn:
        assert [s for (s,) in conn.execute("SELECT DISTINCT source FROM chunks")] == [str(tree / "a.md")]
    refused: list[tuple[Any, str]] = [
        (lambda: api.submit_records(None, "docs", config=config), "records must be a list"),
        (lambda: api.submit_records({"text": "x"}, "docs", config=config), "records must be a list"),
        (lambda: api.submit_records([{"id": 10**5000, "text": "x"}], "docs", config=config), "more than"),
        (lambda: api.submit_paths(None, "docs", config=config), "paths must be a list"),
        (lambda: api.submit_paths([tree, 3], "docs", config=config), "paths: 3 is a int"),
        (lambda: api.submit_paths([tree], "docs", exclude=[None], config=config), "exclude: None is a NoneType"),
        (lambda: api.submit_paths([tree], None, config=config), "a collection name must be a string"),
        (lambda: api.search(None, "docs", config=config), "the search text must be a string"),
        (lambda: api.search(b"x", "docs", config=config), "the search text must be a string"),
        (lambda: api.search("x", None, config=config), "a collection name must be a string"),
        # prune="false" is a truthy string: it pruned a deleted file's chunks.
        (lambda: api.submit_paths([tree], "docs", prune="false", config=config), "prune must be True or False"),
        (lambda: api.submit_paths([tree], "docs", follow_symlinks="no", config=config), "follow_symlinks must be"),
        (lambda: api.submit_jsonl(None, "docs", config=config), "path must be a string or a path, got NoneType"),
        (lambda: api.submit_jsonl(b"/x.jsonl", "docs", config=config), "path must be a string or a path, got bytes"),
        (lambda: api.submit_records([{"text": "x"}], "docs", source=b"s", config=config), "source must be a non-"),
        (lambda: api.submit_records([{"text": "x"}], "docs", source=None, config=config), "source must be a non-"),
        (lambda: api.wait("j", config=config, timeout="5"), "timeout must be None or a number of seconds"),
        (lambda: api.wait("j", config=config, timeout=float("nan")), "timeout must be None or a number of seconds"),
        (lambda: api.status(config, jobs=-1), "jobs must be a whole number from 0 to 10000, got -1"),
        (lambda: api.status(config, jobs="3"), "jobs must be a whole number from 0 to 10000, got '3'"),
    ]
    for call, message in refused:
        with pytest.raises(BadInputError, match=message):
            call()
    for call in (lambda: api.status(str(home)), lambda: api.resume(str(home)), lambda: api.search("x", "doc", 5, home)):
        with pytest.raises(ConfigError, match=r"config must be a pipeline.Config, got (str|PosixPath)"):
            call()
    with sqlite3.connect(home / "ledger.db") as conn:  # nothing above wrote a row, and nothing was pruned
        assert conn.execute("SELECT count(*), min(state) FROM chunks").fetchone() == (1, "pending")
    for fields, message in (
        ({"home": ""}, "the data home is empty"),
        ({"home": None}, "home must be a path, got None"),
        ({"chunk_tokens": "10"}, "chunk_tokens must be a whole number or None, got '10'"),
        ({"commit_batch": True}, "commit_batch must be a whole number, got True"),
        ({"auto_recover": 1}, "auto_recover must be True or False, got 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            Config(**fields)
    assert not (Path.cwd() / "queue.key").exists()


def test_metadata_keys_chroma_refuses_are_refused_with_their_line(home: Path, tmp_path: Path) -> None:
    """Chroma refuses a key that starts with '#' or '$' at the commit ("Invalid metadata at
    index 0"), failing the chunk; the producer says which key, before anything is written."""
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(
            json.dumps({"id": f"r{n}", "text": "t", "metadata": {key: 1}}) + "\n"
            for n, key in enumerate(("$and", "#document", "chroma:x", "fine$", "ok#"))
        )
    )
    code, _, err = invoke(home, "index", "--jsonl", str(records), "-c", "notes")
    assert code == 2, err
    assert err.splitlines()[0] == (
        f"Error: {records}: line 1: metadata key '$and' starts with '$', which Chroma refuses; line 2: metadata"
        " key '#document' starts with '#', which Chroma refuses; line 3: metadata key 'chroma:x' is reserved by"
        " Chroma"
    )
    assert jobs(home) == []
