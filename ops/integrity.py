"""Layered integrity checks of a Chroma directory against the ledger, cheap to deep.

1. ``sqlite``: ``PRAGMA quick_check`` (``integrity_check`` when deep) of chroma.sqlite3.
2. ``fts``: FTS5 ``'integrity-check'`` of ``embedding_fulltext_search``.
3. ``hnsw``: each vector segment's files: header fields against file sizes,
   ``link_lists.bin`` parses to its end, the label maps of ``index_metadata.pickle``
   agree with the header.
4. ``ledger``: the ids of each collection against the ledger's committed ids.
5. ``deep``: every embedding and document read back against the ledger, and
   self-recall on a sample.

Layers 4 and 5 load Chroma, so they run in a subprocess (``ops.probe``): a damaged
segment can kill its reader with SIGSEGV, and that must be a finding, not a crash.
A SQLite check cannot see vector damage, which is why the HNSW and probe layers exist.

Against a Chroma server (``chroma_url``) the files are the server's: only layers 4
and 5 run, through the API. A server that does not answer raises UnreachableError:
unavailable is not damage, and must never start a recovery. Likewise a disk that
refuses a read or a write (full, read-only, permission, I/O error: "database or disk
is full" from Chroma opening its directory) raises StorageError: cannot check. And a
lock another program holds on chroma.sqlite3 ("database is locked", past the lock
timeout) raises BusyError: busy, not damage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import DEFAULT_LOCK_TIMEOUT, redact_url
from pipeline.errors import BusyError, IndexqError, StorageError, first_line, storage_error, storage_errors

if TYPE_CHECKING:
    from pipeline.config import Config

VECTOR_SEGMENT = "urn:chroma:segment/vector/hnsw-local-persisted"
# hnswlib's header as chroma-hnswlib writes it: version, then the index parameters.
_HEADER = struct.Struct("<iQQQQQQiIQQQdQ")
_HEADER_FIELDS = (
    "version", "offset_level0", "max_elements", "cur_element_count", "size_data_per_element", "label_offset",
    "offset_data", "max_level", "enterpoint", "max_m", "max_m0", "m", "mult", "ef_construction",
)  # fmt: skip
PROBE_TIMEOUT = 1800
# From this many copies of one vector in a collection (one chunk text under as many ids),
# Chroma's HNSW graph leaves some other vectors where no search reaches them (measured:
# 2,000 random vectors beside 100 copies of one, 28 not among their own 50 nearest and
# all found among 1,000; beside 200 copies, 25 not found even there). A rebuild from the
# ledger makes the same graph, so in such a collection vectors the deep check cannot find
# are noted, not damage: recovery would change nothing, at every deep check.
CROWDING_COPIES = 100


@dataclasses.dataclass(frozen=True)
class Problem:
    layer: str
    where: str
    what: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"[{self.layer}] {self.where}: {self.what}"


@dataclasses.dataclass
class Report:
    deep: bool
    problems: list[Problem] = dataclasses.field(default_factory=list)
    collections: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    pause_seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)  # found, and not damage

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def layers(self) -> set[str]:
        return {p.layer for p in self.problems}

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "deep": self.deep,
            "problems": [p.as_dict() for p in self.problems],
            "collections": self.collections,
            "seconds": round(self.seconds, 3),
            "pause_seconds": round(self.pause_seconds, 3),
            "notes": self.notes,
        }


class _NoGlobals(pickle.Unpickler):
    """index_metadata.pickle holds only dicts, ints and strings: refuse anything else."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not plain data")


def _not_storage(exc: BaseException, db: Path | None = None) -> None:
    """Re-raise a storage problem met by a layer: it could not look, which is not damage.
    So is a lock another program holds on ``db`` (BusyError)."""
    if storage_error(exc) is not None:
        raise exc
    if db is not None and (why := busy(exc)) is not None:
        raise busy_error(db, why) from exc


# SQLite's SQLITE_BUSY (5) and SQLITE_LOCKED (6), in the low byte of an extended result
# code, and how they read in a message (Chroma's Rust core passes only the message).
_BUSY_CODES = frozenset({5, 6})
_BUSY_WORDS = ("database is locked", "database table is locked", "database schema is locked")


def busy(exc: BaseException) -> str | None:
    """What ``exc`` (or one of its causes) says if it is SQLite's "locked" or "busy": another
    connection held a lock past the busy timeout, which is not damage. Else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = getattr(cause, "sqlite_errorcode", None)
        if (isinstance(code, int) and code & 0xFF in _BUSY_CODES) or any(w in str(cause).lower() for w in _BUSY_WORDS):
            return first_line(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def busy_error(db: Path, why: str) -> BusyError:
    return BusyError(
        f"cannot check {db}: another program holds a lock on it ({why}); this is not damage",
        hint="nothing was judged damaged or changed; run it again once that program lets go (`fuser` names it)",
    )


@contextlib.contextmanager
def _busy_is_not_damage(db: Path) -> Iterator[None]:
    """A lock another program holds on ``db``, met anywhere in the block, as BusyError."""
    try:
        yield
    except IndexqError:
        raise
    except Exception as exc:
        if (why := busy(exc)) is None:
            raise
        raise busy_error(db, why) from exc


def check_sqlite(chroma: Path, deep: bool, busy_timeout: float = DEFAULT_LOCK_TIMEOUT) -> list[Problem]:
    db = chroma / "chroma.sqlite3"
    if not db.exists():
        return [Problem("sqlite", str(db), "missing")]
    try:
        # Read-write (never created here): a hot journal left by a writer killed in the
        # middle of a transaction is rolled back, as the writer's next open would do.
        # Read-only, SQLite refuses to read past it ("attempt to write a readonly
        # database") and the check would blame the disk. The check holds the commit
        # lock; on a read-only mount SQLite opens the file read-only all the same.
        # Another program's lock is waited for as long as the commit lock (lock_timeout);
        # still held then, it is BusyError ("database is locked" is no damage).
        conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=busy_timeout)
        try:
            rows = conn.execute("PRAGMA integrity_check" if deep else "PRAGMA quick_check").fetchall()
            conn.execute("SELECT count(*) FROM segments").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        _not_storage(exc, db)
        return [Problem("sqlite", str(db), str(exc))]
    messages = [r[0] for r in rows]
    if messages != ["ok"]:
        return [Problem("sqlite", str(db), "; ".join(messages[:5]))]
    return []


def check_fts(chroma: Path, busy_timeout: float = DEFAULT_LOCK_TIMEOUT) -> list[Problem]:
    db = chroma / "chroma.sqlite3"
    try:
        # 'integrity-check' is spelled as an INSERT but changes nothing; rank 1 also
        # compares the index with the content table. As an INSERT it waits for another
        # program's write lock too (BusyError past busy_timeout, never damage).
        conn = sqlite3.connect(str(db), timeout=busy_timeout)
        try:
            conn.execute(
                "INSERT INTO embedding_fulltext_search(embedding_fulltext_search, rank) VALUES ('integrity-check', 1)"
            )
            conn.rollback()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        _not_storage(exc, db)
        return [Problem("fts", "embedding_fulltext_search", str(exc))]
    return []


def vector_segments(chroma: Path) -> list[tuple[str, str]]:
    """(segment id, collection id) of every HNSW segment chroma.sqlite3 lists."""
    conn = sqlite3.connect(f"file:{chroma / 'chroma.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT id, collection FROM segments WHERE type=?", (VECTOR_SEGMENT,)).fetchall()
    finally:
        conn.close()


def _has_records(chroma: Path, collection_id: str) -> bool:
    conn = sqlite3.connect(f"file:{chroma / 'chroma.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(
            "SELECT 1 FROM embeddings e JOIN segments s ON s.id = e.segment_id WHERE s.collection=? LIMIT 1",
            (collection_id,),
        ).fetchone()
        return row is not None
    finally:
        conn.close()


def check_hnsw_segment(folder: Path) -> list[Problem]:
    """The structure of one persisted HNSW segment folder."""
    where = str(folder)
    header_file = folder / "header.bin"
    if not header_file.exists():
        return [Problem("hnsw", where, "header.bin missing")]
    raw = header_file.read_bytes()
    if len(raw) != _HEADER.size:
        return [Problem("hnsw", where, f"header.bin is {len(raw)} bytes, expected {_HEADER.size}")]
    header = dict(zip(_HEADER_FIELDS, _HEADER.unpack(raw), strict=True))
    count, size = header["cur_element_count"], header["size_data_per_element"]
    problems: list[Problem] = []
    if count > header["max_elements"] or header["max_m0"] == 0 or size == 0:
        return [Problem("hnsw", where, f"header.bin fields are inconsistent: {header}")]
    expected = {"data_level0.bin": count * size, "length.bin": count * 4}
    for name, want in expected.items():
        path = folder / name
        if not path.exists():
            problems.append(Problem("hnsw", where, f"{name} missing"))
        # A fresh index (no element persisted yet) is written at its initial capacity.
        elif count and path.stat().st_size != want:
            problems.append(Problem("hnsw", where, f"{name} is {path.stat().st_size} bytes, header says {want}"))
    problems.extend(_check_link_lists(folder, count, header["max_m"]))
    problems.extend(_check_label_maps(folder, count))
    return problems


def _check_link_lists(folder: Path, count: int, max_m: int) -> list[Problem]:
    path = folder / "link_lists.bin"
    if not path.exists():
        return [Problem("hnsw", str(folder), "link_lists.bin missing")] if count else []
    data = path.read_bytes()
    per_level = max_m * 4 + 4  # links plus their count, per upper level
    offset = 0
    for element in range(count):
        if offset + 4 > len(data):
            return [Problem("hnsw", str(folder), f"link_lists.bin ends at element {element} of {count}")]
        (size,) = struct.unpack_from("<I", data, offset)
        if size % per_level:
            return [Problem("hnsw", str(folder), f"link_lists.bin: element {element} has a bad list size {size}")]
        offset += 4 + size
    if offset != len(data):
        return [Problem("hnsw", str(folder), f"link_lists.bin is {len(data)} bytes, its lists take {offset}")]
    return []


def _check_label_maps(folder: Path, count: int) -> list[Problem]:
    path = folder / "index_metadata.pickle"
    if not path.exists():
        # Nothing persisted yet lives only in Chroma's log: no pickle is then normal.
        return [Problem("hnsw", str(folder), "index_metadata.pickle missing")] if count else []
    try:
        meta = _NoGlobals(io.BytesIO(path.read_bytes())).load()
        id_to_label, label_to_id = meta["id_to_label"], meta["label_to_id"]
        if not isinstance(id_to_label, dict) or not isinstance(label_to_id, dict):
            raise ValueError("label maps are not dicts")
    except Exception as exc:
        return [Problem("hnsw", str(folder), f"index_metadata.pickle unreadable: {type(exc).__name__}: {exc}")]
    if len(id_to_label) != len(label_to_id) or any(label_to_id.get(v) != k for k, v in id_to_label.items()):
        return [Problem("hnsw", str(folder), "index_metadata.pickle label maps disagree with each other")]
    if len(id_to_label) > count or meta.get("total_elements_added", count) < len(id_to_label):
        return [
            Problem("hnsw", str(folder), f"index_metadata.pickle maps {len(id_to_label)} labels, header has {count}")
        ]
    return []


def check_hnsw(chroma: Path) -> list[Problem]:
    problems: list[Problem] = []
    try:
        segments = vector_segments(chroma)
    except sqlite3.DatabaseError as exc:
        _not_storage(exc, chroma / "chroma.sqlite3")
        return [Problem("hnsw", str(chroma), f"cannot list segments: {exc}")]
    for segment, collection in segments:
        folder = chroma / segment
        if not folder.is_dir():
            if _has_records(chroma, collection):
                problems.append(Problem("hnsw", str(folder), "vector segment folder missing"))
            continue
        problems.extend(check_hnsw_segment(folder))
    return problems


def run_probe(chroma: Path, ledger: Path, deep: bool, url: str | None = None) -> tuple[dict[str, Any], list[Problem]]:
    """Layers 4 and 5, in a fresh process."""
    # A server's URL travels in the environment: on the command line, any user's `ps` would show its password.
    env = _probe_env()
    env.pop("INDEXQ_CHROMA_URL", None)
    target = [] if url else ["--chroma", str(chroma)]
    if url:
        env["INDEXQ_CHROMA_URL"] = url
    argv = [sys.executable, "-m", "ops.probe", *target, "--ledger", str(ledger)]
    if deep:
        argv.append("--deep")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return {}, [Problem("chroma", str(chroma), f"the Chroma probe did not finish in {PROBE_TIMEOUT}s")]
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return {}, [Problem("chroma", str(chroma), f"loading Chroma killed the probe with {name}")]
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        _not_storage(RuntimeError(tail))  # e.g. it could not even start on a full disk
        return {}, [Problem("chroma", str(chroma), f"the Chroma probe failed: {tail[:300]}")]
    if "unreachable" in result:
        from pipeline.errors import UnreachableError

        raise UnreachableError(result["unreachable"], hint="the check was not made; run it again once Chroma answers")
    if "storage" in result:
        where = redact_url(url) if url else str(chroma)
        raise StorageError(f"cannot check {where} (this is not damage): {result['storage']}", hint=result.get("hint"))
    if "busy" in result:  # Chroma met another program's lock on its database: busy, not damage
        raise busy_error(chroma / "chroma.sqlite3", result["busy"])
    if "error" in result:
        where = redact_url(url) if url else str(chroma)
        return {}, [Problem("chroma", where, f"Chroma could not be read: {result['error']}")]
    # A collection of the ledger's name that holds vectors of another dimension than the
    # ledger's was made by another program: no replay can fill it (Chroma refuses every
    # vector), so it is damage beyond chunks missing, repaired by a restore or a rebuild.
    unlike = [Problem("ledger", name, what) for name, what in result.get("unlike", {}).items()]
    return result["collections"], unlike + problems_of(result["collections"])


def problems_of(collections: dict[str, Any]) -> list[Problem]:
    """The damage in the probe's findings (vectors out of reach beside many copies of one
    are not: see ``notes``)."""
    problems: list[Problem] = []
    for name, info in collections.items():
        if info["missing"]:
            problems.append(
                Problem("ledger", name, f"{info['missing']} committed chunks missing, e.g. {info['missing_ids']}")
            )
        if info["unknown"]:
            problems.append(
                Problem(
                    "ledger", name, f"{info['unknown']} chunks the ledger does not know, e.g. {info['unknown_ids']}"
                )
            )
        if info.get("mismatched"):
            problems.append(
                Problem(
                    "deep", name, f"{info['mismatched']} chunks differ from the ledger, e.g. {info['mismatched_ids']}"
                )
            )
        if info.get("recall_failures") and info.get("copies", 0) < CROWDING_COPIES:
            problems.append(
                Problem(
                    "deep",
                    name,
                    f"{info['recall_failures']} of {info['recall_sample']} vectors are not their own nearest neighbour",
                )
            )
    return problems  # fmt: skip


def notes(collections: dict[str, Any]) -> list[str]:
    """What a check found that is not damage: vectors Chroma's index cannot reach beside many
    copies of one vector (CROWDING_COPIES)."""
    return [
        f"{name}: {info['recall_failures']} of {info['recall_sample']} vectors are out of reach of Chroma's index"
        f" beside {info['copies']} copies of one chunk text; not damage (a rebuild makes the same index):"
        " searches may miss them"
        for name, info in collections.items()
        if info.get("recall_failures") and info.get("copies", 0) >= CROWDING_COPIES
    ]


def _probe_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def nothing_written(chroma: Path, ledger: Path) -> bool:
    """No Chroma database yet and no chunk committed: nothing to check or back up (a
    missing database the ledger says was written to is damage)."""
    if (chroma / "chroma.sqlite3").exists():
        return False
    if not ledger.exists():
        return True
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT 1 FROM chunks WHERE state='committed' LIMIT 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        row = None
    finally:
        conn.close()
    return row is None


INTERRUPTED_RESTORE = "a restore was interrupted before its replay finished"


def check_home(config: Config, deep: bool = False) -> Report:
    """Every layer on a data home's Chroma (directory or server) against its ledger."""
    report = check(
        config.chroma_dir, config.ledger_path, deep=deep, url=config.chroma_url, busy_timeout=config.lock_timeout
    )
    if config.pending_replay_path.exists():
        # Chunks committed after the backup's watermark may still hold the backup's older
        # text, which only a deep read-back would see: say so at every depth.
        report.problems.append(Problem("ledger", str(config.pending_replay_path), INTERRUPTED_RESTORE))
    return report


def check(
    chroma: Path,
    ledger: Path,
    deep: bool = False,
    url: str | None = None,
    busy_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> Report:
    """Every layer, cheap to deep. Structural damage skips the probe (it could only crash).

    Raises StorageError if the files could not be read (or Chroma could not open them)
    for want of space, permission or a working disk: cannot check, never damage. Raises
    BusyError if another program holds a lock on chroma.sqlite3 for ``busy_timeout``
    seconds: busy, never damage.
    """
    started = time.monotonic()
    report = Report(deep=deep)
    with (
        storage_errors(f"cannot check {redact_url(url) if url else chroma} (this is not damage)", chroma),
        _busy_is_not_damage(chroma / "chroma.sqlite3"),
    ):
        if not url and nothing_written(chroma, ledger):
            return report  # a fresh home: the writer has not created its directory yet
        if not url:
            report.problems.extend(check_sqlite(chroma, deep, busy_timeout))
            if not report.problems:
                report.problems.extend(check_fts(chroma, busy_timeout))
                report.problems.extend(check_hnsw(chroma))
        if not report.layers - {"fts"}:
            report.collections, found = run_probe(chroma, ledger, deep, url)
            report.problems.extend(found)
            report.notes = notes(report.collections)
    report.seconds = time.monotonic() - started
    return report
