"""The retrieval benchmark's figures on cases whose answers are known, a smoke run of the
harness with the real model, and the contextual header experiment (ops.tools.context)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ops.tools.context import HEADER_TOKENS, chunk_hash, embed_text, header, text_budget, to_embed
from ops.tools.retrieval import QUESTIONS, evaluate, rank
from pipeline.embedder import load_tokenizer
from pipeline.ids import content_hash
from tests.conftest import env_for

ROOT = Path(__file__).resolve().parent.parent


def test_figures_on_a_hand_made_ranking() -> None:
    rankings = [
        ["a.py", "b.py", "c.py"],  # answer first: hit, rank 1
        ["a.py", "a.py", "b.py", "c.py"],  # answer is the 4th chunk (no hit@3) but the 3rd file: 1/3
        ["b.py", "c.py"],  # never comes back: 0
    ]
    answers = [{"a.py"}, {"c.py"}, {"d.py"}]
    figures = evaluate(rankings, answers)
    assert figures["hits"] == 1
    assert figures["hit@3"] == 0.333
    assert figures["ranks"] == [1, 3, None]
    assert figures["mrr"] == round((1 + 1 / 3 + 0) / 3, 3)
    # Either of two answer files counts, the best placed one gives the rank.
    expected = {"questions": 1, "hit@3": 1.0, "mrr": 0.5, "hits": 1, "ranks": [2]}
    assert evaluate([["x", "y", "z"]], [{"z", "y"}]) == expected


def test_rank_orders_chunks_by_similarity() -> None:
    chunks = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    queries = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert rank(queries, chunks, ["a", "b", "c"]) == [["b", "c", "a"], ["a", "c", "b"]]


def test_the_built_in_questions_name_files_of_the_corpus() -> None:
    assert len(QUESTIONS) >= 50
    assert len({q for q, _ in QUESTIONS}) == len(QUESTIONS)
    stdlib = Path(json.__file__).resolve().parent.parent
    for question, answers in QUESTIONS:
        assert answers, question
        for answer in answers:
            assert (stdlib / answer).is_file(), (question, answer)


def test_header_names_the_path_heading_and_page() -> None:
    source = "/home/me/lib/python3.11/email/_header_value_parser.py"
    assert embed_text("def fold():", {"source": source}) == "email/_header_value_parser.py\n\ndef fold():"
    assert (
        header({"source": "/docs/guide.md", "heading": "Install > From source"})
        == ("docs/guide.md > Install > From source"[-HEADER_TOKENS:])
    )
    assert header({"source": "/r/report.pdf", "page": 3}) == "r/report.pdf > page 3"
    # A record without a source or heading is embedded as it is.
    assert embed_text("plain record", {"title": 7}) == "plain record"


def test_header_never_takes_more_than_its_reserve() -> None:
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    long = {"source": "/x/" + "ÿ!" * 200 + "/" + "é.," * 100 + ".py", "heading": "% ^ " * 80, "page": 12}
    (count,) = tokenizer.counts([header(long)])
    assert 0 < count <= HEADER_TOKENS
    assert len(header(long)) == HEADER_TOKENS


@pytest.mark.e2e
def test_smoke_run_with_the_real_model(tmp_path: Path) -> None:
    """Four unrelated files and a question for each: every answer comes back first."""
    corpus = tmp_path / "corpus"
    (corpus / "kitchen").mkdir(parents=True)
    (corpus / "garage").mkdir()
    files = {
        "kitchen/bread.md": "Mix flour, water, salt and the sourdough starter. Let the dough rise overnight, "
        "then bake the loaf in a hot oven until the crust is dark brown.\n",
        "kitchen/coffee.md": "Grind the beans coarsely, pour water just off the boil over them in the French "
        "press, wait four minutes and push the plunger down slowly.\n",
        "garage/tyre.md": "To repair a punctured bicycle inner tube, lever the tyre off the rim, find the hole, "
        "roughen the rubber, glue a patch over it and pump the tube up again.\n",
        "garage/oil.md": "Warm the car engine, drain the old motor oil from the sump plug, replace the oil filter "
        "and refill with fresh oil of the grade the manual gives.\n",
    }
    for name, text in files.items():
        (corpus / name).write_text(text)
    questions = tmp_path / "questions.jsonl"
    asked = [
        ("How do I fix a flat tire on my bike?", "garage/tyre.md"),
        ("How long should coffee steep in a cafetiere?", "kitchen/coffee.md"),
        ("How do I make a loaf of sourdough?", "kitchen/bread.md"),
    ]
    questions.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n" for q, a in asked))
    output = tmp_path / "retrieval.json"
    result = subprocess.run(
        [sys.executable, "-m", "ops.tools.retrieval", "--corpus", str(corpus), "--questions", str(questions),
         "--variants", "none,context", "--output", str(output)],
        env={**env_for(tmp_path / "unused"), "TMPDIR": str(tmp_path)},
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["questions"] == 3 and data["files"] == 4
    for name in ("none", "context"):
        figures = data["variants"][name]
        assert figures["chunks"] == 4
        assert figures["ranks"] == [1, 1, 1], name
        assert (figures["hit@3"], figures["mrr"]) == (1.0, 1.0)
        assert figures["truncated"] == 0
    # The header's reserve is taken from the chunk budget.
    assert data["variants"]["none"]["chunk_budget"] - data["variants"]["context"]["chunk_budget"] == HEADER_TOKENS
    assert data["misses"] == {"none": [], "context": []}
    assert "hit@3" in result.stdout and "context" in result.stdout
    # The scratch data homes are gone.
    assert not list(tmp_path.glob("indexq-retrieval-*"))


def test_the_hash_decides_what_the_writer_embeds() -> None:
    meta = {"source": "/src/pkg/mod.py", "heading": "Usage"}
    text = "def f(): pass\n"
    with_header = chunk_hash(text, meta, with_header=True)
    without = chunk_hash(text, meta, with_header=False)
    assert without == content_hash(text) != with_header
    assert to_embed(text, meta, with_header) == "pkg/mod.py > Usage\n\ndef f(): pass\n"
    assert to_embed(text, meta, without) == text
    # A heading that changes changes the hash: the chunk is embedded again, with its new header.
    assert chunk_hash(text, {**meta, "heading": "Install"}, with_header=True) != with_header
    # Metadata outside the header (line numbers) leaves it alone: no re-embedding.
    assert chunk_hash(text, {**meta, "start_line": 9}, with_header=True) == with_header
    # A chunk with nothing to say in a header hashes as its text either way.
    assert chunk_hash(text, {"title": "x"}, with_header=True) == without


def test_text_budget_leaves_room_for_the_header() -> None:
    assert text_budget(None, 254) == 254 - HEADER_TOKENS
    assert text_budget(100, 254) == 100
    assert text_budget(250, 254) == 254 - HEADER_TOKENS
