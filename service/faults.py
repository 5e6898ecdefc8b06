"""Operational faults in one line: what went wrong and where, for a run's record and the CLI.

A full spill disk, a spill directory the service may not write, the database's own disk
full, a database that stopped answering or ended the connection, a worker process that
died: each gets a sentence naming the place (and, for space, about how much is needed).
Anything else is a bug: :func:`describe` returns None, and the caller keeps the
exception's type and text and logs its traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import asyncpg

from .db.database import DATABASE_ERRORS
from .runstore import RunAlreadyEnded

log = logging.getLogger(__name__)

# Spill files take about the input's size; a bit more for their index and upload copies.
SPILL_FACTOR = 1.2
MB = 1e6


def describe(exc: BaseException, settings: Any, pipeline: Any = None) -> str | None:
    """One line for a run that ended with ``exc``; None when it is no known fault (a bug).

    (A dead worker's signal is known to :meth:`WorkerPool.death`, which may block.)
    """
    if isinstance(exc, BrokenProcessPool):
        return "a worker process died"
    if isinstance(exc, RunAlreadyEnded):
        return str(exc)
    if isinstance(exc, asyncpg.DiskFullError):
        return f"the database's disk is full ({_database(settings)}): {_first_line(exc)}"
    if connection_failed(exc):
        database = _database(settings)
        return f"the connection to the database failed ({database}): {_first_line(exc)}"
    if isinstance(exc, TimeoutError):
        detail = str(exc)
        if detail.startswith("database stopped answering"):
            return detail
        return f"database stopped answering: no reply within {settings.db_timeout:g} s"
    if isinstance(exc, OSError):
        where = _place(exc, Path(settings.tmp_dir))
        if where is not None:
            return _disk_fault(exc, where, pipeline)
    return None


def connection_failed(exc: BaseException) -> bool:
    """The database ended the connection, or it broke or could not be made: a terminated
    backend, a server shut down or starting up, a connection refused or reset, a host
    name without an address.

    asyncpg also says "cannot switch to state ..." when a connection is used while it
    still waits for the end of an error the server sent as it went away; each of the
    service's connections has one user at a time, so that is a broken connection too.
    """
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.OperatorInterventionError):
        return True  # SQLSTATE classes 08 and 57P: admin or crash shutdown, cannot connect now
    if isinstance(exc, asyncpg.InternalClientError):
        return str(exc).startswith("cannot switch to state")
    return isinstance(exc, ConnectionError | socket.gaierror)


def _database(settings: Any) -> str:
    """The database, as a run's message names it (never its password)."""
    return str(settings.database_url or "the embedded PostgreSQL").split("@")[-1]


def _place(exc: OSError, spill: Path) -> Path | None:
    """The spill directory, when ``exc`` concerns a path inside it."""
    for name in (exc.filename, exc.filename2):
        if name is None:
            continue
        path = Path(str(name))
        if path == spill or spill in path.parents:
            return spill
    if exc.errno == errno.ENOSPC and exc.filename is None:
        return spill  # writes through an open file name no path; spill files are the ones
    return None


def _disk_fault(exc: OSError, spill: Path, pipeline: Any) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        total = getattr(getattr(pipeline, "progress", None), "bytes_total", 0)
        need = f": this run needs about {math.ceil(total * SPILL_FACTOR / MB)} MB" if total else ""
        return f"spill directory {spill} is full{need} (ETL_TMP_DIR)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied on the spill directory {spill}: {exc.strerror} (ETL_TMP_DIR)"
    if exc.errno == errno.ENOENT and Path(str(exc.filename)) == spill:
        return f"the spill directory {spill} does not exist (ETL_TMP_DIR)"
    return f"spill directory {spill}: {exc.strerror}"


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def background_faults(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: a task nobody awaited that ended in an
    operational fault is one warning line; anything else gets asyncio's own report,
    traceback and all.

    Libraries leave such tasks when connections fail together: asyncpg's pool closes its
    connections in a ``gather`` that raises the first timeout and leaves the others'.
    """
    exc = context.get("exception")
    if not isinstance(exc, (*DATABASE_ERRORS, BrokenProcessPool)):
        loop.default_exception_handler(context)
        return
    task = context.get("future")
    coro = task.get_coro() if isinstance(task, asyncio.Task) else None
    where = f" ({getattr(coro, '__qualname__', coro)})" if coro is not None else ""
    what = f"{type(exc).__name__}: {_first_line(exc)}" if str(exc) else type(exc).__name__
    log.warning("%s%s: %s", context.get("message", "unhandled exception"), where, what)
