"""Routing rows to partitions: an even spread whatever the ids' pattern, the same
partition for a key in every file, and spill files whose index reads back what was written."""

from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service import etl
from service.pipeline import spill
from service.pipeline.csvfile import EXPERIMENTS, USERS, ByteRange, plan_file
from service.pipeline.fastpath import experiment_block
from service.pipeline.fields import BIGINT_MAX
from service.pipeline.scan import scan_experiments, scan_users
from service.pipeline.spill import (
    ColumnSpill,
    LineSpill,
    SpillIndex,
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
        users_index = results["users"].spills["users"]
        here = [u for batch in read_columns(etl._extents([users_index], p)) for u in batch[0]]
        spilled = read_lines(etl._extents([results["experiments"].spills["by_user"]], p))
        assert {int(line.split(b",")[0]) for line in spilled} <= set(here), p
        placed += here
        seen += len(spilled)
    assert sorted(placed) == sorted(uids)  # each user in one partition
    assert seen == len(rows)


Batch = list[tuple[int, int, str]]  # (partition, number, text) rows of one write
ROWS = st.lists(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 10**6), st.text(max_size=12))),
    max_size=12,
)


def spill_batches(
    directory: Path, prefix: str, partitions: int, batches: list[Batch]
) -> tuple[SpillIndex, SpillIndex]:
    """Each batch written as a scan writes a block: numbers and texts as column batches,
    ``number,partition`` as lines. The two files' indexes."""
    with (
        ColumnSpill(directory, f"{prefix}columns", partitions) as columns,
        LineSpill(directory, f"{prefix}lines", partitions) as lines,
    ):
        for batch in batches:
            parts = [p for p, _, _ in batch]
            columns.write(parts, [n for _, n, _ in batch], [t for _, _, t in batch])
            lines.write_lines(parts, [b"%d,%d" % (n, p) for p, n, _ in batch])
    return columns.index, lines.index


def assert_read_back(
    columns: list[SpillIndex], lines: list[SpillIndex], batches: list[Batch], partitions: int
) -> None:
    """Each partition's rows, over all the spill files in order, read back in write order."""
    for p in range(partitions):
        mine = [(n, t) for batch in batches for q, n, t in batch if q == p]
        back = [
            row
            for ns, ts in read_columns(etl._extents(columns, p))
            for row in zip(ns, ts, strict=True)
        ]
        assert back == mine, p
        assert read_lines(etl._extents(lines, p)) == [b"%d,%d" % (n, p) for n, _ in mine], p


def assert_flushed_at(
    buffer_bytes: int, columns: SpillIndex, lines: SpillIndex, batches: list[Batch]
) -> None:
    """A spill writes out when its buffers hold ``buffer_bytes``, not before (but at the
    end), and not much after: under ``buffer_bytes`` plus one write's bytes."""
    for index in (columns, lines):
        assert all(size >= buffer_bytes for size in flush_sizes(index)[:-1])
    largest = max((len(b"".join(b"%d,%d\n" % (n, p) for p, n, _ in b)) for b in batches), default=0)
    assert all(size < buffer_bytes + largest for size in flush_sizes(lines))


def flush_sizes(index: SpillIndex) -> list[int]:
    offsets, n = index.offsets, index.partitions
    return [offsets[i + n] - offsets[i] for i in range(0, len(offsets) - 1, n)]


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_a_spill_index_covers_its_file_and_reads_back_each_partitions_rows_in_order(
    batches: list[Batch],
) -> None:
    """Many flushes per file (BUFFER_BYTES forced small): the index's offsets run from 0
    to the file's size without going back, a partition per flush, and column batches and
    lines read back each partition's rows in the order they were written."""
    partitions = 7
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(spill, "BUFFER_BYTES", 40)
        columns, lines = spill_batches(Path(tmp), "", partitions, batches)
        for index in (columns, lines):
            offsets = list(index.offsets)
            assert offsets[0] == 0
            assert offsets == sorted(offsets)  # no gap, no overlap: each range ends where
            assert offsets[-1] == index.path.stat().st_size  # the next one starts
            assert len(offsets) % partitions == 1  # whole flushes, then the end
        assert_read_back([columns], [lines], batches, partitions)
        assert_flushed_at(40, columns, lines, batches)


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 9).flatmap(
        lambda partitions: st.tuples(
            st.just(partitions),
            st.lists(
                st.lists(
                    st.lists(
                        st.tuples(
                            st.integers(0, partitions - 1), st.integers(0, 10**6), st.text("ab")
                        ),
                        max_size=9,
                    ),
                    max_size=6,
                ),
                min_size=1,
                max_size=3,
            ),
        )
    ),
    st.integers(1, 400),
)
@example((1, [[[(0, 5, "a")] * 3] * 4]), 1)
@example((3, [[[(2, 1, "")]], [], [[(0, 2, "b"), (2, 3, "")]]]), 10**6)
def test_extents_of_several_scans_read_back_each_partitions_rows_in_write_order(
    scans: tuple[int, list[list[Batch]]], buffer_bytes: int
) -> None:
    """Random partitions, rows and BUFFER_BYTES, a spill file per scan: a partition's
    extents over the scans (``etl._extents``) read back its rows in write order, and
    ``etl._sizes`` is the sum of their sizes (every byte of every file, over all)."""
    partitions, batches_by_scan = scans
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(spill, "BUFFER_BYTES", buffer_bytes)
        written = [
            spill_batches(Path(tmp), f"scan{i}-", partitions, batches)
            for i, batches in enumerate(batches_by_scan)
        ]
        columns, lines = [c for c, _ in written], [li for _, li in written]
        every_batch = [batch for batches in batches_by_scan for batch in batches]
        assert_read_back(columns, lines, every_batch, partitions)
        for (column_index, line_index), batches in zip(written, batches_by_scan, strict=True):
            assert_flushed_at(buffer_bytes, column_index, line_index, batches)
        for indexes in (columns, lines):
            sizes = etl._sizes(indexes, partitions)
            assert sizes == [
                sum(e.size for e in etl._extents(indexes, p)) for p in range(partitions)
            ]
            assert sum(sizes) == sum(index.path.stat().st_size for index in indexes)
            for p in range(partitions):
                assert all(e.size > 0 for e in etl._extents(indexes, p))  # None, not empty
