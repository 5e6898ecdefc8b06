"""Bad and odd input, one kind per test: a failed run names the spot and loses nothing.

Every test first loads the sample, then changes one file and runs again. A bad file must
fail the run with the file, line and column of the problem and a readable message, leave
the previous results exactly as they were and be recorded in ``etl_runs``. A valid quirk
must load the same values as the plain sample.

Sample line numbers: users.csv has a blank line 1, its header on line 2 and user n on line
n + 2; user_experiments.csv has experiment n on line n + 1; compounds.csv compound n on
line n + 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from badinput import Tables, leftovers, replace, run_rows, scratch_tables, snapshot

from service import etl
from service.etl import RunOptions
from service.jobs import run_once
from service.pipeline.csvfile import ENCODING_HINT, FIELD_LIMIT, MAX_LINE_CHARS
from service.pipeline.errors import MAX_REPORTED_ERRORS
from service.settings import Settings

USERS, EXPERIMENTS, COMPOUNDS = "users.csv", "user_experiments.csv", "compounds.csv"
SKIP = RunOptions(on_error="skip", max_errors=10)


@dataclass
class Baseline:
    settings: Settings
    data: Path
    tables: Tables


@pytest.fixture
async def baseline(settings: Settings, sample_dir: Path) -> Baseline:
    """The sample loaded once: what a failed run must leave untouched."""
    run = await run_once(settings, sample_dir)
    assert run["status"] == "succeeded", run
    return Baseline(settings, sample_dir, await snapshot(settings))


def err(
    file: str, line: int | None, column: int | None, message: str, field: str | None = None
) -> dict[str, Any]:
    return {"file": file, "line": line, "column": column, "field": field, "message": message}


async def assert_failed_and_intact(base: Baseline, run: dict[str, Any]) -> None:
    """The run failed, is recorded with its errors, and the old results are all there."""
    assert run["status"] == "failed", run
    assert run["stats"] is None
    assert await snapshot(base.settings) == base.tables
    recorded = await run_rows(base.settings)
    assert [r["status"] for r in recorded] == ["succeeded", "failed"]
    assert json.loads(recorded[-1]["errors"]) == run["errors"]
    assert recorded[-1]["error_total"] == run["error_total"]
    assert recorded[-1]["message"] == run["message"]
    assert await scratch_tables(base.settings) == []
    assert leftovers(base.settings.tmp_dir) == []


def change(file: str, old: bytes, new: bytes) -> Callable[[Path], None]:
    return lambda data: replace(data / file, old, new)


def write(file: str, content: bytes) -> Callable[[Path], None]:
    return lambda data: (data / file).write_bytes(content)


def remove(file: str) -> Callable[[Path], None]:
    return lambda data: (data / file).unlink()


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        for edit in edits:
            edit(data)

    return apply


def header_only(file: str) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        text = (data / file).read_bytes()
        (data / file).write_bytes(text[: text.index(b"\n", text.index(b"_id"))])

    return apply


def not_an_id(value: str) -> str:
    return f"{value!r} is not an id (ASCII digits 0-9 only)"


# (id, edit, the one error expected)
FAILURES: list[tuple[str, Callable[[Path], None], dict[str, Any]]] = [
    (
        "missing_users_file",
        remove(USERS),
        err(USERS, None, None, "missing file: expected users.csv"),
    ),
    (
        "missing_experiments_file",
        remove(EXPERIMENTS),
        err(
            EXPERIMENTS,
            None,
            None,
            "missing file: expected user_experiments.csv or experiments.csv",
        ),
    ),
    ("empty_file", write(COMPOUNDS, b""), err(COMPOUNDS, None, None, "empty file: no header line")),
    (
        "blank_lines_only",
        write(USERS, b"\n \t\n\r\n"),
        err(USERS, None, None, "empty file: no header line"),
    ),
    (
        "missing_column",
        change(USERS, b"signup_date", b"signup"),
        err(USERS, 2, None, "missing column 'signup_date' in header", "signup_date"),
    ),
    (
        "duplicate_column",
        change(USERS, b"signup_date", b"NAME"),
        err(USERS, 2, 4, "duplicate column 'name'", "name"),
    ),
    (
        "too_few_fields",
        change(USERS, b"2,\tBob,\t", b"2,\t"),
        err(USERS, 4, 4, "expected 4 fields, found 3"),
    ),
    (
        "too_many_fields",
        change(COMPOUNDS, b"C21H30O2", b"C21H30O2,\textra"),
        err(COMPOUNDS, 3, 4, "expected 3 fields, found 4"),
    ),
    (
        "trailing_delimiter_is_an_extra_empty_field",
        change(COMPOUNDS, b"C21H30O2", b"C21H30O2,"),
        err(COMPOUNDS, 3, 4, "expected 3 fields, found 4 (a trailing delimiter?)"),
    ),
    (
        "unterminated_quote",
        change(USERS, b"\tBob", b'\t"Bob'),
        err(USERS, 4, 2, "unterminated quoted field"),
    ),
    (
        "line_numbers_stay_physical_after_a_quoted_newline",
        both(change(USERS, b"\tAlice", b'\t"Ali\nce"'), change(USERS, b"\n4,", b"\nx4,")),
        err(USERS, 7, 1, not_an_id("x4"), "user_id"),
    ),
    ("nul_byte", change(USERS, b"Bob", b"B\x00ob"), err(USERS, 4, 2, "NUL byte at character 5")),
    (
        "invalid_utf8",
        change(COMPOUNDS, b"Compound B", b"Compound \xe9"),
        err(COMPOUNDS, 3, 2, "invalid UTF-8 (byte 0xe9 at character 13)" + ENCODING_HINT),
    ),
    (
        "utf16_file",
        lambda data: (data / USERS).write_bytes((data / USERS).read_text("utf-8").encode("utf-16")),
        err(USERS, 1, 1, "UTF-16 text (byte order mark); save it as UTF-8"),
    ),
    (
        "non_integer_id",
        change(USERS, b"\n3,", b"\nthree,"),
        err(USERS, 5, 1, not_an_id("three"), "user_id"),
    ),
    (
        "empty_id",
        change(EXPERIMENTS, b"\n4,\t3,", b"\n4,\t,"),
        err(EXPERIMENTS, 5, 2, "empty id", "user_id"),
    ),
    (
        "negative_id",
        change(USERS, b"\n4,", b"\n-4,"),
        err(USERS, 6, 1, not_an_id("-4"), "user_id"),
    ),
    (
        "id_beyond_bigint",
        change(COMPOUNDS, b"\n3,", b"\n9223372036854775808,"),
        err(
            COMPOUNDS,
            4,
            1,
            "'9223372036854775808' is out of range (ids must fit in a bigint)",
            "compound_id",
        ),
    ),
    *(
        (
            f"id_{name}",
            change(EXPERIMENTS, b"\n5,", f"\n{value},".encode()),
            err(EXPERIMENTS, 6, 1, not_an_id(value), "experiment_id"),
        )
        for name, value in [
            ("with_underscore", "1_000"),
            ("with_plus_sign", "+3"),
            ("with_decimal_point", "5.0"),
            ("in_full_width_digits", "\uff11\uff12"),
            ("in_exponent_form", "5e0"),
        ]
    ),
    (
        "empty_compound_id_between_semicolons",
        change(EXPERIMENTS, b"\t1;2;3,", b"\t1;;3,"),
        err(EXPERIMENTS, 6, 3, "compound 2 of '1;;3': empty id", "experiment_compound_ids"),
    ),
    (
        "trailing_semicolon",
        change(EXPERIMENTS, b"\t1;2;3,", b"\t1;2;,"),
        err(EXPERIMENTS, 6, 3, "compound 3 of '1;2;': empty id", "experiment_compound_ids"),
    ),
    (
        "unknown_compound_id",
        change(EXPERIMENTS, b"\t1;2;3,", b"\t1;4;3,"),
        err(
            EXPERIMENTS,
            6,
            3,
            "unknown compound_id 4 (not in compounds.csv)",
            "experiment_compound_ids",
        ),
    ),
    (
        "unknown_user_id",
        change(EXPERIMENTS, b"\n7,\t6,", b"\n7,\t60,"),
        err(EXPERIMENTS, 8, 2, "unknown user_id 60 (not in users.csv)", "user_id"),
    ),
    (
        "duplicate_user_id_names_the_later_line",
        change(USERS, b"\n10,\tJudy", b"\n2,\tBobby,\tb@x.org,\t2024-01-01\n10,\tJudy"),
        err(USERS, 12, 1, "duplicate user_id 2 (first on line 4)", "user_id"),
    ),
    (
        "duplicate_compound_id_names_the_later_line",
        change(COMPOUNDS, b"\n3,", b"\n1,"),
        err(COMPOUNDS, 4, 1, "duplicate compound_id 1 (first on line 2)", "compound_id"),
    ),
    (
        "duplicate_experiment_id_names_the_later_line",
        change(EXPERIMENTS, b"\n10,\t9,", b"\n3,\t9,"),
        err(EXPERIMENTS, 11, 1, "duplicate experiment_id 3 (first on line 4)", "experiment_id"),
    ),
    *(
        (
            f"run_time_{name}",
            change(EXPERIMENTS, b",\t45", f",\t{value}".encode()),
            err(EXPERIMENTS, 9, 4, message, "experiment_run_time"),
        )
        for name, value, message in [
            ("negative", "-45", "negative run time '-45'"),
            ("not_a_number", "45s", "'45s' is not a number"),
            ("empty", "", "empty run time"),
            ("nan", "nan", "'nan' is not a finite number"),
            ("inf", "inf", "'inf' is not a finite number"),
            ("overflowing_to_inf", "1e999", "'1e999' is not a finite number"),
            ("with_underscore", "4_5", "'4_5' is not a number"),
        ]
    ),
    (
        "field_over_the_size_limit",
        change(USERS, b"Carol", b"C" * (FIELD_LIMIT + 1)),
        err(USERS, 5, 2, f"field longer than {FIELD_LIMIT} characters"),
    ),
    (
        "quoted_field_over_the_size_limit_across_lines",
        change(USERS, b"\tCarol", b'\t"' + b"C" * 999 + b"\n" * 200 + b"x" * FIELD_LIMIT + b'"'),
        err(USERS, 5, 2, f"field longer than {FIELD_LIMIT} characters"),
    ),
    (
        "both_experiment_file_names_present",
        lambda data: shutil.copy(data / EXPERIMENTS, data / "experiments.csv"),
        err(
            "experiments.csv",
            None,
            None,
            "ambiguous input: both user_experiments.csv and experiments.csv exist",
        ),
    ),
]


@pytest.mark.parametrize(
    ("edit", "error"), [(e, x) for _, e, x in FAILURES], ids=[i for i, _, _ in FAILURES]
)
async def test_bad_input_fails_with_its_place_and_keeps_old_results(
    baseline: Baseline, edit: Callable[[Path], None], error: dict[str, Any]
) -> None:
    edit(baseline.data)
    run = await run_once(baseline.settings, baseline.data)
    assert run["errors"] == [error]
    assert run["error_total"] == 1
    where = ":".join(str(p) for p in (error["file"], error["line"], error["column"]) if p)
    assert run["message"].startswith(f"1 input error(s): {where}")
    assert error["message"] in run["message"]
    await assert_failed_and_intact(baseline, run)


COMPOUND_FAILURES = [(i, e, x) for i, e, x in FAILURES if "compound" in i]


@pytest.mark.parametrize(
    ("edit", "error"),
    [(e, x) for _, e, x in COMPOUND_FAILURES],
    ids=[i for i, _, _ in COMPOUND_FAILURES],
)
async def test_partitioned_catalogue_reports_the_same_compound_errors(
    baseline: Baseline, edit: Callable[[Path], None], error: dict[str, Any]
) -> None:
    """A catalogue too large to broadcast is checked per compound partition: the same
    errors, at the same places."""
    edit(baseline.data)
    partitioned = dataclasses.replace(baseline.settings, compound_partitions=3, partitions=2)
    run = await run_once(partitioned, baseline.data)
    assert run["errors"] == [error]
    assert run["error_total"] == 1
    await assert_failed_and_intact(baseline, run)


# Per file: a field quoted early on, and a field of its last row (after every error)
# quoted so that it holds line ends across a cut.
QUOTING = {
    USERS: (b"\tEve,", b'\t"Eve",', b"judy@example.com", b'"judy@' + b"\n" * 24 + b'x.org"'),
    COMPOUNDS: (b"\tCompound A,", b'\t"Compound A",', b"C8H11NO2", b'"C8' + b"\n" * 24 + b'H11"'),
    EXPERIMENTS: (
        b"\n2,\t1,\t2;3,",
        b'\n2,\t1,\t"2;3",',
        b"1;3,\t60",
        b'1;3,\t"60' + b"\n" * 24 + b'"',
    ),
}
HEADER_LINES = {USERS: 2, COMPOUNDS: 1, EXPERIMENTS: 1}  # in the sample
KINDS = {USERS: "users", COMPOUNDS: "compounds", EXPERIMENTS: "experiments"}
ROW_FAILURES = [
    (i, e, x)
    for i, e, x in FAILURES
    if x["line"] is not None
    and x["line"] > HEADER_LINES[x["file"]]
    and x["message"] != "unterminated quoted field"  # it would pair with the quotes added
]


@pytest.mark.parametrize("spans", [False, True], ids=["cut-at-rows", "quote-across-a-cut"])
@pytest.mark.parametrize(
    ("edit", "error"),
    [(e, x) for _, e, x in ROW_FAILURES],
    ids=[i for i, _, _ in ROW_FAILURES],
)
async def test_a_quoted_file_in_ranges_reports_the_same_errors(
    baseline: Baseline,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    edit: Callable[[Path], None],
    error: dict[str, Any],
    spans: bool,
) -> None:
    """A quoted file is read in byte ranges too, each assumed to start at a row: the
    errors of one reader, at the same places. Where a quoted field holds line ends
    across a cut, or a range's reader cannot go on, one reader reads the file again."""
    edit(baseline.data)
    file = error["file"]
    quoted, quoting, spanned, spanning = QUOTING[file]
    replace(baseline.data / file, quoted, quoting)
    if spans:
        replace(baseline.data / file, spanned, spanning)
    monkeypatch.setattr(etl, "RANGE_BYTES", 24)
    ranges = dataclasses.replace(baseline.settings, chunk_bytes=16, workers=2)
    with caplog.at_level(logging.INFO, logger="service.etl"):
        run = await run_once(ranges, baseline.data)
    read_again = f"{KINDS[file]}: a quoted field spans a cut" in caplog.text
    await assert_failed_and_intact(baseline, run)
    one_reader = await run_once(baseline.settings, baseline.data)  # one range: the sample
    assert run["errors"] == one_reader["errors"]
    assert run["error_total"] == one_reader["error_total"] == 1
    assert run["errors"] == [error]
    # An error the reader cannot read past fails a run in skip mode too.
    cannot_go_on = (await run_once(ranges, baseline.data, SKIP))["status"] == "failed"
    assert read_again == (spans or cannot_go_on)


def for_every_file(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        for path in data.iterdir():
            path.write_bytes(edit(path.read_bytes()))

    return apply


def reorder_columns(file: str, order: list[int], extra: bool = False) -> Callable[[Path], None]:
    """Rewrite ``file`` with its fields in ``order``, optionally adding an unknown column."""

    def apply(data: Path) -> None:
        lines = (data / file).read_text().split("\n")
        out = []
        for n, line in enumerate(lines):
            if not line.strip():
                out.append(line)
                continue
            fields = line.split(",\t")
            moved = [fields[i] for i in order]
            if extra:
                moved.insert(1, "comment" if "_id" in line else f"note {n}")
            out.append(",\t".join(moved))
        (data / file).write_text("\n".join(out))

    return apply


# Quirks of real exports that must load exactly the plain sample's results.
SAME_RESULTS: list[tuple[str, Callable[[Path], None]]] = [
    ("bom", for_every_file(lambda b: b"\xef\xbb\xbf" + b)),
    ("crlf", for_every_file(lambda b: b.replace(b"\n", b"\r\n"))),
    ("cr_only", for_every_file(lambda b: b.replace(b"\n", b"\r"))),
    (
        "mixed_line_endings",
        for_every_file(
            lambda b: b.replace(b"\n1", b"\r\n1").replace(b"\n2", b"\r2").replace(b"\n3", b"\r\n3")
        ),
    ),
    (
        "blank_lines_anywhere",
        for_every_file(
            lambda b: (
                b"\n \n"
                + b.replace(b"\n2,", b"\n\n\t\n2,").replace(b"\n5,", b"\n  \n5,")
                + b"\n\n\n"
            )
        ),
    ),
    ("final_newline", for_every_file(lambda b: b + b"\n")),
    (
        "spaces_around_fields",
        for_every_file(lambda b: b.replace(b",\t", b" , ").replace(b"\n", b" \n")),
    ),
    ("plain_commas", for_every_file(lambda b: b.replace(b",\t", b","))),
    ("upper_case_header", for_every_file(lambda b: b.replace(b"user_id", b"USER_ID"))),
    ("columns_in_another_order", reorder_columns(EXPERIMENTS, [3, 1, 0, 2])),
    ("unknown_extra_column_ignored", reorder_columns(USERS, [0, 1, 2, 3], extra=True)),
    ("experiments_csv_name", lambda data: (data / EXPERIMENTS).rename(data / "experiments.csv")),
    (
        "ids_with_leading_zeros",
        both(
            change(EXPERIMENTS, b"\n8,\t7,\t2;3", b"\n0008,\t007,\t002;03"),
            change(USERS, b"\n6,", b"\n06,"),
            change(COMPOUNDS, b"\n1,", b"\n001,"),
        ),
    ),
    (
        "quoted_fields_after_the_tab",
        for_every_file(lambda b: b.replace(b"\tAlice", b'\t"Alice"').replace(b"\t10", b'\t "10"')),
    ),
    (
        "trailing_delimiter_on_header_and_every_row_is_an_unnamed_column",
        lambda data: (data / COMPOUNDS).write_bytes(
            (data / COMPOUNDS).read_bytes().replace(b"\n", b",\n") + b","
        ),
    ),
]


@pytest.mark.parametrize("edit", [e for _, e in SAME_RESULTS], ids=[i for i, _ in SAME_RESULTS])
async def test_valid_quirks_load_the_same_results(
    baseline: Baseline, edit: Callable[[Path], None]
) -> None:
    edit(baseline.data)
    run = await run_once(baseline.settings, baseline.data)
    assert run["status"] == "succeeded", run
    assert run["errors"] == [] and run["error_total"] == 0
    assert await snapshot(baseline.settings) == baseline.tables


def renamed(tables: Tables, user_id: int, name: str) -> Tables:
    """The tables with one user's name changed."""
    out: Tables = {}
    for table, rows in tables.items():
        out[table] = [
            (r[0], name, *r[2:]) if r[0] == user_id and table != "top_compounds" else r
            for r in rows
        ]
    return out


@pytest.mark.parametrize(
    ("quoted", "name"),
    [
        (b'"Smith, Alice"', "Smith, Alice"),
        (b'"Ali\nce"', "Ali\nce"),
        (b'"Ali\r\nce"', "Ali\nce"),
        (b'"Al ""the"" ice"', 'Al "the" ice'),
        (b'"  Alice  "', "Alice"),
    ],
    ids=["comma", "newline", "crlf_becomes_newline", "doubled_quotes", "blanks_stripped"],
)
async def test_quoted_name_after_the_tab_keeps_its_content(
    baseline: Baseline, quoted: bytes, name: str
) -> None:
    replace(baseline.data / USERS, b"Alice", quoted)
    run = await run_once(baseline.settings, baseline.data)
    assert run["status"] == "succeeded", run
    assert await snapshot(baseline.settings) == renamed(baseline.tables, 1, name)


async def test_empty_compound_list_is_an_experiment_without_compounds(baseline: Baseline) -> None:
    replace(baseline.data / EXPERIMENTS, b"\n9,\t8,\t1;2,", b"\n9,\t8,\t ,")
    run = await run_once(baseline.settings, baseline.data)
    assert run["status"] == "succeeded", run
    tables = await snapshot(baseline.settings)
    assert tables["experiment_counts"] == baseline.tables["experiment_counts"]
    assert tables["experiment_averages"] == baseline.tables["experiment_averages"]
    # User 8's only experiment named no compound: no top compound, the others unchanged.
    assert tables["top_compounds"] == [r for r in baseline.tables["top_compounds"] if r[0] != 8]


async def test_largest_bigint_id_is_valid(baseline: Baseline) -> None:
    big = 2**63 - 1
    replace(baseline.data / USERS, b"\n10,", f"\n{big},".encode())
    replace(baseline.data / EXPERIMENTS, b"\n11,\t10,", f"\n{big},\t{big},".encode())
    run = await run_once(baseline.settings, baseline.data)
    assert run["status"] == "succeeded", run
    counts = (await snapshot(baseline.settings))["experiment_counts"]
    assert counts[-1] == (big, "Judy", 1)


async def test_header_only_experiments_give_everyone_zero(baseline: Baseline) -> None:
    header_only(EXPERIMENTS)(baseline.data)
    run = await run_once(baseline.settings, baseline.data)
    assert run["status"] == "succeeded", run
    assert (run["stats"]["users"], run["stats"]["experiments"]) == (10, 0)
    assert run["stats"]["global_average"] == 0
    tables = await snapshot(baseline.settings)
    names = [r[1] for r in baseline.tables["experiment_counts"]]
    assert tables["experiment_counts"] == [
        (uid, name, 0) for uid, name in zip(range(1, 11), names, strict=True)
    ]
    assert tables["experiment_averages"] == [
        (uid, name, 0.0, None) for uid, name in zip(range(1, 11), names, strict=True)
    ]
    assert tables["top_compounds"] == []


async def test_header_only_everywhere_loads_zero_rows(baseline: Baseline) -> None:
    for file in (USERS, EXPERIMENTS, COMPOUNDS):
        header_only(file)(baseline.data)
    run = await run_once(baseline.settings, baseline.data)
    assert run["status"] == "succeeded", run
    assert run["stats"]["rows_loaded"] == dict.fromkeys(baseline.tables, 0)
    assert await snapshot(baseline.settings) == {table: [] for table in baseline.tables}


async def test_header_only_users_make_every_experiment_an_unknown_user(
    baseline: Baseline,
) -> None:
    header_only(USERS)(baseline.data)
    run = await run_once(baseline.settings, baseline.data)
    assert run["error_total"] == 11
    assert run["errors"][0] == err(
        EXPERIMENTS, 2, 2, "unknown user_id 1 (not in users.csv)", "user_id"
    )
    await assert_failed_and_intact(baseline, run)


def big_line_file(path: Path, prefix: bytes, size: int, written: int = 16 << 20) -> None:
    """``prefix`` then one line of ``size`` bytes: ``written`` bytes of x, then a sparse hole.

    Readers give up within the first few megabytes, so the hole's NULs are never reached.
    """
    with path.open("wb") as f:
        f.write(prefix)
        chunk = b"x" * (1 << 20)
        for _ in range(written >> 20):
            f.write(chunk)
        f.truncate(size)


@dataclass(frozen=True)
class Cost:
    seconds: float
    peak_memory: int  # Python allocations, all threads
    bytes_read: int  # by this process, page cache included


def bytes_read_so_far() -> int:
    io = Path("/proc/self/io")
    if not io.exists():
        return 0
    return int(next(ln for ln in io.read_text().split("\n") if ln.startswith("rchar:")).split()[1])


async def run_measured(settings: Settings, data: Path) -> tuple[dict[str, Any], Cost]:
    """A run and what it cost; the run's workers are threads of this process."""
    tracemalloc.start()
    read_before, started = bytes_read_so_far(), time.perf_counter()
    try:
        run = await run_once(settings, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return run, Cost(time.perf_counter() - started, peak, bytes_read_so_far() - read_before)


def assert_cheap(cost: Cost) -> None:
    assert cost.seconds < 3, cost
    assert cost.peak_memory < 64 << 20, cost
    assert cost.bytes_read < 64 << 20, cost


async def test_ten_megabyte_field_fails_fast_in_bounded_memory(baseline: Baseline) -> None:
    data = (baseline.data / USERS).read_bytes()
    head, tail = data.split(b"Carol", 1)
    with (baseline.data / USERS).open("wb") as f:
        f.write(head)
        for _ in range(10):
            f.write(b"C" * (1 << 20))
        f.write(tail)
    run, cost = await run_measured(baseline.settings, baseline.data)
    assert run["errors"] == [err(USERS, 5, 2, f"line longer than {MAX_LINE_CHARS} characters")]
    assert_cheap(cost)
    await assert_failed_and_intact(baseline, run)


async def test_gigabyte_on_one_line_fails_fast_without_reading_it(baseline: Baseline) -> None:
    """A 1 GiB experiments file whose second line never ends.

    The file is sparse after its first 16 MiB (seconds to write, no disk used); the scan
    for quotes stops at the first line over the limit, so neither it nor the reader
    gets near the end.
    """
    header = (baseline.data / EXPERIMENTS).read_bytes().split(b"\n")[0]
    big_line_file(baseline.data / EXPERIMENTS, header + b"\n1,\t1,\t", 1 << 30)
    run, cost = await run_measured(baseline.settings, baseline.data)
    assert run["errors"] == [
        err(EXPERIMENTS, 2, 3, f"line longer than {MAX_LINE_CHARS} characters")
    ]
    assert_cheap(cost)
    await assert_failed_and_intact(baseline, run)


async def test_gigabyte_header_line_fails_fast(baseline: Baseline) -> None:
    big_line_file(baseline.data / USERS, b"\n", 1 << 30)
    run, cost = await run_measured(baseline.settings, baseline.data)
    assert run["errors"] == [err(USERS, 2, 1, f"line longer than {MAX_LINE_CHARS} characters")]
    assert_cheap(cost)
    await assert_failed_and_intact(baseline, run)


def add_unknown_user_rows(data: Path, count: int, first_id: int = 100) -> None:
    """Append ``count`` experiments of a user nobody knows (lines 13, 14, ...)."""
    with (data / EXPERIMENTS).open("ab") as f:
        for i in range(count):
            f.write(f"\n{first_id + i},\t99,\t1,\t5".encode())


async def test_more_than_a_hundred_errors_keeps_the_first_hundred_and_the_total(
    baseline: Baseline,
) -> None:
    add_unknown_user_rows(baseline.data, 150)
    run = await run_once(baseline.settings, baseline.data)
    assert run["error_total"] == 150
    assert len(run["errors"]) == MAX_REPORTED_ERRORS == 100
    assert [e["line"] for e in run["errors"]] == list(range(13, 113))
    assert run["message"].startswith("150 input error(s): user_experiments.csv:13:2 (user_id)")
    assert run["message"].endswith("(and 147 more)")
    await assert_failed_and_intact(baseline, run)


async def test_all_files_are_checked_before_failing(baseline: Baseline) -> None:
    """Problems in several files are reported together, in file order."""
    replace(baseline.data / USERS, b"\n3,", b"\nx,")
    replace(baseline.data / COMPOUNDS, b"\n2,", b"\ny,")
    run = await run_once(baseline.settings, baseline.data)
    assert {(e["file"], e["line"]) for e in run["errors"]} == {(USERS, 5), (COMPOUNDS, 3)}
    await assert_failed_and_intact(baseline, run)


# --- skip mode: bad rows are left out and reported, the rest loads ---------------------------


@dataclass(frozen=True)
class Skipped:
    edit: Callable[[Path], None]
    errors: list[tuple[str, int]]  # (file, line) of every rejected row, in report order
    users: int
    experiments: int
    compounds: int


SKIPPED: dict[str, Skipped] = {
    "bad_run_time": Skipped(
        change(EXPERIMENTS, b",\t45", b",\t-45"), [(EXPERIMENTS, 9)], 10, 10, 3
    ),
    "duplicate_experiment": Skipped(
        change(EXPERIMENTS, b"\n10,\t9,", b"\n3,\t9,"), [(EXPERIMENTS, 11)], 10, 10, 3
    ),
    "wrong_field_count": Skipped(
        change(EXPERIMENTS, b"\n4,\t3,\t2;3", b"\n4,\t3,\t2,\t3"), [(EXPERIMENTS, 5)], 10, 10, 3
    ),
    # A rejected user takes its experiments along: they now name an unknown user.
    "bad_user_and_its_experiment": Skipped(
        change(USERS, b"\n5,", b"\nfive,"), [(USERS, 7), (EXPERIMENTS, 7)], 9, 10, 3
    ),
    # A rejected compound: every experiment naming compound 3 becomes unknown.
    "bad_compound_and_its_experiments": Skipped(
        change(COMPOUNDS, b"\n3,", b"\n3x,"),
        [(COMPOUNDS, 4)] + [(EXPERIMENTS, n) for n in (3, 4, 5, 6, 7, 8, 9, 11, 12)],
        10,
        2,
        2,
    ),
}


@pytest.mark.parametrize("compound_partitions", [None, 3], ids=["broadcast", "partitioned"])
@pytest.mark.parametrize("case", SKIPPED.values(), ids=SKIPPED)
async def test_skip_mode_rejects_bad_rows_and_loads_the_rest(
    baseline: Baseline, case: Skipped, compound_partitions: int | None
) -> None:
    case.edit(baseline.data)
    settings = dataclasses.replace(baseline.settings, compound_partitions=compound_partitions)
    run = await run_once(settings, baseline.data, SKIP)
    assert run["status"] == "succeeded", run
    assert [(e["file"], e["line"]) for e in run["errors"]] == case.errors
    assert run["error_total"] == run["stats"]["rows_rejected"] == len(case.errors)
    stats = run["stats"]
    assert (stats["users"], stats["experiments"], stats["compounds"]) == (
        case.users,
        case.experiments,
        case.compounds,
    )
    tables = await snapshot(baseline.settings)
    assert len(tables["experiment_counts"]) == case.users
    assert sum(r[2] for r in tables["experiment_counts"]) == case.experiments
    assert leftovers(baseline.settings.tmp_dir) == []


async def test_skip_mode_leaves_out_exactly_the_rejected_experiment(baseline: Baseline) -> None:
    replace(baseline.data / EXPERIMENTS, b"\n2,\t1,\t2;3,\t15", b"\n2,\t1,\t2;3,\tslow")
    run = await run_once(baseline.settings, baseline.data, SKIP)
    assert run["errors"] == [
        err(EXPERIMENTS, 3, 4, "'slow' is not a number", "experiment_run_time")
    ]
    tables = await snapshot(baseline.settings)
    alice_count = next(r for r in tables["experiment_counts"] if r[0] == 1)
    alice_average = next(r for r in tables["experiment_averages"] if r[0] == 1)
    assert alice_count[2] == 1
    assert alice_average[2:] == (1 / 10, 10.0)


@pytest.mark.parametrize(("rejected", "status"), [(10, "succeeded"), (11, "failed")])
async def test_skip_mode_fails_beyond_max_errors(
    baseline: Baseline, rejected: int, status: str
) -> None:
    add_unknown_user_rows(baseline.data, rejected)
    run = await run_once(baseline.settings, baseline.data, SKIP)
    assert run["status"] == status
    assert run["error_total"] == rejected
    if status == "failed":
        assert run["message"].startswith(f"{rejected} input error(s)")
        await assert_failed_and_intact(baseline, run)
    else:
        assert run["stats"]["rows_rejected"] == rejected
        assert await snapshot(baseline.settings) == baseline.tables


async def test_skip_mode_reports_a_hundred_of_many_rejected_rows(baseline: Baseline) -> None:
    add_unknown_user_rows(baseline.data, 150)
    run = await run_once(baseline.settings, baseline.data, RunOptions("skip", max_errors=1000))
    assert run["status"] == "succeeded", run
    assert (len(run["errors"]), run["error_total"], run["stats"]["rows_rejected"]) == (
        100,
        150,
        150,
    )
    assert await snapshot(baseline.settings) == baseline.tables


@pytest.mark.parametrize(
    "edit",
    [change(USERS, b"Bob", b"B\x00ob"), change(USERS, b"\tBob", b'\t"Bob'), remove(COMPOUNDS)],
    ids=["nul_byte", "unterminated_quote", "missing_file"],
)
async def test_skip_mode_cannot_skip_an_unreadable_file(
    baseline: Baseline, edit: Callable[[Path], None]
) -> None:
    edit(baseline.data)
    run = await run_once(baseline.settings, baseline.data, SKIP)
    assert run["error_total"] == 1
    await assert_failed_and_intact(baseline, run)
