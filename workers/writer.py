"""``huey_consumer workers.writer.huey -w 1 -k thread``: the writer under Huey's own script.

Configured from ``INDEXQ_*`` variables (``INDEXQ_HOME`` names the data home).
"""

from __future__ import annotations

from pipeline.config import Config, private_files
from pipeline.errors import IndexqError
from workers.queue import WriterHuey, exit_with

# huey_consumer is where this process starts: everything it creates in the data home
# (Chroma's files included) is the owner's only.
private_files()
try:
    huey = WriterHuey(Config.from_env())
except IndexqError as exc:  # bad configuration: one line, not a traceback
    raise exit_with(exc) from None
