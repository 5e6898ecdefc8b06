"""The worker processes runs use, and their repair when one dies.

A worker killed mid-run (the kernel's OOM killer sends SIGKILL) breaks a
``ProcessPoolExecutor`` for good: every later submit raises ``BrokenProcessPool``.
:class:`WorkerPool` is the executor the service hands out; the run that saw the death
fails with a clear message, and :meth:`WorkerPool.heal` starts a fresh set of workers
for the next one. While no working set could be started, ``healthy`` is False and
``/readyz`` answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from typing import ParamSpec, TypeVar

from .settings import Settings

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

PR_SET_PDEATHSIG = 1


def make_executor(workers: int) -> Executor:
    """Worker processes for real parallelism; one thread when asked for one worker."""
    if workers <= 1:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="etl-worker")
    # Spawned (not forked from a fork server) so each worker's parent is this process,
    # which lets the kernel kill the workers if this process is killed (see below).
    executor = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )
    # Start the workers now rather than on a run's clock, and wait until each has
    # imported the pipeline (~0.25 s): a run started at once would otherwise wait. A set
    # of workers that cannot start raises here (BrokenProcessPool), not in a run.
    try:
        with _light_main_module():
            futures = [executor.submit(int) for _ in range(workers)]
        for future in futures:
            future.result()
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    return executor


@contextlib.contextmanager
def _light_main_module() -> Iterator[None]:
    """Spawned workers first import the parent's main module: the console script's is
    the CLI, which pulls in aiohttp, click and asyncpg for nothing. While they start,
    the main module names an empty one instead (spawn starts workers in ``submit``)."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    main.__spec__ = importlib.util.find_spec("service.pipeline.worker")
    try:
        yield
    finally:
        main.__spec__ = spec


def die_with_parent(parent: int) -> None:
    """Worker initializer: end with the parent, even when it is SIGKILLed.

    A worker blocked writing a result to a parent that died would otherwise live on.
    """
    if sys.platform == "linux":
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _processes(executor: Executor) -> list[BaseProcess]:
    # The executor's own record of its processes (private, but the only place that knows
    # how a worker ended); kept from start-up, since a broken executor forgets them.
    processes = getattr(executor, "_processes", None) or {}
    return list(processes.values())


def death_message(processes: list[BaseProcess]) -> str:
    """Why the workers broke, from how the first one that died ended."""
    codes = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
    # The executor ends the survivors with SIGTERM: the culprit is the other one.
    culprits = [c for c in codes if c != -signal.SIGTERM] or codes
    if not culprits or culprits[0] is None:
        return "a worker process died"
    code = culprits[0]
    if code < 0:
        hint = "; out of memory?" if -code == signal.SIGKILL else ""
        return f"a worker process died (signal {-code}{hint})"
    return f"a worker process died (exit code {code})"


class WorkerPool(Executor):
    """The executor of every run: delegates to a set of workers, replaced when broken."""

    def __init__(self, workers: int, factory: Callable[[int], Executor] = make_executor) -> None:
        self.workers = workers
        self.factory = factory  # how a set of workers starts
        self._lock = threading.Lock()
        self._executor: Executor | None = factory(workers)
        self._processes = _processes(self._executor)
        self.problem: str | None = None  # why no working set of workers is running

    @property
    def healthy(self) -> bool:
        """False once a set of workers could not be started (``/readyz`` says 503)."""
        return self.problem is None

    @property
    def broken(self) -> bool:
        """A worker died: the executor is failing every task it holds."""
        return self._executor is not None and _broken(self._executor)

    @property
    def needs_repair(self) -> bool:
        return self._executor is None or self.problem is not None or self.broken

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        executor = self._executor
        if executor is None:
            raise BrokenProcessPool(self.problem or "no worker processes")
        return executor.submit(fn, *args, **kwargs)

    def death(self, wait: float = 2.0) -> str:
        """How the broken workers ended (blocking: a killed process can close its pipe,
        which breaks the pool, a moment before it can be reaped)."""
        deadline = time.monotonic() + wait
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode not in (None, 0, -signal.SIGTERM):
                break
        return death_message(self._processes)

    def heal(self) -> bool:
        """Replace broken workers (blocking: call it in a thread); whether they work now."""
        with self._lock:
            if not self.needs_repair:
                return True
            old = self._executor
            self._executor = None
            if old is not None:
                old.shutdown(wait=True, cancel_futures=True)
            _end(self._processes)
            try:
                self._executor = self.factory(self.workers)
            except Exception as exc:  # e.g. no memory or process slots for new workers
                self.problem = f"worker processes could not be started: {exc}"
                log.error(self.problem, extra={"event": "workers"})
                log.debug("worker start-up failed", exc_info=True)
                return False
            self._processes = _processes(self._executor)
            self.problem = None
            log.warning("worker processes replaced", extra={"event": "workers"})
            return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)


def _broken(executor: Executor) -> bool:
    # Set by the executor once a worker died (private; submit would raise the same).
    return bool(getattr(executor, "_broken", False))


def _end(processes: list[BaseProcess]) -> None:
    """Stop the workers a broken executor left running. It stops them itself, unless
    its manager thread died first (see :func:`result_of`)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join()


async def result_of(executor: Executor, future: Future[T]) -> T:
    """A submitted task's result; cancelling the caller cancels the task, unless a worker
    has died. A broken ``ProcessPoolExecutor`` fails its pending tasks one by one, and in
    Python 3.11 a task cancelled meanwhile kills its manager thread (``InvalidStateError``
    in ``terminate_broken``): a traceback, and the surviving workers never stopped."""
    waited = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waited)
    except asyncio.CancelledError:
        if not (executor.broken if isinstance(executor, WorkerPool) else _broken(executor)):
            future.cancel()
        # Its outcome, whatever it is, is no longer wanted (and never logged as unseen).
        waited.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise


@contextlib.contextmanager
def executor_for(settings: Settings) -> Iterator[Executor]:
    """The run's executor (local workers, or a Dask cluster's), shut down afterwards."""
    from .cluster import open_executor

    executor = open_executor(settings)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["BrokenProcessPool", "WorkerPool", "executor_for", "make_executor", "result_of"]
