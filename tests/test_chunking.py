from __future__ import annotations

import itertools
import random
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


def test_which_tokenizers_count_a_chunk_as_its_lines() -> None:
    from pipeline.embedder import _line_exact

    bert = {"normalizer": {"type": "BertNormalizer"}, "pre_tokenizer": {"type": "BertPreTokenizer"}}
    assert load_tokenizer("all-MiniLM-L6-v2").line_exact and _line_exact(bert)
    split_further = {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "WhitespaceSplit"}]}
    assert _line_exact({"normalizer": None, "pre_tokenizer": split_further})
    # SentencePiece's Metaspace keeps a line end inside a piece; a Precompiled normalizer may
    # change white space; a byte-level BPE without a splitter at white space.
    assert not _line_exact({"normalizer": None, "pre_tokenizer": {"type": "Metaspace"}})
    assert not _line_exact({"normalizer": {"type": "Precompiled"}, "pre_tokenizer": {"type": "WhitespaceSplit"}})
    assert not _line_exact({"normalizer": None, "pre_tokenizer": {"type": "ByteLevel"}})


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r", "\u2028", "\x0c", "\x85", "\x1c"])
def test_chunks_fit_counted_alone_whatever_ends_their_lines(tokenizer: Tokenizer, line_end: str) -> None:
    """Chunks are not counted again for this tokenizer, except where a line ends in a
    control character that its normalizer removes: the words on both sides then join into
    one token, and without the count a chunk came out one token over (measured)."""
    rng = random.Random(1)
    words = ["alpha", "unbelievable", "tokenization", "x", "zz", "über", "東京", "e\u0301", "🚀", "\t"]
    text = "".join(rng.choice(words) + (line_end if rng.random() < 0.5 else " ") for _ in range(3000))
    for budget in (32, 64):
        chunks = chunk_text(text, tokenizer, max_tokens=budget, overlap=4)
        assert len(chunks) > 40
        assert max(tokenizer.counts([c.text])[0] for c in chunks) <= budget
