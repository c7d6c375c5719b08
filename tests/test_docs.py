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
    names |= set(re.findall(r"\"(INDEXQ_[A-Z_]+)\"", (ROOT / "workers/queue.py").read_text()))
    assert len(names) > 10
    assert sorted(n for n in names if n not in README) == []


def test_exit_codes_table_matches_the_errors() -> None:
    from pipeline import errors

    for cls in (
        errors.BadInputError,
        errors.WriterLockedError,
        errors.BusyError,
        errors.JobFailedError,
        errors.UnreachableError,
    ):
        assert re.search(rf"^\| {cls.exit_code} \|", README, re.M), cls
