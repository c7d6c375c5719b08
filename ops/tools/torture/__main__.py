"""``python -m ops.tools.torture``: the command line."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ops.tools.torture import COLLECTION, DEFAULT_EMBEDDER, DEFAULT_FILES, DEFAULT_KILLS, DEFAULT_SEED, DEFAULT_TIMEOUT
from ops.tools.torture.compare import compare_homes, differs
from ops.tools.torture.corpus import copy_stdlib
from ops.tools.torture.procs import HarnessError, Settings
from ops.tools.torture.report import table
from ops.tools.torture.run import torture
from pipeline.config import DEFAULT_MICRO_BATCH


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every child is killed on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--kills", default=DEFAULT_KILLS, show_default=True, type=click.IntRange(1), help="SIGKILLs to deal.")
@click.option("--embedder", default=DEFAULT_EMBEDDER, show_default=True,
              help="Model of both runs: hash:DIM (fast, deterministic) or a sentence-transformers model.")  # fmt: skip
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder to index (copied into the work folder) [a sample of the standard library].")  # fmt: skip
@click.option("--files", default=DEFAULT_FILES, show_default=True, type=click.IntRange(1),
              help="Standard-library files in the default corpus.")  # fmt: skip
@click.option("--micro-batch", default=DEFAULT_MICRO_BATCH, show_default=True, type=click.IntRange(1),
              help="The writer's micro-batch (the re-embedding bound is one per writer kill).")  # fmt: skip
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Seed of the victims, moments and edits.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Work folder (created; must be empty) [a new temporary folder].")  # fmt: skip
@click.option("--keep", is_flag=True, help="Keep the work folder (it is always kept on a failure).")
@click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, type=click.FloatRange(60),
              help="Seconds the whole run may take before it stops with exit 2.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option(
    "--compare",
    "homes",
    nargs=2,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    metavar="CLEAN TORTURED",
    help="Only compare two data homes (or Chroma directories) already there.",
)
@click.option("--collection", default=COLLECTION, show_default=True, help="Collection --compare reads.")
def main(
    kills: int, embedder: str, corpus: Path | None, files: int, micro_batch: int, seed: int, workdir: Path | None,
    keep: bool, timeout: float, as_json: bool, homes: tuple[Path, Path] | None, collection: str,
) -> None:  # fmt: skip
    """Kill -9 the writer, producers, the maintenance consumer and restores N times at
    random moments, let everything finish, and compare with a clean run of the same job.

    \b
    Examples:
      python -m ops.tools.torture --kills 200 --embedder hash:384
      python -m ops.tools.torture --kills 20 --files 20 --json
      python -m ops.tools.torture --compare ./home-a ./home-b --collection docs
    Exit 0: the collections are equal and the deep check is healthy; 1: anything lost,
    extra or different, a failed check, or more re-embedding than one micro-batch per
    writer kill; 2: the harness failed (a stage timed out); its work folder is kept.
    """
    command = " ".join(["python -m ops.tools.torture", *sys.argv[1:]])
    if homes:
        with tempfile.TemporaryDirectory(prefix="indexq-compare-") as scratch:
            comparison = compare_homes(homes[0], homes[1], collection, Path(scratch))
        report = {"command": command, "comparison": comparison, "passed": not differs(comparison)}
        _print(report, as_json)
        sys.exit(0 if report["passed"] else 1)
    if workdir is not None:
        if workdir.exists() and any(workdir.iterdir()):
            raise click.BadParameter(f"{workdir} is not empty", param_hint="--workdir")
        workdir.mkdir(parents=True, exist_ok=True)
        work = workdir.absolute()
    else:
        work = Path(tempfile.mkdtemp(prefix="indexq-torture-"))
    settings = Settings(
        work=work, corpus=work / "corpus", kills=kills, embedder=embedder, micro_batch=micro_batch, seed=seed,
        deadline=time.monotonic() + timeout,
    )  # fmt: skip
    passed = False
    try:
        with terminate_as_exit():
            if corpus is not None:
                shutil.copytree(corpus, settings.corpus, symlinks=True)
            else:
                copy_stdlib(settings.corpus, files)
            report = torture(settings, command)
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        passed = bool(report["passed"])
        _print(report, as_json)
    except KeyboardInterrupt:
        click.echo(f"interrupted; work folder kept: {work}", err=True)
        sys.exit(130)
    except HarnessError as exc:
        raise HarnessError(f"{exc.message} (work folder kept: {work})") from None
    finally:
        if passed and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif passed:
            click.echo(f"work folder kept: {work}", err=True)
    if not passed:
        click.echo(f"work folder kept: {work}", err=True)
        sys.exit(1)


def _print(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(table(report))


if __name__ == "__main__":
    main()
