"""Named pauses for crash tests: ``INDEXQ_FAULT_PAUSE=backup-copied:3`` sleeps 3 s there.

Tests use them to SIGKILL an operation at a known point in its middle. Unset (always,
outside tests), a fault point costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)


def fault_point(name: str) -> None:
    spec = os.environ.get("INDEXQ_FAULT_PAUSE", "")
    for item in spec.split(","):
        point, _, seconds = item.partition(":")
        if point.strip() == name:
            logger.warning("fault point %s: pausing %ss", name, seconds)
            time.sleep(float(seconds or 1))
