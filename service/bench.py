"""End-to-end benchmark: generated datasets through the real pipeline into PostgreSQL.

Each (shape, size, seed) is generated once with the project's generator and cached. A run
goes through
the service itself (the aiohttp app's runner, on the app's event loop) while a thread
polls ``/healthz``, a coroutine measures event-loop lag, and another thread samples the
resident memory of this process and all its children (PostgreSQL excluded).

Before each run a fixed piece of work of the pipeline's kind (``host_reference``) is
timed, so that figures taken on a shared host whose speed drifts can be read against it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import math
import os
import shutil
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil  # type: ignore[import-untyped]
from aiohttp import web

from .etl import Pipeline, RunStats
from .generate import SHAPES, Shape, generate
from .jobs import Runner, directory_request
from .settings import Settings
from .web.app import create_app
from .web.keys import RUNNER


@dataclass(frozen=True)
class Size:
    label: str
    users: int
    experiments: int
    compounds: int

    def dirname(self, shape: Shape, seed: int) -> str:
        name = f"e{self.experiments}-u{self.users}-c{self.compounds}-s{seed}"
        return name if shape == "dense" else f"{shape}-{name}"  # dense: the caches made before


SIZES = {
    s.label: s
    for s in (
        Size("100k", 10_000, 100_000, 500),
        Size("1M", 100_000, 1_000_000, 2_000),
        Size("3M", 300_000, 3_000_000, 10_000),
        Size("10M", 1_000_000, 10_000_000, 10_000),
        Size("30M", 3_000_000, 30_000_000, 10_000),
    )
}
QUICK = ("100k",)
REFERENCE_LINES = 100_000  # the host reference's work: 42-50 ms a round (eleventh round)
SAMPLE_INTERVAL = 0.05
TREE_REFRESH = 1.0  # seconds between listings of the process tree


def dataset(size: Size, shape: Shape, cache: Path, seed: int = 0) -> Path:
    """The generated files for ``size`` and ``shape``, made on first use and kept."""
    target = cache / size.dirname(shape, seed)
    if (target / ".complete").exists():
        return target
    partial = cache / f"{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    generate(partial, size.users, size.experiments, size.compounds, seed, shape)
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


class Sampler:
    """Runs ``run`` in a daemon thread for the duration of a ``with`` block."""

    _stop: threading.Event

    def run(self) -> None:
        raise NotImplementedError

    @contextmanager
    def running(self) -> Iterator[Self]:
        thread = threading.Thread(target=self.run, name=type(self).__name__, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


@dataclass
class MemorySampler(Sampler):
    """Peak summed RSS of a process tree, sampled in a thread; PostgreSQL is left out.

    The tree is listed again only every ``TREE_REFRESH`` seconds: listing walks every
    process on the host (~5 ms), which at each 50 ms sample took ~3% of a 10M run's CPU
    from the pipeline it measures. The workers live as long as the executor anyway.
    """

    root: int = field(default_factory=os.getpid)
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _tree: list[psutil.Process] = field(default_factory=list)
    _listed: float = -math.inf

    def sample(self) -> int:
        if time.monotonic() - self._listed >= TREE_REFRESH:
            self._tree = self._list_tree()
            self._listed = time.monotonic()
        total = 0
        for proc in self._tree:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue  # ended since it was listed
        return total

    def _list_tree(self) -> list[psutil.Process]:
        me = psutil.Process(self.root)
        tree = [me]
        for proc in me.children(recursive=True):
            try:
                if not proc.name().startswith("postgres"):
                    tree.append(proc)
            except psutil.Error:
                continue  # ended between listing and reading
        return tree

    def run(self) -> None:
        self.peak = max(self.peak, self.sample())
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.peak = max(self.peak, self.sample())


@dataclass
class HealthProbe(Sampler):
    """GET /healthz every ``interval`` from a thread; the latencies in seconds."""

    port: int
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.wait(SAMPLE_INTERVAL):
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                ok = False
            if ok:
                self.latencies.append(time.perf_counter() - started)
            else:
                self.failures += 1
        conn.close()


async def loop_lag(lags: list[float], interval: float = 0.01) -> None:
    """Record how late a 10 ms sleep wakes up: the event loop's responsiveness."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(time.perf_counter() - started - interval)


def host_reference(rounds: int = 3) -> float:
    """Seconds (the best of ``rounds``) that fixed work of the pipeline's kind takes now.

    Phase 2's kind of work on fixed data: sort byte lines, join and split them into
    fields, count one column, parse another as floats. It is not the pipeline's code,
    which changes as it is tuned: the same figure on two hosts, or at two moments,
    means the same speed for work like this. Shared hosts drift by tens of percent
    within minutes (benchmarks/README), so a run's figures are read against it.
    """
    lines = [
        b"%d,%d;%d,%d.%02d" % (i * 7919 % 100_003, i % 997, i % 89, i % 600, i % 100)
        for i in range(REFERENCE_LINES)
    ]
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        fields = b",".join(sorted(lines)).split(b",")
        Counter(fields[1::3])
        math.fsum(map(float, fields[2::3]))
        best = min(best, time.perf_counter() - started)
    return best


@dataclass
class Result:
    shape: Shape
    size: Size
    stats: dict[str, Any]
    peak_rss: int
    healthz: list[float]
    healthz_failures: int
    lags: list[float]
    totals: list[float] = field(default_factory=list)  # of every run, when repeated
    reference: float = math.nan  # host_reference() just before the run, in seconds

    @property
    def total(self) -> float:
        return float(self.stats["duration_s"])

    def row(self) -> list[str]:
        phases = self.stats["phases_s"]
        total = self.total
        runs = sorted(self.totals) or [total]
        return [
            self.shape,
            self.size.label,
            f"{phases['read']:.2f}",
            f"{phases['aggregate_load']:.2f}",
            f"{phases['commit']:.2f}",
            f"{total:.2f}",
            f"{self.stats['experiments'] / total / 1e6:.2f}M" if total else "-",
            f"{self.peak_rss / 2**20:.0f}",
            _ms(self.healthz, 0.5),
            _ms(self.healthz, 0.99),
            _ms(self.lags, 0.99),
            _ms(self.lags, 1.0),
            f"{len(runs)}" if len(runs) == 1 else f"{len(runs)}: {runs[0]:.2f}-{runs[-1]:.2f}",
            f"{self.reference * 1000:.1f}",
        ]


HEADER = [
    "shape",
    "size",
    "read s",
    "agg+load s",
    "commit s",
    "total s",
    "exp/s",
    "peak RSS MB",
    "healthz p50 ms",
    "healthz p99 ms",
    "loop lag p99 ms",
    "loop lag max ms",
    "runs (total s)",
    "host ref ms",
]


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    if q >= 1.0 or len(values) == 1:  # quantiles need two values; a short run has one
        return f"{max(values) * 1000:.1f}"
    return f"{statistics.quantiles(values, n=100, method='inclusive')[int(q * 100) - 1] * 1000:.1f}"


def table(results: list[Result]) -> str:
    cells = [HEADER, *(r.row() for r in results)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = [" | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: list[Result]) -> str:
    """The same table in Markdown, as benchmarks/README.md shows it."""
    rows = [HEADER, ["---"] * len(HEADER), *(r.row() for r in results)]
    return "\n".join(f"| {' | '.join(row)} |" for row in rows) + "\n"


def median_run(runs: list[Result]) -> Result:
    """The run with the median total time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.total)
    chosen = ordered[(len(ordered) - 1) // 2]
    return dataclasses.replace(chosen, totals=[r.total for r in runs])


async def measure(settings: Settings, shape: Shape, size: Size, directory: Path) -> Result:
    """One run of ``directory`` through the app's runner, with /healthz polled meanwhile."""
    reference = host_reference()
    app = create_app(dataclasses.replace(settings, data_dir=directory.parent))
    app_runner = web.AppRunner(app, handle_signals=False)
    await app_runner.setup()
    try:
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        await site.start()
        port = app_runner.addresses[0][1]
        lags: list[float] = []
        lag_task = asyncio.create_task(loop_lag(lags))
        finished = _capture_stats(app[RUNNER])
        try:
            with MemorySampler().running() as memory, HealthProbe(port).running() as probe:
                run = await app[RUNNER].run_to_end(directory_request(directory))
        finally:
            lag_task.cancel()
            await asyncio.gather(lag_task, return_exceptions=True)
    finally:
        await app_runner.cleanup()
    if run["status"] != "succeeded":
        raise RuntimeError(f"benchmark run {run['status']}: {run.get('message')}")
    stats = finished[0].to_json() if finished else run["stats"]
    return Result(
        shape, size, stats, memory.peak, probe.latencies, probe.failures, lags, reference=reference
    )


def _capture_stats(runner: Runner) -> list[RunStats]:
    """The stats a run returns: unlike the stored ones, they include the swap's COMMIT."""
    captured: list[RunStats] = []
    chained = runner.on_finish

    def finish(status: str, pipeline: Pipeline, stats: RunStats | None, seconds: float) -> None:
        if stats is not None:
            captured.append(stats)
        if chained is not None:
            chained(status, pipeline, stats, seconds)

    runner.on_finish = finish
    return captured


def run_bench(
    settings: Settings,
    sizes: list[Size],
    cache: Path,
    shapes: tuple[Shape, ...] = SHAPES,
    repeat: int = 1,
    seed: int = 0,
) -> list[Result]:
    """Generate (or reuse) each dataset, run it ``repeat`` times; one result per dataset.

    Sizes come first, shapes within a size: the shapes of one size are compared side by
    side, and a long run over several sizes has the small ones' figures early.
    """
    results: list[Result] = []
    for size in sizes:
        for shape in shapes:
            started = time.perf_counter()
            directory = dataset(size, shape, cache, seed)
            made = time.perf_counter() - started
            if made > 1:
                print(f"generated {shape} {size.label} in {made:.1f} s", flush=True)
            runs = [asyncio.run(measure(settings, shape, size, directory)) for _ in range(repeat)]
            results.append(median_run(runs))
            if len(sizes) * len(shapes) > 1:
                print(table(results[-1:]), flush=True)
    return results
