"""CSV and JSON exports, streamed in keyset batches: memory stays flat at any size.

Each batch is one short statement, so an export never holds the result tables against a
run's swap for longer than a batch. A swap between two batches would mix old and new
results; the batches carry their table's oid, and when it changes the download is cut
off (the client sees an incomplete transfer) rather than completed with a mix.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiohttp import web

from ...db import queries
from ...db.database import Pool
from .browse import search_terms

log = logging.getLogger(__name__)

BATCH_ROWS = 5_000
# The joined results as the results page shows them, in export column order.
FEATURE_COLUMNS = (
    "user_id",
    "name",
    "experiment_count",
    "average_experiments",
    "average_run_time",
    "compound_id",
    "compound_name",
    "compound_structure",
    "top_compound_experiments",
    "tie_count",
)
CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


class ResultsReplaced(Exception):
    """A run swapped in new results while the export was being sent."""


async def stream_export(
    request: web.Request,
    pool: Pool,
    table: str | None,
    columns: Sequence[str],
    fmt: str,
    q: str = "",
) -> web.StreamResponse:
    name = table or "results"
    response = web.StreamResponse(
        headers={
            "Content-Type": CONTENT_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="{name}.{fmt}"',
        }
    )
    search: list[Any] = list(search_terms(q)) if q.strip() else []
    sql = queries.export_rows(table, bool(search))
    writer = _CsvRows(columns) if fmt == "csv" else _JsonRows(columns)
    # The first batch is read before answering, so a database error is still a clean 503.
    batch = await pool.fetch(sql, -1, BATCH_ROWS, *search)
    await response.prepare(request)
    await response.write(writer.start())
    source = batch[0]["source_table"] if batch else None
    try:
        while batch:
            if batch[0]["source_table"] != source:
                raise ResultsReplaced()
            await response.write(writer.rows(batch))
            if len(batch) < BATCH_ROWS:
                break
            batch = await pool.fetch(sql, batch[-1]["user_id"], BATCH_ROWS, *search)
            # No rows after a full batch: the end, or new tables without these ids.
            if not batch and await pool.fetchval(queries.table_oid(table)) != source:
                raise ResultsReplaced()
    except (ResultsReplaced, asyncpg.PostgresError, OSError) as exc:
        log.warning(
            "export cut off", extra={"event": "export", "path": request.path, "detail": repr(exc)}
        )
        # Closing without the last chunk tells the client the download is incomplete.
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write(writer.end())
    await response.write_eof()
    return response


class _CsvRows:
    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = columns
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\r\n")

    def _take(self) -> bytes:
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text.encode()

    def start(self) -> bytes:
        self.writer.writerow(self.columns)
        return self._take()

    def rows(self, batch: list[asyncpg.Record]) -> bytes:
        self.writer.writerows([row[c] for c in self.columns] for row in batch)
        return self._take()

    def end(self) -> bytes:
        return b""


class _JsonRows:
    """A JSON array of objects, one per line."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = columns
        self.first = True

    def start(self) -> bytes:
        return b"["

    def rows(self, batch: list[asyncpg.Record]) -> bytes:
        parts = [json.dumps({c: row[c] for c in self.columns}) for row in batch]
        lead = "\n" if self.first else ",\n"
        self.first = False
        return (lead + ",\n".join(parts)).encode()

    def end(self) -> bytes:
        return b"\n]\n"
