"""The dashboard: server-rendered pages in the same app as the JSON API.

``/`` and everything under ``/ui/`` are pages (HTML, their exports, their static files);
they sign in with a session cookie, the API keeps its bearer token.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from ...settings import Settings
from ..errors import problem_handler
from .render import CHART_CACHE, HERE, TEMPLATES, environment, error_page
from .session import is_page, security_headers, session_key, session_middleware
from .views import pages

__all__ = ["is_page", "middlewares", "setup"]


def middlewares(settings: Settings) -> list[Middleware]:
    """Errors of pages as HTML pages, then sessions (inside the API's problem+json one)."""
    return [
        problem_handler(error_page, lambda request: is_page(request.path)),
        session_middleware(session_key(settings.api_token), required=bool(settings.api_token)),
    ]


def setup(app: web.Application) -> None:
    app[TEMPLATES] = environment()
    app[CHART_CACHE] = {}
    app.add_routes(pages)
    app.router.add_static("/ui/static", HERE / "static")
    app.on_response_prepare.append(security_headers)
