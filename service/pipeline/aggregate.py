"""Phase 2: turn one partition's users and experiments into result rows.

A partition holds every user with ``user_id % partitions == p`` and all their
experiments, so its counters are complete on their own and memory is bounded by the
partition, never by the whole input. Sorting the spilled lines (they start with the
user id) puts each user's experiments side by side, so there is no Python step per
experiment: columns come from one split, and each user's run times and compounds are
slices, summed and counted in C; counts and means are built column by column, and
only the top compound takes a Python step per user.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from itertools import accumulate, chain, groupby, repeat
from operator import sub
from pathlib import Path
from typing import Any

from .features import (
    AverageRow,
    CountRow,
    FeatureRows,
    TopRow,
    average_experiments,
    average_run_time,
    top_compound,
)
from .spill import Piece, read_columns, read_lines

# Counter's own C counting loop, without Counter.__init__'s Python-level dispatch: one
# small tally per user made that dispatch ~10% of phase 2. It is a private CPython helper
# (there since 3.2), so a plain loop stands in where it is missing.
try:
    from collections import _count_elements as count_into  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover

    def count_into(mapping: dict[Any, int], items: Iterable[Any]) -> None:
        for item in items:
            mapping[item] = mapping.get(item, 0) + 1


def aggregate_partition(
    user_spills: Sequence[Piece],
    experiment_spills: Sequence[Piece],
    total_experiments: int,
    compounds: Mapping[int, tuple[str, str]],
) -> FeatureRows:
    """Result rows of one partition; ``compounds`` maps an id to its name and structure.

    Plain tuples, not ``Compound`` objects: the mapping is pickled for every partition,
    and 10k dataclasses took ~12 ms each way, tuples ~2.5 ms.
    """
    names: dict[int, str] = {}
    for ids, user_names in read_columns(user_spills):
        names.update(zip(ids, user_names, strict=True))
    lines = read_lines(experiment_spills).split("\n")
    lines.pop()
    lines.sort()
    flat = ",".join(lines).split(",") if lines else []
    del lines
    lists, times = flat[1::3], flat[2::3]
    # The lines are sorted, so each user's are one run: counted by comparing neighbours
    # (~5 ms per partition) rather than hashing every user id again (~8 ms).
    uid_texts: list[str] = []
    ns: list[int] = []
    for uid_text, run in groupby(flat[0::3]):
        uid_texts.append(uid_text)
        ns.append(len(list(run)))
    del flat
    # Users with experiments, column by column: counts and means need no Python step.
    uids = list(map(int, uid_texts))
    ends = list(accumulate(ns))
    spans = list(map(slice, chain((0,), ends), ends))
    known = list(map(names.__getitem__, uids))
    shares = map(average_experiments, ns, repeat(total_experiments))
    means = _mean_run_times(times, ends, spans, ns)
    counts: list[CountRow] = list(zip(uids, known, ns, strict=True))
    averages: list[AverageRow] = list(zip(uids, known, shares, means, strict=True))
    idle = sorted(names.keys() - set(uids))
    idle_names = list(map(names.__getitem__, idle))
    counts += zip(idle, idle_names, repeat(0))
    averages += zip(
        idle,
        idle_names,
        repeat(average_experiments(0, total_experiments)),
        repeat(average_run_time((), 0)),
    )
    tops: list[TopRow] = []
    split, semicolons = str.split, repeat(";")
    for uid, span in zip(uids, spans, strict=True):
        # A compound listed twice in one experiment still counts once for it.
        tally: dict[str, int] = {}
        count_into(tally, chain.from_iterable(map(set, map(split, lists[span], semicolons))))
        tally.pop("", None)  # experiments without compounds
        top = top_compound(tally)
        if top is not None:
            cid, count, ties = top
            name, structure = compounds[cid]
            tops.append((uid, cid, name, structure, count, ties))
    return FeatureRows(counts, averages, tops)


EXACT = 2**53  # integers below this are floats exactly


def _mean_run_times(
    times: list[str], ends: list[int], spans: list[slice], ns: list[int]
) -> Iterator[float | None]:
    """Each user's ``average_run_time``; user i's run times are ``times[spans[i]]``.

    Run times are usually whole numbers. Then a user's total, the difference of two
    integer prefix sums, is exact; below 2**53 it is also what ``fsum`` of the floats
    gives, so the rule is applied to that one total instead of to each time. ``json``
    reads the whole column in one C call (~3 ms per 67k, ``int()`` each ~6 ms); a time
    it reads as a float ("1.5") or cannot read ("007") sends the column the plain way.
    """
    try:
        totals = list(accumulate(json.loads(f"[{','.join(times)}]"), initial=0))
    except ValueError:  # not all JSON numbers: "007" and "1." are not ("1.5" reads as a float)
        totals = []
    if totals and type(totals[-1]) is int and totals[-1] < EXACT:
        starts = map(totals.__getitem__, chain((0,), ends))
        sums = map(sub, map(totals.__getitem__, ends), starts)
        return map(average_run_time, zip(sums), ns)
    return map(average_run_time, map(map, repeat(float), map(times.__getitem__, spans)), ns)


def aggregate_spilled(
    user_spills: Sequence[Piece],
    experiment_spills: Sequence[Piece],
    total_experiments: int,
    compounds_file: Path,
) -> FeatureRows:
    """``aggregate_partition`` with the compounds from a pickle file written once per run.

    Each worker process reads the file once per run instead of receiving the mapping
    with every partition task (150 tasks at 10M, ~5 ms of pickling each).
    """
    details = compound_details(compounds_file, compounds_file.stat().st_mtime_ns)
    return aggregate_partition(user_spills, experiment_spills, total_experiments, details)


@lru_cache(maxsize=1)
def compound_details(path: Path, _mtime_ns: int) -> dict[int, tuple[str, str]]:
    with path.open("rb") as f:
        details: dict[int, tuple[str, str]] = pickle.load(f)
    return details


def write_compound_details(path: Path, details: Mapping[int, tuple[str, str]]) -> None:
    with path.open("wb") as f:
        pickle.dump(dict(details), f, protocol=5)
