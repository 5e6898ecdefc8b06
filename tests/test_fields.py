"""Column checks agree with the obvious per-token rule, including the unsplit shortcut."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.fields import compound_lists_known, id_limit

TOKENS = ["1", "9", "0", "01", "10", "99", "100", "999", "2000", "9999", "10000", "10001"]
FIELD = st.lists(st.sampled_from([*TOKENS, "", ";", "a", " ", "é", "1.5"]), max_size=4).map("".join)


def obvious(column: list[str], known: dict[str, int]) -> bool:
    return all(t in known for field in column if field for t in field.split(";"))


@given(st.sampled_from([1, 9, 10, 11, 100, 101, 2000, 9999, 10000]), st.lists(FIELD, max_size=5))
def test_lists_known_with_and_without_the_id_limit(size: int, column: list[str]) -> None:
    known = {str(i): i for i in range(1, size + 1)}
    expected = obvious(column, known)
    assert compound_lists_known(column, known) == expected
    assert compound_lists_known(column, known, id_limit(known)) == expected
    assert compound_lists_known(column, known, size if size >= 10 else None) == expected


def test_id_limit_only_for_ids_one_to_n_with_few_as_long_as_n() -> None:
    assert id_limit({str(i): i for i in range(1, 10001)}) == 10000
    assert id_limit({str(i): i for i in range(1, 2001)}) is None  # half are four digits
    assert id_limit({"1": 1, "3": 3}) is None
    assert id_limit({"01": 1}) is None
    assert id_limit({}) is None
