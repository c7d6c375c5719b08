"""The ``indexq`` command. The only place errors become messages and exit codes.

Every exit but success and click's usage errors (2) goes through ``_fail``: the exit
code is the ``exit_code`` of the error's class in ``pipeline.errors``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from pipeline import api
from pipeline.config import (
    DEFAULT_BACKUP_INTERVAL,
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_COMMIT_BATCH,
    DEFAULT_DEEP_CHECK_INTERVAL,
    DEFAULT_DEVICE,
    DEFAULT_HOME,
    DEFAULT_MEMORY_THRESHOLD,
    DEFAULT_MODEL,
    DEFAULT_PRECISION,
    DEFAULT_QUICK_CHECK_INTERVAL,
    DEFAULT_REQUEUE_INTERVAL,
    DEFAULT_RETENTION,
    DEFAULT_STATUS_JOBS,
    DEFAULT_WATCH_INTERVAL,
    MAX_SEARCH_RESULTS,
    MAX_STATUS_JOBS,
    MAX_WATCH_INTERVAL,
    MICRO_BATCH_BY_DEVICE,
    PRECISIONS,
    Config,
    device_problem,
    named_by,
    parse_metrics_port,
    private_files,
)
from pipeline.errors import (
    BackupFailedError,
    ConfigError,
    DamageFoundError,
    IndexqError,
    JobFailedError,
    describe,
    storage_error,
)

# Longest wait of the idle writer between looks at its queue (Huey's default is 10 s,
# which would leave a fresh job waiting; a look at an SQLite queue costs microseconds).
WRITER_MAX_POLL = 0.25


def _fail(exc: IndexqError) -> None:
    click.echo(describe(exc), err=True)
    sys.exit(exc.exit_code)


def _in_echo(exc: BaseException) -> bool:
    """Whether ``exc`` rose from writing the command's own output (click.echo)."""
    return any(f.name == "echo" and f.filename == click.utils.__file__ for f in traceback.extract_tb(exc.__traceback__))


def _errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except IndexqError as exc:
            _fail(exc)
        except Exception as exc:
            # `indexq status > /dev/full`: not the home's disk (a closed pipe, `| head`, as before)
            if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError) and _in_echo(exc):
                _fail(IndexqError(f"cannot write the output: {exc.strerror or exc}"))
            # SQLite, Huey, chromadb or the OS refusing to read or write the data home
            # (disk full, read-only, permission, I/O): exit 6 with one line, never a traceback.
            home = kwargs.get("home") or Path(DEFAULT_HOME)
            error = storage_error(exc, f"cannot use the data home {home}", home)
            if error is None:
                raise
            _fail(error)

    return wrapper


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    ctx.meta[f"indexq.{param.name}"] = value


def _home(func: Callable[..., Any]) -> Callable[..., Any]:
    """--home, and the engines every command must agree on (read by _config)."""
    func = click.option(
        "--chroma-url", envvar="INDEXQ_CHROMA_URL", expose_value=False, callback=_remember, metavar="URL",
        help="Chroma server http://HOST:PORT instead of the data home's directory (env INDEXQ_CHROMA_URL).",
    )(func)  # fmt: skip
    func = click.option(
        "--queue-url", envvar="INDEXQ_QUEUE_URL", expose_value=False, callback=_remember, metavar="URL",
        help="Queue: redis://HOST:PORT/DB shared by many machines, or sqlite:///PATH"
        " (env INDEXQ_QUEUE_URL; default: queue.db in the data home).",
    )(func)  # fmt: skip
    return click.option(
        "--home", type=click.Path(file_okay=False), envvar="INDEXQ_HOME",
        default=DEFAULT_HOME, show_default=True, callback=_check_home, help="Data home (env INDEXQ_HOME).",
    )(func)  # fmt: skip


def _finite(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """A number click's ranges let through when it is NaN (no comparison holds for it): refused."""
    if math.isnan(value):
        raise click.BadParameter("is not a number")
    return value


def _check_home(_ctx: click.Context, _param: click.Parameter, value: str) -> Path:
    """The home as given, less spaces around it (as every INDEXQ_* value); an empty one
    would be the current folder, whose files ``ensure_home`` would make private: refused."""
    text = value.strip()
    if not text:
        raise click.BadParameter("is empty (it would make the current folder the data home); name a folder")
    return Path(text)


def _device(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--device", envvar="INDEXQ_DEVICE", default=DEFAULT_DEVICE, show_default=True, metavar="auto|cpu|cuda|mps",
        callback=_check_device,
        help="Where the model runs: auto takes CUDA, then MPS, then the CPU; cuda:N names one GPU (env INDEXQ_DEVICE).",
    )(func)  # fmt: skip


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """A device indexq knows, refused as a usage error (naming INDEXQ_DEVICE where it came from there)."""
    value = value.strip()
    if (problem := device_problem(value)) is not None:
        raise click.BadParameter(problem)
    return value


def _precision(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--precision", envvar="INDEXQ_PRECISION", default=DEFAULT_PRECISION, show_default=True,
        type=click.Choice(PRECISIONS), help=help_text,
    )  # fmt: skip


def _model(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--model", envvar="INDEXQ_MODEL", default=None,
        help=f"sentence-transformers model: a local path or name (env INDEXQ_MODEL; default {DEFAULT_MODEL}).",
    )(func)  # fmt: skip


def _metrics_port(func: Callable[..., Any]) -> Callable[..., Any]:
    """--metrics-port of the consumers (read by _config)."""
    return click.option(
        "--metrics-port", envvar="INDEXQ_METRICS_PORT", expose_value=False, callback=_remember,
        metavar="[ADDR:]PORT", help="Serve Prometheus metrics on PORT, at 127.0.0.1 unless ADDR is given"
        " (env INDEXQ_METRICS_PORT; default: not served).",
    )(func)  # fmt: skip


def _config(**overrides: Any) -> Config:
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        for name in ("queue_url", "chroma_url"):
            overrides.setdefault(name, ctx.meta.get(f"indexq.{name}"))
        if (port := ctx.meta.get("indexq.metrics_port")) is not None:
            from_env = ctx.get_parameter_source("metrics_port") == click.core.ParameterSource.ENVIRONMENT
            found = parse_metrics_port("INDEXQ_METRICS_PORT" if from_env else "--metrics-port", port)
            if found:
                overrides["metrics_addr"], overrides["metrics_port"] = found
    try:
        return Config.from_env(**overrides)
    except ConfigError as exc:  # a flag's value out of range: named by its variable where it came from there
        param = next((p for p in ctx.command.params if p.name == exc.setting), None) if ctx is not None else None
        if (
            ctx is None
            or param is None
            or ctx.get_parameter_source(param.name or "") is not ParameterSource.ENVIRONMENT
        ):
            raise
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        variable = next((n for n in names if os.environ.get(n)), None)
        if variable is None:
            raise
        raise named_by(variable, exc) from None


# click 8.2 and later raise this for `indexq` alone (a UsageError that shows the help).
_HELP_FOR_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Bad usage answers like every other error: ``Error: ...`` in one line, a ``Hint:``,
    exit 2 (README, "Exit codes"), not click's usage block. A bad value from the
    environment is named by its variable, not by the option the user never typed."""
    try:
        yield
    except _HELP_FOR_NO_ARGS:
        raise  # `indexq` alone: the help, as click shows it
    except click.UsageError as exc:
        message = exc.format_message()
        if isinstance(exc, click.BadParameter) and exc.param is not None and exc.ctx is not None:
            envvar = exc.param.envvar
            names = [envvar] if isinstance(envvar, str) else list(envvar or ())
            # The one click read: the first of them set to something (as click resolves them).
            name = next((n for n in names if os.environ.get(n)), None)
            from_env = exc.ctx.get_parameter_source(exc.param.name or "") is ParameterSource.ENVIRONMENT
            if from_env and name is not None:
                message = f"Invalid value for {name} (from the environment): {exc.message}"
        click.echo(f"Error: {message}", err=True)
        command = exc.ctx.command_path if exc.ctx is not None else "indexq"
        click.echo(f"Hint: see '{command} --help'", err=True)
        sys.exit(exc.exit_code)


class _Cli(click.Group):
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="indexq")
def main() -> None:
    """Crash-safe bulk indexing into ChromaDB.

    \b
    Start the one writer, then submit work from anywhere:
      indexq worker &
      indexq index ./docs --collection docs --wait
      indexq search "how do I resume" --collection docs
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pypdf warns of each flaw it reads past ("EOF marker not found"): a PDF it cannot read is
    # skipped with its reason, and one it reads is indexed; its warnings only buried the answer.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    # Every file and folder indexq creates, Chroma's and SQLite's included, is the owner's only.
    private_files()


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--collection", "-c", required=True, help="Chroma collection to index into.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching GLOB (name or relative path).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files and folders matching GLOB.")
@click.option("--jsonl", type=click.Path(dir_okay=False, path_type=Path), help="Index records from a JSONL file.")
@click.option("--prune", is_flag=True, help="Remove the chunks of files indexed from under PATHS that no longer exist.")
@click.option(
    "--follow-symlinks", is_flag=True, help="Follow symlinks that lead outside PATHS (by default they are skipped)."
)
@click.option("--wait", "wait_", is_flag=True, help="Show progress until every chunk is committed.")
@click.option("--json", "as_json", is_flag=True, help="Print the submission as JSON.")
@click.option(
    "--chunk-tokens", type=int, envvar="INDEXQ_CHUNK_TOKENS", help="Tokens per chunk (default: the model's limit)."
)
@click.option("--chunk-overlap", type=int, envvar="INDEXQ_CHUNK_OVERLAP", default=DEFAULT_CHUNK_OVERLAP,
              show_default=True, help="Tokens of overlap between chunks.")  # fmt: skip
@click.option("--full-text/--no-full-text", "full_text", default=None, envvar="INDEXQ_FULL_TEXT",
              help="A new collection gets Chroma's full-text index on documents (default on; where_document needs"
                   " it). Kept for good: asking an existing collection for the other is an error.")  # fmt: skip
@_model
@_home
@_errors
def index(
    paths: tuple[Path, ...], collection: str, include: tuple[str, ...], exclude: tuple[str, ...],
    jsonl: Path | None, prune: bool, follow_symlinks: bool, wait_: bool, as_json: bool, chunk_tokens: int | None,
    chunk_overlap: int, full_text: bool | None, model: str | None, home: Path,
) -> None:  # fmt: skip
    """Enqueue a bulk-index job; prints the job id.

    \b
    Examples:
      indexq index ./src --collection code --include '*.py' --exclude 'tests/*'
      indexq index --jsonl records.jsonl --collection notes --wait
      indexq index ./docs --collection docs --prune
    """
    from pipeline.producer import Producer

    if jsonl and paths:
        raise click.UsageError("give PATHS or --jsonl, not both")
    if not jsonl and not paths:
        raise click.UsageError("give PATHS to index, or --jsonl FILE")
    if jsonl and (prune or follow_symlinks):
        raise click.UsageError("--prune and --follow-symlinks apply to PATHS, not --jsonl")
    config = _config(home=home, model=model, chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap,
                     full_text=full_text)  # fmt: skip
    producer = Producer(config)
    try:
        if jsonl:
            sub = producer.submit_jsonl(jsonl, collection)
        else:
            sub = producer.submit_paths(list(paths), collection, include, exclude, prune, follow_symlinks)
    finally:
        producer.close()
    if as_json:
        click.echo(json.dumps(sub.as_dict()))
    elif sub.remote:
        click.echo(sub.job)
        click.echo(
            f"{sub.chunks} chunks handed to the writer through {config.queue_shown}; {len(sub.skipped)} files skipped",
            err=True,
        )
    else:
        click.echo(sub.job)
        click.echo(
            f"{sub.chunks} chunks: {sub.new} new, {sub.changed} changed, {sub.unchanged} unchanged,"
            f" {sub.metadata_updated} metadata updated, {sub.stale} stale; {len(sub.skipped)} files skipped"
            + (f"; {sub.pruned} files pruned" if prune else ""),
            err=True,
        )
    if wait_:
        result = api.wait(sub.job, config, progress=True)
        summary = f"job {result.id} {result.state}: {result.committed} committed, {result.failed} failed"
        if result.state == "failed":
            reasons = api.failure_reasons(sub.job, config)
            if reasons:
                summary += "; " + "; ".join(f"{n} chunk{'' if n == 1 else 's'}: {reason}" for reason, n in reasons)
            raise JobFailedError(
                summary,
                hint="each failed chunk keeps its reason in the ledger (chunks.error); indexing again retries it",
            )
        click.echo(summary, err=True)


@main.command()
@click.option("--memory-threshold", type=float, envvar=["INDEXQ_MEMORY_THRESHOLD", "CHROMADB_MEMORY_THRESHOLD"],
              default=DEFAULT_MEMORY_THRESHOLD, show_default=True,
              help="Hold commits while system memory use is at or above this percentage.")  # fmt: skip
@click.option("--commit-batch", type=int, envvar="INDEXQ_COMMIT_BATCH", default=DEFAULT_COMMIT_BATCH,
              show_default=True, help="Records per Chroma upsert, at most 10.")  # fmt: skip
@click.option("--micro-batch", type=int, envvar="INDEXQ_MICRO_BATCH", default=None,
              help="Chunks embedded together (default per device: "
              + ", ".join(f"{d} {n}" for d, n in MICRO_BATCH_BY_DEVICE.items()) + ").")  # fmt: skip
@_precision("Model precision; fp16 on CUDA only, bf16 on a GPU or CPU that has it (env INDEXQ_PRECISION).")
@click.option("--verbose", "-v", is_flag=True, help="Log every commit.")
@_metrics_port
@_device
@_model
@_home
@_errors
def worker(
    memory_threshold: float, commit_batch: int, micro_batch: int | None, precision: str, verbose: bool,
    device: str, model: str | None, home: Path,
) -> None:  # fmt: skip
    """Run the one writer in the foreground (SIGTERM or Ctrl-C: finish the commit, stop).

    \b
    Example:
      indexq worker --home ./indexq-data
    Exits 3 if another writer already holds the data home.
    """
    from pipeline.embedder import check_writer_settings
    from workers.consumer import LOG_FORMAT
    from workers.writer import WriterHuey

    config = _config(
        home=home, model=model, memory_threshold=memory_threshold, commit_batch=commit_batch,
        micro_batch=micro_batch, device=device, precision=precision,
    )  # fmt: skip
    check_writer_settings(config.model, config.device, config.precision)  # before the data home is made
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    huey = WriterHuey(config)
    consumer = huey.start_writer(workers=1, worker_type="thread", max_delay=WRITER_MAX_POLL, check_worker_health=True)
    try:
        consumer.run()
    finally:
        huey.stop_writer()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print status as JSON.")
@click.option(
    "--jobs", default=DEFAULT_STATUS_JOBS, show_default=True, type=click.IntRange(0, MAX_STATUS_JOBS),
    help=f"How many recent jobs to list (0 to {MAX_STATUS_JOBS}).",
)  # fmt: skip
@click.option("--watch", is_flag=True, help="A live view (rate, queue, jobs, guard) refreshed until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, MAX_WATCH_INTERVAL), default=DEFAULT_WATCH_INTERVAL,
              show_default=True, callback=_finite, metavar="S",
              help=f"Seconds between refreshes of --watch (0.1 to {MAX_WATCH_INTERVAL:g}).")  # fmt: skip
@_home
@_errors
def status(as_json: bool, jobs: int, watch: bool, interval: float, home: Path) -> None:
    """Jobs, queue depth, writer, last commit, rate, memory and disk.

    \b
    Examples:
      indexq status --json | jq .jobs
      indexq status --watch --interval 5
    """
    if watch:
        from ops.watch import watch as live

        if as_json:
            raise click.UsageError("--watch shows a live view: drop --json")
        config = _config(home=home)
        live(lambda: api.status(config, jobs=jobs), interval)  # returns at Ctrl-C: exit 0
        return
    info = api.status(_config(home=home), jobs=jobs)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    engines = info["engines"]
    queue_line = f"queue:       {engines['queue']} {engines['queue_at']}: {info['queue_depth']} tasks" + (
        f", {info['intake_parts']} intake parts waiting" if engines["queue"] == "redis" else ""
    )
    if info.get("producer_only"):
        click.echo(queue_line)
        click.echo(f"home:        {info['home']} (a producer: the ledger and jobs are on the writer's machine;")
        click.echo("             follow a job with `indexq index --wait`)")
        _echo_writer(info["writer"])
        return
    _echo_writer(info["writer"])
    click.echo(f"home:        {info['home']}")
    click.echo(queue_line)
    click.echo(f"chroma:      {engines['chroma']} {engines['chroma_at']}")
    last = info["last_commit"]
    last_text = (
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last))} ({time.time() - last:.0f}s ago)"
        if last
        else "never"
    )
    click.echo(f"last commit: {last_text}")
    click.echo(f"rate:        {info['recent_rate']:.1f} chunks/s (last minute)")
    chunks = ", ".join(f"{n} {state}" for state, n in sorted(info["chunks"].items())) or "none"
    click.echo(f"chunks:      {chunks}")
    click.echo(
        f"embeddings:  {info['embeddings_total']} computed, {info['embedded_more_than_once']} chunks embedded"
        " more than once"
    )
    click.echo(f"memory:      {info['memory']['percent']:.0f}% used (threshold {info['memory']['threshold']:g}%)")
    click.echo(f"disk:        {info['disk']['free_mb']} MB free (minimum {info['disk']['min_free_mb']} MB)")
    backup = info["last_backup"]
    if backup:
        state = {True: "verified", False: "FAILED verification", None: "unverified"}[backup["verified"]]
        click.echo(f"last backup: {backup['name']}, {_age(backup['time'])} ago, {state}")
    else:
        click.echo("last backup: none")
    last_check = info["last_check"]
    click.echo(
        f"last check:  {last_check['summary']}, {_age(last_check['time'])} ago" if last_check else "last check:  none"
    )
    recovery = info["last_recovery"]
    if recovery:
        click.echo(f"recovery:    {recovery['summary']}, {_age(recovery['time'])} ago")
    for alert in info["alerts"]:
        click.echo(
            f"ALERT        {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(alert['time']))} {alert['summary']}"
        )
    if info["jobs"]:
        header = ("job", "collection", "state", "chunks", "committed", "pending", "failed")
        click.echo("\n{:<25} {:<20} {:<10} {:>7} {:>9} {:>7} {:>6}".format(*header))
        for j in info["jobs"]:
            click.echo(
                f"{j['id']:<25} {j['collection'][:20]:<20} {j['state']:<10} {j['chunks']:>7} {j['committed']:>9}"
                f" {j['pending']:>7} {j['failed']:>6}"
            )


@main.command()
@click.argument("text")
@click.option("--collection", "-c", required=True, help="Collection to search.")
@click.option(
    "-k", "k", default=5, show_default=True, type=click.IntRange(1, MAX_SEARCH_RESULTS), help="Number of results."
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@_precision("The query's precision: bf16 where this machine computes it, else fp32 (env INDEXQ_PRECISION).")
@_device
@_model
@_home
@_errors
def search(
    text: str, collection: str, k: int, as_json: bool, precision: str, device: str, model: str | None, home: Path
) -> None:
    """Nearest chunks to TEXT.

    \b
    Example:
      indexq search "parse a JSON document" --collection stdlib -k 3
    """
    hits = api.search(text, collection, k, _config(home=home, model=model, device=device, precision=precision))
    if as_json:
        click.echo(json.dumps(hits, indent=2))
        return
    if not hits:
        click.echo("no results")
    for rank, hit in enumerate(hits, start=1):
        meta = hit["metadata"]
        # What indexq writes; a record, or a collection another client filled, may hold any
        # of these keys, or none.
        where = meta.get("source", hit["id"])
        if "start_line" in meta:
            where = f"{where}:{meta['start_line']}" + (f"-{meta['end_line']}" if "end_line" in meta else "")
        if "page" in meta:  # PDFs: the page the chunk starts on
            where = f"{where} page {meta['page']}"
        if meta.get("heading"):  # Markdown, HTML, DOCX: the heading path
            where = f"{where} ({meta['heading']})"
        snippet = " ".join((hit["document"] or "").split())[:100]
        click.echo(f"{rank}. {hit['distance']:.3f}  {_plain(str(where))}\n   {_plain(snippet)}")


def _plain(text: str) -> str:
    """``text`` with what a terminal would act on spelled out (``\\x1b``, ``\\n``, ``\\u202e``):
    a file name or a chunk cannot colour the screen, move its cursor or forge a line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@main.command()
@_home
@_errors
def resume(home: Path) -> None:
    """Enqueue every chunk the ledger still owes (pending, embedded or stale).

    \b
    Example:
      indexq resume && indexq worker
    The writer also does this each time it starts.
    """
    tasks = api.resume(_config(home=home))
    click.echo(f"{tasks} tasks enqueued")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the backup as JSON.")
@_home
@_errors
def backup(as_json: bool, home: Path) -> None:
    """Take a consistent backup now, verify it, and prune old ones.

    \b
    Example:
      indexq backup --home ./indexq-data
    Exits 4 if the writer's commit lock stays busy, 1 if the backup fails verification.
    """
    from ops.maintenance import backup_and_prune

    result = backup_and_prune(_config(home=home))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        state = "verified" if result["verified"] else "FAILED verification"
        click.echo(
            f"{result['name']} {state}: watermark {result['watermark']}, writer paused {result['pause_seconds']:.3f}s"
        )
    if not result["verified"]:
        raise BackupFailedError(
            f"backup {result['name']} failed verification" + "".join(f"; {p}" for p in result["problems"][:3]),
            hint="a backup that fails verification is never restored; `indexq check` tells whether the data home"
            " itself is damaged",
        )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the backups as JSON.")
@_home
@_errors
def backups(as_json: bool, home: Path) -> None:
    """List complete backups, oldest first.

    \b
    Example:
      indexq backups --json | jq '.[-1]'
    """
    from ops.backup import list_backups

    found = list_backups(_config(home=home))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no backups")
    for b in found:
        state = {True: "verified", False: "FAILED", None: "unverified"}[b["verified"]]
        age = _age(b["time"])
        mark = "?" if b["watermark"] is None else b["watermark"]  # a manifest that cannot be read
        click.echo(f"{b['name']}  {state:<10} {age:>10} ago  watermark {mark}  {b['size_bytes'] // 2**20} MB")


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _echo_writer(writer: dict[str, Any]) -> None:
    """The writer's lines of `indexq status`: alive or not, its effective settings, its guard."""
    if not writer["alive"]:
        click.echo("writer:      not running")
        return
    since = _clock(writer.get("since", 0))
    click.echo(f"writer:      running (pid {writer.get('pid')} on {writer.get('host')} since {since})")
    settings = writer.get("settings")
    if not settings:
        click.echo("settings:    not published yet (the writer is starting)")
        return
    precision = settings.get("precision", "fp32")  # shown when it is not the default
    click.echo(
        f"settings:    model {settings['model']} on {settings.get('device', 'cpu')}"
        f"{'' if precision == 'fp32' else f' in {precision}'},"
        f" memory threshold {settings['memory_threshold']:g} %,"
        f" min free disk {settings['min_free_mb']} MB, micro-batch {settings['micro_batch']},"
        f" commit batch {settings['commit_batch']}"
    )
    guard = writer.get("guard")
    if guard:
        click.echo(f"guard:       commits held back since {_clock(guard['since'])}: {guard['summary']}")
    else:
        click.echo("guard:       clear (commits are not held back)")


def _age(when: float) -> str:
    seconds = max(0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@main.command()
@click.option("--deep", is_flag=True, help="Also read back every embedding and test self-recall.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_home
@_errors
def check(deep: bool, as_json: bool, home: Path) -> None:
    """Check Chroma against the ledger, layer by layer.

    \b
    Example:
      indexq check --deep
    Exits 0 healthy, 1 damaged (with what and where), 4 busy.
    """
    from ops.maintenance import run_check

    report = run_check(_config(home=home), deep=deep)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    elif report.healthy:
        click.echo(f"healthy ({'deep' if deep else 'quick'} check, {report.seconds:.1f}s)")
    else:
        for problem in report.problems:
            click.echo(f"damaged {problem}")
    for note in [] if as_json else report.notes:
        click.echo(f"note: {note}")
    if not report.healthy:
        found = len(report.problems)
        raise DamageFoundError(
            f"damage found in {home}: {found} problem{'s' if found > 1 else ''}",
            hint="`indexq recover --dry-run` says how it would be repaired, `indexq recover` repairs it",
        )


@main.command()
@click.option("--from", "source", metavar="BACKUP", help="Restore this backup (a name from `indexq backups`).")
@click.option("--dry-run", is_flag=True, help="Say what would be done, do nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_home
@_errors
def recover(source: str | None, dry_run: bool, as_json: bool, home: Path) -> None:
    """Repair damage with nothing acknowledged lost.

    \b
    Example:
      indexq recover --dry-run
    FTS damage is rebuilt in place; other damage restores the newest verified backup and
    replays the ledger; with no backup the collections are rebuilt from the ledger.
    """
    from ops.recovery import recover as run

    if source is not None and not source.strip():
        # Not "no --from": an empty name must not quietly restore the newest backup instead.
        raise ConfigError(f"--from must name a backup, got {source!r}", hint="`indexq backups` lists them")
    result = run(_config(home=home), source=source, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result["action"] == "none":
        click.echo("healthy: nothing to do")
        return
    verb = "would" if dry_run else "did"
    click.echo(f"{verb} {result['action']}: {result['reason']}")
    if not dry_run:
        click.echo(
            f"replayed {result.get('replayed', 0)}, deleted {result.get('deleted', 0)};"
            f" healthy after; writer paused {result['pause_seconds']:.2f}s"
        )


def _span(seconds: float) -> str:
    """A duration as INDEXQ_*_INTERVAL takes it: 24h, 7d, 5m."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and (unit != "d" or seconds > 86400):
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _intervals(func: Callable[..., Any]) -> Callable[..., Any]:
    """Fill the default intervals into a command's help from pipeline.config."""
    func.__doc__ = (func.__doc__ or "").format(
        backup=_span(DEFAULT_BACKUP_INTERVAL), quick=_span(DEFAULT_QUICK_CHECK_INTERVAL),
        deep=_span(DEFAULT_DEEP_CHECK_INTERVAL), requeue=_span(DEFAULT_REQUEUE_INTERVAL),
        retention=_span(DEFAULT_RETENTION),
    )  # fmt: skip
    return func


@main.command()
@_intervals
@click.option("--no-auto-recover", is_flag=True, help="Report damage but do not repair it.")
@_metrics_port
@_home
@_errors
def maintenance(no_auto_recover: bool, home: Path) -> None:
    """Run the maintenance consumer: backups, checks, recovery, requeue.

    \b
    Example:
      indexq maintenance --home ./indexq-data
    Intervals: INDEXQ_BACKUP_INTERVAL ({backup}), INDEXQ_QUICK_CHECK_INTERVAL ({quick}),
    INDEXQ_DEEP_CHECK_INTERVAL ({deep}), INDEXQ_REQUEUE_INTERVAL ({requeue}), INDEXQ_RETENTION ({retention}).
    """
    from workers.maintenance import MaintenanceHuey

    config = _config(home=home, auto_recover=False if no_auto_recover else None)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    huey = MaintenanceHuey(config)
    consumer = huey.start_maintenance(workers=1, worker_type="thread", max_delay=WRITER_MAX_POLL)
    try:
        consumer.run()
    finally:
        huey.stop_maintenance()


if __name__ == "__main__":
    main()
