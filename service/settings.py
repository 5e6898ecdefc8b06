"""One settings object, read once from the environment (and CLI flags), passed down."""

from __future__ import annotations

import math
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
    "ETL_DB_TIMEOUT": "seconds a database call may go without an answer (default 60)",
    "ETL_REJECTS_KEEP": "runs whose rejected rows are kept for download (default 20)",
    "ETL_WEBHOOK_URL": "URL that receives a POST when a run ends",
    "ETL_WEBHOOK_SECRET": "key of the HMAC-SHA256 signature of webhook bodies",
    "ETL_WEBHOOK_ALLOW": "comma-separated hosts a run's callback_url may name",
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
    compound_partitions: int | None = None  # 1: the catalogue is broadcast to every task
    chunk_bytes: int = 8 * 1024 * 1024
    upload_timeout: float = 300.0
    lock_timeout: float = 5.0
    db_timeout: float = 60.0  # a statement, or a COPY without progress, fails after this
    reap_interval: float = 30.0  # how often a server looks for runs of dead replicas
    rejects_keep: int = 20
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_allow: tuple[str, ...] = ()
    webhook_attempts: int = 5
    webhook_backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    webhook_timeout: float = 10.0
    zip_max_ratio: float = 200.0  # decompressed / compressed size of one zip member

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

        def get_float(name: str, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
            return value

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
            db_timeout=get_float("ETL_DB_TIMEOUT", base.db_timeout),
            rejects_keep=max(1, get_int("ETL_REJECTS_KEEP", base.rejects_keep)),
            webhook_url=get("ETL_WEBHOOK_URL"),
            webhook_secret=get("ETL_WEBHOOK_SECRET"),
            webhook_allow=tuple(
                host.strip().lower()
                for host in (get("ETL_WEBHOOK_ALLOW") or "").split(",")
                if host.strip()
            ),
            dask_scheduler=get("ETL_DASK_SCHEDULER"),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """Apply CLI flags on top of the environment; None means "flag not given"."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
