"""Field rules: what an id, a run time and a compound list may look like.

Each rule exists twice: a per-value function that explains what is wrong, and a
per-column check over a block's raw ASCII tokens that accepts a whole column in a few
C-level passes or says "look closer". A column check accepts a column only when every
value in it is accepted by the per-value rule *and already in canonical form* (an id
without leading zeros), so the text can be used as the id's key as it is; property
tests compare the two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

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


DIGITS = b"0123456789"
_NINES = bytes.maketrans(DIGITS, b"9" * len(DIGITS))  # every digit to 9: runs show lengths
_TIME_NINES = bytes.maketrans(DIGITS + b".", b"9" * (len(DIGITS) + 1))
_LEADING_ZERO = re.compile(rb"[,;]0[0-9]")
ID_DIGITS = len(str(BIGINT_MAX))  # 19
TIME_CHARS = 300  # a plain decimal this long is far below float's ~1.8e308: finite


def ids_valid(column: Sequence[bytes]) -> bool:
    """True when every token is a canonical id (``parse_id`` accepts it and gives it back)."""
    if not column:
        return True
    joined = b",".join(column)
    if joined.translate(None, DIGITS + b","):
        return False
    padded = b"," + joined + b","
    if b",," in padded or (b",0" in padded and _LEADING_ZERO.search(padded)):
        return False
    # Lengths from runs of nines in one pass over the joined text: half the time of
    # max(map(len, column)) (benchmarks/README, eighth round).
    if b"9" * ID_DIGITS not in joined.translate(_NINES):
        return True
    return max(map(int, column)) <= BIGINT_MAX  # canonical: 20 digits are past it too


def run_times_valid(column: Sequence[bytes]) -> bool:
    """True when every token is a plain decimal (``12``, ``60.18``, ``.5``, ``5.``) that
    ``parse_run_time`` accepts; exponents and other spellings need a closer look."""
    if not column:
        return True
    joined = b",".join(column)
    if joined.translate(None, DIGITS + b".,"):
        return False
    padded = b"," + joined + b","
    if b",," in padded or b",.," in padded or b".." in padded.translate(None, DIGITS):
        return False
    return b"9" * (TIME_CHARS + 1) not in padded.translate(_TIME_NINES)


def compound_lists_valid(column: Sequence[bytes]) -> bool:
    """True when every token is empty or ``;``-separated canonical ids."""
    if not column:
        return True
    joined = b",".join(column)
    if joined.translate(None, DIGITS + b";,"):
        return False
    padded = b"," + joined + b","
    if b";;" in padded or b",;" in padded or b";," in padded:
        return False
    if (b",0" in padded or b";0" in padded) and _LEADING_ZERO.search(padded):
        return False
    return b"9" * ID_DIGITS not in padded.translate(_NINES)  # a 19-digit id: look closer


def ids_column(column: Sequence[str]) -> list[int] | None:
    """All ids of a stripped text column, or None when any of them needs a closer look."""
    joined = "".join(column)
    if not (all(column) and joined.isascii() and not joined.encode().translate(None, DIGITS)):
        return None
    try:
        ids = list(map(int, column))
    except ValueError:  # more digits than int() converts
        return None
    if ids and max(ids) > BIGINT_MAX:
        return None
    return ids
