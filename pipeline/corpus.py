"""What producers read: files under paths (filtered by globs) and JSON records.

Files stream one at a time, so memory stays flat however large the corpus. PDF, DOCX,
HTML and Markdown files are parsed (``pipeline.formats``). A file that cannot be
indexed (unreadable, binary, not UTF-8, too large, empty, not a regular file, a
symlink leading outside the paths given, a document its parser cannot read) is
skipped and counted with its reason, as is a folder that cannot be read or a symlink
loop; it never fails the job. The data home is never walked. A file is known by its
resolved real path, so every spelling of it (``..``, a symlinked parent, a symlink
inside the tree) is one source.
Records are validated in full before anything is written: a bad record fails the
submission with its line number.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import BadInputError
from pipeline.formats import BINARY_FORMATS, Document, Unparsable, format_of, parse
from pipeline.formats import GONE_REASONS as FORMAT_GONE_REASONS
from pipeline.guards import MAX_METADATA_KEYS, clean_metadata, clean_text, unicode_problem

# Folders no one means to index; --include cannot bring them back, --exclude adds more.
DEFAULT_EXCLUDES = (".git", ".hg", ".svn", "__pycache__", ".venv", "node_modules")
# One file (or one JSONL line) is held in memory while it is chunked: bound it. With
# tokens counted in segments (pipeline.producer) a producer's peak RSS stays near
# 400 MB above the model's tokenizer for a file of this size (see the benchmark).
MAX_FILE_BYTES = 16 * 2**20
MAX_LINE_BYTES = MAX_FILE_BYTES
# Text read ahead and tokenized together (a batch runs on every core); bounds memory.
GROUP_BYTES = 2 * 2**20
# Bytes asked of the kernel in one read of a file.
_PIECE = 256 * 1024
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


# Skip reasons that mean the file's content can no longer be indexed: chunks it had
# are stale. Other reasons (unreadable: a permission or I/O error) may pass; its
# chunks stay until it can be read again or is gone (--prune).
# A document that can no longer be parsed (encrypted, broken, no text) is one of them.
GONE_REASONS = (
    "empty", "binary", "not UTF-8", "larger than", "not a regular file", "symlink to", "broken symlink",
    "symlink loop", *FORMAT_GONE_REASONS,
)  # fmt: skip


def content_gone(reason: str) -> bool:
    return reason.startswith(GONE_REASONS)


def covered_by(unreadable: Iterable[str]) -> Callable[[str], bool]:
    """Whether a source is one of ``unreadable`` (files or folders that could not be read)
    or lies under one: what lies there may still exist, so --prune keeps its chunks."""
    held = set(unreadable)

    def covered(source: str) -> bool:
        path = Path(source)
        return bool(held) and any(str(p) in held for p in (path, *path.parents))

    return covered


def shown(path: str | os.PathLike[str]) -> str:
    """A path as text every log, JSON and SQLite takes: a byte of a name that is not
    UTF-8 (which Python reads as a lone surrogate) spelled ``\\xe9``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _real(path: Path) -> Path | None:
    """The real path of ``path``, or None for a symlink loop. Raises OSError where a
    folder on the way cannot be searched (read but no execute permission)."""
    real = Path(os.path.realpath(path))
    try:
        real.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # a broken link: said by the caller
            raise
    return real


def _real_in(path: Path, in_real: bool) -> Path | None:
    """``_real(path)``, knowing whether ``path``'s folder is spelled by its real path: then a
    path that is no symlink is its own real path (one lstat instead of one per level)."""
    if in_real and not path.is_symlink():
        return path
    return _real(path)


def check_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every path must exist before anything is written; each is resolved to its real path."""
    given = [Path(p).expanduser() for p in paths]
    if not given:
        raise BadInputError("no path given", hint="name files or directories to index")
    missing: list[str] = []
    resolved: list[Path] = []
    for path in given:
        try:
            real = _real(path)
        except OSError as exc:
            raise BadInputError(f"cannot read {shown(path.absolute())}: {exc.strerror or exc}") from None
        if real is None:
            raise BadInputError(f"symlink loop: {shown(path.absolute())}")
        if not real.exists():
            try:
                kind = os.stat(path).st_mode
            except OSError:
                missing.append(shown(path.absolute()))
                continue
            # /dev/stdin on a pipe: it opens, but its real path (pipe:[N]) names no file.
            what = "a pipe" if stat.S_ISFIFO(kind) else "a socket" if stat.S_ISSOCK(kind) else "no file or folder"
            raise BadInputError(
                f"{shown(path.absolute())} is {what}, not a file or folder to index",
                hint="give files or folders; --jsonl takes a file of JSON lines",
            )
        elif real not in resolved:
            resolved.append(real)
    if missing:
        raise BadInputError(f"no such file or directory: {', '.join(missing)}")
    return resolved


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


class Private:
    """Folders a walk never enters (the data home, a Chroma directory kept elsewhere), known
    by their real paths and by the identity (device, inode) of every folder and file in
    them: a bind mount of one of their folders, or a hard link to one of their files, is
    the same folder or file under another path. ``folders`` maps each to what it is."""

    def __init__(self, folders: dict[Path, str]) -> None:
        self.folders = {Path(os.path.realpath(p)): what for p, what in folders.items()}
        # (device, inode) -> the private path that had it, and what it is part of
        self._ids: dict[tuple[int, int], tuple[str, str]] = {}
        for folder, what in self.folders.items():
            pending = [str(folder)]
            while pending:  # not os.walk: no recursion, and the folders' own identities too
                top = pending.pop()
                try:
                    st = os.stat(top, follow_symlinks=False)
                    self._ids.setdefault((st.st_dev, st.st_ino), (top, what))
                    with os.scandir(top) as entries:
                        for entry in entries:
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(entry.path)
                            elif entry.is_file(follow_symlinks=False):
                                est = entry.stat(follow_symlinks=False)
                                self._ids.setdefault((est.st_dev, est.st_ino), (entry.path, what))
                except OSError:  # not there (yet), or unreadable to this user: its path still counts
                    continue

    def owner(self, real: Path) -> str | None:
        """What private folder ``real`` (a real path) is, lies in, or is a folder or file of
        reached another way; None if none. Raises OSError as ``os.stat`` does, but for a
        path that does not exist."""
        for folder, what in self.folders.items():
            if real == folder or real.is_relative_to(folder):
                return what
        try:
            st = real.stat()
        except (FileNotFoundError, NotADirectoryError):  # a broken link: said by the caller
            return None
        known = self._ids.get((st.st_dev, st.st_ino))
        if known is None:
            return None
        # Still that file or folder of the home? Files the home deletes meanwhile (intake
        # parts, a pruned backup) give their inode numbers to new files elsewhere.
        try:
            again = os.stat(known[0], follow_symlinks=False)
        except OSError:
            return None
        return known[1] if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino) else None


def _tree(
    root: Path, onerror: Callable[[OSError], Any], followlinks: bool
) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` top-down, in its order, without its recursion: Python 3.11's
    recurses once per level, and a tree a thousand folders deep raised RecursionError."""
    pending = [str(root)]
    while pending:
        top = pending.pop()
        dirs: list[str] = []
        files: list[str] = []
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else files).append(entry.name)
        except OSError as exc:
            onerror(exc)
            continue
        yield top, dirs, files  # the caller may prune dirs, as with os.walk
        for name in reversed(dirs):
            path = os.path.join(top, name)
            if followlinks or not os.path.islink(path):
                pending.append(path)


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk(
    paths: list[Path], include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), follow_symlinks: bool = False,
    private: Private | Iterable[Path] = (),
) -> Iterator[Path | Skipped]:  # fmt: skip
    """Files under ``paths`` (resolved real paths) in a stable order, or why one is skipped.

    Globs match a name or a path relative to its root, as spelled in the tree. A
    symlink is followed when it leads inside the paths given: a file is then indexed
    under its real path, once, and a linked folder's files are found under their own
    path. With ``follow_symlinks`` a symlink may lead anywhere (a folder is walked
    once however many links lead to it). Nothing in the ``private`` folders (the data
    home: its queue key, ledger and spool) is yielded, not even as skipped, however it
    is reached (a bind mount or a hard link included). Everything else is skipped with its
    reason, a folder that cannot be read included (``unreadable: ...``: what was indexed
    under it keeps its chunks), and so is a file that vanished between its folder's
    listing and its turn (its chunks stay, as only ``--prune`` removes a file's). The
    files are those each path's globs take, whatever the order of overlapping paths.
    """
    excluded = (*DEFAULT_EXCLUDES, *exclude)
    hidden = private if isinstance(private, Private) else Private({p: "private" for p in private})
    seen: set[Path] = set()  # real paths already yielded: one file, one source
    refused: list[OSError] = []  # folders the walk could not list, reported in turn

    def one(path: Path, rel: str, in_real: bool = False) -> Path | Skipped | None:
        """``in_real``: ``path``'s folder is spelled by its real path."""
        if _matches(rel, excluded) or (include and not _matches(rel, include)):
            return None
        try:
            real = _real_in(path, in_real)
            if real is None:
                return Skipped(shown(path), "symlink loop")
            if hidden.owner(real) is not None:
                return None
            if path.is_symlink():
                if not real.exists():
                    return Skipped(shown(path), "broken symlink")
                if not follow_symlinks and not _inside(real, paths):
                    return Skipped(
                        shown(path), f"symlink to {shown(real)}, outside the paths given (--follow-symlinks)"
                    )
            if unicode_problem(str(real)) is not None:  # no ledger, id or Chroma takes such a source
                return Skipped(shown(real), "file name is not UTF-8")
            if real in seen:
                return None
            seen.add(real)
            try:
                mode = real.stat().st_mode
            except FileNotFoundError:  # removed or renamed since its folder was listed: not "gone" yet
                return Skipped(str(real), "unreadable: it was removed or renamed while the walk ran")
            if not stat.S_ISREG(mode):
                return Skipped(str(real), "not a regular file")
        except OSError as exc:  # a folder on the way that can be read but not searched
            return Skipped(shown(os.path.realpath(path)), f"unreadable: {exc.strerror or exc}")
        return real

    def folder(sub: Path, in_real: bool = False) -> Skipped | bool:
        """Whether to walk into ``sub``, or why it is skipped."""
        try:
            real = _real_in(sub, in_real)
        except OSError as exc:  # named as the ledger knows what lies under it: by its real path
            return Skipped(shown(os.path.realpath(sub)), f"unreadable: {exc.strerror or exc}")
        if real is None:
            return Skipped(shown(sub), "symlink loop")
        try:
            if hidden.owner(real) is not None:
                return False
        except OSError as exc:
            return Skipped(shown(real), f"unreadable: {exc.strerror or exc}")
        if sub.is_symlink() and not follow_symlinks:
            if not _inside(real, paths):
                return Skipped(shown(sub), f"symlink to {shown(real)}, outside the paths given (--follow-symlinks)")
            return False  # a link to a folder inside the paths: its files are found under their own path
        if unicode_problem(str(real)) is not None:
            return Skipped(shown(real), "folder name is not UTF-8")
        return True

    def unlisted() -> Iterator[Skipped]:
        for exc in refused:
            yield Skipped(shown(os.path.realpath(exc.filename)), f"unreadable: {exc.strerror or exc}")
        refused.clear()

    for root in paths:  # a root in a private folder: folder() and one() pass it over
        if not root.is_dir():
            found = one(root, root.name)
            if found is not None:
                yield found
            continue
        if (take := folder(root)) is not True:
            if isinstance(take, Skipped):
                yield take
            continue
        walked: set[Path] = set()  # real folders this root's walk entered: no loops through links
        for top, dirs, files in _tree(root, refused.append, follow_symlinks):
            yield from unlisted()
            base = Path(top)
            # Without links followed the walk enters no symlink: from a real root, every
            # folder it enters is spelled by its real path (a realpath per folder and file
            # costs a lookup per level: minutes for a tree a thousand folders deep).
            real_base = base.resolve() if follow_symlinks else base
            if real_base in walked:
                dirs[:] = []
                continue
            walked.add(real_base)
            kept = []
            for d in sorted(dirs):
                sub = base / d
                if _matches(sub.relative_to(root).as_posix(), excluded):
                    continue
                take = folder(sub, not follow_symlinks)
                if isinstance(take, Skipped):
                    yield take
                elif take:
                    kept.append(d)
            dirs[:] = kept
            for name in sorted(files):
                path = base / name
                found = one(path, path.relative_to(root).as_posix(), not follow_symlinks)
                if found is not None:
                    yield found
        yield from unlisted()


def selected(source: str, roots: Iterable[Path], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> bool:
    """Whether ``walk`` would take a file at ``source`` (a real path) if it existed there."""
    path = Path(source)
    excluded = (*DEFAULT_EXCLUDES, *exclude)
    include = tuple(include)

    def takes(root: Path) -> bool:
        if path == root:
            return not _matches(root.name, excluded) and (not include or _matches(root.name, include))
        parts = path.relative_to(root).parts
        folders = ("/".join(parts[:n]) for n in range(1, len(parts)))
        if any(_matches(folder, excluded) for folder in folders):
            return False
        rel = "/".join(parts)
        return not _matches(rel, excluded) and (not include or _matches(rel, include))

    # Overlapping roots: the file is the walk's if any of them takes it (as the walk does).
    return any(takes(root) for root in roots if path == root or path.is_relative_to(root))


def gone(
    candidates: Iterable[str], seen: Callable[[str], bool], roots: Iterable[Path],
    include: Iterable[str] = (), exclude: Iterable[str] = (),
) -> list[str]:  # fmt: skip
    """Sources indexed from under ``roots`` that a walk with the same filters no longer
    found (``seen`` says which it found, skipped ones included): ``--prune`` removes them.

    A file that still exists but is now excluded by a glob is kept.
    """
    roots = list(roots)
    return [s for s in candidates if not seen(s) and selected(s, roots, include, exclude)]


def _read_bytes(path: Path) -> bytes | Skipped:
    """The file's bytes (at most MAX_FILE_BYTES), or why it is skipped.

    ``path`` is the real path the walk checked. The file is opened without following a
    symlink, and (where /proc tells) must still be at that path once open: a file swapped
    for a symlink, or a folder on the way for one, between the walk and the read would
    otherwise let a file from outside the paths be read under an inside name. Such a file
    is skipped as unreadable: its chunks of before stay until the next run reads it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Skipped(str(path), "unreadable: it became a symlink after the walk found it")
        return Skipped(str(path), f"unreadable: {exc.strerror or exc}")
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return Skipped(str(path), "not a regular file")
            opened = _opened_as(fd)
            if opened is not None and opened != str(path):
                return Skipped(str(path), f"unreadable: it was moved or replaced after the walk found it ({opened})")
            os.set_blocking(fd, True)
            data = _read_most(handle, MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            return Skipped(str(path), f"larger than {MAX_FILE_BYTES // 2**20} MB")
    except OSError as exc:
        return Skipped(str(path), f"unreadable: {exc.strerror or exc}")
    return data


def _read_most(handle: IO[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes, read a piece at a time: one byte past the size limit rather
    than trusting st_size (a file may grow), and no read larger than a piece (a read of
    16 MB at once is refused with ENOMEM by files such as those under /proc/sys)."""
    pieces: list[bytes] = []
    left = limit
    while left > 0:
        piece = handle.read(min(left, _PIECE))
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def _opened_as(fd: int) -> str | None:
    """Where the file open as ``fd`` lies (Linux's /proc), or None where that cannot be told."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _decode(path: Path, data: bytes) -> str | Skipped:
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


def read_text(path: Path) -> str | Skipped:
    """The file's text, or why it is skipped: a tool's read, of any spelling of the path
    (resolved first). The producer reads the walk's real paths with ``read_document``."""
    path = Path(os.path.realpath(path))
    data = _read_bytes(path)
    return data if isinstance(data, Skipped) else _decode(path, data)


def read_document(path: Path) -> Document | Skipped:
    """The file as a document to chunk (PDF, DOCX, HTML and Markdown parsed; anything else
    UTF-8 text), or why it is skipped."""
    data = _read_bytes(path)
    if isinstance(data, Skipped):
        return data
    kind = format_of(path.suffix)
    source: bytes | str = data
    if kind is None or kind == "markdown":
        text = _decode(path, data)
        if isinstance(text, Skipped) or kind is None:
            return text if isinstance(text, Skipped) else Document(text)
        source = text
    elif kind not in BINARY_FORMATS and b"\x00" in data[:_SNIFF]:
        return Skipped(str(path), "binary")
    try:  # every parser turns what a file makes it raise into Unparsable: never fatal to the job
        return parse(kind, source)
    except Unparsable as exc:
        return Skipped(str(path), exc.reason)


def read_groups(
    files: Iterable[Path | Skipped], max_bytes: int = GROUP_BYTES
) -> Iterator[list[tuple[Path, Document | Skipped]]]:
    """Files read a few at a time, so that they can be tokenized in one parallel batch."""
    group: list[tuple[Path, Document | Skipped]] = []
    size = 0
    for path in files:
        if isinstance(path, Skipped):
            group.append((Path(path.source), path))
            continue
        doc = read_document(path)
        group.append((path, doc))
        size += len(doc.text) if isinstance(doc, Document) else 0
        if size >= max_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def _framework_fields(raw: Any, where: str) -> dict[str, Any] | None:
    """A LangChain ``Document`` (page_content, metadata, id) or a LlamaIndex ``Document`` /
    ``TextNode`` (text, metadata, id_, ref_doc_id) as a record's fields; None for anything
    else. Duck-typed: neither package is needed."""
    name = type(raw).__name__
    try:
        if hasattr(raw, "page_content"):
            metadata = getattr(raw, "metadata", {})
            fields = {"id": getattr(raw, "id", None), "text": raw.page_content, "metadata": metadata}
        elif hasattr(raw, "id_") or hasattr(raw, "node_id"):
            text = getattr(raw, "text", None)
            if not isinstance(text, str) and callable(getattr(raw, "get_content", None)):
                text = raw.get_content()
            id_ = getattr(raw, "id_", None) or getattr(raw, "node_id", None)
            fields = {"id": id_, "text": text, "metadata": getattr(raw, "metadata", {})}
            # A node split from a document belongs to it: LlamaIndex deletes by ref_doc_id.
            ref = getattr(raw, "ref_doc_id", None)
            if isinstance(fields["metadata"], dict) and ref:
                fields["metadata"] = {"document_id": ref, **fields["metadata"]}
        else:
            return None
    except Exception as exc:  # a property of a foreign object that raises
        raise ValueError(f"{where}: cannot read the {name}: {exc}") from None
    if fields["id"] == "":
        fields["id"] = None  # LangChain's "no id"
    return fields


def _record(raw: Any, position: int, where: str) -> Record:
    if not isinstance(raw, dict):
        fields = _framework_fields(raw, where)
        if fields is None:
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        raw = fields
    unknown = set(raw) - {"id", "text", "metadata"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    id_ = raw.get("id")
    if isinstance(id_, int) and not isinstance(id_, bool):
        try:
            id_ = str(id_)
        except ValueError:  # past Python's limit on an integer's digits
            limit = sys.get_int_max_str_digits()
            raise ValueError(f'{where}: "id" is an integer of more than {limit} digits') from None
    if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, (str, int)) or str(id_) == ""):
        raise ValueError(f'{where}: "id" must be a non-empty string or an integer')
    text = raw.get("text")
    if not isinstance(text, str):
        raise ValueError(f'{where}: "text" must be a string')
    for name, value in (("id", id_), ("text", text)):
        _check_unicode(value, f'{where}: "{name}"')
    _check_nul(id_, f'{where}: "id"')
    metadata = raw.get("metadata")
    metadata = {} if metadata is None else metadata  # null: none
    if not isinstance(metadata, dict):
        raise ValueError(f'{where}: "metadata" must be an object')
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"{where}: metadata has {len(metadata)} keys, more than the {MAX_METADATA_KEYS} allowed")
    _check_nul(metadata.get("document_id"), f"{where}: metadata 'document_id'")  # before clean_metadata strips it
    try:
        metadata = clean_metadata(metadata)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    # Frameworks look a document up by this string (LlamaIndex: delete(ref_doc_id)).
    if "document_id" in metadata and (not isinstance(metadata["document_id"], str) or not metadata["document_id"]):
        raise ValueError(f'{where}: metadata "document_id" must be a non-empty string')
    for key, value in metadata.items():
        _check_unicode(key, f"{where}: metadata key")
        _check_unicode(value, f"{where}: metadata {key!r}")
    return Record(None if id_ is None else str(id_), clean_text(text), metadata, position)


def _check_unicode(value: Any, what: str) -> None:
    """JSON may spell a lone UTF-16 surrogate (\\ud800); no tokenizer, SQLite or Chroma takes one."""
    if isinstance(value, str) and (problem := unicode_problem(value)) is not None:
        raise ValueError(f"{what} {problem}")


def _check_nul(value: Any, what: str) -> None:
    """An id is matched as written: stripping a NUL (as Chroma's metadata needs) would make
    the ledger's id and the one in Chroma differ, so an id holding one is refused."""
    if isinstance(value, str) and (at := value.find("\x00")) >= 0:
        raise ValueError(f"{what} holds a NUL character (at character {at})")


def check_record(raw: Any, position: int, where: str) -> Record:
    """A valid record from a parsed value (or the ValueError found reading it); raises ValueError."""
    if isinstance(raw, ValueError):
        raise raw
    return _record(raw, position, where)


class Problems:
    """Every problem of a submission, counted; the first few kept for the one-line error."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown: list[str] = []
        self.count = 0

    def add(self, problem: str) -> None:
        self.count += 1
        if len(self.shown) < _MAX_PROBLEMS:
            self.shown.append(problem)

    def raise_any(self) -> None:
        if not self.count:
            return
        more = f" (and {self.count - _MAX_PROBLEMS} more)" if self.count > _MAX_PROBLEMS else ""
        raise BadInputError(
            f"{self.label}: {'; '.join(self.shown)}{more}",
            hint="nothing was enqueued; fix the records and submit again",
        )


def _open_regular(path: Path) -> IO[bytes] | None:
    """``path`` opened to read, or None where it is not a regular file. Opened without
    blocking: a FIFO with no writer would otherwise hang the open itself, before fstat."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def jsonl_values(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(line number, parsed value or the ValueError, where) for each non-blank line.

    Lines are read with a bound (``MAX_LINE_BYTES``): a file without line ends (or
    /dev/zero) cannot make the producer hold more than one line in memory.
    """
    try:
        handle = _open_regular(path)
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if handle is None:
        raise BadInputError(f"{path} is not a regular file", hint="--jsonl takes a file of JSON lines")
    with handle:
        number = 0
        while True:
            try:
                line = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
            if not line:
                return
            number += 1
            where = f"line {number}"
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                # Skip the rest of the line without holding it.
                while line and not line.endswith(b"\n"):
                    line = handle.readline(2**20)
                yield number, ValueError(f"{where}: longer than {MAX_LINE_BYTES // 2**20} MB"), where
                continue
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as text files may begin
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, ValueError(f"{where}: not UTF-8 (byte {exc.start})"), where
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), where
            except json.JSONDecodeError as exc:
                yield number, ValueError(f"{where}: not valid JSON ({exc.msg})"), where
            except ValueError:  # Python's limit on integer digits (sys.get_int_max_str_digits())
                yield number, ValueError(f"{where}: a number of more than {sys.get_int_max_str_digits()} digits"), where
            except RecursionError:
                yield number, ValueError(f"{where}: nested too deeply"), where
