"""Spill files: validated rows routed to one file per partition (``user_id % partitions``).

Users travel as pickled column batches. Experiments travel as text lines
``user_id,compound_ids,run_time`` with no blanks, canonical ids and a run time ``float()``
reads back exactly: starting with the user id, the lines of one user end up next to each
other when phase 2 sorts them, and whole files can be split at once.
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from itertools import repeat
from operator import mod
from pathlib import Path
from typing import Any, BinaryIO, Self, TypeVar

T = TypeVar("T")


class PartitionFiles:
    """One file per partition, ``{prefix}-{p:04d}{suffix}``, open for a ``with`` block."""

    suffix = ""

    def __init__(self, directory: Path, prefix: str, partitions: int) -> None:
        self.paths = [directory / f"{prefix}-{p:04d}{self.suffix}" for p in range(partitions)]
        self._stack = ExitStack()
        self._files: list[BinaryIO] = []

    def __enter__(self) -> Self:
        self._files = [self._stack.enter_context(p.open("wb")) for p in self.paths]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def buckets(self, keys: Sequence[int], column: Sequence[T]) -> list[list[T]]:
        """``column`` split by partition: item ``i`` goes to ``keys[i] % partitions``."""
        n = len(self._files)
        if n == 1:
            return [list(column)]
        buckets: list[list[T]] = [[] for _ in range(n)]
        # operator.mod, not int.__mod__: a slot wrapper costs ~3x the division itself.
        targets = map(buckets.__getitem__, map(mod, keys, repeat(n)))
        deque(map(list.append, targets, column), maxlen=0)
        return buckets


class ColumnSpill(PartitionFiles):
    """Pickled column batches (users: ids and names) per partition."""

    suffix = ".pkl"

    def write(self, keys: Sequence[int], *columns: Sequence[object]) -> None:
        parts = [self.buckets(keys, column) for column in (keys, *columns)]
        for p, f in enumerate(self._files):
            if parts[0][p]:
                pickle.dump(tuple(part[p] for part in parts), f, protocol=5)


def read_columns(paths: Sequence[Path]) -> Iterator[tuple[list[Any], ...]]:
    """The column batches a :class:`ColumnSpill` wrote to these files, in order."""
    for path in paths:
        if not path.exists():
            continue
        with path.open("rb") as f:
            while True:
                try:
                    yield pickle.load(f)
                except EOFError:
                    break


class LineSpill(PartitionFiles):
    """Routes lines to ``{prefix}-{p:04d}.txt`` by ``user_id % partitions``."""

    suffix = ".txt"

    def write_lines(self, keys: Sequence[int], lines: Sequence[str]) -> None:
        for f, bucket in zip(self._files, self.buckets(keys, lines), strict=True):
            if bucket:
                bucket.append("")
                f.write("\n".join(bucket).encode("ascii"))

    def write_rows(self, uids: Sequence[int], times: Sequence[float], comps: Sequence[str]) -> None:
        """Rows the slow path parsed: ids and compounds are canonical already."""
        lines = [f"{u},{c},{t!r}" for u, c, t in zip(uids, comps, times, strict=True)]
        self.write_lines(uids, lines)


def read_lines(paths: Sequence[Path]) -> str:
    """All spilled lines of one partition, each ending in a newline."""
    return "".join(p.read_text("ascii") for p in paths if p.exists())
