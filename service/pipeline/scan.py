"""Phase 1: read each byte range of a file once, check every field, spill by partition.

A scan task needs nothing from the other files and keeps no state beyond its block: the
checks that need more than one row (duplicate ids, references between files) are made
later, per partition, where all rows with the same key meet. Each block is validated by
column-wide checks first; only a block that fails them is walked row by row, which is
also where every field error's message comes from. Line numbers are absolute: a range
knows the number of its first line from the plan.

What is spilled, each row under the canonical text of its key:
- users, by user id: pickled (user ids, names, line numbers) column batches;
- experiments, by user id: lines ``user_id,compound_ids,run_time,line``;
- experiments, by experiment id: lines ``experiment_id``;
- compounds, by compound id: pickled (ids, names, structures, line numbers) batches;
- where the catalogue is partitioned, each range's distinct compound ids, by compound id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from . import fastpath
from .csvfile import (
    Batch,
    ByteRange,
    FilePlan,
    block_batch,
    block_lines,
    block_text,
    count_fields_error,
    iter_batches,
    raw_blocks,
)
from .errors import MAX_REPORTED_ERRORS, ErrorLog, FileError, RowError
from .fields import FieldError, parse_compound_list, parse_id, parse_run_time
from .spill import ColumnSpill, LineSpill, SpillIndex, canonical_keys, partitions_of

Stop = Callable[[], None]  # raises when the run is cancelled
# Distinct compound ids a scan holds before it spills them (a partitioned catalogue):
# the set stays a few MB, and a range's repeats of the popular compounds still merge.
REFERENCES_HELD = 1 << 16
Taken = TypeVar("Taken", tuple[list[int], list[str]], fastpath.Columns)  # a block's columns


@dataclass
class ScanResult:
    """What a scan of one byte range of a file found."""

    rows: int = 0  # rows whose fields are valid, spilled
    errors: list[RowError] = field(default_factory=list)
    error_total: int = 0
    fatal: bool = False  # a file-level error stopped the scan
    spills: dict[str, SpillIndex] = field(default_factory=dict)  # kind of spill -> its index
    part: ByteRange | None = None  # the range an experiments scan read


def _stripped(
    batch: Batch, width: int, name: str, log: ErrorLog
) -> tuple[list[list[str]], list[int]]:
    """Strip fields, drop blank lines, reject rows with the wrong number of fields."""
    rows = batch.rows
    if set(map(len, rows)) == {width} and rows:
        stripped = [list(map(str.strip, row)) for row in rows]
        return stripped, list(batch.lines)
    kept: list[list[str]] = []
    lines: list[int] = []
    for i, row in enumerate(rows):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            log.add(count_fields_error(name, batch.lines[i], len(row), width, row[-1]))
            continue
        kept.append(list(map(str.strip, row)))
        lines.append(batch.lines[i])
    return kept, lines


def field_error(plan: FilePlan, line: int, column: str, exc: FieldError | str) -> RowError:
    return RowError(plan.name, line, plan.columns[column] + 1, str(exc), column)


def _raw_or_batches(
    plan: FilePlan, part: ByteRange, block: int, fast: bool
) -> Iterator[tuple[bytes, int] | Batch]:
    """Raw blocks where a fast path may take them, parsed batches elsewhere."""
    # Parsed rows cost more memory per byte than split fields: never more than a fast
    # block's bytes at a time (a quoted 69 MB users.csv in 8 MiB batches: 124 MB peak;
    # 1M experiments with their columns in another order in 8 MiB blocks: 356 MB).
    size = min(block, fastpath.BLOCK)
    if not plan.splittable():  # the sequential reader, over a range (see split_ranges)
        yield from iter_batches(plan, part.start, part.end, size, part.first_line)
        return
    for data, line_no in raw_blocks(
        plan.path, plan.name, part.start, part.end, size, part.first_line, lf_only=True
    ):
        yield (data, line_no) if fast else block_batch(plan, data, line_no)


def scan_compounds(
    plan: FilePlan,
    part: ByteRange,
    spill_dir: Path,
    prefix: str,
    partitions: int,
    block: int = 8 << 20,
    stop: Stop | None = None,
    keep: int = MAX_REPORTED_ERRORS,
) -> ScanResult:
    """Check a range of compounds.csv; spill (id, name, structure, line) by compound
    partition. Duplicates are found per partition (``check_compounds``)."""
    log = ErrorLog(keep)
    result = ScanResult()
    with ColumnSpill(spill_dir, prefix, partitions) as spill:
        for batch in _raw_or_batches(plan, part, block, fast=False):
            assert isinstance(batch, Batch)
            if stop is not None:
                stop()
            cids, (names, structures), kept = _keyed_rows(
                plan, batch, log, "compound_id", ("compound_name", "compound_structure")
            )
            parts = partitions_of(canonical_keys(cids), partitions)
            spill.write(parts, cids, names, structures, kept)
            result.rows += len(cids)
    result.errors, result.error_total = log.errors, log.total
    result.spills = {"compounds": spill.index}
    return result


def scan_users(
    plan: FilePlan,
    part: ByteRange,
    spill_dir: Path,
    prefix: str,
    partitions: int,
    block: int = 8 << 20,
    stop: Stop | None = None,
    keep: int = MAX_REPORTED_ERRORS,
    quoted_blocks: bool = True,
) -> ScanResult:
    """Check a range of users.csv; spill (user_id, name, line) by user partition.

    A quoted file is first tried by fast-path blocks (``quoted_users``), unless
    ``quoted_blocks`` is False: then, as when they refuse it, the readers read it.
    """
    if quoted_blocks and plan.quoted and not plan.lone_cr:
        fast = quoted_users(plan, part, spill_dir, prefix, partitions, stop)
        if fast is not None:
            return fast
    log = ErrorLog(keep)
    result = ScanResult()

    def by_block(data: bytes, line_no: int) -> tuple[list[int], list[str]] | None:
        return fastpath.user_block(block_lines(data, plan.name, line_no), plan)

    rows = _tiers(plan, part, block, True, stop, log, by_block, fastpath.user_rows, _users_slowly)
    with ColumnSpill(spill_dir, prefix, partitions) as spill:
        for (uids, names), lines in rows:
            spill.write(partitions_of(canonical_keys(uids), partitions), uids, names, lines)
            result.rows += len(uids)
    result.errors, result.error_total = log.errors, log.total
    result.spills = {"users": spill.index}
    return result


def quoted_users(
    plan: FilePlan,
    part: ByteRange,
    spill_dir: Path,
    prefix: str,
    partitions: int,
    stop: Stop | None,
    block: int = fastpath.BLOCK,
) -> ScanResult | None:
    """A range of a users.csv with quotes, by fast-path blocks where they all take it,
    else None.

    Blocks cut at line ends are read in order; while each one's quotes are all placed
    and none holds a line end, the next block starts at a row start too. The first
    block the fast path refuses (or that cannot be decoded) ends this try: the reader
    then reads the range again, as it would have, and says what is wrong.
    """
    result = ScanResult()
    blocks = raw_blocks(
        plan.path, plan.name, part.start, part.end, block, part.first_line, lf_only=True
    )
    with ColumnSpill(spill_dir, prefix, partitions) as spill:
        try:
            for data, line_no in blocks:
                if stop is not None:
                    stop()
                taken = fastpath.quoted_user_block(block_text(data, plan.name, line_no), plan)
                if taken is None:
                    return None
                uids, names = taken
                where = range(line_no, line_no + len(uids))
                spill.write(partitions_of(canonical_keys(uids), partitions), uids, names, where)
                result.rows += len(uids)
        except FileError:
            return None  # undecodable or a line over the limit: the reader's to report
    result.spills = {"users": spill.index}
    return result


def _users_slowly(
    plan: FilePlan, batch: Batch, log: ErrorLog
) -> tuple[tuple[list[int], list[str]], list[int]]:
    """The rows of a batch one by one: user ids, names, lines; bad rows go to ``log``."""
    uids, (names,), kept = _keyed_rows(plan, batch, log, "user_id", ("name",))
    return (uids, names), kept


def _keyed_rows(
    plan: FilePlan, batch: Batch, log: ErrorLog, key: str, others: Sequence[str]
) -> tuple[list[int], list[list[str]], list[int]]:
    """The rows of a batch one by one: the ids of column ``key``, the ``others`` columns
    and the lines; rows with a bad id go to ``log``."""
    col_id = plan.columns[key]
    picked = [plan.columns[c] for c in others]
    ids: list[int] = []
    columns: list[list[str]] = [[] for _ in picked]
    kept: list[int] = []
    rows, lines = _stripped(batch, plan.width, plan.name, log)
    for row, line in zip(rows, lines, strict=True):
        try:
            ids.append(parse_id(row[col_id]))
        except FieldError as exc:
            log.add(field_error(plan, line, key, exc))
            continue
        for column, c in zip(columns, picked, strict=True):
            column.append(row[c])
        kept.append(line)
    return ids, columns, kept


def scan_experiments(
    plan: FilePlan,
    part: ByteRange,
    spill_dir: Path,
    prefix: str,
    partitions: int,
    block: int = 8 << 20,
    stop: Stop | None = None,
    keep: int = MAX_REPORTED_ERRORS,
    compound_partitions: int = 1,
) -> ScanResult:
    """Check a range of the experiments; spill each valid row by user and by experiment id.

    The id spill holds the ids alone: the lines of a repeated id, which only an error
    needs, are found again in the ranges that hold it (``check_experiment_ids``). With
    the catalogue in ``compound_partitions`` > 1 partitions, the range's distinct
    compound ids are spilled by compound partition too, for the reference check.
    """
    log = ErrorLog(keep)
    result = ScanResult(part=part)
    referenced: set[bytes] = set()
    with ExitStack() as files:
        by_user = files.enter_context(LineSpill(spill_dir, f"{prefix}-u", partitions))
        by_id = files.enter_context(LineSpill(spill_dir, f"{prefix}-e", partitions))
        refs = None
        if compound_partitions > 1:
            refs = files.enter_context(LineSpill(spill_dir, f"{prefix}-c", compound_partitions))
        for (eids, uids, comps, times), numbers in experiment_columns(plan, part, block, log, stop):
            lines = _line_texts(numbers)
            user_rows = list(map(b",".join, zip(uids, comps, times, lines, strict=True)))
            by_user.write_lines(partitions_of(uids, partitions), user_rows)
            by_id.write_lines(partitions_of(eids, partitions), eids)
            if refs is not None:
                referenced.update(b";".join(comps).split(b";"))
                if len(referenced) > REFERENCES_HELD:
                    _spill_references(refs, referenced)
            result.rows += len(eids)
        if refs is not None:
            _spill_references(refs, referenced)
    result.errors, result.error_total = log.errors, log.total
    result.spills = {"by_user": by_user.index, "by_id": by_id.index}
    if refs is not None:
        result.spills["compound_refs"] = refs.index
    return result


def _spill_references(spill: LineSpill, referenced: set[bytes]) -> None:
    """The distinct compound ids seen since the last call, by compound partition."""
    referenced.discard(b"")  # experiments without compounds
    ids = list(referenced)
    referenced.clear()
    spill.write_lines(partitions_of(ids, spill.partitions), ids)


def experiment_columns(
    plan: FilePlan, part: ByteRange, block: int, log: ErrorLog, stop: Stop | None = None
) -> Iterator[tuple[fastpath.Columns, Sequence[int]]]:
    """The valid rows of each block of a range as canonical tokens, with their lines;
    bad rows go to ``log``."""

    def by_block(data: bytes, _line_no: int) -> fastpath.Columns | None:
        return fastpath.experiment_block(data)

    fast = fastpath.eligible(plan)
    by_rows = fastpath.experiment_rows
    return _tiers(plan, part, block, fast, stop, log, by_block, by_rows, _experiments_slowly)


def _tiers(
    plan: FilePlan,
    part: ByteRange,
    block: int,
    fast: bool,
    stop: Stop | None,
    log: ErrorLog,
    by_block: Callable[[bytes, int], Taken | None],
    by_rows: Callable[[Batch, FilePlan], Taken | None],
    slowly: Callable[[FilePlan, Batch, ErrorLog], tuple[Taken, Sequence[int]]],
) -> Iterator[tuple[Taken, Sequence[int]]]:
    """Each block's valid rows, with their lines, from the cheapest tier that takes it:
    the fast path on the raw block, the same checks on the rows the reader parsed, or
    row by row (``slowly``, which also says what is wrong with the others)."""
    for item in _raw_or_batches(plan, part, block, fast):
        if stop is not None:
            stop()
        if isinstance(item, Batch):
            batch = item
        else:
            data, line_no = item
            taken = by_block(data, line_no)
            if taken is not None:
                yield taken, range(line_no, line_no + len(taken[0]))
                continue
            batch = block_batch(plan, data, line_no)
        taken = by_rows(batch, plan)
        yield (taken, batch.lines) if taken is not None else slowly(plan, batch, log)


def _line_texts(lines: Sequence[int]) -> list[bytes]:
    """The numbers as ASCII tokens; a fast-path block's lines are consecutive."""
    if not lines:
        return []
    if isinstance(lines, range):
        return consecutive_text(lines.start, lines.stop).encode("ascii").split(b",")
    return ",".join(map(str, lines)).encode("ascii").split(b",")


_THOUSAND = ",".join(f"{i:03d}" for i in range(1000))  # "000,001,...,999"


def consecutive_text(start: int, stop: int) -> str:
    """``",".join(map(str, range(start, stop)))``, whole thousands without a ``str()`` each.

    Numbers ``p000`` to ``p999`` are one ``replace`` of a template: a block's line
    numbers, in any export, are consecutive.
    """
    low = max(-(-start // 1000), 1)  # the first whole thousand, never the one with no prefix
    high = stop // 1000
    if low >= high:
        return ",".join(map(str, range(start, stop)))
    parts = [",".join(map(str, range(start, low * 1000)))] if start < low * 1000 else []
    parts += (f"{p}" + _THOUSAND.replace(",", f",{p}") for p in range(low, high))
    if high * 1000 < stop:
        parts.append(",".join(map(str, range(high * 1000, stop))))
    return ",".join(parts)


def _experiments_slowly(
    plan: FilePlan, batch: Batch, log: ErrorLog
) -> tuple[fastpath.Columns, list[int]]:
    """The rows of a batch one by one, as canonical tokens; bad rows go to ``log``."""
    c = plan.columns
    eids: list[bytes] = []
    uids: list[bytes] = []
    comps: list[bytes] = []
    times: list[bytes] = []
    kept: list[int] = []
    rows, lines = _stripped(batch, plan.width, plan.name, log)
    for row, line in zip(rows, lines, strict=True):
        try:
            column = "experiment_id"
            eid = parse_id(row[c[column]])
            column = "user_id"
            uid = parse_id(row[c[column]])
            column = "experiment_compound_ids"
            compounds = parse_compound_list(row[c[column]])
            column = "experiment_run_time"
            run_time = parse_run_time(row[c[column]])
        except FieldError as exc:
            log.add(field_error(plan, line, column, exc))
            continue
        eids.append(b"%d" % eid)
        uids.append(b"%d" % uid)
        comps.append(";".join(map(str, compounds)).encode("ascii"))
        times.append(repr(run_time).encode("ascii"))
        kept.append(line)
    return (eids, uids, comps, times), kept
