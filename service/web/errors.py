"""Every error leaves the API as RFC 9457 ``application/problem+json``, from one middleware.

Handlers raise domain exceptions (from ``jobs``) or :class:`Problem`; the router raises
aiohttp's HTTP exceptions (404, 405); this middleware renders all of them alike. The
pages use the same middleware with an HTML renderer (``problem_handler``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..cluster import ClusterError
from ..faults import connection_failed
from ..jobs import (
    DatabaseUnavailable,
    IdempotencyMismatch,
    RunConflict,
    RunNotActive,
    RunNotFound,
    WorkersUnavailable,
)
from .keys import RUN_ID

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:experiment-etl:problem:"
# Headers of an HTTP exception that still mean something on the problem response.
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


class Problem(Exception):
    """An error answer: HTTP status, a human-readable detail and extra members."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.type = TYPE_PREFIX + kind if kind else "about:blank"
        self.headers = headers or {}
        self.extra = extra

    def response(self, request: web.Request) -> web.Response:
        body = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": request.raw_path,
            **self.extra,
        }
        response = web.json_response(
            body, status=self.status, headers=self.headers, content_type=PROBLEM_JSON
        )
        if self.status == HTTPStatus.REQUEST_TIMEOUT:
            response.force_close()  # a client this slow is not worth waiting for
        run_id = self.extra.get("active_run_id", self.extra.get("run_id"))
        if isinstance(run_id, int):
            response[RUN_ID] = run_id
        return response


def from_domain(exc: Exception) -> Problem | None:
    if _database_away(exc):
        return Problem(
            503,
            f"the database is unavailable ({type(exc).__name__}); try again shortly",
            title="Database unavailable",
            kind="database-unavailable",
            headers={"Retry-After": "5"},
        )
    match exc:
        case RunConflict():
            return Problem(
                409,
                str(exc),
                title="A run is already active",
                kind="run-conflict",
                active_run_id=exc.active_id,
            )
        case RunNotActive():
            return Problem(
                409,
                str(exc),
                title="The run is not active",
                kind="run-not-active",
                run_status=exc.status,
            )
        case RunNotFound():
            return Problem(
                404, str(exc), title="Run not found", kind="run-not-found", run_id=exc.run_id
            )
        case WorkersUnavailable():
            return Problem(
                503,
                str(exc),
                title="Worker processes unavailable",
                kind="workers-unavailable",
                headers={"Retry-After": "30"},
            )
        case ClusterError():
            return Problem(
                503,
                str(exc),
                title="Dask cluster unavailable",
                kind="cluster-unavailable",
                headers={"Retry-After": "5"},
            )
        case IdempotencyMismatch():
            return Problem(
                422,
                str(exc),
                title="Idempotency-Key reused for another request",
                kind="idempotency-mismatch",
            )
    return None


def _database_away(exc: Exception) -> bool:
    """Down or unreachable (refused, reset, timed out: TimeoutError is an OSError), the
    schema not there yet, or a connection it ended or that broke mid-operation."""
    away = DatabaseUnavailable | OSError | asyncpg.UndefinedTableError
    return isinstance(exc, away) or connection_failed(exc)


def from_http(request: web.Request, exc: web.HTTPException) -> Problem:
    default_text = f"{exc.status}: {exc.reason}"
    detail = exc.text if exc.text and exc.text != default_text else None
    if detail is None:
        if exc.status == HTTPStatus.NOT_FOUND:
            detail = f"nothing at {request.path}"
        elif exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
            allowed = exc.headers.get("Allow", "")
            detail = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
        else:
            detail = exc.reason
    headers = {name: exc.headers[name] for name in KEPT_HEADERS if name in exc.headers}
    return Problem(exc.status, detail, title=exc.reason, headers=headers)


Render = Callable[[web.Request, Problem], web.StreamResponse]


def problem_handler(render: Render, applies: Callable[[web.Request], bool]) -> Middleware:
    """A middleware turning every error of the requests it ``applies`` to into ``render``."""

    @web.middleware
    async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not applies(request):
            return await handler(request)
        try:
            return await handler(request)
        except Problem as exc:
            problem = exc
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            problem = from_http(request, exc)
        except Exception as exc:
            found = from_domain(exc)
            if found is None:
                log.exception("unhandled error", extra={"path": request.path})
                found = Problem(500, "an unexpected error occurred; see the server log")
            problem = found
        return render(request, problem)

    return problems


problem_middleware = problem_handler(
    lambda request, problem: problem.response(request), lambda request: True
)
