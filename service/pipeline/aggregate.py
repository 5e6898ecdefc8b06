"""Phase 2: turn one partition's users and experiments into result rows.

A partition holds every user with ``user_id % partitions == p`` and all their
experiments, so its counters are complete on their own and memory is bounded by the
partition, never by the whole input.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from .features import (
    AverageRow,
    CountRow,
    FeatureRows,
    TopRow,
    average_experiments,
    average_run_time,
    top_compound,
)
from .scan import Compound, read_spill


def aggregate_partition(
    user_spills: Sequence[Path],
    experiment_spills: Sequence[Path],
    total_experiments: int,
    compounds: dict[int, Compound],
) -> FeatureRows:
    names: dict[int, str] = {}
    for ids, user_names in read_spill(user_spills):
        names.update(zip(ids, user_names, strict=True))
    run_times: defaultdict[int, list[float]] = defaultdict(list)
    per_user: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for uids, times, lists in read_spill(experiment_spills):
        for uid, run_time, listed in zip(uids, times, lists, strict=True):
            run_times[uid].append(run_time)
            if listed:
                per_user[uid].update({int(c): 1 for c in listed.split(";")})
    counts: list[CountRow] = []
    averages: list[AverageRow] = []
    tops: list[TopRow] = []
    for uid in sorted(names):
        name = names[uid]
        times_of = run_times.get(uid, [])
        counts.append((uid, name, len(times_of)))
        averages.append(
            (
                uid,
                name,
                average_experiments(len(times_of), total_experiments),
                average_run_time(times_of),
            )
        )
        top = top_compound(per_user.get(uid, {}))
        if top is not None:
            cid, n, ties = top
            compound = compounds[cid]
            tops.append((uid, cid, compound.name, compound.structure, n, ties))
    return FeatureRows(counts, averages, tops)
