"""Huey task messages as signed JSON instead of pickle.

Huey pickles its messages; a process that can write to the queue (a shared Redis
server) could then run any code in the writer. ``JsonSerializer`` writes each
``Message`` as JSON signed with the queue key (``pipeline.signing``). A payload that
does not verify is logged and refused before it is parsed, and Huey's consumer logs
the error and goes on with the next task: the forged payload is never executed.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from huey.registry import Message
from huey.serializer import Serializer

from pipeline.errors import ForgedPayloadError
from pipeline.metrics import REFUSED_PAYLOADS
from pipeline.signing import Signer

logger = logging.getLogger(__name__)


def _encode(value: Any) -> Any:
    if isinstance(value, Message):
        return {"$message": {k: _encode(v) for k, v in value._asdict().items()}}
    if isinstance(value, datetime.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {"$seconds": value.total_seconds()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("task keyword arguments must have string keys")
        return {k: _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a task argument of type {type(value).__name__} cannot travel as JSON")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "$message" in value:
            fields = value["$message"]
            unknown = set(fields) - set(Message._fields)
            if unknown:
                raise ForgedPayloadError(f"message has unknown fields {sorted(unknown)}")
            return Message(**{k: _decode(v) for k, v in fields.items()})
        if "$datetime" in value:
            return datetime.datetime.fromisoformat(value["$datetime"])
        if "$seconds" in value:
            return datetime.timedelta(seconds=value["$seconds"])
        return {k: _decode(v) for k, v in value.items()}
    return value


# Refused payloads raise at most one alert per this many seconds (each is logged): a
# queue flooded with junk must not flood the alerts, nor fsync an event per payload.
ALERT_EVERY = 60.0


class JsonSerializer(Serializer):
    """Signed JSON for Huey: what the queue carries can only name a registered task.

    ``on_refused`` (set by the consumer that drains the queue) is called with a one-line
    summary when payloads were refused, to raise an alert.
    """

    def __init__(self, secret: str, salt: str) -> None:
        super().__init__()
        self.signer = Signer(secret, salt)
        self.on_refused: Callable[[str], None] | None = None
        self._alerted = 0.0
        self._unreported = 0

    def _serialize(self, data: Any) -> bytes:
        return self.signer.dumps(_encode(data))

    def _deserialize(self, data: bytes) -> Any:
        try:
            value = _decode(self.signer.loads(data))
        except ForgedPayloadError as exc:
            self._refuse(str(exc))
            raise
        except ValueError as exc:  # signed by our key, yet not our JSON: refuse as well
            self._refuse(f"not valid JSON: {exc}")
            raise ForgedPayloadError(str(exc)) from exc
        if not isinstance(value, Message):
            self._refuse("not a task message")
            raise ForgedPayloadError("payload is not a task message")
        return value

    def _refuse(self, reason: str) -> None:
        logger.error("refused a queue payload: %s; it was not executed", reason)
        REFUSED_PAYLOADS.labels("task").inc()
        self._unreported += 1
        if self.on_refused is None or (self._alerted and time.monotonic() - self._alerted < ALERT_EVERY):
            return
        count, self._unreported = self._unreported, 0
        self._alerted = time.monotonic()
        more = f" (and {count - 1} more since the last alert)" if count > 1 else ""
        try:
            self.on_refused(f"refused a queue payload{more}: {reason}; it was not executed")
        except Exception:  # the refusal stands and is logged; the alert is best effort
            logger.exception("could not raise an alert for a refused queue payload")
