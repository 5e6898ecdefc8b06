"""Phase 2: turn one partition's users and experiments into result rows.

A partition holds every user with ``user_id % partitions == p`` and all their
experiments, so its counters are complete on their own and memory is bounded by the
partition, never by the whole input. Sorting the spilled lines (they start with the
user id) puts each user's experiments side by side, so there is no Python step per
experiment: columns come from one split, and each user's run times and compounds are
slices, summed and counted in C.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate, chain, repeat
from pathlib import Path

from .features import (
    AverageRow,
    CountRow,
    FeatureRows,
    TopRow,
    average_experiments,
    top_compound,
)
from .scan import Compound, read_spill
from .spill import read_lines


def aggregate_partition(
    user_spills: Sequence[Path],
    experiment_spills: Sequence[Path],
    total_experiments: int,
    compounds: dict[int, Compound],
) -> FeatureRows:
    names: dict[int, str] = {}
    for ids, user_names in read_spill(user_spills):
        names.update(zip(ids, user_names, strict=True))
    lines = read_lines(experiment_spills).split("\n")
    lines.pop()
    lines.sort()
    flat = ",".join(lines).split(",")
    del lines
    lists, times = flat[1::3], flat[2::3]
    per_user = Counter(flat[0::3])  # in sorted order, like the lines
    del flat
    ends = list(accumulate(per_user.values()))
    spans = dict(zip(per_user, zip(chain((0,), ends), ends, strict=False), strict=True))
    counts: list[CountRow] = []
    averages: list[AverageRow] = []
    tops: list[TopRow] = []
    fsum, split = math.fsum, str.split
    for uid in sorted(names):
        name = names[uid]
        span = spans.get(str(uid))
        if span is None:
            counts.append((uid, name, 0))
            averages.append((uid, name, average_experiments(0, total_experiments), None))
            continue
        start, end = span
        n = end - start
        counts.append((uid, name, n))
        mean = fsum(map(float, times[start:end])) / n
        averages.append((uid, name, average_experiments(n, total_experiments), mean))
        listed = list(filter(None, lists[start:end]))
        if not listed:
            continue
        # A compound listed twice in one experiment still counts once for it.
        tally = Counter(chain.from_iterable(map(set, map(split, listed, repeat(";")))))
        top = top_compound(tally)
        if top is not None:
            cid, count, ties = top
            compound = compounds[cid]
            tops.append((uid, cid, compound.name, compound.structure, count, ties))
    return FeatureRows(counts, averages, tops)
