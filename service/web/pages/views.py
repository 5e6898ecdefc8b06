"""The pages' handlers: read the request, call the runner or one query, render a template.

Runs are started, read and cancelled through the same ``Runner`` and ``intake`` the JSON
API uses; errors are raised and rendered as HTML error pages by one middleware.
"""

from __future__ import annotations

import asyncio
import hmac
from datetime import datetime
from typing import Any

from aiohttp import web

from ...db import queries, sql
from ...jobs import run_to_json
from ...runstore import ACTIVE
from .. import intake
from ..errors import Problem
from ..handlers import features_to_json, int_param
from ..keys import POOL, RUNNER, SETTINGS
from . import browse, charts
from .export import FEATURE_COLUMNS, stream_export
from .render import CHART_CACHE, render
from .session import SESSION, SIGN_IN, check_csrf, redirect_target, see_other

pages = web.RouteTableDef()

RUNS_PER_PAGE = 20
ERRORS_PER_PAGE = 25
CHART_RUNS = 20
CHART_COMPOUNDS = 20
SORT_LABELS = {
    "user_id": "User id",
    "name": "Name",
    "experiment_count": "Experiments",
    "average_experiments": "Share of all experiments",
    "average_run_time": "Mean run time",
    "compound_name": "Top compound",
    "top_compound_experiments": "Its experiments",
    "tie_count": "Tied compounds",
}


def progress_view(run: dict[str, Any]) -> dict[str, Any]:
    """How far a run is, as a fraction and a sentence (the bar and its text say the same).

    Reading the files is the first half, aggregating and loading partitions the second.
    """
    progress = run.get("progress") or {}
    phase = progress.get("phase", run["status"])
    read, total = progress.get("bytes_read", 0), progress.get("bytes_total", 0)
    done, parts = progress.get("partitions_done", 0), progress.get("partitions_total", 0)
    fraction = 0.0
    if phase == "reading" and total:
        fraction = 0.5 * read / total
    elif phase == "loading":
        fraction = 0.5 + (0.5 * done / parts if parts else 0.0)
    elif phase in ("committing", "done"):
        fraction = 1.0
    text = (
        f"{phase}: {read / 1e6:.1f} of {total / 1e6:.1f} MB read, "
        f"{done} of {parts} partitions loaded"
    )
    return {
        "id": run["id"],
        "status": run["status"],
        "active": run["status"] in ACTIVE,
        "phase": phase,
        "fraction": round(min(fraction, 1.0), 4),
        "percent": round(100 * min(fraction, 1.0)),
        "text": text,
    }


def duration(run: dict[str, Any]) -> float | None:
    if run["started_at"] is None or run["finished_at"] is None:
        return None
    started = datetime.fromisoformat(run["started_at"])
    return (datetime.fromisoformat(run["finished_at"]) - started).total_seconds()


def source_text(source: dict[str, Any]) -> str:
    kind = source.get("kind")
    if kind == "dataset":
        name = source.get("name", ".")
        return "data directory" if name == "." else f"dataset {name}"
    if kind == "upload":
        sizes = source.get("files", {})
        total = sum(f.get("bytes", 0) for f in sizes.values())
        return f"upload ({len(sizes)} files, {total:,} bytes)"
    return f"directory {source.get('path', '')}"


def run_view(run: dict[str, Any]) -> dict[str, Any]:
    stats = run["stats"] or {}
    rows = run["progress"].get("rows_read", {}) if run["progress"] else {}
    return {
        **run,
        "duration": duration(run),
        "source_text": source_text(run["source"]),
        "rows": sum(stats.get("rows_loaded", {}).values()) if stats else sum(rows.values()),
        "live": progress_view(run),
    }


@pages.get("/", allow_head=False)
async def runs_page(request: web.Request) -> web.Response:
    before = _int_query(request, "before")
    rows = await request.app[POOL].fetch(queries.RUNS_PAGE, before, RUNS_PER_PAGE + 1)
    runner = request.app[RUNNER]
    runs = []
    for row in rows[:RUNS_PER_PAGE]:
        # The active run comes from the runner, with its live progress.
        run = await runner.get(row["id"]) if row["status"] in ACTIVE else run_to_json(row)
        runs.append(run_view(run))
    older = rows[RUNS_PER_PAGE - 1]["id"] if len(rows) > RUNS_PER_PAGE else None
    return render(request, "runs.html", runs=runs, older=older, before=before)


@pages.get("/ui/runs/new", allow_head=False)
async def new_run_page(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    datasets = await asyncio.to_thread(intake.list_datasets, settings.data_dir)
    return render(
        request, "new_run.html", datasets=datasets, max_upload_bytes=settings.max_upload_bytes
    )


@pages.post("/ui/runs")
async def upload_run(request: web.Request) -> web.Response:
    await check_csrf(request)  # before a byte of the upload is read
    run_request = await intake.read_run_request(request, request.app[SETTINGS])
    return await _submit(request, run_request)


@pages.post("/ui/runs/dataset")
async def dataset_run(request: web.Request) -> web.Response:
    form = await _form(request)
    options = intake.parse_options({k: v for k, v in form.items() if k in intake.OPTION_FIELDS})
    run_request = await intake.dataset_request(
        request.app[SETTINGS], form.get("dataset", ""), options
    )
    return await _submit(request, run_request)


async def _submit(request: web.Request, run_request: Any) -> web.Response:
    try:
        run = await request.app[RUNNER].submit(run_request)
    except BaseException:
        intake.discard(run_request)
        raise
    return see_other(f"/ui/runs/{run['id']}")


@pages.get("/ui/runs/{run_id}", allow_head=False)
async def run_page(request: web.Request) -> web.Response:
    run = run_view(await request.app[RUNNER].get(int_param(request, "run_id")))
    errors = run["errors"]
    pages_total = max(1, -(-len(errors) // ERRORS_PER_PAGE))
    page = min(max(1, _int_query(request, "errors_page") or 1), pages_total)
    shown = errors[(page - 1) * ERRORS_PER_PAGE : page * ERRORS_PER_PAGE]
    return render(
        request,
        "run.html",
        run=run,
        errors=shown,
        errors_page=page,
        errors_pages=pages_total,
        first_error=(page - 1) * ERRORS_PER_PAGE + 1,
    )


@pages.get("/ui/runs/{run_id}/progress", allow_head=False)
async def run_progress(request: web.Request) -> web.Response:
    """What the progress bar polls: small JSON, no reload."""
    run = await request.app[RUNNER].get(int_param(request, "run_id"))
    return web.json_response(progress_view(run))


@pages.post("/ui/runs/{run_id}/cancel")
async def cancel_run(request: web.Request) -> web.Response:
    await _form(request)
    run = await request.app[RUNNER].cancel(int_param(request, "run_id"))
    return see_other(f"/ui/runs/{run['id']}")


@pages.get("/ui/results", allow_head=False)
async def results_page(request: web.Request) -> web.Response:
    query = _results_query(request)
    page = await browse.read_page(request.app[POOL], query)
    last = await request.app[POOL].fetchrow(sql.LAST_SUCCESS)
    return render(
        request,
        "results.html",
        query=query,
        page=page,
        rows=[features_to_json(r) for r in page.rows],
        labels=SORT_LABELS,
        match_cap=browse.MATCH_CAP,
        last=run_to_json(last) if last is not None else None,
    )


@pages.get(r"/ui/results.{fmt:csv|json}", allow_head=False)
async def export_results(request: web.Request) -> web.StreamResponse:
    q = request.query.get("q", "")
    fmt = request.match_info["fmt"]
    return await stream_export(request, request.app[POOL], None, FEATURE_COLUMNS, fmt, q)


@pages.get(
    r"/ui/tables/{table:experiment_counts|experiment_averages|top_compounds}.{fmt:csv|json}",
    allow_head=False,
)
async def export_table(request: web.Request) -> web.StreamResponse:
    table, fmt = request.match_info["table"], request.match_info["fmt"]
    columns = sql.RESULT_TABLES[table]
    return await stream_export(request, request.app[POOL], table, columns, fmt)


@pages.get("/ui/users/{user_id}", allow_head=False)
async def user_page(request: web.Request) -> web.Response:
    user_id = int_param(request, "user_id")
    row = await request.app[POOL].fetchrow(sql.USER_FEATURES, user_id)
    if row is None:
        raise Problem(404, f"no features for user {user_id} in the results", title="User not found")
    return render(request, "user.html", user=features_to_json(row))


@pages.get("/ui/charts", allow_head=False)
async def charts_page(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    durations = await pool.fetch(queries.LAST_DURATIONS, CHART_RUNS)
    result_charts = await _result_charts(request)
    runs_chart = charts.bar_chart(
        "Duration of the last runs",
        f"Wall time of the last {CHART_RUNS} finished runs, newest first, in seconds.",
        "seconds",
        [
            (f"run {r['id']} ({r['status']})", r["seconds"], f"{r['seconds']:.2f} s")
            for r in durations
        ],
    )
    return render(request, "charts.html", charts=[*result_charts, runs_chart])


async def _result_charts(request: web.Request) -> list[charts.Chart]:
    """The two charts of the results, computed once per successful run."""
    pool = request.app[POOL]
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(queries.LOCK_RESULTS)
        run_id = await conn.fetchval(queries.LAST_SUCCESS_ID)
        cache = request.app[CHART_CACHE]
        if run_id in cache:
            return cache[run_id]
        per_user = await conn.fetch(queries.EXPERIMENTS_PER_USER)
        top = await conn.fetch(queries.TOP_COMPOUNDS_CHART, CHART_COMPOUNDS)
    bins = charts.histogram_bins([(r["experiment_count"], r["users"]) for r in per_user])
    made = [
        charts.bar_chart(
            "Experiments per user",
            "How many users ran how many experiments.",
            "users",
            [(f"{label} experiments", users, f"{users:,} users") for label, users in bins],
        ),
        charts.bar_chart(
            f"The {CHART_COMPOUNDS} compounds most often a user's top compound",
            "For how many users each compound is the one they used most.",
            "users",
            [
                (
                    f"{r['compound_name']} (id {r['compound_id']})",
                    r["users"],
                    f"{r['users']:,} users",
                )
                for r in top
            ],
        ),
    ]
    cache.clear()
    cache[run_id] = made
    return made


@pages.get("/ui/signin", allow_head=False)
async def signin_page(request: web.Request) -> web.Response:
    if not request.app[SETTINGS].api_token:
        return see_other("/")
    return render(request, "signin.html", next=redirect_target(request.query.get("next")))


@pages.post("/ui/signin")
async def signin(request: web.Request) -> web.Response:
    form = await _form(request)
    token = request.app[SETTINGS].api_token
    target = redirect_target(form.get("next"))
    if not token:
        return see_other("/")
    if not hmac.compare_digest(form.get("token", "").encode(), token.encode()):
        return render(
            request, "signin.html", status=401, next=target, error="That token is not right."
        )
    request[SESSION] = request[SESSION].renewed(signed_in=True)
    return see_other(target)


@pages.post("/ui/signout")
async def signout(request: web.Request) -> web.Response:
    await _form(request)
    request[SESSION] = request[SESSION].renewed(signed_in=False)
    return see_other(SIGN_IN if request.app[SETTINGS].api_token else "/")


async def _form(request: web.Request) -> dict[str, str]:
    """A posted form's text fields, after its CSRF token is checked."""
    posted = await request.post()
    form = {k: v for k, v in posted.items() if isinstance(v, str)}
    await check_csrf(request, form)
    return form


def _results_query(request: web.Request) -> browse.Query:
    sort = request.query.get("sort", "user_id")
    if sort not in queries.SORT_KEYS:
        raise Problem(400, f"sort must be one of {', '.join(queries.SORT_KEYS)}, got {sort!r}")
    direction = request.query.get("dir", "asc")
    if direction not in ("asc", "desc"):
        raise Problem(400, f"dir must be asc or desc, got {direction!r}")
    after = request.query.get("after")
    return browse.Query(
        sort=sort,
        descending=direction == "desc",
        q=request.query.get("q", "").strip()[:200],
        after=browse.Cursor.decode(after) if after else None,
    )


def _int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or int(raw) > browse.BIGINT_MAX:
        raise Problem(400, f"{name} must be a positive integer, got {raw!r}")
    return int(raw)
