"""Routing rows to partitions: an even spread whatever the ids' pattern, the same
partition for a key in every file, and spill pieces that read back what was written."""

from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.pipeline import spill
from service.pipeline.csvfile import EXPERIMENTS, USERS, ByteRange, plan_file
from service.pipeline.fastpath import experiment_block
from service.pipeline.fields import BIGINT_MAX
from service.pipeline.scan import scan_experiments, scan_users
from service.pipeline.spill import (
    ColumnSpill,
    LineSpill,
    canonical_keys,
    partitions_of,
    read_columns,
    read_lines,
)

N = 50_000
PARTITIONS = (2, 7, 14, 150, 256)
STRIDES = {"multiples of P": 0, "all even": 2, "multiples of 1000": 1000, "stride 1024": 1024}
STRIDES["stride 65536"] = 65536


def patterned(shape: str, partitions: int) -> list[int]:
    if shape in STRIDES:
        stride = STRIDES[shape] or partitions
        return [stride * i for i in range(1, N + 1)]
    if shape == "dense 1..n":
        return list(range(1, N + 1))
    assert shape == "sparse 10-12 digits"
    return random.Random(11).sample(range(10**9, 10**12), N)


def uneven(counts: Sequence[int], partitions: int) -> float:
    """The worst partition's distance from n/P, in standard deviations of a uniform spread.

    A perfect hash is binomial: with n/P = 195 (P = 256) its worst of 256 partitions is
    ~3 sigma (~21%) off, so a fixed +-25% would fail good hashes; 5 sigma is 3.5% of n/P
    at P = 2 and 36% at P = 256, and ``id % P`` misses it by far on strides.
    """
    mean = len(counts) / partitions
    sigma = math.sqrt(mean * (1 - 1 / partitions))
    tally = Counter(counts)
    return max(abs(tally[p] - mean) for p in range(partitions)) / sigma


BOUND = 5.0
SHAPES = [*STRIDES, "dense 1..n", "sparse 10-12 digits"]


@pytest.mark.parametrize("partitions", PARTITIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_patterned_ids_spread_evenly_over_partitions(shape: str, partitions: int) -> None:
    ids = patterned(shape, partitions)
    assert uneven(partitions_of(canonical_keys(ids), partitions), partitions) < BOUND


SHARED_FACTOR = [
    (shape, p) for shape in STRIDES for p in PARTITIONS if math.gcd(STRIDES[shape] or p, p) > 1
]


@pytest.mark.parametrize(("shape", "partitions"), SHARED_FACTOR)
def test_the_bound_catches_id_mod_p_on_strides(shape: str, partitions: int) -> None:
    """The old rule, ``id % P``, on the same ids: a stride sharing a factor with P leaves
    partitions empty (a stride coprime to P it spreads evenly), and the bound says so."""
    ids = patterned(shape, partitions)
    assert uneven([i % partitions for i in ids], partitions) > BOUND


def test_a_key_is_routed_by_its_canonical_text() -> None:
    assert canonical_keys([7, 0, BIGINT_MAX]) == [b"7", b"0", str(BIGINT_MAX).encode()]
    ids = [0, 7, 10, 2**32, BIGINT_MAX]
    fast = experiment_block(b"".join(b"1,\t%d,\t,\t5\n" % i for i in ids))
    assert fast is not None and fast[1] == canonical_keys(ids)
    assert partitions_of(canonical_keys(ids), 1) == [0] * len(ids)


def test_users_and_their_experiments_meet_in_one_partition(tmp_path: Path) -> None:
    """Both scans, fast path and general reader: "007" in users.csv, "7" and "0007" in
    the experiments are the same user, in the same partition."""
    rng = random.Random(5)
    uids = [*rng.sample(range(1, 10**12), 300), 7, BIGINT_MAX]
    spelled = {u: "00" + str(u) if u % 3 == 0 or u == 7 else str(u) for u in uids}
    users = tmp_path / "users.csv"
    users.write_text(
        "user_id,name,email,signup_date\n"
        + "".join(f"{spelled[u]},\tU{u},\tu@x,\td\n" for u in uids),
        encoding="utf-8",
    )
    rows = [(e, rng.choice(uids)) for e in range(1, 3001)]
    rows[:3] = [(1, 7), (2, 7), (3, 7)]
    experiments = tmp_path / "user_experiments.csv"
    experiments.write_text(
        ",".join(EXPERIMENTS.columns)
        + "\n"
        # Most blocks go the fast way; one row with "0007" sends its block the general way.
        + "".join(f"{e},{'0007' if e == 2 else u},1;2,{e % 60}\n" for e, u in rows),
        encoding="utf-8",
    )
    partitions = 14
    results = {}
    for kind, path, spec, task in (
        ("users", users, USERS, scan_users),
        ("experiments", experiments, EXPERIMENTS, scan_experiments),
    ):
        plan = plan_file(path, spec)
        whole = ByteRange(plan.data_offset, plan.size, plan.header_line + 1)
        results[kind] = task(plan, whole, tmp_path, kind, partitions, 4096)
        assert results[kind].errors == []
    placed: list[int] = []
    seen = 0
    for p in range(partitions):
        here = [u for batch in read_columns(results["users"].spills["users"][p]) for u in batch[0]]
        spilled = read_lines(results["experiments"].spills["by_user"][p])
        assert {int(line.split(",")[0]) for line in spilled} <= set(here), p
        placed += here
        seen += len(spilled)
    assert sorted(placed) == sorted(uids)  # each user in one partition
    assert seen == len(rows)


ROWS = st.lists(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 10**6), st.text(max_size=12))),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_spill_pieces_read_back_each_partitions_rows_in_order(
    batches: list[list[tuple[int, int, str]]],
) -> None:
    """Many small pieces per partition (PIECE_BYTES forced small): read back, column
    batches and lines give each partition's rows in the order they were written."""
    partitions = 7
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(spill, "PIECE_BYTES", 40)
        directory = Path(tmp)
        with (
            ColumnSpill(directory, "columns", partitions) as columns,
            LineSpill(directory, "lines", partitions) as lines,
        ):
            for batch in batches:
                parts = [p for p, _, _ in batch]
                columns.write(parts, [n for _, n, _ in batch], [t for _, _, t in batch])
                lines.write_lines(parts, [b"%d,%d" % (n, p) for p, n, _ in batch])
        for written in (columns, lines):
            pieces = sorted((pc for ps in written.pieces for pc in ps), key=lambda pc: pc.offset)
            ends = [0] + [pc.offset + pc.length for pc in pieces]
            assert [pc.offset for pc in pieces] == ends[:-1]  # no gap, no overlap
            assert written.path.stat().st_size == ends[-1]
        for p in range(partitions):
            mine = [(n, t) for batch in batches for q, n, t in batch if q == p]
            back = [
                row
                for ns, ts in read_columns(columns.pieces[p])
                for row in zip(ns, ts, strict=True)
            ]
            assert back == mine
            assert read_lines(lines.pieces[p]) == [f"{n},{p}" for n, _ in mine]
        if sum(map(len, batches)) > 60:
            assert max(map(len, lines.pieces)) > 1  # the forced size took effect
