"""docs/json.md, read as the contract of every command's ``--json`` output.

The page has one section per command (a heading that starts with ``indexq NAME``) and
in it a table whose rows name a field (``a.b``: field ``b`` of object ``a``; ``a[].b``:
of each element of array ``a``; ``<name>``: a key that is data), its JSON type and what
it means. A field whose type says ``free-form`` is an object whose keys are not listed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "json.md"
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
          "object": (dict,), "array": (list,)}  # fmt: skip


def contract() -> dict[str, dict[str, str]]:
    """command -> {field: type}, in the order of the page."""
    out: dict[str, dict[str, str]] = {}
    command = None
    for line in DOC.read_text().splitlines():
        if heading := re.match(r"^##+ `indexq (\w+)", line):
            command = heading.group(1)
            out.setdefault(command, {})
        elif command and (row := re.match(r"^\| `([^`]+)` \| ([^|]+) \|", line)):
            out[command][row.group(1)] = row.group(2).strip()
    return out


def _type_ok(value: Any, documented: str) -> bool:
    allowed = tuple(t for word, types in _TYPES.items() if re.search(rf"\b{word}\b", documented) for t in types)
    if isinstance(value, bool):  # a bool is an int to Python, never to JSON
        return bool in allowed
    return isinstance(value, allowed)


def fields(command: str, output: Any) -> set[str]:
    """Every field of ``output`` (one command's parsed ``--json``) as the page names it.

    Raises AssertionError for a field the page does not list or whose type differs.
    """
    documented = contract()[command]
    seen: set[str] = set()

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, f"{prefix}[]")
            return
        if not isinstance(value, dict):
            return
        base = f"{prefix}." if prefix else ""
        keyed = [f for f in documented if f.startswith(base + "<") and "." not in f[len(base) :].split(">", 1)[1]]
        for key, item in value.items():
            path = keyed[0] if keyed else base + key
            assert path in documented, f"`indexq {command} --json` prints {path!r}, which docs/json.md does not list"
            assert _type_ok(item, documented[path]), (
                f"`indexq {command} --json`: {path} is {item!r}, docs/json.md says {documented[path]}"
            )
            seen.add(path)
            if "free-form" not in documented[path]:
                walk(item, path)

    walk(output, "")
    return seen
