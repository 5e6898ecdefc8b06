"""Abuse of the HTTP API: huge, slow, compressed, malformed and hostile requests.

Every answer must be a 4xx that says why (never a 5xx, never a hang), leave no upload
files behind and record no run; the server must keep serving afterwards. The last test
lets schemathesis loose on the OpenAPI document. ``test_web_api.py`` covers the single
well-formed variants; these go wider and rougher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import io
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from badinput import run_rows
from test_web_support import SMALL_CHUNKS, Client, Serve, entries, problem, wait_for

from service.pipeline.csvfile import ENCODING_HINT
from service.settings import Settings
from service.web.app import create_app
from service.web.intake import UPLOAD_FILES

pytest_plugins = ["test_web_support"]

BOUNDARY = "abuse-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, data: bytes, headers: str = "") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}";'
            f' filename="{name}.csv"\r\n{headers}\r\n'
        ).encode()
        + data
        + b"\r\n"
    )


def multipart(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def sample_parts(data_dir: Path, skip: str = "") -> list[bytes]:
    return [
        part(name, (data_dir / file).read_bytes())
        for name, file in UPLOAD_FILES.items()
        if name != skip
    ]


async def no_runs(settings: Settings) -> None:
    assert await run_rows(settings) == []


@dataclasses.dataclass
class Raw:
    """A plain socket to the test server, for requests no well-behaved client sends."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def status(self, seconds: float = 5) -> int:
        line = await asyncio.wait_for(self.reader.readline(), seconds)
        assert line.startswith(b"HTTP/1."), line
        return int(line.split()[1])


@contextlib.asynccontextmanager
async def connect(client: Client) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        yield Raw(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the server may have closed first
            await writer.wait_closed()


# --- size ------------------------------------------------------------------------------------


async def test_streamed_upload_over_the_limit_is_413_quickly_and_leaves_nothing(
    serve: Serve, settings: Settings
) -> None:
    """64 MiB sent chunked against a 1 MiB limit: refused once the limit is passed."""
    client = await serve(max_upload_bytes=1 << 20)
    row = b"1,\tA,\ta@example.com,\t2023-01-01\n"

    async def body() -> AsyncIterator[bytes]:
        yield part("users", b"user_id,\tname,\temail,\tsignup_date\n")[:-2]
        chunk = row * ((1 << 20) // len(row))
        for _ in range(64):
            yield chunk
        yield b"\r\n" + multipart()

    started = time.monotonic()
    async with client.post("/runs", data=body(), headers={"Content-Type": MULTIPART}) as response:
        detail = (await problem(response, 413))["detail"]
    assert detail == f"uploads are limited to {1 << 20} bytes in total"
    assert time.monotonic() - started < 10
    assert entries(settings.tmp_dir) == []
    await no_runs(settings)


async def test_json_body_over_a_mebibyte_is_413(client: Client, settings: Settings) -> None:
    body = io.BytesIO(json.dumps({"dataset": "x" * (2 << 20)}).encode())
    async with client.post(
        "/runs", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert "1048576" in (await problem(response, 413))["detail"]
    await no_runs(settings)


# --- time ------------------------------------------------------------------------------------


async def test_json_body_that_stalls_gets_408_and_a_closed_connection(
    serve: Serve, settings: Settings
) -> None:
    client = await serve(upload_timeout=0.5)
    async with connect(client) as conn:
        started = time.monotonic()
        await conn.send(
            b"POST /runs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"dataset":'
        )
        assert await conn.status() == 408
        assert 0.5 <= time.monotonic() - started < 5
    await no_runs(settings)


async def test_upload_that_trickles_forever_gets_408_at_the_deadline(
    serve: Serve, settings: Settings
) -> None:
    """A byte every 20 ms never stalls, yet the whole body has a deadline, not each read."""
    client = await serve(upload_timeout=0.6)
    async with connect(client) as conn:
        await conn.send(
            f"POST /runs HTTP/1.1\r\nHost: t\r\nContent-Type: {MULTIPART}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n".encode()
        )

        async def trickle() -> None:
            head = part("users", b"")[:-2]
            await conn.send(b"%x\r\n%s\r\n" % (len(head), head))
            while True:
                await conn.send(b"1\r\nx\r\n")
                await asyncio.sleep(0.02)

        started = time.monotonic()
        sender = asyncio.create_task(trickle())
        try:
            assert await conn.status() == 408
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        assert 0.6 <= time.monotonic() - started < 5
    assert entries(settings.tmp_dir) == []
    await no_runs(settings)


# --- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip", "deflate", "br", "gzip, identity"])
@pytest.mark.parametrize("kind", ["json", "upload"])
async def test_compressed_bodies_are_refused_unread(
    client: Client, settings: Settings, encoding: str, kind: str
) -> None:
    if kind == "json":
        body, content_type = gzip.compress(b'{"dataset": ""}'), "application/json"
    else:
        body = gzip.compress(multipart(*sample_parts(settings.data_dir)))
        content_type = MULTIPART
    headers = {"Content-Type": content_type, "Content-Encoding": encoding}
    async with client.post("/runs", data=body, headers=headers) as response:
        assert "Content-Encoding" in (await problem(response, 415))["detail"]
    assert entries(settings.tmp_dir) == []
    await no_runs(settings)


async def test_compressed_upload_part_is_stored_as_sent_never_inflated(
    client: Client, settings: Settings
) -> None:
    """A part's own Content-Encoding is not honoured: a 64 MiB gzip bomb stays ~64 KiB."""
    bomb = gzip.compress(b"\0" * (64 << 20))
    body = multipart(
        part("users", bomb, "Content-Encoding: gzip\r\n"),
        *sample_parts(settings.data_dir, skip="users"),
    )
    async with client.post("/runs", data=body, headers={"Content-Type": MULTIPART}) as response:
        assert response.status == 202
        run = await response.json()
    assert run["source"]["files"]["users"]["bytes"] == len(bomb) < 1 << 20
    done = await wait_for(client, run["id"], {"succeeded", "failed"})
    assert done["status"] == "failed"
    assert done["errors"] == [
        {
            "file": "users.csv",
            "line": 1,
            "column": 1,
            "field": None,
            "message": "invalid UTF-8 (byte 0x8b at character 2)" + ENCODING_HINT,
        }
    ]


# --- malformed requests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b'{"dataset": "\xff"}', 400, "malformed JSON"),
        (b'{"dataset": ""', 400, "malformed JSON"),
        (b'{"dataset": ""} {}', 400, "malformed JSON"),
        (b'{"max_errors": 1' + b"0" * 5000 + b"}", 400, "malformed JSON"),
        (b'"dataset"', 400, "JSON object"),
        (b"null", 400, "JSON object"),
        (b'{"max_errors": NaN}', 422, "max_errors"),
        (b'{"max_errors": -Infinity}', 422, "max_errors"),
        (b'{"max_errors": 1.5}', 422, "max_errors"),
        (b'{"on_error": ["skip"]}', 422, "on_error"),
        (b'{"dataset": {"..": ".."}}', 422, "dataset"),
    ],
    ids=[
        "invalid_utf8",
        "truncated",
        "trailing_data",
        "huge_integer",
        "string",
        "null",
        "nan",
        "infinity",
        "fraction",
        "list_option",
        "object_dataset",
    ],
)
async def test_malformed_json_is_a_4xx_that_says_why(
    client: Client, settings: Settings, body: bytes, status: int, detail: str
) -> None:
    async with client.post(
        "/runs", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert detail in (await problem(response, status))["detail"]
    await no_runs(settings)


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/x-www-form-urlencoded", 415),
        ("application/octet-stream", 415),
        ("text/csv", 415),
        ("multipart/mixed; boundary=x", 415),
        ("application/json-patch+json", 415),
        ("multipart/form-data", 400),  # no boundary
    ],
)
async def test_wrong_content_types_are_refused(
    client: Client, settings: Settings, content_type: str, status: int
) -> None:
    body = multipart(*sample_parts(settings.data_dir))
    async with client.post("/runs", data=body, headers={"Content-Type": content_type}) as response:
        await problem(response, status)
    assert entries(settings.tmp_dir) == []
    await no_runs(settings)


TRAVERSALS = [
    "..",
    "../",
    "../secret",
    "../..",
    "./../data",
    "a/../../b",
    "....//....//",
    "/etc",
    "/",
    "..\\..",
    "%2e%2e/%2e%2e",
    "..%2f..",
    "\u2024\u2024/\u2024\u2024",
    "\uff0e\uff0e/\uff0e\uff0e",
    "a\x00b",
    "~",
    "~root",
    ".",
    " ",
]


@pytest.mark.parametrize("via", ["json", "query"])
async def test_dataset_names_never_leave_the_data_directory(
    client: Client, settings: Settings, via: str
) -> None:
    (settings.data_dir.parent / "secret").mkdir()  # exists, so only the check refuses it
    accepted = 0
    for name in TRAVERSALS:
        kwargs: dict[str, Any] = {"json": {"dataset": name}} if via == "json" else {}
        if via == "query":
            kwargs["params"] = {"dataset": name}
        async with client.post("/runs", **kwargs) as response:
            body = await response.json(content_type=None)
            if name in (".", " ") and response.status == 202:
                # The data directory itself (stripped or not): legal, and it runs.
                await wait_for(client, body["id"], {"succeeded", "failed"})
                accepted += 1
                continue
            assert response.status in (400, 404), (name, body)
    assert len(await run_rows(settings)) == accepted


async def test_oversized_headers_and_request_lines_are_refused_and_serving_goes_on(
    client: Client,
) -> None:
    requests = {
        "long_header": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: "
        + b"a" * 100_000
        + b"\r\n\r\n",
        "many_headers": b"GET /healthz HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(20_000))
        + b"\r\n",
        "long_url": b"GET /healthz?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        "long_method": b"A" * 100_000 + b" /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    }
    for name, request in requests.items():
        async with connect(client) as conn:
            await conn.send(request)
            assert await conn.status() in (400, 414, 431), name
    async with client.get("/healthz") as response:
        assert response.status == 200


# --- concurrency -----------------------------------------------------------------------------


async def test_a_hundred_concurrent_posts_start_exactly_one_run(
    serve: Serve, settings: Settings, big: str
) -> None:
    client = await serve(chunk_bytes=SMALL_CHUNKS)

    async def post(i: int) -> tuple[int, dict[str, Any]]:
        shapes: list[dict[str, Any]] = [
            {"json": {"dataset": big}},
            {"params": {"dataset": big, "on_error": "skip"}},
            {"json": {"dataset": big}, "headers": {"Idempotency-Key": f"k-{i}"}},
        ]
        async with client.post("/runs", **shapes[i % 3]) as response:
            return response.status, await response.json(content_type=None)

    answers = await asyncio.gather(*(post(i) for i in range(100)))
    accepted = [body for status, body in answers if status == 202]
    assert len(accepted) == 1, [status for status, _ in answers]
    run_id = accepted[0]["id"]
    conflicts = [body for status, body in answers if status == 409]
    assert len(conflicts) == 99
    assert {body["active_run_id"] for body in conflicts} == {run_id}

    async def upload() -> int:
        body = multipart(*sample_parts(settings.data_dir))
        async with client.post("/runs", data=body, headers={"Content-Type": MULTIPART}) as r:
            return r.status

    assert await asyncio.gather(*(upload() for _ in range(20))) == [409] * 20
    assert [r["id"] for r in await run_rows(settings)] == [run_id]
    assert not list(settings.tmp_dir.glob("etl-upload-*"))
    async with client.post(f"/runs/{run_id}/cancel") as response:
        assert (await response.json())["status"] == "cancelled"


# --- known service/web bugs, pinned ------------------------------------------------------------


@pytest.fixture
async def bare(settings: Settings) -> AsyncIterator[Client]:
    """A client of the app without the contract check (the known bugs break it)."""
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


async def test_deeply_nested_json_is_a_400(bare: Client) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    async with bare.post("/runs", data=body, headers={"Content-Type": "application/json"}) as r:
        await problem(r, 400)


async def test_multipart_part_with_a_control_character_in_its_header_is_a_400(
    bare: Client,
) -> None:
    body = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a\x11"\r\n\r\nx\r\n'.encode()
    async with bare.post(
        "/runs", data=multipart(body), headers={"Content-Type": MULTIPART}
    ) as response:
        await problem(response, 400)


async def test_overlong_dataset_name_is_a_4xx(bare: Client) -> None:
    async with bare.post("/runs", json={"dataset": "a" * 300}) as response:
        assert response.status in (400, 404)


async def test_problem_instance_is_a_uri_reference(bare: Client) -> None:
    async with bare.get("/runs/%01%C3%A9") as response:
        instance = (await problem(response, 400))["instance"]
    assert instance.isascii() and instance.isprintable(), instance


# --- schemathesis ----------------------------------------------------------------------------

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


async def test_schemathesis_finds_no_server_error_or_schema_violation(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At most 50 examples per operation, a fixed seed, one worker: about ten seconds."""
    token = "schemathesis-token"
    server = TestServer(create_app(dataclasses.replace(settings, api_token=token)))
    await server.start_server()
    report = tmp_path / "events.ndjson"
    try:
        with caplog.at_level(logging.ERROR, logger="service.web.errors"):
            st = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
                "run",
                f"http://{server.host}:{server.port}/openapi.json",
                f"--checks={CHECKS}",
                "--max-examples=50",
                "--seed=20261125",
                "--workers=1",
                "--request-timeout=10",
                f"--header=Authorization: Bearer {token}",
                "--report=ndjson",
                f"--report-ndjson-path={report}",
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},
            )
            output, _ = await asyncio.wait_for(st.communicate(), timeout=90)
    finally:
        await server.close()
    text = output.decode(errors="replace")
    assert st.returncode in (0, 1), text  # 1: failures, judged below; others: it broke

    failed, checked = [], 0
    for line in report.read_text().splitlines():
        finished = json.loads(line).get("ScenarioFinished")
        for checks in (finished or {}).get("recorder", {}).get("checks", {}).values():
            checked += len(checks)
            failed += [c for c in checks if c["status"] == "failure"]
    assert checked > 500, text  # it did reach the API, past the token
    assert not failed, json.dumps(failed, indent=1)[:5000]
    errors = [r for r in caplog.records if r.name == "service.web.errors" and r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
