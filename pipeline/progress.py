"""Job progress for producers on other machines, published in the shared queue.

A producer that handed its job over through a shared (Redis) queue has no ledger to
read; the writer publishes each job's progress as ``indexq.job.JOB`` (see
``pipeline.intake``). The writer's tasks only mark jobs as touched; this thread, with
its own ledger connection, counts and publishes each at most every ``INTERVAL``
seconds, longer for a big job (counting a job costs a look at every chunk it has:
``jobs.poll_interval``), and every unfinished
job again every ``REFRESH`` seconds and at start, so that a publication lost to a
kill or a Redis hiccup is made good without any task touching the job again.
"""

from __future__ import annotations

import logging
import threading
import time

from pipeline.config import Config
from pipeline.errors import first_line
from pipeline.intake import Intake
from pipeline.jobs import poll_interval
from pipeline.ledger import Ledger

logger = logging.getLogger(__name__)

INTERVAL = 2.0
REFRESH = 60.0


class Publisher:
    def __init__(self, config: Config, intake: Intake) -> None:
        self.ledger = Ledger(config.ledger_path)
        self.intake = intake
        self._dirty: set[str] = set()
        self._last: dict[str, float] = {}
        self._due: dict[str, float] = {}  # seconds from the last publication to the next
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._complained = 0.0
        self._thread = threading.Thread(target=self._run, name="indexq-progress", daemon=True)

    def start(self) -> None:
        self.mark(self.ledger.jobs.unfinished())
        self._thread.start()

    def mark(self, jobs: set[str] | list[str]) -> None:
        with self._lock:
            self._dirty.update(jobs)

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(0.5):
            try:
                if time.monotonic() - refreshed >= REFRESH:
                    self.mark(self.ledger.jobs.unfinished())
                    refreshed = time.monotonic()
                self.flush()
            except Exception as exc:  # best effort: the ledger stays the truth
                self._complain(exc)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = {j for j in self._dirty if force or now - self._last.get(j, 0.0) >= self._due.get(j, INTERVAL)}
            self._dirty -= due
        for job in sorted(due):
            counting = time.perf_counter()
            progress = self.ledger.jobs.progress(job)
            self._due[job] = poll_interval(INTERVAL, time.perf_counter() - counting)
            if progress is None:
                continue
            try:
                self.intake.publish(progress.as_dict())
            except Exception as exc:
                self._complain(exc)
                self.mark([job])
                break  # the queue is away: try again at the next round
            self._last[job] = now
            if progress.state in ("done", "failed"):
                # Published as finished: no longer refreshed, nor republished by its chunks.
                self.ledger.jobs.mark_finished(job)

    def _complain(self, exc: Exception) -> None:
        # One line every half minute while the queue is away, not a traceback per round.
        if time.monotonic() - self._complained >= 30:
            self._complained = time.monotonic()
            logger.warning("could not publish job progress (will retry): %s", first_line(exc))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.flush(force=True)
        except Exception as exc:
            self._complain(exc)
        self.ledger.close()
