"""Unpacking a zip of the three input files, safely.

A zip is untrusted: its members may name paths outside the target (``../``, absolute
paths, drive letters), may be links, and may inflate a few kilobytes into gigabytes.
Only the members the pipeline looks for are extracted, each into the target directory
under its base name, never through a path it names. Sizes are counted on the bytes
actually written, not on the sizes the zip declares (they can lie): the total is capped
(``max_bytes``) and so is each member's ratio of written to compressed bytes.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .pipeline.csvfile import SPECS

BLOCK = 1 << 20
# Below this a member's ratio is not checked: a tiny file compresses arbitrarily well.
RATIO_FLOOR = 1 << 20
WANTED = frozenset(name for spec in SPECS for name in spec.filenames)


class ArchiveRejected(Exception):
    """The archive is unusable or unsafe; ``too_large``: it inflates past a limit."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int | None  # decompressed bytes of all members extracted; None: no limit
    max_ratio: float


def extract_inputs(
    archive: Path,
    target: Path,
    limits: ArchiveLimits,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, str]:
    """Extract the input CSVs into ``target``; {file name written: path in the zip}.

    Files may sit at the top of the zip or in a folder (zipping a folder does that);
    other members are ignored but must have safe paths too.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            chosen = _choose(zf.infolist())
            declared = sum(info.file_size for info in chosen.values())
            if limits.max_bytes is not None and declared > limits.max_bytes:
                raise _too_large(limits)
            written = 0
            for name, info in chosen.items():
                written = _extract(zf, info, target / name, written, limits, stop)
    except zipfile.BadZipFile as exc:
        raise ArchiveRejected(f"not a readable zip archive ({exc})") from None
    except (NotImplementedError, RuntimeError) as exc:  # unknown method, encrypted
        raise ArchiveRejected(f"cannot extract ({exc})") from None
    return {name: info.filename for name, info in chosen.items()}


def _choose(members: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    chosen: dict[str, zipfile.ZipInfo] = {}
    for info in members:
        name = info.filename
        path = PurePosixPath(name.replace("\\", "/"))
        parts = path.parts
        if not parts or path.is_absolute() or ".." in parts or ":" in parts[0]:
            raise ArchiveRejected(f"unsafe member path {name!r} (leaves the archive)")
        if info.is_dir() or path.name.startswith(".") or "__MACOSX" in path.parts:
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveRejected(f"member {name!r} is a symbolic link")
        if path.name not in WANTED:
            continue
        if path.name in chosen:
            raise ArchiveRejected(
                f"two members named {path.name}: {chosen[path.name].filename!r} and {name!r}"
            )
        chosen[path.name] = info
    for spec in SPECS:
        if not any(name in chosen for name in spec.filenames):
            raise ArchiveRejected(f"no {' or '.join(spec.filenames)} in the archive")
        if sum(name in chosen for name in spec.filenames) > 1:
            raise ArchiveRejected(f"ambiguous: both {' and '.join(spec.filenames)}")
    return chosen


def _extract(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    path: Path,
    written: int,
    limits: ArchiveLimits,
    stop: Callable[[], bool],
) -> int:
    size = 0
    compressed = max(info.compress_size, 1)
    with zf.open(info) as source, path.open("xb") as out:
        while data := source.read(BLOCK):
            size += len(data)
            if limits.max_bytes is not None and written + size > limits.max_bytes:
                raise _too_large(limits)
            if size > RATIO_FLOOR and size / compressed > limits.max_ratio:
                raise ArchiveRejected(
                    f"member {info.filename!r} inflates"
                    f" more than {limits.max_ratio:g} times its compressed size (a zip bomb?)",
                    too_large=True,
                )
            if stop():
                raise InterruptedError("run cancelled")
            out.write(data)
    return written + size


def _too_large(limits: ArchiveLimits) -> ArchiveRejected:
    return ArchiveRejected(
        f"the files in it decompress to more than {limits.max_bytes}"
        " bytes (the upload limit counts decompressed bytes)",
        too_large=True,
    )
