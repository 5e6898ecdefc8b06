"""A run's inputs made plain: UTF-8 CSVs with ``,`` (and a tab) between fields.

The pipeline reads plain files and splits them into byte ranges for its workers, which
a compressed file does not allow. So before the files are planned, whatever the source
is becomes a directory of plain files in the run's scratch directory:

- a plain UTF-8 file with ``,`` between fields is used in place (no copy);
- ``.gz``, ``.bz2`` and ``.zst`` files are decompressed there, block by block;
- a zip (``march.zip``) is extracted there, within limits (see ``archive``);
- another encoding (the ``encoding`` option) is transcoded to UTF-8 there;
- a ``;`` delimiter (European Excel; given, or detected from the header line) is
  rewritten to ``,`` with the csv module, quotes honoured.

Every step keeps lines and fields where they were, so an error's line and column are
those of the user's file, and errors name that file (``users.csv.gz:12:2``). The three
files are prepared in threads at once: zlib, bz2 and zstd release the GIL.
"""

from __future__ import annotations

import asyncio
import bz2
import codecs
import contextlib
import csv
import gzip
import io
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from .archive import ArchiveLimits, ArchiveRejected, extract_inputs
from .pipeline.csvfile import (
    ENCODING_HINT,
    MAX_LINE_CHARS,
    SPECS,
    lenient_rows,
)
from .pipeline.errors import FileError, InputError, RowError
from .pipeline.plan import InputPlan, plan_inputs

COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".zst": "zstd"}
DELIMITERS = ("auto", ",", ";")
BLOCK = 1 << 20
SNIFF_BYTES = 1 << 20  # the header line is looked for in the first MiB
LINE_END = re.compile(r"\r\n|\r|\n")
_SWAP = str.maketrans(",;", ";,")
_TAB_SPACE = str.maketrans("\t ", " \t")


def check_encoding(name: str) -> str:
    """The codec's canonical name (``latin-1`` -> ``iso8859-1``); ValueError if unknown."""
    try:
        info = codecs.lookup(name)
    except (LookupError, TypeError):
        raise ValueError(f"unknown encoding {name!r}") from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"{name!r} is not a text encoding")
    return info.name


@dataclass(frozen=True)
class InputFile:
    """One input as found and as the pipeline reads it."""

    kind: str
    name: str  # the user's name for it, which errors show
    origin: Path  # the file as found (a zip's member once extracted)
    compression: str | None
    encoding: str
    delimiter: str
    path: Path  # what the pipeline reads: ``origin`` itself, or a plain copy

    @property
    def converted(self) -> bool:
        return self.path != self.origin

    def raw_source(self) -> tuple[Path, str | None, str]:
        """Where the user's own lines can be read again: (file, compression, encoding).

        A rewritten delimiter changed the lines, so those come from the original;
        otherwise the plain copy holds the same text, already in UTF-8.
        """
        if self.delimiter != ",":
            return self.origin, self.compression, self.encoding
        return self.path, None, "utf-8"

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "compression": self.compression,
            "decompressed": self.compression is not None,
            "encoding": self.encoding,
            "delimiter": self.delimiter,
        }


@dataclass(frozen=True)
class Inputs:
    directory: Path  # holds users.csv, ... for ``plan_inputs``
    files: dict[str, InputFile]  # by kind; a missing file is left to plan_inputs
    archive: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "archive": self.archive,
            "files": {kind: f.to_json() for kind, f in self.files.items()},
        }

    def by_name(self) -> dict[str, InputFile]:
        return {f.name: f for f in self.files.values()}


async def materialize(
    source: Path, workdir: Path, encoding: str, delimiter: str, limits: ArchiveLimits
) -> Inputs:
    """Turn ``source`` (a directory or a zip) into plain inputs; InputError if it cannot."""
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=len(SPECS), thread_name_prefix="etl-inputs")
    try:
        return await _materialize(source, workdir, encoding, delimiter, limits, pool, stop)
    except BaseException:
        stop.set()  # threads still copying notice within a block
        raise
    finally:
        await asyncio.shield(asyncio.to_thread(pool.shutdown, True))


async def _materialize(
    source: Path,
    workdir: Path,
    encoding: str,
    delimiter: str,
    limits: ArchiveLimits,
    pool: ThreadPoolExecutor,
    stop: threading.Event,
) -> Inputs:
    def run(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.wrap_future(pool.submit(fn, *args))

    directory, archive, members = source, None, {}
    if source.suffix.lower() == ".zip" and await run(source.is_file):
        directory, archive = workdir / "archive", source.name
        directory.mkdir()
        try:
            members = await run(extract_inputs, source, directory, limits, stop.is_set)
        except ArchiveRejected as exc:
            raise InputError([RowError(source.name, None, None, str(exc))]) from None
    found: dict[str, tuple[Path, str | None]] = await run(find_inputs, directory)
    files: dict[str, InputFile] = {}
    for kind, (origin, compression) in found.items():
        files[kind] = await run(
            _describe,
            kind,
            origin,
            compression,
            members.get(origin.name, origin.name),
            encoding,
            delimiter,
        )
    target = workdir / "inputs"
    if any(_needs_work(f) for f in files.values()):
        target.mkdir()
        files = {k: replace(f, path=target / _plain_name(f.origin)) for k, f in files.items()}
        outcomes = await asyncio.gather(*(run(_prepare, f, stop) for f in files.values()))
        errors = [e for e in outcomes if e is not None]
        if errors:
            raise InputError(errors)
        directory = target
    return Inputs(directory, files, archive)


def find_inputs(directory: Path) -> dict[str, tuple[Path, str | None]]:
    """Each kind's file and its compression; a missing or ambiguous plain file is left
    for ``plan_inputs`` to report, with its usual message."""
    if not directory.is_dir():
        return {}
    found: dict[str, tuple[Path, str | None]] = {}
    errors: list[RowError] = []
    for spec in SPECS:
        present = [
            (directory / (name + suffix), compression)
            for name in spec.filenames
            for suffix, compression in (("", None), *COMPRESSIONS.items())
            if (directory / (name + suffix)).is_file()
        ]
        if len(present) == 1:
            found[spec.kind] = present[0]
        elif any(compression is not None for _, compression in present):
            names = " and ".join(path.name for path, _ in present)
            errors.append(RowError(present[1][0].name, None, None, f"ambiguous: both {names}"))
    if errors:
        raise InputError(errors)
    return found


def _plain_name(path: Path) -> str:
    name = path.name
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _needs_work(f: InputFile) -> bool:
    return f.compression is not None or f.encoding != "utf-8" or f.delimiter != ","


def _describe(
    kind: str, origin: Path, compression: str | None, name: str, encoding: str, delimiter: str
) -> InputFile:
    if delimiter == "auto":
        header = _header_line(origin, compression, encoding)
        delimiter = ";" if ";" in header and "," not in header else ","
    return InputFile(kind, name, origin, compression, encoding, delimiter, origin)


def _header_line(origin: Path, compression: str | None, encoding: str) -> str:
    """The first non-blank line (decoded leniently: only to choose the delimiter)."""
    try:
        with open_binary(origin, compression) as raw:
            data = raw.read(SNIFF_BYTES)
    except (OSError, EOFError, zstandard.ZstdError):
        return ""  # converting it will say what is wrong
    text = data.decode(_decoder_name(encoding), "replace")
    return next((line for line in LINE_END.split(text) if line.strip()), "")


def open_binary(path: Path, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        return cast(IO[bytes], gzip.open(path, "rb"))
    if compression == "bzip2":
        return bz2.open(path, "rb")
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            path.open("rb"), read_across_frames=True, closefd=True
        )
    return path.open("rb")


def _prepare(f: InputFile, stop: threading.Event) -> RowError | None:
    """Write the plain copy (or link an untouched file); the error that stopped it."""
    if not _needs_work(f):
        os.symlink(f.origin.resolve(), f.path)
        return None
    try:
        try:
            _write_plain(f, stop, exact=False)
        except _Inexact:
            _write_plain(f, stop, exact=True)
    except FileError as exc:
        return exc.error
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        what = f"cannot decompress ({f.compression})" if f.compression else "cannot read"
        return RowError(f.name, None, None, f"{what}: {exc}")
    return None


def _write_plain(f: InputFile, stop: threading.Event, exact: bool) -> None:
    with open_binary(f.origin, f.compression) as raw, f.path.open("wb") as out:
        if f.encoding == "utf-8" and f.delimiter == ",":
            while data := raw.read(BLOCK):
                _check(stop)
                out.write(data)
            return
        blocks = text_blocks(raw, f.encoding, f.name, f.delimiter)
        if f.delimiter == ";":
            blocks = _commas(blocks, f.name, exact)
        for text in blocks:
            _check(stop)
            out.write(text.encode("utf-8"))


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise InterruptedError("run cancelled")


def _decoder_name(encoding: str) -> str:
    return "utf-8-sig" if encoding == "utf-8" else encoding  # a BOM is not text


def text_blocks(
    raw: IO[bytes], encoding: str, name: str, delimiter: str, errors: str = "strict"
) -> Iterator[str]:
    """Decoded text in blocks that end at a line end (but for the last)."""
    decoder = codecs.getincrementaldecoder(_decoder_name(encoding))(errors)
    carry, line = "", 1  # text after the last line end; the line it starts on
    while True:
        data = raw.read(BLOCK)
        try:
            text = carry + decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise _undecodable(exc, carry, line, name, encoding, delimiter) from None
        except UnicodeError as exc:  # e.g. UTF-16 without a byte order mark
            raise FileError(RowError(name, line, None, f"not {encoding}: {exc}")) from None
        if not data:
            if text:
                yield text
            return
        cut = max(text.rfind("\n"), text.rfind("\r", 0, len(text) - 1)) + 1
        if cut == 0 and len(text) <= 4 * MAX_LINE_CHARS:
            carry = text
            continue
        cut = cut or len(text)  # a line too long: the pipeline reports it
        carry, text = text[cut:], text[:cut]
        line += count_lines(text)
        yield text


def count_lines(text: str) -> int:
    """Line ends as the pipeline counts them: CRLF, CR and LF each end one line."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _undecodable(
    exc: UnicodeDecodeError, carry: str, line: int, name: str, encoding: str, delimiter: str
) -> FileError:
    before = carry + exc.object[: exc.start].decode(_decoder_name(encoding), "replace")
    last = LINE_END.split(before)[-1]
    sep = ";" if delimiter == ";" else ","
    what = "invalid UTF-8" if encoding == "utf-8" else f"not {encoding}"
    message = f"{what} (byte 0x{exc.object[exc.start]:02x} at character {len(last) + 1})"
    if encoding == "utf-8":
        message += ENCODING_HINT
    return FileError(RowError(name, line + count_lines(before), last.count(sep) + 1, message))


class _Inexact(Exception):
    """The fast reader of quoted ``;`` text cannot promise the exact reader's result."""


def _commas(blocks: Iterator[str], name: str, exact: bool) -> Iterator[str]:
    """``;``-delimited text as ``,``-delimited text, line for line.

    Blocks without quotes are rewritten directly (fields with a comma get quoted);
    from the first quote on, the csv module parses the rest, quoted newlines and all.
    """
    line = 1
    for block in blocks:
        if '"' in block:
            convert = _commas_quoted if exact else _commas_quoted_fast
            yield from convert(block, blocks, name, line)
            return
        if "," not in block:
            yield block.replace(";", ",")
        else:  # fields with a comma get quoted; a blank line stays blank
            *lines, tail = LINE_END.split(block)
            rows = (t.split(";") if t else [] for t in (*lines, *([tail] if tail else [])))
            text = "".join(_written(rows, str))
            yield text[:-1] if tail else text  # the last line had no line end
        line += count_lines(block)


def _commas_quoted(first: str, rest: Iterator[str], name: str, line: int) -> Iterator[str]:
    """Parse with ``;`` as ``,``: swapping the two characters lets the reader the pipeline
    uses for ``,`` files (quotes after a tab, errors at file:line:column) parse it; each
    field is swapped back, then written with ``,``."""
    lines = (text for block in itertools.chain([first], rest) for text in _lines(block, _SWAP))
    rows = ([f.translate(_SWAP) for f in row] for row, _ in lenient_rows(lines, name, line))
    yield from _written(rows, str)


def _lines(block: str, swap: dict[int, int]) -> Iterator[str]:
    """A block's lines with ``swap`` applied, each ending in one newline."""
    *lines, tail = LINE_END.split(block.translate(swap))
    for text in lines:
        yield text + "\n"
    if tail:
        yield tail + "\n"


def _written(rows: Iterable[list[str]], finish: Callable[[str], str]) -> Iterator[str]:
    """Rows as ``,``-delimited text in chunks of about a block, ``finish`` applied."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        if row:
            writer.writerow(row)
        else:
            out.write("\n")  # a blank line stays blank
        if out.tell() >= BLOCK:
            yield finish(out.getvalue())
            out.seek(0)
            out.truncate()
    yield finish(out.getvalue())


def _commas_quoted_fast(first: str, rest: Iterator[str], name: str, line: int) -> Iterator[str]:
    """The csv module's own reader, ~7 times faster than the exact one's quote tracking.

    The exports put a tab before quotes: swapping tabs and spaces lets the reader's
    ``skipinitialspace`` skip them. It cannot skip a space before a quote, and it does
    not report an unclosed quote, so on a space before a quote, an odd number of quotes
    or any csv error it gives up (``_Inexact``) and the exact reader starts over.
    """
    quotes = 0

    def lines() -> Iterator[str]:
        nonlocal quotes
        for block in itertools.chain([first], rest):
            if ' "' in block or " \t" in block:  # maybe a space before a quote
                raise _Inexact()
            quotes += block.count('"')
            yield from _lines(block, _TAB_SPACE)

    reader = csv.reader(lines(), delimiter=";", skipinitialspace=True)
    try:
        # Tabs and spaces are swapped back per chunk: the writer adds neither.
        yield from _written(reader, lambda text: text.translate(_TAB_SPACE))
    except csv.Error:
        raise _Inexact() from None
    if quotes % 2:
        raise _Inexact()


def plan_named(inputs: Inputs, block: int = 8 << 20, experiments_read: bool = True) -> InputPlan:
    """``plan_inputs`` on the plain files, with errors naming the user's files."""
    names = {f.path.name: f.name for f in inputs.files.values()}
    try:
        plan = plan_inputs(inputs.directory, block, experiments_read)
    except InputError as exc:
        raise InputError([renamed(e, names) for e in exc.errors], exc.total) from None
    users, experiments, compounds = (
        replace(p, name=names.get(p.name, p.name))
        for p in (plan.users, plan.experiments, plan.compounds)
    )
    return InputPlan(users, experiments, compounds)


def renamed(error: RowError, names: dict[str, str]) -> RowError:
    return replace(error, file=names.get(error.file, error.file))


@contextlib.contextmanager
def raw_text(f: InputFile) -> Iterator[Iterator[str]]:
    """The user's file as text blocks again (undecodable bytes replaced)."""
    path, compression, encoding = f.raw_source()
    with open_binary(path, compression) as raw:
        yield text_blocks(raw, encoding, f.name, f.delimiter, errors="replace")
