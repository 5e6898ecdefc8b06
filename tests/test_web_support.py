"""Fixtures and helpers of the web tests (loaded with ``pytest_plugins``; holds no tests).

Every app a test starts checks its own answers against the OpenAPI document: each
status must be documented for its route, and each JSON body must match the schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator

from service.generate import generate
from service.settings import Settings
from service.web.app import create_app
from service.web.openapi import DOCUMENT
from service.web.pages import is_page

Client = TestClient[web.Request, web.Application]
Serve = Callable[..., Awaitable[Client]]

ROOT = Path(__file__).resolve().parent.parent
BIG = {"users": 20_000, "experiments": 400_000, "compounds": 500}
RUN_TIMEOUT = 30.0
SMALL_CHUNKS = 64 * 1024  # small batches: a big run is slow, and stops soon when cancelled


@pytest.fixture(scope="session")
def big_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough input for a run to take seconds: long enough to cancel or stop it."""
    directory = tmp_path_factory.mktemp("big")
    generate(directory, **BIG)
    return directory


@pytest.fixture
def big(big_dataset: Path, settings: Settings) -> str:
    """The name of the big dataset inside the data directory (hard links, no copy)."""
    target = settings.data_dir / "big"
    target.mkdir()
    for path in big_dataset.iterdir():
        os.link(path, target / path.name)
    return target.name


@pytest.fixture
async def serve(settings: Settings) -> AsyncIterator[Serve]:
    """Start the app (on ``settings`` with changes) in a real server; a client for it."""
    violations: list[str] = []
    async with contextlib.AsyncExitStack() as stack:

        async def start(**changes: Any) -> Client:
            app = create_app(dataclasses.replace(settings, **changes))
            app.on_response_prepare.append(contract_check(violations))
            return await stack.enter_async_context(TestClient(TestServer(app)))

        yield start
    assert not violations, "\n".join(violations)


@pytest.fixture
async def client(serve: Serve) -> Client:
    return await serve()


def contract_check(
    violations: list[str],
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def check(request: web.Request, response: web.StreamResponse) -> None:
        if is_page(request.path):  # the HTML pages are not part of the JSON API's document
            return
        resource = request.match_info.route.resource
        body = response.body if isinstance(response, web.Response) else None
        if resource is None:  # no route matched: 404 or 405, always a problem
            schema = {"$ref": "#/components/schemas/Problem"}
            where = f"{request.method} {request.path} -> {response.status}"
        else:
            where = f"{request.method} {resource.canonical} -> {response.status}"
            operation = DOCUMENT["paths"].get(resource.canonical, {}).get(request.method.lower())
            documented = (operation or {}).get("responses", {}).get(str(response.status))
            if documented is None:
                violations.append(f"undocumented: {where}")
                return
            content = documented.get("content", {})
            if response.content_type not in content:
                violations.append(f"undocumented content type {response.content_type}: {where}")
                return
            schema = content[response.content_type]["schema"]
        if response.content_type.endswith("json") and isinstance(body, bytes):
            validator = Draft202012Validator({**schema, "components": DOCUMENT["components"]})
            for error in validator.iter_errors(json.loads(body)):
                violations.append(f"{where}: {error.message} at {list(error.absolute_path)}")

    return check


async def problem(response: Any, status: int) -> dict[str, Any]:
    """The problem+json body of an error answer, checked for its RFC 9457 members."""
    body = await response.json(content_type=None)
    assert response.status == status, body
    assert response.content_type == "application/problem+json"
    assert body["status"] == status
    assert {"type", "title", "detail", "instance"} <= set(body)
    return dict(body)


async def wait_for(client: Client, run_id: int, statuses: set[str]) -> dict[str, Any]:
    """Poll a run until its status is one of ``statuses``."""
    run: dict[str, Any] = {}
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            while True:
                async with client.get(f"/runs/{run_id}") as response:
                    run = await response.json()
                if run["status"] in statuses:
                    return run
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"run {run_id} still {run.get('status')}") from None


async def run_to_the_end(client: Client, dataset: str = "") -> dict[str, Any]:
    """Run a dataset through the API until it succeeded and its runner is idle again.

    The status turns succeeded inside the swap transaction; the runner still drops the
    replaced tables and releases its connections after that, which a test ending at once
    would cut short.
    """
    async with client.post("/runs", json={"dataset": dataset}) as response:
        assert response.status == 202, await response.text()
        run = await response.json()
    done = await wait_for(client, run["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    async with asyncio.timeout(RUN_TIMEOUT):
        while True:
            async with client.get("/metrics") as response:
                if "etl_run_in_progress 0.0" in await response.text():
                    return done
            await asyncio.sleep(0.02)


def copy_dataset(source: Path, target: Path, old: bytes = b"", new: bytes = b"") -> Path:
    """A copy of a dataset's files, with ``old`` replaced by ``new`` in them."""
    target.mkdir(parents=True)
    for path in source.glob("*.csv"):
        (target / path.name).write_bytes(
            path.read_bytes().replace(old, new) if old else path.read_bytes()
        )
    return target


def entries(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -c SCRIPT`` from the repository root, in a thread; its output captured."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m ARGS`` from the repository root, its output in ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def status_of(client: object, path: str) -> int:
    async with client.get(path) as response:  # type: ignore[attr-defined]
        await response.read()
        return int(response.status)


async def until_healthy(client: aiohttp.ClientSession, process: subprocess.Popen[bytes]) -> None:
    """Wait (30 s at most) until the server ``process`` answers ``/healthz`` with 200."""
    async with asyncio.timeout(30):
        while process.poll() is None:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                if await status_of(client, "/healthz") == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"the server exited with {process.returncode} before it was healthy")


def sample_upload(sample_dir: Path, **fields: str) -> FormData:
    form = FormData()
    for part, name in (
        ("users", "users.csv"),
        ("experiments", "user_experiments.csv"),
        ("compounds", "compounds.csv"),
    ):
        form.add_field(part, (sample_dir / name).read_bytes(), filename=name)
    for key, value in fields.items():
        form.add_field(key, value)
    return form
