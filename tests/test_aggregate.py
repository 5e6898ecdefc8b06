"""Phase 2 on hand-made spill files: each partition's checks and results are the rules'.

Spill files are written the way the scans write them (canonical user ids, compound lists
and run times as phase 1 leaves them, line numbers last), in many small flushes
(``BUFFER_BYTES`` forced small), so that a partition has many byte ranges and can be cut
into slices anywhere a real one can.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import re
import tempfile
import tracemalloc
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_bad_input import add_unknown_user_rows
from test_equivalence import loaded, obvious

from service import etl
from service.generate import generate
from service.jobs import run_once
from service.pipeline import spill
from service.pipeline.aggregate import (
    PartitionJob,
    PartitionResult,
    aggregate_partition,
    aggregate_slice,
    check_compounds,
    check_experiment_ids,
    compound_details,
    exact_parts,
    merge_slices,
    write_compound_details,
)
from service.pipeline.csvfile import (
    COMPOUNDS,
    EXPERIMENTS,
    USERS,
    ByteRange,
    FilePlan,
    plan_file,
    scan_plan,
    split_ranges,
)
from service.pipeline.errors import MAX_REPORTED_ERRORS, RowError
from service.pipeline.fields import BIGINT_MAX
from service.pipeline.scan import scan_compounds, scan_experiments
from service.pipeline.spill import ColumnSpill, Extent, LineSpill, partitions_of
from service.settings import Settings

T = TypeVar("T")
Experiment = tuple[int, str, str]  # user id, compound list, run time: as phase 1 spills them


@contextmanager
def scratch(buffer_bytes: int = spill.BUFFER_BYTES) -> Iterator[Path]:
    """A fresh directory for one example's spill files, flushed every ``buffer_bytes``."""
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as tmp:
        patch.setattr(spill, "BUFFER_BYTES", buffer_bytes)
        yield Path(tmp)


def line_extents(directory: Path, name: str, lines: Sequence[str], batch: int = 7) -> list[Extent]:
    """Spill lines to one partition, a few per write like a scan's blocks."""
    with LineSpill(directory, name, 1) as out:
        for i in range(0, len(lines), batch):
            chunk = [t.encode() for t in lines[i : i + batch]]
            out.write_lines([0] * len(chunk), chunk)
    return etl._extents([out.index], 0)


def ranges(extents: Sequence[Extent]) -> int:
    """How many byte ranges these extents hold."""
    return sum(len(e.starts) for e in extents)


def cut(extents: Sequence[Extent], at: Iterable[int]) -> list[list[Extent]]:
    """The byte ranges of ``extents``, in order, cut before each range number in ``at``."""
    runs: list[list[Extent]] = [[]]
    cuts = sorted(set(at))
    done = 0  # byte ranges before ``rest``
    for extent in extents:
        rest = extent
        while cuts and cuts[0] < done + len(rest.starts):
            head, rest = rest.split(cuts.pop(0) - done)
            done += len(head.starts)
            if head.starts:
                runs[-1].append(head)
            runs.append([])
        done += len(rest.starts)
        runs[-1].append(rest)
    return runs + [[] for _ in cuts]  # cuts past the end: empty slices


def plans(directory: Path) -> tuple[FilePlan, FilePlan]:
    """Plans of a users.csv and an experiments file: where errors are reported."""
    found = []
    for spec in (USERS, EXPERIMENTS):
        path = directory / spec.filenames[0]
        path.write_text(",".join(spec.columns) + "\n", encoding="utf-8")
        found.append(plan_file(path, spec))
    return found[0], found[1]


def partition_job(
    directory: Path,
    users: Sequence[tuple[int, str]],
    experiments: Sequence[Experiment],
    compounds: Sequence[int] = (1, 2, 3),
    *,
    lines: Sequence[int] | None = None,
    rejected: frozenset[int] = frozenset(),
    batch: int = 7,
) -> PartitionJob:
    """One user partition: users on lines 2, 3, ...; experiments on ``lines`` (2, 3, ...)."""
    users_plan, experiments_plan = plans(directory)
    compounds_file = directory / "compounds.pkl"
    write_compound_details(compounds_file, {c: (f"name {c}", f"C{c}") for c in compounds})
    with ColumnSpill(directory, "users", 1) as users_spill:
        for i in range(0, len(users), 5):
            chunk = users[i : i + 5]
            numbers = list(range(2 + i, 2 + i + len(chunk)))
            users_spill.write(
                [0] * len(chunk), [u for u, _ in chunk], [n for _, n in chunk], numbers
            )
    where = range(2, 2 + len(experiments)) if lines is None else lines
    texts = [f"{u},{c},{t},{n}" for (u, c, t), n in zip(experiments, where, strict=True)]
    return PartitionJob(
        etl._extents([users_spill.index], 0),
        line_extents(directory, "experiments", texts, batch),
        max(1, len(experiments) - len(rejected)),
        compounds_file,
        users_plan,
        experiments_plan,
        rejected,
    )


def means(result: PartitionResult) -> dict[int, float | None]:
    return {uid: mean for uid, _, _, mean in result.rows.averages}


# Run times as phase 1 leaves them: the fast path's own texts ("007", ".5", "5.", long
# decimals) or the general reader's repr of the float; whole numbers past 2**53 round.
RUN_TIMES = st.one_of(
    st.integers(0, 600).map(str),
    st.integers(0, 600).map(lambda n: f"00{n}"),
    st.integers(2**53 - 4, 2**53 + 4).map(str),
    st.integers(0, 99999).map(lambda n: f"{n // 100}.{n % 100:02d}"),
    st.floats(0, 1e6, allow_nan=False).map(repr),
    st.floats(1e290, 1e300).map(repr),
    st.sampled_from([".5", "5.", "0.1", "9" * 300, "0." + "3" * 298, "1e300", "5e-324"]),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), RUN_TIMES), max_size=30))
@example([(1, str(2**53 + 1))] * 3 + [(2, "1e300"), (2, "1"), (2, "1e300")])
def test_mean_run_times_equal_fsum_of_the_floats(rows: list[tuple[int, str]]) -> None:
    with scratch() as directory:
        users = [(u, f"user {u}") for u in range(1, 6)]
        result = aggregate_partition(
            partition_job(directory, users, [(u, "1", t) for u, t in rows])
        )
    mine = {uid: [float(t) for u, t in rows if u == uid] for uid in range(1, 6)}
    assert means(result) == {u: math.fsum(ts) / len(ts) if ts else None for u, ts in mine.items()}


def test_rounded_floats_are_summed_as_floats() -> None:
    """Three times 2**53 + 1: as floats each is 2**53, so fsum's mean is 2**53 exactly."""
    with scratch() as directory:
        job = partition_job(directory, [(1, "a")], [(1, "1", str(2**53 + 1))] * 3)
        result = aggregate_partition(job)
    assert result.rows.averages == [(1, "a", 1.0, float(2**53))]


def test_run_times_whose_sum_is_past_float_range_still_have_a_mean() -> None:
    with scratch() as directory:
        job = partition_job(directory, [(1, "a")], [(1, "1", "1e308")] * 2)
        result = aggregate_partition(job)
    assert result.rows.averages == [(1, "a", 1.0, 1e308)]


FLOATS = st.one_of(
    st.floats(-1e300, 1e300, allow_nan=False),
    st.floats(-1e-300, 1e-300, allow_nan=False),
    st.sampled_from([1e300, -1e300, 1.0, -1.0, 2.0**53, 0.1, 5e-324, -5e-324, 1e16]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(FLOATS, max_size=40), st.lists(FLOATS, max_size=40))
@example([1e300, 1.0, -1e300], [])
@example([1e16, 1.0], [1e16, 1.0])
@example([2.0**53, 1.0], [1.0])
def test_exact_parts_keep_the_exact_sum(a: list[float], b: list[float]) -> None:
    """fsum of the parts is fsum of the values, for one slice and for two together."""
    parts = exact_parts(a)
    assert math.fsum(parts) == math.fsum(a)
    assert math.fsum(parts + exact_parts(b)) == math.fsum(a + b)
    assert len(parts) <= 40  # each part is below half an ulp of the one before it
    assert 0.0 not in parts


NAMES = st.text("abcé ", max_size=5)
Partition = tuple[list[tuple[int, str]], list[Experiment], frozenset[int], list[int]]


@st.composite
def partitions(draw: st.DrawFn) -> Partition:
    """Users (a few repeated), experiments (half of them one hot user's, some of unknown
    users or with unknown compounds), the lines an experiment-id check rejected."""
    uids = draw(
        st.lists(st.integers(0, 10**14) | st.just(BIGINT_MAX), min_size=1, max_size=8, unique=True)
    )
    users = [(u, draw(NAMES)) for u in uids]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(users)))
        users.insert(at, (draw(st.sampled_from(uids)), "again"))
    compounds = draw(st.lists(st.integers(1, 12), min_size=1, max_size=5, unique=True))
    listed = st.lists(st.sampled_from(compounds) | st.integers(100, 101), max_size=4)
    experiments = []
    for _ in range(draw(st.integers(0, 60))):
        user = draw(st.sampled_from([uids[0], uids[0], *uids, 10**15]))  # 10**15: unknown
        ids = draw(listed.filter(lambda ids: 100 not in ids) if draw(st.booleans()) else listed)
        experiments.append((user, ";".join(map(str, ids)), draw(RUN_TIMES)))
    lines = range(2, 2 + len(experiments))
    rejected = draw(
        st.frozensets(st.sampled_from(lines), max_size=3) if lines else st.just(frozenset())
    )
    return users, experiments, rejected, compounds


def obvious_rows(
    users: Sequence[tuple[int, str]],
    experiments: Sequence[Experiment],
    rejected: frozenset[int],
    compounds: Sequence[int],
    total: int,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The rules, row by row: the first row of a user id wins; an experiment counts when
    its line was not rejected, its user is known and every compound it lists is."""
    names: dict[int, str] = {}
    for uid, name in users:
        names.setdefault(uid, name)
    kept: dict[int, list[tuple[set[int], float]]] = {uid: [] for uid in names}
    for line, (uid, listed, time) in enumerate(experiments, start=2):
        ids = {int(c) for c in listed.split(";") if c}
        if line not in rejected and uid in names and ids <= set(compounds):
            kept[uid].append((ids, float(time)))
    counts, averages, tops = [], [], []
    for uid, mine in sorted(kept.items()):
        counts.append((uid, names[uid], len(mine)))
        mean = math.fsum(t for _, t in mine) / len(mine) if mine else None
        averages.append((uid, names[uid], len(mine) / total, mean))
        tally = Counter(c for ids, _ in mine for c in ids)
        if tally:
            best = max(tally.values())
            winners = sorted(c for c, n in tally.items() if n == best)
            tops.append(
                (uid, winners[0], f"name {winners[0]}", f"C{winners[0]}", best, len(winners))
            )
    return counts, averages, tops


def by_user(result: PartitionResult) -> tuple[list[Any], list[Any], list[Any]]:
    rows = result.rows
    return sorted(rows.counts), sorted(rows.averages, key=first), sorted(rows.tops)


def first(row: tuple[Any, ...]) -> Any:
    return row[0]


def summary(result: PartitionResult) -> tuple[Any, ...]:
    return (by_user(result), result.users, result.experiments, result.rejected)


def in_slices(job: PartitionJob, cuts: Iterable[int]) -> PartitionResult:
    """The partition cut before each of these byte ranges, its slices aggregated and merged."""
    slices = cut(job.experiments, cuts)
    assert len(slices) == len(set(cuts)) + 1
    states = [aggregate_slice(dataclasses.replace(job, experiments=s)) for s in slices]
    return merge_slices(job, states)


@settings(max_examples=60, deadline=None)
@given(partitions(), st.data())
def test_slices_merge_into_the_whole_partitions_rows_and_errors(
    partition: Partition, data: st.DataObject
) -> None:
    users, experiments, rejected, compounds = partition
    with scratch(buffer_bytes=50) as directory:
        job = partition_job(directory, users, experiments, compounds, rejected=rejected, batch=3)
        whole = aggregate_partition(job)
        last = max(1, ranges(job.experiments) - 1)
        merged = in_slices(job, data.draw(st.sets(st.integers(1, last))))
    assert by_user(whole) == obvious_rows(
        users, experiments, rejected, compounds, job.total_experiments
    )
    assert summary(merged) == summary(whole)
    assert (merged.log.errors, merged.log.total) == (whole.log.errors, whole.log.total)
    kept = sum(n for _, _, n in whole.rows.counts)
    assert whole.experiments == kept == len(experiments) - len(rejected) - whole.rejected
    assert whole.log.total == whole.rejected + len(users) - len({u for u, _ in users})


EXPERIMENTS_CSV = EXPERIMENTS.filenames[0]


def error(file: str, line: int, column: int, field: str, message: str) -> RowError:
    return RowError(file, line, column, message, field)


def test_a_repeated_user_id_rejects_the_later_line_naming_the_first() -> None:
    with scratch() as directory:
        users = [(5, "Ann"), (6, "Bob"), (5, "Ann again")]
        result = aggregate_partition(partition_job(directory, users, [(5, "1", "10")]))
    message = "duplicate user_id 5 (first on line 2)"
    assert result.log.errors == [error("users.csv", 4, 1, "user_id", message)]
    assert result.rows.counts == [(5, "Ann", 1), (6, "Bob", 0)]
    assert result.users == 2


def test_unknown_users_are_rejected_where_they_appear() -> None:
    with scratch() as directory:
        experiments = [(5, "1", "10"), (9, "1", "20"), (9, "", "30")]
        result = aggregate_partition(partition_job(directory, [(5, "Ann")], experiments))
    message = "unknown user_id 9 (not in users.csv)"
    assert result.log.errors == [
        error(EXPERIMENTS_CSV, line, 2, "user_id", message) for line in (3, 4)
    ]
    assert (result.rejected, result.experiments, result.rows.counts) == (2, 1, [(5, "Ann", 1)])


def test_an_unknown_compound_is_named_first_of_its_list() -> None:
    with scratch() as directory:
        experiments = [(5, "1;77;88", "10"), (5, "88;1", "5"), (5, "2;1;2", "7")]
        result = aggregate_partition(partition_job(directory, [(5, "Ann")], experiments))
    assert result.log.errors == [
        error(
            EXPERIMENTS_CSV,
            line,
            3,
            "experiment_compound_ids",
            f"unknown compound_id {c} (not in compounds.csv)",
        )
        for line, c in ((2, 77), (3, 88))
    ]
    assert result.rows.averages == [(5, "Ann", 1 / 3, 7.0)]
    assert result.rows.tops == [(5, 1, "name 1", "C1", 1, 2)]


def id_scans(
    directory: Path, eids: Sequence[int], lines: Sequence[int]
) -> tuple[list[tuple[Extent, ByteRange]], FilePlan]:
    """An experiment-id partition as the check gets it: the id spill of each scan of an
    experiments file holding ``eids[i]`` on line ``lines[i]``, with the range the scan
    read; the scans come last range first, as the workers may finish them."""
    by_line = dict(zip(lines, eids, strict=True))
    rows = [f"{by_line[n]},5,1,1" for n in sorted(by_line)]
    assert sorted(by_line) == list(range(2, 2 + len(rows)))
    path = directory / EXPERIMENTS.filenames[0]
    path.write_text("\n".join([",".join(EXPERIMENTS.columns), *rows]) + "\n", encoding="utf-8")
    plan = scan_plan(plan_file(path, EXPERIMENTS, block=16), 16)
    scans = []
    for i, part in enumerate(split_ranges(plan, 24)):
        found = scan_experiments(plan, part, directory, f"scan{i}", 1)
        extent = found.spills["by_id"].extent(0)
        if extent is not None:
            scans.append((extent, part))
    assert len(scans) > 1 or len(rows) < 6
    return scans[::-1], plan


def test_each_compound_partition_holds_its_compounds_and_finds_missing_references() -> None:
    """A partitioned catalogue: every compound is in exactly one partition's details, the
    one its id hashes to; a repeated id keeps its first row and is reported with it; each
    partition names the referenced ids it lacks."""
    with scratch(buffer_bytes=50) as directory:
        cids = [1, 2, 3, 10, 2**40, 77, 2, BIGINT_MAX]  # lines 2-9: 2 again on line 8
        path = directory / "compounds.csv"
        rows = "".join(f"{c},name {c} {n},C{c}\n" for n, c in enumerate(cids, 2))
        path.write_text(",".join(COMPOUNDS.columns) + "\n" + rows, encoding="utf-8")
        plan = scan_plan(plan_file(path, COMPOUNDS, block=16), 16)
        ranges = list(split_ranges(plan, 40))
        assert len(ranges) > 1
        scans = [scan_compounds(plan, r, directory, f"c{i}", 3) for i, r in enumerate(ranges)]
        wanted = [b"1", b"10", b"99", b"5", b"%d" % BIGINT_MAX]
        with LineSpill(directory, "refs", 3) as refs:
            refs.write_lines(partitions_of(wanted, 3), wanted)
        details: dict[int, tuple[str, str]] = {}
        missing: set[bytes] = set()
        errors = []
        for c in range(3):
            held = [e for scan in scans if (e := scan.spills["compounds"].extent(c))]
            asked = [e for e in [refs.index.extent(c)] if e is not None]
            check = check_compounds(held, asked, plan, directory / f"details{c}.pkl")
            part = compound_details(directory / f"details{c}.pkl")
            assert partitions_of([b"%d" % k for k in part], 3) == [c] * len(part)
            assert check.kept == len(part) and not details.keys() & part.keys()
            details |= part
            missing |= check.unknown
            errors += [(e.line, e.message) for e in check.log.errors]
        assert details == {c: (f"name {c} {n}", f"C{c}") for n, c in enumerate(cids[:6], 2)} | {
            BIGINT_MAX: (f"name {BIGINT_MAX} 9", f"C{BIGINT_MAX}")
        }
        assert missing == {b"99", b"5"}
        assert errors == [(8, "duplicate compound_id 2 (first on line 3)")]


def test_lines_the_id_check_rejects_are_left_out_of_the_partition() -> None:
    with scratch(buffer_bytes=20) as directory:
        eids = [123, 7, 123, 8, 7]  # lines 2..6
        experiments = [(5, "1", "10"), (5, "2", "20"), (6, "3", "30"), (6, "3", "40"), (5, "", "1")]
        check = check_experiment_ids(*id_scans(directory, eids, range(2, 7)))
        job = partition_job(
            directory, [(5, "Ann"), (6, "Bob")], experiments, rejected=frozenset(check.rejected)
        )
        result = aggregate_partition(job)
    assert check.log.errors == [
        error(
            EXPERIMENTS_CSV, 4, 1, "experiment_id", "duplicate experiment_id 123 (first on line 2)"
        ),
        error(
            EXPERIMENTS_CSV, 6, 1, "experiment_id", "duplicate experiment_id 7 (first on line 3)"
        ),
    ]
    assert sorted(check.rejected) == [4, 6]
    assert result.rows.counts == [(5, "Ann", 2), (6, "Bob", 1)]
    assert means(result) == {5: 15.0, 6: 40.0}
    assert (result.log.total, result.rejected) == (0, 0)


def expected_repeats(eids: Sequence[int], lines: Sequence[int]) -> list[tuple[int, int, int]]:
    """(line, id, first line) of every occurrence of an id after its first, by line."""
    first: dict[int, int] = {}
    repeats = []
    for line, eid in sorted(zip(lines, eids, strict=True)):
        if first.setdefault(eid, line) != line:
            repeats.append((line, eid, first[eid]))
    return repeats


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 9) | st.integers(BIGINT_MAX - 1, BIGINT_MAX), max_size=40), st.randoms()
)
def test_every_repeated_experiment_id_names_its_first_line(
    eids: list[int], rng: random.Random
) -> None:
    """Lines in any order in the spill (scans of several ranges): the first is by line."""
    lines = list(range(2, 2 + len(eids)))
    rng.shuffle(lines)
    with scratch(buffer_bytes=20) as directory:
        check = check_experiment_ids(*id_scans(directory, eids, lines))
    repeats = expected_repeats(eids, lines)
    assert [(e.line, e.column, e.message) for e in check.log.errors] == [
        (line, 1, f"duplicate experiment_id {eid} (first on line {first})")
        for line, eid, first in repeats
    ]
    assert sorted(check.rejected) == [line for line, _, _ in repeats]
    assert check.log.total == len(repeats)


def test_the_first_hundred_errors_are_the_smallest_lines_and_the_total_counts_all() -> None:
    rng = random.Random(3)
    lines = list(range(2, 402))
    rng.shuffle(lines)  # written out of line order, as several ranges' scans may
    with scratch(buffer_bytes=100) as directory:
        check = check_experiment_ids(*id_scans(directory, [1] * 400, lines))
        experiments = [(9 if n % 2 else 5, "1", "1") for n in lines]  # 200 of user 9: unknown
        job = partition_job(directory, [(5, "Ann")], experiments, lines=lines)
        whole = aggregate_partition(job)
        quarter = ranges(job.experiments) // 4
        assert quarter > 5
        # Small slices, then one with more than a hundred errors of its own.
        merged = in_slices(job, [*range(1, quarter, 3), quarter])
    assert [e.line for e in check.log.errors] == list(range(3, 3 + MAX_REPORTED_ERRORS))
    assert check.log.total == 399
    odd = [n for n in range(2, 402) if n % 2][:MAX_REPORTED_ERRORS]
    for result in (whole, merged):
        assert [e.line for e in result.log.errors] == odd
        assert (result.log.total, result.rejected) == (200, 200)


async def test_a_partitions_errors_are_kept_file_by_file(
    settings: Settings, sample_dir: Path
) -> None:
    users = sample_dir / USERS.filenames[0]
    extra = "".join(f"\n{100 + i},\tU{i},\tu{i}@x.org,\t2024-01-01" for i in range(300))
    users.write_text(users.read_text().rstrip("\n") + extra + "\n1,\tAgain,\ta@x.org,\t2024-01-01")
    add_unknown_user_rows(sample_dir, 150)
    run = await run_once(dataclasses.replace(settings, partitions=1), sample_dir)
    assert run["error_total"] == 151
    assert run["errors"][0]["file"] == "users.csv"
    assert run["errors"][0]["message"] == "duplicate user_id 1 (first on line 3)"


def traced_peak(task: Callable[..., T], *args: Any) -> tuple[T, int]:
    """A call's result and the peak of the memory it allocated (tracemalloc, this process)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = task(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


CATALOGUE = range(100_000, 1_000_000, 397)  # 6-digit catalogue numbers


def random_experiments(rng: random.Random, uids: Sequence[int], count: int) -> list[Experiment]:
    """Experiments of the sparse shape: catalogue compound ids, decimal run times."""
    return [
        (
            rng.choice(uids),
            ";".join(map(str, rng.sample(CATALOGUE, rng.randint(0, 3)))),
            f"{rng.randint(0, 99_999) / 100}",
        )
        for _ in range(count)
    ]


def spilled_bytes(extents: Sequence[Extent]) -> int:
    return sum(e.size for e in extents)


def test_a_hot_user_does_not_grow_a_tasks_peak_memory() -> None:
    """Peak memory follows a task's bytes, never one user's share of them.

    The yardstick is a partition of 10 experiments a user: a slice that is all one
    user's experiments, and every task of a partition ten times as large (most of it one
    user's) split by the pipeline's ``_slices``, peak within 1.5x of it byte for byte,
    where that partition aggregated whole peaks past 4.5x. (Byte for byte: ``_slices``
    makes runs of at least its size, up to a byte range (a flush) more, and a short tail
    joins the last run, so a slice may hold up to ~1.7x the size asked for.)
    """
    rng = random.Random(7)
    users = [(u, f"user {u}") for u in rng.sample(range(10**9, 10**10), 600)]
    hot, others = users[0][0], [u for u, _ in users[1:301]]  # 300 idle users too
    normal_rows = random_experiments(rng, others, 3000)
    with scratch(buffer_bytes=16 << 10) as directory:
        for sub in ("normal", "hot", "big"):
            (directory / sub).mkdir()
        normal = partition_job(directory / "normal", users, normal_rows, CATALOGUE, batch=200)
        size = spilled_bytes(normal.experiments)
        aggregate_partition(normal)  # loads the compounds: not part of a task's own peak
        _, normal_peak = traced_peak(aggregate_partition, normal)

        def bound(extents: Sequence[Extent]) -> float:
            return 1.5 * normal_peak * max(1.0, spilled_bytes(extents) / size)

        hot_rows = random_experiments(rng, [hot], 3000)
        hot_slice = partition_job(directory / "hot", users, hot_rows, batch=200)
        hot_slice = dataclasses.replace(hot_slice, compounds_file=normal.compounds_file)
        assert 0.9 < spilled_bytes(hot_slice.experiments) / size < 1.1
        _, peak = traced_peak(aggregate_slice, hot_slice)
        assert peak < bound(hot_slice.experiments)

        big_rows = normal_rows + random_experiments(rng, [hot], 27_000)
        rng.shuffle(big_rows)
        big = partition_job(directory / "big", users, big_rows, batch=200)
        big = dataclasses.replace(big, compounds_file=normal.compounds_file)
        slices = etl._slices(big.experiments, size)
        assert len(slices) >= 8
        states = []
        for extents in slices:
            assert spilled_bytes(extents) < 2 * size
            part = dataclasses.replace(big, experiments=extents)
            state, peak = traced_peak(aggregate_slice, part)
            assert peak < bound(extents)
            states.append(state)
        _, peak = traced_peak(merge_slices, big, states)
        assert peak < bound(())
        _, whole_peak = traced_peak(aggregate_partition, big)
        assert whole_peak > 3 * bound(())


def byte_ranges(extents: Iterable[Extent]) -> list[tuple[Path, int, int]]:
    return [
        (e.path, start, end) for e in extents for start, end in zip(e.starts, e.ends, strict=True)
    ]


def file_extents(files: Sequence[Sequence[int]]) -> list[Extent]:
    """One partition's extents in several spill files: byte ranges of these lengths, with
    other partitions' bytes between them."""
    extents = []
    for i, lengths in enumerate(files):
        starts, ends = array("q"), array("q")
        at = 3 * i
        for n in lengths:
            starts.append(at)
            ends.append(at + n)
            at += n + 11
        extents.append(Extent(f"spill-{i}", starts, ends))
    return extents


# A partition's byte ranges in each file: some may be empty (a flush held none of its
# rows), never all of one file's (SpillIndex.extent gives None then).
FILE_RANGES = st.lists(st.integers(0, 100), min_size=1, max_size=12).filter(any)


@settings(max_examples=200, deadline=None)
@given(st.lists(FILE_RANGES, max_size=5), st.integers(1, 300))
@example([[10] * 7], 30)  # runs of 30, 30 and 10: the 10 goes with the run before it
@example([[10] * 3], 20)  # runs of 20 and 10
@example([[10] * 5, [10] * 4], 20)  # a run across two files; 10 left over
def test_slices_hold_every_byte_range_once_in_order(files: list[list[int]], size: int) -> None:
    """Runs cut between byte ranges: every range once, in order; each run but the last of
    at least ``size`` bytes and under ``size`` before its last range; a last run of at
    least half of ``size`` (a shorter one joins the run before)."""
    extents = file_extents(files)
    slices = etl._slices(extents, size)
    assert byte_ranges(e for run in slices for e in run) == byte_ranges(extents)
    assert all(slices[:-1]) and (len(slices) == 1 or slices[-1])
    assert all(e.starts for run in slices for e in run)  # no empty extent in a task
    for run in slices[:-1]:
        lengths = [end - start for _, start, end in byte_ranges(run)]
        assert sum(lengths) >= size
        assert sum(lengths) - lengths[-1] < size
    assert len(slices) == 1 or spilled_bytes(slices[-1]) >= size // 2


async def test_a_split_partition_gives_the_rules_results(
    settings: Settings, sample_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One user with 60% of the experiments; small flushes, any partition past twice the
    average split: the loaded tables are the obvious reading's."""
    generate(sample_dir, users=300, experiments=3000, compounds=40, seed=1)
    path = sample_dir / EXPERIMENTS_CSV
    rng = random.Random(1)
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    hot = [re.sub(r",\t\d+,", ",\t1,", row, count=1) if rng.random() < 0.6 else row for row in rows]
    path.write_text("\n".join([header, *hot]) + "\n", encoding="utf-8")
    monkeypatch.setattr(etl, "MIN_SLICE_BYTES", 1)
    monkeypatch.setattr(spill, "BUFFER_BYTES", 100)
    tuned = dataclasses.replace(settings, partitions=8, chunk_bytes=1000)
    run = await run_once(tuned, sample_dir)
    assert run["status"] == "succeeded", run
    assert await loaded(tuned) == obvious(sample_dir)
