"""The column checks accept exactly what the per-value rules accept in canonical form.

A column check says yes only when phase 2 may use every token as it is: an id's text is
its key, a compound list's ``set(t.split(";"))`` is what is tallied, a run time's
``float(t)`` is what is summed. Each test compares a check with the obvious per-token
rule on alphabets full of edge cases (tests/edgecases.py).
"""

from __future__ import annotations

import re

from edgecases import COMPOUND_TEXT, ID_TEXT, RUN_TIME_TEXT, TWENTY_DIGITS
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.pipeline.fields import (
    BIGINT_MAX,
    ID_DIGITS,
    TIME_CHARS,
    FieldError,
    compound_lists_valid,
    ids_column,
    ids_valid,
    parse_compound_list,
    parse_id,
    parse_run_time,
    run_times_valid,
)

MAX = str(BIGINT_MAX)


def encoded(column: list[str]) -> list[bytes]:
    return [t.encode() for t in column]


def canonical_id(text: str) -> bool:
    try:
        return str(parse_id(text)) == text
    except FieldError:
        return False


@settings(max_examples=400, deadline=None)
@given(st.lists(ID_TEXT, max_size=6))
@example([MAX])
@example([str(BIGINT_MAX + 1)])
@example(["1", MAX, "22"])
@example(["1", str(BIGINT_MAX + 1), "22"])
@example([TWENTY_DIGITS])
@example(["0" + MAX[1:]])  # 19 characters, a leading zero
@example(["0", "10", "00"])
@example([])
@example([""])
def test_ids_valid_accepts_exactly_columns_of_canonical_ids(column: list[str]) -> None:
    assert ids_valid(encoded(column)) == all(map(canonical_id, column))


PLAIN_DECIMAL = re.compile(r"[0-9]+\.?[0-9]*|\.[0-9]+")


@settings(max_examples=400, deadline=None)
@given(st.lists(RUN_TIME_TEXT, max_size=6))
@example(["9" * TIME_CHARS])
@example(["9" * (TIME_CHARS + 1)])
@example(["1.", ".5", "007"])
@example(["1", "."])
@example(["1.2", "3.4"])  # one dot each: not "1.2.3"
@example(["1.2.3"])
def test_run_times_valid_accepts_plain_decimals_that_float_reads_as_the_rule_does(
    column: list[str],
) -> None:
    """Plain decimals up to TIME_CHARS long only (exponents get a closer look); for each,
    the rule's value is what phase 2 computes from the text: ``float(t)``."""
    accepted = run_times_valid(encoded(column))
    assert accepted == all(PLAIN_DECIMAL.fullmatch(t) and len(t) <= TIME_CHARS for t in column)
    if accepted:
        assert [parse_run_time(t) for t in column] == [float(t) for t in column]


def canonical_list(text: str) -> bool:
    """Empty, or canonical ids (shorter than the 19 digits that need a range check)."""
    return text == "" or all(canonical_id(t) and len(t) < ID_DIGITS for t in text.split(";"))


@settings(max_examples=400, deadline=None)
@given(st.lists(COMPOUND_TEXT, max_size=6))
@example(["1;1", "2;1;2"])
@example(["", "3"])
@example([""])
@example(["9" * 18 + ";1"])
@example(["1;" + "1" * ID_DIGITS])
@example(["1;" + MAX])
@example(["1;", "2"])
@example(["1", ";2"])
def test_compound_lists_valid_accepts_lists_whose_tally_is_the_rules(column: list[str]) -> None:
    """A repeated compound ("1;1") is accepted: phase 2 tallies ``set(t.split(";"))``,
    which is the rule's list; and the first listed unknown compound is the rule's first."""
    accepted = compound_lists_valid(encoded(column))
    assert accepted == all(map(canonical_list, column))
    if accepted:
        for text in column:
            listed = [c for c in dict.fromkeys(text.split(";")) if c]
            assert listed == list(map(str, parse_compound_list(text)))


@settings(max_examples=300, deadline=None)
@given(st.lists(ID_TEXT, max_size=6))
@example(["007", "7"])
@example([MAX, str(BIGINT_MAX + 1)])
@example(["\u00b2"])  # isdigit(), but int() cannot read it
@example([])
def test_ids_column_reads_the_ids_of_a_stripped_column(column: list[str]) -> None:
    """User ids (text, stripped): leading zeros are fine here, the ids are ints."""
    for tokens in (column, [t.strip() for t in column]):
        ids = ids_column(tokens)
        plain = all(t.isascii() and t.isdigit() and int(t) <= BIGINT_MAX for t in tokens)
        assert (ids is not None) == plain
        if ids is not None:
            assert ids == [parse_id(t) for t in tokens]
