from __future__ import annotations

import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from pipeline.config import DEFAULT_MICRO_BATCH, Config, parse_duration, parse_flag, private_umask
from pipeline.errors import ConfigError
from tests.conftest import run_cli


def test_defaults_and_layout(tmp_path: Path) -> None:
    config = Config.from_env({}, home=tmp_path)
    assert config.home == tmp_path
    assert config.chroma_dir == tmp_path / "chroma"
    assert config.queue_path == tmp_path / "queue.db"
    assert config.ledger_path == tmp_path / "ledger.db"
    assert config.memory_threshold == 80.0
    assert config.commit_batch == 10
    assert config.micro_batch is None  # per device: micro_batch_for
    assert config.micro_batch_for("cpu") == DEFAULT_MICRO_BATCH


def test_indexq_variables(tmp_path: Path) -> None:
    env = {
        "INDEXQ_HOME": str(tmp_path), "INDEXQ_MODEL": "hash:8", "INDEXQ_MEMORY_THRESHOLD": "70",
        "INDEXQ_COMMIT_BATCH": "5", "INDEXQ_MICRO_BATCH": "8", "INDEXQ_CHUNK_TOKENS": "100",
        "INDEXQ_CHUNK_OVERLAP": "10",
    }  # fmt: skip
    config = Config.from_env(env)
    assert (config.home, config.model, config.memory_threshold) == (tmp_path, "hash:8", 70.0)
    assert (config.commit_batch, config.micro_batch, config.chunk_tokens, config.chunk_overlap) == (5, 8, 100, 10)


def test_legacy_chromadb_variables(tmp_path: Path) -> None:
    env = {
        "INDEXQ_HOME": str(tmp_path / "home"), "CHROMADB_DB_PATH": str(tmp_path / "vectors"),
        "CHROMADB_MEMORY_THRESHOLD": "0.9", "CHROMADB_BACKUP_INTERVAL": "6h",
    }  # fmt: skip
    config = Config.from_env(env)
    assert config.chroma_dir == tmp_path / "vectors"
    assert config.memory_threshold == pytest.approx(90.0)
    assert config.backup_interval == 6 * 3600


def test_indexq_variable_wins_over_legacy_and_overrides_win_over_env(tmp_path: Path) -> None:
    env = {"INDEXQ_MEMORY_THRESHOLD": "60", "CHROMADB_MEMORY_THRESHOLD": "0.9", "INDEXQ_MICRO_BATCH": "4"}
    config = Config.from_env(env, home=tmp_path, micro_batch=12)
    assert config.memory_threshold == 60.0
    assert config.micro_batch == 12


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INDEXQ_COMMIT_BATCH": "11"}, "commit batch size must be between 1 and 10, got 11"),
        ({"INDEXQ_COMMIT_BATCH": "ten"}, "INDEXQ_COMMIT_BATCH must be an integer, got 'ten'"),
        ({"INDEXQ_MEMORY_THRESHOLD": "120"}, "memory threshold must be a percentage in (0, 100], got 120.0"),
        ({"INDEXQ_MICRO_BATCH": "0"}, "micro-batch size must be at least 1, got 0"),
        ({"CHROMADB_BACKUP_INTERVAL": "daily"}, "CHROMADB_BACKUP_INTERVAL must be a duration such as 3600, 15m or 24h"),
        ({"INDEXQ_CHUNK_TOKENS": "64", "INDEXQ_CHUNK_OVERLAP": "40"}, "chunk overlap must be >= 0 and under half"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env, home=tmp_path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("variable", "field"), [("INDEXQ_AUTO_RECOVER", "auto_recover"), ("INDEXQ_FULL_TEXT", "full_text")]
)
def test_true_false_variables_share_one_parser(tmp_path: Path, variable: str, field: str) -> None:
    cases = [(raw, True) for raw in ("1", "On", "yes", "TRUE", "t", "Y")]
    cases += [(raw, False) for raw in ("0", "off", "No", "false", "f", "n")]  # as click reads them
    for raw, value in cases:
        assert getattr(Config.from_env({variable: raw}, home=tmp_path), field) is value
        assert parse_flag(variable, raw) is value
    with pytest.raises(ConfigError) as info:
        Config.from_env({variable: "maybe"}, home=tmp_path)
    assert str(info.value) == f"{variable} must be true or false, got 'maybe'"


def test_parse_duration() -> None:
    assert parse_duration("x", "90") == 90
    assert parse_duration("x", "15m") == 900
    assert parse_duration("x", "7d") == 7 * 86400
    with pytest.raises(ConfigError):
        parse_duration("x", "0")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:pw123@chroma.internal:8000", "http://u:***@chroma.internal:8000"),
        ("https://:pw123@10.0.0.6:8443", "https://:***@10.0.0.6:8443"),
        ("redis://indexq:hunter2@10.0.0.5:6379/2", "redis://indexq:***@10.0.0.5:6379/2"),
        ("http://10.0.0.6:8000", "http://10.0.0.6:8000"),
        ("http://u@10.0.0.6:8000", "http://u@10.0.0.6:8000"),
        ("http://u:pw@host:port", "http://u:***@host:port"),
        ("redis://u:p@ss@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://user:pa/ss@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pa?ss@host:6379/0", "redis://:***@host:6379/0"),
        ("sqlite:////var/a:b@c/queue.db", "sqlite:////var/a:b@c/queue.db"),
        (None, ""),
    ],
)
def test_redact_url_hides_any_password(url: str | None, shown: str) -> None:
    from pipeline.config import redact_url

    assert redact_url(url) == shown


def test_queue_and_chroma_urls_are_shown_through_the_one_helper(tmp_path: Path) -> None:
    config = Config(
        home=tmp_path, queue_url="redis://q:s3cret@10.0.0.5:6379/0", chroma_url="http://c:pw123@10.0.0.6:8000"
    )
    assert config.queue_shown == "redis://q:***@10.0.0.5:6379/0"
    assert config.chroma_shown == "http://c:***@10.0.0.6:8000"
    assert Config(home=tmp_path).chroma_shown == str(tmp_path / "chroma")


@pytest.mark.parametrize(
    ("tokens", "overlap", "message"),
    [
        (255, 32, "chunk size (--chunk-tokens, INDEXQ_CHUNK_TOKENS) must be at most 254, the limit of model 'hash:8'"),
        (None, 300, "chunk overlap (--chunk-overlap, INDEXQ_CHUNK_OVERLAP) must be >= 0 and under half"),
        (None, 300, "under half the chunk size of 254 tokens, got 300"),
        (None, 127, "under half the chunk size of 254 tokens, got 127"),
        (64, 32, "under half the chunk size of 64 tokens, got 32"),
        (None, -1, "got -1"),
    ],
)
def test_chunk_settings_the_model_cannot_take_are_errors_not_clamps(
    tokens: int | None, overlap: int, message: str
) -> None:
    from pipeline.chunking import chunk_budget, chunk_text
    from pipeline.embedder import load_tokenizer

    tokenizer = load_tokenizer("hash:8")
    with pytest.raises(ConfigError) as info:
        chunk_budget(tokenizer, tokens, overlap)
    assert message in str(info.value)
    with pytest.raises(ConfigError):
        chunk_text("some text\n", tokenizer, tokens, overlap)


def test_chunk_budget_accepts_what_the_model_can_take() -> None:
    from pipeline.chunking import chunk_budget
    from pipeline.embedder import load_tokenizer

    tokenizer = load_tokenizer("hash:8")
    assert chunk_budget(tokenizer, None, 126) == 254
    assert chunk_budget(tokenizer, 254, 0) == 254
    assert chunk_budget(tokenizer, 64, 31) == 64


def test_ensure_home_makes_an_open_home_private_once(tmp_path: Path) -> None:
    import stat

    home = tmp_path / "home"
    (home / "chroma" / "seg").mkdir(parents=True)
    (home / "chroma" / "seg" / "header.bin").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    outside.chmod(0o755)
    (home / "elsewhere").symlink_to(outside)
    for path, mode in ((home, 0o755), (home / "chroma", 0o755), (home / "chroma" / "seg", 0o750)):
        path.chmod(mode)
    (home / "chroma" / "seg" / "header.bin").chmod(0o644)
    Config(home=home).ensure_home()
    for path, mode in (
        (home, 0o700), (home / "chroma", 0o700), (home / "chroma" / "seg", 0o700),
        (home / "chroma" / "seg" / "header.bin", 0o600), (home / "logs", 0o700),
    ):  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    # A link is not followed: what it points at is not the home's.
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755


def test_the_device_setting_is_checked_and_read_from_the_environment() -> None:
    assert Config().device == "auto"
    assert Config(device="cuda:1").device == "cuda:1"
    assert Config.from_env({"INDEXQ_DEVICE": "cpu"}).device == "cpu"
    with pytest.raises(ConfigError, match=r"device must be one of auto, cpu, cuda, mps or cuda:N, got 'gpu'"):
        Config(device="gpu")


def test_no_gpu_is_told_without_torch_only_where_torch_would_see_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    import torch

    from pipeline import embedder

    if embedder.no_gpu_here():
        assert not torch.cuda.is_available() and embedder.pick_device("auto") == "cpu"
    loaded: list[str] = []

    def cdll(name: str) -> object:
        loaded.append(name)
        if name == "libcuda.so.1":
            return object()  # a CUDA driver is installed
        raise OSError(name)

    def no_driver(name: str) -> object:
        raise OSError(name)

    linux_without_rocm = sys.platform == "linux" and not Path("/dev/kfd").exists()
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert not embedder.no_gpu_here()
    assert loaded == (["libcuda.so.1"] if linux_without_rocm else [])
    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert embedder.no_gpu_here() == linux_without_rocm
    monkeypatch.setattr(sys, "platform", "darwin")  # MPS is torch's to tell
    assert not embedder.no_gpu_here()


def test_auto_picks_the_cpu_without_a_gpu_and_a_missing_gpu_is_an_error() -> None:
    import torch

    from pipeline.embedder import pick_device

    assert pick_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert pick_device("auto") == "cuda"
        return
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    assert pick_device("auto") == ("mps" if mps else "cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        pick_device("cuda")


def test_overlapping_private_umask_blocks_give_the_host_its_umask_back() -> None:
    """Two API calls in two threads, the first to enter leaving first: the host's umask
    is 022 again once both have left (not the 077 the second one found)."""
    entered, first_left = threading.Event(), threading.Event()

    def first() -> None:
        with private_umask():
            entered.set()
            assert second_in.wait(10)
        first_left.set()

    second_in = threading.Event()

    def second() -> None:
        assert entered.wait(10)
        with private_umask():
            second_in.set()
            assert first_left.wait(10)
            assert _umask() == 0o077  # still private while a block is open

    host = os.umask(0o022)
    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert _umask() == 0o022
        with private_umask(), private_umask():  # nested in one thread
            assert _umask() == 0o077
        assert _umask() == 0o022
    finally:
        os.umask(host)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def test_a_bad_value_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    for name, value, said in (
        ("INDEXQ_DEVICE", "CPU", "device must be one of auto, cpu, cuda, mps or cuda:N, got 'CPU'"),
        ("INDEXQ_PRECISION", "FP32", "precision must be one of fp32, fp16, bf16, got 'FP32'"),
        ("INDEXQ_QUERY_RUNTIME", "ONNX", "query runtime must be one of onnx, onnx-int8, torch, got 'ONNX'"),
        ("INDEXQ_COMMIT_BATCH", "0", "commit batch size must be between 1 and 10, got 0"),
        ("INDEXQ_LOCK_TIMEOUT", "nan", "lock timeout must be a positive number of seconds, got nan"),
        ("INDEXQ_LOCK_TIMEOUT", "inf", "lock timeout must be a positive number of seconds, got inf"),
    ):
        with pytest.raises(ConfigError) as caught:
            Config.from_env({name: value}, home=tmp_path)
        assert str(caught.value) == f"{name}: {said}"
        assert caught.value.hint == f"set {name} right, or unset it"
    # A value given in its place wins, as a flag does; one given wrong is named as given.
    assert Config.from_env({"INDEXQ_DEVICE": "CPU"}, home=tmp_path, device="cpu").device == "cpu"
    with pytest.raises(ConfigError, match=r"^lock timeout must"):
        Config.from_env({}, home=tmp_path, lock_timeout=float("nan"))
    # From the command line: a flag's variable (click reads it) named the same way.
    never = tmp_path / "never-made"
    for argv, extra, said in (
        (["search", "kitten", "-c", "docs"], {"INDEXQ_DEVICE": "CPU"},
         "Error: Invalid value for INDEXQ_DEVICE (from the environment): must be one of auto, cpu, cuda, mps or"
         " cuda:N, got 'CPU'"),
        (["worker"], {"INDEXQ_COMMIT_BATCH": "0"},
         "Error: INDEXQ_COMMIT_BATCH: commit batch size must be between 1 and 10, got 0"),
        (["worker"], {"INDEXQ_METRICS_PORT": "\u00b2"},
         "Error: INDEXQ_METRICS_PORT must be a port (1-65535) or ADDRESS:PORT, got '\u00b2'"),
        (["status", "--jobs", "-5"], {}, "Error: Invalid value for '--jobs': -5 is not in the range 0<=x<=10000."),
        (["status", "--watch", "--interval", "nan"], {}, "Error: Invalid value for '--interval': is not a number"),
        (["status", "--home", " "], {},
         "Error: Invalid value for '--home': is empty (it would make the current folder the data home); name a folder"),
    ):  # fmt: skip
        result = run_cli(never, *argv, INDEXQ_MODEL="hash:384", **extra)
        assert (result.returncode, result.stderr.splitlines()[0]) == (2, said), result.stderr
        assert len(result.stderr.splitlines()) == 2 and result.stderr.splitlines()[1].startswith("Hint: ")
    assert not never.exists()


def test_status_of_a_home_that_is_not_there_says_so_and_makes_nothing(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "typo", "status")
    assert (result.returncode, result.stderr.splitlines()) == (
        1, [f"Error: no indexq data home at {tmp_path / 'typo'}", "Hint: set --home or INDEXQ_HOME"]
    )  # fmt: skip
    assert not (tmp_path / "typo").exists()


def test_a_home_path_that_cannot_be_a_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    for home, chroma in ((tmp_path / "a-file" / "sub", None), (tmp_path / "h", tmp_path / "a-file")):
        with pytest.raises(ConfigError, match=r"^cannot make the folder .*a-file.*: \[Errno (20|17)\]"):
            Config(home=home, chroma_path=chroma).ensure_home()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError, match=r"^cannot make the folder .*loop: \[Errno 17\] File exists"):
        Config(home=tmp_path / "loop").ensure_home()
    result = run_cli(tmp_path / "a-file" / "sub", "resume")
    assert result.returncode == 2 and result.stderr.startswith("Error: cannot make the folder "), result.stderr
    assert "Traceback" not in result.stderr


def test_a_home_through_a_symlink_is_made_and_made_private(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "link").symlink_to(tmp_path / "open")
    (tmp_path / "dangling").symlink_to(tmp_path / "not-yet")
    Config(home=tmp_path / "link").ensure_home()
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700
    Config(home=tmp_path / "dangling").ensure_home()  # the link's folder is made
    assert (tmp_path / "not-yet" / "chroma").is_dir()
    assert stat.S_IMODE((tmp_path / "not-yet").stat().st_mode) == 0o700


def test_a_home_given_through_a_link_is_resolved_once_so_a_process_keeps_its_folders(tmp_path: Path) -> None:
    # A writer started through LINK -> A, LINK then turned to B, reopened LINK/chroma when B's
    # restore generation differed from A's, and committed A's ledger into B's Chroma.
    first, second, link = tmp_path / "a", tmp_path / "b", tmp_path / "link"
    first.mkdir()
    second.mkdir()
    link.symlink_to(first)
    config = Config(home=link, chroma_path=link / "chroma")
    (tmp_path / "turned").symlink_to(second)
    os.replace(tmp_path / "turned", link)  # as `mv -T` swaps a link, atomically
    assert config.home == first and config.chroma_dir == first / "chroma"
    assert config.generation_path.parent == first and config.ledger_path.parent == first
    assert Config(home=link).home == second


def test_a_url_refused_is_shown_without_its_password() -> None:
    from pipeline.config import parse_chroma_url, parse_queue_url

    for parse, url in (
        (parse_queue_url, "redis://user:SECRETPW@127.0.0.1:99999/0"),
        (parse_queue_url, "redis://user:SECRETPW@127.0.0.1:6379/abc"),
        (parse_queue_url, "http://user:SECRETPW@127.0.0.1:6379/0"),
        (parse_chroma_url, "http://u:SECRETPW@127.0.0.1"),
        (parse_chroma_url, "http://u:SECRETPW@127.0.0.1:8000/path"),
        (parse_chroma_url, "http://u:SECRETPW@127.0.0.1:port"),
    ):
        with pytest.raises(ConfigError) as refused:
            parse("the URL", url)
        assert "SECRETPW" not in str(refused.value) and ":***@127.0.0.1" in str(refused.value), refused.value


def test_a_flag_wins_over_its_variable_even_one_that_does_not_parse() -> None:
    env = {
        "INDEXQ_CHUNK_OVERLAP": "abc", "INDEXQ_CHUNK_TOKENS": "abc", "INDEXQ_QUEUE_URL": "http://bad",
        "INDEXQ_CHROMA_URL": "ftp://bad", "INDEXQ_METRICS_PORT": "junk", "INDEXQ_RETENTION": "soon",
        "INDEXQ_AUTO_RECOVER": "maybe", "INDEXQ_HOME": "/nowhere",
    }  # fmt: skip
    config = Config.from_env(
        env, chunk_overlap=10, chunk_tokens=100, queue_url="redis://127.0.0.1:6379/0",
        chroma_url="http://127.0.0.1:8000", metrics_port=9479, retention=3600.0, auto_recover=False, home="/h",
    )  # fmt: skip
    assert (config.chunk_overlap, config.chunk_tokens, config.metrics_port, config.retention) == (10, 100, 9479, 3600)
    assert config.queue_url == "redis://127.0.0.1:6379/0" and config.chroma_url == "http://127.0.0.1:8000"
    assert config.auto_recover is False and config.home == Path("/h")
    with pytest.raises(ConfigError, match="INDEXQ_CHUNK_OVERLAP must be an integer, got 'abc'"):
        Config.from_env({"INDEXQ_CHUNK_OVERLAP": "abc"})  # without the flag, the variable is read and refused
