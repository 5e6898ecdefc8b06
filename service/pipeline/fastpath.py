"""Fast paths: a whole block of well-formed rows validated in C-level passes.

Exports written the usual way (ASCII digits, ``,\\t`` or ``,`` between fields, CRLF or LF,
canonical ids) are checked block by block on the raw bytes, without a Python step per
row. A block that deviates in any way is handed back to the general reader, which also
explains errors. What a fast path accepts, the general reader accepts with the same
values: the property tests in tests/test_fastpath.py compare them.
"""

from __future__ import annotations

from itertools import repeat

from .csvfile import FIELD_LIMIT, Batch, FilePlan
from .fields import compound_lists_valid, ids_column, ids_valid, run_times_valid

BLOCK = 1 << 20  # bytes per block: a block's split fields cost ~20x its size in memory
ORDER = ("experiment_id", "user_id", "experiment_compound_ids", "experiment_run_time")
NUMERIC = b"0123456789;."
ROW_SHAPE = b",,,\n"  # what a row leaves once its digits, dots and semicolons are gone

Columns = tuple[list[bytes], list[bytes], list[bytes], list[bytes]]


def eligible(plan: FilePlan) -> bool:
    """Only files read in byte ranges with exactly the four columns, in order."""
    return (
        plan.splittable()
        and plan.width == len(ORDER)
        and [plan.columns[c] for c in ORDER] == list(range(len(ORDER)))
    )


def experiment_block(data: bytes) -> Columns | None:
    """(experiment ids, user ids, compound lists, run times) as canonical ASCII tokens,
    one per line of the block, when every line is a valid row; else None."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    if b"\t" in data or b" " in data:
        data = data.replace(b",\t", b",")
        if b"\t" in data or b" " in data:
            return None
    if not data.endswith(b"\n"):
        data += b"\n"
    rows = data.count(b"\n")
    if data.translate(None, NUMERIC) != ROW_SHAPE * rows:
        return None  # another character, a blank line or a wrong number of fields
    flat = data.replace(b"\n", b",").split(b",")
    flat.pop()
    eids, uids, comps, times = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
    if not (
        ids_valid(eids)
        and ids_valid(uids)
        and run_times_valid(times)
        and compound_lists_valid(comps)
    ):
        return None
    if len(data) > FIELD_LIMIT and max(map(len, comps)) > FIELD_LIMIT:
        return None  # over the csv module's field limit: let the general reader say so
    return eids, uids, comps, times


def experiment_rows(batch: Batch, plan: FilePlan) -> Columns | None:
    """``experiment_block`` for rows the csv module parsed (quoted files, other column
    orders): the same checks, column by column, on the stripped fields."""
    if not _full(batch, plan):
        return None
    columns = list(zip(*batch.rows, strict=True))
    picked: list[list[bytes]] = []
    for name in ORDER:
        text = "\n".join(map(str.strip, columns[plan.columns[name]]))
        tokens = text.encode("ascii").split(b"\n") if text.isascii() else []
        if len(tokens) != len(batch.rows):
            return None  # not ASCII, or a line end inside a field
        picked.append(tokens)
    eids, uids, comps, times = picked
    if not (
        ids_valid(eids)
        and ids_valid(uids)
        and run_times_valid(times)
        and compound_lists_valid(comps)
    ):
        return None
    return eids, uids, comps, times


def user_rows(batch: Batch, plan: FilePlan) -> tuple[list[int], list[str]] | None:
    """(user ids, names) of rows the csv module parsed, when every row is valid."""
    if not _full(batch, plan):
        return None
    columns = list(zip(*batch.rows, strict=True))
    ids = ids_column(list(map(str.strip, columns[plan.columns["user_id"]])))
    if ids is None:
        return None
    return ids, list(map(str.strip, columns[plan.columns["name"]]))


def _full(batch: Batch, plan: FilePlan) -> bool:
    """Every row has the header's number of fields (a blank line has none)."""
    return bool(batch.rows) and set(map(len, batch.rows)) == {plan.width}


def user_block(lines: list[str], plan: FilePlan) -> tuple[list[int], list[str]] | None:
    """(user ids, names) when every line of a users block is valid, else None.

    Without quotes a field is what lies between commas, so one ``split`` gives every
    field once each line is known to hold exactly ``width - 1`` commas.
    """
    width = plan.width
    if set(map(str.count, lines, repeat(","))) != {width - 1}:
        return None  # a blank line or a wrong number of fields
    if max(map(len, lines)) > FIELD_LIMIT:
        return None  # a field may be over the csv module's limit: let it say so
    flat = ",".join(lines).split(",")
    ids = ids_column(list(map(str.strip, flat[plan.columns["user_id"] :: width])))
    if ids is None:
        return None
    return ids, list(map(str.strip, flat[plan.columns["name"] :: width]))
