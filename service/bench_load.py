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
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import click

from .cluster import open_executor, sized_for
from .db import sql
from .db.database import Connection, connect_kwargs, open_pool
from .db.load import StagedLoad
from .etl import Pipeline, RunOptions, RunStats
from .pipeline.aggregate import aggregate_spilled, write_compound_details
from .pipeline.scan import Compounds, ScanResult
from .pipeline.spill import Piece
from .settings import Settings


def aggregate_and_copy(
    user_spills: Sequence[Piece],
    experiment_spills: Sequence[Piece],
    total: int,
    compounds_file: Path,
    url: str,
    settings: Settings,
) -> dict[str, int]:
    """One partition task that loads its own rows: rows per staging table."""
    rows = aggregate_spilled(user_spills, experiment_spills, total, compounds_file)
    batches: dict[str, Sequence[tuple[object, ...]]] = {
        "experiment_counts": rows.counts,
        "experiment_averages": rows.averages,
        "top_compounds": rows.tops,
    }
    asyncio.run(_copy(url, settings, batches))
    return {table: len(batch) for table, batch in batches.items()}


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
    """The service's pipeline with phase 2 replaced: tasks COPY their own rows."""

    async def _aggregate_into(
        self,
        load: StagedLoad,
        workdir: Path,
        partitions: int,
        experiments: int,
        compounds: Compounds,
        users: ScanResult,
    ) -> None:
        details = {cid: (c.name, c.structure) for cid, c in compounds.by_id.items()}
        details_file = workdir / "compounds.pkl"
        await asyncio.to_thread(write_compound_details, details_file, details)
        assert self.settings.database_url is not None
        counts = await asyncio.gather(
            *(
                self._call(
                    aggregate_and_copy,
                    users.pieces[p],
                    [piece for scan in self._exp_scans for piece in scan.pieces[p]],
                    experiments,
                    details_file,
                    self.settings.database_url,
                    self.settings,
                )
                for p in range(partitions)
            )
        )
        for done in counts:
            for table, rows in done.items():
                load.streams[table].rows += rows
        self.progress.partitions_done = partitions


async def measure(settings: Settings, source: Path, mode: str) -> RunStats:
    async with open_pool(settings) as pool:
        executor = await asyncio.to_thread(open_executor, settings)
        try:
            kind = TaskCopyPipeline if mode == "tasks" else Pipeline
            pipeline = kind(sized_for(settings, executor), pool, executor, source, RunOptions())

            async def finalize(_conn: Connection, _stats: RunStats) -> None:
                return None

            return await pipeline.run(finalize)
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
        stats = asyncio.run(measure(settings, data_dir.resolve(), mode))
        phases = ", ".join(f"{k} {v:.2f}" for k, v in stats.phases_s.items())
        click.echo(
            f"{mode:>11}: {time.perf_counter() - started:.2f} s end to end "
            f"(run {stats.duration_s:.2f} s: {phases}); rows {stats.rows_loaded}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
