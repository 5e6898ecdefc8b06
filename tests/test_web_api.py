"""The HTTP API on a real server and a real PostgreSQL: runs, features, errors, auth."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import asyncpg
from aiohttp import FormData
from test_web_support import (
    SMALL_CHUNKS,
    Client,
    Serve,
    copy_dataset,
    entries,
    problem,
    sample_upload,
    wait_for,
)

from service.etl import RunOptions
from service.settings import Settings

pytest_plugins = ["test_web_support"]


async def count_runs(settings: Settings) -> int:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )
    try:
        return int(await conn.fetchval("SELECT count(*) FROM etl_runs"))
    finally:
        await conn.close()


async def test_run_is_accepted_polled_to_success_and_features_served(client: Client) -> None:
    async with client.post("/runs") as response:
        assert response.status == 202
        run = await response.json()
        assert response.headers["Location"] == f"/runs/{run['id']}"
    assert run["status"] in ("queued", "running")
    assert run["source"] == {"kind": "dataset", "name": "."}

    done = await wait_for(client, run["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["stats"]["users"] == 10

    async with client.get("/users/1/features") as response:
        assert response.status == 200
        features = await response.json()
    assert features["name"] == "Alice"
    assert features["experiment_count"] == 2
    assert features["average_run_time"] == 12.5
    top = features["top_compound"]
    assert (top["id"], top["name"], top["experiments"]) == (2, "Compound B", 2)
    assert top["structure"] == "C21H30O2"

    async with client.get("/runs", params={"status": "succeeded", "limit": "5"}) as response:
        assert [r["id"] for r in (await response.json())["runs"]] == [run["id"]]
    async with client.get("/runs", params={"status": "failed"}) as response:
        assert (await response.json())["runs"] == []

    # The run is recorded succeeded inside its swap; the process then drops the replaced
    # tables and its scratch files, and only then stops counting the run as in progress.
    async with asyncio.timeout(10):
        while True:
            async with client.get("/metrics") as response:
                assert response.status == 200
                text = await response.text()
            if "etl_run_in_progress 0.0" in text:
                break
            await asyncio.sleep(0.05)
    assert 'etl_runs_total{status="succeeded"} 1.0' in text
    assert 'etl_rows_processed_total{file="experiments"} 11.0' in text
    assert "etl_run_in_progress 0.0" in text
    assert "etl_last_success_timestamp_seconds " in text
    assert "etl_run_duration_seconds_count 1.0" in text


async def test_runs_are_listed_newest_first(client: Client) -> None:
    ids = []
    for _ in range(3):
        async with client.post("/runs") as response:
            ids.append((await response.json())["id"])
        await wait_for(client, ids[-1], {"succeeded"})
    async with client.get("/runs", params={"limit": "2"}) as response:
        assert [r["id"] for r in (await response.json())["runs"]] == ids[:0:-1]


async def test_list_runs_validates_status_and_limit(client: Client) -> None:
    for params in ({"status": "done"}, {"limit": "0"}, {"limit": "1001"}, {"limit": "x"}):
        async with client.get("/runs", params=params) as response:
            await problem(response, 400)


async def test_unknown_things_are_404_and_bad_ids_400(client: Client) -> None:
    for path in ("/runs/999", "/users/424242/features", "/nowhere"):
        async with client.get(path) as response:
            body = await problem(response, 404)
            assert body["instance"] == path
    async with client.post("/runs/999/cancel") as response:
        await problem(response, 404)
    for path in ("/runs/abc", "/users/x1/features", f"/users/{2**64}/features"):
        async with client.get(path) as response:
            await problem(response, 400)


async def test_wrong_method_is_a_405_problem_with_allow(client: Client) -> None:
    async with client.delete("/runs") as response:
        body = await problem(response, 405)
        assert set(response.headers["Allow"].split(",")) == {"GET", "POST"}
    assert "DELETE" in body["detail"]


async def test_healthz_and_openapi(client: Client) -> None:
    async with client.get("/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})
    async with client.get("/readyz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ready"})
    async with client.get("/openapi.json") as response:
        assert (await response.json())["openapi"] == "3.1.0"


async def test_bad_bodies_are_rejected(client: Client) -> None:
    cases = [
        ({"data": b"{nope", "headers": {"Content-Type": "application/json"}}, 400),
        ({"json": [1, 2]}, 400),
        ({"json": {"datasets": "x"}}, 422),
        ({"json": {"on_error": "ignore"}}, 422),
        ({"json": {"max_errors": -1}}, 422),
        ({"json": {"dataset": 3}}, 422),
        ({"params": {"max_errors": "many"}}, 422),
        ({"data": b"dataset=x", "headers": {"Content-Type": "text/plain"}}, 415),
        (
            {
                "data": gzip.compress(b"{}"),
                "headers": {"Content-Type": "application/json", "Content-Encoding": "gzip"},
            },
            415,
        ),
        ({"headers": {"Idempotency-Key": "x" * 256}}, 400),
    ]
    for kwargs, status in cases:
        async with client.post("/runs", **kwargs) as response:  # type: ignore[arg-type]
            await problem(response, status)
    async with client.get("/runs") as response:
        assert (await response.json())["runs"] == []


async def test_options_come_from_json_or_query(client: Client) -> None:
    async with client.post("/runs", json={"on_error": "skip", "max_errors": 5}) as response:
        run = await response.json()
    assert run["options"] == RunOptions(on_error="skip", max_errors=5).to_json()
    await wait_for(client, run["id"], {"succeeded"})
    async with client.post("/runs", params={"on_error": "skip", "max_errors": "7"}) as response:
        run = await response.json()
    assert run["options"] == RunOptions(on_error="skip", max_errors=7).to_json()
    await wait_for(client, run["id"], {"succeeded"})


async def test_datasets_stay_inside_the_data_directory(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (settings.data_dir / "escape").symlink_to(outside)
    inner = settings.data_dir / "linked"
    inner.mkdir()
    (inner / "users.csv").symlink_to(settings.data_dir / "users.csv")
    (inner / "compounds.csv").symlink_to(outside / "compounds.csv")
    for dataset in ("../", "..", "sub/../..", "/etc", str(settings.data_dir), "escape", "linked"):
        async with client.post("/runs", json={"dataset": dataset}) as response:
            await problem(response, 400)
    async with client.post("/runs", json={"dataset": "missing"}) as response:
        assert "missing" in (await problem(response, 404))["detail"]
    assert not (await (await client.get("/runs")).json())["runs"]


async def test_a_sub_directory_dataset_runs(client: Client, settings: Settings) -> None:
    copy_dataset(settings.data_dir, settings.data_dir / "2024" / "march", b"Alice", b"Alicia")
    async with client.post("/runs", json={"dataset": "2024/march"}) as response:
        run = await response.json()
    assert run["source"] == {"kind": "dataset", "name": "2024/march"}
    assert (await wait_for(client, run["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    async with client.get("/users/1/features") as response:
        assert (await response.json())["name"] == "Alicia"


async def test_idempotency_key_returns_the_same_run(client: Client, settings: Settings) -> None:
    headers = {"Idempotency-Key": "nightly-2024-03-01"}
    async with client.post("/runs", json={"on_error": "skip"}, headers=headers) as response:
        assert response.status == 202
        first = await response.json()
    await wait_for(client, first["id"], {"succeeded"})
    async with client.post("/runs", json={"on_error": "skip"}, headers=headers) as response:
        assert response.status == 202
        again = await response.json()
    assert again["id"] == first["id"]
    assert again["status"] == "succeeded"
    async with client.post("/runs", json={"on_error": "abort"}, headers=headers) as response:
        await problem(response, 422)
    assert await count_runs(settings) == 1


async def test_upload_runs_the_uploaded_files(
    client: Client, settings: Settings, sample_dir: Path, tmp_path: Path
) -> None:
    uploaded = copy_dataset(sample_dir, tmp_path / "uploaded", b"Alice", b"Ada")
    key = {"Idempotency-Key": "upload-1"}
    async with client.post(
        "/runs", data=sample_upload(uploaded, on_error="skip"), headers=key
    ) as response:
        assert response.status == 202
        run = await response.json()
    assert run["source"]["kind"] == "upload"
    assert run["source"]["files"]["users"]["bytes"] == (uploaded / "users.csv").stat().st_size
    assert run["options"]["on_error"] == "skip"
    assert (await wait_for(client, run["id"], {"succeeded", "failed"}))["status"] == "succeeded"
    async with client.get("/users/1/features") as response:
        assert (await response.json())["name"] == "Ada"

    # The same bytes under the same key: the same run; other bytes: a mismatch.
    async with client.post(
        "/runs", data=sample_upload(uploaded, on_error="skip"), headers=key
    ) as response:
        assert (await response.json())["id"] == run["id"]
    async with client.post("/runs", data=sample_upload(sample_dir), headers=key) as response:
        await problem(response, 422)
    await until_empty(settings.tmp_dir)


async def test_upload_over_the_limit_is_413_and_leaves_nothing(
    serve: Serve, settings: Settings, sample_dir: Path
) -> None:
    client = await serve(max_upload_bytes=500)
    async with client.post("/runs", data=sample_upload(sample_dir)) as response:
        assert "500 bytes" in (await problem(response, 413))["detail"]
    assert entries(settings.tmp_dir) == []
    assert await count_runs(settings) == 0


async def test_upload_parts_are_checked(
    client: Client, settings: Settings, sample_dir: Path
) -> None:
    incomplete = FormData()
    incomplete.add_field("users", b"user_id,name", filename="users.csv")
    unexpected = sample_upload(sample_dir, extra="1")
    bad_option = sample_upload(sample_dir, max_errors="-3")
    for form, status in ((incomplete, 400), (unexpected, 400), (bad_option, 422)):
        async with client.post("/runs", data=form) as response:
            await problem(response, status)
    async with client.post(
        "/runs", data=b"--x--", headers={"Content-Type": "multipart/form-data"}
    ) as response:
        await problem(response, 400)
    assert entries(settings.tmp_dir) == []


async def test_slow_upload_times_out_with_408(serve: Serve, settings: Settings) -> None:
    client = await serve(upload_timeout=0.3)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /runs HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="users"; filename="users.csv"\r\n\r\n'
            b"user_id,name\n1,A"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert status_line.split()[1] == b"408", status_line
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"application/problem+json" in head
    finally:
        writer.close()
        await writer.wait_closed()
    assert entries(settings.tmp_dir) == []


async def test_token_guards_everything_but_probes(serve: Serve) -> None:
    client = await serve(api_token="s3cret")
    for method, path in (("GET", "/runs"), ("POST", "/runs"), ("GET", "/openapi.json")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with client.request(method, path, headers=headers) as response:
                await problem(response, 401)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for path in ("/healthz", "/readyz", "/metrics"):
        async with client.get(path) as response:
            assert response.status == 200
    async with client.get("/runs", headers={"Authorization": "Bearer s3cret"}) as response:
        assert response.status == 200


async def test_concurrent_posts_start_exactly_one_run(
    serve: Serve, settings: Settings, big: str
) -> None:
    client = await serve(chunk_bytes=SMALL_CHUNKS)

    async def post() -> tuple[int, dict[str, object]]:
        async with client.post("/runs", json={"dataset": big}) as response:
            return response.status, json.loads(await response.text())

    answers = await asyncio.gather(*(post() for _ in range(20)))
    accepted = [body for status, body in answers if status == 202]
    assert len(accepted) == 1, answers
    conflicts = [body for status, body in answers if status == 409]
    assert len(conflicts) == 19
    assert {body["active_run_id"] for body in conflicts} == {accepted[0]["id"]}
    assert await count_runs(settings) == 1
    async with client.post("/runs", data=sample_upload(settings.data_dir)) as response:
        assert (await problem(response, 409))["active_run_id"] == accepted[0]["id"]
    assert not list_uploads(settings.tmp_dir)
    async with client.post(f"/runs/{accepted[0]['id']}/cancel") as response:
        assert (await response.json())["status"] == "cancelled"


async def test_cancel_stops_the_run_and_keeps_previous_results(serve: Serve, big: str) -> None:
    client = await serve(chunk_bytes=SMALL_CHUNKS)
    async with client.post("/runs") as response:
        first = await response.json()
    await wait_for(client, first["id"], {"succeeded"})

    async with client.post("/runs", json={"dataset": big}) as response:
        run = await response.json()
    running = await wait_for(client, run["id"], {"running", "succeeded", "failed"})
    assert running["status"] == "running", running
    async with client.post(f"/runs/{run['id']}/cancel") as response:
        assert response.status == 200
        cancelled = await response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None

    async with client.post(f"/runs/{run['id']}/cancel") as response:
        assert (await problem(response, 409))["run_status"] == "cancelled"
    async with client.get("/users/1/features") as response:
        features = await response.json()
    assert (features["name"], features["top_compound"]["id"]) == ("Alice", 2)
    async with client.get("/metrics") as response:
        assert 'etl_runs_total{status="cancelled"} 1.0' in await response.text()


def list_uploads(directory: Path) -> list[Path]:
    return list(directory.glob("etl-upload-*"))


async def until_empty(directory: Path) -> None:
    """The upload directory goes when its run has fully ended, just after its status."""
    for _ in range(100):
        if not entries(directory):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{directory} still holds {entries(directory)}")
