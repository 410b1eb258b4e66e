"""``flower-superlink`` with its SQLite transactions queued in-process, not on the file lock.

Run it exactly like Flower's command: ``python -m florist.server.superlink --insecure
--database FILE ...``; ``superlink_command`` (server/processes.py) does whenever a state file is
given. Flower 1.39 keeps that state in SQLite through SQLAlchemy with a pool of connections, one
per busy thread (gRPC, HTTP and background workers). Every Fleet and ServerApp request writes
(token expiry sweeps, byte counters, object bookkeeping), so concurrent requests contend for
the file's single write lock, and a writer that finds it taken sleeps in SQLite's busy handler
(1, 2, 5, 10 … 100 ms) instead of waking when it is free. Measured on benchmarks/end_to_end.py's
job (5 nodes, 10 rounds): 126 s of statement time summed over threads, nearly all of it waiting.

:func:`serialize_sqlite_sessions` makes the outermost session of each SQLite-backed state take
one process-wide re-entrant lock for its whole transaction: requests then queue on a Python lock
that hands over at once, and no two transactions of this process meet on the file (the
SuperLink is its only user). Reads queue too; the SuperLink is CPU-bound in Python anyway, and
under the GIL their overlap gained little. PostgreSQL-backed states and the in-memory state
are untouched. Like client/flower_tuning.py it refuses any other flwr than the version it was
written for (it warns and runs Flower unchanged); ``FLORIST_SUPERLINK_QUEUE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from florist.client.flower_tuning import version_supported

log = logging.getLogger(__name__)

_LOCK = threading.RLock()
#: ``0`` runs Flower's SuperLink unchanged (for comparison, or if the queue ever misbehaves).
QUEUE_ENV = "FLORIST_SUPERLINK_QUEUE"


def serialize_sqlite_sessions(*, version: str | None = None) -> bool:
    """Queue the SQLite transactions of Flower's SQL states on one lock; False if skipped."""
    if not version_supported(version):
        return False
    from flwr.supercore import sql_mixin

    mixin: Any = sql_mixin.SqlMixin
    original = mixin.session
    if getattr(original, "florist_serialized", False):
        return True  # already applied in this process

    @contextlib.contextmanager
    def session(self: Any) -> Iterator[Any]:
        if getattr(self, "database_backend", None) != "sqlite":
            with original(self) as inner:
                yield inner
            return
        # Re-entrant: a nested session (same thread) reuses its outer one, or opens another
        # database scope's, and must not wait for itself.
        with _LOCK, original(self) as inner:
            yield inner

    session.florist_serialized = True  # type: ignore[attr-defined]
    mixin.session = session
    return True


def main() -> None:
    from flwr.superlink.cli import flower_superlink

    if os.environ.get(QUEUE_ENV, "1") != "0":
        serialize_sqlite_sessions()
    flower_superlink()


if __name__ == "__main__":
    main()
