"""Dry runs and rejected rows, end to end on a real server and PostgreSQL."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Any

from badinput import scratch_tables, snapshot
from click.testing import CliRunner
from test_inputs import dataset, plain_tables, run, sample
from test_web_support import Client, Serve, problem

from service.cli import main
from service.pipeline.errors import MAX_REPORTED_ERRORS
from service.settings import Settings

pytest_plugins = ["test_web_support"]


async def metric(client: Client, name: str) -> str:
    async with client.get("/metrics") as response:
        text = await response.text()
    return next(line for line in text.splitlines() if line.startswith(name + " "))


async def test_a_dry_run_computes_everything_and_replaces_nothing(
    client: Client, settings: Settings
) -> None:
    before = await plain_tables(client, settings)

    # Alice's second experiment now belongs to Bob: a real run would change the counts.
    files = sample(settings)
    files["user_experiments.csv"] = files["user_experiments.csv"].replace(
        b"2,\t1,\t2;3", b"2,\t2,\t2;3"
    )
    name = dataset(settings, "changed", files)
    last_success = await metric(client, "etl_last_success_timestamp_seconds")
    dry = await run(client, dataset=name, dry_run=True)
    assert dry["status"] == "succeeded", dry
    assert dry["options"]["dry_run"] is True  # type: ignore[index]
    stats: Any = dry["stats"]
    assert (stats["users"], stats["experiments"]) == (10, 11)
    assert stats["rows_loaded"] == {
        "experiment_counts": 10,
        "experiment_averages": 10,
        "top_compounds": 10,
    }
    assert await snapshot(settings) == before
    assert await scratch_tables(settings) == []  # the staged tables were dropped
    async with client.get("/users/1/features") as response:
        assert (await response.json())["experiment_count"] == 2  # unchanged
    assert await metric(client, "etl_last_success_timestamp_seconds") == last_success

    # A dry run of bad input fails like any run, recorded as a dry run.
    bad = dataset(settings, "bad", {**files, "users.csv": files["users.csv"] + b"\nx,\tX,\t,\t"})
    failed = await run(client, dataset=bad, dry_run=True)
    assert failed["status"] == "failed"
    assert failed["options"]["dry_run"] is True  # type: ignore[index]
    assert failed["errors"][0]["line"] == 13  # type: ignore[index]
    assert await snapshot(settings) == before

    real = await run(client, dataset=name)
    assert real["options"]["dry_run"] is False  # type: ignore[index]
    async with client.get("/users/1/features") as response:
        assert (await response.json())["experiment_count"] == 1


def test_cli_dry_run_says_so_and_loads_nothing(settings: Settings, sample_dir: Path) -> None:
    env = {"DATABASE_URL": settings.database_url or "", "ETL_DB_SCHEMA": settings.db_schema or ""}
    result = CliRunner().invoke(
        main,
        ["run", str(sample_dir), "--workers", "1", "--dry-run", "--encoding", "latin-1"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "dry run: validated and computed; the result tables were not replaced" in result.output
    shown = CliRunner().invoke(main, ["show", "--user", "1"], env=env)
    assert "Alice" not in shown.output
    bad = CliRunner().invoke(main, ["run", str(sample_dir), "--encoding", "klingon"], env=env)
    assert bad.exit_code == 2
    assert "unknown encoding 'klingon'" in bad.output


async def rejects_csv(client: Client, run_id: object) -> list[dict[str, str]]:
    async with client.get(f"/runs/{run_id}/rejects.csv") as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "text/csv"
        text = await response.text()
    return list(csv.DictReader(io.StringIO(text)))


async def test_rejects_csv_lists_exactly_the_rejected_lines_with_their_raw_text(
    client: Client, settings: Settings
) -> None:
    files = sample(settings)
    users = files["users.csv"].replace(b"3,\tCarol", b"3x,\tCarol")  # line 5
    experiments = files["user_experiments.csv"].replace(b"5,\t4,\t1;2;3,", b"5,\t4,\t1;2;9,")
    experiments = experiments.replace(b"7,\t6,\t1;3,\t40", b"7,\t6,\t1;3,\t40fast")
    # compounds.csv as European Excel writes it: ; between fields; one duplicate id.
    compounds = files["compounds.csv"].replace(b",\t", b";\t") + b"\n2;\tCompound Z;\tH2O"
    name = dataset(
        settings,
        "mixed",
        {
            "users.csv": users,
            "user_experiments.csv.gz": gzip.compress(experiments),
            "compounds.csv": compounds,
        },
    )
    done = await run(client, dataset=name, on_error="skip", max_errors=10)
    assert done["status"] == "succeeded", done
    errors: Any = done["errors"]
    assert done["rejects"] == {"count": len(errors), "href": f"/runs/{done['id']}/rejects.csv"}

    rows = await rejects_csv(client, done["id"])
    originals = {
        "users.csv": users,
        "user_experiments.csv.gz": experiments,
        "compounds.csv": compounds,
    }
    assert [(r["file"], int(r["line"]), int(r["column"]), r["message"]) for r in rows] == [
        (e["file"], e["line"], e["column"], e["message"]) for e in errors
    ]
    for row in rows:
        assert row["raw"] == originals[row["file"]].decode().split("\n")[int(row["line"]) - 1]
    where = {(r["file"], int(r["line"])) for r in rows}
    assert {
        ("users.csv", 5),  # a bad id
        ("user_experiments.csv.gz", 5),  # Carol's experiment: her user row was rejected
        ("user_experiments.csv.gz", 6),  # unknown compound 9
        ("user_experiments.csv.gz", 8),  # run time "40fast"
        ("compounds.csv", 5),  # duplicate compound id, in the ; file
    } == where
    raw = {(r["file"], int(r["line"])): r["raw"] for r in rows}
    assert raw[("compounds.csv", 5)] == "2;\tCompound Z;\tH2O"  # the user's own line


async def test_every_reject_is_kept_past_the_hundred_a_run_records(
    client: Client, settings: Settings
) -> None:
    files = sample(settings)
    extra = b"".join(b"\n%d,\t1,\t99,\t1" % (100 + i) for i in range(150))
    name = dataset(
        settings, "many", {**files, "user_experiments.csv": files["user_experiments.csv"] + extra}
    )
    done = await run(client, dataset=name, on_error="skip", max_errors=200)
    assert done["status"] == "succeeded", done
    assert (len(done["errors"]), done["error_total"]) == (MAX_REPORTED_ERRORS, 150)  # type: ignore[arg-type]
    rows = await rejects_csv(client, done["id"])
    assert [int(r["line"]) for r in rows] == list(range(13, 163))
    assert rows[-1]["raw"] == "249,\t1,\t99,\t1"

    # Past max_errors the run fails; it kept the first max(100, max_errors + 1) rejects.
    failed = await run(client, dataset=name, on_error="skip", max_errors=120)
    assert failed["status"] == "failed"
    assert failed["rejects"]["count"] == 121  # type: ignore[index]
    assert len(await rejects_csv(client, failed["id"])) == 121


async def test_rejects_are_kept_for_the_newest_runs_only(serve: Serve, settings: Settings) -> None:
    client = await serve(rejects_keep=1)
    first = await run(client, on_error="skip")
    assert first["rejects"] == {"count": 0, "href": f"/runs/{first['id']}/rejects.csv"}
    assert await rejects_csv(client, first["id"]) == []  # a header, no rows
    second = await run(client, on_error="skip")
    async with client.get(f"/runs/{first['id']}") as response:
        assert (await response.json())["rejects"] is None  # pruned
    async with client.get(f"/runs/{first['id']}/rejects.csv") as response:
        await problem(response, 404)
    assert await rejects_csv(client, second["id"]) == []

    aborting = await run(client)  # abort mode keeps no rejects
    assert aborting["rejects"] is None
    async with client.get(f"/runs/{aborting['id']}/rejects.csv") as response:
        assert "kept no rejected rows" in (await problem(response, 404))["detail"]
    async with client.get("/runs/999/rejects.csv") as response:
        await problem(response, 404)
