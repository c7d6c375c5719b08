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
from typing import Any

from huey.registry import Message
from huey.serializer import Serializer

from pipeline.errors import ForgedPayloadError
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


class JsonSerializer(Serializer):
    """Signed JSON for Huey: what the queue carries can only name a registered task."""

    def __init__(self, secret: str, salt: str) -> None:
        super().__init__()
        self.signer = Signer(secret, salt)

    def _serialize(self, data: Any) -> bytes:
        return self.signer.dumps(_encode(data))

    def _deserialize(self, data: bytes) -> Any:
        try:
            value = _decode(self.signer.loads(data))
        except ForgedPayloadError as exc:
            logger.error("refused a queue payload: %s; it was not executed", exc)
            raise
        except ValueError as exc:  # signed by our key, yet not our JSON: refuse as well
            logger.error("refused a queue payload that is not valid JSON: %s; it was not executed", exc)
            raise ForgedPayloadError(str(exc)) from exc
        if not isinstance(value, Message):
            logger.error("refused a queue payload that is not a task message; it was not executed")
            raise ForgedPayloadError("payload is not a task message")
        return value
