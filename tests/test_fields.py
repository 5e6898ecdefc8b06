"""Column checks agree with the obvious per-token rule, including the unsplit shortcut."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.fields import (
    BIGINT_MAX,
    WHOLE_DIGITS,
    compound_lists_known,
    id_limit,
    ids_column,
    parse_id,
    parse_run_time,
    whole_run_times,
)

TOKENS = ["1", "9", "0", "01", "10", "99", "100", "999", "2000", "9999", "10000", "10001"]
TOKENS += ["1000", "1499", "1500", "1501", "1999", "2001", "3000", "12345", "19999", "20000"]
FIELD = st.lists(st.sampled_from([*TOKENS, "", ";", "a", " ", "é", "1.5"]), max_size=4).map("".join)


def obvious(column: list[str], known: dict[str, int]) -> bool:
    return all(t in known for field in column if field for t in field.split(";"))


SIZES = [1, 9, 10, 11, 100, 101, 1500, 2000, 2500, 5000, 9999, 10000]


@given(st.sampled_from(SIZES), st.lists(FIELD, max_size=5))
def test_lists_known_with_and_without_the_id_limit(size: int, column: list[str]) -> None:
    known = {str(i): i for i in range(1, size + 1)}
    expected = obvious(column, known)
    assert compound_lists_known(column, known) == expected
    assert compound_lists_known(column, known, id_limit(known)) == expected
    assert compound_lists_known(column, known, size if size >= 10 else None) == expected


def test_id_limit_only_for_ids_one_to_n_with_few_as_long_as_n() -> None:
    assert id_limit({str(i): i for i in range(1, 10001)}) == 10000
    assert id_limit({str(i): i for i in range(1, 2001)}) == 2000  # 1000-1999 are below it
    assert id_limit({str(i): i for i in range(1, 1501)}) is None  # 1000-1500 to compare
    assert id_limit({"1": 1, "3": 3}) is None
    assert id_limit({"01": 1}) is None
    assert id_limit({}) is None


RUN_TIME = st.one_of(
    st.text("0123456789", max_size=4),
    st.text("0123456789", min_size=300, max_size=310),
    st.sampled_from(["1.5", "1.", ".5", ".", "1e5", "-1", "٣", "1_0", " 1", "inf"]),
)


@given(st.lists(RUN_TIME, max_size=5))
def test_whole_run_times_only_accepts_what_parse_run_time_accepts(column: list[str]) -> None:
    if whole_run_times(column):
        assert all(parse_run_time(t) == float(t) for t in column)
    plain = all(t.isascii() and t.isdigit() and len(t) <= WHOLE_DIGITS for t in column)
    assert whole_run_times(column) == plain


ID_TEXT = st.one_of(
    st.integers(0, 2**64).map(str),
    st.sampled_from(["", "007", " 1", "1.0", "1_0", "+1", "-1", "٣", "1;2", "a"]),
)


@given(st.lists(ID_TEXT, max_size=5))
def test_ids_column_only_accepts_what_parse_id_accepts(column: list[str]) -> None:
    ids = ids_column(column)
    plain = all(t.isascii() and t.isdigit() and int(t) <= BIGINT_MAX for t in column)
    assert (ids is not None) == plain
    if ids is not None:
        assert ids == [parse_id(t) for t in column]


def test_lists_known_at_the_limits_edges() -> None:
    """Ids as long as the limit, or longer, whose first digit is below the limit's."""
    known = {str(i): i for i in range(1, 2001)}
    for listed, ok in [
        ("1000;1999;2000;999", True),
        ("10000", False),
        ("1;12000", False),
        ("2001", False),
        ("19999;5", False),
    ]:
        assert compound_lists_known([listed], known, id_limit(known)) is ok, listed
