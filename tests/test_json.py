"""docs/json.md against what the commands really print with --json: every field printed is
listed (with its type), and every field listed is printed by one of the runs here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from tests.conftest import BIN, Proc, copy_corpus, run_cli, start_worker, wait_for
from tests.jsondoc import DOC, contract, fields

pytestmark = pytest.mark.e2e

MODEL = {"INDEXQ_MODEL": "hash:384"}
# Printed only on the scale-out engines; tests/test_scaleout.py checks them against the page:
# `status` on a producer's machine (a Redis queue, no ledger), a recovery on a Chroma server.
SCALE_OUT_ONLY = {"status": {"producer_only"}, "recover": {"dropped"}}


def test_every_command_with_json_is_documented() -> None:
    with_json = sorted(
        name for name, command in main.commands.items() if any("--json" in p.opts for p in command.params)
    )
    assert sorted(contract()) == with_json
    readme = (DOC.parent.parent / "README.md").read_text()
    assert "docs/json.md" in readme


def test_the_json_of_every_command_matches_the_document(tmp_path: Path, procs: list[Proc]) -> None:
    home = tmp_path / "home"
    corpus = copy_corpus(tmp_path / "corpus", ["json/decoder.py", "json/scanner.py"])
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x00")  # skipped: binary
    seen: dict[str, set[str]] = {name: set() for name in contract()}

    def run(command: str, *args: str, code: int = 0, **extra: str) -> Any:
        result = run_cli(home, command, *args, "--json", **MODEL, **extra)
        assert result.returncode == code, result.stderr
        output = json.loads(result.stdout)
        seen[command] |= fields(command, output)
        return output

    writer = start_worker(procs, home, **MODEL)
    writer.wait_started()
    submitted = run("index", str(corpus), "-c", "docs", "--wait")
    assert submitted["skipped"] and not submitted["remote"]
    status = run("status")
    assert status["writer"]["alive"] and status["jobs"][0]["state"] == "done"
    assert run("search", "decode a JSON document", "-c", "docs", "-k", "2")
    backup = run("backup")
    assert backup["verified"] is True
    assert run("backups")[-1]["name"] == backup["name"]
    assert run("check")["healthy"] is True
    assert run("check", "--deep")["healthy"] is True
    assert run("recover")["action"] == "none"
    assert writer.terminate() == 0
    assert run("status")["writer"] == {"alive": False}

    # Damage: found by a check, an alert raised, repaired by restoring the backup.
    (home / "chroma" / "chroma.sqlite3").unlink()
    assert run("check", code=1)["problems"]
    planned = run("recover", "--dry-run")
    assert (planned["action"], planned["dry_run"]) == ("restore", True) and planned["preflight"]["needs_bytes"] > 0
    done = run("recover")
    assert (done["action"], done["healthy"], done["dry_run"]) == ("restore", True, False)
    after = run("status")
    assert after["last_recovery"]["ok"] and after["alerts"] and after["last_check"]

    # A writer whose memory guard holds every commit back (1.01 % is below any machine's use).
    held = start_worker(procs, home, str(BIN / "indexq"), "worker", "--memory-threshold", "1.01", **MODEL)
    held.wait_started()
    more = copy_corpus(tmp_path / "more", ["json/encoder.py"])
    assert run_cli(home, "index", str(more), "-c", "docs", **MODEL).returncode == 0

    def guarded() -> bool:
        return run("status")["writer"]["guard"] is not None

    wait_for(guarded, 60, "the guard in status")
    held.kill9()

    for command, listed in contract().items():
        missing = set(listed) - seen[command] - SCALE_OUT_ONLY.get(command, set())
        assert not missing, f"docs/json.md lists fields `indexq {command} --json` never printed: {sorted(missing)}"


def test_the_document_says_where_each_field_comes_from() -> None:
    """Every row has a type and a meaning; the scale-out fields say they are."""
    text = DOC.read_text()
    for command, listed in contract().items():
        for field, kind in listed.items():
            assert kind, (command, field)
            row = re.search(rf"^\| `{re.escape(field)}` \| [^|]+ \| (.+) \|$", text, re.M)
            assert row and row.group(1).strip(), f"{command}: {field} has no meaning"
    for command, names in SCALE_OUT_ONLY.items():
        assert names <= set(contract()[command])
