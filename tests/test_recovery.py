"""Run records never lie, and the service heals itself: one test per fault found.

Each test reproduces one finding of issue 12 as an operator would (a signal at the worst
moment, a killed worker, a dead server's leftovers, a frozen connection, a full disk) and
checks the run's record against what is really live, then that the next run works.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
from badinput import checksum, connect
from test_web_ops import free_port, start_server, status_of

from service.settings import Settings

pytest_plugins = ["test_web_support"]


def server_env(settings: Settings, data_dir: Path, **extra: str) -> dict[str, str]:
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


async def until_healthy(client: aiohttp.ClientSession, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        assert process.poll() is None, "the server exited at start-up"
        try:
            if await status_of(client, "/readyz") == 200:
                return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the server never became ready")


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
                    await until_healthy(client, process)
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
