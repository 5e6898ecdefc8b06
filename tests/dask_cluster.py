"""A real Dask cluster for the tests: ``dask scheduler`` and ``dask worker`` processes.

Loopback only, free ports, no dashboards; each worker has a working directory of its
own (``--local-directory``, and its current directory), so nothing the pipeline relies on
can come from sharing one by accident. Holds no tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASK = Path(sys.executable).with_name("dask")
START_TIMEOUT = 60.0


@dataclass
class Cluster:
    directory: Path
    address: str = ""
    scheduler: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_scheduler(self, port: int = 0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        info = self.directory / "scheduler.json"
        info.unlink(missing_ok=True)
        self.scheduler = self._spawn(
            "scheduler",
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
                "--scheduler-file",
                str(info),
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not info.exists() or not info.read_text():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.05)
        self.address = json.loads(info.read_text())["address"]

    def start_worker(
        self, name: str, env: dict[str, str] | None = None, wrap: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """A worker (under its nanny) in a directory of its own; ``wrap`` prefixes the argv."""
        home = self.directory / name
        home.mkdir(parents=True, exist_ok=True)
        argv = [
            self.address,
            "--name",
            name,
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
            "--local-directory",
            str(home),
        ]
        process = self._spawn(name, ["worker", *argv], cwd=home, env=env, wrap=wrap)
        self.workers.append(process)
        return process

    def _spawn(
        self,
        name: str,
        argv: list[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [*wrap, str(DASK), *argv],
                cwd=cwd or self.directory,
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def client(self) -> Any:
        from distributed import Client

        return Client(self.address, timeout=START_TIMEOUT, set_as_default=False)

    def tasks_finished(self) -> int:
        """How many of the pipeline's tasks the scheduler has seen through to the end."""

        def finished(dask_scheduler: Any) -> int:  # local: pickled by value, tests/ is ours
            prefix = dask_scheduler.task_prefixes.get(
                "run_task"
            )  # tasks.run_task, as Dask names it
            return 0 if prefix is None else int(prefix.state_counts.get("forgotten", 0))

        with self.client() as client:
            return int(client.run_on_scheduler(finished))

    def worker_pids(self) -> dict[str, int]:
        with self.client() as client:
            return dict(client.run(os.getpid))

    def wait_for_workers(self, count: int) -> None:
        with self.client() as client:
            client.wait_for_workers(count, timeout=START_TIMEOUT)

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.workers, self.scheduler]:
            if process is None:
                continue
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()
        self.scheduler = None


@contextmanager
def running_cluster(directory: Path, workers: int = 2) -> Iterator[Cluster]:
    cluster = Cluster(directory)
    try:
        cluster.start_scheduler()
        for index in range(workers):
            cluster.start_worker(f"worker{index}")
        if workers:
            cluster.wait_for_workers(workers)
        yield cluster
    finally:
        cluster.stop()
