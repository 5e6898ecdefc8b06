"""The results table's pages: search, sort by any column, keyset paging.

A page is read in one read-only transaction (one snapshot, the result tables locked as
the swap locks them). Users without a value in the sort column come last, in user id
order, whichever the direction. The cursor of the next page is the last row's (part,
value, user id), so every page costs the same however deep it is.
"""

from __future__ import annotations

import base64
import binascii
import json
import string
from dataclasses import dataclass
from typing import Any

import asyncpg

from ...db import queries
from ...db.database import Connection, Pool
from ..errors import Problem

PAGE_SIZE = 50
# Below this many matches a search sorts within them; above, it scans in sort order.
MATCH_CAP = 1_000
PAGE_TIMEOUT_MS = 5_000
BIGINT_MAX = 2**63 - 1


@dataclass(frozen=True)
class Cursor:
    part: int  # 0: rows with a value in the sort column, 1: rows without
    value: Any
    user_id: int

    def encode(self) -> str:
        raw = json.dumps([self.part, self.value, self.user_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            part, value, user_id = json.loads(raw)
        except (binascii.Error, ValueError, TypeError):
            raise Problem(
                400, "the page link is damaged; start again from the first page"
            ) from None
        if part not in (0, 1) or type(user_id) is not int or abs(user_id) > BIGINT_MAX:
            raise Problem(400, "the page link is damaged; start again from the first page")
        if not isinstance(value, str | int | float | None) or isinstance(value, bool):
            raise Problem(400, "the page link is damaged; start again from the first page")
        return cls(part, value, user_id)


@dataclass(frozen=True)
class Query:
    sort: str = "user_id"
    descending: bool = False
    q: str = ""
    after: Cursor | None = None


@dataclass
class Page:
    rows: list[asyncpg.Record]
    next: Cursor | None
    matches: int | None  # users matching the search, when they were counted
    broad: bool  # the search was counted and matches more than MATCH_CAP users


ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def search_terms(q: str) -> tuple[int | None, str]:
    """A search's parameters: the user id it stands for (if any), and its text with A-Z
    folded to a-z, as the SQL folds the names (queries._MATCH)."""
    text = q.strip()
    qid = int(text) if text.isascii() and text.isdigit() and int(text) <= BIGINT_MAX else None
    return qid, text.translate(ASCII_LOWER)


def _sort_value(key: queries.SortKey, value: Any) -> Any:
    """A cursor's value as the sort column's type (the link may have been edited)."""
    if key.sql_type == "text" and isinstance(value, str):
        return value
    if key.sql_type == "double precision" and isinstance(value, int | float):
        return float(value)
    bound = 2**31 if key.sql_type == "integer" else 2**63
    if key.sql_type in ("bigint", "integer") and isinstance(value, int) and -bound <= value < bound:
        return value
    raise Problem(400, "the page link does not fit its sort column; start from the first page")


async def read_page(pool: Pool, query: Query, limit: int = PAGE_SIZE) -> Page:
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(queries.LOCK_RESULTS)
        await conn.execute(queries.PARALLEL_SCANS)
        await conn.execute(queries.STATEMENT_TIMEOUT.format(ms=PAGE_TIMEOUT_MS))
        try:
            return await _read(conn, query, limit)
        except asyncpg.QueryCanceledError:
            what = f"sorting every match of {query.q!r}" if query.q else "this page"
            raise Problem(
                503,
                f"{what} took longer than {PAGE_TIMEOUT_MS / 1000:g} s; "
                "narrow the search or sort by user id",
                title="Page too slow",
                headers={"Retry-After": "5"},
            ) from None


async def _read(conn: Connection, query: Query, limit: int) -> Page:
    key = queries.SORT_KEYS[query.sort]
    search: str | None = None
    search_args: list[Any] = []
    matches: int | None = None
    broad = False
    if query.q:
        qid, text = search_terms(query.q)
        search, search_args = "scan", [qid, text]
        # A sort column beside the name (and without an index to mislead the planner)
        # is one scan that filters as it sorts; the others first collect the matches.
        if key.table not in queries.NAMED_TABLES or key.column == "user_id":
            found = await conn.fetch(queries.MATCHES, qid, text, MATCH_CAP + 1)
            if len(found) <= MATCH_CAP:
                search, search_args = "ids", [[r["user_id"] for r in found]]
                matches = len(found)
            else:
                broad = True
    after = query.after
    picked: list[tuple[int, Any, int]] = []
    if after is None or after.part == 0:
        args: list[Any] = [limit + 1]
        if after is not None and key.by_user_id:
            args.append(after.user_id)
        elif after is not None:
            args += [_sort_value(key, after.value), after.user_id]
        sql = queries.valued_page(key, query.descending, after is not None, search)
        picked = [
            (r["user_id"], r["sort_value"], 0) for r in await conn.fetch(sql, *args, *search_args)
        ]
    if key.empty is not None and len(picked) <= limit:
        empty_after = after.user_id if after is not None and after.part == 1 else None
        args = [limit + 1 - len(picked)]
        if empty_after is not None:
            args.append(empty_after)
        sql = queries.empty_page(key, query.descending, empty_after is not None, search)
        picked += [(r["user_id"], None, 1) for r in await conn.fetch(sql, *args, *search_args)]
    more = len(picked) > limit
    picked = picked[:limit]
    rows = {
        r["user_id"]: r for r in await conn.fetch(queries.FEATURES_BY_IDS, [p[0] for p in picked])
    }
    last = picked[-1] if picked else None
    return Page(
        rows=[rows[user_id] for user_id, _, _ in picked],
        next=Cursor(last[2], last[1], last[0]) if more and last is not None else None,
        matches=matches,
        broad=broad,
    )
