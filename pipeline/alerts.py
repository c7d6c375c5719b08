"""Critical events: a line in logs/alerts.log and an event in the ledger."""

from __future__ import annotations

import logging
import os
import time

from pipeline.config import Config
from pipeline.ledger import Ledger

logger = logging.getLogger(__name__)


def raise_alert(config: Config, ledger: Ledger, message: str) -> None:
    message = " ".join(message.split())  # one line in alerts.log, whatever SQLite's message holds
    logger.critical(message)
    config.logs_path.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} CRITICAL {message}\n"
    fd = os.open(config.alerts_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    ledger.events.add("alert", False, message)
