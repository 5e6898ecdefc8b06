"""Where the pipeline's tasks run: the local pool, or a Dask cluster (``ETL_DASK_SCHEDULER``).

The pipeline only needs a ``concurrent.futures.Executor`` that takes picklable calls, so
a cluster is one more executor: a thin adapter over ``distributed.Client.submit`` that
knows whether the cluster can run this service's tasks at all. Without a scheduler
configured, ``distributed`` is never imported.

Before the first task the adapter checks what would otherwise fail later, or worse, give
different results: package versions on the workers, the workers' copy of this code, and
that the workers see the coordinator's spill directory (and the input directory) at the
same paths. Each failure is one line that says what to configure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from .settings import Settings

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

CONNECT_TIMEOUT = 5.0  # seconds to reach the scheduler
WORKERS_TIMEOUT = 10.0  # seconds to wait for a first worker at start
RECONNECT_EVERY = 2.0  # seconds between attempts while the cluster is unusable (serve)
STARTUP_WAIT = 3.0  # seconds the server waits for a first usable cluster before serving
# The packages whose versions must agree between this process and the workers: the ones
# that pickle, carry and run the tasks.
CHECKED_PACKAGES = ("python", "dask", "distributed", "cloudpickle", "msgpack", "toolz", "tornado")
PROBE_PREFIX = ".etl-probe-"


class ClusterError(Exception):
    """The Dask cluster cannot run this service's tasks; the message says why."""


def open_executor(settings: Settings, *, keep_trying: bool = False) -> Executor:
    """The executor for ``settings``: a Dask cluster's when a scheduler is configured.

    ``keep_trying`` (the server) returns at once and connects in the background, so the
    server starts and ``/readyz`` says what is wrong; otherwise (the CLI) an unusable
    cluster raises :class:`ClusterError`.
    """
    if settings.dask_scheduler is None:
        from .workers import WorkerPool  # local processes, replaced when one dies

        return WorkerPool(settings.workers)
    executor = DaskExecutor(settings)
    if keep_trying:
        executor.keep_connected(STARTUP_WAIT)
    else:
        executor.connect()
    return executor


def not_ready(executor: Executor) -> str | None:
    """Why ``executor`` cannot take a run now, or None."""
    from .workers import WorkerPool

    if isinstance(executor, WorkerPool):
        return None if executor.healthy else executor.problem or "no worker processes"
    return executor.problem if isinstance(executor, DaskExecutor) else None


def sized_for(settings: Settings, executor: Executor) -> Settings:
    """``settings`` with ``workers`` the cluster's worker threads, as of now.

    The pipeline cuts a run into rounds of ``workers`` tasks and keeps that many busy; on
    a cluster the count is the cluster's, which may have grown since the last run.
    """
    threads = executor.threads if isinstance(executor, DaskExecutor) else 0
    return dataclasses.replace(settings, workers=threads) if threads else settings


def shared_paths(settings: Settings) -> Settings:
    """Paths made absolute: workers resolve a relative path against their own directory."""
    if settings.dask_scheduler is None:
        return settings
    return dataclasses.replace(
        settings, data_dir=settings.data_dir.resolve(), tmp_dir=settings.tmp_dir.resolve()
    )


class DaskExecutor(Executor):
    """A Dask cluster as the pipeline's executor.

    ``submit`` hands each call to the cluster's client (``pure=False``: a rescan of the
    same range is a new task). Cancelling a returned future releases its
    Dask task: a queued one never starts; a running one stops at its next batch through
    the run's stop file. A worker lost mid-task has the scheduler rerun that task on
    another worker; tasks rewrite their outputs, so a rerun leaves the same files.
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.dask_scheduler is not None
        self.address = settings.dask_scheduler
        self.settings = shared_paths(settings)
        self._client: Any = None
        self._tasks: set[Any] = set()  # Dask futures not settled yet
        self._problem: str | None = f"not connected to the Dask scheduler at {self.address} yet"
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._monitor: threading.Thread | None = None
        # Worker threads by worker, as last fetched (at connect, then by the monitor):
        # reading them is never a call to the scheduler from the event loop.
        self._nthreads: dict[str, int] = {}

    @property
    def problem(self) -> str | None:
        """Why a run cannot start now, or None. Never asks the scheduler: cheap."""
        lost = self._lost()
        if lost is not None:
            return lost
        if not self._nthreads:
            return f"no Dask workers are connected to the scheduler at {self.address}"
        return None

    def _lost(self) -> str | None:
        client = self._client
        if client is None:
            return self._problem
        if client.status != "running":
            return f"lost the Dask scheduler at {self.address} ({client.status})"
        return None

    @property
    def threads(self) -> int:
        """Worker threads in the cluster, as last counted."""
        return sum(self._nthreads.values())

    def _count(self, client: Any) -> None:
        self._nthreads = dict(client.nthreads())

    def connect(self) -> None:
        """Connect (again, if the client was lost) and check the cluster; or ClusterError."""
        with self._lock:
            if self._client is not None and self._client.status == "running":
                return
            self._close_client()
            try:
                client = _connect(self.address)
                check_cluster(client, self.settings)
            except ClusterError as exc:
                self._problem = str(exc)
                raise
            self._count(client)
            self._client = client
            self._problem = None
        log.info(
            "running tasks on the Dask cluster",
            extra={
                "event": "cluster",
                "detail": f"{self.address}: {len(self._nthreads)} workers, {self.threads} threads",
            },
        )

    def keep_connected(self, wait: float) -> None:
        """Connect, and again whenever the client is lost, until shutdown.

        Waits up to ``wait`` seconds for the first attempt: a cluster that is up makes
        the server ready before it accepts requests.
        """
        tried = threading.Event()
        self._monitor = threading.Thread(
            target=self._watch, args=(tried,), name="dask-monitor", daemon=True
        )
        self._monitor.start()
        tried.wait(wait)

    def _watch(self, tried: threading.Event) -> None:
        reported: str | None = None
        while not self._closed.is_set():
            client = self._client
            if client is not None and client.status == "running":
                with contextlib.suppress(Exception):  # a lost scheduler: handled next round
                    self._count(client)
            else:
                try:
                    self.connect()
                    reported = None
                except ClusterError as exc:
                    if str(exc) != reported:
                        log.warning(
                            "cluster not usable; retrying",
                            extra={"event": "cluster", "detail": str(exc)},
                        )
                        reported = str(exc)
            tried.set()
            self._closed.wait(RECONNECT_EVERY)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        # Only a lost client refuses tasks: with no worker for a moment, Dask queues them.
        client = self._client
        lost = self._lost()
        if client is None or lost is not None:
            raise ClusterError(lost or f"not connected to the Dask scheduler at {self.address}")
        task = client.submit(fn, *args, pure=False, **kwargs)
        with self._lock:
            self._tasks.add(task)
        return self._relay(task)

    def _relay(self, task: Any) -> Future[T]:
        """The caller's future for a Dask future: its cancel releases the task.

        Not ``Client.get_executor()``: its futures misread a result gathered after a
        worker loss (the key rescheduled meanwhile) as an error, and a cancellation by
        the client itself — which happens when it loses the scheduler — as the caller's.
        Here a result is taken with ``result()``, which waits out a recomputation, and
        the client's cancellation fails the run, saying so.
        """
        outer: Future[T] = Future()

        def settle(done: Any) -> None:  # in Dask's callback thread
            with self._lock:
                self._tasks.discard(done)
            if outer.done():  # the caller cancelled it
                return
            try:
                value = done.result()
            except BaseException as exc:
                error = exc
                if done.cancelled() or _lost_connection(exc):
                    # The client cancels its futures when it loses the scheduler; a result
                    # being gathered at that moment fails with a closed stream instead.
                    problem = self._lost() or (
                        f"lost the Dask scheduler at {self.address}"
                        if _lost_connection(exc)
                        else self.problem or "the Dask scheduler cancelled it"
                    )
                    error = ClusterError(f"the Dask cluster dropped a task: {problem}")
                with contextlib.suppress(InvalidStateError):
                    outer.set_exception(error)
                return
            with contextlib.suppress(InvalidStateError):
                outer.set_result(value)

        def release(done: Future[T]) -> None:
            if done.cancelled():
                task.cancel()

        outer.add_done_callback(release)
        task.add_done_callback(settle)
        return outer

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed.set()
        if self._monitor is not None:
            self._monitor.join()
        with self._lock:
            tasks, self._tasks = list(self._tasks), set()
        if self._client is not None and tasks:
            with contextlib.suppress(Exception):
                if cancel_futures or not wait:
                    self._client.cancel(tasks)
                else:
                    self._client.gather(tasks, errors="skip")
        with self._lock:
            self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
        self._client = None


def _lost_connection(exc: BaseException) -> bool:
    """A comm failure between client and cluster (``distributed.comm.CommClosedError`` is
    an OSError), not a task's own error."""
    return type(exc).__name__ == "CommClosedError" or (
        isinstance(exc, OSError) and "Stream is closed" in str(exc)
    )


def _connect(address: str) -> Any:
    import distributed

    client_type: Any = distributed.Client  # the client is untyped: typed here as Any
    try:
        return client_type(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({_reason(exc)}): start it, "
            "or fix ETL_DASK_SCHEDULER / --dask-scheduler"
        ) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.rstrip(":")


def check_cluster(client: Any, settings: Settings) -> None:
    """Versions, code and shared storage, checked on every connected worker."""
    try:
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT)
        except TimeoutError:
            raise ClusterError(
                f"no Dask workers joined the scheduler at {settings.dask_scheduler} within "
                f"{WORKERS_TIMEOUT:.0f} s: start `dask worker {settings.dask_scheduler}`"
            ) from None
        versions = client.get_versions(check=False)
        mismatch = version_mismatch(versions)
        if mismatch:
            raise ClusterError(
                f"the Dask cluster runs other versions than this process: {mismatch}; "
                "install the same environment on the workers"
            )
        check_shared(client, settings)
    except ClusterError:
        client.close()
        raise
    except (OSError, TimeoutError) as exc:
        client.close()
        raise ClusterError(f"the Dask cluster failed its checks: {_reason(exc)}") from None


def version_mismatch(versions: dict[str, Any]) -> str:
    """Packages whose versions differ, as ``name: here 1 / worker X 2``; empty if none."""
    mine = versions["client"]["packages"]
    found: list[str] = []
    others = {"scheduler": versions["scheduler"], **versions["workers"]}
    for package in CHECKED_PACKAGES:
        differing = [
            f"{where} {(other or {}).get('packages', {}).get(package, 'missing')}"
            for where, other in others.items()
            if (other or {}).get("packages", {}).get(package) != mine.get(package)
        ]
        if differing:
            found.append(f"{package}: here {mine.get(package)} / {', '.join(differing)}")
    return "; ".join(found)


def check_shared(client: Any, settings: Settings) -> None:
    """Each worker reads the coordinator's probe file and writes its own back.

    The same bytes at the same path both ways is what the pipeline relies on: workers
    read the input and write the spill files, the coordinator reads the spill index and
    removes the run's directory. The code fingerprint is compared on the way.
    """
    tmp_dir = settings.tmp_dir
    tmp_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    mine = tmp_dir / f"{PROBE_PREFIX}{token}"
    mine.write_text(token, encoding="ascii")
    try:
        answers: dict[str, Probe] = client.run(
            probe_worker, str(tmp_dir), token, str(settings.data_dir)
        )
        here = code_fingerprint()
        for worker, answer in sorted(answers.items()):
            if answer.fingerprint != here:
                raise ClusterError(
                    f"Dask worker {worker} runs other experiment-etl code than this process "
                    f"(fingerprint {answer.fingerprint[:12]} vs {here[:12]}): install the same "
                    "version on the workers"
                )
            problem = answer.problem or _coordinator_sees(worker, answer, token)
            if problem:
                raise ClusterError(
                    f"Dask worker {worker} {problem}: ETL_TMP_DIR ({tmp_dir}) and the input "
                    f"directory ({settings.data_dir}) must be one shared filesystem, mounted "
                    "at the same path on the coordinator and every worker"
                )
    finally:
        for path in tmp_dir.glob(f"{PROBE_PREFIX}{token}*"):
            path.unlink(missing_ok=True)


def _coordinator_sees(worker: str, answer: Probe, token: str) -> str | None:
    path = Path(answer.wrote)
    try:
        if path.read_text(encoding="ascii") == f"{token} {worker}":
            return None
    except OSError:
        pass
    return f"wrote {path}, which this process cannot see"


@dataclasses.dataclass(frozen=True)
class Probe:
    fingerprint: str
    problem: str | None = None
    wrote: str = ""


def probe_worker(tmp_dir: str, token: str, data_dir: str, dask_worker: Any = None) -> Probe:
    """On a worker (``client.run``): read the coordinator's probe, write one back."""
    fingerprint = code_fingerprint()
    directory = Path(tmp_dir)
    theirs = directory / f"{PROBE_PREFIX}{token}"
    try:
        seen = theirs.read_text(encoding="ascii")
    except OSError as exc:
        return Probe(fingerprint, f"cannot read the coordinator's probe {theirs} ({exc})")
    if seen != token:
        return Probe(fingerprint, f"reads other contents at {theirs}")
    if not Path(data_dir).is_dir():
        return Probe(fingerprint, f"does not see the input directory {data_dir}")
    name = dask_worker.address if dask_worker is not None else str(os.getpid())
    mine = directory / f"{PROBE_PREFIX}{token}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    try:
        mine.write_text(f"{token} {name}", encoding="ascii")
    except OSError as exc:
        return Probe(fingerprint, f"cannot write into {directory} ({exc})")
    return Probe(fingerprint, wrote=str(mine))


@functools.cache
def code_fingerprint() -> str:
    """A hash of this package's source: a worker with other code would compute otherwise.

    Taken once per process, when the code is first loaded, not each time: a long-lived
    worker whose files were changed under it still runs the old code.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
