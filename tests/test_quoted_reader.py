"""The quoted-file reader equals the character-level reader: rows, line numbers, errors."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.pipeline import csvfile
from service.pipeline.csvfile import (
    USERS,
    FilePlan,
    character_level_batches,
    iter_batches,
    plan_file,
)
from service.pipeline.errors import FileError, RowError

Read = tuple[list[tuple[int, list[str]]], RowError | None]

HEADER = b"user_id,\tname,\temail,\tsignup_date\n"


def data_plan(path: Path) -> FilePlan:
    """A plan for a file that is all data (no header), read by the sequential reader."""
    size = path.stat().st_size
    return FilePlan(path, path.name, size, 0, 0, {}, 4, quoted=True, lone_cr=False)


def collect(batches: Iterator[csvfile.Batch]) -> Read:
    """(line, row) of every row, and the error that stopped the read (rows then dropped)."""
    out: list[tuple[int, list[str]]] = []
    try:
        for batch in batches:
            assert len(batch.rows) == len(batch.lines)
            out += zip(batch.lines, batch.rows, strict=True)
    except FileError as exc:
        return [], exc.error
    return out, None


def both(plan: FilePlan, block: int, start: int | None = None) -> tuple[Read, Read]:
    """What ``iter_batches`` reads, and what the character-level reference reads."""
    begin = plan.data_offset if start is None else start
    first = plan.header_line + 1 if start is None else 1
    fast = collect(iter_batches(plan, start, None, block))
    reference = collect(character_level_batches(plan, begin, plan.size, block, first))
    return fast, reference


def read(tmp_path: Path, data: bytes, block: int = 1 << 20) -> Read:
    """Read ``HEADER + data`` both ways; they must agree; return the fast reader's result."""
    path = tmp_path / "users.csv"
    path.write_bytes(HEADER + data)
    plan = plan_file(path, USERS)
    fast, reference = both(plan, block)
    assert fast == reference
    return fast


@contextmanager
def limits(field: int, line: int) -> Iterator[None]:
    """Small field and line limits, so random text reaches them."""
    saved = csvfile.FIELD_LIMIT, csvfile.MAX_LINE_CHARS
    csv.field_size_limit(field)
    csvfile.FIELD_LIMIT, csvfile.MAX_LINE_CHARS = field, line
    try:
        yield
    finally:
        csv.field_size_limit(saved[0])
        csvfile.FIELD_LIMIT, csvfile.MAX_LINE_CHARS = saved


PIECES = [
    b'"',
    b'"',
    b'""',
    b",",
    b",",
    b",\t",
    b", ",
    b',\t"',
    b'",',
    b"\t",
    b" ",
    b"\n",
    b"\n",
    b"\r",
    b"\r\n",
    b"a",
    b"b",
    b"7",
    b"\xc3\xa9",
    b"\xe2\x80\xa8",  # U+2028 and NEL: line ends to str.splitlines, not to csv
    b"\xc2\x85",
    b"\x0c",
]
RARE = [b"\xff", b"\x00", b"\xef\xbb\xbf"]  # kept only in some examples
noise = st.lists(st.sampled_from(PIECES + RARE), max_size=120).map(b"".join)

# Rows as exports write them, mostly well formed: blanks around fields, quoted fields
# holding every special character, now and then a quote inside an unquoted field.
blanks = st.sampled_from(["", "", " ", "\t", " \t"])
unquoted = st.text(alphabet='ab7 \té"', max_size=6).filter(lambda s: s.count('"') < 2)
quoted = st.text(alphabet='ab7,\t \n\r"é\u2028', max_size=8).map(
    lambda s: '"' + s.replace('"', '""') + '"'
)
field = st.tuples(blanks, unquoted | quoted, blanks).map("".join)
separator = st.sampled_from([",", ",\t", ", "])
row = st.lists(st.tuples(separator, field), min_size=1, max_size=5).map(
    lambda fields: "".join(sep + f for sep, f in fields)[1:]
)
line_end = st.sampled_from(["\n", "\n", "\r\n", "\r"])
rows = st.lists(st.tuples(row, line_end), max_size=12).map(
    lambda lines: "".join(r + end for r, end in lines).encode()
)
texts = noise | rows


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=texts,
    rare=st.booleans(),
    block=st.integers(1, 160),
    start=st.none() | st.integers(0, 40),
    field=st.sampled_from([128 * 1024, 128 * 1024, 4, 9, 25]),
    line=st.sampled_from([1024 * 1024, 1024 * 1024, 6, 14, 40]),
)
def test_quoted_reader_equals_character_level_reader(
    tmp_path: Path,
    data: bytes,
    rare: bool,
    block: int,
    start: int | None,
    field: int,
    line: int,
) -> None:
    if not rare:
        for byte in RARE:
            data = data.replace(byte, b"")
    path = tmp_path / "data.csv"
    path.write_bytes(data)
    plan = data_plan(path)
    with limits(field, line):
        fast, reference = both(plan, block, None if start is None else min(start, len(data)))
    assert fast == reference


def test_hard_cases_together_in_small_blocks(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b'1,\t"a\nb",\t"c""d"\n2,\te"f,\t"g" h\n3,\t"open\n')
    with limits(128 * 1024, 1024 * 1024):
        fast, reference = both(data_plan(path), 7)
    assert fast == reference
    assert fast[1] == RowError("data.csv", 4, 2, "unterminated quoted field")


def test_names_quoted_after_tab_and_space_read_as_unquoted(tmp_path: Path) -> None:
    rows, error = read(tmp_path, b'1,\t"Smith, Alice",\ta@x,\td\n2, "Jones, Bob" ,\tb@x,\td\n')
    assert error is None
    assert rows == [
        (2, ["1", "Smith, Alice", "\ta@x", "\td"]),
        (3, ["2", "Jones, Bob ", "\tb@x", "\td"]),
    ]


def test_doubled_quotes_and_empty_quoted_fields(tmp_path: Path) -> None:
    rows, error = read(tmp_path, b'1,\t"say ""hi""",\t"",\t""""\n')
    assert error is None
    assert rows == [(2, ["1", 'say "hi"', "", '"'])]


@pytest.mark.parametrize("block", [1, 5, 64, 1 << 20])
def test_quoted_line_ends_keep_the_row_on_its_first_line(tmp_path: Path, block: int) -> None:
    data = b'1,\t"two\r\nline",\ta,\td\n2,\t"three\n\nlines",\tb,\td\r3,\tC,\tc,\td\n'
    rows, error = read(tmp_path, data, block)
    assert error is None
    assert [(line, row[1]) for line, row in rows] == [
        (2, "two\nline"),
        (4, "three\n\nlines"),
        (7, "\tC"),
    ]


def test_quote_inside_an_unquoted_field_is_a_character(tmp_path: Path) -> None:
    rows, error = read(tmp_path, b'1,\tO"Brien,\ta,\td\n2,\t5" disk,\t"b, c",\td\n')
    assert error is None
    assert [row for _, row in rows] == [
        ["1", '\tO"Brien', "\ta", "\td"],
        ["2", '\t5" disk', "b, c", "\td"],
    ]


def test_text_after_a_closing_quote_joins_the_field(tmp_path: Path) -> None:
    rows, error = read(tmp_path, b'1,\t"Smith" Jr,\t"a"b"c",\td\n')
    assert error is None
    assert rows == [(2, ["1", "Smith Jr", 'ab"c"', "\td"])]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_ends_blank_lines_and_bom(tmp_path: Path, newline: bytes) -> None:
    path = tmp_path / "users.csv"
    lines = [b'\xef\xbb\xbf"user_id",\tname,\temail,\tsignup_date', b"", b'1,\t"A, a",\tx,\td']
    path.write_bytes(newline.join([*lines, b" \t", b'2,\t"B\rb",\ty,\td']))
    plan = plan_file(path, USERS)
    assert plan.columns["user_id"] == 0
    fast, reference = both(plan, 16)
    assert fast == reference
    rows, error = fast
    assert error is None
    assert [(line, row[:2]) for line, row in rows if row] == [
        (3, ["1", "A, a"]),
        (4, [" \t"]),
        (5, ["2", "B\nb"]),
    ]


def test_unterminated_quote_names_its_opening_line_and_field(tmp_path: Path) -> None:
    data = b'1,\t"A",\ta,\td\n2,\tB,\t"b,\td\n' + b"3,\tC,\tc,\td\n" * 50
    _, error = read(tmp_path, data, 64)
    assert error == RowError("users.csv", 3, 3, "unterminated quoted field")


def test_field_over_the_limit_names_line_and_field(tmp_path: Path) -> None:
    long = b"x" * 40
    data = b'1,\t"A",\ta,\td\n2,\t"' + long + b"\n" + long + b'",\tb,\td\n'
    with limits(50, 1024 * 1024):
        _, error = read(tmp_path, data, 32)
    assert error == RowError("users.csv", 3, 2, "field longer than 50 characters")


def test_bad_bytes_after_a_row_left_open_report_the_same_problem_first(tmp_path: Path) -> None:
    """The character-level reader parses an open row's lines before it decodes the next
    block: a field over the limit there comes before the next block's bad byte."""
    data = b'1,\t"' + b"y" * 30 + b"\n" + b"y" * 30 + b'\n",\tb,\t' + b"d" * 20 + b"\n\xff\n"
    with limits(40, 1024 * 1024):
        _, error = read(tmp_path, data, 40)
    assert error is not None and error.message == "field longer than 40 characters"
    _, error = read(tmp_path, data, 40)
    assert error is not None and error.message.startswith("invalid UTF-8")


def test_long_quoted_file_keeps_every_row_and_line(tmp_path: Path) -> None:
    """Chunk ends, carried rows and batches of many chunks leave every row as it is."""
    rows = [(i, f"Name, {i}", f"two\nlines {i}" if i % 1000 == 0 else "d") for i in range(70000)]
    data = "".join(f'{i},\t"{name}",\tu{i}@x,\t"{last}"\n' for i, name, last in rows)
    got, error = read(tmp_path, data.encode(), 1 << 16)
    assert error is None
    expected, line = [], 2
    for i, name, last in rows:
        expected.append((line, [str(i), name, f"\tu{i}@x", last]))
        line += 1 + last.count("\n")
    assert got == expected
