"""The aiohttp application: ``create_app(settings)`` and the resources it owns.

Each resource is one ``cleanup_ctx`` entry, set up in order and torn down in reverse:
the database pool, the executor the pipeline's CPU work runs in, and the runner (whose
teardown cancels the active run, which rolls back and is recorded ``cancelled``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..cluster import open_executor
from ..db import sql
from ..db.database import keep_embedded_up, open_pool
from ..faults import background_faults
from ..jobs import RECORD_PATIENCE, Runner
from ..recovery import bootstrap, reap_forever
from ..settings import Settings
from . import pages
from .auth import bearer_auth
from .errors import problem_middleware
from .handlers import routes
from .keys import EXECUTOR, METRICS, POOL, RUNNER, SETTINGS
from .metrics import Metrics

log = logging.getLogger(__name__)

# Seconds in-flight requests get at shutdown; cancelling the active run follows, and
# the whole stop has to fit in the 10 s orchestrators usually allow.
SHUTDOWN_TIMEOUT = 3.0
# Seconds start-up waits for the database before serving anyway (then /readyz says 503).
STARTUP_WAIT = 3.0


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Middleware] = [problem_middleware, *pages.middlewares(settings)]
    if settings.api_token:
        middlewares.append(bearer_auth(settings.api_token))
    # Bodies stay as sent: a Content-Encoding other than identity is refused (415), so a
    # small compressed body can never inflate past the upload limits.
    app = web.Application(middlewares=middlewares, handler_args={"auto_decompress": False})
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend((database, executor, runner))
    app.on_startup.append(announce)
    app.add_routes(routes)
    pages.setup(app)
    return app


async def database(app: web.Application) -> AsyncIterator[None]:
    asyncio.get_running_loop().set_exception_handler(background_faults)
    settings = app[SETTINGS]
    # Lazy: the server starts (and /healthz answers) while the database is down.
    async with open_pool(settings, lazy=True) as pool:
        app[POOL] = pool
        keeper = None
        if not settings.database_url:
            keeper = asyncio.create_task(keep_embedded_up(settings, pool), name="embedded")
        yield
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)


async def executor(app: web.Application) -> AsyncIterator[None]:
    app[EXECUTOR] = await asyncio.to_thread(open_executor, app[SETTINGS], keep_trying=True)
    yield
    await asyncio.to_thread(app[EXECUTOR].shutdown, wait=True, cancel_futures=True)


async def runner(app: web.Application) -> AsyncIterator[None]:
    job_runner = Runner(app[POOL], app[EXECUTOR], app[SETTINGS])
    job_runner.record_patience = RECORD_PATIENCE  # a restarted database gets the run's end
    app[METRICS].watch(job_runner)
    app[RUNNER] = job_runner
    # Schema and crash recovery wait for the database in the background; until then
    # POST /runs and /readyz answer 503.
    starting = asyncio.create_task(start_runner(app), name="bootstrap")
    # Runs of replicas that died are marked failed while this one lives, not only at
    # the next start of one.
    reaper = asyncio.create_task(
        reap_forever(job_runner, app[SETTINGS].reap_interval), name="reaper"
    )
    # A database that answers makes the server ready before it accepts requests.
    await asyncio.wait({starting}, timeout=STARTUP_WAIT)
    yield
    for task in (starting, reaper):
        task.cancel()
    await asyncio.gather(starting, reaper, return_exceptions=True)
    log.info("stopping: the active run, if any, is cancelled", extra={"event": "stop"})
    await job_runner.close()


async def start_runner(app: web.Application) -> None:
    await bootstrap(app[RUNNER])
    last = await app[POOL].fetchrow(sql.LAST_SUCCESS)
    if last is not None:
        app[METRICS].last_success.set(last["finished_at"].timestamp())


async def announce(app: web.Application) -> None:
    settings = app[SETTINGS]
    log.info("serving", extra={"event": "start", "host": settings.host, "port": settings.port})
    if not settings.api_token:
        log.warning(
            "the API is unauthenticated: set ETL_API_TOKEN before exposing it",
            extra={"event": "start", "host": settings.host},
        )
