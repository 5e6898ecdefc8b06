"""The original take-home's command line works as written: ``run -d DIR -db NAME -hs HOST
-u USER -pass PASSWORD -p PORT``, and the container's entry point that turns such flags into
one ETL run (and no arguments into the server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from badinput import connect, run_rows
from click.testing import CliRunner
from test_web_support import ROOT, free_port, run_script, start_process, until_healthy

from service.cli import main, run
from service.entrypoint import command_line
from service.settings import Settings

DEAD_URL = "postgresql://nobody@127.0.0.1:1/nothing"  # nothing listens on port 1


def challenge_args(database_url: str, data_dir: Path) -> list[str]:
    """The take-home's flags, spelled as its README does, for the test database."""
    url = urlsplit(database_url)
    query = dict(parse_qsl(url.query))
    host = url.hostname or query["host"]  # the embedded server listens on a Unix socket
    port = url.port or int(query.get("port", 5432))
    return [
        *("-d", str(data_dir)),
        *("-db", url.path.lstrip("/")),
        *("-hs", host),
        *("-u", url.username or "postgres"),
        *("-pass", url.password or "backendproject"),  # trust authentication ignores it
        *("-p", str(port)),
    ]


async def alice_top_compound(settings: Settings) -> tuple[Any, ...]:
    async with connect(settings) as conn:
        row = await conn.fetchrow(
            "SELECT compound_id, compound_name, experiment_count FROM top_compounds"
            " WHERE user_id = 1"
        )
    assert row is not None
    return tuple(row)


def database_parts(args: list[str]) -> dict[str, Any]:
    """What ``run`` makes of ``args``, without running: the data directory and database."""
    params = run.make_context("run", args).params
    keys = ("data_dir_flag", "db_name", "db_host", "db_user", "db_password", "db_port")
    return {key: params[key] for key in keys}


CHALLENGE = {
    "data_dir_flag": Path("/data"),
    "db_name": "exampledb",
    "db_host": "pgdatabase",
    "db_user": "postgres",
    "db_password": "backendproject",
    "db_port": 5432,
}


@pytest.mark.parametrize(
    "args",
    [
        "-d /data -db exampledb -hs pgdatabase -u postgres -pass backendproject -p 5432",
        "-p 5432 -pass backendproject -u postgres -hs pgdatabase -db exampledb -d /data",
        "-d /data -db=exampledb -hs=pgdatabase -u postgres -pass=backendproject -p5432",
        "--data-dir /data --dbname exampledb --host pgdatabase --user postgres"
        " --password backendproject --port 5432",
    ],
)
def test_challenge_flags_are_not_mistaken_for_each_other(args: str) -> None:
    """-d/-db and -p/-pass share a first letter: each still gets its own value."""
    assert database_parts(args.split()) == CHALLENGE


def test_a_value_glued_to_a_multi_letter_flag_is_read_as_a_short_flag() -> None:
    """As the README warns: `-dbNAME` is `-d bNAME` (write `-db NAME` or `-db=NAME`)."""
    parts = database_parts(["-dbexampledb"])
    assert parts["data_dir_flag"] == Path("bexampledb")
    assert parts["db_name"] is None


async def run_with_challenge_flags(
    settings: Settings, sample_dir: Path, environment_url: str | None
) -> str:
    """``experiment-etl run`` with the take-home's flags; its output, once it succeeded."""
    assert settings.database_url
    env = {"DATABASE_URL": environment_url, "ETL_DB_SCHEMA": settings.db_schema, "ETL_WORKERS": "1"}
    args = ["run", *challenge_args(settings.database_url, sample_dir)]
    result = await asyncio.to_thread(CliRunner().invoke, main, args, env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def test_run_with_the_challenge_flags_loads_the_sample(
    settings: Settings, sample_dir: Path
) -> None:
    output = await run_with_challenge_flags(settings, sample_dir, environment_url=None)
    assert "users 10, experiments 11, compounds 3" in output
    assert await alice_top_compound(settings) == (2, "Compound B", 2)


async def test_the_challenge_flags_win_over_database_url_in_the_environment(
    settings: Settings, sample_dir: Path
) -> None:
    await run_with_challenge_flags(settings, sample_dir, environment_url=DEAD_URL)
    assert [r["status"] for r in await run_rows(settings)] == ["succeeded"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--database-url", DEAD_URL, "-db", "exampledb", "-hs", "pgdatabase"],
            "--database-url cannot be combined with -hs/--host, -db/--dbname: "
            "give either the URL or the separate database flags",
        ),
        (
            ["--database-url", DEAD_URL, "--port", "5432"],
            "--database-url cannot be combined with -p/--port",
        ),
        (["data", "-d", "data"], "give the data directory once: DATA_DIR or -d/--data-dir"),
    ],
)
def test_mixing_the_ways_to_say_one_thing_is_a_usage_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "argv"),
    [
        ([], ["serve"]),
        (["serve"], ["serve"]),
        (["serve", "--port", "9000"], ["serve", "--port", "9000"]),
        (["-d", "/data", "-db", "exampledb"], ["run", "-d", "/data", "-db", "exampledb"]),
        (["--help"], ["run", "--help"]),
        (["show", "--user", "1"], ["show", "--user", "1"]),
        (["run", "/data"], ["run", "/data"]),
    ],
)
def test_entrypoint_arguments_become_a_command_line(args: list[str], argv: list[str]) -> None:
    assert command_line(args) == argv


def entrypoint_env(settings: Settings, **changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return {**env, "ETL_DB_SCHEMA": settings.db_schema or "", "ETL_WORKERS": "1", **changes}


def entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.entrypoint", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_entrypoint_with_the_challenge_flags_runs_once_and_exits_0_or_1(
    settings: Settings, sample_dir: Path
) -> None:
    assert settings.database_url
    args = challenge_args(settings.database_url, sample_dir)
    loaded = await asyncio.to_thread(entrypoint, args, entrypoint_env(settings))
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "users 10, experiments 11, compounds 3" in loaded.stdout
    assert await alice_top_compound(settings) == (2, "Compound B", 2)

    (sample_dir / "compounds.csv").unlink()
    failed = await asyncio.to_thread(entrypoint, args, entrypoint_env(settings))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "compounds.csv: missing file" in failed.stderr
    assert await alice_top_compound(settings) == (2, "Compound B", 2)  # untouched
    assert [r["status"] for r in await run_rows(settings)] == ["succeeded", "failed"]


async def test_entrypoint_without_arguments_serves_until_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = entrypoint_env(
        settings,
        DATABASE_URL=settings.database_url or "",
        ETL_DATA_DIR=str(settings.data_dir),
        ETL_HOST="127.0.0.1",
        ETL_PORT=str(port),
        ETL_API_TOKEN="",
    )
    process = start_process(["service.entrypoint"], env, tmp_path / "serve.log")
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            await until_healthy(client, process)
            async with client.get("/openapi.json") as response:
                assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_run_from_the_command_line_does_not_load_the_web_stack(
    settings: Settings, sample_dir: Path
) -> None:
    """``run`` pays for what it uses: aiohttp (~0.1 s to import) is for ``serve`` and for
    sending webhooks, and none is configured here."""
    script = (
        "import sys\n"
        "from service.cli import main\n"
        f"main(['run', *{challenge_args(settings.database_url or '', sample_dir)!r}],"
        " standalone_mode=False)\n"
        "print('web stack:', sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))\n"
    )
    env = {**os.environ, "ETL_DB_SCHEMA": settings.db_schema or "", "ETL_WORKERS": "1"}
    env.pop("ETL_WEBHOOK_URL", None)
    done = await run_script(script, env)
    assert done.returncode == 0, done.stderr
    assert "users 10, experiments 11, compounds 3" in done.stdout
    assert done.stdout.splitlines()[-1] == "web stack: []"
