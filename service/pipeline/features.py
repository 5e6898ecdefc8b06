"""The feature rules, in one place: what each result table holds for a user."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CountRow = tuple[int, str, int]  # user_id, name, experiment_count
AverageRow = tuple[int, str, float, float | None]  # user_id, name, share, mean run time
TopRow = tuple[int, int, str, str, int, int]  # user_id, compound_id, name, structure, count, ties


@dataclass
class FeatureRows:
    """Result rows of one partition, ready for COPY."""

    counts: list[CountRow]
    averages: list[AverageRow]
    tops: list[TopRow]


def average_experiments(count: int, total: int) -> float:
    """The seed's "average experiments per user": the user's share of all experiments."""
    return count / total if total else 0.0


def average_run_time(run_times: Iterable[float], count: int) -> float | None:
    """Mean of a user's ``count`` run times (None without experiments).

    ``fsum`` rounds exactly, so the mean does not depend on the order the times arrived in.
    Times whose sum is past the float range (each may be up to ~1.8e308) are summed
    scaled down by a power of two, which is exact, and the mean scaled back.
    """
    if not count:
        return None
    times = list(run_times)
    try:
        return math.fsum(times) / count
    except OverflowError:
        return math.fsum(t * _SCALE for t in times) / count / _SCALE


_SCALE = 2.0**-64


def top_compound(counts: Mapping[int, int] | Mapping[str, int]) -> tuple[int, int, int] | None:
    """(compound_id, experiments, tie_count): most experiments, ties to the lowest id.

    Keys are compound ids, as ints or as their canonical text (phase 2 counts text).
    """
    if not counts:
        return None
    best = max(counts.values())
    winners = [cid for cid, n in counts.items() if n == best]
    return min(map(int, winners)), best, len(winners)


def global_average(experiments: int, users: int) -> float:
    """Experiments per user over the whole input (the run summary's figure)."""
    return experiments / users if users else 0.0
