"""Phase 1: read each file once, validate every row, route valid rows to partitions.

Compounds are few and kept in memory. Users and experiments are written to per-partition
spill files (partition = user_id % partitions), so phase 2 can aggregate one partition
at a time with memory bounded by the partition, not the input. Each batch is validated
by column-wide checks first; only a batch that fails them is walked row by row, which
is also where every error message comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import fastpath
from .csvfile import (
    Batch,
    FilePlan,
    block_batch,
    block_lines,
    count_fields_error,
    iter_batches,
    line_count,
    raw_blocks,
)
from .errors import MAX_REPORTED_ERRORS, ErrorLog, RowError
from .fields import (
    FieldError,
    IdSet,
    IdSpan,
    Referenced,
    compound_lists_known,
    id_limit,
    ids_column,
    parse_compound_list,
    parse_id,
    parse_run_time,
    run_times_column,
)
from .spill import ColumnSpill, LineSpill, Piece


@dataclass(frozen=True)
class Compound:
    id: int
    name: str
    structure: str


@dataclass
class Compounds:
    """Compounds by id, plus the canonical id text used to check lists quickly."""

    by_id: dict[int, Compound] = field(default_factory=dict)
    by_text: dict[str, int] = field(default_factory=dict)


@dataclass
class ScanResult:
    """What a scan of one file (or one byte range of it) found."""

    rows: int = 0  # valid rows kept
    lines: int = 0  # physical lines covered, to shift later ranges' line numbers
    errors: list[RowError] = field(default_factory=list)
    error_total: int = 0
    ids: IdSet = field(default_factory=IdSet)
    span: IdSpan | None = None  # an experiments range's ids, compact for sending back
    users: IdSpan | None = None  # user ids referenced, when scanned before users.csv was read
    fatal: bool = False  # a file-level error stopped the scan
    pieces: list[list[Piece]] = field(default_factory=list)  # spilled rows, by partition


def _stripped(
    batch: Batch, width: int, name: str, log: ErrorLog
) -> tuple[list[list[str]], list[int]]:
    """Strip fields, drop blank lines, reject rows with the wrong number of fields."""
    rows = batch.rows
    if set(map(len, rows)) == {width} and rows:
        stripped = [list(map(str.strip, row)) for row in rows]
        return stripped, list(range(len(rows)))
    kept: list[list[str]] = []
    where: list[int] = []
    for i, row in enumerate(rows):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            log.add(count_fields_error(name, batch.lines[i], len(row), width, row[-1]))
            continue
        kept.append(list(map(str.strip, row)))
        where.append(i)
    return kept, where


def _field_error(plan: FilePlan, line: int, column: str, exc: FieldError | str) -> RowError:
    return RowError(plan.name, line, plan.columns[column] + 1, str(exc), column)


def _batches(plan: FilePlan, start: int | None, end: int | None, block: int) -> Iterator[Batch]:
    yield from iter_batches(plan, start, end, block)


def scan_compounds(plan: FilePlan, log: ErrorLog, block: int = 8 << 20) -> Compounds:
    compounds = Compounds()
    col_id, col_name, col_struct = (
        plan.columns[c] for c in ("compound_id", "compound_name", "compound_structure")
    )
    first_line: dict[int, int] = {}
    for batch in _batches(plan, None, None, block):
        rows, where = _stripped(batch, plan.width, plan.name, log)
        for row, i in zip(rows, where, strict=True):
            line = batch.lines[i]
            try:
                cid = parse_id(row[col_id])
            except FieldError as exc:
                log.add(_field_error(plan, line, "compound_id", exc))
                continue
            if cid in compounds.by_id:
                log.add(
                    _field_error(
                        plan,
                        line,
                        "compound_id",
                        f"duplicate compound_id {cid} (first on line {first_line[cid]})",
                    )
                )
                continue
            first_line[cid] = line
            compounds.by_id[cid] = Compound(cid, row[col_name], row[col_struct])
            compounds.by_text[str(cid)] = cid
    return compounds


def scan_users(
    plan: FilePlan,
    spill_dir: Path,
    partitions: int,
    block: int = 8 << 20,
    keep: int = MAX_REPORTED_ERRORS,
) -> ScanResult:
    """Validate users.csv; spill (user_id, name) by partition; return the set of ids."""
    log = ErrorLog(keep)
    result = ScanResult()
    col_id, col_name = plan.columns["user_id"], plan.columns["name"]
    with ColumnSpill(spill_dir, "users", partitions) as spill:
        for batch in _user_batches(plan, block, result, spill):
            if batch is None:
                continue  # taken by the fast path
            rows, where = _stripped(batch, plan.width, plan.name, log)
            ids = ids_column([r[col_id] for r in rows])
            if ids is None or not result.ids.add_new(ids):
                ids, rows = _users_slowly(plan, batch, rows, where, result.ids, log)
            spill.write(ids, [r[col_name] for r in rows])
            result.rows += len(ids)
    result.errors, result.error_total = log.errors, log.total
    result.pieces = spill.pieces
    return result


def _user_batches(
    plan: FilePlan, block: int, result: ScanResult, spill: ColumnSpill
) -> Iterator[Batch | None]:
    """Blocks the fast path takes are spilled here (None); the others come as batches."""
    if not plan.splittable():
        yield from _batches(plan, None, None, block)
        return
    first = plan.header_line + 1
    block = min(block, fastpath.BLOCK)
    blocks = raw_blocks(plan.path, plan.name, plan.data_offset, plan.size, block, first)
    for data, line_no in blocks:
        lines = block_lines(data, plan.name, line_no)
        taken = fastpath.user_block(lines, plan, result.ids)
        if taken is None:
            yield block_batch(plan, data, line_no)
            continue
        spill.write(*taken)
        result.rows += len(lines)
        yield None


def _users_slowly(
    plan: FilePlan,
    batch: Batch,
    rows: list[list[str]],
    where: list[int],
    seen: IdSet,
    log: ErrorLog,
) -> tuple[list[int], list[list[str]]]:
    col_id = plan.columns["user_id"]
    ids: list[int] = []
    kept: list[list[str]] = []
    for row, i in zip(rows, where, strict=True):
        line = batch.lines[i]
        try:
            uid = parse_id(row[col_id])
        except FieldError as exc:
            log.add(_field_error(plan, line, "user_id", exc))
            continue
        if not seen.add(uid):
            log.add(_field_error(plan, line, "user_id", f"duplicate user_id {uid}"))
            continue
        ids.append(uid)
        kept.append(row)
    return ids, kept


@dataclass(frozen=True)
class ExperimentContext:
    """What an experiments scan needs from the earlier files.

    Without ``users`` (users.csv still being read) every user id passes and the ids
    referenced come back in ``ScanResult.users``, for the caller to check afterwards.
    """

    users: IdSet | Referenced | None
    compounds: dict[str, int]  # canonical id text -> id


def scan_experiments(
    plan: FilePlan,
    context: ExperimentContext,
    spill_dir: Path,
    partitions: int,
    prefix: str = "exp",
    byte_range: tuple[int, int] | None = None,
    block: int = 8 << 20,
    on_batch: Callable[[int], None] | None = None,
    keep: int = MAX_REPORTED_ERRORS,
) -> ScanResult:
    """Validate experiments in a byte range; spill (user_id, run_time, compounds).

    With a ``byte_range``, line numbers in errors are relative to the range start and
    ``result.lines`` says how many lines the range holds.
    """
    log = ErrorLog(keep)
    result = ScanResult()
    referenced = Referenced() if context.users is None else None
    if referenced is not None:
        context = ExperimentContext(referenced, context.compounds)
    start, end = byte_range if byte_range else (None, None)
    c = plan.columns
    ce, cu, cc, ct = (
        c["experiment_id"],
        c["user_id"],
        c["experiment_compound_ids"],
        c["experiment_run_time"],
    )
    with LineSpill(spill_dir, prefix, partitions) as spill:
        for batch in _experiment_batches(plan, start, end, block, context, result, spill):
            if on_batch is not None:
                on_batch(0)
            if batch is None:
                continue  # taken by the fast path
            if batch.lines:
                result.lines = batch.lines[-1] - (0 if byte_range else plan.header_line)
            rows, where = _stripped(batch, plan.width, plan.name, log)
            columns = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
            eids = ids_column(columns[ce]) if rows else []
            uids = ids_column(columns[cu]) if rows else []
            times = run_times_column(columns[ct]) if rows else []
            comps = list(columns[cc]) if rows else []
            fast = (
                eids is not None
                and uids is not None
                and times is not None
                and compound_lists_known(comps, context.compounds)
                and context.users is not None
                and context.users.contains_all(uids)
                and result.ids.add_new(eids)
            )
            if not fast or eids is None or uids is None or times is None:
                uids, times, comps = _experiments_slowly(
                    plan, batch, rows, where, context, result.ids, log
                )
            spill.write_rows(uids, times, comps)
            result.rows += len(uids)
    result.errors, result.error_total = log.errors, log.total
    result.pieces = spill.pieces
    result.span, result.ids = result.ids.span(), IdSet()
    if referenced is not None:
        result.users = referenced.ids.span()
    return result


def _experiment_batches(
    plan: FilePlan,
    start: int | None,
    end: int | None,
    block: int,
    context: ExperimentContext,
    result: ScanResult,
    spill: LineSpill,
) -> Iterator[Batch | None]:
    """Blocks the fast path takes are spilled here (None); the others come as batches."""
    if not fastpath.eligible(plan):
        yield from _batches(plan, start, end, block)
        return
    begin = plan.data_offset if start is None else start
    stop = plan.size if end is None else end
    first = plan.header_line + 1 if start is None else 1
    shift = 0 if start is not None else plan.header_line
    blocks = raw_blocks(plan.path, plan.name, begin, stop, min(block, fastpath.BLOCK), first)
    limit = id_limit(context.compounds)
    for data, line_no in blocks:
        assert context.users is not None
        taken = fastpath.experiment_block(data, context.compounds, context.users, result.ids, limit)
        if taken is None:
            yield block_batch(plan, data, line_no)
            continue
        lines, uids = taken
        spill.write_lines(uids, lines)
        result.rows += len(lines)
        result.lines = line_no + line_count(data) - 1 - shift
        yield None


def _experiments_slowly(
    plan: FilePlan,
    batch: Batch,
    rows: list[list[str]],
    where: list[int],
    context: ExperimentContext,
    seen: IdSet,
    log: ErrorLog,
) -> tuple[list[int], list[float], list[str]]:
    c = plan.columns
    uids: list[int] = []
    times: list[float] = []
    comps: list[str] = []
    for row, i in zip(rows, where, strict=True):
        line = batch.lines[i]
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
            log.add(_field_error(plan, line, column, exc))
            continue
        problem = _reference_problem(uid, compounds, context)
        if problem is not None:
            log.add(_field_error(plan, line, *problem))
            continue
        if not seen.add(eid):
            log.add(_field_error(plan, line, "experiment_id", f"duplicate experiment_id {eid}"))
            continue
        uids.append(uid)
        times.append(run_time)
        comps.append(";".join(map(str, compounds)))
    return uids, times, comps


def _reference_problem(
    uid: int, compounds: list[int], context: ExperimentContext
) -> tuple[str, str] | None:
    if context.users is not None and uid not in context.users:
        return "user_id", f"unknown user_id {uid} (not in users.csv)"
    for cid in compounds:
        if str(cid) not in context.compounds:
            return "experiment_compound_ids", f"unknown compound_id {cid} (not in compounds.csv)"
    return None
