"""Temporary directories (a run's spill files, an upload) that a dead process cannot leak.

Each directory holds a lock file its creator keeps locked (``flock``) for as long as it
uses it; the kernel drops the lock when that process ends, however it ends. At start-up
:func:`clean_leftovers` removes the directories of this service (by their prefixes) whose
lock nobody holds: what a SIGKILLed or crashed server left. A live process's directory,
this one's or another replica's on a shared disk, is locked and left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".owner.lock"
PREFIXES = ("etl-run-", "etl-upload-")
# A directory without a lock file is one being created this instant (or one whose creator
# died within that instant): it is only removed once older than this many seconds.
UNLOCKED_GRACE = 60.0


class ScratchDir:
    """A fresh ``{prefix}*`` directory in ``parent``, owned while this object lives."""

    def __init__(self, prefix: str, parent: Path) -> None:
        assert prefix in PREFIXES, prefix
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            self._fd: int | None = os.open(
                self.path / LOCK_FILE, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600
            )
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def remove(self) -> None:
        """Delete the directory, then let go of it (blocking: call it in a thread)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def clean_leftovers(parent: Path) -> list[Path]:
    """Remove this service's directories in ``parent`` whose owner is gone; those removed."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(PREFIXES) and p.is_dir()]
    except OSError:  # no such directory yet, or not readable: nothing of ours to clean
        return removed
    for directory in candidates:
        if _remove_if_abandoned(directory):
            removed.append(directory)
    if removed:
        log.warning(
            "removed temporary directories left by stopped processes",
            extra={"event": "recover", "detail": [str(p) for p in removed]},
        )
    return removed


def _remove_if_abandoned(directory: Path) -> bool:
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            age = time.time() - directory.stat().st_mtime
        except FileNotFoundError:
            return False
        if age < UNLOCKED_GRACE:
            return False
        shutil.rmtree(directory, ignore_errors=True)
        return True
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its owner is alive
        shutil.rmtree(directory, ignore_errors=True)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
