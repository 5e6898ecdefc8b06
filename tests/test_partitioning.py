"""Byte ranges, partitions and spill files: the split never changes results or leaks files."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from test_aggregate import traced_peak
from test_equivalence import loaded, obvious
from test_generate import normalised

from service import etl
from service.db.database import open_pool
from service.generate import generate
from service.jobs import Runner, directory_request, run_once
from service.pipeline import fastpath, spill
from service.pipeline.csvfile import EXPERIMENTS, ByteRange, plan_file, scan_plan, split_ranges
from service.pipeline.scan import scan_experiments
from service.pipeline.tasks import run_task
from service.settings import Settings
from service.workers import executor_for


@pytest.fixture
def generated(settings: Settings) -> Path:
    directory = settings.tmp_dir.parent / "generated"
    generate(directory, users=300, experiments=3000, compounds=40, seed=7)
    return directory


@pytest.mark.parametrize("target", [1, 500, 5000, 1 << 30])
def test_byte_ranges_cover_the_data_and_know_their_first_line(generated: Path, target: int) -> None:
    plan = plan_file(generated / "user_experiments.csv", EXPERIMENTS, block=1000)
    ranges = split_ranges(plan, target)
    data = plan.path.read_bytes()
    assert ranges[0].start == plan.data_offset and ranges[-1].end == plan.size
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    assert all(data[r.start - 1 : r.start] == b"\n" for r in ranges[1:])
    assert all(r.first_line == data.count(b"\n", 0, r.start) + 1 for r in ranges)
    assert len(ranges) == (1 if target > len(data) else len(ranges))
    assert target > len(data) or len(ranges) >= len(data) // max(target, 1000) - 1


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_byte_ranges_shrink_towards_the_end_so_no_worker_scans_alone(
    generated: Path, workers: int
) -> None:
    """Guided self-scheduling: a range is at most the rest over twice the workers (plus
    the planning block its cut falls in), so the last ranges are small."""
    block = 1000
    plan = plan_file(generated / "user_experiments.csv", EXPERIMENTS, block=block)
    ranges = split_ranges(plan, 1 << 30, workers)
    assert ranges[0].start == plan.data_offset and ranges[-1].end == plan.size
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    for r in ranges[:-1]:
        assert r.end - r.start < (plan.size - r.start) // (2 * workers) + block
    sizes = [r.end - r.start for r in ranges]
    assert len(ranges) >= 2 * workers
    assert sizes[-1] < sizes[0] // 2


@pytest.mark.parametrize(
    ("partitions", "workers", "range_bytes", "chunk_bytes"),
    [(1, 1, 1 << 30, 8 << 20), (4, 1, 20_000, 4096), (7, 2, 9_000, 1000), (64, 2, 1 << 30, 8192)],
)
async def test_results_do_not_depend_on_the_split(
    settings: Settings,
    generated: Path,
    monkeypatch: pytest.MonkeyPatch,
    partitions: int,
    workers: int,
    range_bytes: int,
    chunk_bytes: int,
) -> None:
    monkeypatch.setattr(etl, "RANGE_BYTES", range_bytes)
    # Many small flushes per spill (seen in this process: with one worker thread).
    monkeypatch.setattr(spill, "BUFFER_BYTES", 100)
    tuned = dataclasses.replace(
        settings, partitions=partitions, workers=workers, chunk_bytes=chunk_bytes
    )
    run = await run_once(tuned, generated)
    assert run["status"] == "succeeded", run
    assert await loaded(tuned) == obvious(generated)
    assert list(settings.tmp_dir.iterdir()) == []


async def test_failed_run_leaves_no_temporary_files(settings: Settings, generated: Path) -> None:
    path = generated / "user_experiments.csv"
    path.write_text(path.read_text() + "\n999999,\t424242,\t1,\t5", encoding="utf-8")
    forced = dataclasses.replace(settings, partitions=5, workers=2, chunk_bytes=4096)
    run = await run_once(forced, generated)
    assert run["status"] == "failed"
    assert "unknown user_id 424242" in run["errors"][0]["message"]
    assert list(settings.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("phase", ["reading", "loading"])
async def test_cancelled_run_ends_within_two_seconds_and_leaves_no_temporary_files(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    directory = settings.tmp_dir.parent / "big"
    generate(directory, users=20_000, experiments=200_000, compounds=500, seed=3)
    monkeypatch.setattr(etl, "RANGE_BYTES", 256 << 10)
    forced = dataclasses.replace(settings, partitions=32, workers=2, chunk_bytes=64 << 10)
    async with open_pool(forced) as pool:
        with executor_for(forced) as executor:
            runner = Runner(pool, executor, forced)
            run = await runner.submit(directory_request(directory))
            while runner.pipeline is None or runner.pipeline.progress.phase != phase:
                assert runner.task is not None and not runner.task.done()
                await asyncio.sleep(0.005)
            asked = time.monotonic()
            cancelled = await runner.cancel(run["id"])
            took = time.monotonic() - asked
    assert cancelled["status"] == "cancelled"
    assert took < 2.0  # every task sees the stop file: queued ones end before they start
    assert list(settings.tmp_dir.iterdir()) == []


def test_worker_tasks_pause_the_garbage_collector_and_resume_it() -> None:
    """Paused for a task in a worker process, back on after it; threads keep it."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as one_worker:
        assert one_worker.submit(run_task, gc.isenabled).result() is False
        assert one_worker.submit(gc.isenabled).result() is True
    assert run_task(gc.isenabled) is True  # this process, as a thread worker's


async def test_a_hot_users_partition_is_aggregated_in_slices_with_the_same_results(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partition holding a robot's 30% of all experiments is cut into slices (seen in
    this process: one worker thread), and the merged slices give the obvious results."""
    directory = tmp_path / "hot"
    generate(directory, users=200, experiments=3000, compounds=40, seed=5, shape="hot")
    monkeypatch.setattr(spill, "BUFFER_BYTES", 2000)  # many flushes: slices can be cut
    monkeypatch.setattr(etl, "MIN_SLICE_BYTES", 1)
    sliced: list[int] = []
    real = etl._slices
    monkeypatch.setattr(etl, "_slices", lambda *a: sliced.append(len(s := real(*a))) or s)
    forced = dataclasses.replace(settings, partitions=8, workers=1, chunk_bytes=4096)
    run = await run_once(forced, directory)
    assert run["status"] == "succeeded", run
    *others, robot = sorted(sliced)
    assert set(others) == {1} and robot >= 2  # only the robot's partition is cut
    assert await loaded(forced) == obvious(normalised(directory, tmp_path / "plain"))


def test_slices_cover_a_partitions_bytes_once_in_order(tmp_path: Path) -> None:
    offsets = [array("q", range(0, 10 * k + 1, k)) for k in (3, 50, 7)]
    extents = [spill.Extent(str(tmp_path / str(i)), o[:-1], o[1:]) for i, o in enumerate(offsets)]
    for size in (1, 10, 60, 200, 1000):
        runs = etl._slices(extents, size)
        ranges = [
            (e.path, s, t)
            for run in runs
            for e in run
            for s, t in zip(e.starts, e.ends, strict=True)
        ]
        assert ranges == [
            (e.path, s, t) for e in extents for s, t in zip(e.starts, e.ends, strict=True)
        ]
        sizes = [sum(e.size for e in run) for run in runs]
        assert sum(sizes) == 600
        assert all(n >= size // 2 for n in sizes[:-1]) and (
            len(runs) == 1 or sizes[-1] >= size // 2
        )


def test_a_scan_parses_a_block_at_a_time_whatever_the_column_order(tmp_path: Path) -> None:
    """Rows the fast path cannot take (the columns in another order) are parsed a block
    at a time as well: the scan's peak is about the fast path's, never the configured
    chunk's (8 MiB blocks of parsed rows: 1M experiments took 356 MB against 175 MB)."""
    generate(tmp_path / "usual", users=2000, experiments=100_000, compounds=200, seed=3)
    usual = tmp_path / "usual" / EXPERIMENTS.filenames[0]
    swapped = tmp_path / "swapped" / usual.name
    swapped.parent.mkdir()
    lines = [f.split(",\t") for f in usual.read_text(encoding="utf-8").splitlines()]
    swapped.write_text("".join(",\t".join([f[1], f[0], *f[2:]]) + "\n" for f in lines))
    found = []
    for path in (usual, swapped):
        plan = scan_plan(plan_file(path, EXPERIMENTS, scan=False), 1 << 20)
        whole = ByteRange(plan.data_offset, plan.size, plan.header_line + 1)
        result, peak = traced_peak(scan_experiments, plan, whole, path.parent, "scan", 4, 8 << 20)
        found.append((fastpath.eligible(plan), result.rows, result.error_total, peak))
    (fast, rows, errors, peak), (fast_swapped, rows_swapped, errors_swapped, peak_swapped) = found
    assert (fast, fast_swapped) == (True, False)
    assert (rows_swapped, errors_swapped) == (rows, errors) == (len(lines) - 1, 0)
    assert usual.stat().st_size > 8 * fastpath.BLOCK
    assert peak_swapped < 2 * peak, (peak_swapped, peak)
