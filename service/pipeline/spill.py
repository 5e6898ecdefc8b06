"""Spill files: validated rows routed to partitions by a mixing hash of a key.

Each scan task (one byte range of a file) writes a single file per kind of spill. Rows
are grouped by partition in memory and written as pieces of up to ``PIECE_BYTES``; the
scan returns where each partition's pieces are, and later tasks read exactly those. One
file per scan rather than one per scan and partition: creating a file costs 50-450 us of
system time on this machine's disk, and there are hundreds of partitions.

The partition of a row is ``crc32(key) % partitions``, where the key is the canonical
text of an id (``"7"``, never ``"007"``). CRC-32 mixes every bit of the key, so ids in
strides, all even or all multiples of the partition count still spread evenly; it is a
fixed function, the same in every process and on every machine of a cluster.
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
from zlib import crc32

T = TypeVar("T")

PIECE_BYTES = 64 << 10  # a partition's buffer is written once it holds this much...
BUFFER_BYTES = 4 << 20  # ...or its share of this, when there are many partitions


def partitions_of(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition of each canonical id text."""
    if partitions == 1:
        return [0] * len(keys)
    # operator.mod, not int.__mod__: a slot wrapper costs ~3x the division itself.
    return list(map(mod, map(crc32, keys), repeat(partitions)))


def canonical_keys(ids: Sequence[int]) -> list[bytes]:
    return [b"%d" % i for i in ids]


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at ``offset`` of a spill file: rows of one partition."""

    path: Path
    offset: int
    length: int


class PartitionSpill:
    """Rows by partition into one file, ``{prefix}-spill``, open for a ``with`` block.

    Memory is bounded by ``BUFFER_BYTES`` (plus a line per partition). The file is
    rewritten, never appended to, so a task that runs again gives the same pieces.
    """

    def __init__(self, directory: Path, prefix: str, partitions: int) -> None:
        self.path = directory / f"{prefix}-spill"
        self.piece_bytes = max(1, min(PIECE_BYTES, BUFFER_BYTES // partitions))
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

    def buckets(self, parts: Sequence[int], column: Sequence[T]) -> list[list[T]]:
        """``column`` split by partition: item ``i`` goes to partition ``parts[i]``."""
        n = len(self._buffers)
        if n == 1:
            return [list(column)]
        buckets: list[list[T]] = [[] for _ in range(n)]
        targets = map(buckets.__getitem__, parts)
        deque(map(list.append, targets, column), maxlen=0)
        return buckets

    def put(self, partition: int, data: bytes) -> None:
        self._buffers[partition].append(data)
        self._sizes[partition] += len(data)
        if self._sizes[partition] >= self.piece_bytes:
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
    """Pickled column batches (users: ids, names and line numbers) per partition."""

    def write(self, parts: Sequence[int], *columns: Sequence[object]) -> None:
        split = [self.buckets(parts, column) for column in columns]
        for p in range(len(self._buffers)):
            if split[0][p]:
                self.put(p, pickle.dumps(tuple(part[p] for part in split), protocol=5))


def read_columns(pieces: Sequence[Piece]) -> Iterator[tuple[list[Any], ...]]:
    """The column batches a :class:`ColumnSpill` wrote to these pieces, in order."""
    for piece in pieces:
        stream = io.BytesIO(_read(piece))
        while stream.tell() < piece.length:
            yield pickle.load(stream)


class LineSpill(PartitionSpill):
    """ASCII text lines by partition (experiments)."""

    def write_lines(self, parts: Sequence[int], lines: Sequence[bytes]) -> None:
        for p, bucket in enumerate(self.buckets(parts, lines)):
            if bucket:
                bucket.append(b"")
                self.put(p, b"\n".join(bucket))


def read_lines(pieces: Sequence[Piece]) -> list[str]:
    """All spilled lines of these pieces, in the order they were written."""
    lines = b"".join(map(_read, pieces)).decode("ascii").split("\n")
    lines.pop()  # every piece ends in a newline
    return lines


def _read(piece: Piece) -> bytes:
    fd = os.open(piece.path, os.O_RDONLY)
    try:
        data = os.pread(fd, piece.length, piece.offset)
    finally:
        os.close(fd)
    if len(data) != piece.length:
        raise OSError(f"{piece.path}: spill file shorter than its index says")
    return data
