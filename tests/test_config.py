from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DEFAULT_MICRO_BATCH, Config, parse_duration
from pipeline.errors import ConfigError


def test_defaults_and_layout(tmp_path: Path) -> None:
    config = Config.from_env({}, home=tmp_path)
    assert config.home == tmp_path
    assert config.chroma_dir == tmp_path / "chroma"
    assert config.queue_path == tmp_path / "queue.db"
    assert config.ledger_path == tmp_path / "ledger.db"
    assert config.memory_threshold == 80.0
    assert config.commit_batch == 10
    assert config.micro_batch == DEFAULT_MICRO_BATCH


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


def test_parse_duration() -> None:
    assert parse_duration("x", "90") == 90
    assert parse_duration("x", "15m") == 900
    assert parse_duration("x", "7d") == 7 * 86400
    with pytest.raises(ConfigError):
        parse_duration("x", "0")
