"""Sessions of the pages: a signed cookie, sign-in with the API token, CSRF tokens.

The cookie holds a random session id, its expiry and whether it is signed in, signed
with HMAC-SHA256. The key derives from ``ETL_API_TOKEN``, so every replica accepts the
same cookies, they survive a restart, and changing the token signs everybody out. Without
a token the pages are open and the key is random per process (the session then only
carries the CSRF token). The CSRF token is an HMAC of the session id: no server state.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from ..errors import Problem

COOKIE = "etl_session"
MAX_AGE = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SIGN_IN = "/ui/signin"
# Pages anyone may see: signing in, and the files the sign-in page itself needs.
OPEN_PAGES = (SIGN_IN, "/ui/static/")


@dataclass(frozen=True)
class Session:
    sid: str
    signed_in: bool
    expires: int
    fresh: bool = False  # issued by this request: the response sets the cookie
    _key: bytes = field(default=b"", repr=False)

    @property
    def csrf(self) -> str:
        return _sign(self._key, "csrf:" + self.sid)[:32]

    def renewed(self, signed_in: bool) -> Session:
        """A new session id (at sign-in and sign-out): an id planted earlier is worthless."""
        return new_session(self._key, signed_in)


SESSION = web.RequestKey("session", Session)


def is_page(path: str) -> bool:
    """The HTML pages (and their exports and files), as opposed to the JSON API."""
    return path == "/" or path == "/ui" or path.startswith("/ui/")


def session_key(token: str | None) -> bytes:
    if token is None:
        return secrets.token_bytes(32)
    return hashlib.sha256(b"experiment-etl pages\0" + token.encode()).digest()


def _sign(key: bytes, text: str) -> str:
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_session(key: bytes, signed_in: bool) -> Session:
    return Session(
        secrets.token_urlsafe(16), signed_in, int(time.time()) + MAX_AGE, fresh=True, _key=key
    )


def read_session(key: bytes, cookie: str | None) -> Session | None:
    """The session of a cookie, or None when it is missing, forged or expired."""
    if not cookie:
        return None
    body, _, signature = cookie.rpartition(".")
    if not hmac.compare_digest(signature.encode(), _sign(key, body).encode()):
        return None
    sid, expires, flag = [*body.split("."), "", ""][:3]
    if not expires.isdigit() or int(expires) < time.time():
        return None
    return Session(sid, flag == "1", int(expires), _key=key)


def set_cookie(request: web.Request, response: web.StreamResponse, session: Session) -> None:
    body = f"{session.sid}.{session.expires}.{int(session.signed_in)}"
    response.set_cookie(
        COOKIE,
        f"{body}.{_sign(session._key, body)}",
        max_age=MAX_AGE,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def is_https(request: web.Request) -> bool:
    """Served over https, directly or behind a proxy that says so."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def session_middleware(key: bytes, required: bool) -> Middleware:
    """Give every page request a session; send signed-out visitors to the sign-in page."""

    @web.middleware
    async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_page(request.path):
            return await handler(request)
        session = read_session(key, request.cookies.get(COOKIE)) or new_session(key, False)
        request[SESSION] = session
        if required and not session.signed_in and not request.path.startswith(OPEN_PAGES):
            target = quote(request.rel_url.path_qs, safe="")
            response: web.StreamResponse = see_other(f"{SIGN_IN}?next={target}")
        else:
            response = await handler(request)
        # A handler (sign-in, sign-out) may have replaced the session.
        current = request[SESSION]
        if current.fresh and not response.prepared:
            set_cookie(request, response, current)
        return response

    return sessions


async def check_csrf(request: web.Request, form: dict[str, str] | None = None) -> None:
    """Refuse a form post without this session's CSRF token (header, query or field).

    An upload carries it in the query of its form's action, so it is checked before a
    byte of the files is read.
    """
    given = (
        request.headers.get(CSRF_HEADER)
        or request.query.get(CSRF_FIELD)
        or (form or {}).get(CSRF_FIELD)
        or ""
    )
    expected = request[SESSION].csrf
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Problem(
            403,
            "the form's CSRF token is missing or does not match this session; "
            "reload the page and send the form again",
            title="Form refused",
        )


def see_other(location: str) -> web.Response:
    """303: after a form post (or to the sign-in page), the browser GETs ``location``."""
    return web.Response(status=303, headers={hdrs.LOCATION: location})


def redirect_target(raw: str | None) -> str:
    """Where to go after signing in: a path on this site only."""
    if raw and raw.startswith("/") and not raw.startswith(("//", "/\\")):
        return raw
    return "/"


SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the pages' headers, whatever answered (errors included)."""
    if is_page(request.path):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.path.startswith("/ui/static/"):
            response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")
