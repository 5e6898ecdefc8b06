"""The challenge's sample data gives exactly the documented values."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from badinput import connect

from service.jobs import run_once
from service.settings import Settings


async def fetch_table(settings: Settings, table: str) -> dict[int, asyncpg.Record]:
    async with connect(settings) as conn:
        return {r["user_id"]: r for r in await conn.fetch(f"SELECT * FROM {table}")}


async def test_sample_data_gives_documented_features(settings: Settings, sample_dir: Path) -> None:
    run = await run_once(settings, sample_dir)
    assert run["status"] == "succeeded", run
    stats = run["stats"]
    assert (stats["users"], stats["experiments"], stats["compounds"]) == (10, 11, 3)
    assert stats["global_average"] == pytest.approx(1.1)

    counts = await fetch_table(settings, "experiment_counts")
    assert {uid: r["experiment_count"] for uid, r in counts.items()} == {
        1: 2,
        **{uid: 1 for uid in range(2, 11)},
    }
    assert counts[1]["name"] == "Alice"

    averages = await fetch_table(settings, "experiment_averages")
    assert averages[1]["average_experiments"] == 2 / 11
    assert all(averages[uid]["average_experiments"] == 1 / 11 for uid in range(2, 11))
    assert averages[1]["average_run_time"] == 12.5
    assert averages[10]["average_run_time"] == 60.0

    tops = await fetch_table(settings, "top_compounds")
    alice = tops[1]
    assert (alice["compound_id"], alice["compound_name"], alice["experiment_count"]) == (
        2,
        "Compound B",
        2,
    )
    assert alice["tie_count"] == 1
    assert alice["compound_structure"] == "C21H30O2"
    # Everyone else ran one experiment with two compounds: a tie, broken to the lower id.
    assert (tops[4]["compound_id"], tops[4]["tie_count"]) == (1, 3)
    assert (tops[5]["compound_id"], tops[5]["tie_count"]) == (2, 2)
    assert (tops[2]["compound_id"], tops[2]["tie_count"]) == (1, 2)
    assert (tops[3]["compound_id"], tops[3]["tie_count"]) == (2, 2)
