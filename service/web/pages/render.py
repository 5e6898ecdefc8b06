"""Templates (Jinja2, autoescaped) and the HTML error page of the pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ..errors import Problem
from ..keys import SETTINGS
from .charts import Chart
from .session import SESSION

HERE = Path(__file__).resolve().parent
TEMPLATES = web.AppKey("templates", jinja2.Environment)
# Charts of the results, by the id of the run that produced them (one entry).
CHART_CACHE: web.AppKey[dict[int | None, list[Chart]]] = web.AppKey("chart_cache")


def environment() -> jinja2.Environment:
    """Everything interpolated is HTML-escaped: names come from CSV files."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["number"] = _number
    return env


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value and abs(value) < 10**-digits:
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return f"{value:,}"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session = request.get(SESSION)
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            path=request.path,
            csrf=session.csrf if session is not None else "",
            auth=bool(request.app[SETTINGS].api_token),
            signed_in=session is not None and session.signed_in,
            **context,
        )
    )
    return web.Response(text=html, content_type="text/html", status=status)


def error_page(request: web.Request, problem: Problem) -> web.StreamResponse:
    response = render(request, "error.html", status=problem.status, problem=problem)
    response.headers.update(problem.headers)
    return response
