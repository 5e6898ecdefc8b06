"""One ETL run end to end: files -> validated rows -> partitions -> result rows -> COPY.

Everything CPU-heavy runs in an executor (worker processes, or one thread when
``workers`` is 1), so the event loop stays free. Phase 1 reads users and compounds, then
the experiments in byte ranges, in parallel, spilling rows by user partition to a
temporary directory; phase 2 aggregates partitions in parallel while their result rows
stream into three staging tables; a final transaction swaps them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import get_context, parent_process
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from .cluster import open_executor
from .db.database import Connection, Pool
from .db.load import StagedLoad
from .pipeline.aggregate import aggregate_spilled, write_compound_details
from .pipeline.csvfile import split_ranges
from .pipeline.errors import ErrorLog, FileError, InputError
from .pipeline.features import FeatureRows, global_average
from .pipeline.fields import any_overlap
from .pipeline.plan import InputPlan, plan_inputs
from .pipeline.scan import (
    Compounds,
    ExperimentContext,
    ScanResult,
    scan_compounds,
    scan_experiments,
    scan_users,
)
from .settings import Settings

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

PARTITION_BYTES = 2 << 20  # experiments per partition, in input bytes: ~30 MB per worker
RANGE_BYTES = 16 << 20  # experiments per parse task


@dataclass(frozen=True)
class RunOptions:
    on_error: Literal["abort", "skip"] = "abort"
    max_errors: int = 1000

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Progress:
    phase: str = "queued"
    bytes_total: int = 0
    bytes_read: int = 0
    rows_read: dict[str, int] = field(
        default_factory=lambda: {"users": 0, "experiments": 0, "compounds": 0}
    )
    partitions_done: int = 0
    partitions_total: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunStats:
    users: int
    compounds: int
    experiments: int
    global_average: float
    rows_loaded: dict[str, int]
    rows_rejected: int
    duration_s: float
    phases_s: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Cancelled(Exception):
    """Raised inside workers when the run's stop file appears."""


@dataclass(frozen=True)
class StopFile:
    """A picklable check, called per batch in workers, that stops a cancelled run."""

    path: Path

    def __call__(self, _rows: int) -> None:
        # A removed run directory stops too: a released Dask task may still be running.
        if self.path.exists() or not self.path.parent.exists():
            raise Cancelled()


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
    # imported the pipeline (~0.25 s): a run started at once would otherwise wait.
    wait_futures([executor.submit(int) for _ in range(workers)])
    return executor


def die_with_parent(parent: int) -> None:
    """Worker initializer: end with the parent, even when it is SIGKILLed.

    A worker blocked writing a result to a parent that died would otherwise live on.
    """
    if sys.platform == "linux":
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _task(call: Callable[[], T]) -> T:
    """Run one task; in a worker process, with the cyclic garbage collector paused.

    A task allocates millions of acyclic containers (rows, lists, sets), and the
    collections they trigger re-scan the partition's big lists each time: ~7% of phase
    2. Collection resumes between tasks. A thread worker shares the server's process,
    so there the collector is left alone.
    """
    if parent_process() is None:
        return call()
    gc.disable()
    try:
        return call()
    finally:
        gc.enable()


Finalize = Callable[[Connection, RunStats], Awaitable[None]]


class Pipeline:
    """Runs one ETL run; ``progress`` is live for status pages."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        executor: Executor,
        source: Path,
        options: RunOptions,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.executor = executor
        self.source = source
        self.options = options
        self.progress = Progress()
        self.errors = ErrorLog()
        self.fatal = False  # a whole file could not be read: no mode can go on
        self.phases: dict[str, float] = {}
        self._stop: StopFile | None = None
        self._in_flight: set[Future[Any]] = set()
        self.exp_prefixes: list[str] = []
        self._splits: list[tuple[int, int]] = []
        self._ranges: list[ScanResult] = []
        self._exp_scans: list[ScanResult] = []  # the final scans, whose spills phase 2 reads

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        future = self.executor.submit(partial(_task, partial(fn, *args, **kwargs)))
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return await asyncio.wrap_future(future)

    async def run(self, finalize: Finalize) -> RunStats:
        started = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="etl-run-", dir=self.settings.tmp_dir))
        self._stop = StopFile(workdir / "STOP")
        try:
            return await self._run(workdir, started, finalize)
        except BaseException:
            # Workers still busy see the stop file within a batch; wait for them so
            # they neither write into a removed directory nor hold the executor.
            self._stop.path.touch()
            await asyncio.shield(asyncio.to_thread(wait_futures, list(self._in_flight), 30))
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, True))

    async def _run(self, workdir: Path, started: float, finalize: Finalize) -> RunStats:
        assert self._stop is not None
        self.progress.phase = "reading"
        plan = await asyncio.to_thread(plan_inputs, self.source)
        self.progress.bytes_total = plan.total_bytes
        partitions = self.settings.partitions or _round_up(
            math.ceil(plan.experiments.size / PARTITION_BYTES), self.settings.workers
        )
        mark = time.perf_counter()
        compounds, users = await self._scan_inputs(plan, workdir, partitions)
        experiments = await self._scan_experiments(plan, workdir, partitions, compounds, users)
        self.phases["read"] = time.perf_counter() - mark
        self._check_errors()

        mark = time.perf_counter()
        self.progress.phase = "loading"
        self.progress.partitions_total = partitions
        async with StagedLoad(self.pool) as load:
            await self._aggregate_into(load, workdir, partitions, experiments, compounds, users)
            loaded = await load.finish()
            self.phases["aggregate_load"] = time.perf_counter() - mark
            stats = RunStats(
                users=users.rows,
                compounds=len(compounds.by_id),
                experiments=experiments,
                global_average=global_average(experiments, users.rows),
                rows_loaded=loaded,
                rows_rejected=self.errors.total,
                duration_s=0.0,
                phases_s=self.phases,
            )
            self.progress.phase = "committing"
            mark = time.perf_counter()

            async def final(conn: Connection) -> None:
                stats.duration_s = round(time.perf_counter() - started, 3)
                self.phases["commit"] = round(time.perf_counter() - mark, 3)
                self.progress.phase = "done"
                await finalize(conn, stats)

            await load.commit(final, self.settings.lock_timeout)
            # The stored stats were written inside the swap transaction, before its
            # COMMIT; the returned ones cover the whole swap. The run is done there: the
            # replaced tables are dropped after it, outside the swap's locks.
            self.phases["commit"] = round(time.perf_counter() - mark, 3)
            stats.duration_s = round(time.perf_counter() - started, 3)
            self.progress.phase = "done"
            mark = time.perf_counter()
            await load.drop_retired(self.settings.lock_timeout)
            self.phases["cleanup"] = round(time.perf_counter() - mark, 3)
        return stats

    async def _scan_inputs(
        self, plan: InputPlan, workdir: Path, partitions: int
    ) -> tuple[Compounds, ScanResult]:
        """Compounds, then experiment ranges while users.csv is still being read."""
        block = self.settings.chunk_bytes
        users_call = asyncio.ensure_future(
            self._call(_guarded(scan_users), plan.users, workdir, partitions, block)
        )
        ranges: asyncio.Future[list[ScanResult]] | None = None
        try:
            compounds, compound_scan = await self._call(_compounds_task, plan, block)
            if not compound_scan.fatal:
                context = ExperimentContext(None, compounds.by_text)
                scans = self._scan_ranges(plan, workdir, partitions, context)
                ranges = asyncio.ensure_future(scans)
            users = await users_call
            for kind, scan, size in (
                ("compounds", compound_scan, plan.compounds.size),
                ("users", users, plan.users.size),
            ):
                self.errors.extend(scan.errors, scan.error_total)
                self.fatal = self.fatal or scan.fatal
                self.progress.rows_read[kind] = scan.rows
                self.progress.bytes_read += size
            if self.options.on_error == "abort" or self.fatal:
                # Bad users or compounds would only echo as unknown references below.
                self._check_errors()
            assert ranges is not None  # compounds were readable, or the check raised
            self._ranges = await ranges
        except BaseException:
            for task in (users_call, ranges):
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in (users_call, ranges) if t is not None), return_exceptions=True
            )
            raise
        return compounds, users

    async def _scan_ranges(
        self, plan: InputPlan, workdir: Path, partitions: int, context: ExperimentContext
    ) -> list[ScanResult]:
        """Scan experiment byte ranges in parallel, spilling to ``exp{index}`` files."""
        exp = plan.experiments
        # Two ranges per worker at least: one worker starts on users.csv meanwhile.
        wanted = max(math.ceil(exp.size / RANGE_BYTES), 2 * self.settings.workers)
        parts = _round_up(wanted, self.settings.workers)
        self._splits = split_ranges(exp, parts)

        async def scan(index: int, byte_range: tuple[int, int]) -> ScanResult:
            result = await self._scan_range(plan, workdir, partitions, context, index)
            self.progress.bytes_read += byte_range[1] - byte_range[0]
            self.progress.rows_read["experiments"] += result.rows
            return result

        return await asyncio.gather(*(scan(i, r) for i, r in enumerate(self._splits)))

    async def _scan_range(
        self,
        plan: InputPlan,
        workdir: Path,
        partitions: int,
        context: ExperimentContext,
        index: int,
    ) -> ScanResult:
        ranges = self._splits
        return await self._call(
            _guarded(scan_experiments),
            plan.experiments,
            context,
            workdir,
            partitions,
            f"exp{index:04d}",
            ranges[index] if len(ranges) > 1 else None,
            self.settings.chunk_bytes,
            self._stop,
        )

    async def _scan_experiments(
        self,
        plan: InputPlan,
        workdir: Path,
        partitions: int,
        compounds: Compounds,
        users: ScanResult,
    ) -> int:
        """Finish the range scans; the number of valid experiments.

        A range that referenced a user id missing from users.csv is scanned again with
        the user ids known, so its errors say which rows.
        """
        context = ExperimentContext(users.ids, compounds.by_text)
        results = self._ranges
        self.exp_prefixes = [f"exp{i:04d}" for i in range(len(results))]
        for index, result in enumerate(results):
            if result.users is None or users.ids.covers(result.users):
                continue
            await asyncio.to_thread(_remove, workdir, [self.exp_prefixes[index]])
            again = await self._scan_range(plan, workdir, partitions, context, index)
            self.progress.rows_read["experiments"] += again.rows - result.rows
            results[index] = again
        exp = plan.experiments
        if await asyncio.to_thread(_ids_repeat_across, results):
            # An experiment id repeats across ranges: rescan in one pass, which reports
            # the later occurrence at its line like a sequential reader would.
            await asyncio.to_thread(_remove, workdir, self.exp_prefixes)
            self.exp_prefixes = ["exp"]
            results = [
                await self._call(
                    _guarded(scan_experiments),
                    exp,
                    context,
                    workdir,
                    partitions,
                    "exp",
                    None,
                    self.settings.chunk_bytes,
                    self._stop,
                )
            ]
        self._exp_scans = results
        shift = exp.header_line
        for result in results:
            self.fatal = self.fatal or result.fatal
            self.errors.extend(result.errors, result.error_total, shift if len(results) > 1 else 0)
            shift += result.lines
        return sum(r.rows for r in results)

    def _check_errors(self) -> None:
        if not self.errors:
            return
        too_many = self.errors.total > self.options.max_errors
        if self.fatal or self.options.on_error == "abort" or too_many:
            raise InputError(self.errors.errors, self.errors.total)

    async def _aggregate_into(
        self,
        load: StagedLoad,
        workdir: Path,
        partitions: int,
        experiments: int,
        compounds: Compounds,
        users: ScanResult,
    ) -> None:
        details = {cid: (c.name, c.structure) for cid, c in compounds.by_id.items()}
        details_file = workdir / "compounds.pkl"
        await asyncio.to_thread(write_compound_details, details_file, details)
        pending = [
            self._call(
                aggregate_spilled,
                users.pieces[p],
                [piece for scan in self._exp_scans for piece in scan.pieces[p]],
                experiments,
                details_file,
            )
            for p in range(partitions)
        ]
        # Results are loaded as they come, not in partition order: waiting for the
        # oldest task while a newer one had finished left a worker without work.
        window = max(2, self.settings.workers + 1)
        running = {asyncio.ensure_future(c) for c in pending[:window]}
        queue = pending[window:]
        try:
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if queue:
                        running.add(asyncio.ensure_future(queue.pop(0)))
                    rows: FeatureRows = task.result()
                    await load.put("experiment_counts", rows.counts)
                    await load.put("experiment_averages", rows.averages)
                    await load.put("top_compounds", rows.tops)
                    self.progress.partitions_done += 1
        finally:
            for task in running:
                task.cancel()
            for coro in queue:
                coro.close()


def _ids_repeat_across(results: list[ScanResult]) -> bool:
    return any_overlap([r.span for r in results if r.span is not None])


def _round_up(count: int, workers: int) -> int:
    """At least one partition, and whole rounds of them so no worker idles at the end."""
    step = max(1, workers)
    return max(1, math.ceil(count / step) * step)


def _remove(workdir: Path, prefixes: list[str]) -> None:
    for prefix in prefixes:
        for stale in workdir.glob(f"{prefix}-*"):
            stale.unlink()


def _compounds_task(plan: InputPlan, block: int) -> tuple[Compounds, ScanResult]:
    errors = ErrorLog()
    try:
        compounds = scan_compounds(plan.compounds, errors, block)
    except FileError as exc:
        return Compounds(), ScanResult(errors=[exc.error], error_total=1, fatal=True)
    return compounds, ScanResult(
        rows=len(compounds.by_id), errors=errors.errors, error_total=errors.total
    )


def _guarded(fn: Callable[..., ScanResult]) -> Callable[..., ScanResult]:
    return _Guarded(fn)


@dataclass(frozen=True)
class _Guarded:
    """Turns a file-level error into a scan result, so every file's errors are reported."""

    fn: Callable[..., ScanResult]

    def __call__(self, *args: Any) -> ScanResult:
        try:
            return self.fn(*args)
        except FileError as exc:
            return ScanResult(errors=[exc.error], error_total=1, fatal=True)


@contextlib.contextmanager
def executor_for(settings: Settings) -> Any:
    executor = open_executor(settings)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
