"""Streaming CSV reading with the stdlib ``csv`` module, in the lab's export format.

The exports put a comma *and a tab* between fields, may start with blank lines and may
lack a final newline. So fields and header names are stripped, blank lines are skipped,
RFC 4180 quoting works even after the tab, a UTF-8 BOM is accepted and CRLF, LF and CR
all end a line. Files are read in large byte blocks cut at line ends, which lets a file
without quotes be split into byte ranges and parsed by several processes at once.

A file with quotes is read by a sequential reader (a quoted field may hold a line end,
so a byte offset does not say where a row starts), but still in C-level passes per
chunk: Python's csv module cannot honour a quote after the tab, and rewriting each line
character by character in Python made quoted names cost several times the plain file.
Such a file is still cut at line starts, each range's reader assuming it starts at a
row (``split_ranges(speculative=True)``; the caller checks the assumption).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain, pairwise
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
    quoted: bool  # the data contains a quote: split only speculatively (split_ranges)
    lone_cr: bool  # some line ends are a bare CR: cannot be split at LF
    # Where the data may be cut into byte ranges: (offset of a line start, its line
    # number), about one per planning block; the first is the data's own start. Empty
    # until the data has been read (``scan_plan``).
    cuts: tuple[tuple[int, int], ...] = ()

    def splittable(self) -> bool:
        return not (self.quoted or self.lone_cr)

    @property
    def scanned(self) -> bool:
        return bool(self.cuts) or self.data_offset >= self.size


@dataclass(frozen=True)
class ByteRange:
    """``[start, end)`` of a file, starting at a line start whose number is ``first_line``."""

    start: int
    end: int
    first_line: int


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


_LONE_CR = re.compile(rb"\r[^\n]")  # a CR that does not end a CRLF (one at a chunk's end waits)


def _scan_bytes(
    path: Path, start: int, first_line: int, block: int
) -> tuple[bool, bool, list[tuple[int, int]]]:
    """Whether the data holds a quote, whether it has bare-CR line ends, and cut points.

    A cut point is the start of the line after each block's last LF, with its line
    number (counted in LFs, which is exact where there is no bare CR). A line too long
    for any reader stops the scan early, reported as quoted: the sequential reader
    then fails on it without this scan reading a huge file to the end.
    """
    quoted = lone_cr = False
    run = 0  # bytes since the last line end
    cuts = [(start, first_line)]
    offset, lines = start, first_line
    with path.open("rb") as f:
        f.seek(start)
        tail = b""
        while chunk := f.read(block):
            count, last_lf = chunk.count(b"\n"), chunk.rfind(b"\n")
            if last_lf >= 0:
                cuts.append((offset + last_lf + 1, lines + count))
            offset += len(chunk)
            lines += count
            quoted = quoted or b'"' in chunk
            if not lone_cr:
                # One regex pass (~5 ms per 8 MB), not two counts of CR and CRLF (~12 ms).
                lone_cr = (tail == b"\r" and not chunk.startswith(b"\n")) or bool(
                    b"\r" in chunk and _LONE_CR.search(chunk)
                )
            tail = chunk[-1:]
            line_end = max(last_lf, chunk.rfind(b"\r"))
            run = run + len(chunk) if line_end < 0 else len(chunk) - line_end - 1
            if run > MAX_LINE_CHARS * 4:
                return True, lone_cr, cuts
        lone_cr = lone_cr or tail == b"\r"
    return quoted, lone_cr, [c for c in cuts if c[0] < offset]


def plan_file(
    path: Path, spec: TableSpec, block: int = 8 * 1024 * 1024, scan: bool = True
) -> FilePlan:
    """Read and check the header; note whether the rest may be split into ranges.

    With ``scan`` False only the header is read: ``scan_plan`` reads the rest later.
    """
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
    plan = FilePlan(path, name, size, offset, header_line, columns, len(header), False, False)
    return scan_plan(plan, block) if scan else plan


def scan_plan(plan: FilePlan, block: int = 8 * 1024 * 1024) -> FilePlan:
    """``plan`` with what its data holds: quotes, bare CRs and cut points."""
    quoted, lone_cr, cuts = _scan_bytes(plan.path, plan.data_offset, plan.header_line + 1, block)
    return replace(plan, quoted=quoted, lone_cr=lone_cr, cuts=tuple(cuts))


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
    path: Path,
    name: str,
    start: int,
    end: int,
    block: int,
    first_line: int = 1,
    lf_only: bool = False,
) -> Iterator[tuple[bytes, int]]:
    """Yield (bytes cut at a line end, number of its first line), undecoded.

    ``lf_only``: the plan found no bare CR, so LFs alone count the lines (one C pass
    instead of three over CRLF text).
    """
    line_no = first_line
    count = _lf_count if lf_only else line_count
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
            line_no += count(data)


def _lf_count(data: bytes) -> int:
    return data.count(b"\n") + (not data.endswith(b"\n"))


def line_count(data: bytes) -> int:
    """Lines in a block as the reader splits them: CRLF, LF and CR each end one."""
    ends = data.count(b"\n")
    if b"\r" in data:
        ends += data.count(b"\r") - data.count(b"\r\n")
    return ends + (not data.endswith((b"\n", b"\r")))


def block_text(data: bytes, name: str, line_no: int) -> str:
    """A block decoded, line ends unified and ended, no line over the limit (unsplit)."""
    text = _block_text(data, name, line_no)
    if may_hold_line_over(text, MAX_LINE_CHARS):
        _check_lengths(_split_lines(text), name, line_no)
    return text if text.endswith("\n") else text + "\n"


def block_lines(data: bytes, name: str, line_no: int) -> list[str]:
    """A block's lines: decoded, line ends unified, no line over the limit."""
    return _split_lines(block_text(data, name, line_no))


def _block_text(data: bytes, name: str, line_no: int) -> str:
    """A block decoded, with every line end made ``\\n``."""
    text = _decode(data, name, line_no)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _split_lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _check_lengths(lines: list[str], name: str, line_no: int) -> None:
    if max(map(len, lines), default=0) > MAX_LINE_CHARS:
        long_at = next(i for i, ln in enumerate(lines) if len(ln) > MAX_LINE_CHARS)
        raise _too_long(name, line_no + long_at, lines[long_at])


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
    plan: FilePlan,
    start: int | None = None,
    end: int | None = None,
    block: int = 8 << 20,
    first_line: int | None = None,
) -> Iterator[Batch]:
    """Parse rows from ``[start, end)`` (default: all data after the header).

    Line numbers are absolute when reading from the header on or when ``first_line``
    gives the range's first, otherwise relative to ``start`` (line 1 = first line of the
    range). Blank rows come through as ``[]``.
    """
    begin = plan.data_offset if start is None else start
    stop = plan.size if end is None else end
    first = plan.header_line + 1 if start is None else first_line or 1
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
    """The sequential reader: C-level passes per chunk where they are certain to read
    what the character-level reader reads, that reader itself where they are not.

    Each chunk is parsed up to its last line end outside quotes; the rest, a row still
    inside a quoted field, is carried into the next chunk. The character-level reader
    takes over at the row where the passes cannot vouch for the text (a quote inside an
    unquoted field, an unterminated quote, a field over the limit, a row longer than a
    few chunks) and hands back at the next line end outside quotes. Decoding and the
    line-length check happen per block, as that reader does them, so when a file holds
    several problems the same one is reported first.
    """
    name = plan.name
    size = min(block, _CHUNK)
    chunks = _chunks(raw_blocks(plan.path, name, begin, stop, block, first), name, size)
    buf, at, line = "", 0, first  # buf[at:], from a row start, is not parsed yet
    take = size  # characters to parse at once: fewer just after a misplaced quote
    ended = False
    pending = _Rows()
    while True:
        while not ended and len(buf) - at < take:
            try:
                chunk = next(chunks, None)
            except FileError as exc:
                yield from pending.flush()
                if at < len(buf):  # the reader parses these lines before it decodes more
                    yield from _character_level(name, line, buf, at, _raising(exc), _ALL)
                raise
            ended = chunk is None
            if chunk:
                buf, at = buf[at:] + chunk, 0
        if at == len(buf):
            break
        cut = buf.find("\n", at + take - 1) + 1 or len(buf)
        parsed = _parse_unit(buf[at:cut]) if take <= 4 * size else _Parsed(doubtful=_ALL)
        pending.add(parsed.rows, parsed.starts, line)
        line += parsed.lines
        at += parsed.used
        if parsed.doubtful or (ended and not parsed.used and cut == len(buf)):
            yield from pending.flush()
            doubtful = parsed.doubtful or _ALL
            line, buf, at = yield from _character_level(name, line, buf, at, chunks, doubtful)
            take = max(size // 64, 1)  # the next quote may be misplaced too: parse less
        elif parsed.used:
            take = min(2 * take, size)
            if len(pending.rows) >= _BATCH_ROWS:
                yield from pending.flush()
        else:
            take *= 2  # a row longer than the unit
    yield from pending.flush()


_CHUNK = 128 * 1024  # characters parsed at once
_BATCH_ROWS = 8192
_ALL = 1 << 62  # lines: all there are
_BLANKS_AFTER_COMMA = re.compile(",[ \t]+\x00")
_BLANKS_AFTER_NEWLINE = re.compile("\n[ \t]+\x00")


def _chunks(blocks: Iterable[tuple[bytes, int]], name: str, size: int) -> Iterator[str]:
    """Decoded text in pieces of about ``size`` characters, each ending with ``\\n``."""
    for data, line_no in blocks:
        text = _block_text(data, name, line_no)
        if may_hold_line_over(text, MAX_LINE_CHARS):
            _check_lengths(_split_lines(text), name, line_no)
        if not text.endswith("\n"):
            text += "\n"  # the last line of the file, ended as the reader ends it
        pos = 0
        while pos < len(text):
            cut = text.find("\n", pos + size - 1) + 1 or len(text)
            yield text[pos:cut]
            pos = cut


def may_hold_line_over(text: str | bytes, limit: int) -> bool:
    """False when every half-limit window holds a line end: no line can exceed ``limit``
    (a few ``find`` calls per block, where its lines' lengths take a pass over them)."""
    half = max(limit // 2, 1)
    find = partial(text.find, "\n") if isinstance(text, str) else partial(text.find, b"\n")
    return any(find(at, at + half) < 0 for at in range(0, len(text), half))


@dataclass
class _Parsed:
    """What the C-level passes made of a chunk (with the row carried into it)."""

    rows: list[list[str]] = field(default_factory=list)
    starts: Sequence[int] = ()  # the line each row starts on, counted from 0
    used: int = 0  # characters parsed
    lines: int = 0  # lines parsed
    doubtful: int = 0  # lines after those that only the character-level reader may read


def _parse_unit(unit: str) -> _Parsed:
    """Rows of ``unit`` (text from a row start) up to its last line end outside quotes,
    or up to the row with the first quote the passes cannot place."""
    head, used, doubtful = unit, len(unit), 0
    if '"' in unit:
        parts = unit.split('"')
        fixed, misplaced = fix_opening_quotes(parts)
        # With an odd number of quotes the last one opens a field that goes on past the end.
        last = len(parts) - 2 if misplaced is None else misplaced
        if misplaced is not None or len(parts) % 2 == 0:
            j, end = _row_end(parts, last)
            used = sum(map(len, parts[:j])) + j + end
            head = '"'.join([*fixed[:j], parts[j][:end]])
            if misplaced is not None:  # the reader takes over up to that quote's line
                doubtful = '"'.join(parts[j : misplaced + 1]).count("\n", end) + 1
        else:
            head = '"'.join(fixed)
    try:
        rows = list(csv.reader(io.StringIO(head)))
    except csv.Error:
        return _Parsed(doubtful=_ALL)
    lines = head.count("\n")
    if len(rows) == lines:
        return _Parsed(rows, range(lines), used, lines, doubtful)
    starts = []
    at = 0
    for row in rows:  # only where a quoted field holds a line end
        starts.append(at)
        at += 1 + sum(f.count("\n") for f in row)
    return _Parsed(rows, starts, used, lines, doubtful)


def _row_end(parts: list[str], last: int) -> tuple[int, int]:
    """The last line end in an outside part no later than ``last``: (part, offset after)."""
    for j in range(last, -1, -2):
        end = parts[j].rfind("\n") + 1
        if end:
            return j, end
    return 0, 0


def fix_opening_quotes(parts: list[str]) -> tuple[list[str], int | None]:
    """``parts`` (the text split at quotes, at least one) with the blanks before each
    opening quote removed, as ``_LenientQuotes`` does, and the index of the part before
    the first quote that cannot be placed (the fix holds only for the parts before it).

    If every quote is where the character-level reader sees it, parts alternate between
    outside and inside a quoted field, and each outside part that a quote follows either
    ends a field (a delimiter or line end, then blanks) or is empty (a doubled quote).
    The first part starts a row, so it may also be all blanks. Any other outside part puts
    a quote inside an unquoted field, where csv takes it literally.
    """
    opening = parts[0:-1:2]
    if not opening[0].strip(" \t"):
        opening[0] = ""
    joined = "\x00".join(opening) + "\x00"  # the decoder has refused NUL in the data
    # The usual single blank by plain replaces; the pattern only if other blanks remain.
    joined = joined.replace(",\t\x00", ",\x00").replace(", \x00", ",\x00")
    misplaced = None
    if not _all_start_fields(joined, opening):
        joined = _BLANKS_AFTER_COMMA.sub(",\x00", joined)
        joined = _BLANKS_AFTER_NEWLINE.sub("\n\x00", joined)
        if not _all_start_fields(joined, opening):
            misplaced = next(
                2 * k
                for k, part in enumerate(opening)
                if part and not part.rstrip(" \t").endswith((",", "\n"))
            )
    fixed = parts[:]
    fixed[0:-1:2] = joined[:-1].split("\x00")
    return fixed, misplaced


def _all_start_fields(joined: str, opening: list[str]) -> bool:
    """Whether each part in ``joined`` (each ended by NUL) ends a field or is empty."""
    ends = joined.count(",\x00") + joined.count("\n\x00")
    return ends + opening.count("") == len(opening)


class _Rows:
    """Rows parsed chunk by chunk, gathered into batches of a useful size."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.lines: list[Sequence[int]] = []

    def add(self, rows: list[list[str]], starts: Sequence[int], first_line: int) -> None:
        if not rows:
            return
        self.rows += rows
        if isinstance(starts, range):
            self.lines.append(range(first_line, first_line + len(starts)))
        else:
            self.lines.append([first_line + s for s in starts])

    def flush(self) -> Iterator[Batch]:
        if not self.rows:
            return
        lines = self.lines
        contiguous = all(isinstance(r, range) for r in lines) and all(
            a[-1] + 1 == b[0] for a, b in pairwise(lines)
        )
        merged: Sequence[int] = (
            range(lines[0][0], lines[-1][-1] + 1) if contiguous else list(chain(*lines))
        )
        yield Batch(self.rows, merged)
        self.rows, self.lines = [], []


def _raising(exc: Exception) -> Iterator[str]:
    raise exc
    yield ""  # pragma: no cover


def _character_level(
    name: str, first: int, text: str, start: int, more: Iterator[str], doubtful: int
) -> Generator[Batch, None, tuple[int, str, int]]:
    """Rows of ``text[start:]`` (from a row start, ending with ``\\n``) read by
    ``_LenientQuotes``: its first ``doubtful`` lines, then on to the first line end outside
    quotes, with chunks of ``more`` while a quoted field is open. Returns the next line
    and where the text left starts: (text, offset)."""
    left = ("", 0)
    exhausted = False

    def physical() -> Iterator[str]:
        nonlocal left, exhausted
        piece: str | None = text
        pos, need = start, doubtful
        while piece is not None:
            while pos < len(piece):  # line by line: only a few may be needed
                end = piece.index("\n", pos) + 1
                yield piece[pos:end]
                pos = end
                need -= 1
                if need <= 0 and feed.state != feed.QUOTED:
                    left = (piece, pos)
                    return
            if feed.state != feed.QUOTED:
                return
            piece, pos = next(more, None), 0
        exhausted = True

    feed = _LenientQuotes(physical(), name, first)
    yield from _reader_batches(feed)
    if exhausted:
        feed.check_closed()
    return feed.line + 1, *left


def _reader_batches(feed: _LenientQuotes) -> Iterator[Batch]:
    rows: list[list[str]] = []
    starts: list[int] = []
    last = feed.line
    for row, end in _feed_rows(feed):
        starts.append(last + 1)
        last = end
        rows.append(row)
        if len(rows) >= _BATCH_ROWS:
            yield Batch(rows, starts)
            rows, starts = [], []
    if rows:
        yield Batch(rows, starts)


def _feed_rows(feed: _LenientQuotes) -> Iterator[tuple[list[str], int]]:
    """Rows the csv module reads from ``feed``, and the line each ends on."""
    reader = csv.reader(feed)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise feed.csv_error(exc) from None
        yield row, feed.line


def lenient_rows(lines: Iterator[str], name: str, first: int) -> Iterator[tuple[list[str], int]]:
    """Rows of ``lines`` (each ending in a newline) read with the exports' quoting, and
    the line each row ends on; csv problems and an unclosed quote raise FileError."""
    feed = _LenientQuotes(lines, name, first)
    yield from _feed_rows(feed)
    feed.check_closed()


def character_level_batches(
    plan: FilePlan, begin: int, stop: int, block: int, first: int
) -> Iterator[Batch]:
    """Every line through ``_LenientQuotes``: the reference the quoted reader must equal."""

    def physical() -> Iterator[str]:
        for lines, _ in _blocks(plan.path, plan.name, begin, stop, block, first):
            for line in lines:
                yield line + "\n"

    feed = _LenientQuotes(physical(), plan.name, first)
    yield from _reader_batches(feed)
    feed.check_closed()


def _csv_failure(name: str, lines: list[str], first_line: int, exc: csv.Error) -> FileError:
    for i, line in enumerate(lines):
        try:
            list(csv.reader([line]))
        except csv.Error as inner:
            return _csv_error(name, first_line + i, line, inner)
    return FileError(RowError(name, first_line, None, f"CSV error: {exc}"))


def split_ranges(
    plan: FilePlan, target: int, workers: int = 0, speculative: bool = False
) -> list[ByteRange]:
    """Cut the data into byte ranges of about ``target`` bytes (at least one planning
    block each) that start at line starts with known line numbers.

    With ``workers``, the ranges shrink towards the end of the file (guided
    self-scheduling): a range is at most the rest of the data over twice the workers,
    so that the last tasks are small and no worker scans alone for long at the end of
    the phase (10M dense: the last of 17 ranges of ~16 MB ran alone for ~0.6 s).

    A file that cannot be split (quotes, bare CRs) is one range. With ``speculative``,
    a quoted file is cut at line starts too, each range assumed to start outside a
    quoted field: the caller must check that every range but the last ended outside
    one (its reader raised no ``FileError``), else read the file as one range.
    """
    assert plan.scanned, "split_ranges needs the plan's cut points (scan_plan)"
    begin, end = plan.data_offset, plan.size
    whole = [ByteRange(begin, end, plan.header_line + 1)]
    if plan.lone_cr or (plan.quoted and not speculative) or len(plan.cuts) < 2:
        return whole
    chosen = [plan.cuts[0]]
    for cut in plan.cuts[1:]:
        start = chosen[-1][0]
        size = min(target, (end - start) // (2 * workers)) if workers else target
        if cut[0] - start >= size and end - cut[0] >= size // 2:
            chosen.append(cut)
    ends = [c[0] for c in chosen[1:]] + [end]
    return [ByteRange(s, e, line) for (s, line), e in zip(chosen, ends, strict=True)]


def count_fields_error(
    name: str, line: int, got: int, want: int, last: str | None = None
) -> RowError:
    """Too few or too many fields; ``last``, the row's last field, hints at a trailing comma."""
    trailing = got == want + 1 and last is not None and not last.strip()
    hint = " (a trailing delimiter?)" if trailing else ""
    return RowError(name, line, min(got, want) + 1, f"expected {want} fields, found {got}{hint}")
