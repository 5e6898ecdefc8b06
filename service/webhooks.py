"""Completion webhooks: a signed POST to each configured URL when a run ends.

Deliveries run as background tasks after the run is recorded, so they never delay or
fail it; the runner keeps them referenced and cancels them on shutdown. Each delivery
is retried with exponential backoff on network errors, timeouts, 408, 429 and 5xx;
its status is written to the run's ``webhooks`` column after every attempt. The body
is signed with HMAC-SHA256 (``X-ETL-Signature: sha256=<hex>``) when a secret is set.
A run's own ``callback_url`` may only name hosts listed in ``ETL_WEBHOOK_ALLOW``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from yarl import URL

from .db import sql
from .db.database import DATABASE_ERRORS, Pool
from .settings import Settings

if TYPE_CHECKING:  # imported when a webhook is sent: `run` alone does not load aiohttp
    import aiohttp

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-ETL-Signature"
EVENT = "run.finished"
RETRIED_STATUSES = frozenset({408, 429})


def check_callback(url: str, allow: tuple[str, ...]) -> str:
    """A per-run callback URL, if its host is allowed; ValueError otherwise."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise ValueError(f"callback_url is not a URL: {url!r}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"callback_url must be an http(s) URL with a host, got {url!r}")
    if not allow:
        raise ValueError("callback_url is disabled: no hosts are listed in ETL_WEBHOOK_ALLOW")
    host = parsed.host.lower()
    if host not in allow and f"{host}:{parsed.port}" not in allow:
        raise ValueError(f"callback_url host {host!r} is not listed in ETL_WEBHOOK_ALLOW")
    return url


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": EVENT,
        "run_id": run["id"],
        "status": run["status"],
        "dry_run": bool(run["options"].get("dry_run", False)),
        "stats": run["stats"],
        "error_total": run["error_total"],
        "message": run["message"],
        "finished_at": run["finished_at"],
        "links": {
            "run": f"/runs/{run['id']}",
            "rejects": (run.get("rejects") or {}).get("href"),
        },
    }


def _shown(url: str) -> str:
    """The URL as the run's JSON shows it: without credentials or query."""
    parsed = URL(url)
    return str(parsed.with_user(None).with_query(None).with_fragment(None))


class Webhooks:
    """Delivers run-finished events in the background."""

    def __init__(
        self, pool: Pool, settings: Settings, fetch: Callable[[int], Awaitable[dict[str, Any]]]
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.fetch = fetch
        self.tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def patience(self) -> float:
        """How long all attempts of a delivery may take: what a CLI run waits at exit."""
        s = self.settings
        backoff = sum(s.webhook_backoff * 2**i for i in range(max(0, s.webhook_attempts - 1)))
        return float(s.webhook_attempts * s.webhook_timeout + backoff)

    def run_ended(self, run_id: int, callback_url: str | None) -> None:
        targets = list(dict.fromkeys(u for u in (self.settings.webhook_url, callback_url) if u))
        if not targets:
            return
        task = asyncio.create_task(self._deliver_all(run_id, targets), name=f"webhook-{run_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver_all(self, run_id: int, targets: list[str]) -> None:
        run = _Deliveries(
            run_id, [{"url": _shown(u), "status": "pending", "attempts": 0} for u in targets]
        )
        try:
            body = json.dumps(payload(await self.fetch(run_id))).encode()
            await self._record(run)
            await asyncio.gather(
                *(
                    self._deliver(run, url, body, status)
                    for url, status in zip(targets, run.statuses, strict=True)
                )
            )
        except asyncio.CancelledError:
            for status in run.statuses:
                if status["status"] == "pending":
                    status["status"] = "cancelled"
            await asyncio.shield(self._record(run))
            raise
        except DATABASE_ERRORS as exc:
            log.warning(
                "webhook not sent: the run could not be read",
                extra={"run_id": run_id, "event": "webhook", "detail": repr(exc)},
            )

    async def _deliver(
        self, run: _Deliveries, url: str, body: bytes, status: dict[str, Any]
    ) -> None:
        import aiohttp

        s = self.settings
        headers = {"Content-Type": "application/json", "X-ETL-Event": EVENT}
        if s.webhook_secret:
            headers[SIGNATURE_HEADER] = signature(s.webhook_secret, body)
        for attempt in range(1, s.webhook_attempts + 1):
            status["attempts"] = attempt
            retry = True
            try:
                async with self.session().post(
                    url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,  # a redirect could point anywhere
                    timeout=aiohttp.ClientTimeout(total=s.webhook_timeout),
                ) as response:
                    status["http_status"] = response.status
                    if 200 <= response.status < 300:
                        status["status"] = "delivered"
                        status["delivered_at"] = _now()
                        status.pop("error", None)
                        await self._record(run)
                        return
                    status["error"] = f"HTTP {response.status}"
                    retry = response.status >= 500 or response.status in RETRIED_STATUSES
            except (aiohttp.ClientError, TimeoutError) as exc:
                status["error"] = f"{type(exc).__name__}: {exc}"
            if not retry or attempt == s.webhook_attempts:
                break
            await self._record(run)
            await asyncio.sleep(s.webhook_backoff * 2 ** (attempt - 1))
        status["status"] = "failed"
        await self._record(run)
        log.warning(
            "webhook delivery failed",
            extra={
                "run_id": run.run_id,
                "event": "webhook",
                "detail": f"{status['url']}: {status['error']} after {attempt} attempt(s)",
            },
        )

    def session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _record(self, run: _Deliveries) -> None:
        # One write at a time, each of the statuses as they are when it starts: two
        # deliveries' writes on two connections could otherwise commit out of order
        # and leave an earlier state (one still "pending") as the last one.
        async with run.lock:
            try:
                await self.pool.execute(sql.SET_WEBHOOKS, run.run_id, json.dumps(run.statuses))
            except DATABASE_ERRORS as exc:
                log.warning(
                    "webhook status not recorded",
                    extra={"run_id": run.run_id, "event": "webhook", "detail": repr(exc)},
                )

    async def close(self, grace: float = 0.0) -> None:
        """Give deliveries ``grace`` seconds to finish, cancel the rest, close the session."""
        if self.tasks and grace > 0:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()


@dataclass
class _Deliveries:
    """One run's deliveries: their statuses, written back one write at a time."""

    run_id: int
    statuses: list[dict[str, Any]]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()
