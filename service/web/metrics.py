"""Prometheus metrics of one app, in a registry of its own (tests build many apps)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..etl import Pipeline, RunStats
from ..jobs import Runner

__all__ = ["CONTENT_TYPE", "Metrics"]

DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("etl_runs", "Finished runs by final status.", ["status"], registry=r)
        self.duration = Histogram(
            "etl_run_duration_seconds",
            "Wall time of finished runs.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.rows = Counter(
            "etl_rows_processed", "Valid input rows read, per file.", ["file"], registry=r
        )
        self.rejected = Counter("etl_rows_rejected", "Input rows found invalid.", registry=r)
        self.last_success = Gauge(
            "etl_last_success_timestamp_seconds",
            "When the last successful run finished.",
            registry=r,
        )
        self.in_progress = Gauge(
            "etl_run_in_progress", "1 while this process executes a run.", registry=r
        )
        for status in ("succeeded", "failed", "cancelled"):
            self.runs.labels(status=status)
        for name in ("users", "experiments", "compounds"):
            self.rows.labels(file=name)

    def watch(self, runner: Runner) -> None:
        """Count the runner's runs as they finish."""
        runner.on_finish = self._finished
        self.in_progress.set_function(
            lambda: float(runner.task is not None and not runner.task.done())
        )

    def _finished(
        self, status: str, pipeline: Pipeline, stats: RunStats | None, duration: float
    ) -> None:
        self.runs.labels(status=status).inc()
        self.duration.observe(duration)
        for name, count in pipeline.progress.rows_read.items():
            self.rows.labels(file=name).inc(count)
        self.rejected.inc(pipeline.errors.total)
        if status == "succeeded" and not pipeline.options.dry_run:  # a dry run loads nothing
            self.last_success.set_to_current_time()

    def render(self) -> bytes:
        return generate_latest(self.registry)
