"""The fast paths take a block only when the general reader takes it the same way.

Blocks are written from the edge-case alphabets of tests/edgecases.py, in the exports'
spellings (``,\\t`` or ``,``, CRLF or LF, a final newline or not) with the occasional
deviation (a blank line, a field more or one less, a stray tab, space, CR or comma in or
around a value, a quote). Whenever the general reader (``block_batch`` and the per-row
rules) finds an error, the fast path must say "look closer" (None); when the fast path
answers, its tokens are the general reader's for the same rows, on the same lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edgecases import (
    COMPOUND_TEXT,
    GOOD_COMPOUNDS,
    GOOD_ID,
    GOOD_RUN_TIME,
    ID_TEXT,
    RUN_TIME_TEXT,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service.pipeline import fastpath, scan
from service.pipeline.csvfile import (
    EXPERIMENTS,
    FIELD_LIMIT,
    USERS,
    Batch,
    FilePlan,
    TableSpec,
    block_batch,
    block_lines,
    plan_file,
)
from service.pipeline.errors import ErrorLog, FileError
from service.pipeline.fastpath import experiment_block, user_block
from service.pipeline.fields import FieldError, parse_id
from service.pipeline.spill import read_columns

FIRST_LINE = 2  # the line after the header


def header_plan(directory: Path, spec: TableSpec, header: list[str]) -> FilePlan:
    path = directory / spec.filenames[0]
    path.write_text(",\t".join(header) + "\n", encoding="utf-8")
    return plan_file(path, spec)


@pytest.fixture(scope="module")
def experiments_plan(tmp_path_factory: pytest.TempPathFactory) -> FilePlan:
    return header_plan(tmp_path_factory.mktemp("plan"), EXPERIMENTS, list(EXPERIMENTS.columns))


def parsed(plan: FilePlan, data: bytes) -> Batch | None:
    """The general reader's rows of a block, or None when it rejects the block whole."""
    try:
        return block_batch(plan, data, FIRST_LINE)
    except FileError:
        return None


def joined_rows(draw: st.DrawFn, rows: list[list[str]]) -> bytes:
    """Rows in one of the exports' spellings, now and then with a deviation."""
    sep = draw(st.sampled_from([",\t", ",", "mixed"]))
    end = draw(st.sampled_from(["\n", "\r\n", "mixed"]))
    lines = []
    for fields in rows:
        if draw(st.integers(0, 19)) == 0:
            fields = [*fields, draw(st.sampled_from(["", "1", "x"]))]  # a fifth field
        if draw(st.integers(0, 19)) == 0:
            fields = fields[:-1]  # a field short
        if draw(st.integers(0, 14)) == 0:
            at = draw(st.integers(0, len(fields) - 1))
            odd = draw(st.sampled_from([" ", "\t", '"', "\t\t", ", ", "\f", "\r"]))
            cut = draw(st.integers(0, len(fields[at])))  # before, inside or after the value
            fields[at] = fields[at][:cut] + odd + fields[at][cut:]
        if draw(st.integers(0, 29)) == 0:
            i = draw(st.integers(0, len(fields) - 1))
            fields[i] = f'"{fields[i]}"'  # quoted: the reader unquotes it
        line = fields[0]
        for f in fields[1:]:
            line += (draw(st.sampled_from([",\t", ","])) if sep == "mixed" else sep) + f
        lines.append(line)
        if draw(st.integers(0, 29)) == 0:
            lines.append(draw(st.sampled_from(["", " ", "\t"])))  # a blank line
    ends = [draw(st.sampled_from(["\n", "\r\n"])) if end == "mixed" else end for _ in lines]
    text = "".join(line + e for line, e in zip(lines, ends, strict=True))
    if draw(st.booleans()):
        text = text[: -len(ends[-1])]  # the file's last block, without a final newline
    return text.encode()


def either(draw: st.DrawFn, good: st.SearchStrategy[str], edge: st.SearchStrategy[str]) -> str:
    """Mostly a valid value, so that whole blocks are valid often enough."""
    return draw(edge if draw(st.integers(0, 11)) == 0 else good)


@st.composite
def experiment_rows(draw: st.DrawFn, deviations: bool = True) -> bytes:
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        if deviations:
            fields = [
                either(draw, GOOD_ID.map(str), ID_TEXT),
                either(draw, GOOD_ID.map(str), ID_TEXT),
                either(draw, GOOD_COMPOUNDS, COMPOUND_TEXT),
                either(draw, GOOD_RUN_TIME, RUN_TIME_TEXT),
            ]
        else:
            fields = [draw(GOOD_ID.map(str)), draw(GOOD_ID.map(str))]
            fields += [draw(GOOD_COMPOUNDS), draw(GOOD_RUN_TIME)]
        rows.append(fields)
    if not deviations:
        sep = draw(st.sampled_from([",\t", ","]))
        end = draw(st.sampled_from(["\n", "\r\n"]))
        text = "".join(sep.join(fields) + end for fields in rows)
        return (text if draw(st.booleans()) else text[: -len(end)]).encode()
    return joined_rows(draw, rows)


def unique_in_order(listed: bytes) -> bytes:
    """A compound list as the rule gives it: each compound once, in order ("1;1" is "1")."""
    return b";".join(dict.fromkeys(listed.split(b";")))


@settings(max_examples=300, deadline=None)
@given(experiment_rows())
@example(b"1,\t2,\t1;1,\t5")
@example(b"1,2,,007\r\n3,4,5;6,.5\n")
@example(b"1,2,3,4\n\n5,6,7,8\n")  # a blank line: the lines after it would shift
@example(b"1,2,3,4,\n")  # a trailing delimiter
@example(b"1,2,3,\n4,5,6,1.2.3\n")  # no run time, two dots
@example(b"1,2,3;,4\n")
@example(b'1,2,3,"4"\n')
@example(b"1,2,3,4\r")
@example(b"1,2,3\r,4\n")  # a bare CR ends a line for the reader
@example(b"1,\t2\t3,,4\n")
@example(b"")
def test_experiment_block_gives_the_general_readers_rows_or_none(
    experiments_plan: FilePlan, data: bytes
) -> None:
    fast = experiment_block(data)
    batch = parsed(experiments_plan, data)
    if batch is None:
        assert fast is None
        return
    log = ErrorLog()
    (eids, uids, comps, times), lines = scan._experiments_slowly(experiments_plan, batch, log)
    by_columns = fastpath.experiment_rows(batch, experiments_plan)  # parsed rows' fast path
    if log.total:
        assert fast is None and by_columns is None, log.errors
        return
    for taken in (fast, by_columns):
        if taken is None:
            continue
        fast_eids, fast_uids, fast_comps, fast_times = taken
        assert (fast_eids, fast_uids) == (eids, uids)
        assert list(map(unique_in_order, fast_comps)) == comps
        assert list(map(float, fast_times)) == list(map(float, times))
    if fast is not None:
        # The scan numbers the fast path's rows from the block's first line on.
        assert list(range(FIRST_LINE, FIRST_LINE + len(fast[0]))) == lines
    if by_columns is not None:
        assert list(batch.lines) == lines


@settings(max_examples=100, deadline=None)
@given(experiment_rows(deviations=False))
def test_experiment_block_takes_blocks_in_the_usual_spellings(data: bytes) -> None:
    """Canonical ids (compound ids below 19 digits), plain decimal times: no closer look."""
    fast = experiment_block(data)
    assert fast is not None
    assert len(fast[0]) == data.count(b"\n") + (not data.endswith(b"\n"))


def test_experiment_block_leaves_a_field_over_the_csv_limit_to_the_reader(
    experiments_plan: FilePlan,
) -> None:
    listed = ";".join(map(str, range(FIELD_LIMIT // 5)))
    assert len(listed) > FIELD_LIMIT
    data = f"1,\t2,\t{listed},\t5\n".encode()
    assert experiment_block(data) is None
    with pytest.raises(FileError, match="field longer than"):
        block_batch(experiments_plan, data, FIRST_LINE)
    fits = ";".join(map(str, range(FIELD_LIMIT // 7)))
    assert len(fits) <= FIELD_LIMIT
    taken = experiment_block(f"1,\t2,\t{fits},\t5\n".encode() * 2)
    assert taken is not None and taken[2] == [fits.encode()] * 2


USER_HEADERS = [
    ["user_id", "name", "email", "signup_date"],
    ["name", "email", "User_ID", "signup_date", "team"],  # any order, an extra column
]
NAME = st.text(" abcXYZé-.\t\u3000\x0c\x85", max_size=8)


@pytest.fixture(scope="module", params=USER_HEADERS, ids=["usual", "reordered"])
def users_header(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[FilePlan, list[str]]:
    header: list[str] = request.param
    return header_plan(tmp_path_factory.mktemp("plan"), USERS, header), header


@st.composite
def user_rows(draw: st.DrawFn, header: list[str], deviations: bool = True) -> bytes:
    """Rows without quotes: a file with a quote is never split, so never takes this path.
    Without deviations: blanks around ids, leading zeros ("007" is user 7), CRLF."""
    emails = ["a@x.org", "", " b@y.org\t"]
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        if deviations:
            uid = either(draw, GOOD_ID.map(str), ID_TEXT)
        else:
            uid = draw(st.sampled_from(["", " ", "\t"])) + draw(st.sampled_from(["", "0"]))
            uid += str(draw(GOOD_ID))
        email = draw(st.sampled_from([*emails, "a,b@x.org"] if deviations else emails))
        values = {"user_id": uid, "name": draw(NAME), "email": email}
        rows.append([values.get(h.lower(), "2023-01-01") for h in header])
    if not deviations:
        sep = draw(st.sampled_from([",\t", ","]))
        return "".join(sep.join(row) + "\r\n" for row in rows).encode()
    return joined_rows(draw, rows).replace(b'"', b"")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_user_block_gives_the_general_readers_rows_or_none(
    users_header: tuple[FilePlan, list[str]], data: st.DataObject
) -> None:
    users_plan, header = users_header
    block = data.draw(user_rows(header))
    lines = block_lines(block, users_plan.name, FIRST_LINE)
    fast = user_block(lines, users_plan)
    batch = parsed(users_plan, block)
    assert batch is not None  # no quotes: nothing the reader rejects whole
    log = ErrorLog()
    rows, where = scan._stripped(batch, users_plan.width, users_plan.name, log)
    ids, names = [], []
    for row in rows:
        try:
            ids.append(parse_id(row[users_plan.columns["user_id"]]))
        except FieldError:
            assert fast is None and fastpath.user_rows(batch, users_plan) is None
            return
        names.append(row[users_plan.columns["name"]])
    by_columns = fastpath.user_rows(batch, users_plan)  # parsed rows' fast path
    if log.total:
        assert fast is None and by_columns is None, log.errors
        return
    if fast is not None:
        assert fast == (ids, names)
        # The scan numbers the fast path's rows from the block's first line on.
        assert list(where) == list(range(FIRST_LINE, FIRST_LINE + len(ids)))
    if by_columns is not None:
        assert by_columns == (ids, names) and list(where) == list(batch.lines)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_user_block_takes_rows_in_the_usual_spellings(
    users_header: tuple[FilePlan, list[str]], data: st.DataObject
) -> None:
    """Blanks around fields and leading zeros in ids: no closer look for users."""
    users_plan, header = users_header
    block = data.draw(user_rows(header, deviations=False))
    taken = user_block(block_lines(block, users_plan.name, FIRST_LINE), users_plan)
    assert taken is not None
    assert len(taken[0]) == block.count(b"\n")


@st.composite
def quoted_users(draw: st.DrawFn) -> str:
    """users.csv text with quoted names, as exports write them; in half the files, also
    the ways quotes go wrong: a doubled quote, a line end inside quotes, a quote in an
    unquoted field, an unterminated one, a bad id, a field short, a blank line."""
    good = [
        '"Smith, Alice"',
        '"Kim, Dan"',
        "Plain Name",
        '""',
        '"O\'Brien, Pat"',
        ' \t"Lee, Ann"',
        '"Kim" x',
        '"a,b,c"',
        "5'10\" or 6'1\" tall",  # quotes inside an unquoted field are its own text
        'x\t"ab"',
    ]
    bad = ['"Bob ""The Builder"""', '"two\nlines"', "5'10\" tall", '"unterminated']
    wrong = draw(st.booleans())
    names = st.sampled_from(good + bad if wrong else good)
    ids = st.sampled_from(["7", "42", "007", '"9"', "9223372036854775807", *(["x"] * wrong)])
    lines = []
    for _ in range(draw(st.integers(1, 8))):
        sep = draw(st.sampled_from([",\t", ","]))
        fields = [draw(ids), draw(names), "a@x.org", "2023-01-01"]
        if wrong and draw(st.integers(0, 9)) == 0:
            fields.pop()
        lines.append(sep.join(fields))
        if wrong and draw(st.integers(0, 9)) == 0:
            lines.append("")
    end = draw(st.sampled_from(["\n", "\r\n"]))
    return end.join(lines) + draw(st.sampled_from(["", end]))


def spilled(result: scan.ScanResult) -> list[list[list[object]]]:
    """Each partition's spilled (ids, names, lines), however the batches were cut."""
    index = result.spills["users"]
    found = []
    for p in range(index.partitions):
        extent = index.extent(p)
        batches = list(read_columns([extent])) if extent is not None else []
        found.append([[v for batch in batches for v in batch[c]] for c in range(3)])
    return found


@settings(max_examples=300, deadline=None)
@given(quoted_users(), st.sampled_from([1 << 20, 1, 16, 40, 64]))
@example(
    '1,\t"Smith, Alice",\ta@x.org,\t2023-01-01\r\n2,\t"Kim, Dan",\tb@x.org,\t2023-01-02', 1 << 20
)
@example('1,\t"two\nlines",\ta@x.org,\t2023-01-01\n2,\t"Kim, Dan",\tb@x.org,\td', 16)
@example('1,\t"two\nlines",\ta@x.org,\td\n2,\t"Kim, Dan",\tb@x.org,\td\n3,\t"a",\te,\td', 1 << 20)
@example('1,\t"a\nb",\te,\td\n2,\t"c\nd",\te,\td\n', 1 << 20)
@example('1,\t"Kim, Dan",\ta@x.org,\td\n2,\tBob,\t"b@x.org",\td\n', 1 << 20)
@example('"1",\t"Kim, Dan",\ta,\td\n"2",\t"Lee, Ann",\tb,\td\n3,\t"x",\tc,\td\n', 1 << 20)
def test_quoted_users_fast_path_spills_what_the_reader_reads(
    tmp_path_factory: pytest.TempPathFactory, text: str, block: int
) -> None:
    """A quoted users.csv by fast-path blocks (``quoted_users``) or not at all: when it
    answers, it spilled exactly the ids, names and lines the reader spills. Small
    blocks cut the file inside quoted fields that hold a line end."""
    directory = tmp_path_factory.mktemp("quoted")
    path = directory / "users.csv"
    path.write_text("user_id,\tname,\temail,\tsignup_date\n" + text, encoding="utf-8")
    plan = plan_file(path, USERS)
    if not plan.quoted or plan.lone_cr:
        return
    whole = scan.ByteRange(plan.data_offset, plan.size, plan.header_line + 1)
    fast = scan.quoted_users(plan, whole, directory, "fast", 3, None, block)
    try:
        slow = scan.scan_users(plan, whole, directory, "slow", 3, quoted_blocks=False)
    except FileError:  # the reader refuses the file (an unterminated quote, say)
        assert fast is None
        return
    if fast is None:
        return
    assert slow.error_total == 0, slow.errors
    assert fast.rows == slow.rows
    assert spilled(fast) == spilled(slow)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3_000_000), st.integers(0, 5000))
@example(999, 2002)  # whole thousands between partial ones
@example(1, 999)
def test_a_blocks_line_numbers_are_the_texts_of_its_lines(start: int, count: int) -> None:
    """The scan spills line numbers made a thousand at a time (``consecutive_text``)."""
    expected = [b"%d" % n for n in range(start, start + count)]
    assert scan._line_texts(range(start, start + count)) == expected
    assert scan._line_texts(list(range(start, start + count))) == expected
