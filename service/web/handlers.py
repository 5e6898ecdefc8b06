"""Thin handlers: read the request, call the runner or one query, render JSON.

Errors are raised, never rendered here: ``errors.problem_middleware`` turns them into
problem+json. Every route is documented in ``openapi.py`` (a test checks both agree).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from aiohttp import web

from .. import rejects
from ..cluster import not_ready
from ..db import sql
from ..runstore import ACTIVE
from . import intake
from .errors import Problem
from .keys import EXECUTOR, METRICS, POOL, RUN_ID, RUNNER, SETTINGS
from .metrics import CONTENT_TYPE
from .openapi import DOCUMENT

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

READY_TIMEOUT = 1.0
RUN_STATUSES = (*ACTIVE, "succeeded", "failed", "cancelled")
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
BIGINT_MAX = 2**63 - 1


@routes.post("/runs")
async def start_run(request: web.Request) -> web.Response:
    run_request = await intake.read_run_request(request, request.app[SETTINGS])
    try:
        run = await request.app[RUNNER].submit(run_request)
    except BaseException:
        intake.discard(run_request)
        raise
    return run_response(run, status=202, headers={"Location": f"/runs/{run['id']}"})


@routes.get("/runs", allow_head=False)
async def list_runs(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise Problem(400, f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    raw_limit = request.query.get("limit", str(DEFAULT_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise Problem(400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw_limit!r}")
    runs = await request.app[RUNNER].history(status, int(raw_limit))
    return web.json_response({"runs": runs})


@routes.get("/runs/{run_id}", allow_head=False)
async def get_run(request: web.Request) -> web.Response:
    run = await request.app[RUNNER].get(int_param(request, "run_id"))
    return run_response(run)


@routes.get("/runs/{run_id}/rejects.csv", allow_head=False)
async def run_rejects(request: web.Request) -> web.StreamResponse:
    """The rejected rows of a skip-mode run as CSV, streamed from the database."""
    run = await request.app[RUNNER].get(int_param(request, "run_id"))
    if run["rejects"] is None:
        raise Problem(
            404,
            f"run {run['id']} kept no rejected rows (not a skip-mode run, still running,"
            " or pruned: only the newest runs' are kept)",
            title="No rejected rows",
            kind="rejects-not-found",
            run_id=run["id"],
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="run-{run["id"]}-rejects.csv"',
        }
    )
    response[RUN_ID] = run["id"]
    await response.prepare(request)
    await rejects.write_csv(request.app[POOL], run["id"], response.write)
    await response.write_eof()
    return response


@routes.post("/runs/{run_id}/cancel")
async def cancel_run(request: web.Request) -> web.Response:
    run = await request.app[RUNNER].cancel(int_param(request, "run_id"))
    return run_response(run)


@routes.get("/users/{user_id}/features", allow_head=False)
async def user_features(request: web.Request) -> web.Response:
    user_id = int_param(request, "user_id")
    row = await request.app[POOL].fetchrow(sql.USER_FEATURES, user_id)
    if row is None:
        raise Problem(
            404, f"no features for user {user_id}", title="User not found", kind="user-not-found"
        )
    return web.json_response(features_to_json(row))


@routes.get("/healthz", allow_head=False)
async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Touches no database, so a DB outage never kills it."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz", allow_head=False)
async def readyz(request: web.Request) -> web.Response:
    """Ready: the database answers, the schema is in place, workers (local or Dask) run."""
    try:
        async with asyncio.timeout(READY_TIMEOUT), request.app[POOL].acquire() as conn:
            ready = await conn.fetchval(sql.SCHEMA_READY)
    except Exception as exc:
        log.warning("not ready", extra={"event": "readyz", "detail": repr(exc)})
        raise Problem(
            503, f"database unreachable ({type(exc).__name__})", headers={"Retry-After": "5"}
        ) from None
    if not ready:
        raise Problem(503, "database schema missing", headers={"Retry-After": "5"})
    unready = not_ready(request.app[EXECUTOR])
    if unready is not None:
        raise Problem(503, unready, headers={"Retry-After": "5"})
    return web.json_response({"status": "ready"})


@routes.get("/metrics", allow_head=False)
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/openapi.json", allow_head=False)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


def run_response(
    run: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.json_response(run, status=status, headers=headers)
    response[RUN_ID] = run["id"]
    return response


def int_param(request: web.Request, name: str) -> int:
    raw = request.match_info[name]
    digits = raw[1:] if raw.startswith("-") else raw
    if not digits.isdigit() or not digits.isascii() or abs(int(raw)) > BIGINT_MAX:
        raise Problem(400, f"{name} must be a 64-bit integer, got {raw!r}")
    return int(raw)


def features_to_json(row: asyncpg.Record) -> dict[str, Any]:
    top = None
    if row["compound_id"] is not None:
        top = {
            "id": row["compound_id"],
            "name": row["compound_name"],
            "structure": row["compound_structure"],
            "experiments": row["top_compound_experiments"],
            "tie_count": row["tie_count"],
        }
    return {
        "user_id": row["user_id"],
        "name": row["name"],
        "experiment_count": row["experiment_count"],
        "average_experiments": row["average_experiments"],
        "average_run_time": row["average_run_time"],
        "top_compound": top,
    }
