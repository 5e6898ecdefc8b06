"""Completion webhooks, received by a real local aiohttp server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from test_inputs import dataset, run, sample
from test_web_support import Client, Serve, problem, wait_for

from service.settings import Settings
from service.web.keys import RUNNER
from service.webhooks import _Deliveries

pytest_plugins = ["test_web_support"]

SECRET = "s3cret"


@dataclass
class Receiver:
    server: TestServer
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    failures: int = 0  # answer this many requests with 503 first

    def url(self, path: str = "/hook") -> str:
        return str(self.server.make_url(path))

    def bodies(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [json.loads(body) for p, _, body in self.received if p == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    server = TestServer(app, host="127.0.0.1")
    hooks = Receiver(server)

    async def hook(request: web.Request) -> web.Response:
        hooks.received.append((request.path, dict(request.headers), await request.read()))
        if hooks.failures:
            hooks.failures -= 1
            return web.Response(status=503)
        return web.Response(status=204)

    app.router.add_post("/{name}", hook)
    await server.start_server()
    yield hooks
    await server.close()


async def delivered(client: Client, run_id: object) -> list[dict[str, Any]]:
    """The run's deliveries once none is pending any more."""
    async with asyncio.timeout(20):
        while True:
            async with client.get(f"/runs/{run_id}") as response:
                hooks = (await response.json())["webhooks"]
            if hooks and all(h["status"] != "pending" for h in hooks):
                return list(hooks)
            await asyncio.sleep(0.05)


def verify(headers: dict[str, str], body: bytes) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-ETL-Signature"], expected)
    assert headers["Content-Type"] == "application/json"


async def test_every_run_end_is_delivered_once_and_signed(
    serve: Serve, settings: Settings, receiver: Receiver, big: str
) -> None:
    client = await serve(
        webhook_url=receiver.url(), webhook_secret=SECRET, webhook_allow=("127.0.0.1",)
    )
    ok = await run(client, on_error="skip")
    assert ok["status"] == "succeeded"
    [hook] = await delivered(client, ok["id"])
    assert hook["status"] == "delivered"
    assert (hook["url"], hook["attempts"], hook["http_status"]) == (receiver.url(), 1, 204)
    [(_, headers, body)] = receiver.received
    verify(headers, body)
    sent = json.loads(body)
    assert sent == {
        "event": "run.finished",
        "run_id": ok["id"],
        "status": "succeeded",
        "dry_run": False,
        "stats": ok["stats"],
        "error_total": 0,
        "message": None,
        "finished_at": ok["finished_at"],
        "links": {"run": f"/runs/{ok['id']}", "rejects": f"/runs/{ok['id']}/rejects.csv"},
    }

    files = sample(settings)
    bad = dataset(settings, "bad", {**files, "users.csv": files["users.csv"] + b"\nx,\tX,\t,\t"})
    failed = await run(client, dataset=bad, callback_url=receiver.url("/mine"))
    assert failed["status"] == "failed"
    hooks = await delivered(client, failed["id"])
    assert [h["status"] for h in hooks] == ["delivered", "delivered"]
    for path in ("/hook", "/mine"):
        last = receiver.bodies(path)[-1]
        assert (last["run_id"], last["status"], last["error_total"]) == (failed["id"], "failed", 1)
        assert last["links"]["rejects"] is None

    async with client.post("/runs", json={"dataset": big}) as response:
        started = await response.json()
    await wait_for(client, started["id"], {"running"})
    async with client.post(f"/runs/{started['id']}/cancel") as response:
        assert response.status == 200
    [hook] = await delivered(client, started["id"])
    assert hook["status"] == "delivered"
    assert receiver.bodies()[-1]["status"] == "cancelled"

    # One delivery per run and target, each signed.
    assert [b["run_id"] for b in receiver.bodies()] == [ok["id"], failed["id"], started["id"]]
    for _, headers, body in receiver.received:
        verify(headers, body)

    for url in ("http://10.0.0.1/hook", "http://localhost.evil.example/x", "file:///etc/passwd"):
        async with client.post("/runs", json={"callback_url": url}) as response:
            await problem(response, 422)


async def test_a_receiver_that_is_down_leaves_the_run_succeeded_and_the_delivery_failed(
    serve: Serve, receiver: Receiver
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fast = {"webhook_attempts": 3, "webhook_backoff": 0.05, "webhook_timeout": 2.0}
    client = await serve(webhook_url=f"http://127.0.0.1:{port}/hook?token=x", **fast)
    done = await run(client)
    assert done["status"] == "succeeded"
    [hook] = await delivered(client, done["id"])
    assert hook["status"] == "failed"
    assert hook["attempts"] == 3
    assert hook["url"] == f"http://127.0.0.1:{port}/hook"  # no query shown
    assert "Connect" in hook["error"]
    async with client.get(f"/runs/{done['id']}") as response:
        assert (await response.json())["status"] == "succeeded"

    # A receiver that answers 503 once gets the delivery on the retry, without a signature
    # when no secret is configured.
    receiver.failures = 1
    client = await serve(webhook_url=receiver.url(), **fast)
    done = await run(client)
    [hook] = await delivered(client, done["id"])
    assert (hook["status"], hook["attempts"]) == ("delivered", 2)
    assert len(receiver.received) == 2
    assert all("X-ETL-Signature" not in headers for _, headers, _ in receiver.received)


async def test_the_statuses_a_run_shows_are_the_last_ones_written(
    serve: Serve, receiver: Receiver
) -> None:
    """Two deliveries of one run write their statuses over two pool connections at once;
    whatever order those commit in, the run must end showing the latest statuses, not an
    earlier write's "pending" (a delivery CI once waited 20 s for)."""
    client = await serve(webhook_url=receiver.url())
    done = await run(client)
    await delivered(client, done["id"])
    webhooks = client.server.app[RUNNER].webhooks
    statuses = [
        {"url": url, "status": "pending", "attempts": 0} for url in ("http://a", "http://b")
    ]
    deliveries = _Deliveries(done["id"], statuses)

    async def attempt(number: int) -> None:
        deliveries.statuses[number % 2]["attempts"] = number
        await webhooks._record(deliveries)

    await asyncio.gather(*(attempt(number) for number in range(1, 101)))
    async with client.get(f"/runs/{done['id']}") as response:
        shown = (await response.json())["webhooks"]
    assert [status["attempts"] for status in shown] == [100, 99]
