"""What producers read: files under paths (filtered by globs) and JSON records.

Files stream one at a time, so memory stays flat however large the corpus. A file
that cannot be indexed (unreadable, binary, not UTF-8, too large, empty) is skipped
and counted with its reason; it never fails the job. Records are validated in full
before anything is written: a bad record fails the submission with its line number.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import BadInputError
from pipeline.guards import clean_metadata, clean_text

# Folders no one means to index; --include cannot bring them back, --exclude adds more.
DEFAULT_EXCLUDES = (".git", ".hg", ".svn", "__pycache__", ".venv", "node_modules")
# One file is held in memory while it is chunked: bound it.
MAX_FILE_BYTES = 64 * 2**20
# Text read ahead and tokenized together (a batch runs on every core); bounds memory.
GROUP_BYTES = 2 * 2**20
# Bytes looked at to call a file binary (a NUL byte among them), as git does.
_SNIFF = 8192
# Problems listed in one error line before "and N more".
_MAX_PROBLEMS = 5


@dataclasses.dataclass(frozen=True)
class Skipped:
    source: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Record:
    id: str | None
    text: str
    metadata: dict[str, Any]
    position: int  # line number in a JSONL file, index in an iterable


def check_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every path must exist before anything is written."""
    resolved = [Path(p).expanduser().absolute() for p in paths]
    if not resolved:
        raise BadInputError("no path given", hint="name files or directories to index")
    missing = [str(p) for p in resolved if not p.exists()]
    if missing:
        raise BadInputError(f"no such file or directory: {', '.join(missing)}")
    return resolved


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(paths: list[Path], include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Iterator[Path]:
    """Files under ``paths`` in a stable order; globs match a name or a relative path."""
    excluded = (*DEFAULT_EXCLUDES, *exclude)
    for root in paths:
        if root.is_file():
            if not _matches(root.name, exclude) and (not include or _matches(root.name, include)):
                yield root
            continue
        for folder, dirs, files in os.walk(root):
            base = Path(folder)
            dirs[:] = sorted(d for d in dirs if not _matches((base / d).relative_to(root).as_posix(), excluded))
            for name in sorted(files):
                path = base / name
                rel = path.relative_to(root).as_posix()
                if _matches(rel, excluded) or (include and not _matches(rel, include)):
                    continue
                if path.is_file():
                    yield path


def read_text(path: Path) -> str | Skipped:
    """The file's text, or why it is skipped."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return Skipped(str(path), f"larger than {MAX_FILE_BYTES // 2**20} MB")
        data = path.read_bytes()
    except OSError as exc:
        return Skipped(str(path), f"unreadable: {exc.strerror or exc}")
    if b"\x00" in data[:_SNIFF]:
        return Skipped(str(path), "binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Skipped(str(path), f"not UTF-8 (byte {exc.start})")
    text = clean_text(text.removeprefix("\ufeff"))
    if not text.strip():
        return Skipped(str(path), "empty")
    return text


def read_groups(files: Iterable[Path], max_bytes: int = GROUP_BYTES) -> Iterator[list[tuple[Path, str | Skipped]]]:
    """Files read a few at a time, so that they can be tokenized in one parallel batch."""
    group: list[tuple[Path, str | Skipped]] = []
    size = 0
    for path in files:
        text = read_text(path)
        group.append((path, text))
        size += len(text) if isinstance(text, str) else 0
        if size >= max_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def _record(raw: Any, position: int, where: str) -> Record:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - {"id", "text", "metadata"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    id_ = raw.get("id")
    if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, (str, int)) or str(id_) == ""):
        raise ValueError(f'{where}: "id" must be a non-empty string or an integer')
    text = raw.get("text")
    if not isinstance(text, str):
        raise ValueError(f'{where}: "text" must be a string')
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f'{where}: "metadata" must be an object')
    try:
        metadata = clean_metadata(metadata)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return Record(None if id_ is None else str(id_), clean_text(text), metadata, position)


def validate_records(raws: Iterable[tuple[int, Any, str]], spool: IO[str], label: str) -> int:
    """Check every record (position, value, where) and spool the good ones; raises with all problems."""
    problems: list[str] = []
    seen: set[str] = set()
    count = 0
    for position, raw, where in raws:
        try:
            if isinstance(raw, ValueError):
                raise raw
            record = _record(raw, position, where)
            if record.id is not None:
                if record.id in seen:
                    raise ValueError(f"{where}: duplicate id {record.id!r}")
                seen.add(record.id)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        spool.write(json.dumps(dataclasses.asdict(record)) + "\n")
        count += 1
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS])
        more = f" (and {len(problems) - _MAX_PROBLEMS} more)" if len(problems) > _MAX_PROBLEMS else ""
        raise BadInputError(f"{label}: {shown}{more}", hint="nothing was enqueued; fix the records and submit again")
    return count


def jsonl_values(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed value or the ValueError, where) for each non-blank line."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"line {number}"
                try:
                    yield number, json.loads(line), where
                except json.JSONDecodeError as exc:
                    yield number, ValueError(f"{where}: not valid JSON ({exc.msg})"), where
        except UnicodeDecodeError:
            raise BadInputError(f"{path}: line {number + 1}: not UTF-8") from None


def spooled(spool: IO[str]) -> Iterator[Record]:
    spool.seek(0)
    for line in spool:
        yield Record(**json.loads(line))
