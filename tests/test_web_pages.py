"""The pages over plain HTTP on a real server and database: security headers, cookies,
CSRF, escaping, paging against an obvious implementation, exports, charts."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest
from test_web_support import (
    Client,
    Serve,
    copy_dataset,
    run_to_the_end,
    sample_upload,
    wait_for,
)

from service.generate import generate
from service.settings import Settings
from service.web.pages import browse
from service.web.pages.export import BATCH_ROWS, FEATURE_COLUMNS

pytest_plugins = ["test_web_support"]

SCRIPT_NAME = "<script>alert(1)</script>"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def csrf_of(client: Client, path: str) -> str:
    async with client.get(path) as response:
        assert response.status == 200
        found = CSRF.search(await response.text())
    assert found, f"no CSRF token on {path}"
    return found.group(1)


async def connect(settings: Settings) -> asyncpg.Connection[asyncpg.Record]:
    return await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )


async def test_pages_send_a_strict_csp_and_escape_what_the_csv_files_say(
    client: Client, sample_dir: Path
) -> None:
    copy_dataset(sample_dir, sample_dir / "evil", b"Alice", SCRIPT_NAME.encode())
    await run_to_the_end(client, "evil")
    for path in ("/", "/ui/results", "/ui/users/1", "/ui/charts", "/ui/runs/new"):
        async with client.get(path) as response:
            assert response.status == 200, path
            csp = response.headers["Content-Security-Policy"]
            body = await response.text()
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        # Only the vendored file: no inline script, nothing from another origin.
        assert re.findall(r"<script[^>]*>", body) == ['<script src="/ui/static/app.js" defer>'], (
            path
        )
        assert "<script>alert" not in body
        if path in ("/ui/results", "/ui/users/1"):
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, path
    async with client.get("/ui/static/app.js") as response:
        assert response.status == 200
        assert "javascript" in response.content_type


async def test_form_posts_without_the_csrf_token_are_refused(
    client: Client, settings: Settings
) -> None:
    token = await csrf_of(client, "/ui/runs/new")
    for form in ({}, {"csrf_token": "forged"}):
        async with client.post("/ui/runs/dataset", data={"dataset": ".", **form}) as response:
            assert response.status == 403
            assert "CSRF" in await response.text()
    async with client.post("/ui/runs", data=sample_upload(settings.data_dir)) as response:
        assert response.status == 403
    conn = await connect(settings)
    try:
        assert await conn.fetchval("SELECT count(*) FROM etl_runs") == 0
    finally:
        await conn.close()
    async with client.post(
        "/ui/runs/dataset", data={"dataset": ".", "csrf_token": token}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert re.fullmatch(r"/ui/runs/\d+", response.headers["Location"])


async def test_sign_in_gives_an_httponly_strict_cookie_and_the_api_keeps_bearer(
    serve: Serve,
) -> None:
    client = await serve(api_token="s3cret")
    async with client.get("/ui/results?q=x", allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/ui/signin?next=%2Fui%2Fresults%3Fq%3Dx"
    token = await csrf_of(client, "/ui/signin")
    form = {"csrf_token": token, "token": "wrong", "next": "/"}
    async with client.post("/ui/signin", data=form) as response:
        assert response.status == 401
        assert "not right" in await response.text()
    form["token"] = "s3cret"
    async with client.post(
        "/ui/signin", data=form, allow_redirects=False, headers={"X-Forwarded-Proto": "https"}
    ) as response:
        assert response.status == 303
        cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    # A Secure cookie does not come back over plain http: sign in again without the proxy.
    form["csrf_token"] = await csrf_of(client, "/ui/signin")
    async with client.post("/ui/signin", data=form, allow_redirects=False) as response:
        assert response.status == 303
        assert "Secure" not in response.headers["Set-Cookie"]
    async with client.get("/", allow_redirects=False) as response:
        assert response.status == 200
        assert "<h1>Runs</h1>" in await response.text()
    # The session cookie opens the pages, not the JSON API.
    async with client.get("/runs") as response:
        assert response.status == 401


@pytest.fixture
async def many_users(settings: Settings, client: Client) -> list[dict[str, Any]]:
    """A generated dataset of 300 users, loaded; its features as the JSON API shows them."""
    generate(settings.data_dir / "many", users=300, experiments=500, compounds=40)
    await run_to_the_end(client, "many")
    conn = await connect(settings)
    try:
        ids = [r["user_id"] for r in await conn.fetch("SELECT user_id FROM experiment_counts")]
    finally:
        await conn.close()
    features = []
    for user_id in ids:
        async with client.get(f"/users/{user_id}/features") as response:
            features.append(await response.json())
    return features


def obvious_order(rows: list[dict[str, Any]], sort: str, descending: bool, q: str) -> list[int]:
    """The expected order: matching users, empty values last, ties by user id."""

    def value(row: dict[str, Any]) -> Any:
        top = row["top_compound"] or {}
        return {
            "compound_name": top.get("name"),
            "top_compound_experiments": top.get("experiments"),
            "tie_count": top.get("tie_count"),
            "name": row["name"].encode() if row["name"] is not None else None,
        }.get(sort, row.get(sort))

    if sort == "average_experiments":  # sorted as the count it is proportional to
        sort = "experiment_count"
    wanted = [r for r in rows if not q or q.lower() in r["name"].lower() or q == str(r["user_id"])]
    present = sorted(
        (r for r in wanted if value(r) is not None),
        key=lambda r: (value(r), r["user_id"]),
        reverse=descending,
    )
    empty = sorted(
        (r for r in wanted if value(r) is None), key=lambda r: r["user_id"], reverse=descending
    )
    return [r["user_id"] for r in present + empty]


@pytest.mark.parametrize(
    ("q", "cap"), [("", 0), ("1", browse.MATCH_CAP), ("1", 5), ("user 2", browse.MATCH_CAP)]
)
async def test_every_sort_walked_page_by_page_matches_the_obvious_order(
    many_users: list[dict[str, Any]],
    settings: Settings,
    q: str,
    cap: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cap of 5 makes "1" a broad search: sorted by scanning instead of by its ids."""
    from service.db.database import open_pool

    monkeypatch.setattr(browse, "MATCH_CAP", cap)

    async with open_pool(settings) as pool:
        for sort in browse.queries.SORT_KEYS:
            for descending in (False, True):
                seen: list[int] = []
                query = browse.Query(sort=sort, descending=descending, q=q)
                while True:
                    page = await browse.read_page(pool, query, limit=37)
                    seen += [r["user_id"] for r in page.rows]
                    if page.next is None:
                        break
                    # The cursor goes through its URL form, as a link does.
                    after = browse.Cursor.decode(page.next.encode())
                    query = browse.Query(sort, descending, q, after)
                expected = obvious_order(many_users, sort, descending, q)
                assert seen == expected, (sort, descending, q)
    assert q or len(seen) == 300


async def test_results_page_searches_sorts_and_links_the_next_page(
    client: Client, many_users: list[dict[str, Any]]
) -> None:
    async with client.get(
        "/ui/results", params={"sort": "experiment_count", "dir": "desc"}
    ) as response:
        body = await response.text()
    assert 'aria-sort="descending"' in body
    first_ids = re.findall(r'<a href="/ui/users/(\d+)">', body)
    expected = obvious_order(many_users, "experiment_count", True, "")
    assert [int(i) for i in first_ids] == expected[: browse.PAGE_SIZE]
    next_link = re.search(r'rel="next" href="([^"]+)"', body)
    assert next_link is not None
    async with client.get(next_link.group(1).replace("&amp;", "&")) as response:
        body = await response.text()
    ids = [int(i) for i in re.findall(r'<a href="/ui/users/(\d+)">', body)]
    assert ids == expected[browse.PAGE_SIZE : 2 * browse.PAGE_SIZE]
    for bad in ({"sort": "nope"}, {"dir": "up"}, {"after": "!!"}):
        async with client.get("/ui/results", params=bad) as response:
            assert response.status == 400
            assert response.content_type == "text/html"


async def test_exports_stream_every_row_in_batches(client: Client, settings: Settings) -> None:
    generate(
        settings.data_dir / "batches", users=BATCH_ROWS * 2 + 7, experiments=20_000, compounds=50
    )
    await run_to_the_end(client, "batches")
    conn = await connect(settings)
    try:
        counts = await conn.fetch("SELECT * FROM experiment_counts ORDER BY user_id")
        top = await conn.fetch("SELECT * FROM top_compounds ORDER BY user_id")
    finally:
        await conn.close()
    async with client.get("/ui/tables/experiment_counts.csv") as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert 'filename="experiment_counts.csv"' in response.headers["Content-Disposition"]
        exported = list(csv.reader(io.StringIO(await response.text())))
    assert exported[0] == ["user_id", "name", "experiment_count"]
    assert exported[1:] == [
        [str(r["user_id"]), r["name"], str(r["experiment_count"])] for r in counts
    ]
    async with client.get("/ui/tables/top_compounds.json") as response:
        rows = await response.json()
    assert rows == [dict(r) for r in top]
    async with client.get("/ui/results.csv", params={"q": "user 1"}) as response:
        matching = list(csv.DictReader(io.StringIO(await response.text())))
    assert matching and all("user 1" in r["name"].lower() or r["user_id"] == "1" for r in matching)
    assert list(matching[0]) == list(FEATURE_COLUMNS)


async def add_a_million_counts(client: Client, settings: Settings) -> None:
    """Rows put straight into the table: this measures the export, not the pipeline."""
    await run_to_the_end(client)
    conn = await connect(settings)
    try:
        await conn.execute(
            "INSERT INTO experiment_counts SELECT i, 'User ' || i, i % 7"
            " FROM generate_series(100, 1000099) AS i"
        )
        await conn.execute("ANALYZE experiment_counts")
    finally:
        await conn.close()


async def test_a_million_rows_export_with_flat_memory(client: Client, settings: Settings) -> None:
    await add_a_million_counts(client, settings)
    process = psutil.Process()
    before = process.memory_info().rss
    peak, rows, size = before, 0, 0
    async with client.get("/ui/tables/experiment_counts.csv") as response:
        async for chunk in response.content.iter_chunked(1 << 16):
            size += len(chunk)
            rows += chunk.count(b"\n")
            if rows % 50_000 < 1000:
                peak = max(peak, process.memory_info().rss)
    peak = max(peak, process.memory_info().rss)
    assert rows == 1 + 1_000_000 + 10
    print(f"1M-row CSV export: {size / 1e6:.1f} MB, RSS grew {(peak - before) / 2**20:.1f} MB")
    assert (peak - before) < 50 * 2**20, f"RSS grew {(peak - before) / 2**20:.1f} MB"


async def test_charts_are_inline_svg_with_their_numbers(client: Client) -> None:
    await run_to_the_end(client)
    async with client.get("/ui/charts") as response:
        body = await response.text()
    assert body.count("<svg") == 3
    # Alice has 2 experiments, the nine others 1; Compound B is Alice's top compound.
    assert "<title>1 experiments: 9 users</title>" in body
    assert "<title>2 experiments: 1 users</title>" in body
    assert re.search(r"<title>Compound B \(id 2\): \d+ users</title>", body)
    assert re.search(r"<title>run 1 \(succeeded\): [0-9.]+ s</title>", body)


async def test_run_page_shows_stats_phases_and_pages_of_errors(
    client: Client, sample_dir: Path
) -> None:
    bad = copy_dataset(sample_dir, sample_dir / "bad")
    lines = (bad / "user_experiments.csv").read_text().splitlines()
    lines += [f"{100 + i},\t99,\t1,\t10" for i in range(30)]
    (bad / "user_experiments.csv").write_text("\n".join(lines))
    async with client.post("/runs", json={"dataset": "bad"}) as response:
        run = await response.json()
    await wait_for(client, run["id"], {"failed"})
    async with client.get(f"/ui/runs/{run['id']}") as response:
        body = await response.text()
    assert "✗</span> failed" in body
    assert body.count("<tr><td>user_experiments.csv</td>") == 25
    assert "page 1 of 2" in body
    async with client.get(f"/ui/runs/{run['id']}", params={"errors_page": "2"}) as response:
        assert (await response.text()).count("<tr><td>user_experiments.csv</td>") == 5
    ok = await run_to_the_end(client)
    async with client.get(f"/ui/runs/{ok['id']}") as response:
        body = await response.text()
    assert "Time per phase" in body and "<td>read</td>" in body
    async with client.get(f"/ui/runs/{ok['id']}/progress") as response:
        progress = await response.json()
    assert progress["status"] == "succeeded" and progress["active"] is False


async def test_unknown_pages_and_users_get_html_error_pages(client: Client) -> None:
    for path in ("/ui/nothing", "/ui/users/12345", "/ui/runs/999"):
        async with client.get(path) as response:
            assert response.status == 404, path
            assert response.content_type == "text/html"
            assert 'class="problem"' in await response.text()
    async with client.get("/runs/999") as response:  # the API still answers problem+json
        assert response.content_type == "application/problem+json"


async def test_the_cancel_button_cancels_the_running_run(
    serve: Serve, big: str, settings: Settings
) -> None:
    client = await serve(chunk_bytes=64 * 1024)
    token = await csrf_of(client, "/ui/runs/new")
    async with client.post(
        "/ui/runs/dataset", data={"dataset": big, "csrf_token": token}, allow_redirects=False
    ) as response:
        run_path = response.headers["Location"]
    async with client.get(run_path) as response:
        body = await response.text()
    assert "Cancel run" in body and 'data-progress-url="' in body
    async with client.post(f"{run_path}/cancel", data={"csrf_token": token}) as response:
        assert response.status == 200  # the run's page, after the redirect
        assert "⊘</span> cancelled" in await response.text()
    async with client.post(f"{run_path}/cancel", data={"csrf_token": token}) as response:
        assert response.status == 409
        assert "not running" in await response.text()


async def test_an_export_is_cut_off_when_a_run_replaces_the_results_midway(
    client: Client, settings: Settings
) -> None:
    """Old rows then new ones would be a file that never existed: the download breaks."""
    await add_a_million_counts(client, settings)
    async with client.get("/ui/tables/experiment_counts.csv") as response:
        first = await response.content.read(1 << 16)
        assert first.startswith(b"user_id,name,experiment_count")
        await run_to_the_end(client)  # swaps in the sample's 10 users while the export waits
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with client.get("/ui/tables/experiment_counts.csv") as response:
        assert len((await response.text()).splitlines()) == 1 + 10


async def test_search_folds_ascii_letters_and_matches_others_as_typed(
    client: Client, settings: Settings, sample_dir: Path
) -> None:
    from service.db.database import open_pool

    copy_dataset(sample_dir, sample_dir / "accents", b"Bob", "Émile".encode())
    await run_to_the_end(client, "accents")
    async with open_pool(settings) as pool:
        for q, found in (("ÉMILE", [2]), ("Émile", [2]), ("mIl", [2]), ("émile", []), ("2", [2])):
            page = await browse.read_page(pool, browse.Query(q=q))
            assert [r["user_id"] for r in page.rows] == found, q
