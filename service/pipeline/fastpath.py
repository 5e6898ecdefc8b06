"""Fast paths: a whole block of well-formed rows validated in C-level passes.

Exports written the usual way (ASCII digits, ``,\\t`` or ``,`` between fields, CRLF or LF,
canonical ids) are checked block by block on the raw bytes, without a Python step per
row. A block that deviates in any way is handed back to the general reader, which also
explains errors. What a fast path accepts, the general reader accepts with the same
values: the property tests in tests/test_fastpath.py compare them.
"""

from __future__ import annotations

from itertools import repeat

from .csvfile import FIELD_LIMIT, Batch, FilePlan, fix_opening_quotes, may_hold_line_over
from .fields import compound_lists_valid, ids_column, ids_valid, run_times_valid

# Bytes per block. A block's split fields take ~20x its size: at 256 KiB they stay near the
# core's caches, where 1 MiB blocks went out to memory (two 16 MiB ranges scanned, min of
# six: 10M dense 1529 -> 1269 ms, sparse 1095 -> 786 ms; a quoted users.csv 1444 -> 1333 ms).
BLOCK = 256 << 10
ORDER = ("experiment_id", "user_id", "experiment_compound_ids", "experiment_run_time")
NUMERIC = b"0123456789;."  # what a row leaves without these: its separators and line end

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
    one per line of the block, when every line is a valid row; else None.

    The block's separator (``,\t`` or ``,``) and line end (CRLF or LF) are read off its
    first line; every row must show exactly that shape once digits, dots and semicolons
    are gone. Then one replace and one split give the fields. A tab that does not follow
    its comma would cost the row a field, so a full count of fields proves none is.
    """
    end = data.find(b"\n")
    first = data if end < 0 else data[: end + 1]
    eol = b"\r\n" if first.endswith(b"\r\n") else b"\n"
    sep = b",\t" if b",\t" in first else b","
    if not data.endswith(b"\n"):
        data += eol
    rows = data.count(b"\n")
    if data.translate(None, NUMERIC) != (sep * 3 + eol) * rows:
        return None  # another character, a blank line or a wrong number of fields
    flat = data.replace(eol, sep).split(sep)
    flat.pop()
    if len(flat) != 4 * rows:
        return None  # a tab or CR that is not part of a separator or line end
    columns = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
    if not _valid(columns):
        return None
    if may_hold_line_over(data, FIELD_LIMIT) and max(map(len, columns[2])) > FIELD_LIMIT:
        return None  # over the csv module's field limit: let the general reader say so
    return columns


def _valid(columns: Columns) -> bool:
    """Every id canonical, every run time a plain decimal, every compound list well formed."""
    eids, uids, comps, times = columns
    return (
        ids_valid(eids)
        and ids_valid(uids)
        and run_times_valid(times)
        and compound_lists_valid(comps)
    )


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
    found: Columns = (picked[0], picked[1], picked[2], picked[3])
    return found if _valid(found) else None


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
    flat = _fields(lines, width)
    if flat is None or max(map(len, lines)) > FIELD_LIMIT:
        return None  # a field may be over the csv module's limit: let the reader say so
    return _ids_and_names(
        flat[plan.columns["user_id"] :: width], flat[plan.columns["name"] :: width]
    )


def _fields(lines: list[str], width: int) -> list[str] | None:
    """Every field of lines without quotes, by one split, when each line holds exactly
    ``width - 1`` commas; else None (a blank line or a wrong number of fields)."""
    if set(map(str.count, lines, repeat(","))) != {width - 1}:
        return None
    return ",".join(lines).split(",")


def _ids_and_names(ids: list[str], names: list[str]) -> tuple[list[int], list[str]] | None:
    """The stripped columns as user ids and names, when every id is valid."""
    found = ids_column(list(map(str.strip, ids)))
    return None if found is None else (found, list(map(str.strip, names)))


def quoted_user_block(text: str, plan: FilePlan) -> tuple[list[int], list[str]] | None:
    """``user_block`` for a block's text (each line ended by a newline) with quoted
    fields, such as ``1,<TAB>"Smith, Alice",...``, from a row start. When every quote
    opens or closes a field where the reader places it and no quoted field holds a line
    end or a doubled quote, the commas inside quotes are set aside, the quotes dropped,
    and the plain block's one split gives the fields.

    Else None: the reader then reads the rows (and says what is wrong with them).
    """
    parts = text.split('"')
    if len(parts) % 2 == 0:
        return None  # a quoted field goes on past the block
    if len(parts) == 1:
        lines = text.split("\n")
        lines.pop()
        return user_block(lines, plan)
    if not may_hold_line_over(text, FIELD_LIMIT):
        taken = _quoted_columns(text, parts, plan)
        if taken is not None:
            return taken
    if not _quotes_open_fields(parts):
        parts, misplaced = fix_opening_quotes(parts)
        if misplaced is not None or "" in parts[2:-1:2]:
            return None  # a quote in an unquoted field, or a doubled quote
    inside = '"'.join(parts[1::2])
    if "\n" in inside:
        return None  # a line end inside quotes
    # Commas inside quotes set aside as NUL (the decoder refuses it in the data), all
    # quoted fields at once: a quote is the one character none of them holds now.
    parts[1::2] = inside.replace(",", "\x00").split('"')
    plain = "".join(parts).split("\n")
    plain.pop()
    taken = user_block(plain, plan)
    if taken is None:
        return None
    ids, names = taken
    joined = "\n".join(names)
    return ids, joined.replace("\x00", ",").split("\n") if "\x00" in joined else names


def _quoted_columns(
    text: str, parts: list[str], plan: FilePlan
) -> tuple[list[int], list[str]] | None:
    """The usual quoted block, where every line quotes the same columns, each whole:
    right after a delimiter (one blank at most) or a line start, closed right before a
    delimiter or line end. Else None, whatever the reason (the caller looks closer).

    Each quoted field is left as a lone quote, so the plain split gives every field;
    a quoted column's values are then the insides of the quotes, in order.
    """
    inside = parts[1::2]
    quotes = len(inside)
    # A glance at the block's first lines first: where only some fields are quoted (as
    # most writers quote, where needed), they will not all quote the same number, and
    # the first line often quotes none.
    first = text.count('"', 0, text.find("\n"))
    head = text.rfind("\n", 0, 8192) + 1
    if not first or first * text.count("\n", 0, head) != text.count('"', 0, head):
        return None
    if "\n" in "".join(inside):
        return None  # a line end inside quotes
    # One blank before an opening quote goes, as the reader drops it.
    shell = '"'.join(parts[0::2]).replace(', "', ',"').replace(',\t"', ',"')
    lines = shell.split("\n")
    lines.pop()
    width = plan.width
    flat = _fields(lines, width)
    if flat is None:
        return None
    # Each lone quote must be a field of its own, in the columns the first line quotes:
    # as many such fields as quotes, so none is elsewhere (a doubled quote is not one).
    quoted = [c for c in range(width) if flat[c] == '"']
    if len(quoted) * len(lines) != quotes:
        return None
    if any(flat[c::width].count('"') != len(lines) for c in quoted):
        return None  # another line quotes other columns

    def column(name: str) -> list[str]:
        c = plan.columns[name]
        return inside[quoted.index(c) :: len(quoted)] if c in quoted else flat[c::width]

    return _ids_and_names(column("user_id"), column("name"))


_OPENS = (",", "\n", ", ", ",\t")  # what comes before an opening quote, usually


def _quotes_open_fields(parts: list[str]) -> bool:
    """The usual form, in one C-level pass over the parts before opening quotes: each
    follows a delimiter (and at most one blank) or a line start. The blank stays:
    ``user_block`` strips its fields, as the reader's rows are stripped. Anything else
    takes ``fix_opening_quotes``. (An empty part, a doubled quote, is not of this form.)
    """
    openers = parts[0:-1:2]
    if openers[0] == "":
        openers = openers[1:]  # the block starts with a quote: a row start
    return all(map(str.endswith, openers, repeat(_OPENS)))
