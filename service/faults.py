"""Operational faults in one line: what went wrong and where, for a run's record and the CLI.

A full spill disk, a spill directory the service may not write, the database's own disk
full, a database that stopped answering, a worker process that died: each gets a sentence
naming the place (and, for space, about how much is needed). Anything else is a bug and
is a bug: :func:`describe` returns None, and the caller keeps the exception's type and
text and logs its traceback.
"""

from __future__ import annotations

import errno
import math
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import asyncpg

from .runstore import RunAlreadyEnded

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
        host = (settings.database_url or "the embedded PostgreSQL").split("@")[-1]
        return f"the database's disk is full ({host}): {_first_line(exc)}"
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
