"""The streaming, partitioned pipeline gives exactly what a tiny obvious version gives.

Hypothesis writes small valid datasets with the exports' quirks (comma plus tab, blanks
around fields, leading zeros, repeated compounds in one list, ties, idle users) and
both implementations' three tables are compared value for value.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service import etl
from service.db import sql
from service.jobs import run_once
from service.settings import Settings

Tables = dict[str, dict[int, tuple[Any, ...]]]


def obvious(directory: Path) -> Tables:
    """The straightforward reading of the rules: csv.reader and dicts, nothing clever."""

    def rows(name: str) -> list[dict[str, str]]:
        # csv honours a quote at a field's start: the tab the exports put before it goes.
        text = (directory / name).read_text(encoding="utf-8").replace(',\t"', ',"')
        reader = csv.reader(io.StringIO(text, newline=""))
        table = [[c.strip() for c in r] for r in reader if "".join(r).strip()]
        return [dict(zip([h.lower() for h in table[0]], r, strict=True)) for r in table[1:]]

    users = {int(r["user_id"]): r["name"] for r in rows("users.csv")}
    compounds = {int(r["compound_id"]): r for r in rows("compounds.csv")}
    experiments = rows("user_experiments.csv")
    times: defaultdict[int, list[float]] = defaultdict(list)
    tally: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for r in experiments:
        uid = int(r["user_id"])
        times[uid].append(float(r["experiment_run_time"]))
        listed = r["experiment_compound_ids"]
        tally[uid].update({int(c) for c in listed.split(";")} if listed else set())
    counts, averages, tops = {}, {}, {}
    for uid, name in users.items():
        mine = times[uid]
        counts[uid] = (uid, name, len(mine))
        share = len(mine) / len(experiments) if experiments else 0.0
        averages[uid] = (uid, name, share, math.fsum(mine) / len(mine) if mine else None)
        if tally[uid]:
            best = max(tally[uid].values())
            winners = sorted(c for c, n in tally[uid].items() if n == best)
            c = compounds[winners[0]]
            tops[uid] = (uid, winners[0], c["compound_name"], c["compound_structure"], best)
            tops[uid] += (len(winners),)
    return {"experiment_counts": counts, "experiment_averages": averages, "top_compounds": tops}


async def loaded(settings: Settings) -> Tables:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )
    try:
        tables: Tables = {}
        for table, columns in sql.RESULT_TABLES.items():
            records = await conn.fetch(f"SELECT {', '.join(columns)} FROM {table}")
            tables[table] = {r["user_id"]: tuple(r) for r in records}
        return tables
    finally:
        await conn.close()


SEP = ",\t"
blank = st.sampled_from(["", " ", "\t", "  ", " \t "])
names = st.text(alphabet="abcXYZ é-.", max_size=8)
ids = st.integers(0, 60) | st.integers(2**26, 2**63 - 1)  # dense, and sparse up to bigint max


@st.composite
def datasets(draw: st.DrawFn) -> dict[str, str]:
    """Three valid CSV files' text, keyed by file name: the exports' quirks, ids up to
    2**63-1, rows in any order, quoted names, quoted experiment fields that may hold
    line ends, decimal run times, a hot user."""

    def field(value: object) -> str:
        return f"{draw(blank)}{value}{draw(blank)}"

    def id_text(value: int) -> str:
        return "0" * draw(st.integers(0, 2)) + str(value)  # "007" names user 7

    def write(header: list[str], lines: list[list[str]]) -> str:
        end = draw(st.sampled_from(["\n", "\r\n"]))
        text = end * draw(st.integers(0, 1)) + SEP.join(header)
        text += "".join(end + SEP.join(line) for line in lines)
        return text + draw(st.sampled_from(["", end, end * 2]))

    def name() -> str:
        """Sometimes quoted, holding a comma (an export's "Smith, Alice") and maybe a line
        end: a byte range of users.csv or compounds.csv may start inside one."""
        plain = draw(names)
        if not draw(st.booleans()):
            return field(plain)
        return f'"{plain},{draw(st.sampled_from(["", "", chr(10), chr(13) + chr(10)]))} Q"'

    # Some exports quote the experiments' fields too, and a quoted field may hold a line
    # end (stripped with the field): a byte range may start inside one.
    quoting = draw(st.booleans())

    def experiment_field(value: object) -> str:
        if not (quoting and draw(st.booleans())):
            return field(value)
        line_end = draw(st.sampled_from(["", "\n", "\r\n\n"]))
        return f'"{draw(blank)}{value}{line_end}"'

    user_ids = draw(st.lists(ids, min_size=1, max_size=12, unique=True))
    compound_ids = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    experiment_ids = draw(st.lists(ids, max_size=40, unique=True))
    users = [
        [field(id_text(u)), name(), field(f"u{u}@x.org"), field("2023-01-01")] for u in user_ids
    ]
    compounds = [[field(c), name(), field(f"C{c}H{draw(ids)}")] for c in compound_ids]
    experiments = []
    for e in experiment_ids:
        listed = draw(st.lists(st.sampled_from(compound_ids), max_size=5))
        run_time = draw(
            st.integers(0, 600).map(id_text)
            | st.integers(2**52, 2**60)
            | st.floats(0, 1e6, allow_nan=False)
            | st.integers(0, 60000).map(lambda n: f"{n // 100}.{n % 100:02d}")  # "60.18"
        )
        experiments.append(
            [
                experiment_field(id_text(e)),
                # Half of all experiments, or so, go to one hot user.
                experiment_field(
                    id_text(user_ids[0] if draw(st.booleans()) else draw(st.sampled_from(user_ids)))
                ),
                experiment_field(";".join(f"{draw(blank)}{id_text(c)}" for c in listed)),
                experiment_field(repr(run_time) if isinstance(run_time, float) else run_time),
            ]
        )
    return {
        "users.csv": write(["user_id", "name", "email", "signup_date"], users),
        "compounds.csv": write(["compound_id", "compound_name", "compound_structure"], compounds),
        "user_experiments.csv": write(
            ["experiment_id", "user_id", "experiment_compound_ids", "experiment_run_time"],
            experiments,
        ),
    }


examples = itertools.count()


async def check_equivalent(settings: Settings, files: dict[str, str]) -> None:
    directory = settings.tmp_dir.parent / f"input-{next(examples)}"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8", newline="")
    run = await run_once(settings, directory)
    assert run["status"] == "succeeded", run
    assert await loaded(settings) == obvious(directory)
    assert list(settings.tmp_dir.iterdir()) == []  # spill files are gone


fixture_ok = hsettings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fixture_ok
@given(files=datasets())
async def test_pipeline_matches_obvious_implementation(
    settings: Settings, files: dict[str, str]
) -> None:
    await check_equivalent(settings, files)


@fixture_ok
@given(files=datasets())
async def test_partitioned_parallel_pipeline_matches_obvious_implementation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]
) -> None:
    """Several byte ranges, partitions and worker processes on inputs of a few lines; a
    partition past twice the average (the hot user's) is aggregated in slices."""
    monkeypatch.setattr(etl, "RANGE_BYTES", 128)
    monkeypatch.setattr(etl, "MIN_SLICE_BYTES", 1)
    forced = dataclasses.replace(settings, partitions=6, workers=2, chunk_bytes=256)
    await check_equivalent(forced, files)


@fixture_ok
@given(files=datasets())
async def test_partitioned_catalogue_matches_obvious_implementation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]
) -> None:
    """The compounds in partitions (a large catalogue's path): the references checked and
    the top compounds named per compound partition, over several ranges and workers."""
    monkeypatch.setattr(etl, "RANGE_BYTES", 128)
    forced = dataclasses.replace(
        settings, partitions=4, compound_partitions=3, workers=2, chunk_bytes=256
    )
    await check_equivalent(forced, files)
