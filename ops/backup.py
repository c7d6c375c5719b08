"""Consistent, verified backups of the Chroma directory and the ledger.

A backup is taken at a quiescent point: under the commit lock, which the writer
holds around each commit, so Chroma and the ledger agree. It holds ``chroma.sqlite3``
(through SQLite's backup API), every vector segment folder (Chroma's SQLite file does
not hold the vectors once its log is purged), a ledger snapshot, and a manifest with
the ledger watermark. It is written under ``.partial-NAME`` and renamed when complete,
so a crash leaves nothing that looks like a backup. Each backup is then verified by
deep-checking a scratch copy from a fresh process; only verified backups count.

Against a Chroma server the backup is logical: the ledger snapshot and the manifest,
no Chroma files (they are the server's). The ledger holds every committed chunk with
its embedding, so a restore rebuilds the collections on the server from it. Such a
backup is verified by its checksums, an integrity check of the snapshot, and the
committed rows it holds against the manifest's counts, each with its embedding.

A backup starts only if the filesystem has room for it and for its verification copy,
beyond the writer's minimum free space (``min_free_mb``): otherwise StorageError, and
nothing is written. A disk that refuses the verification is not a failed verification:
the unverified backup is removed and StorageError raised.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ops.integrity import check
from pipeline import alerts
from pipeline.config import Config
from pipeline.errors import BackupFailedError, NothingToBackUpError, StorageError, first_line, storage_error
from pipeline.faults import fault_point
from pipeline.fsync import fsync_dir, fsync_tree, write_json_atomic
from pipeline.ledger import Ledger
from pipeline.locks import CommitLock
from pipeline.version import __version__

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


VERIFICATION = "verification.json"


NAME_FORMAT = "%Y%m%dT%H%M%SZ"  # a backup's name: the UTC time it was taken


def _name(now: float) -> str:
    return time.strftime(NAME_FORMAT, time.gmtime(now))


def snapshot_chroma(chroma: Path, target: Path) -> None:
    """Copy a quiet Chroma directory: SQLite through its backup API, segment folders as files."""
    target.mkdir(parents=True, mode=0o700)
    src = sqlite3.connect(f"file:{chroma / 'chroma.sqlite3'}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(str(target / "chroma.sqlite3"))
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    for entry in sorted(chroma.iterdir()):
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checksums(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(p for p in root.rglob("*") if p.is_file())}


def checksum_problems(path: Path) -> list[str]:
    """What no longer matches in a backup: files changed or gone since its manifest was
    written, files added to its Chroma directory (a restore would copy them in: a journal
    beside ``chroma.sqlite3`` would be played into it), and a manifest whose watermark is
    not its ledger snapshot's (the checksums do not cover the manifest itself, and a
    restore replays every commit after that watermark). Every backup holds ``ledger.db``:
    a manifest that does not list it is a changed one. A logical backup's counts must be
    the snapshot's too, as its verification always required (a full backup's are for the
    listing: those of a backup taken before they were read from the snapshot may differ)."""
    manifest = json.loads((path / MANIFEST).read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "ledger.db" not in files:
        return [f"{MANIFEST}: its list of files is not a backup's (ledger.db is not in it)"]
    actual = _checksums(path)
    problems = [f"{rel}: checksum differs from the manifest" for rel, digest in files.items()
                if actual.get(rel) != digest]  # fmt: skip
    problems += [f"{rel}: not in the manifest" for rel in actual
                 if rel.startswith("chroma/") and rel not in files]  # fmt: skip
    if problems:
        return problems
    figures = _snapshot_figures(path / "ledger.db")
    if isinstance(figures, str):
        return [figures]
    watermark, counts = figures
    if manifest.get("watermark") != watermark:
        problems.append(f"{MANIFEST}: watermark {manifest.get('watermark')!r}, its ledger snapshot's is {watermark}")
    if manifest.get("kind") == "logical" and manifest.get("collections") != counts:
        problems.append(f"{MANIFEST}: committed counts {manifest.get('collections')!r}, its ledger snapshot's {counts}")
    return problems


def _snapshot_figures(snapshot: Path) -> tuple[int, dict[str, int]] | str:
    """A ledger snapshot's watermark and committed chunks per collection (what a backup's
    manifest records, read under the same commit lock), or why they cannot be read."""
    # immutable: read the file as it is, without creating WAL side files in the backup.
    conn = sqlite3.connect(f"file:{snapshot}?mode=ro&immutable=1", uri=True)
    try:
        (watermark,) = conn.execute("SELECT CAST(value AS INTEGER) FROM meta WHERE key='seq'").fetchone()
        counts = dict(conn.execute(
            "SELECT collection, count(*) FROM chunks WHERE state='committed' GROUP BY collection"))  # fmt: skip
        return int(watermark), counts
    except (sqlite3.Error, TypeError) as exc:  # TypeError: no watermark row
        return f"ledger.db: {first_line(exc)}"
    finally:
        conn.close()


def home_of(path: Path) -> str | None:
    """The id of the data home a backup was made of (its ledger snapshot's), or None (a
    backup made before homes had one, or a snapshot that cannot be read: the checks say)."""
    try:
        conn = sqlite3.connect(f"file:{path / 'ledger.db'}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='home'").fetchone()
        return str(row[0]) if row else None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def discredit(path: Path, problems: list[str]) -> None:
    """Record that the backup at ``path`` must not be restored (its verdict: not verified)."""
    verdict = {"verified": False, "time": time.time(), "seconds": 0.0, "problems": problems}
    write_json_atomic(path / VERIFICATION, verdict)


def _backups_folder(config: Config) -> None:
    """The backups folder, made if need be; one that cannot be a folder is one line (exit 1)."""
    try:
        config.backups_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise BackupFailedError(
            f"cannot keep backups in {config.backups_path}: {first_line(exc)}",
            hint="move the file (or the link to nowhere) that stands there away; checks go on without backups",
        ) from None


@contextlib.contextmanager
def backups_lock(config: Config) -> Iterator[None]:
    """One backup, verification or prune at a time in a data home (they share folders)."""
    _backups_folder(config)
    fd = os.open(config.backups_path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def create_backup(config: Config, verify: bool = True) -> dict[str, Any]:
    """Take, write and (by default) verify one backup; returns its listing entry."""
    config.require_home()
    with backups_lock(config):
        return _create_backup(config, verify)


def _create_backup(config: Config, verify: bool) -> dict[str, Any]:
    import chromadb

    logical = config.chroma_engine == "server"
    if not logical and not (config.chroma_dir / "chroma.sqlite3").exists():
        raise NothingToBackUpError(
            f"nothing to back up: {config.chroma_dir} has no chroma.sqlite3",
            hint="the writer creates it with its first start; if it was lost, run `indexq recover`",
        )
    # What a killed backup or verification left (under the lock, nothing else of ours runs):
    # counted as used space, it made every later backup fail for want of room.
    _remove_leftovers(config)
    _room_for_backup(config, logical)
    now = time.time()
    name = _name(now)
    while (config.backups_path / name).exists():
        now += 1
        name = _name(now)
    partial = config.backups_path / f".partial-{name}"
    partial.mkdir(mode=0o700)
    ledger = Ledger(config.ledger_path)
    lock = CommitLock(config.commit_lock_path)
    try:
        with lock.held(timeout=config.lock_timeout) as waited:
            paused = time.monotonic()
            if not logical:
                try:
                    snapshot_chroma(config.chroma_dir, partial / "chroma")
                except sqlite3.DatabaseError as exc:  # "database disk image is malformed"
                    if storage_error(exc) is not None:
                        raise
                    raise BackupFailedError(
                        f"cannot back up {config.chroma_dir}: {first_line(exc)}",
                        hint="`indexq check` says what is damaged; `indexq recover` repairs it",
                    ) from None
            ledger.backup_to(partial / "ledger.db")
            pause = time.monotonic() - paused
        # From the snapshot, not the live ledger: a producer may change a committed row (its
        # file edited) after the copy, which the manifest must not count.
        figures = _snapshot_figures(partial / "ledger.db")
        if isinstance(figures, str):
            raise BackupFailedError(f"cannot back up {config.ledger_path}: {figures}")
        watermark, counts = figures
        fault_point("backup-copied")
        manifest = {
            "name": name,
            "kind": "logical" if logical else "full",
            "chroma": config.chroma_shown,
            "time": now,
            "watermark": watermark,
            "collections": counts,
            "pause_seconds": round(pause, 4),
            "lock_wait_seconds": round(waited, 4),
            "indexq": __version__,
            "chromadb": chromadb.__version__,
            "files": _checksums(partial),
        }
        write_json_atomic(partial / MANIFEST, manifest)
        fsync_tree(partial)
        final = config.backups_path / name
        os.rename(partial, final)
        fsync_dir(config.backups_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        lock.close()
    logger.info("backup %s written: watermark %d, writer paused %.3fs", name, watermark, pause)
    result = {"verified": None}
    if verify:
        try:
            result = verify_backup(config, final)
        except Exception as exc:
            error = storage_error(exc, f"backup {name} could not be verified, so it was removed", config.home)
            if error is None:
                raise
            _discard(final)
            ledger.close()
            raise error from exc
    ok = bool(result.get("verified", True))
    summary = f"backup {name}: watermark {watermark}, paused the writer {pause:.3f}s" + (
        "" if ok else f", verification FAILED: {result.get('problems')}"
    )
    ledger.events.add("backup", ok, summary, {"name": name, "pause_seconds": pause, "verified": result.get("verified")})
    if not ok:
        alerts.raise_alert(config, ledger, summary)
    ledger.close()
    return describe(final)


def _room_for_backup(config: Config, logical: bool) -> None:
    """Raise StorageError unless the backup, its verification copy and the writer's
    minimum free space all fit: a backup must not be what fills the disk."""
    files = [config.ledger_path, *config.ledger_path.parent.glob(config.ledger_path.name + "-wal")]
    size = sum(f.stat().st_size for f in files if f.exists())
    if not logical:
        size += sum(f.stat().st_size for f in config.chroma_dir.rglob("*") if f.is_file())
    need = 2 * size + config.min_free_mb * 2**20
    free = shutil.disk_usage(config.backups_path).free
    if free < need:
        raise StorageError(
            f"not enough free space for a backup in {config.backups_path}: it needs about"
            f" {need / 2**20:.1f} MB (the copy, its verification and the writer's {config.min_free_mb} MB),"
            f" {free / 2**20:.1f} MB are free; nothing was written",
            hint="free space on that filesystem, or prune old backups",
        )


def verify_backup(config: Config, path: Path) -> dict[str, Any]:
    """Checksums, then a deep check of a scratch copy in a fresh process; records the verdict."""
    started = time.monotonic()
    manifest = json.loads((path / MANIFEST).read_text())
    problems = checksum_problems(path)
    if not problems and manifest.get("kind") == "logical":
        problems.extend(_verify_ledger_snapshot(path / "ledger.db"))
    elif not problems:
        # Opening Chroma may write to its directory: check a scratch copy, never the backup.
        scratch = config.backups_path / f".verify-{path.name}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            shutil.copytree(path / "chroma", scratch / "chroma")
            shutil.copy2(path / "ledger.db", scratch / "ledger.db")
            report = check(scratch / "chroma", scratch / "ledger.db", deep=True)
            problems.extend(str(p) for p in report.problems)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    verdict = {
        "verified": not problems,
        "time": time.time(),
        "seconds": round(time.monotonic() - started, 2),
        "problems": problems,
        # The manifest verified: a listing compares it (the files are checked before a restore).
        "manifest_sha256": _sha256(path / MANIFEST),
    }
    write_json_atomic(path / VERIFICATION, verdict)
    if problems:
        logger.error("backup %s failed verification: %s", path.name, "; ".join(problems))
    return verdict


def _verify_ledger_snapshot(snapshot: Path) -> list[str]:
    """A logical backup restores from its ledger: it must be sound and hold every committed
    embedding (its counts were matched to the manifest's with the checksums)."""
    # immutable: read the file as it is, without creating WAL side files in the backup.
    conn = sqlite3.connect(f"file:{snapshot}?mode=ro&immutable=1", uri=True)
    try:
        verdict = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if verdict != ["ok"]:
            return [f"ledger.db: {'; '.join(verdict[:3])}"]
        problems = []
        (bad,) = conn.execute(
            "SELECT count(*) FROM chunks WHERE state='committed' AND (embedding IS NULL OR length(embedding) % 4)"
        ).fetchone()
        if bad:
            problems.append(f"ledger.db: {bad} committed chunks have no usable embedding")
        return problems
    except sqlite3.DatabaseError as exc:
        return [f"ledger.db: {exc}"]
    finally:
        conn.close()


def describe(path: Path) -> dict[str, Any]:
    """A backup's listing entry; ValueError when its manifest is not a backup's."""
    raw = (path / MANIFEST).read_bytes()  # read once: parsed, and its digest compared below
    manifest = json.loads(raw)
    if not isinstance(manifest, dict):
        raise ValueError(f"not an object but {type(manifest).__name__}")
    for key, kinds in _MANIFEST_FIELDS:
        value = manifest.get(key)
        finite = not isinstance(value, float) or math.isfinite(value)  # JSON's Infinity and NaN parse
        if not isinstance(value, kinds) or isinstance(value, bool) or not finite:
            raise ValueError(f"its {key!r} is {value!r}")
    if not isinstance(manifest.get("files"), dict) or "ledger.db" not in manifest["files"]:
        raise ValueError("its list of files does not hold ledger.db")
    try:
        verdict = json.loads((path / VERIFICATION).read_text())
    except (FileNotFoundError, ValueError):  # never verified (a killed verification), or not JSON
        verdict = None
    # Any other OSError (permissions, I/O) goes up: not readable now, so neither listed nor
    # pruned (taken as unverified, a verified backup was pruned once a newer one was verified).
    if not isinstance(verdict, dict) or not any(verdict.get("verified") is v for v in (True, False, None)):
        verdict = {"verified": None}  # not readable: not verified, so never restored
    problems = verdict.get("problems")
    problems = [str(p) for p in problems] if isinstance(problems, list) else [] if problems is None else [str(problems)]
    digest = verdict.get("manifest_sha256")  # absent in verdicts written before indexq recorded it
    if verdict.get("verified") is True and digest is not None and digest != hashlib.sha256(raw).hexdigest():
        verdict, problems = {"verified": False}, [f"{MANIFEST} changed since the backup was verified"]
    return {
        "name": manifest["name"],
        "kind": manifest.get("kind", "full"),
        "path": str(path),
        "time": manifest["time"],
        "watermark": manifest["watermark"],
        "collections": manifest["collections"],
        "pause_seconds": manifest["pause_seconds"],
        "verified": verdict.get("verified"),
        "problems": problems,
        "size_bytes": _size(path),
    }


# What describe() reads of a manifest, with the types it must have.
_MANIFEST_FIELDS: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("name", str), ("time", (int, float)), ("watermark", int), ("collections", dict), ("pause_seconds", (int, float)),
)  # fmt: skip


def _unreadable(path: Path, exc: Exception) -> dict[str, Any]:
    """A backup whose manifest cannot be read: listed as failed (so that retention removes
    it and nothing restores it), dated by its name, else by its folder."""
    try:
        when = float(calendar.timegm(time.strptime(path.name, NAME_FORMAT)))
    except ValueError:
        when = path.stat().st_mtime
    reason = first_line(exc)
    return {
        "name": path.name,
        "kind": "unknown",
        "path": str(path),
        "time": when,
        "watermark": None,
        "collections": {},
        "pause_seconds": None,
        "verified": False,
        "problems": [f"{MANIFEST} cannot be read: {reason}"],
        "size_bytes": _size(path),
    }


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_backups(config: Config) -> list[dict[str, Any]]:
    """Complete backups, oldest first. One whose manifest is not a backup's (broken JSON,
    fields of other types) is listed as failed; one whose manifest or verdict cannot be read now
    (permissions, a disk error) is neither listed nor pruned, with a warning. Partial ones
    (a crash mid-backup) are not listed, nor anything where the backups folder should be
    and is not a folder (said when backing up)."""
    if not config.backups_path.is_dir():
        return []
    out = []
    for path in sorted(config.backups_path.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or not (path / MANIFEST).exists():
            continue
        try:
            out.append(describe(path))
        except ValueError as exc:  # JSON that is not a backup's manifest
            with contextlib.suppress(OSError):  # gone meanwhile (a prune): not listed
                out.append(_unreadable(path, exc))
        except OSError as exc:  # not readable now (permissions, I/O): neither listed nor pruned
            what = Path(exc.filename).name if exc.filename else MANIFEST
            logger.warning("backup %s is not listed: %s cannot be read (%s)", path.name, what, first_line(exc))
    return sorted(out, key=lambda b: b["time"])


def newest_verified(config: Config, kind: str | None = None) -> dict[str, Any] | None:
    verified = [b for b in list_backups(config) if b["verified"] and kind in (None, b["kind"])]
    return verified[-1] if verified else None


def prune(config: Config, now: float | None = None) -> list[str]:
    """Delete failed backups, those older than the retention (never the newest verified), and leftovers."""
    with backups_lock(config):
        return _prune(config, time.time() if now is None else now)


def _discard(path: Path) -> None:
    """Delete a backup folder: renamed out of the listing first, then removed. A delete
    killed half-way (rmtree walks file by file) left a backup with files missing that was
    still listed, as verified; a ``.deleting-*`` folder is a leftover the next prune removes."""
    doomed = path.with_name(f".deleting-{path.name}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_leftovers(config: Config) -> list[str]:
    """Remove the ``.partial-*``, ``.verify-*`` and ``.deleting-*`` folders a killed backup,
    verification or prune left (call it under backups_lock); returns their names."""
    removed: list[str] = []
    if config.backups_path.is_dir():
        for path in config.backups_path.iterdir():
            if path.name.startswith((".partial-", ".verify-", ".deleting-")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


def _prune(config: Config, now: float) -> list[str]:
    if not config.backups_path.exists():
        return []
    removed = _remove_leftovers(config)
    keep = newest_verified(config)
    for backup in list_backups(config):
        if keep and backup["name"] == keep["name"]:
            continue
        # A backup that failed verification can never be restored: keep none of them. Nor
        # one never verified (its verification killed) once a newer one is: only verified
        # backups are restored, and nothing verifies an older one later.
        superseded = backup["verified"] is None and keep is not None and backup["time"] < keep["time"]
        if backup["verified"] is False or superseded or now - backup["time"] > config.retention:
            _discard(Path(backup["path"]))
            removed.append(backup["name"])
    if removed:
        logger.info("pruned backups: %s", ", ".join(removed))
    return removed
