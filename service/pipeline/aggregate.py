"""Phase 2: every check that needs more than one row, and the aggregation, per partition.

A user partition holds every user row and every experiment row whose user id hashes to
it, so the duplicate-user check, the experiment -> user and experiment -> compound
references and each user's counters are complete on their own: memory is bounded by the
partition, never by the whole input. An experiment-id partition does the same for
duplicate experiment ids (``check_experiment_ids``), before aggregation, so that the
rows it rejects are left out of it; its spill holds the ids alone, and only a repeated
id sends the check back to the ranges that hold it for its lines.

Sorting a partition's spilled lines (they start with the user id) puts each user's
experiments side by side, so there is no Python step per experiment: columns come from
one split, each user's run times and compounds are slices, summed and counted in C, and
only the top compound takes a Python step per user.

The compounds are a dimension table. A catalogue of a few MB is broadcast: every task
reads it whole, to check references and to name each user's top compound. A larger one
is partitioned by compound id like everything else (an external hash join): a check per
compound partition finds its duplicates and the referenced ids it lacks, phase 2 rejects
the rows that name those, and the top-compound rows are spilled by compound partition
and named there (``join_tops``).

A partition larger than a task should be (one user with a third of all experiments
makes one) is split into slices of its spilled bytes, each aggregated on its own into an exact
partial state, then merged: no task holds more than a slice, whoever the user.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate, chain, compress, groupby, repeat
from pathlib import Path
from typing import Any

from .csvfile import ByteRange, FilePlan
from .errors import MAX_REPORTED_ERRORS, ErrorLog, FileOrder, RowError
from .features import (
    FeatureRows,
    average_experiments,
    average_run_time,
    top_compound,
)
from .scan import experiment_columns, field_error
from .spill import (
    ColumnSpill,
    Extent,
    SpillIndex,
    canonical_keys,
    partitions_of,
    read_columns,
    read_lines,
)

# Counter's own C counting loop, without Counter.__init__'s Python-level dispatch: one
# small tally per user made that dispatch ~10% of phase 2. It is a private CPython helper
# (there since 3.2), so a plain loop stands in where it is missing.
try:
    from collections import _count_elements as count_into  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover

    def count_into(mapping: dict[Any, int], items: Iterable[Any]) -> None:
        for item in items:
            mapping[item] = mapping.get(item, 0) + 1


@dataclass
class Checked:
    """Errors a task found: the first ones by line, and how many in all."""

    log: ErrorLog = field(default_factory=ErrorLog)

    def keep(self, found: Iterable[RowError]) -> None:
        errors = list(found)
        self.log.extend(errors, len(errors))


def later_occurrences(ids: Sequence[Any], lines: Sequence[int]) -> Iterator[tuple[Any, int, int]]:
    """(id, line, line of its first occurrence) for every occurrence but the first."""
    if len(set(ids)) == len(ids):
        return
    first: dict[Any, int] = {}
    for i in sorted(range(len(ids)), key=lines.__getitem__):
        seen = first.setdefault(ids[i], lines[i])
        if seen != lines[i]:
            yield ids[i], lines[i], seen


@dataclass
class IdCheck(Checked):
    """Duplicate experiment ids in one experiment-id partition."""

    rejected: list[int] = field(default_factory=list)  # lines of the later occurrences


def check_experiment_ids(
    scans: Sequence[tuple[Extent, ByteRange]],
    plan: FilePlan,
    keep: int = MAX_REPORTED_ERRORS,
    block: int = 8 << 20,
) -> IdCheck:
    """Find repeated experiment ids; each later occurrence names the line of the first.

    ``scans``: this id partition's spill in each scan, with the range that scan read.
    The spills hold ids alone; where one repeats, the ranges whose spill holds it are
    read again for its lines (an error's cost, not every run's).
    """
    per_scan = [read_lines([extent]) for extent, _ in scans]
    eids = list(chain.from_iterable(per_scan))
    result = IdCheck(ErrorLog(keep))
    if len(set(eids)) == len(eids):
        return result
    tally: dict[bytes, int] = {}
    count_into(tally, eids)
    repeated = {eid for eid, n in tally.items() if n > 1}
    ids: list[bytes] = []
    lines: list[int] = []
    for (_, part), spilled in zip(scans, per_scan, strict=True):
        if repeated.isdisjoint(spilled):
            continue
        for columns, numbers in experiment_columns(plan, part, block, ErrorLog(0)):
            hits = list(map(repeated.__contains__, columns[0]))
            ids += compress(columns[0], hits)
            lines += compress(numbers, hits)
    repeats = list(later_occurrences([int(eid) for eid in ids], lines))
    result.rejected = [line for _, line, _ in repeats]
    result.keep(
        field_error(
            plan, line, "experiment_id", f"duplicate experiment_id {eid} (first on line {first})"
        )
        for eid, line, first in repeats
    )
    return result


@dataclass
class CompoundCheck(Checked):
    """One compound partition: its compounds kept, and the ids referenced but missing."""

    kept: int = 0
    unknown: frozenset[bytes] = frozenset()


def check_compounds(
    compounds: Sequence[Extent],
    referenced: Sequence[Extent],
    plan: FilePlan,
    details_file: Path,
    keep: int = MAX_REPORTED_ERRORS,
) -> CompoundCheck:
    """Find repeated compound ids (the first row is kept), write the partition's details
    for phase 2, and the ids the experiments reference that it does not hold."""
    cids, names, structures, lines = _columns(compounds, 4)
    result = CompoundCheck(ErrorLog(keep))
    repeats = list(later_occurrences(cids, lines))
    later = {line for _, line, _ in repeats}
    result.keep(
        field_error(
            plan, line, "compound_id", f"duplicate compound_id {cid} (first on line {first})"
        )
        for cid, line, first in repeats
    )
    details = {
        cid: (name, structure)
        for cid, name, structure, line in zip(cids, names, structures, lines, strict=True)
        if line not in later
    }
    write_compound_details(details_file, details)
    result.kept = len(details)
    if referenced:
        wanted = set(read_lines(referenced))
        result.unknown = frozenset(wanted.difference(canonical_keys(list(details))))
    return result


@dataclass(frozen=True)
class CompoundSplit:
    """A partitioned catalogue, as one partition's task sees it."""

    partitions: int
    unknown: frozenset[bytes]  # referenced compound ids that no partition holds
    tops: Path  # where this task spills its top-compound rows, by compound partition


@dataclass(frozen=True)
class PartitionJob:
    """One user partition (or a slice of its experiments) and what checking it needs."""

    users: Sequence[Extent]
    experiments: Sequence[Extent]
    total_experiments: int  # valid experiments in the whole input: the share's divisor
    compounds_file: Path | None  # the whole catalogue's details, when it is broadcast
    users_plan: FilePlan
    experiments_plan: FilePlan
    rejected: frozenset[int] = frozenset()  # experiment lines already rejected
    keep: int = MAX_REPORTED_ERRORS  # errors kept (skip mode keeps every rejected row)
    split: CompoundSplit | None = None  # a partitioned catalogue (compounds_file is None)

    def error_log(self) -> ErrorLog:
        """Users' errors before the experiments', as the run reports them."""
        files = (self.users_plan.name, self.experiments_plan.name)
        return ErrorLog(self.keep, FileOrder(files))


@dataclass
class PartitionResult(Checked):
    rows: FeatureRows = field(default_factory=FeatureRows)
    users: int = 0  # users kept
    experiments: int = 0  # experiments kept
    rejected: int = 0  # experiments rejected here (unknown user or compound)
    tops: SpillIndex | None = None  # a partitioned catalogue: the top rows, unnamed


@dataclass
class SliceResult(Checked):
    """A slice's exact partial state: user id text -> [count, run-time parts, tally]."""

    state: dict[bytes, tuple[int, list[float], dict[bytes, int]]] = field(default_factory=dict)
    experiments: int = 0
    rejected: int = 0


class _Groups:
    """A partition's experiment lines, sorted and grouped by user, with bad rows out."""

    def __init__(self, job: PartitionJob, names: Mapping[int, str], checked: Checked) -> None:
        known = _References(job)
        self.rejected = 0
        left_out = job.rejected
        while True:
            self._group(_lines(job, left_out))
            bad = self._bad_rows(job.experiments_plan, names, known)
            if not bad:
                return
            # Rare: leave the bad rows out and group again.
            checked.keep(bad.values())
            self.rejected += len(bad)
            left_out = left_out | frozenset(bad)

    def _group(self, lines: list[bytes]) -> None:
        """Group the lines, emptying the list: a partition's lines are not kept beside
        their fields (a hot user's slice of 140k lines: ~12 MB less at the peak)."""
        lines.sort()
        text = b",".join(lines)
        lines.clear()
        flat = text.split(b",") if text else []
        del text
        self.lists, self.times, self.lines = flat[1::4], flat[2::4], flat[3::4]
        self.keys: list[bytes] = []
        self.ns: list[int] = []
        for key, run in groupby(flat[0::4]):
            self.keys.append(key)
            self.ns.append(len(list(run)))
        ends = list(accumulate(self.ns))
        self.spans = list(map(slice, chain((0,), ends), ends))
        self.uids = list(map(int, self.keys))
        self.tallies = list(map(self._tally, self.spans))

    def _tally(self, span: slice) -> dict[bytes, int]:
        # A compound listed twice in one experiment still counts once for it.
        tally: dict[bytes, int] = {}
        count_into(
            tally, chain.from_iterable(map(set, map(bytes.split, self.lists[span], repeat(b";"))))
        )
        tally.pop(b"", None)  # experiments without compounds
        return tally

    def _bad_rows(
        self, plan: FilePlan, names: Mapping[int, str], known: _References
    ) -> dict[int, RowError]:
        bad: dict[int, RowError] = {}
        for uid, span in zip(self.uids, self.spans, strict=True):
            if uid not in names:
                message = f"unknown user_id {uid} (not in users.csv)"
                for line in map(int, self.lines[span]):
                    bad[line] = field_error(plan, line, "user_id", message)
        if known.hold(chain.from_iterable(self.tallies)):
            return bad
        for uid, span, tally in zip(self.uids, self.spans, self.tallies, strict=True):
            if uid in names and not known.hold(tally):
                for listed, line in zip(self.lists[span], map(int, self.lines[span]), strict=True):
                    missing = next((c for c in listed.split(b";") if c and known.lacks(c)), None)
                    if missing is not None:
                        message = f"unknown compound_id {missing.decode()} (not in compounds.csv)"
                        bad[line] = field_error(plan, line, "experiment_compound_ids", message)
        return bad

    def run_times(self) -> Iterator[Iterable[float]]:
        """Each user's run times, as floats."""
        floats = list(map(float, self.times))
        return map(floats.__getitem__, self.spans)


class _References:
    """Which compound ids exist: the broadcast catalogue's, or all but those the
    partitioned check found missing."""

    def __init__(self, job: PartitionJob) -> None:
        self.known = None if job.compounds_file is None else _known_compounds(job.compounds_file)
        self.unknown = job.split.unknown if job.split is not None else frozenset()

    def hold(self, ids: Iterable[bytes]) -> bool:
        if self.known is not None:
            return self.known.issuperset(ids)
        return self.unknown.isdisjoint(ids)

    def lacks(self, cid: bytes) -> bool:
        return cid not in self.known if self.known is not None else cid in self.unknown


def _lines(job: PartitionJob, left_out: frozenset[int]) -> list[bytes]:
    """The partition's spilled experiment lines but those on the lines ``left_out``."""
    lines = read_lines(job.experiments)
    if left_out:
        return [ln for ln in lines if int(ln.rpartition(b",")[2]) not in left_out]
    return lines


def _users(job: PartitionJob, checked: Checked | None) -> dict[int, str]:
    """The partition's users by id; a repeated id keeps its first row."""
    uids, names, lines = _columns(job.users, 3)
    repeats = list(later_occurrences(uids, lines))
    if not repeats:
        return dict(zip(uids, names, strict=True))
    if checked is not None:
        plan = job.users_plan
        checked.keep(
            field_error(plan, line, "user_id", f"duplicate user_id {uid} (first on line {first})")
            for uid, line, first in repeats
        )
    later = {line for _, line, _ in repeats}
    return {u: n for u, n, ln in zip(uids, names, lines, strict=True) if ln not in later}


def _columns(extents: Sequence[Extent], width: int) -> list[list[Any]]:
    """The ``width`` columns a :class:`ColumnSpill` wrote to these extents, each whole."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for batch in read_columns(extents):
        for column, part in zip(columns, batch, strict=True):
            column += part
    return columns


def aggregate_partition(job: PartitionJob) -> PartitionResult:
    """Check one whole user partition and compute its result rows."""
    result = PartitionResult(log=job.error_log())
    names = _users(job, result)
    groups = _Groups(job, names, result)
    result.rows = _rows(
        names, groups.uids, groups.ns, groups.run_times(), groups.tallies, job, result
    )
    result.rejected = groups.rejected
    return result


def aggregate_slice(job: PartitionJob) -> SliceResult:
    """Check a slice of a user partition's experiments into an exact partial state."""
    result = SliceResult(log=job.error_log())
    names = _users(job, None)  # the merge reports the users' own errors, once
    groups = _Groups(job, names, result)
    for key, n, times, tally in zip(
        groups.keys, groups.ns, groups.run_times(), groups.tallies, strict=True
    ):
        result.state[key] = (n, exact_parts(times), tally)
    result.experiments = sum(groups.ns)
    result.rejected = groups.rejected
    return result


def fold_slice(into: SliceResult, part: SliceResult) -> SliceResult:
    """``into`` with ``part``'s state added (``part`` stays as it came).

    Slices are folded one by one as they finish, so a split partition never holds
    more than one merged state and the slice being added.
    """
    into.log.extend(part.log.errors, part.log.total)
    into.rejected += part.rejected
    into.experiments += part.experiments
    state = into.state
    for key, (n, parts, tally) in part.state.items():
        mine = state.get(key)
        if mine is None:
            state[key] = (n, list(parts), dict(tally))
            continue
        total_n, all_parts, all_tally = mine
        for compound, count in tally.items():
            all_tally[compound] = all_tally.get(compound, 0) + count
        joined = all_parts + parts
        state[key] = (total_n + n, exact_parts(joined) if len(joined) > 16 else joined, all_tally)
    return into


def merge_slices(job: PartitionJob, slices: Sequence[SliceResult]) -> PartitionResult:
    """The result rows of a split partition from its slices' partial states."""
    result = PartitionResult(log=job.error_log())
    names = _users(job, result)
    merged = SliceResult(log=job.error_log())
    for part in slices:
        fold_slice(merged, part)
    result.log.extend(merged.log.errors, merged.log.total)
    result.rejected = merged.rejected
    keys = sorted(merged.state)
    states = list(map(merged.state.__getitem__, keys))
    result.rows = _rows(
        names,
        list(map(int, keys)),
        [s[0] for s in states],
        [s[1] for s in states],
        [s[2] for s in states],
        job,
        result,
    )
    return result


def exact_parts(values: Iterable[float]) -> list[float]:
    """Floats whose exact sum is the exact sum of ``values`` (a few, however many values).

    ``fsum`` rounds the exact sum once; what it rounded off is again an exact sum of
    floats, taken the same way until nothing is left. ``fsum`` of the parts, of parts
    of several slices together, is then exactly ``fsum`` of all the values. Where the
    sum is past the float range (run times near 1e308), the values stand for themselves.
    """
    items = list(values)
    parts: list[float] = []
    try:
        while (total := math.fsum(items)) != 0.0:
            parts.append(total)
            items.append(-total)
    except OverflowError:  # a sum past the float range: the values are their own parts
        return items[: len(items) - len(parts)]
    return parts


def _rows(
    names: Mapping[int, str],
    uids: list[int],
    ns: list[int],
    run_times: Iterable[Iterable[float]],
    tallies: Iterable[dict[bytes, int]],
    job: PartitionJob,
    result: PartitionResult,
) -> FeatureRows:
    """Result rows: users with experiments column by column, then the idle users."""
    total = job.total_experiments
    idle = sorted(names.keys() - set(uids))
    everyone = uids + idle
    shares = list(map(average_experiments, ns, repeat(total)))
    shares += repeat(average_experiments(0, total), len(idle))
    means = list(map(average_run_time, run_times, ns))
    means += repeat(average_run_time((), 0), len(idle))
    found = zip(uids, map(top_compound, tallies), strict=True)
    # (user, compound, experiments, ties) as columns; () when no user has a compound.
    unnamed = tuple(map(list, zip(*[(uid, *top) for uid, top in found if top], strict=True)))
    top_columns: tuple[list[Any], ...] = ()
    if job.split is not None:  # named where their compounds' partitions are (join_tops)
        result.tops = _spill_tops(job.split, unnamed)
    elif job.compounds_file is not None and unnamed:
        top_columns = _named(compound_details(job.compounds_file), *unnamed)
    result.users = len(names)
    result.experiments = sum(ns)
    return FeatureRows(
        everyone,
        list(map(names.__getitem__, everyone)),
        ns + [0] * len(idle),
        shares,
        means,
        top_columns,
    )


def _spill_tops(split: CompoundSplit, columns: tuple[list[Any], ...]) -> SpillIndex:
    """The top-compound columns (user, compound, experiments, ties) by their compound's
    partition."""
    with ColumnSpill(split.tops.parent, split.tops.name, split.partitions) as spill:
        if columns:
            spill.write(partitions_of(canonical_keys(columns[1]), split.partitions), *columns)
    return spill.index


def join_tops(details_file: Path, tops: Sequence[Extent]) -> tuple[list[Any], ...]:
    """The top-compound rows spilled to one compound partition, named from its details."""
    uids, cids, counts, ties = _columns(tops, 4)
    if not uids:
        return ()
    return _named(_read_details(details_file), uids, cids, counts, ties)


def _named(
    details: Mapping[int, tuple[str, str]],
    uids: list[int],
    cids: list[int],
    counts: list[int],
    ties: list[int],
) -> tuple[list[Any], ...]:
    """Top-compound columns (user, compound, experiments, ties), with each compound's
    name and structure: the top-compound table's columns."""
    found = list(map(details.__getitem__, cids))
    return uids, cids, [d[0] for d in found], [d[1] for d in found], counts, ties


def write_compound_details(path: Path, details: Mapping[int, tuple[str, str]]) -> None:
    """The compounds for phase 2, written once per run and read once per worker."""
    with path.open("wb") as f:
        pickle.dump(dict(details), f, protocol=5)


def compound_details(path: Path) -> dict[int, tuple[str, str]]:
    return _load_details(path, path.stat().st_mtime_ns)


def _known_compounds(path: Path) -> frozenset[bytes]:
    return _known(path, path.stat().st_mtime_ns)


@lru_cache(maxsize=1)
def _load_details(path: Path, _mtime_ns: int) -> dict[int, tuple[str, str]]:
    """A broadcast catalogue's details, read once per worker and run."""
    return _read_details(path)


def _read_details(path: Path) -> dict[int, tuple[str, str]]:
    with path.open("rb") as f:
        details: dict[int, tuple[str, str]] = pickle.load(f)
    return details


@lru_cache(maxsize=1)
def _known(path: Path, mtime_ns: int) -> frozenset[bytes]:
    return frozenset(b"%d" % cid for cid in _load_details(path, mtime_ns))
