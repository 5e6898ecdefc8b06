"""Loading results: COPY into staging tables, then one transaction swaps them in.

Each result table gets its own connection, so the three COPY streams overlap with each
other and with the aggregation feeding them. Readers never see the staging tables; the
swap (drop old, rename staging, record the run's final status) happens in a single
transaction, so a reader sees the complete old results or the complete new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from . import sql
from .database import (
    DATABASE_ERRORS,
    Connection,
    Pool,
    server_pid,
    terminate,
    terminate_backends,
    to_the_end,
)

log = logging.getLogger(__name__)

_DONE = object()
SWAP_ATTEMPTS = 5
CLEANUP_TIMEOUT = 10.0  # seconds to get a connection and locks for dropping staging tables
# asyncpg bounds a COPY as a whole; a long run's COPY lasts as long as its aggregation, so
# it is watched for progress instead (see ``TableStream.put`` and ``StagedLoad.finish``).
COPY_DEADLINE = 7 * 24 * 3600.0
LOST_GRACE = 1.0  # seconds a COPY whose connection was lost gets to end with its own error


class DatabaseStalled(TimeoutError):
    """The database took no data and sent no answer for the configured bound."""

    def __init__(self, timeout: float, what: str) -> None:
        super().__init__(f"database stopped answering: no progress for {timeout:g} s ({what})")


class SwapBlocked(Exception):
    """Readers held the result tables through every swap attempt; nothing was changed."""


class TableStream:
    """A queue of batches (rows given as columns) feeding one COPY into one staging table."""

    def __init__(self, conn: Connection, table: str, timeout: float) -> None:
        self.conn = conn
        self.table = table
        self.timeout = timeout
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize=4)
        self.rows = 0
        self.task: asyncio.Task[None] | None = None
        # Set when the connection is lost. A COPY whose socket was paused for writing
        # as the server went away waits for it to resume, forever (asyncpg): the COPY is
        # given up at once instead of after ``timeout`` of no progress.
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.add_termination_listener(self._lost)

    def _lost(self, _conn: object) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def forget(self) -> None:
        """Stop listening to the connection: it goes back to the pool (a lost one is
        back already, and its proxy refuses every call)."""
        with contextlib.suppress(asyncpg.InterfaceError):
            self.conn.remove_termination_listener(self._lost)

    async def _records(self) -> AsyncIterator[Sequence[Any]]:
        while (batch := await self._next_batch()) is not _DONE:
            assert isinstance(batch, Sequence)
            self.rows += len(batch[0])
            for record in zip(*batch, strict=True):
                yield record

    async def _next_batch(self) -> object:
        """The next batch; the end once the connection is lost, so that the COPY ends
        with the server's own error (``terminating connection due to ...``)."""
        get = asyncio.ensure_future(self.queue.get())
        waited: set[asyncio.Future[Any]] = {get, self.lost}
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():
                get.cancel()
        return get.result() if get.done() and not get.cancelled() else _DONE

    async def run(self) -> None:
        copy = asyncio.ensure_future(
            self.conn.copy_records_to_table(
                sql.staging(self.table),
                records=self._records(),
                columns=list(sql.RESULT_TABLES[self.table]),
                timeout=COPY_DEADLINE,
            )
        )
        waited: set[asyncio.Future[Any]] = {copy, self.lost}
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
            if not copy.done():  # lost: a COPY still asking for rows ends with its error
                await asyncio.wait({copy}, timeout=LOST_GRACE)
        finally:
            if not copy.done():
                copy.cancel()
                await asyncio.gather(copy, return_exceptions=True)
            elif not copy.cancelled():
                copy.exception()  # read, also when this stream's own cancellation goes on
        if not copy.cancelled():
            copy.result()  # its own error, where it has one, says most
        if self.lost.done():
            raise asyncpg.ConnectionDoesNotExistError(
                f"connection was closed in the middle of operation (COPY into {self.table})"
            )
        await self.conn.execute(sql.index_staging(self.table))

    async def put(self, batch: object) -> None:
        """Queue a batch, unless the COPY already died (then raise its error).

        A full queue that takes nothing for ``timeout`` seconds means the database stopped
        reading the COPY.
        """
        assert self.task is not None
        put = asyncio.ensure_future(self.queue.put(batch))
        done, _ = await asyncio.wait(
            {put, self.task}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            put.cancel()
            raise DatabaseStalled(self.timeout, f"COPY into {self.table}")
        if self.task in done and put not in done:
            put.cancel()
            self.task.result()
            raise RuntimeError(f"COPY into {self.table} ended early")

    async def put_done(self) -> None:
        await self.put(_DONE)


class StagedLoad:
    """Staging tables filled over three connections; ``commit`` swaps them in."""

    def __init__(self, pool: Pool, timeout: float = 60.0) -> None:
        self.pool = pool
        self.timeout = timeout  # no progress for this long: the database stopped answering
        self.streams: dict[str, TableStream] = {}
        self._conns: list[Connection] = []

    async def __aenter__(self) -> StagedLoad:
        try:
            for table in sql.RESULT_TABLES:
                conn: Connection = await self.pool.acquire()
                self._conns.append(conn)
                await conn.execute(sql.create_staging(table))
                stream = TableStream(conn, table, self.timeout)
                stream.task = asyncio.create_task(stream.run(), name=f"copy-{table}")
                self.streams[table] = stream
        except BaseException as exc:
            # __aexit__ is not called when __aenter__ fails: abort and release here.
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def put(self, table: str, batch: Sequence[Sequence[Any]]) -> None:
        """Queue a batch of rows for one table, given as columns (zipped as they go)."""
        if batch and batch[0]:
            await self.streams[table].put(batch)

    async def finish(self) -> dict[str, int]:
        """Close the streams and wait for every COPY and index; rows loaded per table."""
        for stream in self.streams.values():
            await stream.put_done()
        pending = {s.task for s in self.streams.values() if s.task}
        while pending:
            done, pending = await asyncio.wait(
                pending, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise DatabaseStalled(self.timeout, "finishing the COPY")
            for task in done:
                task.result()
        return {table: s.rows for table, s in self.streams.items()}

    async def commit(
        self,
        finalize: Callable[[Connection], Awaitable[None]],
        lock_timeout: float,
        discard: bool = False,
    ) -> None:
        """Swap all staging tables in and run ``finalize`` in the same transaction.

        The swap needs an exclusive lock on each result table; a reader holding one
        must not stall it forever, so the lock wait is bounded and the swap retried.
        ``discard`` (a dry run) drops the staging tables instead: nothing is replaced.
        """
        conn = self._conns[0]
        for attempt in range(1, SWAP_ATTEMPTS + 1):
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
                    for table in sql.RESULT_TABLES:
                        await conn.execute(sql.drop_staging(table) if discard else sql.swap(table))
                    await finalize(conn)
                return
            except asyncpg.LockNotAvailableError as exc:
                if attempt == SWAP_ATTEMPTS:
                    raise SwapBlocked(
                        f"could not swap in the new results: other sessions held locks on the"
                        f" result tables through {SWAP_ATTEMPTS} attempts of {lock_timeout:g} s"
                        f" each; the previous results are unchanged"
                    ) from exc
                await asyncio.sleep(0.1 * attempt)

    async def drop_retired(self, lock_timeout: float) -> None:
        """Drop the tables the swap replaced; the new results are already committed.

        A failure only leaves them for the next run to drop, so it is logged, not raised.
        """
        conn = self._conns[0]
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
                for table in sql.RESULT_TABLES:
                    await conn.execute(sql.drop_retired(table))
        except asyncpg.PostgresError as exc:  # e.g. readers held the locks past the timeout
            log.warning("replaced result tables left for the next run to drop: %s", exc)
        except (OSError, asyncpg.InterfaceError, TimeoutError):
            # Its connection failed after the commit (a network that froze, say): once
            # more over a new one, bounded; else the next run or the reaper drops them.
            terminate(conn)
            await self._drop_over_new_connection(
                [sql.drop_retired(table) for table in sql.RESULT_TABLES], "replaced result tables"
            )

    async def _abort(self, stalled: bool) -> None:
        for stream in self.streams.values():
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
        for stream in self.streams.values():
            if stream.task is not None:
                await asyncio.gather(stream.task, return_exceptions=True)
        if stalled:
            # Connections that stopped answering are of no use, here or in the pool: end
            # them and their backends (which hold the staging tables' locks).
            pids = [server_pid(conn) for conn in self._conns]
            for conn in self._conns:
                terminate(conn)
            await self.pool.expire_connections()
            await terminate_backends(self.pool, pids)
            tables = list(sql.RESULT_TABLES)[: len(self._conns)]
            await self._drop_over_new_connection(
                [sql.drop_staging(table) for table in tables], "staging tables"
            )
            return
        orphaned: list[str] = []
        for conn, table in zip(self._conns, sql.RESULT_TABLES, strict=False):
            try:
                await conn.execute(sql.drop_staging(table))
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                terminate(conn)
                orphaned.append(table)
        if orphaned:
            await self._drop_over_new_connection(
                [sql.drop_staging(table) for table in orphaned], "staging tables"
            )

    async def _drop_over_new_connection(self, drops: list[str], what: str) -> None:
        """Drop tables whose own connection died (e.g. killed mid-COPY, or frozen).

        The dead backend's locks go once the server notices; the waits are bounded so a
        database that is gone cannot hang the abort (the next run drops leftovers anyway).
        """
        timeout_ms = int(CLEANUP_TIMEOUT * 1000)
        try:
            async with self.pool.acquire(timeout=CLEANUP_TIMEOUT) as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{timeout_ms}ms'")
                for drop in drops:
                    await conn.execute(drop)
        except DATABASE_ERRORS as exc:
            log.warning("%s left for the next run to drop: %s", what, exc)

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        # To the end, whatever cancels the caller: a cancellation arriving during one
        # release left the others' connections checked out (the pool's close then waited
        # for them forever), and one arriving during the abort let the release run first.
        await to_the_end(self._close(exc_type is not None, isinstance(exc, TimeoutError)))

    async def _close(self, failed: bool, stalled: bool) -> None:
        try:
            if failed:
                await self._abort(stalled)
        finally:
            await self._release()

    async def _release(self) -> None:
        for stream in self.streams.values():
            stream.forget()
        for conn in self._conns:
            # A reset that fails ends its connection (asyncpg): the others still go back.
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.pool.release(conn)
