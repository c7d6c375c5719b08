"""The maintenance consumer's tasks: a periodic tick that runs whatever is due."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from huey import crontab

if TYPE_CHECKING:
    from workers.maintenance import MaintenanceHuey

logger = logging.getLogger(__name__)


def register(huey: MaintenanceHuey) -> Any:
    @huey.periodic_task(crontab(minute="*"))
    def maintain() -> list[str]:
        from ops.maintenance import tick

        ran = tick(huey.config)
        if ran:
            logger.info("maintenance ran: %s", ", ".join(ran))
        return ran

    return maintain
