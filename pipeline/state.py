"""What the running writer says about itself: its effective settings and guard state.

``indexq status`` runs in another process with its own defaults, so it cannot know the
memory threshold the writer was started with, nor that a guard holds every commit
back. The writer writes ``writer.state`` in the data home (JSON, atomically, 0600; on a
full disk over the file in its own blocks) when it starts and whenever a guard starts
or stops holding commits back: never per
commit, whose path must stay lean. A reader trusts the file only while the writer
lock is held by the process it names, so a file left by a killed writer is never
shown as live.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.config import Config
from pipeline.errors import first_line
from pipeline.fsync import write_json_atomic
from pipeline.guards import Hold

logger = logging.getLogger(__name__)


def settings(config: Config) -> dict[str, Any]:
    """The settings that change what the writer does, as it runs with them."""
    return {
        "model": config.model,
        "device": config.device,
        "memory_threshold": config.memory_threshold,
        "min_free_mb": config.min_free_mb,
        "micro_batch": config.micro_batch,
        "commit_batch": config.commit_batch,
        "queue": config.queue_shown,
        "chroma": config.chroma_shown,
    }


class WriterState:
    """The writer's side: the state file, and any other place it is published (``sinks``)."""

    def __init__(self, config: Config, sinks: list[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.path = config.writer_state_path
        self.sinks = list(sinks or [])
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "settings": settings(config),
            "guard": None,
        }

    def publish(self) -> None:
        with self._lock:
            state = {**self.state, "published": time.time()}
            try:
                write_json_atomic(self.path, state, indent=None)
            except OSError as exc:  # a full or read-only home must not stop the writer for this
                if not self._rewrite_in_place(state):
                    logger.warning("could not write %s: %s", self.path, exc)
            for sink in self.sinks:
                try:
                    sink(state)
                except Exception as exc:  # a queue away: the file is still right
                    logger.warning("could not publish the writer's state: %s", first_line(exc))

    def _rewrite_in_place(self, state: dict[str, Any]) -> bool:
        """On a full disk the atomic write (a new file, then a rename) finds no room, and
        ``indexq status`` would go on showing the state of before: "guard: clear" while the
        disk guard holds commits back. The file's own blocks still take the new state
        (padded with spaces; not atomic, a reader may miss one publication). False if it
        does not fit in them, or the file cannot be written."""
        data = json.dumps(state).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # no O_CREAT: its blocks must exist
        except OSError:
            return False
        try:
            info = os.fstat(fd)
            size = info.st_size
            if len(data) > max(size, info.st_blocks * 512):
                return False
            os.pwrite(fd, data.ljust(size), 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def guard_changed(self, hold: Hold | None) -> None:
        """ResourceGuard's ``on_change``: which guard holds commits back, or None once released."""
        self.state["guard"] = hold.as_dict() if hold is not None else None
        self.publish()


def live_state(state: dict[str, Any] | None, holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """``state`` if the process that wrote it is the one holding the writer lock (or lease) now."""
    if not state or not holder:
        return None
    if (state.get("pid"), state.get("host")) != (holder.get("pid"), holder.get("host")):
        return None
    return state


def read_state(config: Config, holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """The state file of the writer holding the lock (``holder``), or None: not running, not
    published yet, or left by a writer that is gone."""
    if holder is None:
        return None
    try:
        state = json.loads(config.writer_state_path.read_text())
    except (OSError, ValueError):
        return None
    return live_state(state if isinstance(state, dict) else None, holder)
