"""The maintenance consumer's tasks: a periodic tick that runs whatever is due."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from huey import Huey, crontab

from ops.maintenance import tick
from pipeline.backoff import StorageWatch
from pipeline.config import Config
from pipeline.errors import from_chroma, storage_error

logger = logging.getLogger(__name__)


def register(huey: Huey, config: Config, watch: StorageWatch, stop_flag: Callable[[], threading.Event | None]) -> Any:
    """The tick, every minute; ``stop_flag()`` is the running consumer's stop event."""

    @huey.periodic_task(crontab(minute="*"))
    def maintain() -> list[str]:
        try:
            ran = tick(config)
        except Exception as exc:
            # A disk that cannot be read or written is not damage: say so once (the
            # watch logs when it starts and when it ends) and try again next minute.
            where = config.chroma_dir if config.chroma_engine == "persistent" else config.home
            error = storage_error(exc, f"maintenance cannot use the data home {config.home}", where, unexplained=True)
            if error is None:
                raise
            stop = stop_flag()
            if from_chroma(exc) and stop is not None:
                # A recovery's replay met the full disk in this process's Chroma.
                watch.restart_when_room(error, stop, where)
            else:
                watch.failed(error)
            return ["cannot use the data home"]
        if ran:
            watch.ok()  # something ran and was recorded: the home takes writes
            logger.info("maintenance ran: %s", ", ".join(ran))
        return ran

    return maintain
