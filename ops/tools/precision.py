"""What fp16 or bf16 does to results: the same chunks embedded in fp32 and in the other
precision, compared.

    python -m ops.tools.precision --chunks 400 --queries 100 --device cpu --precision bf16

Reports the cosine between each chunk's fp32 and fp16 (bf16) embedding (mean, minimum),
and a search hit rate: for queries made of a chunk's first words, whether the index and
query in that precision give the same top-1 hit as fp32, and how much of the top-3 they
share. Search is exact (numpy), so that only the model's precision differs, not an
index's approximation. fp16 on a CPU is slow, but its numbers are those of fp16
arithmetic: the effect measured there is the effect a GPU gives (the speed is not).
bf16 runs on a CPU as indexq runs it where the CPU has bf16 instructions (its speed is
then the writer's), by hand elsewhere. A measurement, not a test.
"""

from __future__ import annotations

import json
import random
import sysconfig
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipeline.config import DEFAULT_MODEL


def corpus(chunks: int, model: str) -> list[str]:
    """Chunks of standard-library sources, as indexq cuts them."""
    from pipeline.chunking import chunk_text
    from pipeline.embedder import load_tokenizer

    tokenizer = load_tokenizer(model)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        texts.extend(c.text for c in chunk_text(path.read_text(errors="replace"), tokenizer, None, 32))
        if len(texts) >= chunks:
            break
    return texts[:chunks]


def embed(texts: list[str], model: str, device: str, precision: str, batch: int) -> tuple[np.ndarray, float]:
    import torch

    from pipeline.embedder import SentenceTransformerEmbedder, check_precision
    from pipeline.errors import ConfigError

    try:
        check_precision(precision, device)
        embedder = SentenceTransformerEmbedder(model, device, precision)  # as the writer runs it
    except ConfigError:  # where indexq refuses it (fp16 on a CPU): converted by hand
        embedder = SentenceTransformerEmbedder(model, device)
        embedder._model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        embedder.precision = precision
    started = time.perf_counter()
    out = np.concatenate([embedder.embed(texts[i : i + batch]) for i in range(0, len(texts), batch)])
    return out, time.perf_counter() - started


def measure(
    chunks: int, queries: int, model: str, device: str, batch: int, seed: int, precision: str = "fp16"
) -> dict[str, Any]:
    texts = corpus(chunks, model)
    rng = random.Random(seed)
    asked = [" ".join(rng.choice(texts).split()[:12]) for _ in range(queries)]
    full, full_s = embed(texts + asked, model, device, "fp32", batch)
    half, half_s = embed(texts + asked, model, device, precision, batch)
    n = len(texts)
    cosine = np.sum(full[:n] * half[:n], axis=1)  # both normalised
    top1 = top3 = 0.0
    for q in range(len(asked)):
        a = np.argsort(-(full[:n] @ full[n + q]))[:3]
        b = np.argsort(-(half[:n] @ half[n + q]))[:3]
        top1 += a[0] == b[0]
        top3 += len(set(a) & set(b)) / 3
    return {
        "model": model,
        "device": device,
        "precision": precision,
        "chunks": n,
        "queries": len(asked),
        "cosine_mean": round(float(cosine.mean()), 6),
        "cosine_min": round(float(cosine.min()), 6),
        "top1_agreement": round(top1 / len(asked), 3),
        "top3_overlap": round(top3 / len(asked), 3),
        "fp32_chunks_per_s": round(len(full) / full_s, 1),
        f"{precision}_chunks_per_s": round(len(half) / half_s, 1),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--chunks", default=400, show_default=True, help="Chunks of stdlib sources to embed.")
@click.option("--queries", default=100, show_default=True, help="Queries (a chunk's first 12 words).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu measures fp16's numbers, not its speed.")
@click.option("--precision", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--batch", default=32, show_default=True)
@click.option("--seed", default=1, show_default=True)
def main(chunks: int, queries: int, model: str, device: str, precision: str, batch: int, seed: int) -> None:
    """Compare fp16 or bf16 embeddings with fp32 ones: cosine and search agreement."""
    click.echo(json.dumps(measure(chunks, queries, model, device, batch, seed, precision), indent=2))


if __name__ == "__main__":
    main()
