"""Measures the two ways of loading a run's result rows (benchmarks/README, "Dask").

``coordinator``: partition tasks send their rows back and the coordinator streams them
into the three staging tables over its three connections (what the service does).
``tasks``: each partition task opens its own connection and COPYs its rows into the
staging tables itself; the coordinator only indexes and swaps.

    python -m service.bench_load DATA_DIR --database-url URL [--dask-scheduler ADDR]

Each mode runs the real pipeline once on DATA_DIR (phases 1 and 2, indexes, swap) into
the schema ``etl_bench_load``; the figures are printed, nothing is kept but the tables.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import asyncpg
import click

from .cluster import ClusterError, open_executor, sized_for
from .db import sql
from .db.database import Connection, connect_kwargs, open_pool
from .etl import Pipeline, RunOptions, RunStats
from .pipeline.aggregate import PartitionResult, aggregate_partition, merge_slices
from .pipeline.features import FeatureRows
from .settings import Settings

P = ParamSpec("P")
T = TypeVar("T")


def aggregate_and_copy(
    task: Callable[..., PartitionResult],
    arguments: tuple[Any, ...],
    url: str | None,
    settings: Settings,
) -> PartitionResult:
    """One partition task (``aggregate_partition`` or ``merge_slices``) that loads its
    own rows and hands none back."""
    assert url is not None
    result = task(*arguments)
    rows = result.rows
    batches: dict[str, Sequence[tuple[object, ...]]] = {
        "experiment_counts": rows.counts,
        "experiment_averages": rows.averages,
        "top_compounds": rows.tops,
    }
    asyncio.run(_copy(url, settings, batches))
    result.rows = FeatureRows()
    result.loaded = {table: len(batch) for table, batch in batches.items()}  # type: ignore[attr-defined]
    return result


async def _copy(
    url: str, settings: Settings, batches: dict[str, Sequence[tuple[object, ...]]]
) -> None:
    conn = await asyncpg.connect(url, **connect_kwargs(settings))
    try:
        for table, batch in batches.items():
            if batch:
                await conn.copy_records_to_table(
                    sql.staging(table), records=batch, columns=list(sql.RESULT_TABLES[table])
                )
    finally:
        await conn.close()


class TaskCopyPipeline(Pipeline):
    """The service's pipeline whose partition tasks COPY their own rows.

    It swaps the tasks that make result rows (``aggregate_partition``, ``merge_slices``)
    for ones that load them and hand the coordinator nothing to load.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loaded: Counter[str] = Counter()

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if fn not in (aggregate_partition, merge_slices):
            return await super()._call(fn, *args, **kwargs)
        url, settings = self.settings.database_url, self.settings
        result = await super()._call(aggregate_and_copy, fn, tuple(args), url, settings)
        self.loaded.update(result.loaded)  # type: ignore[attr-defined]
        return cast(T, result)


async def measure(settings: Settings, source: Path, mode: str) -> RunStats:
    async with open_pool(settings) as pool:
        executor = await asyncio.to_thread(open_executor, settings)
        try:
            kind = TaskCopyPipeline if mode == "tasks" else Pipeline
            pipeline = kind(sized_for(settings, executor), pool, executor, source, RunOptions())

            async def finalize(_conn: Connection, _stats: RunStats) -> None:
                return None

            stats = await pipeline.run(finalize)
            if isinstance(pipeline, TaskCopyPipeline):
                stats.rows_loaded = dict(pipeline.loaded)
            return stats
        finally:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--database-url", required=True)
@click.option("--dask-scheduler")
@click.option("--workers", type=int)
@click.option("--modes", default="coordinator,tasks", show_default=True)
def main(
    data_dir: Path, database_url: str, dask_scheduler: str | None, workers: int | None, modes: str
) -> None:
    base = Settings.from_env()
    settings = dataclasses.replace(
        base,
        database_url=database_url,
        db_schema="etl_bench_load",
        dask_scheduler=dask_scheduler or base.dask_scheduler,
        workers=workers or base.workers,
        tmp_dir=base.tmp_dir.resolve(),
    )
    for mode in modes.split(","):
        started = time.perf_counter()
        try:
            stats = asyncio.run(measure(settings, data_dir.resolve(), mode))
        except ClusterError as exc:
            raise click.ClickException(str(exc)) from None
        phases = ", ".join(f"{k} {v:.2f}" for k, v in stats.phases_s.items())
        click.echo(
            f"{mode:>11}: {time.perf_counter() - started:.2f} s end to end "
            f"(run {stats.duration_s:.2f} s: {phases}); rows {stats.rows_loaded}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
