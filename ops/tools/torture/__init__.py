"""Torture test: one job run clean and run under kill -9, compared by an independent reader.

    python -m ops.tools.torture --kills 200 --embedder hash:384
    python -m ops.tools.torture --help

The clean run indexes a corpus with one writer and nothing else. The tortured run
indexes the same tree, at the same path, into another data home, with the writer, the
maintenance consumer (backups, checks and requeues every few seconds), producers that
also re-submit, edit and truncate parts of the tree (and put them back), and operator
restores (`indexq recover --from BACKUP`); N times it picks one of them and SIGKILLs
its process group at a random moment, often right after it was seen making progress,
then restarts it as a user would. Then everything is let finish, stopped cleanly and
checked (`indexq check --deep`), and a separate Python process that uses nothing but
chromadb reads both collections: lost, extra and wrong records, and the chunks the
tortured writer embedded more than once (the bound: one micro-batch per writer kill).
Exit 0: equal. Exit 1: any difference, loss, failed check or broken bound. Exit 2:
the harness itself failed (a stage timed out, bad usage); its work folder is kept.
"""

from __future__ import annotations

DEFAULT_KILLS = 50
DEFAULT_EMBEDDER = "hash:384"
DEFAULT_FILES = 60
DEFAULT_SEED = 1
DEFAULT_TIMEOUT = 3600.0
COLLECTION = "torture"
# Largest difference between two copies of one embedding that still counts as equal.
ATOL = 1e-5
# Share of the kills each victim gets (every victim gets at least one).
VICTIMS = {"writer": 0.35, "producer": 0.3, "maintenance": 0.23, "recovery": 0.12}
# Maintenance of the tortured run: due every few seconds, so that every restart of the
# consumer (which runs what is due at once) backs up, checks or requeues.
MAINTENANCE_ENV = {
    "INDEXQ_BACKUP_INTERVAL": "10s",
    "INDEXQ_QUICK_CHECK_INTERVAL": "5s",
    "INDEXQ_DEEP_CHECK_INTERVAL": "20s",
    "INDEXQ_REQUEUE_INTERVAL": "15s",
    "INDEXQ_RETENTION": "60s",
}
# Longest random wait before a kill (s): about one round of the victim's work here (the
# writer's wait starts when it has work: a few hundred chunks, about a second with hash:384).
MAX_DELAY = {"writer": 1.0, "producer": 3.0, "maintenance": 6.0, "recovery": 8.0}
# Longest wait for a sign of progress to aim a kill at (s); the kill lands anyway after it.
SIGN_TIMEOUT = 15.0
# Longest wait after that sign (s): within the commit, the probe, the restore it announced.
AFTER_SIGN = {"writer": 0.1, "producer": 0.15, "maintenance": 2.0, "recovery": 1.0}
# A kill within this long (s) of a move of the writer's counters was in a commit or an embedding.
ACTIVITY_WINDOW = 0.25
# A process start (imports, model) and one stage of the ending (s).
START_TIMEOUT = 180.0
STAGE_TIMEOUT = 900.0
# Files of the default corpus: Python sources from the standard library, none huge.
MAX_FILE_BYTES = 120_000
# Most files one edit (or cut) changes at once.
MUTATED_FILES = 8
OUTSTANDING = ("pending", "embedded", "deleting")
# Lines that say a process is ready (the writer's and the maintenance consumer's logs).
WRITER_READY = "tasks requeued from the ledger"
MAINTENANCE_READY = "maintenance consumer pid"
TICK_START = "Executing tasks.maintenance.maintain"
TICK_DONE = " executed in "
TICK_FAILED = "Unhandled exception in task"
