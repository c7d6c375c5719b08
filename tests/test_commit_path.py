"""The lean commit path (issue 11): per-device micro-batches, fp16 on CUDA only, checkpoints
without an fsync of their own, and embedding that overlaps the commits."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from pipeline import embedder as embedder_module
from pipeline.config import DEFAULT_MICRO_BATCH, DEFAULT_TASK_CHUNKS, MICRO_BATCH_BY_DEVICE, Config
from pipeline.embedder import HashEmbedder, check_precision, cpu_has_bf16, no_gpu_here
from pipeline.errors import BusyError, ConfigError
from pipeline.ledger import Ledger
from pipeline.locks import GIVE_WAY_SECONDS, CommitLock
from pipeline.queryserver import ask
from pipeline.rows import Row
from pipeline.writer import Writer
from tests.conftest import BIN, Proc, run_cli, start_worker

COLLECTION = "overlap-docs"
FULL, NORMAL = 2, 1  # PRAGMA synchronous


def test_micro_batch_follows_the_device_unless_set() -> None:
    config = Config()
    assert config.micro_batch is None
    assert config.micro_batch_for("cpu") == DEFAULT_MICRO_BATCH == MICRO_BATCH_BY_DEVICE["cpu"]
    assert config.micro_batch_for("cuda:0") == MICRO_BATCH_BY_DEVICE["cuda"] > DEFAULT_MICRO_BATCH
    assert config.micro_batch_for("mps") == MICRO_BATCH_BY_DEVICE["mps"]
    # An explicit value wins on every device, from the environment too.
    explicit = Config.from_env({"INDEXQ_MICRO_BATCH": "12"})
    assert [explicit.micro_batch_for(d) for d in ("cpu", "cuda:1", "mps")] == [12, 12, 12]
    # A task carries several micro-batches (so that embedding overlaps commits).
    assert config.task_chunks == DEFAULT_TASK_CHUNKS >= 4 * MICRO_BATCH_BY_DEVICE["cuda"]
    assert Config(micro_batch=1000).task_chunks == 4000


def test_precision_setting() -> None:
    assert Config().precision == "fp32"
    assert Config.from_env({"INDEXQ_PRECISION": "fp16"}).precision == "fp16"
    assert Config.from_env({"INDEXQ_PRECISION": "bf16"}).precision == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of fp32, fp16, bf16, got 'half'"):
        Config(precision="half")


def test_bf16_runs_only_where_the_cpu_has_bf16_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\nprocessor\t: 1\n")
    assert embedder_module.cpu_has_bf16(cpuinfo) is False  # AVX-512 alone: torch would emulate bf16
    for flag in ("avx512_bf16", "amx_bf16"):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu avx2 avx512f {flag} avx512_vnni\n")
        assert embedder_module.cpu_has_bf16(cpuinfo) is True
    assert embedder_module.cpu_has_bf16(tmp_path / "absent") is False  # no /proc (macOS)

    monkeypatch.setattr(embedder_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"^precision 'bf16' was asked for .* but this CPU has no bf16 instructions"):
        check_precision("bf16", "cpu")
    with pytest.raises(ConfigError, match="but the model runs on 'mps'"):
        check_precision("bf16", "mps")
    check_precision("fp32", "cpu")
    monkeypatch.setattr(embedder_module, "cpu_has_bf16", lambda: True)
    check_precision("bf16", "cpu")
    with pytest.raises(ConfigError, match="precision 'fp16' was asked for"):
        check_precision("fp16", "cpu")  # fp16 stays CUDA-only whatever the CPU has


def test_bf16_on_cuda_needs_a_gpu_that_computes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ampere (compute capability 8.0) or later, judged for the GPU named: a Turing GPU, which
    torch.cuda.is_bf16_supported() accepts because it can emulate bf16, is refused."""
    import torch

    asked: list[str] = []
    capability = {"cuda:0": (7, 5), "cuda:1": (8, 6)}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability[d])
    with pytest.raises(ConfigError, match=r"but GPU 'cuda:0' does not compute bf16 \(compute capability under 8.0"):
        check_precision("bf16", "cuda:0")
    check_precision("bf16", "cuda:1")
    check_precision("fp16", "cuda:0")  # fp16 runs on any CUDA GPU
    assert asked == ["cuda:0", "cuda:1"]


def test_fp16_off_cuda_is_refused_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(home, "worker", "--precision", "fp16", "--device", "cpu", INDEXQ_MODEL="all-MiniLM-L6-v2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "Error: precision 'fp16' was asked for (--precision, INDEXQ_PRECISION), but the model runs on 'cpu'"
    )
    assert "Traceback" not in result.stderr
    assert not home.exists()  # refused before the data home is made


@pytest.mark.skipif(not no_gpu_here(), reason="this machine may have a GPU")
@pytest.mark.parametrize("model", ["all-MiniLM-L6-v2", "hash:384"])
def test_a_writer_asked_for_a_gpu_there_is_not_makes_nothing(tmp_path: Path, model: str) -> None:
    """A device torch does not see: one line, exit 2, before the data home is made; a hash:
    model, which computes on the CPU, is no exception."""
    home = tmp_path / "home"
    result = run_cli(home, "worker", "--device", "cuda:1", INDEXQ_MODEL=model)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: device 'cuda:1' was asked for (--device, INDEXQ_DEVICE), but torch sees")
    assert not home.exists()


class WatchingEmbedder(HashEmbedder):
    """A hash embedder that, on every call after the first, waits (up to 10 s) for the
    ledger's committed count to grow while it embeds: it can only grow if the writer
    commits the previous micro-batch meanwhile. ``started`` counts the calls begun, for
    the commits to wait on (so the test does not depend on which thread runs first)."""

    def __init__(self, ledger_path: Path) -> None:
        super().__init__("hash:32")
        self.ledger_path = ledger_path
        self.calls: list[tuple[str, bool]] = []
        self.started = 0
        self.changed = threading.Condition()

    def committed(self) -> int:
        conn = sqlite3.connect(f"file:{self.ledger_path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM chunks WHERE state='committed'").fetchone()[0])
        finally:
            conn.close()

    def embed(self, texts: list[str]) -> np.ndarray:
        grew = False
        # Read before `started` moves: the commit waiting on it cannot have counted yet (read
        # after, a fast commit could land first and the count would never grow again).
        before = self.committed()
        with self.changed:
            self.started += 1
            self.changed.notify_all()
        if self.calls:
            deadline = time.monotonic() + 10
            while not grew and time.monotonic() < deadline:
                time.sleep(0.01)
                grew = self.committed() > before
        self.calls.append((threading.current_thread().name, grew))
        return super().embed(texts)


def _pending_chunks(ledger: Ledger, count: int) -> list[str]:
    """``count`` chunks of one job recorded as pending (as a producer leaves them); their ids."""
    job = ledger.jobs.create(COLLECTION, "records", ["test"])
    items = [
        {"id": f"c{i}", "source": "s", "ordinal": i, "text": f"chunk {i}\n", "metadata": json.dumps({"n": i}),
         "hash": f"h{i}", "state": "pending", "embedding": None, "model": None}
        for i in range(count)
    ]  # fmt: skip
    ids = [str(r["id"]) for r in items]
    ledger.sources.write(job, COLLECTION, items, ids, [])
    return ids


def _stop_during_the_next_commit(writer: Writer) -> None:
    """A stop asked for while the writer's next commit runs (as SIGTERM would)."""
    commit = writer._commit

    def stop_during_the_commit(collection: str, group: Sequence[Row]) -> int:
        writer.stop.set()
        return commit(collection, group)

    writer._commit = stop_during_the_commit  # type: ignore[method-assign]


def test_the_next_micro_batch_embeds_while_the_current_one_commits(tmp_path: Path) -> None:
    config = Config(home=tmp_path / "home", model="hash:32", micro_batch=8, commit_batch=4)
    config.ensure_home()
    embedder = WatchingEmbedder(config.ledger_path)
    writer = Writer(config, embedder=embedder)
    commit_wave = writer._commit_wave
    waves = 40 // 8  # chunks / micro-batch
    committing = 0  # waves whose commit has begun

    def after_the_next_embedding_began(collection: str, ready: Sequence[Row]) -> tuple[int, bool]:
        # Wave n commits once wave n + 1's embedding has begun (the last has none), so on a
        # loaded machine the commit cannot finish before the embedding looks at the count.
        # Sequential code would reach this wait before that embedding and time out.
        nonlocal committing
        committing += 1
        with embedder.changed:
            embedder.changed.wait_for(lambda: embedder.started >= min(committing + 1, waves), timeout=10)
        return commit_wave(collection, ready)

    writer._commit_wave = after_the_next_embedding_began  # type: ignore[method-assign]
    try:
        ledger = writer.ledger
        ids = _pending_chunks(ledger, 40)
        assert writer.index(COLLECTION, ids) == 40
        # Five micro-batches; each after the first was embedded on the embedding thread
        # while the one before it was being committed.
        assert len(embedder.calls) == waves
        assert all(name.startswith("indexq-embed") for name, _ in embedder.calls)
        assert [grew for _, grew in embedder.calls[1:]] == [True] * 4
        # Commits kept to whole groups in id order, and each row embedded once.
        seqs = [s for (s,) in ledger.conn.execute("SELECT seq FROM chunks ORDER BY rowid")]
        assert seqs == sorted(seqs) and len(set(seqs)) == 10
        assert ledger.embedded_more_than_once() == 0
        assert sorted(writer.store.dump(COLLECTION)) == sorted(ids)
    finally:
        writer.close()


class CpuBoundEmbedder(HashEmbedder):
    """A hash embedder that says it takes every CPU core (as torch on a CPU does), and
    records the ledger's committed count, and its thread, each time it is called."""

    def __init__(self, ledger_path: Path) -> None:
        super().__init__("hash:32")
        self.cpu_bound = True
        self.watch = WatchingEmbedder(ledger_path)
        self.seen: list[tuple[str, int]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.seen.append((threading.current_thread().name, self.watch.committed()))
        return super().embed(texts)


def test_a_model_that_takes_every_core_takes_turns_with_the_commits(tmp_path: Path) -> None:
    """On a CPU each micro-batch is embedded only once the one before it is committed (the
    model would compete with Chroma for the cores), on the one embedding thread, and a
    stop starts no further embedding."""
    config = Config(home=tmp_path / "home", model="hash:32", micro_batch=8, commit_batch=4)
    config.ensure_home()
    embedder = CpuBoundEmbedder(config.ledger_path)
    writer = Writer(config, embedder=embedder)
    try:
        assert not writer.overlap and writer.state.state["settings"]["overlap"] is False
        ledger = writer.ledger
        ids = _pending_chunks(ledger, 40)
        assert writer.index(COLLECTION, ids[:24]) == 24
        # Micro-batches of 8 committed in groups of 4: each embedding saw every chunk
        # before it committed.
        assert all(name.startswith("indexq-embed") for name, _ in embedder.seen)
        assert [n for _, n in embedder.seen] == [0, 8, 16]
        # A stop asked for during a commit: the group in hand is finished, nothing more is
        # committed, and the next micro-batch is not begun.
        _stop_during_the_next_commit(writer)
        assert writer.index(COLLECTION, ids[24:]) == 4
        assert [n for _, n in embedder.seen] == [0, 8, 16, 24]
        assert ledger.embedded_more_than_once() == 0
    finally:
        writer.close()


class LaunchingEmbedder(HashEmbedder):
    """A hash embedder that says its ``start`` only queues the work (as the model on a CUDA
    GPU does); records the thread and the ledger's committed count at each start and wait."""

    def __init__(self, ledger_path: Path) -> None:
        super().__init__("hash:32")
        self.launches = True
        self.watch = WatchingEmbedder(ledger_path)
        self.started: list[tuple[str, int]] = []
        self.waited: list[tuple[str, int]] = []

    def start(self, texts: list[str]) -> Callable[[], np.ndarray]:
        self.started.append((threading.current_thread().name, self.watch.committed()))
        vectors = self.embed(texts)

        def wait() -> np.ndarray:
            self.waited.append((threading.current_thread().name, self.watch.committed()))
            return vectors

        return wait


def test_a_gpu_model_is_queued_from_the_committing_thread_before_each_commit(tmp_path: Path) -> None:
    """On a GPU the next micro-batch is queued before the current one commits and collected
    after, all from the task's thread (a second thread would wait on every commit for the
    GIL); a stop during a commit still stores the micro-batch queued, and queues no more."""
    config = Config(home=tmp_path / "home", model="hash:32", micro_batch=8, commit_batch=4)
    config.ensure_home()
    embedder = LaunchingEmbedder(config.ledger_path)
    writer = Writer(config, embedder=embedder)
    try:
        assert writer.overlap and writer.state.state["settings"]["overlap"] is True
        ledger = writer.ledger
        ids = _pending_chunks(ledger, 40)
        here = threading.current_thread().name
        assert writer.index(COLLECTION, ids[:24]) == 24
        # Wave n + 1 is queued while wave n's 8 rows are not yet committed, and waited for
        # once they are.
        assert embedder.started == [(here, 0), (here, 0), (here, 8)]
        assert embedder.waited == [(here, 0), (here, 8), (here, 16)]
        _stop_during_the_next_commit(writer)
        assert writer.index(COLLECTION, ids[24:]) == 4
        # The second wave had been queued before the stop: it is collected and stored,
        # and no third is queued.
        assert [n for _, n in embedder.started[3:]] == [24, 24]
        assert len(embedder.waited) == 5
        states = ledger.ids_by_state(COLLECTION)
        assert [states[i] for i in ids[24:]] == ["committed"] * 4 + ["embedded"] * 12
        assert ledger.embedded_more_than_once() == 0
    finally:
        writer.close()


class LengthEmbedder(HashEmbedder):
    """A hash embedder whose texts are as long as their characters, recording each micro-batch."""

    def __init__(self) -> None:
        super().__init__("hash:32")
        self.batches: list[list[str]] = []

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(t) for t in texts]

    def embed(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        return super().embed(texts)


def test_a_task_is_embedded_longest_first_after_the_rows_a_kill_left_embedded(tmp_path: Path) -> None:
    """Pending rows go through the model longest first, ties in the task's order, in
    micro-batches that still bound what a kill wastes; rows embedded before the task
    started (a resumed task) are committed first and not embedded again."""
    config = Config(home=tmp_path / "home", model="hash:32", micro_batch=4, commit_batch=4)
    config.ensure_home()
    embedder = LengthEmbedder()
    writer = Writer(config, embedder=embedder)
    try:
        ledger = writer.ledger
        job = ledger.jobs.create(COLLECTION, "records", ["test"])
        sizes = [3, 9, 1, 9, 5, 12, 2, 7, 9, 4]
        items = [
            {"id": f"c{i}", "source": "s", "ordinal": i, "text": "x" * n + f"{i:02d}", "metadata": json.dumps({"n": i}),
             "hash": f"h{i}", "state": "pending", "embedding": None, "model": None}
            for i, n in enumerate(sizes)
        ]  # fmt: skip
        ids = [str(r["id"]) for r in items]
        ledger.sources.write(job, COLLECTION, items, ids, [])
        # c2 and c6 (short ones) were embedded by a writer killed before it committed them.
        vector = np.full(32, 1 / np.sqrt(32), dtype=np.float32)
        ledger.begin_embedding(COLLECTION, ["c2", "c6"])
        ledger.store_embeddings(COLLECTION, [("c2", "h2", vector.tobytes()), ("c6", "h6", vector.tobytes())], "hash:32")
        assert writer.index(COLLECTION, ids) == 10
        order = [text[-2:] for batch in embedder.batches for text in batch]
        # 12, then the three 9s in their task order, 7, 5, 4, 3; the embedded two never again.
        assert order == ["05", "01", "03", "08", "07", "04", "09", "00"]
        assert [len(b) for b in embedder.batches] == [2, 4, 2]  # the first wave carried c2 and c6
        assert ledger.embedded_more_than_once() == 0
        first = {i for (i,) in ledger.conn.execute("SELECT id FROM chunks WHERE seq = 1")}
        assert first == {"c2", "c6", "c5", "c1"}
        assert sorted(writer.store.dump(COLLECTION)) == sorted(ids)
    finally:
        writer.close()


def test_the_model_pads_less_when_a_task_goes_longest_first(tmp_path: Path) -> None:
    """The real model's lengths are its token counts ([CLS] and [SEP] included, at most its
    input length, read quickly from a huge text); a task mixing long chunks with short ones
    then computes fewer padded tokens than the same task in its own order, same vectors."""
    from pipeline.embedder import load_embedder, load_tokenizer

    embedder = load_embedder("all-MiniLM-L6-v2", "cpu")
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    texts = [("def resume(ledger, chunk):\n    return ledger.pending(chunk)\n" * (1 if i % 2 else 20)) + str(i)
             for i in range(32)]  # fmt: skip
    counts = tokenizer.counts(texts)
    assert embedder.lengths(texts) == [min(n + 2, 256) for n in counts] and min(counts) < 40 < 254 < max(counts)
    assert embedder.lengths(["word " * 2_000_000]) == [256]
    model = embedder._model  # type: ignore[attr-defined]
    computed: list[int] = []
    hook = model[0].register_forward_hook(lambda _m, args, _out: computed.append(args[0]["input_ids"].numel()))
    dumps = {}
    try:
        for order in ("task", "longest"):
            config = Config(home=tmp_path / order, model="all-MiniLM-L6-v2", micro_batch=8, commit_batch=4)
            config.ensure_home()
            writer = Writer(config, embedder=embedder)
            if order == "task":
                writer._longest_first = lambda rows: rows  # type: ignore[method-assign]
            try:
                job = writer.ledger.jobs.create(COLLECTION, "records", ["test"])
                items = [
                    {"id": f"c{i}", "source": "s", "ordinal": i, "text": t, "metadata": json.dumps({"n": i}),
                     "hash": f"h{i}", "state": "pending", "embedding": None, "model": None}
                    for i, t in enumerate(texts)
                ]  # fmt: skip
                writer.ledger.sources.write(job, COLLECTION, items, [f"c{i}" for i in range(32)], [])
                assert writer.index(COLLECTION, [f"c{i}" for i in range(32)]) == 32
                dumps[order] = writer.store.dump(COLLECTION)
            finally:
                writer.close()
            computed.append(-1)  # the end of this order's passes
    finally:
        hook.remove()
    end = computed.index(-1)
    in_task_order, longest = sum(computed[:end]), sum(computed[end + 1 : -1])
    assert longest < 0.75 * in_task_order
    for id_, record in dumps["task"].items():
        np.testing.assert_allclose(dumps["longest"][id_]["embedding"], record["embedding"], atol=1e-5)


def _cuda() -> bool:
    if no_gpu_here():
        return False  # known without importing torch
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_micro_batch_queued_on_the_gpu_gives_the_vectors_embed_gives(precision: str) -> None:
    from pipeline.embedder import load_embedder

    embedder = load_embedder("all-MiniLM-L6-v2", "cuda", precision)
    assert embedder.launches and not embedder.cpu_bound
    texts = [f"chunk {i}: " + "resume the bulk index where it stopped " * (i % 9 + 1) for i in range(300)]
    wait = embedder.start(texts)
    np.testing.assert_allclose(wait(), embedder.embed(texts), atol=2e-3 if precision == "fp16" else 1e-5)


def test_only_the_writers_checkpoint_skips_its_fsync(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    seen: list[str] = []
    ledger.conn.set_trace_callback(seen.append)
    job = ledger.jobs.create(COLLECTION, "records", ["test"])
    item = {"id": "a", "source": "s", "ordinal": 0, "text": "t", "metadata": "{}", "hash": "h", "state": "pending",
            "embedding": None, "model": None}  # fmt: skip
    ledger.sources.write(job, COLLECTION, [item], ["a"], [])
    ledger.begin_embedding(COLLECTION, ["a"])
    ledger.store_embeddings(COLLECTION, [("a", "h", np.ones(4, dtype=np.float32).tobytes())], "m")
    producer_writes = list(seen)
    del seen[:]
    ledger.checkpoint(COLLECTION, [("a", "h", None)])
    # A producer's rows, the count of an embedding attempt (invariant 4's evidence must
    # survive a power loss) and the stored embeddings commit under FULL; the checkpoint under
    # NORMAL, and the connection is FULL again right after it.
    assert not any("synchronous" in s for s in producer_writes)
    assert seen[0] == "PRAGMA synchronous=NORMAL" and seen[-1] == "PRAGMA synchronous=FULL"
    assert ledger.conn.execute("PRAGMA synchronous").fetchone()[0] == FULL
    # A backup's sync is a durable write that carries the checkpoint to disk with it.
    del seen[:]
    ledger.sync()
    assert not any("synchronous" in s for s in seen) and "COMMIT" in seen
    ledger.close()
    other = Ledger(path)
    assert other.conn.execute("PRAGMA synchronous").fetchone()[0] == FULL
    assert other.ids_by_state(COLLECTION) == {"a": "committed"}
    other.close()


def test_the_model_can_be_called_from_two_threads_at_once() -> None:
    from pipeline.embedder import load_embedder

    embedder = load_embedder("all-MiniLM-L6-v2", "cpu")
    texts = [[f"thread {t} text {i} about resuming a bulk index" for i in range(16)] for t in range(2)]
    alone = [embedder.embed(batch) for batch in texts]
    together: list[np.ndarray] = [np.empty(0), np.empty(0)]

    def run(n: int) -> None:
        together[n] = embedder.embed(texts[n])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_cpu_micro_batch_goes_through_the_model_a_few_texts_at_a_time() -> None:
    """Each forward pass's largest tensor stays under glibc's mmap ceiling on a CPU, so that
    its memory is reused instead of faulted in afresh; the vectors are those of one pass."""
    from pipeline.embedder import _CPU_FORWARD_BYTES, load_embedder

    embedder = load_embedder("all-MiniLM-L6-v2", "cpu")
    model = embedder._model  # type: ignore[attr-defined]
    config = model[0].auto_model.config
    widest = embedder.forward_batch * model.max_seq_length * config.intermediate_size * 4  # type: ignore[attr-defined]
    assert embedder.forward_batch == 8 and widest <= _CPU_FORWARD_BYTES  # type: ignore[attr-defined]
    assert embedder.cpu_bound  # so the writer takes turns between the model and the commits
    texts = [f"chunk {i}: " + "resume the bulk index where it stopped " * (i % 7 + 1) for i in range(32)]
    passes: list[int] = []
    hook = model[0].register_forward_hook(lambda _m, args, _out: passes.append(len(args[0]["input_ids"])))
    try:
        vectors = embedder.embed(texts)
    finally:
        hook.remove()
    assert passes == [8, 8, 8, 8]
    whole = model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(vectors, whole, atol=1e-5)


def test_a_pass_that_runs_out_of_device_memory_is_halved_until_it_fits(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU takes a micro-batch in one pass; where that pass runs out of the device's memory
    (torch's OutOfMemoryError, raised here for passes of over 4 texts by a hook on the real
    model), the embedder releases torch's cache, halves its passes for this and later
    micro-batches, and the vectors are those of one pass, on the GPU path's tensors too. One
    text that does not fit is a clear error that leaves the pass size as it was, and any
    other error is raised as it is."""
    import torch

    from pipeline.embedder import EmbeddingMemoryError, load_embedder

    embedder = load_embedder("all-MiniLM-L6-v2", "cpu")
    embedder.forward_batch = None  # type: ignore[attr-defined]  # as on a GPU: the whole micro-batch at once
    released: list[str] = []
    monkeypatch.setattr(embedder_module, "_release_cached_memory", released.append)
    model = embedder._model  # type: ignore[attr-defined]
    texts = [f"chunk {i}: " + "resume the bulk index where it stopped " * (i % 5 + 1) for i in range(16)]
    whole = model.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=True)
    fits, passes = [4], []

    def device(_module: object, args: tuple[dict[str, torch.Tensor]]) -> None:
        texts_in_pass = len(args[0]["input_ids"])
        if texts_in_pass > fits[0]:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {texts_in_pass} texts")
        passes.append(texts_in_pass)

    hook = model[0].register_forward_pre_hook(device)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.embedder"):
            vectors = embedder.embed(texts)
        assert passes == [4, 4, 4, 4] and embedder.forward_batch == 4  # type: ignore[attr-defined]
        assert released == ["cpu", "cpu"]  # once per refused pass
        np.testing.assert_allclose(vectors, whole, atol=1e-5)
        said = [r.getMessage() for r in caplog.records]
        assert said == [
            "cpu ran out of memory embedding 16 texts at once: 8 at a time from now on"
            " (a smaller --micro-batch avoids the retry)",
            "cpu ran out of memory embedding 8 texts at once: 4 at a time from now on"
            " (a smaller --micro-batch avoids the retry)",
        ]
        del passes[:]
        embedder.embed(texts[:6])  # the next micro-batch starts at the size that fitted
        assert passes == [4, 2] and len(caplog.records) == 2
        # The GPU path (start on CUDA) asks for one tensor of the micro-batch's vectors, in order.
        fits[0], passes[:] = 2, []
        with embedder._lock:  # type: ignore[attr-defined]
            tensor = embedder._encode(texts, convert_to_tensor=True)  # type: ignore[attr-defined]
        assert isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (16, embedder.dimension)
        assert passes == [2] * 8 and embedder.forward_batch == 2  # type: ignore[attr-defined]
        np.testing.assert_allclose(tensor.numpy(), whole, atol=1e-5)
        # No room for one text: a device that is full, not a pass too large.
        fits[0] = 0
        with pytest.raises(EmbeddingMemoryError, match="cpu ran out of memory embedding one text with all-MiniLM"):
            embedder.embed(texts[:3])
        assert embedder.forward_batch == 2  # type: ignore[attr-defined]
    finally:
        hook.remove()

    def broken_model(_module: object, _args: object) -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    broken = model[0].register_forward_pre_hook(broken_model)
    released.clear()
    try:
        with pytest.raises(RuntimeError, match="device-side assert"):
            embedder.embed(texts[:4])
        assert embedder.forward_batch == 2 and released == []  # type: ignore[attr-defined]
    finally:
        broken.remove()


def test_which_errors_are_the_device_out_of_memory() -> None:
    import torch

    from pipeline.embedder import _out_of_memory

    assert _out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _out_of_memory(torch.cuda.OutOfMemoryError("HIP out of memory"))
    assert _out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1 MB)"))
    assert _out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later"))
    assert _out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not _out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert not _out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _out_of_memory(MemoryError())


def test_a_search_in_bf16_falls_back_to_fp32_where_the_cpu_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no writer to ask, `search` loads the model for its query: in bf16 when that is
    the setting and this CPU computes it, else in fp32 (a query's vector is as good)."""
    from pipeline.api import _query_embedder

    config = Config(model="all-MiniLM-L6-v2", device="cpu", precision="bf16", query_runtime="torch")
    monkeypatch.setattr(embedder_module, "cpu_has_bf16", lambda: False)
    assert _query_embedder(config, "bf16").precision == "fp32"
    monkeypatch.setattr(embedder_module, "cpu_has_bf16", lambda: True)
    assert _query_embedder(config, "bf16").precision == "bf16"


@pytest.mark.e2e
def test_a_bf16_writer_embeds_and_answers_queries_in_bf16(tmp_path: Path, procs: list[Proc]) -> None:
    """`indexq worker --precision bf16` on a CPU: where the CPU has bf16 instructions it runs
    the model in bf16 (16 texts per forward pass, half the bytes) and answers bf16 queries
    with vectors within 0.9998 in cosine of fp32's; where it has not, it refuses in one line."""
    home = tmp_path / "home"
    if not cpu_has_bf16():
        result = run_cli(home, "worker", "--precision", "bf16", "--device", "cpu", INDEXQ_MODEL="all-MiniLM-L6-v2")
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            "Error: precision 'bf16' was asked for (--precision, INDEXQ_PRECISION), but this CPU has no bf16"
        )
        assert "Traceback" not in result.stderr
        return
    from pipeline.embedder import load_embedder

    writer = start_worker(
        procs, home, str(BIN / "indexq"), "worker", "--precision", "bf16", "--device", "cpu",
        INDEXQ_MODEL="all-MiniLM-L6-v2",
    )  # fmt: skip
    writer.wait_started(timeout=600)
    assert "loaded on cpu (bf16, 16 texts at most per forward pass)" in writer.output()
    shown = run_cli(home, "status")
    assert shown.returncode == 0, shown.stderr
    assert "settings:    model all-MiniLM-L6-v2 on cpu in bf16, memory threshold" in shown.stdout
    texts = ["resume a bulk index where it stopped after a crash", "def upsert(ids, embeddings): ..."]
    fp32 = load_embedder("all-MiniLM-L6-v2", "cpu").embed(texts)
    for text, reference in zip(texts, fp32, strict=True):
        vector = ask(home / "query.sock", text, "all-MiniLM-L6-v2", "cpu", "bf16")
        assert vector is not None and vector.dtype == np.float32
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
        assert 0.9998 < float(vector @ reference) < 1 - 1e-7  # close to fp32, and not fp32
    assert ask(home / "query.sock", texts[0], "all-MiniLM-L6-v2", "cpu", "fp32") is None  # another precision


class _BackToBack:
    """A writer's commits in a thread: the commit lock held 2 ms, retaken at once."""

    def __init__(self, path: Path) -> None:
        self.lock, self.commits, self.stop = CommitLock(path), 0, threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        deadline = time.monotonic() + 10
        while self.commits < 10:
            assert time.monotonic() < deadline, "the committing thread did not start"
            time.sleep(0.01)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock.held():
                time.sleep(0.002)
                self.commits += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.lock.close()


def test_a_waiter_gets_the_commit_lock_from_a_writer_that_retakes_it_at_once(tmp_path: Path) -> None:
    writer = _BackToBack(tmp_path / "commit.lock")
    waiter = CommitLock(tmp_path / "commit.lock")
    try:
        for _ in range(5):
            with waiter.held(timeout=0.5):  # polling alone never got in (BusyError)
                during = writer.commits
                time.sleep(0.05)
                assert writer.commits == during  # the writer waits while the lock is held
            deadline = time.monotonic() + 5
            while writer.commits == during:  # and goes on after
                assert time.monotonic() < deadline, "the writer did not go on"
                time.sleep(0.005)
    finally:
        writer.close()
        waiter.close()


def test_overlapping_waiters_cannot_hold_the_writer_back_for_good(tmp_path: Path) -> None:
    writer = _BackToBack(tmp_path / "commit.lock")
    stop = threading.Event()

    def wait_again_and_again() -> None:
        # Two of these keep a claim on commit.wait at every instant.
        lock = CommitLock(tmp_path / "commit.lock")
        while not stop.is_set():
            with contextlib.suppress(BusyError), lock.held(timeout=0.3):
                time.sleep(0.01)
        lock.close()

    waiters = [threading.Thread(target=wait_again_and_again) for _ in range(2)]
    try:
        for thread in waiters:
            thread.start()
        before = writer.commits
        time.sleep(4.0)  # the writer gives way for GIVE_WAY_SECONDS at most before each commit
        assert GIVE_WAY_SECONDS <= 1.5 and writer.commits >= before + 2
    finally:
        stop.set()
        for thread in waiters:
            thread.join()
        writer.close()
