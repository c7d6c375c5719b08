"""The writer hands its freed heap back to the kernel (pipeline/heap.py, glibc only)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import config as config_module
from pipeline.config import Config
from pipeline.embedder import HashEmbedder
from pipeline.heap import HeapTrimmer
from pipeline.writer import Writer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not HeapTrimmer(interval=0).available, reason="no malloc_trim (not glibc)")

# In a fresh process: 160 MB in blocks of 64 KB (under glibc's mmap threshold, so on the
# heap), all freed but the last, which keeps the heap's top in use: free memory that
# glibc keeps resident until malloc_trim.
FRAGMENTED = """
import json, psutil
from pipeline.heap import HeapTrimmer
rss = lambda: psutil.Process().memory_info().rss / 2**20
start = rss()
blocks = [bytearray(65536) for _ in range(2560)]
last = blocks.pop()
del blocks
kept = rss()
trimmer = HeapTrimmer(interval=0)
trimmer.trim_now()
print(json.dumps({"start": start, "kept": kept, "trimmed": rss(), "released": trimmer.released_mb,
                  "trims": trimmer.trims, "last": len(last)}))
"""


def test_freed_memory_below_live_blocks_is_handed_back() -> None:
    done = subprocess.run([sys.executable, "-c", FRAGMENTED], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["kept"] - figures["start"] > 120, figures  # freed, yet resident
    assert figures["kept"] - figures["trimmed"] > 120, figures  # handed back by the trim
    assert figures["released"] > 120 and figures["trims"] == 1


def test_the_writer_trims_while_it_runs_and_stops_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "HEAP_TRIM_SECONDS", 0.05)
    config = Config(home=tmp_path / "home", model="hash:384")
    config.ensure_home()
    writer = Writer(config, embedder=HashEmbedder("hash:384"))
    try:
        assert writer.heap.active and writer.heap.interval == 0.05
        deadline = time.monotonic() + 30
        while writer.heap.trims < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.heap.trims >= 2
    finally:
        writer.close()
    assert not writer.heap.active
    assert not any(t.name == "indexq-heap-trim" for t in threading.enumerate())


def test_a_trimmer_with_no_interval_runs_no_thread() -> None:
    trimmer = HeapTrimmer(interval=0)
    assert trimmer.available and not trimmer.active
    trimmer.trim_now()
    assert trimmer.trims == 1
    trimmer.close()
