"""The pipeline's tasks on a real Dask cluster (scheduler and two worker processes).

Results must be exactly those of the local executor; a worker killed mid-run changes
nothing; cancelling stops the cluster's tasks; a cluster that cannot run the tasks
(unreachable, other code, no shared directory) is one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dask_cluster import Cluster, running_cluster
from test_equivalence import Tables, loaded, obvious
from test_generate import normalised
from test_web_api import (
    test_cancel_stops_the_run_and_keeps_previous_results as cancel_keeps_previous_results,
)
from test_web_api import (
    test_run_is_accepted_polled_to_success_and_features_served as run_polled_and_served,
)
from test_web_ops import free_port, serve_a_running_run
from test_web_support import Serve, problem, run_script

from service import cluster as cluster_module
from service import etl
from service.cluster import ClusterError, open_executor, version_mismatch
from service.db.database import open_pool
from service.generate import generate
from service.jobs import Runner, directory_request, run_once
from service.settings import Settings
from service.workers import executor_for

pytest_plugins = ["test_web_support"]

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("dense", "sparse", "hot")
GENERATOR_SHAPES = "shape" in inspect.signature(generate).parameters


@pytest.fixture(scope="module")
def dask(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster


def on(cluster: Cluster, settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, dask_scheduler=cluster.address, **changes)


async def both_ways(settings: Settings, dask: Cluster, source: Path) -> tuple[Tables, Tables]:
    """The tables after a run on the local executor, and after the same run on Dask."""
    local = await run_once(settings, source)
    assert local["status"] == "succeeded", local
    expected = await loaded(settings)
    remote = await run_once(on(dask, settings), source)
    assert remote["status"] == "succeeded", remote
    assert remote["stats"]["rows_loaded"] == local["stats"]["rows_loaded"]
    return expected, await loaded(settings)


def generated(directory: Path, shape: str, experiments: int = 4000) -> Path:
    if shape != "dense" and not GENERATOR_SHAPES:
        pytest.skip(f"the generator has no --shape yet (issue 11): {shape} not generated")
    extra = {"shape": shape} if GENERATOR_SHAPES else {}
    generate(directory, users=400, experiments=experiments, compounds=60, seed=5, **extra)
    return directory


async def test_dask_gives_the_local_results_on_the_sample(
    settings: Settings, dask: Cluster
) -> None:
    expected, got = await both_ways(settings, dask, settings.data_dir)
    assert got == expected == obvious(settings.data_dir)
    assert list(settings.tmp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("shape", "partitions", "compound_partitions"),
    [(s, None, None) for s in SHAPES]
    + [("dense", 1, None), ("dense", 23, None)]
    + [("hot", 5, 3)],  # a partitioned catalogue: its checks and joins are tasks too
)
async def test_dask_gives_the_local_results_on_generated_data(
    settings: Settings,
    dask: Cluster,
    shape: str,
    partitions: int | None,
    compound_partitions: int | None,
) -> None:
    source = generated(settings.tmp_dir.parent / "generated", shape)
    before = await asyncio.to_thread(dask.tasks_finished)
    forced = dataclasses.replace(
        settings, partitions=partitions, compound_partitions=compound_partitions
    )
    expected, got = await both_ways(forced, dask, source)
    plain = normalised(source, settings.tmp_dir.parent / "plain")  # quotes after the tab
    assert got == expected == obvious(plain)
    assert await asyncio.to_thread(dask.tasks_finished) - before >= max(3, partitions or 0)
    assert list(settings.tmp_dir.iterdir()) == []


@contextlib.contextmanager
def worker_killer(dask: Cluster, phase: Callable[[], str]) -> Iterator[Callable[[], Any]]:
    """A call that SIGKILLs a worker while it runs a pipeline task (its nanny restarts it).

    The client is connected beforehand, so the kill follows the call within milliseconds;
    it returns the killed worker's task keys and the run's phase at the kill.
    """
    with dask.client() as client:
        pids = client.run(os.getpid)

        def kill() -> tuple[list[str], str]:
            deadline = time.monotonic() + 10
            while not (busy := {w: keys for w, keys in client.processing().items() if keys}):
                assert time.monotonic() < deadline, "no worker got a task"
            victim = sorted(busy)[0]
            at = phase()
            os.kill(pids[victim], signal.SIGKILL)
            return list(busy[victim]), at

        yield kill


@pytest.mark.parametrize("phase", ["reading", "loading"])
async def test_a_worker_killed_mid_run_changes_no_result(
    settings: Settings, dask: Cluster, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    source = generated(settings.tmp_dir.parent / "generated", "dense", experiments=60_000)
    monkeypatch.setattr(etl, "RANGE_BYTES", 16 << 10)  # ~90 range tasks, then 64 partitions
    forced = on(dask, settings, partitions=64)
    async with open_pool(forced) as pool:
        with executor_for(forced) as executor:
            runner = Runner(pool, executor, forced)

            def now() -> str:
                return runner.pipeline.progress.phase if runner.pipeline else "queued"

            with worker_killer(dask, now) as kill:
                await runner.submit(directory_request(source))
                assert runner.task is not None
                while (
                    runner.pipeline is None
                    or now() != phase
                    or not (
                        runner.pipeline.progress.rows_read["experiments"]
                        or runner.pipeline.progress.partitions_done
                    )
                ):
                    assert not runner.task.done(), await runner.wait()
                    await asyncio.sleep(0.005)
                lost, at = await asyncio.to_thread(kill)
            assert lost, "the killed worker was running a task, which Dask must run again"
            assert at == phase
            assert not runner.task.done()
            run = await runner.wait()
    assert run is not None and run["status"] == "succeeded", run["message"]
    assert await loaded(forced) == obvious(source)
    assert list(settings.tmp_dir.iterdir()) == []
    await asyncio.to_thread(dask.wait_for_workers, 2)


async def until_ready(client: Any, seconds: float = 30.0) -> None:
    """/readyz turns 200: the server connected to the cluster and checked it."""
    deadline = time.monotonic() + seconds
    while True:
        async with client.get("/readyz") as response:
            if response.status == 200:
                return
            body = await response.json(content_type=None)
        assert time.monotonic() < deadline, f"/readyz still 503: {body['detail']}"
        await asyncio.sleep(0.1)


async def test_serve_on_dask_runs_polls_and_serves_features(serve: Serve, dask: Cluster) -> None:
    client = await serve(dask_scheduler=dask.address)
    await until_ready(client)  # at once unless the machine is very busy (3 s at start-up)
    await run_polled_and_served(client)


async def test_serve_on_dask_cancels_within_seconds_and_keeps_previous_results(
    serve: Serve, dask: Cluster, big: str
) -> None:
    started = time.monotonic()

    async def on_dask(**changes: Any) -> Any:
        client = await serve(dask_scheduler=dask.address, **changes)
        await until_ready(client)
        return client

    await cancel_keeps_previous_results(on_dask, big)
    assert time.monotonic() - started < 30
    await asyncio.to_thread(dask.wait_for_workers, 2)


async def test_sigterm_on_dask_cancels_the_run(
    settings: Settings, dask: Cluster, big_dataset: Path, tmp_path: Path
) -> None:
    process, run = await serve_a_running_run(
        settings, big_dataset, tmp_path / "serve.log", ETL_DASK_SCHEDULER=dask.address
    )
    try:
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0
        assert time.monotonic() - signalled < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    async with open_pool(settings) as pool:
        status = await pool.fetchval("SELECT status FROM etl_runs WHERE id = $1", run["id"])
    assert status == "cancelled"
    assert list(settings.tmp_dir.iterdir()) == []


async def test_without_a_scheduler_distributed_is_never_imported(settings: Settings) -> None:
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "import service.cli, service.web.app, service.bench\n"
        "from service.jobs import run_once\n"
        "from service.settings import Settings\n"
        f"settings = Settings(database_url={settings.database_url!r}, "
        f"db_schema={settings.db_schema!r}, tmp_dir=Path({str(settings.tmp_dir)!r}), workers=2)\n"
        f"run = asyncio.run(run_once(settings, Path({str(settings.data_dir)!r})))\n"
        "print(run['status'], sorted(m for m in sys.modules if m.split('.')[0] in "
        "('distributed', 'dask')))\n"
    )
    done = await run_script(
        script, {k: v for k, v in os.environ.items() if k != "ETL_DASK_SCHEDULER"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["succeeded", "[]"]


async def test_an_unreachable_scheduler_is_one_line_from_the_cli(settings: Settings) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "run", str(settings.data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DATABASE_URL": settings.database_url or "",
            "ETL_DB_SCHEMA": settings.db_schema or "",
            "ETL_TMP_DIR": str(settings.tmp_dir),
            "ETL_DASK_SCHEDULER": address,
        },
    )
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert errors == [
        f"Error: cannot reach the Dask scheduler at {address} (Timed out trying to connect to "
        f"{address} after {cluster_module.CONNECT_TIMEOUT:g} s): start it, or fix "
        "ETL_DASK_SCHEDULER / --dask-scheduler"
    ], done.stderr


async def test_readyz_says_the_scheduler_is_down_then_recovers_by_itself(
    serve: Serve, settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    client = await serve(dask_scheduler=f"tcp://127.0.0.1:{port}")
    async with client.get("/readyz") as response:
        body = await problem(response, 503)
    assert f"tcp://127.0.0.1:{port}" in body["detail"]
    async with client.post("/runs") as response:
        assert f"tcp://127.0.0.1:{port}" in (await problem(response, 503))["detail"]

    late = Cluster(tmp_path / "late")
    try:
        await asyncio.to_thread(late.start_scheduler, port)
        late.start_worker("worker")
        await until_ready(client)
        async with client.post("/runs") as response:
            assert response.status == 202
    finally:
        await asyncio.to_thread(late.stop)


def can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare(), reason="needs unshare(1) with mount namespaces (root)")
async def test_a_worker_that_does_not_see_the_spill_directory_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    """The worker's own empty tmpfs over the spill directory: same path, other files."""
    private = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
    mount = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
    with running_cluster(tmp_path / "apart", workers=0) as apart:
        apart.start_worker("worker", wrap=[*private, mount, str(settings.tmp_dir)])
        await asyncio.to_thread(apart.wait_for_workers, 1)
        with pytest.raises(ClusterError) as refused:
            await asyncio.to_thread(open_executor, on(apart, settings))
    message = str(refused.value)
    assert "cannot read the coordinator's probe" in message
    assert f"ETL_TMP_DIR ({settings.tmp_dir})" in message and "shared filesystem" in message
    assert list(settings.tmp_dir.iterdir()) == []


async def test_a_worker_running_other_code_is_refused(settings: Settings, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(ROOT / "service", other / "service")
    with (other / "service" / "pipeline" / "features.py").open("a") as f:
        f.write("\nCHANGED = True\n")
    with running_cluster(tmp_path / "other-code", workers=0) as apart:
        apart.start_worker("worker", env={"PYTHONPATH": str(other)})
        await asyncio.to_thread(apart.wait_for_workers, 1)
        with pytest.raises(ClusterError, match="runs other experiment-etl code than this process"):
            await asyncio.to_thread(open_executor, on(apart, settings))


def test_version_mismatch_names_each_package_and_where() -> None:
    same = {"python": "3.11.2", "dask": "2026.8.0", "cloudpickle": "3.1.1"}
    versions = {
        "client": {"packages": same},
        "scheduler": {"packages": same},
        "workers": {
            "tcp://a:1": {"packages": same},
            "tcp://b:2": {"packages": {**same, "dask": "2025.1.0", "cloudpickle": None}},
        },
    }
    assert version_mismatch(versions) == (
        "dask: here 2026.8.0 / tcp://b:2 2025.1.0; cloudpickle: here 3.1.1 / tcp://b:2 None"
    )
    versions["workers"]["tcp://b:2"] = {"packages": same}
    assert version_mismatch(versions) == ""


async def test_losing_the_scheduler_mid_run_fails_the_run_saying_so(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = generated(tmp_path / "generated", "dense", experiments=40_000)
    monkeypatch.setattr(etl, "RANGE_BYTES", 24 << 10)
    with running_cluster(tmp_path / "lost", workers=1) as lost:
        forced = on(lost, settings, partitions=48)
        async with open_pool(forced) as pool:
            with executor_for(forced) as executor:
                runner = Runner(pool, executor, forced)
                await runner.submit(directory_request(source))
                while runner.pipeline is None or not runner.pipeline.progress.partitions_done:
                    assert runner.task is not None and not runner.task.done()
                    await asyncio.sleep(0.005)
                assert lost.scheduler is not None
                os.killpg(lost.scheduler.pid, signal.SIGKILL)
                started = time.monotonic()
                run = await runner.wait()
                assert time.monotonic() - started < 15
    assert run is not None and run["status"] == "failed", run
    assert run["message"].startswith(
        f"the Dask cluster dropped a task: lost the Dask scheduler at {lost.address}"
    ), run["message"]
    assert list(settings.tmp_dir.iterdir()) == []


def test_a_closed_stream_to_the_cluster_reads_as_a_lost_cluster_not_a_task_error() -> None:
    """When the scheduler dies, a result being gathered fails with CommClosedError rather
    than a cancellation; both fail the run as the cluster's fault, in one line."""
    from distributed.comm import CommClosedError

    assert cluster_module._lost_connection(CommClosedError("in <TCP (closed)>: Stream is closed"))
    assert not cluster_module._lost_connection(ValueError("a task's own error"))
    assert not cluster_module._lost_connection(FileNotFoundError("spill file"))
