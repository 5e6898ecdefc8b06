"""Field rules: what an id, a run time and a compound list may look like.

Each rule exists twice: a per-value function that explains what is wrong, and a
per-column check that accepts a whole batch in a few C-level passes or says "look
closer". The column checks accept exactly what the per-value functions accept.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import getitem, setitem, sub

BIGINT_MAX = 2**63 - 1


class FieldError(ValueError):
    """A single field's value breaks its rule."""


def parse_id(text: str) -> int:
    value = text.strip()
    if not value:
        raise FieldError("empty id")
    if not (value.isascii() and value.isdigit()):
        raise FieldError(f"{_show(value)} is not an id (ASCII digits 0-9 only)")
    number = int(value)
    if number > BIGINT_MAX:
        raise FieldError(f"{_show(value)} is out of range (ids must fit in a bigint)")
    return number


def parse_run_time(text: str) -> float:
    value = text.strip()
    if not value:
        raise FieldError("empty run time")
    try:
        if not value.isascii() or "_" in value:
            raise ValueError
        number = float(value)
    except ValueError:
        raise FieldError(f"{_show(value)} is not a number") from None
    if not math.isfinite(number):
        raise FieldError(f"{_show(value)} is not a finite number")
    if number < 0:
        raise FieldError(f"negative run time {_show(value)}")
    return number + 0.0  # folds -0.0 into 0.0


def parse_compound_list(text: str) -> list[int]:
    """Compound ids in order of first appearance, each once; an empty field is no compounds."""
    value = text.strip()
    if not value:
        return []
    ids: dict[int, None] = {}
    for position, token in enumerate(value.split(";"), start=1):
        try:
            ids[parse_id(token)] = None
        except FieldError as exc:
            raise FieldError(f"compound {position} of {_show(value)}: {exc}") from None
    return list(ids)


def _show(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def ids_column(column: Sequence[str]) -> list[int] | None:
    """All ids of a stripped column, or None when any of them needs a closer look."""
    joined = "".join(column)
    if not (all(column) and _only(joined, DIGITS)):
        return None
    try:
        ids = list(map(int, column))
    except ValueError:  # more digits than int() converts
        return None
    if ids and max(ids) > BIGINT_MAX:
        return None
    return ids


DIGITS = b"0123456789"
_NINES = bytes.maketrans(DIGITS, b"9" * len(DIGITS))  # every digit to 9: runs show lengths
WHOLE_DIGITS = 300  # a whole number this long is far below float's ~1.8e308: finite


def _only(text: str, allowed: bytes) -> bool:
    """True when ``text`` holds only ASCII characters from ``allowed``.

    ``str.isascii`` is a flag check and a byte ``translate`` one C pass: ~10x faster
    than ``str.isdigit``, which looks every character up in the Unicode tables.
    """
    return text.isascii() and not text.encode("ascii").translate(None, allowed)


def whole_run_times(column: Sequence[str]) -> bool:
    """True when every run time is a whole number: 1 to ``WHOLE_DIGITS`` ASCII digits.

    ``parse_run_time`` accepts all of these, so such a column is proven valid without a
    ``float()`` per field (~8 of a 1 MB block's ~45 ms); False means "look closer".
    """
    joined = ",".join(column)
    if not (all(column) and _only(joined, DIGITS + b",")):
        return not column
    return b"9" * (WHOLE_DIGITS + 1) not in joined.encode("ascii").translate(_NINES)


def run_times_column(column: Sequence[str]) -> list[float] | None:
    joined = "".join(column)
    if not joined.isascii() or "_" in joined:
        return None
    try:
        times = list(map(float, column))
    except ValueError:
        return None
    if times and (min(times) < 0 or not all(map(math.isfinite, times))):
        return None
    return times


def compound_lists_known(
    column: Sequence[str], known: dict[str, int], limit: int | None = None
) -> bool:
    """True when every list in a stripped column only names canonical known ids.

    ``limit`` (see ``id_limit``) says the known ids are exactly 1 to ``limit``: then most
    columns are proven in a few passes over the joined text, without splitting it.
    """
    joined = ";".join(filter(None, column))
    if not joined or (limit is not None and _short_ids(joined, limit)):
        return True
    return all(map(known.__contains__, set(joined.split(";"))))


def id_limit(known: dict[str, int]) -> int | None:
    """``n`` when the known ids are exactly the canonical texts of 1 to ``n`` and at most a
    tenth of them are as long as ``n`` and start with its first digit (2000 and 10000
    qualify: one id each; 1500 does not), else None.

    Only those ids are compared one by one in ``compound_lists_known``; where many are,
    splitting the column is the cheaper check.
    """
    n = len(known)
    if not n:
        return None
    top = str(n)
    compared = n - int(top[0]) * 10 ** (len(top) - 1) + 1
    if compared * 10 <= n and all(map(known.__contains__, map(str, range(1, n + 1)))):
        return n
    return None


_FEW = 1000  # ids compared one by one before splitting is the cheaper check


def _short_ids(joined: str, limit: int) -> bool:
    """True when every ``;``-separated token is a canonical id from 1 to ``limit``.

    Digits only, none empty, none starting with 0 (so at least 1): then an id with
    fewer digits than ``limit`` is below it, and so is one as long as it whose first
    digit is smaller; only the few others are compared. False means "look closer".
    """
    if not joined.isascii():
        return False
    raw = joined.encode("ascii")
    if raw.translate(None, b"0123456789;"):
        return False
    if raw[:1] in b";0" or raw.endswith(b";") or b";;" in raw or b";0" in raw:
        return False
    top = str(limit).encode("ascii")
    width, padded = len(top), b";" + raw
    # Ids whose first digit is below the limit's get a "#" for it: as long as the limit
    # they are below it, so the scan below skips them (3 of 4 digits are left); longer
    # ones still show as a run behind a "#". At 2000 compounds that spares comparing
    # 1000-1999 one by one, or splitting the column (~5 of a block's ~40 ms).
    marked = padded
    for digit in range(ord("1"), top[0]):
        marked = marked.replace(bytes((ord(";"), digit)), b";#")
    nines, run = marked.translate(_NINES), b"9" * width
    # One scan for runs as long as the limit's: on text that is mostly 9s each search
    # costs ~0.8 ms per 1 MB block, so longer ids and too many runs are caught here
    # rather than by their own passes. A run found from a ";" starts a whole id.
    at = nines.find(run)
    for _ in range(_FEW + 1):
        if at < 0:
            return True
        if (
            nines[at - 1 : at] == b"#"  # the rest of an id longer than the limit
            or nines[at + width : at + width + 1] == b"9"  # longer than the limit
            or padded[at : at + width] > top  # as long and above it
        ):
            return False
        at = nines.find(run, at + width)
    return False  # more than _FEW ids to compare: splitting is cheaper


class IdSet:
    """A set of non-negative ids: a byte per id up to a limit, a Python set above it.

    Ten million dense ids cost 10 MB instead of the ~600 MB of a set of ints. The bytes
    start at ``offset``: ids from a band far from zero (one range of the experiments
    file) cost a byte per id of the band, not per id from zero.
    """

    DENSE_LIMIT = 1 << 26
    NEAR_ZERO = 1 << 16  # bands starting below this are stored from zero: no shifting

    def __init__(self) -> None:
        self.offset = 0  # dense[i] stands for id offset + i
        self.dense = bytearray()
        self.sparse: set[int] = set()

    def __len__(self) -> int:
        return self.dense.count(1) + len(self.sparse)

    def __contains__(self, value: int) -> bool:
        index = value - self.offset
        if 0 <= index < len(self.dense):
            return bool(self.dense[index])
        return value in self.sparse

    def contains_all(self, values: Sequence[int]) -> bool:
        if values and self.offset <= min(values) and max(values) < self.end:
            return all(map(getitem, repeat(self.dense), self._indexes(values)))
        return all(map(self.__contains__, values))

    @property
    def end(self) -> int:
        return self.offset + len(self.dense)

    def _indexes(self, values: Sequence[int]) -> Sequence[int]:
        return values if not self.offset else list(map(sub, values, repeat(self.offset)))

    def add(self, value: int) -> bool:
        """Add one id; False if it was already there."""
        if value in self:
            return False
        if value < self.DENSE_LIMIT:
            self._cover(value, value)
            self.dense[value - self.offset] = 1
        else:
            self.sparse.add(value)
        return True

    def add_new(self, values: Sequence[int]) -> bool:
        """Add a batch of ids if none is present or repeated; else add nothing, return False."""
        if not values:
            return True
        top = max(values)
        if top >= self.DENSE_LIMIT or len(set(values)) != len(values):
            return False
        self._cover(min(values), top)
        indexes = self._indexes(values)
        if any(map(getitem, repeat(self.dense), indexes)):
            return False
        deque(map(setitem, repeat(self.dense), indexes, repeat(1)), maxlen=0)
        return True

    def add_range(self, start: int, count: int) -> bool:
        """Add ids ``start`` to ``start + count - 1`` if none is present; else add nothing."""
        if count <= 0:
            return True
        if start + count > self.DENSE_LIMIT:
            return False
        self._cover(start, start + count - 1)
        index = start - self.offset
        if self.dense.find(1, index, index + count) >= 0:
            return False
        self.dense[index : index + count] = b"\x01" * count
        return True

    def mark(self, values: Sequence[int]) -> None:
        """Add ids, whether or not they are there already."""
        if values and max(values) < self.DENSE_LIMIT:
            self._cover(min(values), max(values))
            deque(map(setitem, repeat(self.dense), self._indexes(values), repeat(1)), maxlen=0)
        else:
            deque(map(self.add, values), maxlen=0)

    def _cover(self, low: int, high: int) -> None:
        """Make the bytes reach from ``low`` to ``high`` (both below DENSE_LIMIT)."""
        if not self.dense:
            self.offset = 0 if low < self.NEAR_ZERO else low
        elif low < self.offset:
            # Grow downwards by at least the current size, so prepending stays rare.
            start = max(0, min(low, self.offset - max(len(self.dense), self.NEAR_ZERO)))
            start = 0 if start < self.NEAR_ZERO else start
            self.dense[:0] = bytes(self.offset - start)
            self.offset = start
        if high >= self.end:
            limit = self.DENSE_LIMIT - self.offset
            size = min(limit, max(high - self.offset + 1, 2 * len(self.dense), self.NEAR_ZERO))
            self.dense.extend(bytes(size - len(self.dense)))

    def covers(self, span: IdSpan) -> bool:
        """True when every id of ``span`` is in this set."""
        if not span.sparse <= self.sparse:
            return False
        start = span.offset - self.offset
        stop = start + span.bits.bit_length()
        mine = _pack(self.dense[max(start, 0) : max(stop, 0)]) << max(-start, 0)
        return not span.bits & ~mine

    def span(self) -> IdSpan:
        """The same ids as a bit set from the lowest one: what a range scan sends back."""
        low = self.dense.find(1)
        if low < 0:
            return IdSpan(0, 0, frozenset(self.sparse))
        high = self.dense.rfind(1) + 1
        return IdSpan(self.offset + low, _pack(self.dense[low:high]), frozenset(self.sparse))

    @classmethod
    def of(cls, values: Iterable[int]) -> IdSet:
        ids = cls()
        for value in values:
            ids.add(value)
        return ids


class Referenced:
    """Stands in for the user ids while users.csv is still being read: it accepts every
    id and notes it, and the notes are checked against the real ids afterwards."""

    def __init__(self) -> None:
        self.ids = IdSet()

    def __contains__(self, value: int) -> bool:
        self.ids.mark([value])
        return True

    def contains_all(self, values: Sequence[int]) -> bool:
        self.ids.mark(values)
        return True


_BIT_DIGITS = bytes.maketrans(b"\x00\x01", b"01")


def _pack(dense: bytes | bytearray) -> int:
    """Bit ``i`` set where byte ``i`` is 1: eight times smaller, in two C-level passes."""
    return int(dense.translate(_BIT_DIGITS)[::-1], 2) if dense else 0


@dataclass(frozen=True)
class IdSpan:
    """A compact, read-only id set: bit ``i`` of ``bits`` stands for id ``offset + i``;
    ids at or above ``IdSet.DENSE_LIMIT`` are in ``sparse``.

    A byte range of the experiments file holds ids from a narrow band, so its span is
    about an eighth of a byte per row, wherever the band lies.
    """

    offset: int
    bits: int
    sparse: frozenset[int]


def any_overlap(spans: Sequence[IdSpan]) -> bool:
    """True when an id is in two of ``spans``.

    Ids below ``IdSet.DENSE_LIMIT`` are always dense and the others always sparse, so
    the two kinds are checked apart.
    """
    seen = 0
    for span in spans:
        shifted = span.bits << span.offset
        if seen & shifted:
            return True
        seen |= shifted
    sparse = [s.sparse for s in spans]
    return sum(map(len, sparse)) != len(frozenset().union(*sparse))
