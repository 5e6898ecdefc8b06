"""Runs as a whole: reruns replace, failures change nothing, the CLI works end to end."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from badinput import connect, run_rows, scratch_tables, snapshot
from click.testing import CliRunner

from service.cli import main
from service.db.database import open_pool
from service.etl import RunOptions
from service.jobs import run_once
from service.runstore import RunStore
from service.settings import Settings


async def runs(settings: Settings) -> list[tuple[int, str]]:
    return [(r["id"], r["status"]) for r in await run_rows(settings)]


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


async def test_rerun_replaces_results_never_appends(settings: Settings, sample_dir: Path) -> None:
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    first = await snapshot(settings)
    assert len(first["experiment_counts"]) == 10

    # Alice's second experiment now belongs to Bob: the rerun must show only the new state.
    rewrite(sample_dir / "user_experiments.csv", "2,\t1,\t2;3", "2,\t2,\t2;3")
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    second = await snapshot(settings)
    counts = {row[0]: row[2] for row in second["experiment_counts"]}
    assert (counts[1], counts[2]) == (1, 2)
    assert len(second["experiment_counts"]) == 10
    assert len(second["top_compounds"]) == 10
    assert await runs(settings) == [(1, "succeeded"), (2, "succeeded")]
    assert await scratch_tables(settings) == []  # the replaced tables are dropped


async def test_replaced_tables_left_by_a_dead_process_are_dropped(
    settings: Settings, sample_dir: Path
) -> None:
    """A process that died between the swap and dropping the old tables left them."""
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    async with connect(settings) as conn:
        for table in ("experiment_counts", "top_compounds"):
            await conn.execute(f"CREATE TABLE {table}_retired (LIKE {table})")
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    assert await scratch_tables(settings) == []
    assert len((await snapshot(settings))["experiment_counts"]) == 10


async def test_a_progress_report_that_arrives_after_the_run_ended_changes_nothing(
    settings: Settings, sample_dir: Path
) -> None:
    """The progress reporter's last write can be in flight while the swap commits the
    run's final progress; landing after it, it must not leave the record showing an
    earlier point of the run."""
    done = await run_once(settings, sample_dir)
    assert done["status"] == "succeeded"
    assert done["progress"]["partitions_done"] == done["progress"]["partitions_total"] > 0
    async with open_pool(settings) as pool:
        await RunStore(pool).set_progress(done["id"], {**done["progress"], "partitions_done": 0})
        stored = await pool.fetchval("SELECT progress FROM etl_runs WHERE id = $1", done["id"])
    assert json.loads(stored) == done["progress"]


async def test_failed_run_keeps_previous_results(settings: Settings, sample_dir: Path) -> None:
    assert (await run_once(settings, sample_dir))["status"] == "succeeded"
    before = await snapshot(settings)

    rewrite(sample_dir / "user_experiments.csv", "11,\t10,", "11,\t99,")
    failed = await run_once(settings, sample_dir)
    assert failed["status"] == "failed"
    assert failed["errors"] == [
        {
            "file": "user_experiments.csv",
            "line": 12,
            "column": 2,
            "field": "user_id",
            "message": "unknown user_id 99 (not in users.csv)",
        }
    ]
    assert await snapshot(settings) == before
    assert await runs(settings) == [(1, "succeeded"), (2, "failed")]
    assert list(settings.tmp_dir.iterdir()) == []


async def test_skip_mode_leaves_out_bad_rows_and_counts_them(
    settings: Settings, sample_dir: Path
) -> None:
    rewrite(sample_dir / "user_experiments.csv", "11,\t10,", "11,\t99,")
    run = await run_once(settings, sample_dir, RunOptions(on_error="skip", max_errors=1))
    assert run["status"] == "succeeded", run
    assert run["stats"]["experiments"] == 10
    assert run["stats"]["rows_rejected"] == 1
    assert run["errors"][0]["line"] == 12
    tables = await snapshot(settings)
    judy = next(r for r in tables["experiment_counts"] if r[0] == 10)
    assert judy[2] == 0
    alice = next(r for r in tables["experiment_averages"] if r[0] == 1)
    assert alice[2] == 2 / 10

    rewrite(sample_dir / "user_experiments.csv", "10,\t9,", "10,\t98,")
    too_many = await run_once(settings, sample_dir, RunOptions(on_error="skip", max_errors=1))
    assert too_many["status"] == "failed"
    assert too_many["error_total"] == 2


def test_cli_run_and_show_on_a_database(settings: Settings, sample_dir: Path) -> None:
    env = {"DATABASE_URL": settings.database_url or "", "ETL_DB_SCHEMA": settings.db_schema or ""}
    cli = CliRunner()
    result = cli.invoke(main, ["run", str(sample_dir), "--workers", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert "users 10, experiments 11, compounds 3" in result.output
    assert "average experiments per user 1.1" in result.output

    shown = cli.invoke(main, ["show", "--user", "1"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "Alice" in shown.output and "Compound B" in shown.output

    (sample_dir / "compounds.csv").unlink()
    failed = cli.invoke(main, ["run", str(sample_dir), "--workers", "1"], env=env)
    assert failed.exit_code == 1
    assert "compounds.csv: missing file" in failed.output


def test_cli_generate_writes_the_export_format(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["generate", str(tmp_path), "--users", "5", "--experiments", "20", "--compounds", "4"],
    )
    assert result.exit_code == 0, result.output
    users = (tmp_path / "users.csv").read_bytes()
    assert users.startswith(b"\nuser_id,\tname,\temail,\tsignup_date\n1,\t")
    assert not users.endswith(b"\n")
    experiments = (tmp_path / "user_experiments.csv").read_text().split("\n")
    assert len(experiments) == 21
    assert os.path.getsize(tmp_path / "compounds.csv") > 0


def test_cli_says_in_one_line_when_the_database_is_unreachable(sample_dir: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/test"
    result = CliRunner().invoke(main, ["run", str(sample_dir), "--database-url", url])
    assert result.exit_code == 1
    assert f"cannot use the database at 127.0.0.1:{port}/test" in result.output
    assert "Traceback" not in result.output
