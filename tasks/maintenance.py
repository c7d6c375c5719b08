"""The maintenance consumer's tasks: a periodic tick that runs whatever is due."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from huey import crontab

from pipeline.errors import from_chroma, storage_error

if TYPE_CHECKING:
    from workers.maintenance import MaintenanceHuey

logger = logging.getLogger(__name__)


def register(huey: MaintenanceHuey) -> Any:
    @huey.periodic_task(crontab(minute="*"))
    def maintain() -> list[str]:
        from ops.maintenance import tick

        config = huey.config
        try:
            ran = tick(config)
        except Exception as exc:
            # A disk that cannot be read or written is not damage: say so once (the
            # watch logs when it starts and when it ends) and try again next minute.
            where = config.chroma_dir if config.chroma_engine == "persistent" else config.home
            error = storage_error(exc, f"maintenance cannot use the data home {config.home}", where, unexplained=True)
            if error is None:
                raise
            if from_chroma(exc) and huey.stop_flag is not None:
                # A recovery's replay met the full disk in this process's Chroma.
                huey.storage_watch.restart_when_room(error, huey.stop_flag, where)
            else:
                huey.storage_watch.failed(error)
            return ["cannot use the data home"]
        if ran:
            huey.storage_watch.ok()  # something ran and was recorded: the home takes writes
            logger.info("maintenance ran: %s", ", ".join(ran))
        return ran

    return maintain
