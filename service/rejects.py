"""Rejected rows of skip-mode runs: kept with their raw line, served as CSV.

The scan keeps every error in skip mode (a run fails once more than ``max_errors`` are
rejected, so at most ``max_errors + 1`` are kept). Their raw lines are fetched after
the scan by one streaming pass over each input that picks the rejected line numbers,
so the scan's hot path does not change. Rows go to ``etl_rejects`` (one COPY) before
the run is recorded; only the newest ``ETL_REJECTS_KEEP`` runs' rejects are kept.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import io
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .db import sql
from .db.database import Pool
from .inputs import LINE_END, Inputs, count_lines, raw_text
from .pipeline.errors import RowError

CSV_HEADER = ("file", "line", "column", "field", "message", "raw")
STREAM_ROWS = 1000


def raw_lines(inputs: Inputs, errors: list[RowError]) -> list[str | None]:
    """The raw text of each error's line (its first line, for a multi-line record)."""
    wanted: dict[str, set[int]] = {}
    for error in errors:
        if error.line is not None:
            wanted.setdefault(error.file, set()).add(error.line)
    found: dict[tuple[str, int], str] = {}
    files = inputs.by_name()
    for name, numbers in wanted.items():
        if name in files:
            found.update(((name, n), text) for n, text in _pick(files[name], sorted(numbers)))
    return [found.get((e.file, e.line)) if e.line is not None else None for e in errors]


def _pick(f: Any, numbers: list[int]) -> Iterable[tuple[int, str]]:
    line = 1
    with raw_text(f) as blocks:
        for block in blocks:
            lines = count_lines(block) + (not block.endswith(("\n", "\r")))
            first = bisect.bisect_left(numbers, line)
            if first < len(numbers) and numbers[first] < line + lines:
                texts = LINE_END.split(block)
                for n in numbers[first : bisect.bisect_left(numbers, line + lines)]:
                    yield n, texts[n - line]
            line += count_lines(block)
            if line > numbers[-1]:
                return


async def store(
    pool: Pool, run_id: int, keep_runs: int, inputs: Inputs, errors: list[RowError]
) -> None:
    """Record the run's rejected rows (replacing any) and prune older runs' rows."""
    raws = await asyncio.to_thread(raw_lines, inputs, errors)
    records = [
        (run_id, i, e.file, e.line, e.column, e.field, e.message, raw)
        for i, (e, raw) in enumerate(zip(errors, raws, strict=True))
    ]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(sql.DELETE_REJECTS, run_id)
        if records:
            await conn.copy_records_to_table(
                "etl_rejects", records=records, columns=list(sql.REJECT_COLUMNS)
            )
        await conn.execute(sql.SET_REJECTS, run_id, len(records))
        await conn.execute(sql.PRUNE_REJECTS, keep_runs)


def link(run_id: int, kept: int | None) -> dict[str, Any] | None:
    """The run JSON's ``rejects`` member."""
    if kept is None:
        return None
    return {"count": kept, "href": f"/runs/{run_id}/rejects.csv"}


async def write_csv(pool: Pool, run_id: int, write: Callable[[bytes], Awaitable[None]]) -> None:
    """Stream a run's rejects as CSV, a thousand rows per write, through a cursor."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    async with pool.acquire() as conn, conn.transaction():
        rows = 0
        async for record in conn.cursor(sql.REJECTS_OF_RUN, run_id, prefetch=STREAM_ROWS):
            writer.writerow(tuple(record))
            rows += 1
            if rows % STREAM_ROWS == 0:
                await write(out.getvalue().encode())
                out.seek(0)
                out.truncate()
    await write(out.getvalue().encode())
