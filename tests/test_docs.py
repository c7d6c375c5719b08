"""The README is checked against the code so the two cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_and_option_is_documented(name: str) -> None:
    command = main.commands[name]
    assert f"indexq {name}" in README
    assert command.help and "Example" in command.help, f"`indexq {name} --help` needs an example"
    for param in command.params:
        if isinstance(param, click.Option):
            longest = max(param.opts, key=len)
            assert longest in README, f"{longest} of `indexq {name}` is not in the README"


def test_every_environment_variable_is_documented() -> None:
    names = set(re.findall(r"\"((?:INDEXQ|CHROMADB)_[A-Z_]+)\"", (ROOT / "pipeline/config.py").read_text()))
    # ...and wherever else a variable is read (INDEXQ_SECRET in pipeline/queue.py).
    for package in ("pipeline", "workers", "tasks"):
        for module in (ROOT / package).glob("*.py"):
            names |= set(re.findall(r"environ\.get\(\"(INDEXQ_[A-Z_]+)\"", module.read_text()))
    assert len(names) > 10
    assert sorted(n for n in names if n not in README) == []


def test_exit_codes_table_matches_the_errors() -> None:
    """Exit codes are defined once, on the classes of pipeline.errors; the README's table lists
    exactly those (and 0)."""
    from pipeline import errors

    tree = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.IndexqError)]
    assert len(tree) > 10
    table = {int(code) for code in re.findall(r"^\| (\d+) \|", README.split("### Exit codes")[1].split("\n#")[0], re.M)}
    assert table == {0} | {cls.exit_code for cls in tree}
