"""Input errors: every problem names the file, line and column it was found at."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import chain

MAX_REPORTED_ERRORS = 100


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem in the input.

    ``line`` is the 1-based physical line; ``column`` is the 1-based field number (for
    problems below the field level, the field the offending character falls in).
    """

    file: str
    line: int | None
    column: int | None
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        name = f" ({self.field})" if self.field else ""
        return f"{where}{name}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FileOrder:
    """Errors file by file, in the order of ``files``, then by line and column."""

    files: tuple[str, ...] = ()

    def __call__(self, error: RowError) -> tuple[int, int, int]:
        rank = self.files.index(error.file) if error.file in self.files else len(self.files)
        return rank, error.line or 0, error.column or 0


class FileError(Exception):
    """A problem that makes a whole file unreadable (no header, bad encoding, ...)."""

    def __init__(self, error: RowError) -> None:
        super().__init__(str(error))
        self.error = error


class ErrorLog:
    """Keeps the first errors and counts all of them.

    ``add`` keeps errors in the order they come (a scan meets them in line order);
    ``extend`` merges the first errors of other logs, keeping the first by ``order``.
    """

    def __init__(
        self,
        keep: int = MAX_REPORTED_ERRORS,
        order: Callable[[RowError], tuple[int, int, int]] = FileOrder(),
    ) -> None:
        self.keep = keep
        self.order = order
        self.errors: list[RowError] = []
        self.total = 0

    def add(self, error: RowError) -> None:
        self.total += 1
        if len(self.errors) < self.keep:
            self.errors.append(error)

    def extend(self, errors: list[RowError], total: int) -> None:
        self.errors = heapq.nsmallest(self.keep, chain(self.errors, errors), key=self.order)
        self.total += total

    def __bool__(self) -> bool:
        return self.total > 0


class InputError(Exception):
    """The run's input is invalid; nothing was loaded."""

    def __init__(self, errors: list[RowError], total: int | None = None) -> None:
        self.errors = errors
        self.total = len(errors) if total is None else total
        shown = "; ".join(str(e) for e in errors[:3])
        more = f" (and {self.total - 3} more)" if self.total > 3 else ""
        super().__init__(f"{self.total} input error(s): {shown}{more}")
