"""Field texts rich in edge cases, for the property tests of the fast column checks and
the fast paths (tests/test_fields.py, tests/test_fastpath.py): each alphabet mixes values
the per-value rules accept, accept only after canonicalising, and reject."""

from __future__ import annotations

from hypothesis import strategies as st

from service.pipeline.fields import BIGINT_MAX

TWENTY_DIGITS = "1" + "0" * 19

ID_TEXTS = [
    *("", "0", "00", "007", "7", "10", "42", "100", "0" + str(BIGINT_MAX)),
    *(str(BIGINT_MAX - 1), str(BIGINT_MAX), str(BIGINT_MAX + 1), "9" * 19, "1" + "0" * 18),
    *(TWENTY_DIGITS, "9" * 20, "9" * 18, "-1", "+1", " 1", "1 ", "\t1", "1_0", "1.0", "1e5"),
    *("\uff11\uff12", "\u0663", "\u00b2", "a", "0x1", ";", "."),
]
ID_TEXT = st.one_of(
    st.sampled_from(ID_TEXTS),
    st.integers(0, 2**64).map(str),
    st.integers(BIGINT_MAX - 3, BIGINT_MAX + 3).map(str),
)
GOOD_ID = st.one_of(st.integers(0, 1000), st.integers(0, BIGINT_MAX), st.just(BIGINT_MAX))

COMPOUND_TEXTS = [";", ";;", "1;", ";1", "1;;2", "1;1", "2;1;2", " 1;2", "1; 2", "1;02", "0;0"]
COMPOUND_TEXT = st.one_of(
    st.sampled_from(COMPOUND_TEXTS),
    st.lists(ID_TEXT, max_size=4).map(";".join),  # "" from [] or [""], and "1;", ";1", ...
)
GOOD_COMPOUNDS = st.lists(st.integers(0, 10**18 - 1) | st.integers(0, 30), max_size=4).map(
    lambda ids: ";".join(map(str, ids))  # repeats ("1;1") included: still valid
)

RUN_TIME_TEXTS = [
    *("", "0", "00", "007", ".", "1.", ".5", "0.5", "60.18", "1.2.3", "1..2", "..5"),
    *("1e5", "1E5", "1e-5", "-1", "-0", "+1", "inf", "nan", "Infinity", " 1", "1 ", "1_0"),
    *("\uff11", "\u0663", "0x10", "9" * 300, "9" * 301, "0." + "9" * 298, "0." + "9" * 299),
    *("." + "5" * 299, "1" * 299 + ".", str(2**53 + 1), "1e308", "1e309"),
]
RUN_TIME_TEXT = st.one_of(
    st.sampled_from(RUN_TIME_TEXTS),
    st.text("0123456789.", max_size=6),
    st.floats(0, 1e300, allow_nan=False).map(repr),
)
GOOD_RUN_TIME = st.one_of(
    st.integers(0, 600).map(str),
    st.integers(0, 600).map(lambda n: f"00{n}"),  # "007": accepted as it is, read as 7.0
    st.integers(0, 99999).map(lambda n: f"{n // 100}.{n % 100:02d}"),  # "60.18"
    st.sampled_from([".5", "5.", "0.0", str(2**53 + 1), "9" * 300]),
    st.floats(0, 1e6, allow_nan=False).map(repr).filter(lambda t: "e" not in t),
)
