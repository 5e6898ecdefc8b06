"""Chaos soak: faults at random moments over many runs; the records must never lie.

A real ``experiment-etl serve`` process, reached by the database through a TCP proxy the
test controls, runs two datasets with different results, always the one whose results
are not live. During each run one fault may strike at a random moment: SIGTERM or SIGKILL
of the server, SIGKILL of a worker process, ``pg_terminate_backend`` of one of its
connections, or every open connection frozen (no FIN, no RST). After each run:

- the run's recorded status is final, and ``succeeded`` ⇔ its results are the live ones
  (otherwise the previous results are);
- no temporary directory is left, and no staging table once the service has had a say;
- no connection is leaked: every backend of the service is idle, holds no advisory lock,
  and there are no more than its pool allows; none at all once the server stopped;
- no stray process: a server that died took its workers with it;
- every fault is an operational one, so no log line carries a traceback: each is one line.

The short variant runs in the default suite; ``-m slow`` runs the long one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
from badinput import checksum, scratch_tables
from test_faults import admin, app_name, app_settings, backends
from test_web_ops import (
    Proxy,
    log_tail,
    server_env,
    start_server,
    until_ready,
    worker_processes,
)
from test_web_support import free_port, status_of

from service.generate import generate
from service.settings import Settings

__all__ = ["admin", "app_settings"]  # fixtures

FAULTS = ("none", "sigterm", "sigkill", "kill_worker", "terminate_backend", "freeze")
DB_TIMEOUT = "2"
POOL_MAX = 10
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two datasets whose results differ (a run of either takes around a second)."""
    root = tmp_path_factory.mktemp("chaos")
    generate(root / "a", users=4_000, experiments=120_000, compounds=300, seed=11)
    generate(root / "b", users=3_000, experiments=90_000, compounds=200, seed=12)
    return root


@dataclasses.dataclass
class Soak:
    settings: Settings
    admin: asyncpg.Connection
    proxy: Proxy
    data: Path
    logs: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    family: list[psutil.Process] = dataclasses.field(default_factory=list)
    starts: int = 0
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    durations: list[float] = dataclasses.field(default_factory=list)

    def env(self) -> dict[str, str]:
        return server_env(
            self.settings,
            self.data,
            DATABASE_URL=self.proxy.url,
            ETL_WORKERS="2",
            ETL_DB_TIMEOUT=DB_TIMEOUT,
        )

    def client(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            f"http://127.0.0.1:{self.port}", timeout=aiohttp.ClientTimeout(total=10)
        )

    async def start(self) -> None:
        """A server (recovering what the last one left), ready to run."""
        self.port = free_port()
        self.starts += 1
        self.process = start_server(self.port, self.env(), self.log_path())
        async with self.client() as client:
            await until_ready(client, self.process, self.log_path())
        self.family = [psutil.Process(self.process.pid), *self.workers()]

    def workers(self) -> list[psutil.Process]:
        assert self.process is not None
        return worker_processes(self.process.pid)

    def log_path(self) -> Path:
        return self.logs / f"serve-{self.starts}.log"

    def log_tail(self) -> str:
        return log_tail(self.log_path())

    async def stopped(self, limit: float = 15) -> int | None:
        """Wait for the server to end; its exit code. No process of it may stay behind."""
        assert self.process is not None
        try:
            code = await asyncio.to_thread(self.process.wait, limit)
        except subprocess.TimeoutExpired:
            self.violations.append(f"server did not stop within {limit} s")
            self.process.kill()
            code = await asyncio.to_thread(self.process.wait)
        _, alive = await asyncio.to_thread(psutil.wait_procs, self.family, 5)
        if alive:
            self.violations.append(f"processes outlived their server: {alive}")
            for process in alive:
                process.kill()
        self.process = None
        return code

    async def run(self, dataset: str) -> dict[str, Any]:
        async with self.client() as client, client.post("/runs", json={"dataset": dataset}) as r:
            assert r.status == 202, await r.text()
            return dict(await r.json())

    async def status(self, run_id: int) -> str:
        return str(await self.admin.fetchval(self.qualified("SELECT status FROM {}"), run_id))

    def qualified(self, query: str) -> str:
        return query.format(f'"{self.settings.db_schema}".etl_runs WHERE id = $1')

    async def wait_final(self, run_id: int, limit: float = 30) -> str:
        deadline = time.monotonic() + limit
        while (status := await self.status(run_id)) not in FINAL:
            if time.monotonic() > deadline:
                self.violations.append(f"run {run_id} still {status} after {limit} s")
                break
            await asyncio.sleep(0.02)
        return status

    async def strike(self, fault: str) -> None:
        assert self.process is not None
        if fault == "sigterm":
            self.process.send_signal(signal.SIGTERM)
            code = await self.stopped()
            if code != 0:
                self.violations.append(f"SIGTERM: exit code {code}\n{self.log_tail()}")
        elif fault == "sigkill":
            self.process.kill()
            await self.stopped()
        elif fault == "kill_worker":
            workers = self.workers()
            if workers:
                self.rng.choice(workers).kill()
        elif fault == "terminate_backend":
            rows = await backends(self.admin, self.settings)
            if rows:
                pid = self.rng.choice(rows)["pid"]
                await self.admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        elif fault == "freeze":
            self.proxy.freeze()
        self.faults[fault] += 1

    async def check_connections(self) -> None:
        rows = await self.admin.fetch(
            """
            SELECT a.pid, a.state, a.query,
                   EXISTS (SELECT 1 FROM pg_locks l
                           WHERE l.pid = a.pid AND l.locktype = 'advisory') AS locked
            FROM pg_stat_activity a WHERE a.application_name = $1
            """,
            app_name(self.settings),
        )
        busy = [dict(r) for r in rows if r["state"] != "idle" or r["locked"]]
        if busy or len(rows) > POOL_MAX:
            self.violations.append(f"connections left busy or too many: {busy or len(rows)}")


async def soak_runs(soak: Soak, runs: int, seed: int) -> None:
    rng = soak.rng = random.Random(seed)
    expected: dict[str, Any] = {}
    live: str | None = None
    durations = soak.durations
    await soak.start()
    for name in ("a", "b"):  # the results each dataset must give, and how long a run takes
        started = time.monotonic()
        run = await soak.run(name)
        assert await soak.wait_final(run["id"]) == "succeeded", soak.log_tail()
        durations.append(round(time.monotonic() - started, 2))
        expected[name] = await checksum(soak.settings)
        live = name
    assert expected["a"] != expected["b"]
    span = min(durations) * 1.2  # faults land mid-run, and now and then just after
    for index in range(runs):
        dataset = "b" if live == "a" else "a"
        before = await checksum(soak.settings)
        fault = FAULTS[index % len(FAULTS)] if index < len(FAULTS) else rng.choice(FAULTS)
        run = await soak.run(dataset)
        await asyncio.sleep(rng.uniform(0, span))
        if fault != "none":
            await soak.strike(fault)
        else:
            soak.faults["none"] += 1
        if soak.process is None:
            await soak.start()  # recovery marks the killed run failed at start-up
        status = await soak.wait_final(run["id"])
        soak.proxy.reset_frozen()  # the network finally cuts what it froze
        soak.outcomes[status] += 1
        now = await checksum(soak.settings)
        if status == "succeeded":
            if now != expected[dataset]:
                soak.violations.append(f"run {run['id']} ({fault}) succeeded, results not live")
            live = dataset
        elif now != before:
            soak.violations.append(f"run {run['id']} ({fault}) {status}, yet results changed")
        async with soak.client() as client:
            for _ in range(100):  # a rebuilt worker set, or a reconnect, takes a moment
                if await status_of(client, "/readyz") == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                soak.violations.append(f"not ready after run {run['id']} ({fault})")
            # The row is final inside the swap; the server then drops the replaced tables,
            # removes the run's scratch directory and reads the row once more. Leftovers
            # are judged once it has finished with the run (bounded: 10 s).
            for _ in range(100):
                async with client.get("/metrics") as response:
                    if "etl_run_in_progress 0.0" in await response.text():
                        break
                await asyncio.sleep(0.1)
            else:
                soak.violations.append(f"run {run['id']} ({fault}) still in progress after 10 s")
        leftovers = [p.name for p in soak.settings.tmp_dir.iterdir()]
        if leftovers:
            soak.violations.append(f"run {run['id']} ({fault}) left {leftovers}")
        if fault != "sigkill" and (tables := await scratch_tables(soak.settings)):
            soak.violations.append(f"run {run['id']} ({fault}) left tables {tables}")
        await soak.check_connections()
    assert soak.process is not None
    soak.process.send_signal(signal.SIGTERM)
    assert await soak.stopped() == 0
    for _ in range(50):
        if not await backends(soak.admin, soak.settings):
            break
        await asyncio.sleep(0.1)
    if rows := await backends(soak.admin, soak.settings):
        soak.violations.append(f"connections left after the server stopped: {rows}")
    soak.violations.extend(tracebacks(soak.logs))


def tracebacks(logs: Path) -> list[str]:
    """The servers' JSON log lines that carry a traceback, each shown by its message."""
    found = []
    for path in sorted(logs.glob("serve-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # not a JSON line: output of the embedded server, say
            if isinstance(entry, dict) and "exc" in entry:
                found.append(f"{path.name}: a traceback in the log: {entry.get('msg')!r}")
    return found


@pytest.fixture
async def soak(
    app_settings: Settings, admin: asyncpg.Connection, datasets: Path, tmp_path: Path
) -> AsyncIterator[Soak]:
    assert app_settings.database_url is not None
    proxy = Proxy(app_settings.database_url)
    await proxy.open()
    logs = tmp_path / "logs"
    logs.mkdir()
    chaos = Soak(app_settings, admin, proxy, datasets, logs)
    try:
        yield chaos
    finally:
        if chaos.process is not None:
            chaos.process.kill()
            chaos.process.wait()
        await proxy.close()
        summary = {
            "runs": sum(chaos.outcomes.values()),
            "server starts": chaos.starts,
            "faults": dict(chaos.faults),
            "outcomes": dict(chaos.outcomes),
            "violations": len(chaos.violations),
            "run seconds (a, b)": chaos.durations,
        }
        print(f"\nchaos soak: {json.dumps(summary)}")
        for violation in chaos.violations:
            print(f"  violation: {violation}")


async def test_chaos_soak_short(soak: Soak) -> None:
    await soak_runs(soak, runs=12, seed=int(os.environ.get("CHAOS_SEED", "12")))
    assert soak.violations == []


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_chaos_soak_long(soak: Soak) -> None:
    await soak_runs(soak, runs=60, seed=int(os.environ.get("CHAOS_SEED", "60")))
    assert soak.violations == []
