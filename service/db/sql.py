"""Every SQL statement the service runs, with $n parameters. Table names are constants."""

from __future__ import annotations

RESULT_TABLES: dict[str, tuple[str, ...]] = {
    "experiment_counts": ("user_id", "name", "experiment_count"),
    "experiment_averages": ("user_id", "name", "average_experiments", "average_run_time"),
    "top_compounds": (
        "user_id",
        "compound_id",
        "compound_name",
        "compound_structure",
        "experiment_count",
        "tie_count",
    ),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiment_counts (
    user_id bigint PRIMARY KEY,
    name text NOT NULL,
    experiment_count integer NOT NULL
);
CREATE TABLE IF NOT EXISTS experiment_averages (
    user_id bigint PRIMARY KEY,
    name text NOT NULL,
    average_experiments double precision NOT NULL,
    average_run_time double precision
);
CREATE TABLE IF NOT EXISTS top_compounds (
    user_id bigint PRIMARY KEY,
    compound_id bigint NOT NULL,
    compound_name text NOT NULL,
    compound_structure text NOT NULL,
    experiment_count integer NOT NULL,
    tie_count integer NOT NULL
);
CREATE TABLE IF NOT EXISTS etl_runs (
    id bigserial PRIMARY KEY,
    status text NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    source jsonb NOT NULL,
    options jsonb NOT NULL DEFAULT '{}',
    progress jsonb NOT NULL DEFAULT '{}',
    stats jsonb,
    errors jsonb NOT NULL DEFAULT '[]',
    error_total integer NOT NULL DEFAULT 0,
    message text,
    idempotency_key text UNIQUE,
    request_hash text
);
-- Single flight: at most one queued or running run per database, across processes.
CREATE UNIQUE INDEX IF NOT EXISTS etl_runs_one_active ON etl_runs ((true))
    WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS etl_runs_status_id ON etl_runs (status, id DESC);
-- Rejected rows of skip-mode runs (rejects: how many are kept, NULL when none or pruned)
-- and the completion webhooks' delivery status.
ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS rejects integer;
ALTER TABLE etl_runs ADD COLUMN IF NOT EXISTS webhooks jsonb;
CREATE TABLE IF NOT EXISTS etl_rejects (
    run_id bigint NOT NULL REFERENCES etl_runs (id) ON DELETE CASCADE,
    ordinal integer NOT NULL,
    file text NOT NULL,
    line integer,
    col integer,
    field text,
    message text NOT NULL,
    raw text,
    PRIMARY KEY (run_id, ordinal)
);
"""

# Serialises schema creation between processes starting at the same time.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(727274)"

# Held (session level) by the process executing a run; recovery uses it to tell a live
# run from one whose process died.
# Keyed by schema and run id, so schemas of one database (tests, tenants) never collide.
_RUN_KEY = "hashtextextended(current_schema() || '/etl_runs/' || $1::bigint, 727275)"
RUN_LOCK = f"SELECT pg_try_advisory_lock({_RUN_KEY})"
RUN_UNLOCK = f"SELECT pg_advisory_unlock({_RUN_KEY})"

SCHEMA_READY = """
SELECT count(*) = 4 FROM pg_catalog.pg_tables
WHERE schemaname = current_schema()
  AND tablename IN ('experiment_counts', 'experiment_averages', 'top_compounds', 'etl_runs')
"""


def staging(table: str) -> str:
    return f"{table}_staging"


def retired(table: str) -> str:
    return f"{table}_retired"


def create_staging(table: str) -> str:
    """A fresh staging table; also drops what a process that died mid-run left behind."""
    return (
        f"DROP TABLE IF EXISTS {staging(table)}; "
        f"DROP TABLE IF EXISTS {retired(table)}; "
        f"CREATE TABLE {staging(table)} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )


def index_staging(table: str) -> str:
    """The staging table's primary key, built once its rows are in.

    The three tables' keys are built at once on three connections already; PostgreSQL's
    parallel workers for each build on top only contend for the same cores (1M rows
    each, 2 cores: 0.55 s without them, 0.7-0.8 s with). One simple query is one
    transaction, so SET LOCAL holds for the build alone.
    """
    return (
        "SET LOCAL max_parallel_maintenance_workers = 0; "
        f"ALTER TABLE {staging(table)} ADD CONSTRAINT {staging(table)}_pkey PRIMARY KEY (user_id)"
    )


def drop_staging(table: str) -> str:
    return f"DROP TABLE IF EXISTS {staging(table)}"


def swap(table: str) -> str:
    """Put the staging table in the result table's place (inside the caller's transaction).

    The old table is renamed, not dropped: dropping unlinks its files at COMMIT, which
    for 1M users took ~50 ms of the swap's exclusive locks. ``drop_retired`` removes it
    once the new results are committed.
    """
    return (
        f"ALTER TABLE {table} RENAME TO {retired(table)}; "
        f"ALTER INDEX {table}_pkey RENAME TO {retired(table)}_pkey; "
        f"ALTER TABLE {staging(table)} RENAME TO {table}; "
        f"ALTER INDEX {staging(table)}_pkey RENAME TO {table}_pkey"
    )


def drop_retired(table: str) -> str:
    return f"DROP TABLE IF EXISTS {retired(table)}"


INSERT_RUN = """
INSERT INTO etl_runs (status, source, options, idempotency_key, request_hash)
VALUES ('queued', $1::jsonb, $2::jsonb, $3, $4)
RETURNING *
"""
ACTIVE_RUN = "SELECT * FROM etl_runs WHERE status IN ('queued', 'running') ORDER BY id LIMIT 1"
RUN_BY_ID = "SELECT * FROM etl_runs WHERE id = $1"
RUN_STATUS = "SELECT status FROM etl_runs WHERE id = $1"
RUN_BY_KEY = "SELECT * FROM etl_runs WHERE idempotency_key = $1"
LIST_RUNS = """
SELECT * FROM etl_runs WHERE ($1::text IS NULL OR status = $1) ORDER BY id DESC LIMIT $2
"""
START_RUN = """
UPDATE etl_runs SET status = 'running', started_at = now() WHERE id = $1 AND status = 'queued'
"""
# Only while the run goes: a report in flight as the swap commits the final progress would
# otherwise land after it and leave the record showing an earlier point of the run.
SET_PROGRESS = "UPDATE etl_runs SET progress = $2::jsonb WHERE id = $1 AND status = 'running'"
# The one write of a run's final status. Guarded: a status once final never changes, so
# nothing after the swap's COMMIT (which wrote 'succeeded') can overwrite it. No row back
# means the run had already ended; RUN_BY_ID then says how.
FINISH_RUN = """
UPDATE etl_runs
SET status = $2, finished_at = now(), progress = coalesce($3::jsonb, progress),
    stats = $4::jsonb, errors = $5::jsonb, error_total = $6, message = $7
WHERE id = $1 AND status IN ('queued', 'running')
RETURNING status
"""
# Runs left active by a process that died: nobody holds their run lock any more.
ORPHANED_RUNS = "SELECT id FROM etl_runs WHERE status IN ('queued', 'running')"
# Held while dropping what a dead run left: no run can start meanwhile (its INSERT waits).
LOCK_RUNS = "LOCK TABLE etl_runs IN SHARE MODE"
# Backends of connections that stopped answering: ending them frees their locks.
TERMINATE_BACKENDS = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM unnest($1::int[]) AS pid WHERE pid <> pg_backend_pid()
"""
LAST_SUCCESS = """
SELECT * FROM etl_runs
WHERE status = 'succeeded' AND NOT coalesce((options->>'dry_run')::boolean, false)
ORDER BY finished_at DESC LIMIT 1
"""

REJECT_COLUMNS = ("run_id", "ordinal", "file", "line", "col", "field", "message", "raw")
DELETE_REJECTS = "DELETE FROM etl_rejects WHERE run_id = $1"
SET_REJECTS = "UPDATE etl_runs SET rejects = $2 WHERE id = $1"
# Keeps the rejects of the newest $1 runs that have some.
PRUNE_REJECTS = """
WITH old AS (
    SELECT id FROM etl_runs WHERE rejects IS NOT NULL ORDER BY id DESC OFFSET $1
), gone AS (
    DELETE FROM etl_rejects WHERE run_id IN (SELECT id FROM old)
)
UPDATE etl_runs SET rejects = NULL WHERE id IN (SELECT id FROM old)
"""
REJECTS_OF_RUN = """
SELECT file, line, col, field, message, raw FROM etl_rejects WHERE run_id = $1 ORDER BY ordinal
"""
SET_WEBHOOKS = "UPDATE etl_runs SET webhooks = $2::jsonb WHERE id = $1"

# Users' features from the three tables; the pages add their own WHERE (queries.py).
FEATURES = """
SELECT c.user_id, c.name, c.experiment_count,
       a.average_experiments, a.average_run_time,
       t.compound_id, t.compound_name, t.compound_structure,
       t.experiment_count AS top_compound_experiments, t.tie_count
FROM experiment_counts c
JOIN experiment_averages a USING (user_id)
LEFT JOIN top_compounds t USING (user_id)
"""
USER_FEATURES = FEATURES + "WHERE c.user_id = $1"


def select_rows(table: str) -> str:
    return f"SELECT * FROM {table} ORDER BY user_id LIMIT $1"


def select_user(table: str) -> str:
    return f"SELECT * FROM {table} WHERE user_id = $1"
