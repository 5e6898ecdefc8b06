"""One ETL run end to end: files -> validated rows -> partitions -> result rows -> COPY.

Everything CPU-heavy runs in an executor (worker processes, or one thread when
``workers`` is 1), so the event loop stays free. Phase 1 reads users and compounds, then
the experiments in byte ranges, in parallel, spilling rows by user partition to a
temporary directory; phase 2 aggregates partitions in parallel while their result rows
stream into three staging tables; a final transaction swaps them in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import accumulate
from operator import sub
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar, cast

from .archive import ArchiveLimits
from .db.database import Connection, Pool
from .db.load import StagedLoad
from .inputs import Inputs, materialize, plan_named
from .pipeline.aggregate import (
    CompoundSplit,
    PartitionJob,
    PartitionResult,
    SliceResult,
    aggregate_partition,
    aggregate_slice,
    check_compounds,
    check_experiment_ids,
    fold_slice,
    join_tops,
    merge_slices,
)
from .pipeline.csvfile import ByteRange, FilePlan, scan_plan, split_ranges
from .pipeline.errors import MAX_REPORTED_ERRORS, ErrorLog, InputError, RowError
from .pipeline.features import global_average
from .pipeline.plan import InputPlan
from .pipeline.scan import ScanResult, scan_compounds, scan_experiments, scan_users
from .pipeline.spill import Extent, SpillIndex
from .pipeline.tasks import Guarded, StopFile, run_task
from .scratch import ScratchDir
from .settings import Settings
from .workers import result_of

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")

PARTITION_BYTES = 2 << 20  # experiments per partition, in input bytes: ~30 MB per worker
RANGE_BYTES = 16 << 20  # bytes of a file per scan task, at most
PLAN_BLOCK = 1 << 20  # the plan notes a possible cut point per block
MIN_SLICE_BYTES = 1 << 20  # slices are never smaller than this
# A compounds.csv up to this size is broadcast: each worker holds it whole (~10x its size
# in memory); a larger one is partitioned by compound id (2M compounds, 73 MB, held whole:
# 755 MB in each worker). Just under this size broadcasting is still the faster way and
# within the memory target; twice it would not be (benchmarks/README, thirteenth round).
BROADCAST_BYTES = 4 << 20


@dataclass(frozen=True)
class RunOptions:
    on_error: Literal["abort", "skip"] = "abort"
    max_errors: int = 1000
    dry_run: bool = False  # validate and compute everything, replace nothing
    encoding: str = "utf-8"  # a codec's canonical name (inputs.check_encoding)
    delimiter: Literal["auto", ",", ";"] = "auto"
    callback_url: str | None = None  # one more webhook target, for this run

    @property
    def errors_kept(self) -> int:
        """Skip mode keeps every rejected row (for rejects.csv); a run records 100."""
        if self.on_error == "skip":
            return max(MAX_REPORTED_ERRORS, self.max_errors + 1)
        return MAX_REPORTED_ERRORS

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
    inputs: dict[str, Any] = field(default_factory=dict)  # files, compression, encoding, delimiter

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Finalize = Callable[[Connection, RunStats], Awaitable[None]]
KeepRejects = Callable[[Inputs, list[RowError]], Awaitable[None]]


@dataclass
class Scanned:
    """What phase 1 left: the plan with every file read, counts, and the spill indexes
    of every scan (in the order the scans started)."""

    plan: InputPlan
    users: list[SpillIndex]  # users by user partition
    experiments: list[SpillIndex]  # experiment rows by user partition
    experiment_ids: list[tuple[SpillIndex, ByteRange]]  # ids by id partition, and the range
    compounds: list[SpillIndex]  # compound rows by compound partition
    compound_refs: list[SpillIndex]  # a partitioned catalogue: referenced ids, by partition
    partitions: int
    compound_partitions: int
    experiment_rows: int  # experiments whose fields are valid


@dataclass(frozen=True)
class Catalogue:
    """The checked compounds: each partition's details file, and what is missing."""

    count: int  # compounds kept
    details: list[Path]  # by compound partition; one: broadcast to every task
    unknown: frozenset[bytes]  # referenced ids no partition holds (a partitioned one)

    @property
    def broadcast(self) -> Path | None:
        """The one details file every task reads, when the catalogue is broadcast."""
        return self.details[0] if len(self.details) == 1 else None

    def split(self, tops: Path) -> CompoundSplit | None:
        """What a task needs of a partitioned catalogue (None when it is broadcast)."""
        if self.broadcast is not None:
            return None
        return CompoundSplit(len(self.details), self.unknown, tops)


@dataclass
class Aggregated:
    users: int = 0
    experiments: int = 0
    rejected: int = 0  # experiments rejected by the partition checks


class _Again(Exception):
    """Skip mode rejected experiments in phase 2: the shares need the final total."""

    def __init__(self, rejected: int) -> None:
        super().__init__(f"{rejected} experiments rejected in phase 2")
        self.rejected = rejected


class Pipeline:
    """Runs one ETL run; ``progress`` is live for status pages.

    Phases: plan the files; scan every byte range of every file (phase 1); check
    experiment ids per id partition and compounds per compound partition; check and
    aggregate each user partition while its rows stream into staging tables (phase 2),
    then, for a partitioned catalogue, name the top compounds per compound partition;
    swap the tables in.
    """

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
        self.errors = ErrorLog(options.errors_kept)
        self.inputs: Inputs | None = None
        self.keep_rejects: KeepRejects | None = None  # set by the runner (skip mode)
        self._rejects_kept = False
        self.fatal = False  # a whole file could not be read: no mode can go on
        self.phases: dict[str, float] = {}
        self._stop: StopFile | None = None
        self._in_flight: set[Future[Any]] = set()

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        future = self.executor.submit(partial(run_task, partial(fn, *args, **kwargs), self._stop))
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return await result_of(self.executor, future)

    async def run(self, finalize: Finalize) -> RunStats:
        started = time.perf_counter()
        scratch = await asyncio.to_thread(ScratchDir, "etl-run-", self.settings.tmp_dir)
        workdir = scratch.path
        self._stop = StopFile(workdir / "STOP")
        try:
            return await self._run(workdir, started, finalize)
        except BaseException:
            # Workers still busy see the stop file within a block; wait for them so
            # they neither write into a removed directory nor hold the executor.
            self._stop.path.touch()
            await asyncio.shield(asyncio.to_thread(wait_futures, list(self._in_flight), 30))
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(scratch.remove))

    async def _run(self, workdir: Path, started: float, finalize: Finalize) -> RunStats:
        self.progress.phase = "reading"
        mark = time.perf_counter()
        opts = self.options
        limits = ArchiveLimits(None, self.settings.zip_max_ratio)
        inputs = await materialize(self.source, workdir, opts.encoding, opts.delimiter, limits)
        self.inputs = inputs
        # Cut points every MiB at most, so that ranges can be small on small inputs.
        plan_block = min(self.settings.chunk_bytes, PLAN_BLOCK)
        plan = await asyncio.to_thread(
            partial(plan_named, inputs, plan_block, experiments_read=False)
        )
        self.phases["inputs"] = round(time.perf_counter() - mark, 3)
        self.errors = ErrorLog(opts.errors_kept, plan.order)
        self.progress.bytes_total = plan.total_bytes
        partitions = self.settings.partitions or _round_up(
            math.ceil(plan.experiments.size / PARTITION_BYTES), self.settings.workers
        )
        compound_partitions = self.settings.compound_partitions or _compound_partitions(
            plan, self.settings.workers
        )
        mark = time.perf_counter()
        scanned = await self._scan(plan, plan_block, workdir, partitions, compound_partitions)
        plan = scanned.plan
        rejected, catalogue = await _both(
            self._check_experiment_ids(plan, scanned), self._check_compounds(plan, scanned, workdir)
        )
        await self._check_errors()
        self.phases["read"] = round(time.perf_counter() - mark, 3)

        mark = time.perf_counter()
        self.progress.phase = "loading"
        self.progress.partitions_total = partitions
        total = scanned.experiment_rows - len(rejected)
        first = True
        while True:
            try:
                async with StagedLoad(self.pool, self.settings.db_timeout) as load:
                    done = await self._aggregate(
                        load, plan, scanned, catalogue, total, rejected, first
                    )
                    await self._check_errors(complete=True)
                    if first and done.rejected and opts.on_error == "skip":
                        raise _Again(done.rejected)
                    return await self._commit(load, done, catalogue.count, started, mark, finalize)
            except _Again as again:
                total -= again.rejected  # the same rows are rejected again: not counted twice
                first = False
                self.progress.partitions_done = 0

    async def _scan(
        self,
        plan: InputPlan,
        plan_block: int,
        workdir: Path,
        partitions: int,
        compound_partitions: int,
    ) -> Scanned:
        """Phase 1: every byte range of every file at once; none needs another's rows.

        The users' and compounds' scans start first, while a thread reads the
        experiments' data for its cut points (the one pass over the largest file that
        no worker can share: 10M sparse, ~0.65 s with the workers idle before).
        """
        early = [
            asyncio.ensure_future(
                self._file_scans(
                    "compounds", plan.compounds, scan_compounds, workdir, compound_partitions
                )
            ),
            asyncio.ensure_future(
                self._file_scans("users", plan.users, scan_users, workdir, partitions)
            ),
        ]
        try:
            experiments = await asyncio.to_thread(scan_plan, plan.experiments, plan_block)
        except BaseException:
            for task in early:
                task.cancel()
            await asyncio.gather(*early, return_exceptions=True)
            raise
        plan = dataclasses.replace(plan, experiments=experiments)
        scan = partial(scan_experiments, compound_partitions=compound_partitions)
        first, late = await _both(
            _gather(*early), self._file_scans("experiments", experiments, scan, workdir, partitions)
        )
        results = [*itertools.chain.from_iterable(first), *late]
        await self._check_errors()
        by_kind: dict[str, list[SpillIndex]] = defaultdict(list)
        for result in results:
            for kind, spill_index in result.spills.items():
                by_kind[kind].append(spill_index)
        return Scanned(
            plan=plan,
            users=by_kind["users"],
            experiments=by_kind["by_user"],
            experiment_ids=[
                (r.spills["by_id"], r.part) for r in results if r.part and "by_id" in r.spills
            ],
            compounds=by_kind["compounds"],
            compound_refs=by_kind["compound_refs"],
            partitions=partitions,
            compound_partitions=compound_partitions,
            experiment_rows=self.progress.rows_read["experiments"],
        )

    async def _file_scans(
        self,
        kind: str,
        plan: FilePlan,
        scan: Callable[..., ScanResult],
        workdir: Path,
        partitions: int,
    ) -> list[ScanResult]:
        """The scans of one file's byte ranges. A quoted file is split too, speculatively
        (as in Ge et al., "Speculative Distributed CSV Data Parsing", SIGMOD 2019): each
        range assumes it starts outside a quoted field, which holds when the range before
        it ended outside one. Where one did not (a quoted field held a line end across a
        cut), or any range failed, the ranges after it may have read garbage: their
        results and errors are dropped and one reader reads the whole file again."""
        if not plan.quoted:
            return await _gather(*self._ranges(kind, plan, scan, workdir, partitions))
        results = await _gather(
            *self._ranges(kind, plan, scan, workdir, partitions, speculative=True)
        )
        if len(results) > 1 and any(r.fatal for r in results):
            log.info("%s: a quoted field spans a cut, or a range failed: read again", kind)
            self.progress.rows_read[kind] = 0
            self.progress.bytes_read -= plan.size - plan.data_offset
            await asyncio.to_thread(_remove, workdir, f"{kind}[0-9]*-spill")
            whole = dataclasses.replace(plan, cuts=plan.cuts[:1])  # one range
            results = await _gather(
                *self._ranges(kind, whole, scan, workdir, partitions, speculative=True)
            )
        for result in results:
            self._report(result)
        return results

    def _ranges(
        self,
        kind: str,
        file_plan: FilePlan,
        scan: Callable[..., ScanResult],
        workdir: Path,
        partitions: int,
        speculative: bool = False,
    ) -> list[Awaitable[ScanResult]]:
        """A scan of each byte range of a file, largest first: the workers take tasks in
        this order, and a large range started last kept one worker busy alone at the end
        (a quoted users.csv read whole, 10M sparse: ~2 s with one core idle).

        ``speculative`` splits a quoted file too and leaves its errors unreported: the
        caller reports them once the ranges are known to have started at row starts."""
        # Four ranges per worker at least, so that no worker waits long at the end.
        target = min(RANGE_BYTES, max(1, file_plan.size // (4 * self.settings.workers)))
        split = split_ranges(file_plan, target, self.settings.workers, speculative)
        parts = list(enumerate(split))
        parts.sort(key=lambda p: p[1].end - p[1].start, reverse=True)
        return [
            self._counted(
                kind,
                part.end - part.start,
                self._call(
                    Guarded(scan),
                    file_plan,
                    part,
                    workdir,
                    f"{kind}{index:04d}",
                    partitions,
                    self.settings.chunk_bytes,
                    self._stop,
                    self.options.errors_kept,
                ),
                report=not speculative,
            )
            for index, part in parts
        ]

    async def _counted(
        self, kind: str, size: int, call: Awaitable[ScanResult], report: bool = True
    ) -> ScanResult:
        result = await call
        if report:
            self._report(result)
        self.progress.rows_read[kind] += result.rows
        self.progress.bytes_read += size
        return result

    def _report(self, result: ScanResult) -> None:
        self.errors.extend(result.errors, result.error_total)
        self.fatal = self.fatal or result.fatal

    async def _check_experiment_ids(self, plan: InputPlan, scanned: Scanned) -> frozenset[int]:
        """Repeated experiment ids, per id partition; the lines of the rejected repeats."""
        by_partition = await asyncio.to_thread(
            _id_extents, scanned.experiment_ids, scanned.partitions
        )
        checks = [
            self._call(
                check_experiment_ids,
                scans,
                plan.experiments,
                self.options.errors_kept,
                self.settings.chunk_bytes,
            )
            for scans in by_partition
            if scans
        ]
        rejected: set[int] = set()
        for check in await _gather(*checks):
            self.errors.extend(check.log.errors, check.log.total)
            rejected.update(check.rejected)
        return frozenset(rejected)

    async def _check_compounds(self, plan: InputPlan, scanned: Scanned, workdir: Path) -> Catalogue:
        """Duplicate compound ids and each partition's details; with a partitioned
        catalogue, the referenced ids it does not hold."""
        details = [workdir / f"compounds-{c:04d}.pkl" for c in range(scanned.compound_partitions)]
        checks = [
            self._call(
                check_compounds,
                _extents(scanned.compounds, c),
                _extents(scanned.compound_refs, c),
                plan.compounds,
                path,
                self.options.errors_kept,
            )
            for c, path in enumerate(details)
        ]
        kept = 0
        unknown: set[bytes] = set()
        for check in await _gather(*checks):
            self.errors.extend(check.log.errors, check.log.total)
            kept += check.kept
            unknown.update(check.unknown)
        return Catalogue(kept, details, frozenset(unknown))

    async def _aggregate(
        self,
        load: StagedLoad,
        plan: InputPlan,
        scanned: Scanned,
        catalogue: Catalogue,
        total: int,
        rejected: frozenset[int],
        first_pass: bool,
    ) -> Aggregated:
        """Phase 2, loading each partition's rows as they come (the errors of the first
        pass are the run's; a second pass meets the same)."""
        partitions = scanned.partitions
        # Off the event loop: at 30M, ~100 scans x ~700 partitions of offsets (~0.1 s).
        sizes = await asyncio.to_thread(_sizes, scanned.experiments, partitions)
        # Slices of about the average partition (a small last one joins the one before):
        # only a partition past 1.5x the average is split, and a hot user's slices hold
        # no more than the others (10M hot: peak RSS ~256 -> ~231 MB with the lines
        # freed early, against twice the average).
        slice_bytes = max(MIN_SLICE_BYTES, sum(sizes) // partitions)
        tops_dir = catalogue.details[0].parent
        jobs = (
            PartitionJob(
                _extents(scanned.users, p),
                _extents(scanned.experiments, p),
                total,
                catalogue.broadcast,
                plan.users,
                plan.experiments,
                rejected,
                self.options.errors_kept,
                catalogue.split(tops_dir / f"tops{p:04d}"),
            )
            for p in range(partitions)
        )
        tops: list[SpillIndex] = []
        done = Aggregated()
        loading = True  # an error in abort mode fails the run: then only check

        window = max(2, self.settings.workers + 1)  # tasks in flight: every worker busy

        async def partition(job: PartitionJob) -> PartitionResult:
            slices = _slices(job.experiments, slice_bytes)
            if len(slices) == 1:
                return await self._call(aggregate_partition, job)
            merged = SliceResult(log=job.error_log())
            parts = (dataclasses.replace(job, experiments=s) for s in slices)
            # A few slices at a time, each folded as it finishes: one merged state, and no
            # pile of finished states, however many slices.
            running = {
                asyncio.ensure_future(self._call(aggregate_slice, p))
                for p in itertools.islice(parts, window)
            }
            finished: set[asyncio.Task[SliceResult]] = set()
            try:
                while running:
                    finished, running = await asyncio.wait(
                        running, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in finished:  # a fold takes ~10-40 ms: not on the event loop
                        await asyncio.to_thread(fold_slice, merged, task.result())
                    more = itertools.islice(parts, len(finished))
                    running.update(
                        asyncio.ensure_future(self._call(aggregate_slice, p)) for p in more
                    )
            except BaseException:
                for task in running:
                    task.cancel()
                # The finished ones too: another that failed beside the one read is read.
                await asyncio.gather(*running, *finished, return_exceptions=True)
                raise
            return await self._call(merge_slices, job, [merged])

        pending = map(partition, jobs)  # a job's extents are made as it starts
        async with aclosing(_as_done(pending, window)) as results:
            async for result in results:
                if first_pass:
                    self.errors.extend(result.log.errors, result.log.total)
                done.users += result.users
                done.experiments += result.experiments
                done.rejected += result.rejected
                if result.tops is not None:
                    tops.append(result.tops)
                self.progress.partitions_done += 1
                loading = loading and not (result.log.total and self.options.on_error == "abort")
                if loading:
                    rows = result.rows
                    await load.put("experiment_counts", rows.count_columns)
                    await load.put("experiment_averages", rows.average_columns)
                    await load.put("top_compounds", rows.top_columns)
        if loading and tops:
            named = (
                self._call(join_tops, path, _extents(tops, c))
                for c, path in enumerate(catalogue.details)
            )
            # A partitioned catalogue: the top rows named per compound partition, each
            # loaded as it comes (all at once: ~100 MB in this process at 1M users).
            async with aclosing(_as_done(named, window)) as columns:
                async for top_columns in columns:
                    await load.put("top_compounds", top_columns)
        return done

    async def _commit(
        self,
        load: StagedLoad,
        done: Aggregated,
        compounds: int,
        started: float,
        mark: float,
        finalize: Finalize,
    ) -> RunStats:
        loaded = await load.finish()
        self.phases["aggregate_load"] = round(time.perf_counter() - mark, 3)
        stats = RunStats(
            users=done.users,
            compounds=compounds,
            experiments=done.experiments,
            global_average=global_average(done.experiments, done.users),
            rows_loaded=loaded,
            rows_rejected=self.errors.total,
            duration_s=0.0,
            phases_s=self.phases,
            inputs=self.inputs.to_json() if self.inputs else {},
        )
        self.progress.phase = "committing"
        mark = time.perf_counter()

        async def final(conn: Connection) -> None:
            stats.duration_s = round(time.perf_counter() - started, 3)
            self.phases["commit"] = round(time.perf_counter() - mark, 3)
            self.progress.phase = "done"
            await finalize(conn, stats)

        await load.commit(final, self.settings.lock_timeout, discard=self.options.dry_run)
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

    async def _check_errors(self, complete: bool = False) -> None:
        """Fail the run: a file could not be read, abort mode met an error, or skip mode
        rejected too many rows. Called once each stage's checks have all run;
        ``complete``: every check has. Skip mode keeps its rejected rows first."""
        too_many = self.errors.total > self.options.max_errors
        failing = bool(self.errors) and (self.fatal or self.options.on_error == "abort" or too_many)
        if self.options.on_error == "skip" and not self.fatal and (failing or complete):
            await self._keep_rejects()
        if failing:
            raise InputError(self.errors.errors, self.errors.total)

    async def _keep_rejects(self) -> None:
        if self.keep_rejects is not None and self.inputs is not None and not self._rejects_kept:
            self._rejects_kept = True
            await self.keep_rejects(self.inputs, self.errors.errors)


async def _gather(*calls: Awaitable[T]) -> list[T]:
    """All results, or the first failure with the other calls cancelled and awaited."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _as_done(calls: Iterator[Awaitable[T]], window: int) -> AsyncGenerator[T, None]:
    """The results of ``calls`` as each finishes, ``window`` running at a time.

    Not in the calls' order: waiting for the oldest call while a newer one had finished
    left a worker without work. Calls still running when the caller stops are cancelled.
    """
    running = {asyncio.ensure_future(c) for c in itertools.islice(calls, window)}
    unread: list[asyncio.Future[T]] = []  # finished together with the one being read
    try:
        while running:
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            unread = list(finished)
            while unread:
                task = unread.pop()
                running.update(map(asyncio.ensure_future, itertools.islice(calls, 1)))
                yield task.result()
    finally:
        for task in running:
            task.cancel()
        # Read, so that asyncio does not log them as never retrieved: when one call
        # failed (a worker killed), the others that failed with it share its fault.
        for task in (*unread, *running):
            if task.done() and not task.cancelled():
                task.exception()


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """``_gather`` of two calls of different types."""
    a, b = await _gather(first, second)
    return cast(A, a), cast(B, b)


def _remove(directory: Path, pattern: str) -> None:
    for path in directory.glob(pattern):
        path.unlink(missing_ok=True)


def _extents(indexes: list[SpillIndex], partition: int) -> list[Extent]:
    """A partition's rows in every scan's spill file, in the scans' (file) order."""
    return [e for index in indexes if (e := index.extent(partition)) is not None]


def _id_extents(
    scans: list[tuple[SpillIndex, ByteRange]], partitions: int
) -> list[list[tuple[Extent, ByteRange]]]:
    """Each id partition's extent in every scan's id spill, with the range it read."""
    return [
        [(e, part) for index, part in scans if (e := index.extent(p)) is not None]
        for p in range(partitions)
    ]


def _sizes(indexes: list[SpillIndex], partitions: int) -> list[int]:
    """Bytes spilled for each partition, over all scans."""
    sizes = [0] * partitions
    for index in indexes:
        lengths = list(map(sub, index.offsets[1:], index.offsets[:-1]))
        for p in range(partitions):
            sizes[p] += sum(lengths[p::partitions])
    return sizes


def _slices(extents: Sequence[Extent], size: int) -> list[list[Extent]]:
    """Consecutive runs of a partition's bytes of about ``size`` each (one if smaller),
    cut between byte ranges; a small last run joins the one before."""
    runs: list[list[Extent]] = [[]]
    held = 0
    for extent in extents:
        rest: Extent | None = extent
        while rest is not None:
            lengths = list(map(sub, rest.ends, rest.starts))
            cut = next((i + 1 for i, n in enumerate(accumulate(lengths)) if held + n >= size), None)
            if cut is None or cut == len(lengths):
                runs[-1].append(rest)
                held += sum(lengths)
                rest = None
            else:
                head, rest = rest.split(cut)
                runs[-1].append(head)
                held = size
            if held >= size:
                runs.append([])
                held = 0
    if not runs[-1]:
        runs.pop()
    if len(runs) > 1 and sum(e.size for e in runs[-1]) < size // 2:
        last = runs.pop()
        runs[-1] += last
    return runs or [[]]


def _compound_partitions(plan: InputPlan, workers: int) -> int:
    """One (broadcast) for a small catalogue; else partitions of about a user partition,
    for the compounds and for the top rows named in them (one per user)."""
    if plan.compounds.size <= BROADCAST_BYTES:
        return 1
    biggest = max(plan.compounds.size, plan.users.size)
    return _round_up(math.ceil(biggest / PARTITION_BYTES), workers)


def _round_up(count: int, workers: int) -> int:
    """At least one partition, and whole rounds of them so no worker idles at the end."""
    step = max(1, workers)
    return max(1, math.ceil(count / step) * step)
