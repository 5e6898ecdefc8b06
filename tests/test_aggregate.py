"""Phase 2 on hand-made spill files: its shortcuts give the rules' exact results."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.aggregate import aggregate_partition
from service.pipeline.features import average_run_time
from service.pipeline.spill import ColumnSpill, LineSpill

# Whole numbers take the exact-total path; these must give fsum's answer either way:
# "007", floats, and times past 2**53 whose floats are rounded (3 x (2**53 + 1)).
RUN_TIMES = st.one_of(
    st.integers(0, 600).map(str),
    st.integers(0, 600).map(lambda n: f"00{n}"),
    st.integers(2**53 - 4, 2**53 + 4).map(str),
    st.floats(0, 1e6, allow_nan=False).map(repr),
)


@given(st.lists(st.tuples(st.integers(1, 5), RUN_TIMES), max_size=30))
def test_mean_run_times_equal_fsum_of_the_floats(rows: list[tuple[int, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with ColumnSpill(directory, "users", 1) as users:
            users.write([1, 2, 3, 4, 5], ["a", "b", "c", "d", "e"])
        with LineSpill(directory, "exp", 1) as spill:
            spill.write_lines([u for u, _ in rows], [f"{u},1,{t}" for u, t in rows])
        result = aggregate_partition(
            users.pieces[0], spill.pieces[0], max(len(rows), 1), {1: ("one", "C")}
        )
    means = {uid: mean for uid, _, _, mean in result.averages}
    for uid in range(1, 6):
        mine = [float(t) for u, t in rows if u == uid]
        assert means[uid] == average_run_time(mine, len(mine)), uid


def test_rounded_floats_are_summed_as_floats() -> None:
    """Three times 2**53 + 1: as floats each is 2**53, so fsum's mean is 2**53 exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with ColumnSpill(directory, "users", 1) as users:
            users.write([1], ["a"])
        with LineSpill(directory, "exp", 1) as spill:
            spill.write_lines([1, 1, 1], [f"1,1,{2**53 + 1}"] * 3)
        result = aggregate_partition(users.pieces[0], spill.pieces[0], 3, {1: ("one", "C")})
    assert result.averages == [(1, "a", 1.0, float(2**53))]
