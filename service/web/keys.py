"""Everything the app stores, as typed keys: one place to see what a handler can reach."""

from __future__ import annotations

from concurrent.futures import Executor

from aiohttp import web

from ..db.database import Pool
from ..jobs import Runner
from ..settings import Settings
from .metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
POOL: web.AppKey[Pool] = web.AppKey("pool")
EXECUTOR = web.AppKey("executor", Executor)  # a WorkerPool, or a Dask cluster's
RUNNER = web.AppKey("runner", Runner)
METRICS = web.AppKey("metrics", Metrics)

# On a response: the run it concerns, for the access log.
RUN_ID = web.ResponseKey("run_id", int)
