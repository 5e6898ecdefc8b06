"""Byte ranges, partitions and spill files: the split never changes results or leaks files."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from test_equivalence import loaded, obvious

from service import etl
from service.db.database import open_pool
from service.generate import generate
from service.jobs import Runner, directory_request, run_once
from service.pipeline import spill
from service.pipeline.csvfile import EXPERIMENTS, plan_file, split_ranges
from service.settings import Settings
from service.workers import executor_for


@pytest.fixture
def generated(settings: Settings) -> Path:
    directory = settings.tmp_dir.parent / "generated"
    generate(directory, users=300, experiments=3000, compounds=40, seed=7)
    return directory


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_byte_ranges_cover_the_data_and_start_at_line_starts(generated: Path, parts: int) -> None:
    plan = plan_file(generated / "user_experiments.csv", EXPERIMENTS)
    ranges = split_ranges(plan, parts)
    data = plan.path.read_bytes()
    assert ranges[0][0] == plan.data_offset and ranges[-1][1] == plan.size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert all(data[start - 1 : start] == b"\n" for start, _ in ranges[1:])
    assert len(ranges) == parts


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
    # Many small pieces per partition (seen in this process: with one worker thread).
    monkeypatch.setattr(spill, "PIECE_BYTES", 100)
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
async def test_cancelled_run_leaves_no_temporary_files(
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
            cancelled = await runner.cancel(run["id"])
    assert cancelled["status"] == "cancelled"
    assert list(settings.tmp_dir.iterdir()) == []


def test_worker_tasks_pause_the_garbage_collector_and_resume_it() -> None:
    """Paused for a task in a worker process, back on after it; threads keep it."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as one_worker:
        assert one_worker.submit(etl._task, gc.isenabled).result() is False
        assert one_worker.submit(gc.isenabled).result() is True
    assert etl._task(gc.isenabled) is True  # this process, as a thread worker's
