"""Deterministic ids and content hashes, and the rules for collection names."""

from __future__ import annotations

import hashlib
import ipaddress
import re

from pipeline.errors import BadInputError

# Chroma's own rule (checked again by Chroma, but we must refuse before enqueuing).
_COLLECTION = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")


def chunk_id(source: str, position: int | str) -> str:
    """The same source and position always give the same id, so a replay is an upsert."""
    return hashlib.blake2b(f"{source}\x00{position}".encode(), digest_size=16).hexdigest()


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def validate_collection(name: str) -> str:
    """Return ``name`` if Chroma will accept it as a collection name, else raise."""
    if not isinstance(name, str):
        raise BadInputError(f"a collection name must be a string, got {type(name).__name__} {name!r}")
    problem = None
    if not _COLLECTION.match(name):
        problem = "3-512 characters from [a-zA-Z0-9._-], starting and ending with a letter or digit"
    elif ".." in name:
        problem = "no two consecutive dots"
    else:
        try:
            ipaddress.IPv4Address(name)
            problem = "not an IPv4 address"
        except ValueError:
            pass
    if problem:
        raise BadInputError(f"invalid collection name {name!r}: it must have {problem}")
    return name


def new_job_id() -> str:
    """Creation time in UTC to the millisecond first (ids sort in submission order across
    machines whose clocks agree), then randomness (producers on many machines)."""
    import time
    import uuid

    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}-" + uuid.uuid4().hex[:6]
