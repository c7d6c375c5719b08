"""What embedding a task's chunks longest first saves: the model alone, on the benchmark's
corpus, in micro-batches cut in the order of the files against longest first.

    python -m ops.tools.padding --chunks 1500 --rounds 2     # about six minutes here

The chunks are those of ``python -m ops.tools.bench`` (the same sources, the default
chunking), cut into tasks of the writer's size and each task into micro-batches of the
writer's size for the device; each micro-batch goes through ``Embedder.embed`` as the
writer's does. In the order of the files (as a bare loop, or indexq before, embeds
them), then with each task's chunks ordered as the writer orders them
(``pipeline.batches.longest_first`` over ``Embedder.lengths``), alternating over rounds.
Reports chunks/s and CPU seconds of each, and the share of the tokens the model computed
that were padding (each forward pass pads its texts to the longest among them). A
measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from pipeline.batches import batched, longest_first
from pipeline.config import DEFAULT_MODEL, Config


def _padded(texts: list[str], lengths: list[int], order: list[int], micro_batch: int, forward_batch: int) -> int:
    """Tokens computed: sentence-transformers orders a micro-batch by characters, longest
    first, and pads each forward pass to its longest text."""
    total = 0
    for batch in batched(order, micro_batch):
        for forward in batched(sorted(batch, key=lambda i: -len(texts[i])), forward_batch):
            total += max(lengths[i] for i in forward) * len(forward)
    return total


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--chunks", default=1500, show_default=True, help="Chunks of the benchmark's corpus.")
@click.option("--rounds", default=2, show_default=True, help="Alternating rounds of each order.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures as JSON.")
def main(chunks: int, rounds: int, model: str, device: str, output: Path | None) -> None:
    from ops.tools.bench import build_corpus
    from pipeline.embedder import load_embedder

    config = Config(model=model, device=device)
    with tempfile.TemporaryDirectory(prefix="indexq-padding-") as work:
        total, kept = build_corpus(Path(work) / "corpus", chunks, config)
    texts = [c.text for c in kept]
    embedder = load_embedder(model, device)
    micro_batch = config.micro_batch_for(embedder.device)
    lengths = embedder.lengths(texts)
    files = list(range(len(texts)))
    longest: list[int] = []
    for task in batched(files, config.task_chunks):
        longest += [task[i] for i in longest_first([lengths[i] for i in task])]
    forward = getattr(embedder, "forward_batch", None) or micro_batch
    useful = sum(lengths)
    results: dict[str, Any] = {
        "chunks": total, "device": embedder.device, "micro_batch": micro_batch, "task_chunks": config.task_chunks,
    }  # fmt: skip
    for name, order in (("file order", files), ("longest first", longest)):
        padded = _padded(texts, lengths, order, micro_batch, forward)
        share = round(1 - useful / padded, 4) if padded else 0.0  # hash: models pad nothing
        results[name] = {"padding_share": share, "chunks_per_s": [], "cpu_seconds": []}
    embedder.embed(texts[:8])  # the first pass's one-off costs
    for _ in range(rounds):
        for name, order in (("file order", files), ("longest first", longest)):
            started, cpu = time.perf_counter(), time.process_time()
            for batch in batched(order, micro_batch):
                embedder.embed([texts[i] for i in batch])
            seconds = time.perf_counter() - started
            results[name]["chunks_per_s"].append(round(len(texts) / seconds, 2))
            results[name]["cpu_seconds"].append(round(time.process_time() - cpu, 1))
            click.echo(f"  {name:14} {len(texts) / seconds:7.2f} chunks/s", err=True)
    for name in ("file order", "longest first"):
        r = results[name]
        click.echo(
            f"{name:14} chunks/s {' '.join(map(str, r['chunks_per_s']))}  CPU s {' '.join(map(str, r['cpu_seconds']))}"
            f"  padding {r['padding_share']:.1%} of the tokens computed"
        )
    click.echo(f"{total} chunks on {embedder.device}, micro-batches of {micro_batch}, tasks of {config.task_chunks}")
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
