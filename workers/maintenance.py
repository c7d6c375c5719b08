"""``huey_consumer workers.maintenance.huey``: backups, checks, recovery and requeue.

A separate consumer from the writer's, on its own queue (``maintenance.db``); one per
data home (``maintenance.lock``). It pauses the writer only through the commit lock.
At start it runs a tick at once, so that a missed backup is caught up.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from huey import SqliteHuey

from pipeline.backoff import StorageWatch
from pipeline.config import Config
from pipeline.errors import IndexqError, storage_errors
from pipeline.locks import ProcessLock
from pipeline.metrics import MetricsServer
from pipeline.metrics import serve as serve_metrics
from pipeline.queue import HomeHuey, queue_secret
from pipeline.serializer import JsonSerializer
from tasks.maintenance import register
from workers.consumer import GracefulConsumer, exit_with, lazy_huey, log_to_home, one_thread_worker

logger = logging.getLogger(__name__)


class MaintenanceHuey(HomeHuey, SqliteHuey):
    metrics: MetricsServer | None = None  # served while this consumer runs (INDEXQ_METRICS_PORT)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.storage_watch = StorageWatch("maintenance")
        self.stop_flag: threading.Event | None = None
        with storage_errors(f"cannot open the maintenance queue of the data home {config.home}", config.home):
            config.ensure_home()
            self._lock = ProcessLock(config.maintenance_lock_path, role="maintenance consumer")
            super().__init__(
                name="indexq-maintenance",
                filename=str(config.maintenance_queue_path),
                results=False,
                serializer=JsonSerializer(queue_secret(config), salt="indexq-maintenance"),
            )
            os.chmod(config.maintenance_queue_path, 0o600)
        self.maintain = register(self, config, self.storage_watch, lambda: self.stop_flag)

    def start_maintenance(self, **options: Any) -> GracefulConsumer:
        with storage_errors(f"the maintenance consumer cannot start on {self.config.home}", self.config.home):
            return self._start_maintenance(**options)

    def _start_maintenance(self, **options: Any) -> GracefulConsumer:
        one_thread_worker(
            "maintenance consumer", "workers.maintenance.huey", options, "its backups, checks and recovery"
        )
        self._lock.acquire()
        try:
            log_to_home(self.config, "maintenance.log")
            consumer = GracefulConsumer(self, **options)
            self.stop_flag = consumer.stop_flag
            self.flush()
            self.maintain()  # catch up now rather than at the next minute
            self.metrics = serve_metrics(self.config, "maintenance")
            logger.info("maintenance consumer pid %d started on %s", os.getpid(), self.config.home)
        except BaseException:
            self._lock.release()
            raise
        return consumer

    def create_consumer(self, **options: Any) -> GracefulConsumer:
        try:
            return self.start_maintenance(**options)
        except IndexqError as exc:
            raise exit_with(exc) from None

    def stop_maintenance(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._lock.release()


__getattr__ = lazy_huey(MaintenanceHuey)
