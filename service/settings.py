"""One settings object, read once from the environment (and CLI flags), passed down."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import platformdirs

GIB = 1024**3

# Every environment variable the application reads, with its meaning; the README and the
# compose file are checked against this table.
ENV_VARS: dict[str, str] = {
    "DATABASE_URL": "PostgreSQL URL; unset means the embedded PostgreSQL",
    "ETL_DATA_DIR": "directory holding the input CSVs (default ./data)",
    "ETL_API_TOKEN": "bearer token required by the API when set",
    "ETL_MAX_UPLOAD_BYTES": "upload size limit in bytes (default 1 GiB)",
    "ETL_HOST": "address the server binds (default 127.0.0.1)",
    "ETL_PORT": "port the server listens on (default 8080)",
    "ETL_LOG_LEVEL": "logging level (default INFO)",
    "ETL_TMP_DIR": "directory for spill and upload files (default: system temp)",
    "ETL_EMBEDDED_DIR": "data directory of the embedded PostgreSQL",
    "ETL_WORKERS": "worker processes for parsing and aggregating (default: CPU count)",
    "ETL_DB_SCHEMA": "PostgreSQL schema holding the tables (default: the server's search_path)",
    "ETL_DASK_SCHEDULER": "Dask scheduler address (tcp://HOST:PORT); unset means local processes",
}


def default_embedded_dir() -> Path:
    return Path(platformdirs.user_data_dir("experiment-etl")) / "pgdata"


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    data_dir: Path = Path("data")
    api_token: str | None = None
    max_upload_bytes: int = GIB
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "INFO"
    tmp_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    embedded_dir: Path = field(default_factory=default_embedded_dir)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    db_schema: str | None = None
    dask_scheduler: str | None = None
    # Tuning knobs for tests and benchmarks: None means "chosen from the input size".
    partitions: int | None = None
    chunk_bytes: int = 8 * 1024 * 1024
    upload_timeout: float = 300.0
    lock_timeout: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        base = cls()

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def get_int(name: str, default: int) -> int:
            raw = get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {raw!r}") from None

        return cls(
            database_url=get("DATABASE_URL"),
            data_dir=Path(get("ETL_DATA_DIR") or base.data_dir),
            api_token=get("ETL_API_TOKEN"),
            max_upload_bytes=get_int("ETL_MAX_UPLOAD_BYTES", base.max_upload_bytes),
            host=get("ETL_HOST") or base.host,
            port=get_int("ETL_PORT", base.port),
            log_level=(get("ETL_LOG_LEVEL") or base.log_level).upper(),
            tmp_dir=Path(get("ETL_TMP_DIR") or base.tmp_dir),
            embedded_dir=Path(get("ETL_EMBEDDED_DIR") or base.embedded_dir),
            workers=max(1, get_int("ETL_WORKERS", base.workers)),
            db_schema=get("ETL_DB_SCHEMA"),
            dask_scheduler=get("ETL_DASK_SCHEDULER"),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """Apply CLI flags on top of the environment; None means "flag not given"."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
