"""Run records never lie, and the service heals itself: one test per fault found.

Each test reproduces one finding of issue 12 as an operator would (a signal at the worst
moment, a killed worker, a dead server's leftovers, a frozen connection, a full disk) and
checks the run's record against what is really live, then that the next run works.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
from badinput import checksum, connect, scratch_tables
from test_faults import admin, app_settings, assert_clean, medium_data
from test_web_ops import (
    Proxy,
    serve_a_running_run,
    server_env,
    start_server,
    until_ready,
    worker_processes,
)
from test_web_support import (
    BIG,
    ROOT,
    RUN_TIMEOUT,
    SMALL_CHUNKS,
    Client,
    Serve,
    free_port,
    problem,
    status_of,
    wait_for,
)

from service.db import sql
from service.db.database import open_pool
from service.faults import describe
from service.jobs import run_once
from service.recovery import ORPHANED, reap
from service.runstore import RunStore
from service.settings import Settings
from service.web.keys import EXECUTOR
from service.workers import make_executor

pytest_plugins = ["test_web_support"]
__all__ = ["admin", "app_settings", "medium_data"]  # fixtures


async def test_sigterm_right_after_the_swap_commit_keeps_the_run_succeeded(
    settings: Settings, tmp_path: Path
) -> None:
    """Finding 1: a cancellation after COMMIT must not turn ``succeeded`` into ``cancelled``.

    A watcher polls the run's row as fast as it can and sends SIGTERM the moment the row
    leaves ``running``: the server is then still dropping the replaced tables and
    removing temporary files.
    """
    async with connect(settings) as watcher:
        for attempt in range(3):
            port = free_port()
            env = server_env(settings, settings.data_dir)
            process = start_server(port, env, tmp_path / f"serve-{attempt}.log")
            try:
                async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
                    await until_ready(client, process, tmp_path / f"serve-{attempt}.log")
                    async with client.post("/runs") as response:
                        assert response.status == 202
                        run = await response.json()
                query = await watcher.prepare("SELECT status FROM etl_runs WHERE id = $1")
                status = "queued"
                async with asyncio.timeout(30):
                    while status in ("queued", "running"):
                        status = await query.fetchval(run["id"])
                process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(process.wait, 10)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            row = await watcher.fetchrow(
                "SELECT status, message, stats FROM etl_runs WHERE id = $1", run["id"]
            )
            assert row is not None
            assert (row["status"], row["message"]) == ("succeeded", None), (attempt, dict(row))
            assert json.loads(row["stats"])["rows_loaded"]["experiment_counts"] == 10
            assert code == 0, (tmp_path / f"serve-{attempt}.log").read_text()[-3000:]
            lines = [
                json.loads(line)
                for line in (tmp_path / f"serve-{attempt}.log").read_text().splitlines()
                if line.startswith("{")
            ]
            finished = [e for e in lines if e.get("event") == "finish"]
            assert [e["status"] for e in finished] == ["succeeded"], finished
    assert (await checksum(settings))["experiment_counts"][0] == 10


async def test_a_killed_worker_fails_that_run_clearly_and_the_next_run_works(
    settings: Settings, big_dataset: Path, tmp_path: Path
) -> None:
    """Finding 2: the OOM killer's SIGKILL of one worker must not break the service."""
    process, run = await serve_a_running_run(settings, big_dataset, tmp_path / "serve.log")
    port = int(process.args[-1])  # type: ignore[index]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            workers = worker_processes(process.pid)
            assert len(workers) == 2, workers
            workers[0].kill()
            failed = await wait_for(
                client,  # type: ignore[arg-type]
                run["id"],
                {"succeeded", "failed", "cancelled"},
            )
            assert failed["status"] == "failed", failed
            assert failed["message"] == "a worker process died (signal 9; out of memory?)"
            assert await status_of(client, "/readyz") == 200
            # The pool is replaced after the run's record is final: give it a moment.
            # Exactly two workers, none of the old set: the survivor of the broken set
            # must be stopped too, not left beside the new ones.
            replaced = worker_processes(process.pid)
            deadline = time.monotonic() + 10
            while set(replaced) & set(workers) or len(replaced) != 2:
                assert time.monotonic() < deadline, (workers, replaced)
                await asyncio.sleep(0.05)
                replaced = worker_processes(process.pid)
            async with client.post("/runs") as response:
                assert response.status == 202, await response.text()
                again = await response.json()
            done = await wait_for(
                client,  # type: ignore[arg-type]
                again["id"],
                {"succeeded", "failed", "cancelled"},
            )
            assert done["status"] == "succeeded", done
            assert done["stats"]["experiments"] == BIG["experiments"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "BrokenProcessPool" not in log


async def test_workers_that_cannot_be_restarted_make_readyz_503(
    serve: Serve, settings: Settings
) -> None:
    """Finding 2: no working workers means not ready, so an orchestrator restarts us."""
    starts: list[int] = []

    def factory(workers: int) -> Executor:
        starts.append(workers)
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    client = await serve(workers=2)
    assert client.app is not None
    pool = client.app[EXECUTOR]
    pool.factory = factory
    try:
        assert await status_of(client, "/readyz") == 200
        for process in psutil.Process().children():  # the app's two workers
            if any("spawn_main" in part for part in process.cmdline()):
                process.kill()
        for _ in range(100):
            if pool.needs_repair:
                break
            await asyncio.sleep(0.05)
        async with client.post("/runs") as response:
            body = await problem(response, 503)
        assert body["detail"] == (
            "worker processes could not be started: [Errno 11] Resource temporarily unavailable"
        )
        async with client.get("/readyz") as response:
            body = await problem(response, 503)
        assert "could not be started" in body["detail"]
        assert await status_of(client, "/healthz") == 200
        assert starts == [2]
    finally:
        pool.factory = make_executor
    # Once workers can start again, the next run starts them: ready, and the run works.
    async with client.post("/runs") as response:
        assert response.status == 202
        run = await response.json()
    assert (await wait_for(client, run["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    assert await status_of(client, "/readyz") == 200


HOLD_A_SCRATCH_DIR = """
import sys, time
from pathlib import Path
from typing import Any
from service.scratch import ScratchDir
scratch = ScratchDir(sys.argv[1], Path(sys.argv[2]))
print(scratch.path, flush=True)
time.sleep(3600)
"""


def hold_scratch_dir(prefix: str, parent: Path) -> tuple[subprocess.Popen[str], Path]:
    """Another process of the service that owns a temporary directory until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_SCRATCH_DIR, prefix, str(parent)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert holder.stdout is not None
    path = Path(holder.stdout.readline().strip())
    holder.stdout.close()
    return holder, path


async def test_start_up_removes_temporary_directories_of_dead_processes_only(
    settings: Settings, big_dataset: Path, tmp_path: Path
) -> None:
    """Finding 3: a SIGKILLed server's spill (and upload) directories go at the next start;
    a live process's, and anything not of this service, stay."""
    process, _ = await serve_a_running_run(settings, big_dataset, tmp_path / "serve.log")
    spill = settings.tmp_dir
    for _ in range(100):  # the run has begun spilling
        if any(p.name.startswith("etl-run-") for p in spill.iterdir()):
            break
        await asyncio.sleep(0.05)
    process.kill()
    process.wait()
    dead_upload, dead_upload_dir = hold_scratch_dir("etl-upload-", spill)
    dead_upload.kill()
    dead_upload.wait()
    live, live_dir = hold_scratch_dir("etl-upload-", spill)
    foreign = spill / "etl-run-not-ours.txt"
    foreign.write_text("a file, not a directory of ours")
    elsewhere = spill / "someone-elses"
    elsewhere.mkdir()
    left = sorted(p.name for p in spill.iterdir() if p.name.startswith("etl-run-") and p.is_dir())
    assert left, "the killed server left its spill directory"
    assert dead_upload_dir.exists()
    try:
        run = await run_once(settings, settings.data_dir)
        assert run["status"] == "succeeded", run
        assert sorted(spill.iterdir()) == sorted([live_dir, foreign, elsewhere])
        assert (live_dir / ".owner.lock").exists()
    finally:
        live.kill()
        live.wait()


async def wait_for_phase(client: Client, run_id: int, phase: str) -> None:
    async with asyncio.timeout(RUN_TIMEOUT):
        while True:
            async with client.get(f"/runs/{run_id}") as response:
                run = await response.json()
            assert run["status"] in ("queued", "running"), run
            if run["progress"]["phase"] == phase:
                return
            await asyncio.sleep(0.02)


async def run_and_wait(client: Client, dataset: str | None = None) -> dict[str, Any]:
    async with client.post("/runs", json={"dataset": dataset or ""}) as response:
        assert response.status == 202, await response.text()
        run = await response.json()
    return await wait_for(client, run["id"], {"succeeded", "failed", "cancelled"})


SLOW_DROPS = r"""
CREATE FUNCTION etl_test_slow_drop() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects()
               WHERE object_type = 'table' AND object_name LIKE '%\_retired') THEN
        PERFORM pg_sleep(0.5);
    END IF;
END $$;
CREATE EVENT TRIGGER etl_test_slow_drops ON sql_drop EXECUTE FUNCTION etl_test_slow_drop();
"""


async def test_a_shutdown_right_after_the_swap_lets_the_run_drop_the_tables_it_replaced(
    serve: Serve, settings: Settings, admin: asyncpg.Connection
) -> None:
    """The server stops as soon as a run reads succeeded, while the run still drops the
    tables its swap replaced (slowed to 0.5 s a table here): shutdown lets it finish, so
    no replaced table is left behind (cut, it left them for the next run)."""
    client = await serve()
    assert (await run_and_wait(client))["status"] == "succeeded"  # tables to replace
    await admin.execute(SLOW_DROPS)
    try:
        assert (await run_and_wait(client))["status"] == "succeeded"
        assert await scratch_tables(settings) != []  # the drop is still going
        await client.close()
    finally:
        await admin.execute(
            "DROP EVENT TRIGGER IF EXISTS etl_test_slow_drops;"
            " DROP FUNCTION IF EXISTS etl_test_slow_drop()"
        )
    assert await scratch_tables(settings) == []


async def test_a_frozen_database_connection_fails_the_run_and_the_next_one_works(
    serve: Serve, big: str, app_settings: Settings, admin: asyncpg.Connection
) -> None:
    """Finding 4: connections that stop answering (no FIN, no RST) mid-COPY must not hang
    the service: the run fails with a clear message, recorded over a fresh connection."""
    settings = app_settings
    assert settings.database_url is not None
    proxy = Proxy(settings.database_url)
    await proxy.open()
    try:
        client = await serve(
            database_url=proxy.url, db_timeout=1.5, chunk_bytes=SMALL_CHUNKS, workers=2
        )
        assert (await run_and_wait(client))["status"] == "succeeded"
        before = await checksum(settings)
        async with client.post("/runs", json={"dataset": big}) as response:
            assert response.status == 202
            run = await response.json()
        await wait_for_phase(client, run["id"], "loading")
        assert proxy.freeze() >= 3  # the run's lock and COPY connections, at least
        frozen = time.monotonic()
        failed = await wait_for(client, run["id"], {"succeeded", "failed", "cancelled"})
        took = time.monotonic() - frozen
        assert failed["status"] == "failed", failed
        assert failed["message"].startswith("database stopped answering"), failed["message"]
        assert took < 10, f"the run took {took:.1f} s to give up on its frozen connections"
        assert await checksum(settings) == before
        assert await status_of(client, "/readyz") == 200
        # The next run works while the frozen connections are still open: nothing they
        # held blocks it.
        assert (await run_and_wait(client))["status"] == "succeeded"
        await client.close()
        proxy.reset_frozen()  # the network cuts them at last
        await assert_clean(settings, admin)
    finally:
        await proxy.close()


MOUNT_AND_RUN = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'


def private_tmpfs_available() -> str | None:
    """Why a tiny tmpfs cannot be mounted in a private mount namespace, or None."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
    )
    return probe.stderr.strip() or None if probe.returncode else None


@pytest.mark.parametrize(
    ("mount", "expected"),
    [
        ("size=256k", "is full: this run needs about 1 MB (ETL_TMP_DIR)"),
        ("ro,size=256k", "permission denied on the spill directory"),
    ],
    ids=["disk-full", "read-only"],
)
async def test_a_full_or_unwritable_spill_directory_is_one_line_on_the_cli(
    settings: Settings, medium_data: Path, tmp_path: Path, mount: str, expected: str
) -> None:
    """Finding 5: say what and where in one line, no traceback, exit 1, old results kept."""
    reason = private_tmpfs_available()
    if reason is not None:
        pytest.skip(f"cannot mount a small tmpfs for the spill directory: {reason}")
    assert (await run_once(settings, settings.data_dir))["status"] == "succeeded"
    before = await checksum(settings)
    spill = tmp_path / "small-disk"
    spill.mkdir()
    command = [
        *("unshare", "-m", "sh", "-c", MOUNT_AND_RUN, "sh", mount, str(spill)),
        *(sys.executable, "-m", "service", "run", str(medium_data)),
        *("--database-url", settings.database_url or "", "--schema", settings.db_schema or ""),
    ]
    env = {**os.environ, "ETL_TMP_DIR": str(spill), "ETL_WORKERS": "2"}
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    failure = [line for line in done.stderr.splitlines() if line.startswith("Run ")]
    assert len(failure) == 1, output
    assert f"spill directory {spill}" in failure[0] and expected in failure[0], failure
    assert await checksum(settings) == before
    assert list(spill.iterdir()) == []  # the tmpfs lived in the run's namespace only


async def test_a_surviving_replica_marks_the_run_of_a_dead_one_failed(
    settings: Settings, big_dataset: Path, tmp_path: Path, serve: Serve
) -> None:
    """Two replicas on one database: when the one running a run dies, the other marks
    that run failed by its periodic reaper, without anyone restarting."""
    survivor = await serve(reap_interval=0.2)
    process, run = await serve_a_running_run(settings, big_dataset, tmp_path / "serve.log")
    async with survivor.post("/runs") as response:  # one run at a time across replicas
        assert (await problem(response, 409))["active_run_id"] == run["id"]
    process.kill()
    process.wait()
    killed = time.monotonic()
    reaped = await wait_for(survivor, run["id"], {"failed", "succeeded", "cancelled"})
    assert reaped["status"] == "failed"
    assert "stopped unexpectedly" in reaped["message"]
    assert time.monotonic() - killed < 5
    assert (await run_and_wait(survivor))["status"] == "succeeded"


def test_operational_faults_read_as_one_line_naming_the_place(settings: Settings) -> None:
    spill = settings.tmp_dir
    full = OSError(errno.ENOSPC, "No space left on device")  # a write names no file
    assert describe(full, settings) == f"spill directory {spill} is full (ETL_TMP_DIR)"
    denied = PermissionError(errno.EACCES, "Permission denied", str(spill / "etl-run-x"))
    assert describe(denied, settings) == (
        f"permission denied on the spill directory {spill}: Permission denied (ETL_TMP_DIR)"
    )
    disk = asyncpg.DiskFullError('could not extend file "base/1/2": No space left on device')
    host = (settings.database_url or "").split("@")[-1]
    assert describe(disk, settings) == (
        f'the database\'s disk is full ({host}): could not extend file "base/1/2": No space'
        " left on device"
    )
    assert describe(TimeoutError(), settings) == (
        "database stopped answering: no reply within 60 s"
    )
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/somewhere/else")
    assert describe(elsewhere, settings) is None  # not the spill directory: not ours to name
    failed = f"the connection to the database failed ({host}): "
    for gone, detail in (
        (
            asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of op"),
            "connection was closed in the middle of op",
        ),
        (asyncpg.AdminShutdownError("terminating connection"), "terminating connection"),
        (asyncpg.CannotConnectNowError("the system is starting up"), "the system is starting up"),
        (ConnectionRefusedError(111, "Connect call failed"), "[Errno 111] Connect call failed"),
        (socket.gaierror(-2, "Name or service not known"), "[Errno -2] Name or service not known"),
        (
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2)"),
            "cannot switch to state 15; another operation (2)",
        ),
    ):
        assert describe(gone, settings) == failed + detail
    assert describe(asyncpg.InternalClientError("something else"), settings) is None


async def test_the_reaper_never_takes_the_run_of_its_own_process(settings: Settings) -> None:
    """A run whose lock went with a connection the database lost (a restart) is still
    running in this process, which records its end itself; another process's reaper, or
    this one's once the run is over, marks it failed as an orphan."""
    async with open_pool(settings) as pool:
        store = RunStore(pool)
        async with pool.acquire() as conn:
            row = await store.create(conn, {"kind": "test"}, {}, None, None)
        await store.start(row["id"])  # running, and nobody holds its lock
        assert await reap(store, mine=row["id"]) == []
        assert await pool.fetchval(sql.RUN_STATUS, row["id"]) == "running"
        assert await reap(store) == [row["id"]]
        ended = await pool.fetchrow(sql.RUN_BY_ID, row["id"])
    assert (ended["status"], ended["message"]) == ("failed", ORPHANED)
