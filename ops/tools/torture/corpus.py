"""The tree both runs index, and the edits the tortured run makes to it and undoes."""

from __future__ import annotations

import dataclasses
import random
import shutil
import sysconfig
from pathlib import Path

from ops.tools.torture import MAX_FILE_BYTES, MUTATED_FILES


def copy_stdlib(target: Path, files: int) -> None:
    """A fixed sample of the standard library's Python sources, with their folders."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}
    found = sorted(
        p for p in stdlib.rglob("*.py")
        if not skip & set(p.relative_to(stdlib).parts) and 0 < p.stat().st_size <= MAX_FILE_BYTES
    )  # fmt: skip
    random.Random(0).shuffle(found)
    for path in sorted(found[:files]):
        dest = target / path.relative_to(stdlib)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


@dataclasses.dataclass
class Submission:
    """One producer command: ``kind`` is tree, part, edit, truncate or restore."""

    kind: str
    paths: list[Path]

    def label(self, root: Path) -> str:
        return f"{self.kind} " + " ".join(str(p.relative_to(root)) or "." for p in self.paths)


class Corpus:
    """The tree both runs index, and the changes the tortured run makes to it and undoes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = sorted(p for p in root.rglob("*") if p.is_file())
        self.dirs = sorted({p.parent for p in self.files if p.parent != root})
        self.originals: dict[Path, bytes] = {}

    def text_lines(self, path: Path) -> list[str] | None:
        try:
            return path.read_bytes().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            return None

    def mutate(self, kind: str, rng: random.Random) -> Submission | None:
        """Edit one line of a few files, or cut them short, keeping the originals to restore.

        An edit keeps every line where it was (the metadata of a chunk whose text did not
        change stays right), but near the top it moves the boundaries of most chunks after it:
        work for the writer, as a cut is when it is undone.
        """
        choices = [p for p in self.files if p not in self.originals]
        rng.shuffle(choices)
        paths = []
        for path in choices[: 4 * MUTATED_FILES]:
            lines = self.text_lines(path)
            if not lines or len(lines) < 20:
                continue
            self.originals[path] = path.read_bytes()
            if kind == "edit":
                lines[rng.randrange(len(lines) // 3)] = f"# torture edit {rng.randrange(10**9)}"
            else:
                lines = [*lines[: rng.randrange(len(lines) // 10, len(lines) // 2)], ""]
            path.write_bytes("\n".join(lines).encode("utf-8"))
            paths.append(path)
            if len(paths) >= rng.randint(1, MUTATED_FILES):
                break
        return Submission(kind, sorted(paths)) if paths else None

    def restore(self, paths: list[Path]) -> None:
        for path in paths:
            if path in self.originals:
                path.write_bytes(self.originals.pop(path))

    def part(self, rng: random.Random) -> Submission:
        if self.dirs and rng.random() < 0.5:
            return Submission("part", [rng.choice(self.dirs)])
        return Submission("part", sorted(rng.sample(self.files, min(len(self.files), rng.randint(1, 3)))))
