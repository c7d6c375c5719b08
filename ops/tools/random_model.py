"""The default model's architecture with random weights, for a machine its 90 MB of weights
cannot reach (a lent GPU machine takes at most 64 MiB of files, and has no network).

    python -m ops.tools.random_model skeleton DIR      # here: every file but the weights
    python -m ops.tools.random_model weights DIR       # there: random weights from config.json

The tokenizer, pooling and sentence-transformers files are the real model's, so texts are
cut into the same chunks and run through the same layers: the same compute, not the same
vectors. For speed on a device, never for what a search returns.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

# What the weights take; everything else (a few hundred KB) travels.
WEIGHTS = ("*.safetensors", "*.bin", "*.onnx", "*.h5", "*.msgpack")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The default model without its weights, then with random ones."""


@main.command()
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
def skeleton(target: Path) -> None:
    """Copy the default model's files, its weights left out, into TARGET."""
    from pipeline.config import DEFAULT_MODEL
    from pipeline.embedder import resolve_model

    source = Path(resolve_model(DEFAULT_MODEL))
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*WEIGHTS, "onnx", "openvino"), dirs_exist_ok=True)
    click.echo(f"{target}: {sum(p.stat().st_size for p in target.rglob('*') if p.is_file())} bytes")


@main.command()
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True)
def weights(target: Path, seed: int) -> None:
    """Write random weights for the architecture in TARGET/config.json (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.from_pretrained(target))
    model.save_pretrained(target)  # model.safetensors, where sentence-transformers looks
    click.echo(f"{target}: {sum(p.numel() for p in model.parameters())} random parameters")


if __name__ == "__main__":
    main()
