"""The benchmark's own instruments: they must see what they claim to measure."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
from click.testing import CliRunner

from service.bench import MemorySampler, Size, host_reference, run_bench, table
from service.cli import main
from service.generate import SHAPES
from service.settings import Settings

HOLD = "import sys, time; block = bytearray(96 << 20); print(1, flush=True); time.sleep(30)"


def test_memory_sampler_counts_child_processes() -> None:
    """A child holding 96 MB raises the peak of the tree by about that much."""
    alone = MemorySampler().sample()
    with subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"1\n"
            sampler = MemorySampler()
            with sampler.running():
                time.sleep(0.2)
            held = psutil.Process(child.pid).memory_info().rss
        finally:
            child.kill()
    assert held > 96 << 20
    assert sampler.peak >= alone + held - (16 << 20)


TINY = Size("tiny", users=40, experiments=500, compounds=12)


def test_bench_runs_every_shape_and_reuses_its_cached_datasets(
    settings: Settings, tmp_path: Path
) -> None:
    """One row per shape through the real service; a second bench generates nothing."""
    cache = tmp_path / "cache"
    results = run_bench(settings, [TINY], cache)
    assert [(r.shape, r.size.label, r.stats["experiments"]) for r in results] == [
        (shape, "tiny", 500) for shape in SHAPES
    ]
    assert sorted(p.name for p in cache.iterdir()) == [
        "e500-u40-c12-s0",
        "hot-e500-u40-c12-s0",
        "sparse-e500-u40-c12-s0",
    ]
    written = {p: p.stat().st_mtime_ns for p in cache.rglob("*.csv")}
    rows = table(results).splitlines()[2:]
    assert [row.split("|")[0].strip() for row in rows] == list(SHAPES)

    (again,) = run_bench(settings, [TINY], cache, ("hot",), repeat=3)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.csv")} == written
    assert len(again.totals) == 3 and again.total == sorted(again.totals)[1]
    cells = [c.strip() for c in table([again]).splitlines()[2].split("|")]
    assert cells[-2] == f"3: {min(again.totals):.2f}-{max(again.totals):.2f}"
    # The host reference taken before the median run, in ms: real work, so above zero.
    assert 0 < again.reference < 10 and cells[-1] == f"{again.reference * 1000:.1f}"


def test_bench_refuses_unknown_shapes_and_sizes() -> None:
    for args, message in (
        (["--shapes", "dense,round"], "unknown shape 'round'; choose from dense, sparse, hot"),
        (["--sizes", "2M"], "unknown size '2M'; choose from 100k, 1M, 3M, 10M, 30M"),
        (["--shapes", ","], "no shape given"),
    ):
        result = CliRunner().invoke(main, ["bench", *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_host_reference_times_its_work() -> None:
    """Twice the rounds of the same work take longer in all than one round's best."""
    started = time.perf_counter()
    one = host_reference(rounds=1)
    took = time.perf_counter() - started
    assert 0 < one <= took
    started = time.perf_counter()
    best = host_reference(rounds=2)
    assert 2 * best <= time.perf_counter() - started
