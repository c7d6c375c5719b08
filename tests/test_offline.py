"""The real model loads with the Hugging Face hub offline; importing indexq leaves the environment alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import env_for

ROOT = Path(__file__).resolve().parent.parent
# In a fresh process: any connection attempt fails the run, and the hub's cache is an
# empty folder that must stay empty (nothing downloaded, nothing looked up).
SCRIPT = r"""
import os, socket

def refuse(*args, **kwargs):
    raise AssertionError(f"network access: {args!r}")

socket.socket.connect = refuse
socket.create_connection = refuse

import pipeline, pipeline.api, pipeline.cli, pipeline.embedder
assert "HF_HUB_OFFLINE" not in os.environ, "set by an import"

from pipeline.embedder import load_embedder

embedder = load_embedder("all-MiniLM-L6-v2")
import huggingface_hub.constants

assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
print(embedder.embed(["nothing is downloaded"]).shape[1])
"""


def test_the_model_loads_offline_and_imports_change_no_environment(tmp_path: Path) -> None:
    cache = tmp_path / "hf-home"
    cache.mkdir()
    env = env_for(tmp_path / "home", HF_HOME=str(cache))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert (result.returncode, result.stdout) == (0, "384\n"), result.stderr[-3000:]
    assert list(cache.iterdir()) == []
