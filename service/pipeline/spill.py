"""Experiment spill files: validated rows as canonical text lines, one file per partition.

A line is ``user_id,compound_ids,run_time`` with no blanks, canonical ids and a run time
``float()`` reads back exactly. Starting with the user id, the lines of one user end up
next to each other when phase 2 sorts them, and whole files can be split at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from itertools import repeat
from pathlib import Path
from typing import BinaryIO


class LineSpill:
    """Routes lines to ``{prefix}-{p:04d}.txt`` by ``user_id % partitions``."""

    def __init__(self, directory: Path, prefix: str, partitions: int) -> None:
        self.paths = [directory / f"{prefix}-{p:04d}.txt" for p in range(partitions)]
        self._stack = ExitStack()
        self._files: list[BinaryIO] = []

    def __enter__(self) -> LineSpill:
        self._files = [self._stack.enter_context(p.open("wb")) for p in self.paths]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def write_lines(self, keys: Sequence[int], lines: Sequence[str]) -> None:
        n = len(self._files)
        if n == 1:
            buckets: list[list[str]] = [list(lines)]
        else:
            buckets = [[] for _ in range(n)]
            targets = map(buckets.__getitem__, map(int.__mod__, keys, repeat(n)))
            deque(map(list.append, targets, lines), maxlen=0)
        for f, bucket in zip(self._files, buckets, strict=True):
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
