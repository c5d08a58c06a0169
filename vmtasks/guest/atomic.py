"""The one atomic file write: a reader sees the old file or the new one, never half of one.

Used by the ledger (leases), the run records, JUnit and the durations history. A failure
(disk full, read-only directory) becomes a ``StateError`` naming the file and what to do.
Imported inside the guest (Python 3.9, standard library only).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Union

from .errors import StateError


def write_atomic(path: Union[str, "os.PathLike[str]"], data: Union[bytes, str], mode: int = 0o644,
                 durable: bool = False, make_dirs: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and
    ``os.replace``. ``durable``: fsync before the rename (leases: they must survive a crash).
    ``make_dirs``: create the missing directories first (a --junitfile into a new folder)."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = target.with_name(".{}.{}.tmp".format(target.name, os.getpid()))
    try:
        if make_dirs:
            target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            write_all(fd, payload)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(str(tmp), str(target))
    except OSError as exc:
        try:
            os.unlink(str(tmp))
        except OSError:
            pass
        raise StateError("cannot write {}: {}".format(target, exc.strerror or exc), write_hint(exc)) from None


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_hint(exc: OSError) -> str:
    """What to do about a failed write, by its errno."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return "the disk is full: free space (`df -h`) and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the directory is not writable: fix its permissions or point the setting elsewhere"
    return "check the path and the disk"
