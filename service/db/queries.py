"""Read-only SQL of the web pages, with $n parameters (the writes are in ``sql.py``).

The results table is paged by keyset (sort value, user_id) over the one table that holds
the sort column, without indexes beyond the primary keys: every page is one bounded,
parallel top-N scan (README: figures at 1M users), and the load builds nothing extra.
Statements are put together only from the fixed names below, never from request text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .sql import FEATURES, RESULT_TABLES

# One snapshot for the few statements of a page, with the result tables locked in the
# order the swap takes them, so a swap waits for the page instead of deadlocking with it.
LOCK_RESULTS = (
    "LOCK TABLE experiment_counts, experiment_averages, top_compounds IN ACCESS SHARE MODE"
)
# A page's scans are short; let PostgreSQL run them on all cores even under a LIMIT.
PARALLEL_SCANS = "SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0"
STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = '{ms}ms'"

RUNS_PAGE = """
SELECT * FROM etl_runs WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2
"""
LAST_DURATIONS = """
SELECT id, status, extract(epoch FROM finished_at - started_at)::float8 AS seconds
FROM etl_runs WHERE finished_at IS NOT NULL AND started_at IS NOT NULL
ORDER BY id DESC LIMIT $1
"""
LAST_SUCCESS_ID = "SELECT max(id) FROM etl_runs WHERE status = 'succeeded'"
EXPERIMENTS_PER_USER = """
SELECT experiment_count, count(*)::bigint AS users
FROM experiment_counts GROUP BY experiment_count ORDER BY experiment_count
"""
TOP_COMPOUNDS_CHART = """
SELECT compound_id, compound_name, count(*)::bigint AS users
FROM top_compounds GROUP BY compound_id, compound_name
ORDER BY users DESC, compound_id LIMIT $1
"""

FEATURES_BY_IDS = FEATURES + "WHERE c.user_id = ANY($1::bigint[])"

# The search: a user id (when q is an integer) or a part of the name, ignoring the case
# of ASCII letters. lower() under "C" folds A-Z only, ~40% cheaper per row than the
# locale's; the text comes folded the same way (browse.search_terms), since lower() of a
# parameter would run once per row in a generic plan.
_MATCH = '({a}.user_id = ${qid}::bigint OR strpos(lower({a}.name COLLATE "C"), ${q}::text) > 0)'
# The matching ids, capped: below the cap a page sorts within them; above it the matches
# are common enough that a scan in sort order finds a page of them quickly.
MATCHES = (
    f"SELECT c.user_id FROM experiment_counts c WHERE {_MATCH.format(a='c', qid=1, q=2)} LIMIT $3"
)


@dataclass(frozen=True)
class SortKey:
    """A sortable column of the results: where it lives and what stands for no value.

    ``empty`` is None when every user has a value, "null" when the column can be NULL,
    "missing" when users without a row in the table have none (top_compounds).
    """

    table: str
    column: str
    sql_type: str
    empty: Literal["null", "missing"] | None = None

    @property
    def by_user_id(self) -> bool:
        return self.column == "user_id"

    @property
    def expression(self) -> str:
        """As ordered, on alias ``x``: text bytewise (the same order on every server, and
        memcmp instead of the locale's collation in the top-N sort)."""
        collate = ' COLLATE "C"' if self.sql_type == "text" else ""
        return f"x.{self.column}{collate}"


SORT_KEYS: dict[str, SortKey] = {
    "user_id": SortKey("experiment_counts", "user_id", "bigint"),
    "name": SortKey("experiment_counts", "name", "text"),
    "experiment_count": SortKey("experiment_counts", "experiment_count", "integer"),
    # The share is experiment_count / total: the same order.
    "average_experiments": SortKey("experiment_counts", "experiment_count", "integer"),
    "average_run_time": SortKey(
        "experiment_averages", "average_run_time", "double precision", "null"
    ),
    "compound_name": SortKey("top_compounds", "compound_name", "text", "missing"),
    "top_compound_experiments": SortKey("top_compounds", "experiment_count", "integer", "missing"),
    "tie_count": SortKey("top_compounds", "tie_count", "integer", "missing"),
}
NAMED_TABLES = {"experiment_counts", "experiment_averages"}


def _match_clause(table: str, alias: str, first: int) -> str:
    """The search on ``alias`` with its two parameters numbered from ``first``."""
    if table in NAMED_TABLES:
        return _MATCH.format(a=alias, qid=first, q=first + 1)
    return (
        f"EXISTS (SELECT 1 FROM experiment_counts m WHERE m.user_id = {alias}.user_id "
        f"AND {_MATCH.format(a='m', qid=first, q=first + 1)})"
    )


def valued_page(key: SortKey, descending: bool, after: bool, search: str | None) -> str:
    """Users with a value in the sort column, in (value, user_id) order.

    Parameters: $1 limit, then ($2 value, $3 user_id) when ``after`` ($2 user_id alone
    when sorting by it), then either the
    matching ids (``search == "ids"``) or the search's id and text (``search == "scan"``).
    """
    direction, compare = ("DESC", "<") if descending else ("ASC", ">")
    col = key.expression
    where = [f"x.{key.column} IS NOT NULL"]
    params = 1
    single = key.by_user_id
    if after and single:
        where.append(f"x.user_id {compare} $2::bigint")
        params = 2
    elif after:
        where.append(f"({col}, x.user_id) {compare} ($2::{key.sql_type}, $3::bigint)")
        params = 3
    where.extend(_search_clause(key.table, search, params + 1))
    order = f"x.user_id {direction}" if single else f"{col} {direction}, x.user_id {direction}"
    return (
        f"SELECT x.user_id, x.{key.column} AS sort_value FROM {key.table} x "
        f"WHERE {' AND '.join(where)} ORDER BY {order} LIMIT $1"
    )


def empty_page(key: SortKey, descending: bool, after: bool, search: str | None) -> str:
    """Users without a value in the sort column, in user_id order (they come last).

    Parameters: $1 limit, $2 user_id when ``after``, then the search's as in
    :func:`valued_page`.
    """
    direction, compare = ("DESC", "<") if descending else ("ASC", ">")
    bound = f"{compare} $2::bigint" if after else ""
    if key.empty == "null":
        table, where = key.table, [f"x.{key.column} IS NULL"]
    else:
        # The bound repeated inside lets a merge anti join start at it, not at id 0.
        inner = f" AND t.user_id {bound}" if after else ""
        table = "experiment_counts"
        where = [f"NOT EXISTS (SELECT 1 FROM {key.table} t WHERE t.user_id = x.user_id{inner})"]
    params = 1
    if after:
        where.append(f"x.user_id {bound}")
        params = 2
    where.extend(_search_clause(table, search, params + 1))
    return (
        f"SELECT x.user_id, NULL AS sort_value FROM {table} x "
        f"WHERE {' AND '.join(where)} ORDER BY x.user_id {direction} LIMIT $1"
    )


def _search_clause(table: str, search: str | None, first: int) -> list[str]:
    if search is None:
        return []
    if search == "ids":
        # A join, not "= ANY": a generic plan would search a long array once per row.
        return [f"x.user_id IN (SELECT unnest(${first}::bigint[]))"]
    return [_match_clause(table, "x", first)]


def export_rows(table: str | None, search: bool) -> str:
    """One batch of an export in user_id order: $1 after this id, $2 rows (then the search).

    ``table`` None exports the joined features (the results page): the batch's ids come
    first, so the join touches those rows only. ``tableoid`` tells the exporter whether a
    swap replaced the tables between two batches.
    """
    if table is None:
        match = f"AND {_match_clause('experiment_counts', 'b', 3)} " if search else ""
        ids = (
            f"SELECT b.user_id FROM experiment_counts b WHERE b.user_id > $1 {match}"
            "ORDER BY b.user_id LIMIT $2"
        )
        return (
            FEATURES.replace("SELECT ", "SELECT c.tableoid::bigint AS source_table, ", 1)
            + f"WHERE c.user_id = ANY(ARRAY({ids})) ORDER BY c.user_id"
        )
    columns = ", ".join(RESULT_TABLES[table])
    return (
        f"SELECT tableoid::bigint AS source_table, {columns} FROM {table} "
        "WHERE user_id > $1 ORDER BY user_id LIMIT $2"
    )


def table_oid(table: str | None) -> str:
    """The oid the name stands for now (the joined export reads experiment_counts first)."""
    return f"SELECT '{table or 'experiment_counts'}'::regclass::oid::bigint"
