"""Experiment ranges scanned before users.csv is read: references are checked afterwards.

A range that names a user missing from users.csv is scanned again with the user ids
known, so errors and results match a single sequential scan exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from test_equivalence import loaded, obvious

from service import etl
from service.generate import generate
from service.jobs import run_once
from service.pipeline.fields import IdSet, any_overlap
from service.settings import Settings


@pytest.fixture
def with_strangers(settings: Settings) -> Path:
    """Generated files where a few experiments, in different ranges, name unknown users."""
    directory = settings.tmp_dir.parent / "strangers"
    generate(directory, users=200, experiments=2000, compounds=30, seed=11)
    path = directory / "user_experiments.csv"
    lines = path.read_text(encoding="utf-8").split("\n")
    for at, user in ((300, 7777), (1500, 8888)):
        fields = lines[at].split(",\t")
        lines[at] = ",\t".join([fields[0], str(user), *fields[2:]])
    path.write_text("\n".join(lines), encoding="utf-8")
    return directory


async def _run(
    settings: Settings, directory: Path, range_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    monkeypatch.setattr(etl, "RANGE_BYTES", range_bytes)
    return await run_once(settings, directory, etl.RunOptions(on_error="skip"))


@pytest.mark.parametrize("workers", [1, 2])
async def test_unknown_users_in_early_ranges_are_reported_like_one_scan(
    settings: Settings, with_strangers: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    tuned = dataclasses.replace(settings, workers=workers, partitions=3, chunk_bytes=2048)
    whole = await _run(tuned, with_strangers, 1 << 30, monkeypatch)
    assert whole["status"] == "succeeded", whole
    expected = await loaded(tuned)
    split = await _run(tuned, with_strangers, 4000, monkeypatch)
    assert split["status"] == "succeeded", split
    assert split["errors"] == whole["errors"]
    assert [e["line"] for e in split["errors"]] == [301, 1501]
    assert await loaded(tuned) == expected
    assert split["stats"]["experiments"] == whole["stats"]["experiments"] == 1998


async def test_abort_reports_unknown_users_from_any_range(
    settings: Settings, with_strangers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etl, "RANGE_BYTES", 4000)
    tuned = dataclasses.replace(settings, workers=2, partitions=3)
    run = await run_once(tuned, with_strangers)
    assert run["status"] == "failed"
    assert "unknown user_id 7777" in run["errors"][0]["message"]


async def test_ranges_without_strangers_match_obvious(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = settings.tmp_dir.parent / "plain"
    generate(directory, users=100, experiments=1500, compounds=20, seed=5)
    monkeypatch.setattr(etl, "RANGE_BYTES", 3000)
    tuned = dataclasses.replace(settings, workers=2, partitions=4)
    run = await run_once(tuned, directory)
    assert run["status"] == "succeeded", run
    assert await loaded(tuned) == obvious(directory)


def test_id_spans_compare_only_where_bands_meet() -> None:
    low, high, far = IdSet.of(range(10, 20)), IdSet.of(range(20, 30)), IdSet.of([2**40, 5])
    assert not any_overlap([low.span(), high.span(), far.span()])
    assert any_overlap([low.span(), IdSet.of([19, 500]).span()])
    assert any_overlap([far.span(), IdSet.of([2**40]).span()])
    assert any_overlap([high.span(), IdSet().span(), IdSet.of([25]).span()])


def test_covers_checks_dense_and_sparse_ids() -> None:
    users = IdSet.of([*range(1, 50), 2**40])
    assert users.covers(IdSet.of([3, 4, 49]).span())
    assert users.covers(IdSet.of([2**40, 7]).span())
    assert users.covers(IdSet().span())
    assert not users.covers(IdSet.of([3, 50]).span())
    assert not users.covers(IdSet.of([60_000]).span())
    assert not users.covers(IdSet.of([2**41]).span())
