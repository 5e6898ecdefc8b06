from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.fastpath import experiment_block, range_text
from service.pipeline.fields import IdSet


@given(st.integers(0, 10**15), st.integers(0, 40_000))
def test_range_text_is_the_joined_ids(start: int, count: int) -> None:
    assert range_text(start, start + count) == ",".join(map(str, range(start, start + count)))


def test_range_text_at_thousand_edges() -> None:
    for start, stop in [(0, 1), (0, 1000), (1, 2001), (999, 1001), (1000, 2000), (998, 5001)]:
        assert range_text(start, stop) == ",".join(map(str, range(start, stop)))


TWEAKS = [None, "gap", "repeat", "longer", "leading zero", "shorter"]


@given(st.integers(0, 10**6), st.integers(1, 30), st.sampled_from(TWEAKS), st.integers(0, 29))
def test_blocks_with_numbered_rows_match_the_plain_rule(
    start: int, count: int, tweak: str | None, at: int
) -> None:
    """Consecutive ids take a shortcut; any break in the numbering must not fool it."""
    ids = [str(i) for i in range(start, start + count)]
    i = at % count
    if tweak == "gap":
        ids[i] = str(start + count + 5)
    elif tweak == "repeat":
        ids[i] = ids[i - 1]
    elif tweak == "longer":
        ids[i] += "0"
    elif tweak == "leading zero":
        ids[i] = "0" + ids[i]  # still names the same experiment: valid
    elif tweak == "shorter" and len(ids[i]) > 1:
        ids[i] = ids[i][:-1]
    users = [1 + n % 3 for n in range(count)]
    data = "\n".join(
        f"{e},\t{u},\t1;2,\t{n}" for n, (e, u) in enumerate(zip(ids, users, strict=True))
    ).encode()
    seen = IdSet()
    got = experiment_block(data, {"1": 1, "2": 2}, IdSet.of([1, 2, 3]), seen)
    numbers = [int(e) for e in ids]
    if len(set(numbers)) == count:
        assert got == ([f"{u},1;2,{n}" for n, u in enumerate(users)], users)
        assert all(n in seen for n in numbers) and len(seen) == count
    else:
        assert got is None
        assert len(seen) == 0
