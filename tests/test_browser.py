"""The pages in a real browser (headless chromium): upload, progress, search, export,
escaping, sign-in, CSRF, keyboard, and JavaScript turned off."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
from pathlib import Path

from playwright.async_api import Dialog, Page, expect
from playwright.async_api import Error as PlaywrightError
from test_browser_support import Open, Site
from test_web_support import copy_dataset, run_to_the_end

pytest_plugins = ["test_web_support", "test_browser_support"]

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_FILES = {
    "#users": "users.csv",
    "#experiments": "user_experiments.csv",
    "#compounds": "compounds.csv",
}
SCREENSHOT = ROOT / "docs" / "results-page.png"


async def results_of_a_run(open_site: Open, path: str = "/ui/results") -> Page:
    """A tab on the results page after a run of the sample data."""
    site = await open_site()
    await run_to_the_end(site.client)
    await site.page.goto(path)
    return site.page


async def upload_sample(site: Site, sample_dir: Path) -> None:
    page = site.page
    await page.goto("/ui/runs/new")
    for selector, name in SAMPLE_FILES.items():
        await page.set_input_files(selector, sample_dir / name)
    await page.get_by_role("button", name="Upload and run").click()


async def test_uploading_the_sample_files_shows_progress_and_reaches_succeeded(
    open_site: Open, sample_dir: Path
) -> None:
    site = await open_site()

    # The sample is a few hundred bytes: hold the request a moment so the upload's
    # progress bar can be seen on its way.
    async def slow(route: object) -> None:
        await asyncio.sleep(0.5)
        await route.continue_()  # type: ignore[attr-defined]

    await site.page.route(re.compile(r".*/ui/runs\?csrf_token=.*"), slow)
    await upload_sample(site, sample_dir)
    await expect(site.page.locator(".upload-progress progress")).to_be_visible()
    await site.page.wait_for_url(re.compile(r".*/ui/runs/\d+$"))
    await expect(site.page.locator("h1")).to_contain_text("succeeded")
    await expect(site.page.locator("dl.facts").first).to_contain_text("upload (3 files")
    await site.page.goto("/")
    await expect(site.page.locator("table.runs tbody tr")).to_have_count(1)
    await expect(site.page.locator("table.runs [data-status]")).to_have_text("✓ succeeded")


async def test_a_running_run_shows_a_live_progress_bar_until_it_succeeds(
    open_site: Open, big: str
) -> None:
    site = await open_site(chunk_bytes=64 * 1024)
    page = site.page
    await page.goto("/ui/runs/new")
    await page.get_by_label("Dataset").select_option(big)
    await page.get_by_role("button", name="Run the dataset").click()
    await page.wait_for_url(re.compile(r".*/ui/runs/\d+$"))
    bar = page.locator(".progress progress")
    await expect(bar).to_be_visible()
    # Mark this document: the bar must move without a reload (the page reloads itself
    # once the run is over).
    await page.evaluate("window.notReloaded = true")
    seen = set()
    try:
        while await page.evaluate("window.notReloaded === true"):
            seen.add(await bar.evaluate("b => b.value", timeout=1000))
            await asyncio.sleep(0.1)
    except PlaywrightError:  # the document went away: the reload
        pass
    assert len(seen) > 1, seen
    await expect(page.locator("h1")).to_contain_text("succeeded")


async def test_searching_alice_shows_compound_b(open_site: Open) -> None:
    page = await results_of_a_run(open_site)
    await page.locator('input[type="search"][name="q"]').fill("Alice")
    await page.keyboard.press("Enter")
    rows = page.locator("table.results tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("Alice")
    await expect(rows.first).to_contain_text("Compound B")
    await expect(page.locator(".matches")).to_have_text("1 user match “Alice”.")


async def test_the_csv_export_holds_what_the_table_shows(open_site: Open) -> None:
    page = await results_of_a_run(open_site)
    async with page.expect_download() as info:
        await page.get_by_role("link", name="CSV").first.click()
    download = await info.value
    assert download.suggested_filename == "results.csv"
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    exported = list(csv.DictReader(io.StringIO(text)))
    cells = await page.locator("table.results tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells, c => c.innerText.trim()))"
    )
    assert len(cells) == len(exported) == 10
    for shown, row in zip(cells, exported, strict=True):
        assert shown[0] == row["user_id"]
        assert shown[1] == row["name"]
        assert shown[2] == row["experiment_count"]
        assert shown[5].startswith(row["compound_name"] or "—")


async def test_a_user_named_script_is_shown_as_text_and_no_dialog_opens(
    open_site: Open, sample_dir: Path
) -> None:
    copy_dataset(sample_dir, sample_dir / "evil", b"Alice", b"<script>alert(1)</script>")
    site = await open_site()
    await run_to_the_end(site.client, "evil")
    dialogs: list[Dialog] = []
    site.page.on("dialog", lambda dialog: dialogs.append(dialog))
    for path in ("/ui/results", "/ui/users/1", "/ui/results?q=script"):
        await site.page.goto(path)
        await expect(site.page.get_by_text("<script>alert(1)</script>").first).to_be_visible()
    await site.page.wait_for_timeout(300)
    assert dialogs == []


async def test_signed_out_visits_land_on_sign_in_and_signing_in_shows_the_runs(
    open_site: Open,
) -> None:
    site = await open_site(api_token="lab-token")
    page = site.page
    await page.goto("/ui/results")
    await expect(page).to_have_url(re.compile(r".*/ui/signin\?next=%2Fui%2Fresults$"))
    await page.get_by_label("API token").fill("wrong")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator(".problem")).to_contain_text("not right")
    await page.get_by_label("API token").fill("lab-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("h1")).to_have_text("Results")
    await page.get_by_role("link", name="Runs").click()
    await expect(page.locator("h1")).to_have_text("Runs")
    await page.get_by_role("button", name="Sign out").click()
    await expect(page).to_have_url(re.compile(r".*/ui/signin$"))


async def test_a_form_sent_without_its_csrf_token_is_refused(open_site: Open) -> None:
    site = await open_site()
    page = site.page
    await page.goto("/ui/runs/new")
    await page.locator('#dataset-form input[name="csrf_token"]').evaluate("e => e.remove()")
    await page.get_by_role("button", name="Run the dataset").click()
    await expect(page.locator("h1")).to_have_text("Form refused")
    await expect(page.locator(".problem")).to_contain_text("CSRF")
    async with site.client.get("/runs") as response:
        assert (await response.json())["runs"] == []


async def test_with_javascript_off_the_pages_show_and_the_upload_form_submits(
    open_site: Open, sample_dir: Path
) -> None:
    site = await open_site(javascript=False)
    await upload_sample(site, sample_dir)
    page = site.page
    await page.wait_for_url(re.compile(r".*/ui/runs/\d+$"))
    for _ in range(100):
        if "succeeded" in await page.locator("h1").inner_text():
            break
        await page.wait_for_timeout(100)
        await page.reload()
    await expect(page.locator("h1")).to_contain_text("succeeded")
    await page.goto("/ui/charts")
    await expect(page.locator("svg")).to_have_count(3)
    await expect(page.locator("svg").nth(1)).to_contain_text("Compound B")


async def test_every_input_has_a_label_and_the_forms_are_reachable_by_keyboard(
    open_site: Open,
) -> None:
    site = await open_site()
    page = site.page
    for path in ("/ui/runs/new", "/ui/results", "/"):
        await page.goto(path)
        unlabelled = await page.locator("input:not([type=hidden]), select").evaluate_all(
            "els => els.filter(e => e.labels.length === 0).map(e => e.outerHTML)"
        )
        assert unlabelled == [], path
    await page.goto("/ui/runs/new")
    reached = []
    for _ in range(20):
        await page.keyboard.press("Tab")
        reached.append(
            await page.evaluate(
                "document.activeElement.id || document.activeElement.textContent.trim()"
            )
        )
    expected = ["users", "experiments", "compounds", "upload-on-error", "upload-max-errors"]
    assert [r for r in reached if r in expected] == expected, reached
    assert "Upload and run" in reached and "Run the dataset" in reached


async def test_results_page_screenshot_for_the_readme(open_site: Open, tmp_path: Path) -> None:
    """Takes the README's screenshot; UPDATE_SCREENSHOT=1 writes it to docs/."""
    page = await results_of_a_run(open_site, "/ui/results?sort=experiment_count&dir=desc")
    await page.set_viewport_size({"width": 1200, "height": 820})
    target = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "shot.png"
    await page.screenshot(path=target, full_page=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
