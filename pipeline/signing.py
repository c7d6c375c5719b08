"""Signed JSON: what producers and the writer exchange through a queue others may reach.

A shared Redis queue must not let whoever can write to it run code in the writer, so
nothing read from a queue is unpickled. Payloads are JSON, prefixed by an HMAC-SHA256
of the body under the queue key: a payload that does not verify is refused before it
is parsed. Even with a leaked key, JSON can only name the writer's own tasks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from pipeline.errors import ForgedPayloadError

# Version tag: a payload from another format (Huey's pickles, say) is refused by name.
PREFIX = b"iq1:"
_DIGEST = hashlib.sha256().digest_size * 2


class Signer:
    def __init__(self, secret: str, salt: str) -> None:
        if not secret:
            raise ValueError("a signing secret is required")
        # One key per use (salt): a signed intake part cannot pass as a task message.
        self._key = hashlib.sha256(salt.encode() + b"\0" + secret.encode()).digest()

    def sign(self, body: bytes) -> bytes:
        mac = hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
        return PREFIX + mac + b":" + body

    def verify(self, data: bytes) -> bytes:
        """The body of a payload this key signed; raises ForgedPayloadError otherwise."""
        if not isinstance(data, bytes | bytearray):
            raise ForgedPayloadError(f"payload is {type(data).__name__}, not bytes")
        data = bytes(data)
        if not data.startswith(PREFIX) or len(data) < len(PREFIX) + _DIGEST + 1:
            raise ForgedPayloadError(f"payload of {len(data)} bytes is not an indexq signed payload")
        mac, body = data[len(PREFIX) : len(PREFIX) + _DIGEST], data[len(PREFIX) + _DIGEST + 1 :]
        expected = hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(mac, expected):
            raise ForgedPayloadError(f"payload of {len(data)} bytes has a bad signature (wrong key or altered)")
        return body

    def dumps(self, value: Any) -> bytes:
        return self.sign(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())

    def loads(self, data: bytes) -> Any:
        return json.loads(self.verify(data))
