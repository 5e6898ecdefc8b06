"""Streaming CSV reading with the stdlib ``csv`` module, in the lab's export format.

The exports put a comma *and a tab* between fields, may start with blank lines and may
lack a final newline. So fields and header names are stripped, blank lines are skipped,
RFC 4180 quoting works even after the tab, a UTF-8 BOM is accepted and CRLF, LF and CR
all end a line. Files are read in large byte blocks cut at line ends, which lets a file
without quotes be split into byte ranges and parsed by several processes at once.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from .errors import FileError, RowError

BOM = b"\xef\xbb\xbf"
MAX_LINE_CHARS = 1024 * 1024
ENCODING_HINT = "; not UTF-8? give the file's encoding (option encoding, e.g. latin-1 or cp1252)"
csv.field_size_limit(128 * 1024)
FIELD_LIMIT = csv.field_size_limit()


@dataclass(frozen=True)
class TableSpec:
    """What one input file must contain."""

    kind: str
    filenames: tuple[str, ...]
    columns: tuple[str, ...]


USERS = TableSpec("users", ("users.csv",), ("user_id", "name", "email", "signup_date"))
EXPERIMENTS = TableSpec(
    "experiments",
    ("user_experiments.csv", "experiments.csv"),
    ("experiment_id", "user_id", "experiment_compound_ids", "experiment_run_time"),
)
COMPOUNDS = TableSpec(
    "compounds", ("compounds.csv",), ("compound_id", "compound_name", "compound_structure")
)
SPECS = (USERS, EXPERIMENTS, COMPOUNDS)


@dataclass(frozen=True)
class FilePlan:
    """A validated header and what is known about the bytes after it."""

    path: Path
    name: str
    size: int
    data_offset: int  # first byte after the header line
    header_line: int  # physical line number of the header
    columns: dict[str, int]  # required column -> field index
    width: int  # number of fields in the header
    quoted: bool  # the data contains a quote: must be read by one sequential reader
    lone_cr: bool  # some line ends are a bare CR: cannot be split at LF

    def splittable(self) -> bool:
        return not (self.quoted or self.lone_cr)


def find_file(directory: Path, spec: TableSpec) -> Path:
    present = [directory / name for name in spec.filenames if (directory / name).is_file()]
    if not present:
        names = " or ".join(spec.filenames)
        raise FileError(RowError(spec.filenames[0], None, None, f"missing file: expected {names}"))
    if len(present) > 1:
        names = " and ".join(p.name for p in present)
        raise FileError(
            RowError(present[1].name, None, None, f"ambiguous input: both {names} exist")
        )
    return present[0]


def _scan_bytes(path: Path, start: int, block: int) -> tuple[bool, bool]:
    """Whether the data holds a quote and whether it has bare-CR line ends.

    A line too long for any reader stops the scan early, reported as quoted: the one
    sequential reader then fails on it without this scan reading a huge file to the end.
    """
    quoted = lone_cr = False
    run = 0  # bytes since the last line end
    with path.open("rb") as f:
        f.seek(start)
        tail = b""
        while chunk := f.read(block):
            quoted = quoted or b'"' in chunk
            if not lone_cr and b"\r" in chunk:
                both = tail + chunk
                lone_cr = both.count(b"\r") != both.count(b"\r\n") + both.endswith(b"\r")
            tail = chunk[-1:]
            line_end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
            run = run + len(chunk) if line_end < 0 else len(chunk) - line_end - 1
            if run > MAX_LINE_CHARS * 4:
                return True, lone_cr
        lone_cr = lone_cr or tail == b"\r"
    return quoted, lone_cr


def plan_file(path: Path, spec: TableSpec, block: int = 8 * 1024 * 1024) -> FilePlan:
    """Read and check the header; note whether the rest may be split into ranges."""
    name = path.name
    size = path.stat().st_size
    header, header_line, offset = _read_header(path, name)
    columns: dict[str, int] = {}
    folded = [h.lower() for h in header]
    for wanted in spec.columns:
        hits = [i for i, h in enumerate(folded) if h == wanted]
        if not hits:
            raise FileError(
                RowError(name, header_line, None, f"missing column {wanted!r} in header", wanted)
            )
        if len(hits) > 1:
            raise FileError(
                RowError(name, header_line, hits[1] + 1, f"duplicate column {wanted!r}", wanted)
            )
        columns[wanted] = hits[0]
    quoted, lone_cr = _scan_bytes(path, offset, block)
    return FilePlan(path, name, size, offset, header_line, columns, len(header), quoted, lone_cr)


_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n|$)")


def _read_header(path: Path, name: str) -> tuple[list[str], int, int]:
    """The first non-blank line's names, its line number and the offset after it."""
    with path.open("rb") as f:
        raw = f.read(MAX_LINE_CHARS * 4)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FileError(RowError(name, 1, 1, "UTF-16 text (byte order mark); save it as UTF-8"))
    pos = len(BOM) if raw.startswith(BOM) else 0
    line_no = 1
    while pos < len(raw):
        match = _LINE.match(raw, pos)
        assert match is not None  # the pattern matches the empty string
        if not match.group(2) and len(raw) == MAX_LINE_CHARS * 4:
            raise _too_long(name, line_no, match.group(1).decode("utf-8", "replace"))
        text = _decode(match.group(1), name, line_no)
        if text.strip():
            return _parse_header_line(text, name, line_no), line_no, match.end()
        pos = match.end()
        line_no += 1
    raise FileError(RowError(name, None, None, "empty file: no header line"))


def _parse_header_line(line: str, name: str, line_no: int) -> list[str]:
    rows = list(csv.reader(_LenientQuotes([line + "\n"], name, line_no)))
    return [h.strip() for h in rows[0]] if rows else []


def _decode(data: bytes, name: str, first_line: int) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line_start = before.rfind(b"\n") + 1
        prefix = before[line_start:].decode("utf-8", "replace")
        raise FileError(
            RowError(
                name,
                first_line + before.count(b"\n"),
                prefix.count(",") + 1,
                f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at character {len(prefix) + 1})"
                + ENCODING_HINT,
            )
        ) from None
    if "\x00" in text:
        at = text.index("\x00")
        line_start = text.rfind("\n", 0, at) + 1
        raise FileError(
            RowError(
                name,
                first_line + text.count("\n", 0, at),
                text.count(",", line_start, at) + 1,
                f"NUL byte at character {at - line_start + 1}",
            )
        )
    return text


def raw_blocks(
    path: Path, name: str, start: int, end: int, block: int, first_line: int = 1
) -> Iterator[tuple[bytes, int]]:
    """Yield (bytes cut at a line end, number of its first line), undecoded."""
    line_no = first_line
    with path.open("rb") as f:
        f.seek(start)
        pos = start
        carry = b""
        while pos < end or carry:
            data = f.read(min(block, end - pos)) if pos < end else b""
            pos += len(data)
            data = carry + data
            if not data:
                break
            if pos < end:
                cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
                if cut == 0:
                    if len(data) > MAX_LINE_CHARS * 4:
                        head = data[: MAX_LINE_CHARS * 4].decode("utf-8", "replace")
                        raise _too_long(name, line_no, head)
                    carry = data
                    continue
                carry, data = data[cut:], data[:cut]
            else:
                carry = b""
            yield data, line_no
            line_no += line_count(data)


def line_count(data: bytes) -> int:
    """Lines in a block as the reader splits them: CRLF, LF and CR each end one."""
    ends = data.count(b"\n")
    if b"\r" in data:
        ends += data.count(b"\r") - data.count(b"\r\n")
    return ends + (not data.endswith((b"\n", b"\r")))


def block_lines(data: bytes, name: str, line_no: int) -> list[str]:
    """A block's lines: decoded, line ends unified, no line over the limit."""
    text = _decode(data, name, line_no)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if max(map(len, lines), default=0) > MAX_LINE_CHARS:
        long_at = next(i for i, ln in enumerate(lines) if len(ln) > MAX_LINE_CHARS)
        raise _too_long(name, line_no + long_at, lines[long_at])
    return lines


def _blocks(
    path: Path, name: str, start: int, end: int, block: int, first_line: int = 1
) -> Iterator[tuple[list[str], int]]:
    """Yield (lines, number of the first line); ``first_line`` is the line at ``start``."""
    for data, line_no in raw_blocks(path, name, start, end, block, first_line):
        yield block_lines(data, name, line_no), line_no


def _field_lengths(text: str, quoted: bool = False) -> list[int]:
    """The lengths of a line's fields, quotes honoured; ``quoted``: it starts inside one."""
    lengths = [0]
    for k, part in enumerate(text.split('"')):
        if (k % 2 == 1) != quoted:
            lengths[-1] += len(part)
        else:
            first, *rest = part.split(",")
            lengths[-1] += len(first)
            lengths.extend(map(len, rest))
    return lengths


def _too_long(name: str, line: int, text: str) -> FileError:
    """A line over the limit, at the field holding its first character past the limit."""
    column = len(_field_lengths(text[:MAX_LINE_CHARS]))
    return FileError(RowError(name, line, column, f"line longer than {MAX_LINE_CHARS} characters"))


def _csv_error(
    name: str, line: int, text: str, exc: csv.Error, field: int = 1, opened: int | None = None
) -> FileError:
    """A ``csv`` failure on ``text``, which starts at ``field`` (inside a quoted field
    opened on line ``opened``, if given). In practice: a field over the size limit."""
    if "field limit" not in str(exc):
        return FileError(RowError(name, line, None, f"CSV error: {exc}"))
    lengths = _field_lengths(text, opened is not None)
    over = [i for i, n in enumerate(lengths) if n > FIELD_LIMIT]
    # Without a field over the limit on this line, it is the one continued from before.
    at = over[0] if over else 0 if opened is not None else lengths.index(max(lengths))
    if at == 0 and opened is not None:
        line = opened
    message = f"field longer than {FIELD_LIMIT} characters"
    return FileError(RowError(name, line, field + at, message))


class _LenientQuotes:
    """Feeds lines to ``csv.reader`` with blanks before an opening quote removed.

    The csv module only honours a quote at the very start of a field; the exports put a
    tab there. This mirrors the reader's own states so it never touches quoted content,
    and remembers where a quoted field opened to report one that never closes.
    """

    START, UNQUOTED, QUOTED, AFTER_QUOTE = range(4)

    def __init__(self, lines: Iterator[str] | Sequence[str], name: str, first_line: int) -> None:
        self._lines = iter(lines)
        self._name = name
        self.line = first_line - 1
        self.state = self.START
        self.field = 1  # the field the next line starts in
        self.opened_at = self.opened_field = 0
        self.text = ""  # the last line fed, and where it started:
        self.started: tuple[int, int, int] = (self.START, 1, 0)  # state, field, opened_at

    def __iter__(self) -> _LenientQuotes:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.line += 1
        self.text, self.started = line, (self.state, self.field, self.opened_at)
        if self.state == self.START and '"' not in line:
            return line
        return self._rewrite(line)

    def _rewrite(self, line: str) -> str:
        out: list[str] = []
        blanks: list[str] = []
        state = self.state
        opened = -1  # where the last quoted field opened in ``out``
        for ch in line:
            if state == self.START:
                if ch in " \t":
                    blanks.append(ch)
                    continue
                if ch == '"':
                    blanks.clear()
                    state = self.QUOTED
                    self.opened_at, opened = self.line, len(out)
                else:
                    out.extend(blanks)
                    blanks.clear()
                    if ch not in ",\n":
                        state = self.UNQUOTED
            elif state == self.UNQUOTED:
                if ch in ",\n":
                    state = self.START
            elif state == self.QUOTED:
                if ch == '"':
                    state = self.AFTER_QUOTE
            elif ch == '"':
                state = self.QUOTED
            elif ch in ",\n":
                state = self.START
            else:
                state = self.UNQUOTED
            out.append(ch)
        out.extend(blanks)
        text = "".join(out)
        if state != self.QUOTED:
            self.field = 1
        elif opened >= 0:
            # A quoted field opened here goes on to the next line: count the fields before it.
            before = _field_lengths(text[:opened], self.state == self.QUOTED)
            self.field = self.opened_field = self.field + len(before) - 1
        self.state = state
        return text

    def check_closed(self) -> None:
        if self.state == self.QUOTED:
            raise FileError(
                RowError(self._name, self.opened_at, self.opened_field, "unterminated quoted field")
            )

    def csv_error(self, exc: csv.Error) -> FileError:
        state, field, opened_at = self.started
        opened = opened_at if state == self.QUOTED else None
        return _csv_error(self._name, self.line, self.text, exc, field, opened)


@dataclass
class Batch:
    """Rows from consecutive lines; ``lines[i]`` is the line row ``i`` starts on."""

    rows: list[list[str]]
    lines: Sequence[int]


def iter_batches(
    plan: FilePlan, start: int | None = None, end: int | None = None, block: int = 8 << 20
) -> Iterator[Batch]:
    """Parse rows from ``[start, end)`` (default: all data after the header).

    Line numbers are absolute when reading from the header on, otherwise relative to
    ``start`` (line 1 = first line of the range). Blank rows come through as ``[]``.
    """
    begin = plan.data_offset if start is None else start
    stop = plan.size if end is None else end
    first = plan.header_line + 1 if start is None else 1
    if plan.splittable():
        for data, line_no in raw_blocks(plan.path, plan.name, begin, stop, block, first):
            yield block_batch(plan, data, line_no)
        return
    yield from _quoted_batches(plan, begin, stop, block, first)


def block_batch(plan: FilePlan, data: bytes, line_no: int) -> Batch:
    """The rows of one block of a splittable file (see ``raw_blocks``)."""
    lines = block_lines(data, plan.name, line_no)
    try:
        rows = list(csv.reader(lines))
    except csv.Error as exc:
        raise _csv_failure(plan.name, lines, line_no, exc) from None
    return Batch(rows, range(line_no, line_no + len(rows)))


def _quoted_batches(
    plan: FilePlan, begin: int, stop: int, block: int, first: int
) -> Iterator[Batch]:
    def physical() -> Iterator[str]:
        for lines, _ in _blocks(plan.path, plan.name, begin, stop, block, first):
            for line in lines:
                yield line + "\n"

    rows: list[list[str]] = []
    starts: list[int] = []
    last = first - 1
    for row, end in lenient_rows(physical(), plan.name, first):
        starts.append(last + 1)
        last = end
        rows.append(row)
        if len(rows) >= 65536:
            yield Batch(rows, starts)
            rows, starts = [], []
    if rows:
        yield Batch(rows, starts)


def lenient_rows(lines: Iterator[str], name: str, first: int) -> Iterator[tuple[list[str], int]]:
    """Rows of ``lines`` (each ending in a newline) read with the exports' quoting, and
    the line each row ends on; csv problems and an unclosed quote raise FileError."""
    feed = _LenientQuotes(lines, name, first)
    reader = csv.reader(feed)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise feed.csv_error(exc) from None
        yield row, feed.line
    feed.check_closed()


def _csv_failure(name: str, lines: list[str], first_line: int, exc: csv.Error) -> FileError:
    for i, line in enumerate(lines):
        try:
            list(csv.reader([line]))
        except csv.Error as inner:
            return _csv_error(name, first_line + i, line, inner)
    return FileError(RowError(name, first_line, None, f"CSV error: {exc}"))


def split_ranges(plan: FilePlan, parts: int) -> list[tuple[int, int]]:
    """Cut the data into about ``parts`` byte ranges that start at line starts."""
    begin, end = plan.data_offset, plan.size
    if parts <= 1 or not plan.splittable() or end - begin < 2:
        return [(begin, end)]
    step = (end - begin) // parts
    cuts = [begin]
    with plan.path.open("rb") as f:
        for k in range(1, parts):
            target = max(begin + k * step, cuts[-1])
            f.seek(target)
            window = f.read(MAX_LINE_CHARS * 4 + 1)
            nl = window.find(b"\n")
            if nl < 0:
                break
            cut = target + nl + 1
            if cut >= end:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(end)
    return list(pairwise(cuts))


def count_fields_error(
    name: str, line: int, got: int, want: int, last: str | None = None
) -> RowError:
    """Too few or too many fields; ``last``, the row's last field, hints at a trailing comma."""
    trailing = got == want + 1 and last is not None and not last.strip()
    hint = " (a trailing delimiter?)" if trailing else ""
    return RowError(name, line, min(got, want) + 1, f"expected {want} fields, found {got}{hint}")
