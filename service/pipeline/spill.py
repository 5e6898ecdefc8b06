"""Spill files: validated rows routed to partitions by a mixing hash of a key.

Each scan task (one byte range of a file) writes a single file per kind of spill and
returns its index; later tasks read exactly their partition's extents. One file per
scan rather than one per scan and partition: creating a file costs 50-450 us of system
time on this machine's disk, and there are hundreds of partitions.

The partition of a row is ``crc32(key) % partitions``, where the key is the canonical
text of an id (``"7"``, never ``"007"``). CRC-32 mixes every bit of the key, so ids in
strides, all even or all multiples of the partition count still spread evenly; it is a
fixed function, the same in every process and on every machine of a cluster.
"""

from __future__ import annotations

import io
import os
import pickle
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import mod
from pathlib import Path
from typing import Any, BinaryIO, Self, TypeVar
from zlib import crc32

T = TypeVar("T")

BUFFER_BYTES = 8 << 20  # rows a spill holds before it writes them out


def partitions_of(keys: Sequence[bytes], partitions: int) -> list[int]:
    """The partition of each canonical id text."""
    if partitions == 1:
        return [0] * len(keys)
    # operator.mod, not int.__mod__: a slot wrapper costs ~3x the division itself.
    return list(map(mod, map(crc32, keys), repeat(partitions)))


def canonical_keys(ids: Sequence[int]) -> list[bytes]:
    return [b"%d" % i for i in ids]


@dataclass(frozen=True)
class Extent:
    """One partition's rows in one spill file: the bytes ``[starts[i], ends[i])``.

    ``path`` is a plain string: a task gets an extent of every scan's file (30M: 110 per
    partition), and a ``Path`` took 2.4x as long to pickle and load (benchmarks/README,
    sixteenth round).
    """

    path: str
    starts: array[int]
    ends: array[int]

    @property
    def size(self) -> int:
        return sum(self.ends) - sum(self.starts)

    def split(self, at: int) -> tuple[Extent, Extent]:
        """The first ``at`` byte ranges, and the others."""
        return (
            Extent(self.path, self.starts[:at], self.ends[:at]),
            Extent(self.path, self.starts[at:], self.ends[at:]),
        )


@dataclass(frozen=True)
class SpillIndex:
    """Where each partition's rows are in one spill file.

    The file is a series of flushes, each holding every partition's buffered rows in
    partition order: ``offsets[f * partitions + p]`` is where partition ``p`` starts in
    flush ``f``, and the next offset is where it ends. One flat array per file, whatever
    the number of partitions: a partition's extent is two strided slices of it.
    """

    path: Path
    partitions: int
    offsets: array[int]

    def extent(self, partition: int) -> Extent | None:
        n, last = self.partitions, len(self.offsets) - 1
        starts = self.offsets[partition:last:n]
        ends = self.offsets[partition + 1 : last + 1 : n]
        if starts == ends:
            return None
        return Extent(str(self.path), starts, ends)


class PartitionSpill:
    """Rows by partition into one file, ``{prefix}-spill``, open for a ``with`` block.

    Rows are buffered by partition and written, all partitions at once, whenever the
    buffers hold ``BUFFER_BYTES``: memory is bounded by that, and the file has a few
    large flushes rather than many small pieces. The file is rewritten, never appended
    to, so a task that runs again gives the same index.
    """

    def __init__(self, directory: Path, prefix: str, partitions: int) -> None:
        self.path = directory / f"{prefix}-spill"
        self.partitions = partitions
        self.offsets = array("q")
        self._buffers: list[list[bytes]] = [[] for _ in range(partitions)]
        self._held = 0
        self._file: BinaryIO | None = None
        self._offset = 0

    def __enter__(self) -> Self:
        self._file = self.path.open("wb")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None
        try:
            if exc[0] is None:
                if self._held:
                    self._flush()
                self.offsets.append(self._offset)
        finally:
            self._file.close()

    @property
    def index(self) -> SpillIndex:
        return SpillIndex(self.path, self.partitions, self.offsets)

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
        self._held += len(data)
        if self._held >= BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        assert self._file is not None
        chunks = []
        for buffer in self._buffers:
            self.offsets.append(self._offset)
            data = b"".join(buffer)
            buffer.clear()
            chunks.append(data)
            self._offset += len(data)
        self._file.write(b"".join(chunks))
        self._held = 0


class ColumnSpill(PartitionSpill):
    """Pickled column batches (users: ids, names and line numbers) per partition."""

    def write(self, parts: Sequence[int], *columns: Sequence[object]) -> None:
        split = [self.buckets(parts, column) for column in columns]
        for p in range(len(self._buffers)):
            if split[0][p]:
                self.put(p, pickle.dumps(tuple(part[p] for part in split), protocol=5))


def read_columns(extents: Sequence[Extent]) -> Iterator[tuple[list[Any], ...]]:
    """The column batches a :class:`ColumnSpill` wrote to these extents, in order."""
    for data in _read(extents):
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            yield pickle.load(stream)


class LineSpill(PartitionSpill):
    """ASCII text lines by partition (experiments)."""

    def write_lines(self, parts: Sequence[int], lines: Sequence[bytes]) -> None:
        for p, bucket in enumerate(self.buckets(parts, lines)):
            if bucket:
                bucket.append(b"")
                self.put(p, b"\n".join(bucket))


def read_lines(extents: Sequence[Extent]) -> list[bytes]:
    """All spilled lines of these extents, in the order they were written.

    Bytes, not text: the lines are ASCII, and a partition's ~300k fields as bytes
    objects are smaller than as str and need no decoding (sorting, joining and
    splitting a captured partition: 80-84 ms as str, 67-78 ms as bytes).
    """
    lines = b"".join(_read(extents)).split(b"\n")
    lines.pop()  # every piece ends in a newline
    return lines


def _read(extents: Sequence[Extent]) -> Iterator[bytes]:
    for extent in extents:
        fd = os.open(extent.path, os.O_RDONLY)
        try:
            for start, end in zip(extent.starts, extent.ends, strict=True):
                if end > start:
                    data = os.pread(fd, end - start, start)
                    if len(data) != end - start:
                        raise OSError(f"{extent.path}: spill file shorter than its index says")
                    yield data
        finally:
            os.close(fd)
