"""What runs in a worker: the task wrapper, the stop check, and small task functions.

Worker processes import this module and the rest of ``service.pipeline`` only, never the
database, web or CLI layers: each idle worker costs ~20 MB less and starts sooner.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import parent_process
from pathlib import Path
from typing import Any, TypeVar

from .errors import FileError
from .scan import ScanResult

T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside workers when the run's stop file appears."""


@dataclass(frozen=True)
class StopFile:
    """A picklable check, called per block in workers, that stops a cancelled run."""

    path: Path

    def __call__(self) -> None:
        # A removed run directory stops too: a released Dask task may still be running.
        if self.path.exists() or not self.path.parent.exists():
            raise Cancelled()


def run_task(call: Callable[[], T], stop: Callable[[], None] | None = None) -> T:
    """Run one task, unless its run was cancelled; in a worker process, with the cyclic
    garbage collector paused.

    A cancelled run's queued tasks end at once here, whatever their kind; scans also
    look between blocks, and no other task runs longer than a partition takes. A task
    allocates millions of acyclic containers (rows, lists, sets), and the collections
    they trigger re-scan the partition's big lists each time: ~7% of phase 2.
    Collection resumes between tasks. A thread worker shares the server's process, so
    there the collector is left alone.
    """
    if stop is not None:
        stop()
    if parent_process() is None:
        return call()
    gc.disable()
    try:
        return call()
    finally:
        gc.enable()


@dataclass(frozen=True)
class Guarded:
    """Turns a file-level error into a scan result, so every file's errors are reported."""

    fn: Callable[..., ScanResult]

    def __call__(self, *args: Any) -> ScanResult:
        try:
            return self.fn(*args)
        except FileError as exc:
            return ScanResult(errors=[exc.error], error_total=1, fatal=True)
