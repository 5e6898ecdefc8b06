"""Spill files: validated rows routed by partition (``user_id % partitions``).

Each scan (users.csv, or one byte range of the experiments) writes a single file. Rows
are grouped by partition in memory and written as pieces of up to ``PIECE_BYTES``; the
scan returns where each partition's pieces are, and phase 2 reads exactly those. One
file per scan rather than one per scan and partition: at 10M that is 21 files instead
of ~3000, and creating a file cost 50-450 us of system time on this machine's disk.

Users travel as pickled column batches. Experiments travel as text lines
``user_id,compound_ids,run_time`` with no blanks, canonical ids and a run time ``float()``
reads back exactly: starting with the user id, the lines of one user end up next to each
other when phase 2 sorts them, and whole pieces can be split at once.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import mod
from pathlib import Path
from typing import Any, BinaryIO, Self, TypeVar

T = TypeVar("T")

PIECE_BYTES = 64 << 10  # a partition's buffer is written once it holds this much


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at ``offset`` of a spill file: rows of one partition."""

    path: Path
    offset: int
    length: int


class PartitionSpill:
    """Rows by partition into one file, ``{prefix}-spill``, open for a ``with`` block.

    Memory is bounded by ``partitions * PIECE_BYTES`` of buffered bytes.
    """

    def __init__(self, directory: Path, prefix: str, partitions: int) -> None:
        self.path = directory / f"{prefix}-spill"
        self.pieces: list[list[Piece]] = [[] for _ in range(partitions)]
        self._buffers: list[list[bytes]] = [[] for _ in range(partitions)]
        self._sizes = [0] * partitions
        self._file: BinaryIO | None = None
        self._offset = 0

    def __enter__(self) -> Self:
        self._file = self.path.open("wb")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        try:
            if exc[0] is None:
                for p in range(len(self._buffers)):
                    self._flush(p)
        finally:
            self._file.close()

    def buckets(self, keys: Sequence[int], column: Sequence[T]) -> list[list[T]]:
        """``column`` split by partition: item ``i`` goes to ``keys[i] % partitions``."""
        n = len(self._buffers)
        if n == 1:
            return [list(column)]
        buckets: list[list[T]] = [[] for _ in range(n)]
        # operator.mod, not int.__mod__: a slot wrapper costs ~3x the division itself.
        targets = map(buckets.__getitem__, map(mod, keys, repeat(n)))
        deque(map(list.append, targets, column), maxlen=0)
        return buckets

    def put(self, partition: int, data: bytes) -> None:
        self._buffers[partition].append(data)
        self._sizes[partition] += len(data)
        if self._sizes[partition] >= PIECE_BYTES:
            self._flush(partition)

    def _flush(self, partition: int) -> None:
        if not self._sizes[partition]:
            return
        assert self._file is not None
        data = b"".join(self._buffers[partition])
        self._file.write(data)
        self.pieces[partition].append(Piece(self.path, self._offset, len(data)))
        self._offset += len(data)
        self._buffers[partition].clear()
        self._sizes[partition] = 0


class ColumnSpill(PartitionSpill):
    """Pickled column batches (users: ids and names) per partition."""

    def write(self, keys: Sequence[int], *columns: Sequence[object]) -> None:
        parts = [self.buckets(keys, column) for column in (keys, *columns)]
        for p in range(len(self._buffers)):
            if parts[0][p]:
                self.put(p, pickle.dumps(tuple(part[p] for part in parts), protocol=5))


def read_columns(pieces: Sequence[Piece]) -> Iterator[tuple[list[Any], ...]]:
    """The column batches a :class:`ColumnSpill` wrote to these pieces, in order."""
    for piece in pieces:
        stream = io.BytesIO(_read(piece))
        while stream.tell() < piece.length:
            yield pickle.load(stream)


class LineSpill(PartitionSpill):
    """Text lines by partition (experiments)."""

    def write_lines(self, keys: Sequence[int], lines: Sequence[str]) -> None:
        for p, bucket in enumerate(self.buckets(keys, lines)):
            if bucket:
                bucket.append("")
                self.put(p, "\n".join(bucket).encode("ascii"))

    def write_rows(self, uids: Sequence[int], times: Sequence[float], comps: Sequence[str]) -> None:
        """Rows the slow path parsed: ids and compounds are canonical already."""
        lines = [f"{u},{c},{t!r}" for u, c, t in zip(uids, comps, times, strict=True)]
        self.write_lines(uids, lines)


def read_lines(pieces: Sequence[Piece]) -> str:
    """All spilled lines of these pieces, each ending in a newline."""
    return b"".join(map(_read, pieces)).decode("ascii")


def _read(piece: Piece) -> bytes:
    fd = os.open(piece.path, os.O_RDONLY)
    try:
        data = os.pread(fd, piece.length, piece.offset)
    finally:
        os.close(fd)
    if len(data) != piece.length:
        raise OSError(f"{piece.path}: spill file shorter than its index says")
    return data
