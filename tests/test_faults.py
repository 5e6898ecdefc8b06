"""Faults on a real PostgreSQL: a connection killed mid-COPY, readers during reruns, a
reader that holds its lock, many reruns in a row. Nothing may be lost, half-done or leaked.

Each test's settings carry an ``application_name`` of their own, so the test can find
(and count, and kill) exactly the server backends its runs use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
from badinput import (
    TABLES,
    checksum,
    connect,
    leftovers,
    replace,
    run_rows,
    scratch_tables,
    snapshot,
)

from service.db.database import to_the_end
from service.etl import _as_done
from service.faults import background_faults
from service.generate import generate
from service.jobs import run_once
from service.settings import Settings

TOTALS = """
SELECT (SELECT count(*) FROM experiment_counts),
       (SELECT sum(experiment_count) FROM experiment_counts),
       (SELECT count(*) FROM experiment_averages),
       (SELECT count(*) FROM top_compounds)
"""


@pytest.fixture(scope="module")
def large_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that loading takes seconds: time to find and kill a COPY."""
    directory = tmp_path_factory.mktemp("large")
    generate(directory, users=50_000, experiments=500_000, compounds=1_000)
    return directory


@pytest.fixture(scope="module")
def medium_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("medium")
    generate(directory, users=3_000, experiments=30_000, compounds=100, seed=7)
    return directory


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    """The settings with a unique application_name on every connection the runs open."""
    assert settings.database_url is not None
    name = f"etl-faults-{uuid.uuid4().hex[:10]}"
    joiner = "&" if "?" in settings.database_url else "?"
    return dataclasses.replace(
        settings, database_url=f"{settings.database_url}{joiner}application_name={name}"
    )


def app_name(settings: Settings) -> str:
    assert settings.database_url is not None
    return settings.database_url.rsplit("application_name=", 1)[1]


async def backends(admin: asyncpg.Connection, settings: Settings) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1",
        app_name(settings),
    )


async def totals(settings: Settings) -> tuple[int, ...]:
    async with connect(settings) as conn:
        row = await conn.fetchrow(TOTALS)
    assert row is not None
    return tuple(row)


async def assert_clean(settings: Settings, admin: asyncpg.Connection) -> None:
    """No staging table, no spill file, and no connection of the runs left open."""
    assert await scratch_tables(settings) == []
    assert leftovers(settings.tmp_dir) == []
    for _ in range(50):  # a terminated backend takes a moment to leave pg_stat_activity
        if not await backends(admin, settings):
            break
        await asyncio.sleep(0.05)
    assert await backends(admin, settings) == []


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.mark.parametrize("table", TABLES)
async def test_connection_killed_mid_copy_fails_fast_and_keeps_old_results(
    app_settings: Settings,
    sample_dir: Path,
    large_data: Path,
    admin: asyncpg.Connection,
    table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = app_settings
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    before = await snapshot(settings)

    async def kill_the_copy() -> float:
        while True:
            for backend in await backends(admin, settings):
                if backend["query"].startswith(f'COPY "{table}_staging"'):
                    assert await admin.fetchval("SELECT pg_terminate_backend($1)", backend["pid"])
                    return time.monotonic()
            await asyncio.sleep(0.005)

    killer = asyncio.create_task(kill_the_copy())
    run = await asyncio.wait_for(run_once(settings, large_data), timeout=60)
    finished = time.monotonic()
    assert killer.done(), "the COPY was never seen"
    killed = await killer

    assert run["status"] == "failed", run
    assert finished - killed < 15, "the run took too long to notice its dead connection"
    host = str(settings.database_url).split("@")[-1]
    assert run["message"].startswith(f"the connection to the database failed ({host}): ")
    assert "terminating connection due to administrator command" in run["message"]
    # An operational fault: one line in the log, no traceback (that is for bugs).
    failed = [r for r in caplog.records if r.getMessage().startswith("run failed")]
    assert [(r.levelno, r.exc_info) for r in failed] == [(logging.ERROR, None)], failed
    assert await snapshot(settings) == before
    assert [r["status"] for r in await run_rows(settings)] == ["succeeded", "failed"]
    await assert_clean(settings, admin)


async def test_readers_see_complete_old_or_new_results_during_reruns(
    app_settings: Settings, sample_dir: Path, medium_data: Path, admin: asyncpg.Connection
) -> None:
    settings = app_settings
    expected = {}
    for data in (sample_dir, medium_data):
        assert (await run_once(settings, data))["status"] == "succeeded"
        expected[data] = await totals(settings)
    assert len(set(expected.values())) == 2 and all(all(t) for t in expected.values())

    stop = asyncio.Event()
    seen: Counter[tuple[int, ...]] = Counter()

    async def read() -> None:
        async with connect(settings) as conn:
            while not stop.is_set():
                row = await conn.fetchrow(TOTALS)
                assert row is not None
                seen[tuple(row)] += 1

    readers = [asyncio.create_task(read()) for _ in range(4)]
    try:
        for data in [sample_dir, medium_data] * 3:
            run = await run_once(settings, data)
            assert run["status"] == "succeeded", run
            assert await totals(settings) == expected[data]
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert set(seen) == set(expected.values()), seen
    assert sum(seen.values()) > 100
    await assert_clean(settings, admin)


async def test_swap_gives_up_on_a_reader_that_never_lets_go(
    app_settings: Settings, sample_dir: Path, admin: asyncpg.Connection
) -> None:
    settings = dataclasses.replace(app_settings, lock_timeout=0.2)
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    before = await snapshot(settings)
    replace(sample_dir / "user_experiments.csv", b"\n2,\t1,", b"\n2,\t2,")

    async with connect(settings) as reader:
        lock = reader.transaction()
        await lock.start()
        await reader.fetchval("SELECT count(*) FROM experiment_counts")
        started = time.monotonic()
        run = await asyncio.wait_for(run_once(settings, sample_dir), timeout=30)
        blocked_for = time.monotonic() - started
        assert run["status"] == "failed", run
        assert run["message"] == (
            "SwapBlocked: could not swap in the new results: other sessions held locks on the"
            " result tables through 5 attempts of 0.2 s each; the previous results are unchanged"
        )
        assert blocked_for < 10
        # The reader still sees the old results in its transaction, and so does everyone.
        assert await reader.fetchval("SELECT count(*) FROM experiment_counts") == 10
        assert await snapshot(settings) == before
        await lock.rollback()

    run = await run_once(settings, sample_dir)
    assert run["status"] == "succeeded", run
    counts = {r[0]: r[2] for r in (await snapshot(settings))["experiment_counts"]}
    assert (counts[1], counts[2]) == (1, 2)
    assert [r["status"] for r in await run_rows(settings)] == ["succeeded", "failed", "succeeded"]
    await assert_clean(settings, admin)


async def test_swap_retries_until_a_reader_lets_go(
    app_settings: Settings, sample_dir: Path, admin: asyncpg.Connection
) -> None:
    settings = dataclasses.replace(app_settings, lock_timeout=0.2)
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    replace(sample_dir / "user_experiments.csv", b"\n2,\t1,", b"\n2,\t2,")

    async with connect(settings) as reader:
        lock = reader.transaction()
        await lock.start()
        await reader.fetchval("SELECT count(*) FROM top_compounds")

        async def let_go() -> None:
            await asyncio.sleep(0.5)
            await lock.rollback()

        started = time.monotonic()
        release = asyncio.create_task(let_go())
        run = await asyncio.wait_for(run_once(settings, sample_dir), timeout=30)
        await release
    assert run["status"] == "succeeded", run
    assert time.monotonic() - started >= 0.5
    counts = {r[0]: r[2] for r in (await snapshot(settings))["experiment_counts"]}
    assert (counts[1], counts[2]) == (1, 2)
    await assert_clean(settings, admin)


async def reruns_are_identical(
    settings: Settings, data: Path, admin: asyncpg.Connection, times: int
) -> None:
    first = None
    me = psutil.Process()
    settled = 0  # RSS after two warm-up runs (pools, caches and imports in place)
    for attempt in range(times):
        run = await run_once(settings, data)
        assert run["status"] == "succeeded", run
        current = await checksum(settings)
        first = first or current
        assert current == first
        await assert_clean(settings, admin)
        if attempt == 1:
            settled = me.memory_info().rss
    assert first is not None and first["experiment_counts"][0] == 3_000
    grown = me.memory_info().rss - settled
    assert grown < 32 * 2**20, f"memory grew by {grown / 2**20:.1f} MB over {times} reruns"
    assert len(await run_rows(settings)) == times


async def test_reruns_in_a_row_give_identical_results_and_leak_nothing(
    app_settings: Settings, medium_data: Path, admin: asyncpg.Connection
) -> None:
    await reruns_are_identical(app_settings, medium_data, admin, 10)


@pytest.mark.slow
async def test_a_hundred_reruns_give_identical_results_and_leak_nothing(
    app_settings: Settings, medium_data: Path, admin: asyncpg.Connection
) -> None:
    await reruns_are_identical(app_settings, medium_data, admin, 100)


async def test_a_close_runs_to_its_end_before_a_cancellation_goes_on() -> None:
    """A staged load's close (abort, then release) ends before its caller's cancellation
    goes on. With ``asyncio.shield`` alone the caller went on at once: the chaos soak saw
    a release reset a frozen connection beside an unfinished abort, and the staging
    tables dropped after the run was recorded as over."""
    steps: list[str] = []

    async def close() -> None:
        steps.append("abort")
        await asyncio.sleep(0.2)
        steps.append("release")

    async def caller() -> None:
        await to_the_end(close())
        steps.append("went on")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["abort", "release"]


def unretrieved(loop: asyncio.AbstractEventLoop) -> list[dict[str, object]]:
    """What reaches ``loop``'s exception handler once its dropped tasks are collected."""
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    gc.collect()
    return reported


async def test_calls_that_fail_together_leave_no_exception_unretrieved() -> None:
    """A killed worker fails every call it had: the first failure is the one raised, and
    asyncio must not log the others as 'Task exception was never retrieved'."""
    together, later = asyncio.Event(), asyncio.Event()

    async def fails(when: asyncio.Event) -> int:
        await when.wait()
        raise ValueError("worker gone")

    async def works() -> int:
        return 1

    # Two fail at the same moment; a third fails while the caller is stopping.
    calls = iter([works(), fails(together), fails(together), fails(later)])
    results = _as_done(calls, 4)
    assert await results.__anext__() == 1
    together.set()
    with pytest.raises(ValueError, match="worker gone"):
        await results.__anext__()
    later.set()
    for _ in range(3):
        await asyncio.sleep(0)  # the third has failed meanwhile
    await results.aclose()
    del results, calls
    assert unretrieved(asyncio.get_running_loop()) == []


async def test_a_background_fault_is_one_line_and_a_bug_keeps_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tasks nobody awaits: one that a database fault ended is one warning line; one
    that a bug ended goes to asyncio's own report, traceback and all."""
    loop = asyncio.get_running_loop()

    async def lost() -> None:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")

    async def bug() -> None:
        raise KeyError("a bug")

    loop.set_exception_handler(background_faults)
    try:
        for coro in (lost(), bug()):
            task = loop.create_task(coro)
            await asyncio.sleep(0)
            assert task.done()
            del task  # never awaited: asyncio reports it as it is collected
            gc.collect()
    finally:
        loop.set_exception_handler(None)
    lines = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines[0] == (
        logging.WARNING,
        "Task exception was never retrieved (test_a_background_fault_is_one_line_and_a_bug"
        "_keeps_its_traceback.<locals>.lost): ConnectionDoesNotExistError: connection was"
        " closed in the middle",
        False,
    ), lines
    assert len(lines) == 2, lines
    level, message, traceback = lines[1]
    assert (level, traceback) == (logging.ERROR, True), lines
    assert message.startswith("Task exception was never retrieved") and "KeyError" in message
