"""Operating the server: readiness, graceful shutdown, crash recovery, JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
from test_web_support import (
    RUN_TIMEOUT,
    Serve,
    free_port,
    problem,
    run_to_the_end,
    start_process,
    status_of,
    until_healthy,
    wait_for,
)

from service.db import sql
from service.logs import JsonFormatter
from service.settings import Settings

pytest_plugins = ["test_web_support"]
SAMPLE = Path(__file__).resolve().parent.parent / "data"

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Proxy:
    """A TCP forwarder to the test database that a test can cut, freeze and restore.

    ``freeze`` makes the open connections stop forwarding without closing them (no FIN,
    no RST: a network fault, or a failover behind a virtual IP); new connections work.
    """

    def __init__(self, database_url: str) -> None:
        self.target = urlsplit(database_url)
        query = dict(parse_qsl(self.target.query))
        socket_dir = query.pop("host", "")
        port = self.target.port or 5432
        self.connect: Callable[[], Awaitable[Streams]]
        if socket_dir.startswith("/"):  # the embedded server listens on a Unix socket
            self.connect = partial(asyncio.open_unix_connection, f"{socket_dir}/.s.PGSQL.{port}")
        else:
            self.connect = partial(asyncio.open_connection, self.target.hostname, port)
        self.query = urlencode(query)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.flows: dict[asyncio.StreamWriter, Flow] = {}

    @property
    def url(self) -> str:
        userinfo = self.target.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit((self.target.scheme, netloc, self.target.path, self.query, ""))

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every forwarded connection, as a dying server would."""
        if self.server is None:
            return
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        for flow in self.flows.values():
            flow.cut()
        await self.server.wait_closed()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server = None

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        self.writers.add(writer)
        try:
            up_reader, up_writer = await self.connect()
        except OSError:
            writer.transport.abort()
            return
        self.writers.add(up_writer)
        flow = self.flows[writer] = Flow()
        try:
            await asyncio.gather(_pipe(reader, up_writer, flow), _pipe(up_reader, writer, flow))
        finally:
            for each in (writer, up_writer):
                each.transport.abort()
                self.writers.discard(each)
            self.flows.pop(writer, None)
            self.tasks.discard(task)  # type: ignore[arg-type]

    def freeze(self) -> int:
        """Stop forwarding on every open connection; how many were frozen."""
        for flow in self.flows.values():
            flow.gate.clear()
        return len(self.flows)

    def reset_frozen(self) -> None:
        """Cut the frozen connections at last (the RST that finally arrives): what they
        held back is lost, as it would be on the wire."""
        for writer, flow in list(self.flows.items()):
            if not flow.gate.is_set():
                writer.transport.abort()
                flow.cut()


class Flow:
    """Whether one forwarded connection passes bytes (``gate`` set) or was cut."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.open = True

    def cut(self) -> None:
        self.open = False
        self.gate.set()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow) -> None:
    try:
        while data := await reader.read(65536):
            await flow.gate.wait()
            if not flow.open:
                break
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[Proxy]:
    forwarder = Proxy(database_url)
    await forwarder.open()
    yield forwarder
    await forwarder.close()


async def test_readiness_follows_the_database_and_liveness_does_not(
    proxy: Proxy, serve: Serve
) -> None:
    client = await serve(database_url=proxy.url)
    assert await status_of(client, "/readyz") == 200

    await proxy.close()
    async with client.get("/readyz") as response:
        await problem(response, 503)
        assert response.headers["Retry-After"]
    assert await status_of(client, "/healthz") == 200

    await proxy.open()
    statuses = []
    for _ in range(50):
        statuses.append(await status_of(client, "/readyz"))
        if statuses[-1] == 200:
            break
        await asyncio.sleep(0.1)
    assert statuses[-1] == 200, statuses


async def test_database_down_at_start_then_back_recovers_by_itself(
    proxy: Proxy, serve: Serve
) -> None:
    await proxy.close()  # the database is unreachable before the server starts
    client = await serve(database_url=proxy.url)
    assert await status_of(client, "/healthz") == 200
    async with client.get("/readyz") as response:
        await problem(response, 503)
    started = time.monotonic()
    async with client.post("/runs") as response:
        body = await problem(response, 503)
    assert time.monotonic() - started < 2, "POST /runs must fail fast while the database is down"
    assert body["type"].endswith("database-unavailable")
    assert response.headers["Retry-After"]

    await proxy.open()
    for _ in range(100):
        if await status_of(client, "/readyz") == 200:
            break
        await asyncio.sleep(0.1)
    async with client.get("/runs") as response:
        assert (await response.json())["runs"] == []  # the refused POST left nothing behind
    async with client.post("/runs") as response:
        assert response.status == 202
        run = await response.json()
    assert (await wait_for(client, run["id"], {"succeeded", "failed"}))["status"] == "succeeded"


async def test_start_up_marks_runs_of_a_dead_process_failed(
    serve: Serve, settings: Settings
) -> None:
    await serve()  # creates the schema
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )
    try:
        # Run locks are per database, not per schema: an id no other suite's run will have.
        orphan = await conn.fetchval(
            "INSERT INTO etl_runs (id, status, source) VALUES ($1, 'running', $2::jsonb) "
            "RETURNING id",
            random.randint(10**6, 2**31 - 1),
            json.dumps({"kind": "directory", "path": "/gone"}),
        )
    finally:
        await conn.close()
    client = await serve()
    async with client.get(f"/runs/{orphan}") as response:
        run = await response.json()
    assert run["status"] == "failed"
    assert "stopped unexpectedly" in run["message"]


def start_server(port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``experiment-etl serve`` on ``port`` in a subprocess, its output in ``log_path``."""
    return start_process(["service", "serve", "--port", str(port)], env, log_path)


def server_env(settings: Settings, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of an ``experiment-etl serve`` subprocess on the test's database."""
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url or "",
        "ETL_DB_SCHEMA": settings.db_schema or "",
        "ETL_DATA_DIR": str(data_dir),
        "ETL_TMP_DIR": str(settings.tmp_dir),
        "ETL_WORKERS": "1",
        "ETL_API_TOKEN": "",
        **extra,
    }


async def until_ready(
    client: aiohttp.ClientSession, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Wait for a server subprocess to answer ``/readyz`` with 200."""
    for _ in range(300):
        assert process.poll() is None, log_tail(log_path)
        try:
            if await status_of(client, "/readyz") == 200:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the server never became ready\n" + log_tail(log_path))


def log_tail(log_path: Path) -> str:
    return log_path.read_text()[-4000:]


def worker_processes(server_pid: int) -> list[psutil.Process]:
    """A server's pool workers (its spawned children, not the resource tracker)."""
    return [
        child
        for child in psutil.Process(server_pid).children()
        if any("spawn_main" in part for part in child.cmdline())
    ]


async def serve_a_running_run(
    settings: Settings, big_dataset: Path, log_path: Path, **more_env: str
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """``experiment-etl serve`` in a subprocess with a long run going; the process and run."""
    port = free_port()
    env = server_env(settings, big_dataset, ETL_WORKERS="2", **more_env)
    process = start_server(port, env, log_path)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            await until_healthy(client, process)
            async with client.post("/runs") as response:
                assert response.status == 202
                run = await response.json()
            running = await wait_for(client, run["id"], {"running", "succeeded", "failed"})  # type: ignore[arg-type]
            assert running["status"] == "running", running
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, run


async def test_sigkill_mid_run_is_marked_failed_at_restart_and_the_next_run_succeeds(
    settings: Settings, big_dataset: Path, tmp_path: Path, serve: Serve
) -> None:
    process, run = await serve_a_running_run(settings, big_dataset, tmp_path / "serve.log")
    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "the run's worker processes"
    process.kill()
    process.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived the killed server: {alive}"
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )
    try:
        # PostgreSQL notices the dead client and frees its run lock within moments.
        for _ in range(100):
            if await conn.fetchval(sql.RUN_LOCK, run["id"]):
                await conn.fetchval(sql.RUN_UNLOCK, run["id"])
                break
            await asyncio.sleep(0.1)
        assert await conn.fetchval("SELECT status FROM etl_runs WHERE id = $1", run["id"]) in (
            "running",
            "queued",
        )
    finally:
        await conn.close()

    client = await serve()  # a new server on the same database (sample data)
    async with client.get(f"/runs/{run['id']}") as response:
        killed = await response.json()
    assert killed["status"] == "failed"
    assert "stopped unexpectedly" in killed["message"]
    async with client.post("/runs") as response:
        assert response.status == 202
        again = await response.json()
    assert (await wait_for(client, again["id"], {"succeeded", "failed"}))["status"] == "succeeded"


async def test_sigterm_cancels_the_active_run_and_exits_zero(
    settings: Settings, big_dataset: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    process, run = await serve_a_running_run(settings, big_dataset, log_path)
    try:
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 10)
        assert time.monotonic() - signalled < 10
        assert code == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )
    try:
        row = await conn.fetchrow("SELECT status, message FROM etl_runs WHERE id = $1", run["id"])
    finally:
        await conn.close()
    assert row is not None and row["status"] == "cancelled", row

    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    finished = [e for e in lines if e.get("event") == "finish" and e.get("run_id") == run["id"]]
    assert finished and finished[0]["status"] == "cancelled"
    access = [e for e in lines if e.get("event") == "access" and e["path"] == "/runs"]
    assert access[0]["method"] == "POST" and access[0]["run_id"] == run["id"]
    assert {"ts", "level", "logger", "msg", "status", "duration_ms"} <= set(access[0])


def test_json_formatter_writes_one_object_per_line_with_extras() -> None:
    logger = logging.getLogger("service.test")
    record = logger.makeRecord(
        "service.test",
        logging.WARNING,
        __file__,
        1,
        "run %s stopped",
        (7,),
        None,
        extra={"run_id": 7, "event": "finish", "status": "cancelled", "detail": None},
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "run 7 stopped"
    assert (entry["level"], entry["logger"]) == ("WARNING", "service.test")
    assert (entry["run_id"], entry["event"], entry["status"]) == (7, "finish", "cancelled")
    assert entry["ts"].endswith("+00:00")


def test_json_formatter_keeps_the_traceback_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exc"]


async def test_the_embedded_database_killed_mid_run_is_started_again(
    big_dataset: Path, tmp_path: Path
) -> None:
    """The default database is the server's own: SIGKILLed mid-COPY (the OOM killer), it
    is started again. The run fails saying the connection failed, in one log line; the
    old results stay; the next run succeeds, all without restarting the server."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data / "sample")
    shutil.copytree(big_dataset, data / "big")
    (tmp_path / "spill").mkdir()
    pgdata = tmp_path / "pgdata"
    env = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        "ETL_EMBEDDED_DIR": str(pgdata),
        "ETL_DATA_DIR": str(data),
        "ETL_TMP_DIR": str(tmp_path / "spill"),
        "ETL_WORKERS": "2",
        "ETL_API_TOKEN": "",
    }
    port, log_path = free_port(), tmp_path / "serve.log"
    process = start_server(port, env, log_path)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            await until_ready(client, process, log_path)
            first = await run_to_the_end(client, "sample")
            before = await features(client, 1)
            async with client.post("/runs", json={"dataset": "big"}) as response:
                assert response.status == 202, await response.text()
                run = await response.json()
            for _ in range(3000):  # the COPY streams in the loading phase
                if (await live(client, run["id"]))["progress"]["phase"] == "loading":
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the run never started loading")
            killed = await postmaster(pgdata)
            os.kill(killed, signal.SIGKILL)

            failed = await wait_for(client, run["id"], {"succeeded", "failed", "cancelled"})
            assert failed["status"] == "failed", failed
            assert failed["message"].startswith(
                "the connection to the database failed (the embedded PostgreSQL): "
            ), failed
            assert await postmaster(pgdata) != killed  # a new server, on the same data
            assert await features(client, 1) == before
            again = await run_to_the_end(client, "sample")
            assert again["stats"]["experiments"] == first["stats"]["experiments"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert [e["msg"] for e in lines if "exc" in e] == []  # operational: no traceback
    assert any(e["msg"] == "the embedded PostgreSQL stopped: starting it again" for e in lines)


async def live(client: aiohttp.ClientSession, run_id: int) -> dict[str, Any]:
    """A run as the API shows it, while the database may be away (503 meanwhile)."""
    async with asyncio.timeout(RUN_TIMEOUT):
        while True:
            async with client.get(f"/runs/{run_id}") as response:
                if response.status == 200:
                    return dict(await response.json())
            await asyncio.sleep(0.05)


async def features(client: aiohttp.ClientSession, user_id: int) -> dict[str, Any]:
    async with client.get(f"/users/{user_id}/features") as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def postmaster(pgdata: Path) -> int:
    """The pid of the embedded server's running postmaster (postmaster.pid's first line)."""
    for _ in range(200):
        pid_file = pgdata / "postmaster.pid"
        first = pid_file.read_text().split("\n", 1)[0] if pid_file.exists() else ""
        if first.isdigit() and psutil.pid_exists(int(first)):
            return int(first)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no running postmaster for {pgdata}")
