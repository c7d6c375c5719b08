from __future__ import annotations

import itertools
import sysconfig
from pathlib import Path

import pytest

from pipeline.chunking import chunk_text
from pipeline.embedder import Tokenizer, load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("all-MiniLM-L6-v2")


def _with_specials(tokenizer: Tokenizer, text: str) -> int:
    return tokenizer.counts([text])[0] + 2


@pytest.mark.parametrize("name", ["json/decoder.py", "textwrap.py", "argparse.py"])
def test_no_chunk_exceeds_the_model_and_no_line_is_lost(tokenizer: Tokenizer, name: str) -> None:
    text = (STDLIB / name).read_text()
    chunks = chunk_text(text, tokenizer)
    assert tokenizer.max_seq_length == 256
    assert all(_with_specials(tokenizer, c.text) <= 256 for c in chunks)
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start_line, chunk.end_line + 1))
    nonblank = {n for n, line in enumerate(text.splitlines(), start=1) if line.strip()}
    assert nonblank <= covered
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


def test_a_single_overlong_line_is_split_not_truncated(tokenizer: Tokenizer) -> None:
    line = " ".join(f"word{n}" for n in range(3000))
    chunks = chunk_text(line, tokenizer, overlap=0)
    assert len(chunks) > 5
    assert all(_with_specials(tokenizer, c.text) <= 256 for c in chunks)
    assert "".join(c.text for c in chunks) == line


def test_chunks_are_deterministic_and_overlap(tokenizer: Tokenizer) -> None:
    text = (STDLIB / "textwrap.py").read_text()
    first, second = chunk_text(text, tokenizer), chunk_text(text, tokenizer)
    assert first == second
    overlapping = [a for a, b in itertools.pairwise(first) if b.start_line <= a.end_line]
    assert len(overlapping) >= len(first) // 2


def test_smaller_budget_is_respected(tokenizer: Tokenizer) -> None:
    text = (STDLIB / "shlex.py").read_text()
    chunks = chunk_text(text, tokenizer, max_tokens=64, overlap=8)
    assert all(tokenizer.counts([c.text])[0] <= 64 for c in chunks)


def test_an_inserted_line_changes_only_nearby_chunks(tokenizer: Tokenizer) -> None:
    text = (STDLIB / "json/decoder.py").read_text()
    lines = text.splitlines(keepends=True)
    lines.insert(len(lines) // 2, "# a line inserted in the middle of the file\n")
    before = chunk_text(text, tokenizer)
    after = chunk_text("".join(lines), tokenizer)
    old = {c.hash for c in before}
    assert sum(c.hash not in old for c in after) <= 2
