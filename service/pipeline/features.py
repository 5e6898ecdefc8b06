"""The feature rules, in one place: what each result table holds for a user."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CountRow = tuple[int, str, int]  # user_id, name, experiment_count
AverageRow = tuple[int, str, float, float | None]  # user_id, name, share, mean run time
TopRow = tuple[int, int, str, str, int, int]  # user_id, compound_id, name, structure, count, ties


@dataclass
class FeatureRows:
    """Result rows of one partition, ready for COPY, held as columns: a worker hands them
    to the loader as a few lists, which pickle both ways in less than half the time the
    same rows take as tuples (benchmarks/README, eighth round).

    Every user of the partition has a count and an average row (``user_ids``, ``names``
    and the columns beside them); ``tops`` are the columns of the top-compound rows, for
    the users with a compound.
    """

    user_ids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    experiments: list[int] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    means: list[float | None] = field(default_factory=list)
    top_columns: tuple[list[Any], ...] = ()

    @property
    def count_columns(self) -> tuple[list[Any], ...]:
        return self.user_ids, self.names, self.experiments

    @property
    def average_columns(self) -> tuple[list[Any], ...]:
        return self.user_ids, self.names, self.shares, self.means

    @property
    def counts(self) -> list[CountRow]:
        return list(zip(*self.count_columns, strict=True))

    @property
    def averages(self) -> list[AverageRow]:
        return list(zip(*self.average_columns, strict=True))

    @property
    def tops(self) -> list[TopRow]:
        return list(zip(*self.top_columns, strict=True))


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


def top_compound(
    counts: Mapping[int, int] | Mapping[bytes, int],
) -> tuple[int, int, int] | None:
    """(compound_id, experiments, tie_count): most experiments, ties to the lowest id.

    Keys are compound ids, as ints or as their canonical ASCII text (phase 2 counts text).
    """
    if not counts:
        return None
    best = max(counts.values())
    winners = [cid for cid, n in counts.items() if n == best]
    return min(map(int, winners)), best, len(winners)


def global_average(experiments: int, users: int) -> float:
    """Experiments per user over the whole input (the run summary's figure)."""
    return experiments / users if users else 0.0
