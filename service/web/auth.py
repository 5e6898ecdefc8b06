"""Bearer-token authentication, when a token is configured."""

from __future__ import annotations

import hmac

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .errors import Problem
from .pages.session import is_page

# Probes and scrapers carry no credentials; these answer nothing sensitive.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
CHALLENGE = 'Bearer realm="experiment-etl"'


def bearer_auth(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The pages sign in with a session cookie instead (pages.session).
        if request.path not in OPEN_PATHS and not is_page(request.path):
            scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                raise Problem(
                    401,
                    "send the API token as 'Authorization: Bearer <token>'",
                    headers={hdrs.WWW_AUTHENTICATE: CHALLENGE},
                )
        return await handler(request)

    return check_token
