from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.fastpath import range_text


@given(st.integers(0, 10**15), st.integers(0, 40_000))
def test_range_text_is_the_joined_ids(start: int, count: int) -> None:
    assert range_text(start, start + count) == ",".join(map(str, range(start, start + count)))


def test_range_text_at_thousand_edges() -> None:
    for start, stop in [(0, 1), (0, 1000), (1, 2001), (999, 1001), (1000, 2000), (998, 5001)]:
        assert range_text(start, stop) == ",".join(map(str, range(start, stop)))
