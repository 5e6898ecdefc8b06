"""The reader on small literal snippets: the export format's quirks, line numbers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.pipeline.csvfile import (
    COMPOUNDS,
    USERS,
    FilePlan,
    _scan_bytes,
    block_batch,
    iter_batches,
    plan_file,
    raw_blocks,
    split_ranges,
)
from service.pipeline.errors import FileError


def write(tmp_path: Path, data: bytes, name: str = "users.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rows_of(plan: FilePlan) -> list[tuple[int, list[str]]]:
    """(line, stripped fields) of every non-blank row."""
    out = []
    for batch in iter_batches(plan):
        for row, line in zip(batch.rows, batch.lines, strict=True):
            if row and any(f.strip() for f in row):
                out.append((line, [f.strip() for f in row]))
    return out


HEADER = b"user_id,\tname,\temail,\tsignup_date"


def test_sample_quirks_blank_first_line_tabs_no_final_newline(tmp_path: Path) -> None:
    plan = plan_file(write(tmp_path, b"\n" + HEADER + b"\n1,\tAlice,\ta@x,\t2023-01-01"), USERS)
    assert plan.header_line == 2
    assert plan.columns == {"user_id": 0, "name": 1, "email": 2, "signup_date": 3}
    assert rows_of(plan) == [(3, ["1", "Alice", "a@x", "2023-01-01"])]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings_and_bom(tmp_path: Path, newline: bytes) -> None:
    body = newline.join([b"\xef\xbb\xbf" + HEADER, b"1,\tA,\ta@x,\td", b"", b"2,\tB,\tb@x,\td"])
    plan = plan_file(write(tmp_path, body + newline), USERS)
    assert [line for line, _ in rows_of(plan)] == [2, 4]
    assert plan.splittable() is (newline != b"\r")


def test_quoted_field_after_tab_keeps_commas_newlines_and_quotes(tmp_path: Path) -> None:
    data = (
        HEADER + b'\n1,\t"Smith, Alice",\ta@x,\td\n'
        b'2,\t"Multi\nline ""quoted""",\tb@x,\td\n3,\tPlain,\tc@x,\td'
    )
    plan = plan_file(write(tmp_path, data), USERS)
    assert plan.quoted
    assert rows_of(plan) == [
        (2, ["1", "Smith, Alice", "a@x", "d"]),
        (3, ["2", 'Multi\nline "quoted"', "b@x", "d"]),
        (5, ["3", "Plain", "c@x", "d"]),
    ]


def test_columns_found_by_name_in_any_order_extra_ignored(tmp_path: Path) -> None:
    data = b"compound_structure, extra ,compound_name,COMPOUND_ID\nC1,x,A,7"
    plan = plan_file(write(tmp_path, data, "compounds.csv"), COMPOUNDS)
    assert plan.columns == {"compound_id": 3, "compound_name": 2, "compound_structure": 0}


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b"", None, "empty file"),
        (b"\n \n\t\n", None, "empty file"),
        (b"user_id,name,email\n", 1, "missing column 'signup_date'"),
        (b"user_id,name,email,signup_date,name\n", 1, "duplicate column 'name'"),
    ],
)
def test_header_problems_are_file_errors(
    tmp_path: Path, data: bytes, line: int | None, message: str
) -> None:
    with pytest.raises(FileError) as caught:
        plan_file(write(tmp_path, data), USERS)
    assert caught.value.error.line == line
    assert message in caught.value.error.message


def test_invalid_utf8_names_line_and_column(tmp_path: Path) -> None:
    plan = plan_file(write(tmp_path, HEADER + b"\n1,\tA,\ta@x,\td\n2,\tB\xff,\tb@x,\td"), USERS)
    with pytest.raises(FileError) as caught:
        rows_of(plan)
    error = caught.value.error
    assert (error.file, error.line, error.column) == ("users.csv", 3, 2)
    assert "invalid UTF-8" in error.message


def test_nul_byte_names_line_and_column(tmp_path: Path) -> None:
    plan = plan_file(write(tmp_path, HEADER + b"\n1,\tA,\ta\x00x,\td"), USERS)
    with pytest.raises(FileError) as caught:
        rows_of(plan)
    assert (caught.value.error.line, caught.value.error.column) == (2, 3)
    assert "NUL" in caught.value.error.message


def test_unterminated_quote_names_the_line_it_opened_on(tmp_path: Path) -> None:
    plan = plan_file(
        write(tmp_path, HEADER + b'\n1,\tA,\ta,\td\n2,\t"B,\tb,\td\n3,\tC,\tc,\td'), USERS
    )
    with pytest.raises(FileError) as caught:
        rows_of(plan)
    assert caught.value.error.line == 3
    assert "unterminated" in caught.value.error.message


def test_byte_ranges_cover_every_row_once_with_absolute_line_numbers(tmp_path: Path) -> None:
    lines = [b"", HEADER] + [f"{i},\tU{i},\tu{i}@x,\td".encode() for i in range(1, 500)]
    plan = plan_file(write(tmp_path, b"\r\n".join(lines)), USERS, block=512)
    ranges = split_ranges(plan, 2000)
    assert len(ranges) >= 5
    assert ranges[0].start == plan.data_offset and ranges[-1].end == plan.size
    seen = []
    for part in ranges:
        for data, line in raw_blocks(
            plan.path, plan.name, part.start, part.end, 64, part.first_line
        ):
            batch = block_batch(plan, data, line)
            seen += [(n, row[0]) for row, n in zip(batch.rows, batch.lines, strict=True) if row]
    assert seen == [(line, fields[0]) for line, fields in rows_of(plan)]
    assert seen[0] == (3, "1")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab,"\r\n', max_size=60), st.integers(1, 9))
def test_the_plan_finds_bare_crs_and_quotes_across_block_edges(text: str, block: int) -> None:
    """A CR not followed by LF (also the last byte, also split from its LF by a block edge)."""
    data = text.encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.csv"
        path.write_bytes(data)
        quoted, lone_cr, _ = _scan_bytes(path, 0, 1, block)
    assert lone_cr == any(b == 13 and data[i + 1 : i + 2] != b"\n" for i, b in enumerate(data))
    assert quoted == (b'"' in data)
