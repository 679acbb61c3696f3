"""FUSE passthrough: the kernel serves an open file's read, write and mmap from a backing file.

Why: through the daemon every read crosses into Python and the FUSE inode keeps a page-cache
copy of its own, so N names for one content cost N copies in RAM (issue 10). With passthrough
the daemon registers an open fd of a real file with the kernel once, puts the returned backing
id in the open reply, and never sees the I/O; every FUSE inode over that file shares its page
cache. It needs Linux >= 6.9, libfuse >= 3.17 and pyfuse3 built with the project's patch
(scripts/pyfuse3/passthrough.patch, installed by scripts/setup). With stock pyfuse3, a kernel
that does not offer it, or a mount without CAP_SYS_ADMIN (EPERM), the daemon serves reads itself.

Kernel rules this module keeps: one backing id per inode, shared by all of the inode's
concurrent opens (a second id for an inode that is open fails that open with EIO); no
``keep_cache`` in a passthrough open reply (EIO); no writeback cache on the same mount (the
kernel then silently refuses passthrough, and ``enabled()`` says False).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

log = logging.getLogger(__name__)

# The patched pyfuse3 functions; getattr keeps this module importable and type-checkable
# against stock pyfuse3, where they are missing.
_open: Callable[[int], int] | None = getattr(pyfuse3, "passthrough_open", None)
_close: Callable[[int], None] | None = getattr(pyfuse3, "passthrough_close", None)
_enabled: Callable[[], bool] | None = getattr(pyfuse3, "passthrough_enabled", None)

NOT_BUILT_REASON = "pyfuse3 lacks the passthrough patch: run scripts/setup"


def available() -> bool:
    """Whether the installed pyfuse3 has the passthrough API (hubfs's patched build)."""
    return _open is not None and _close is not None and _enabled is not None


def enabled() -> bool:
    """Whether this mount asked the kernel for passthrough and the kernel offers it.

    Known only from ``Operations.init()`` on: before it the kernel has not yet said what it
    supports. Registering a backing file can still be refused (EPERM without CAP_SYS_ADMIN).
    """
    return _enabled is not None and _enabled()


def register(fd: int) -> int:
    """Register the open file ``fd`` as a backing file; return its backing id (> 0).

    The kernel keeps its own reference to the file, so ``fd`` may be closed afterwards.
    Raises OSError when the kernel refuses, and RuntimeError with stock pyfuse3.
    """
    if _open is None:
        raise RuntimeError(NOT_BUILT_REASON)
    return _open(fd)


def unregister(backing_id: int) -> None:
    """Drop a backing id: opens already using it go on working, new opens cannot use it."""
    if _close is None:
        raise RuntimeError(NOT_BUILT_REASON)
    _close(backing_id)


def file_info(fh: int, backing_id: int | None, keep_cache: bool, direct_io: bool
              ) -> pyfuse3.FileInfo:
    """The open reply for ``fh``: served by the kernel from ``backing_id``, else by the daemon.

    ``keep_cache`` is off for a passthrough reply (the kernel fails the open with EIO
    otherwise), and so is ``direct_io`` (the backing file's own flags decide).
    """
    if backing_id is None:
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=direct_io)
    info: Any = pyfuse3.FileInfo(fh=fh, keep_cache=False)
    info.backing_id = backing_id
    return info


@dataclass
class _Backing:
    backing_id: int
    source: object  # which file backs the inode (an object id, a staging): one at a time
    opens: int


class BackingTable:
    """The backing id of each inode that has passthrough opens, counted by open.

    ``acquire`` at open, ``release`` at release: the first open of an inode registers its
    backing file, later concurrent opens share that id, the last release unregisters it.
    While an inode is backed by one file, the kernel fails (EIO) any open of it that is not
    served from that same file: ``source`` tells the caller which file that is, so it can
    refuse an open that must not be served from it. Once
    the kernel refuses a registration with EPERM or EOPNOTSUPP (a non-root mount,
    passthrough not enabled), the table stops trying. Used from the trio thread only.
    """

    def __init__(self, refused: str | None = None) -> None:
        self._by_inode: dict[int, _Backing] = {}
        self.refused: str | None = refused or (None if available() else NOT_BUILT_REASON)

    def status(self) -> tuple[bool, str]:
        """(on, why) for the log and a status command."""
        if self.refused is not None:
            return False, self.refused
        if not enabled():
            return False, ("the kernel did not enable passthrough (needs Linux >= 6.9 with "
                           "CONFIG_FUSE_PASSTHROUGH, and no writeback cache)")
        return True, "the kernel serves files that have an object straight from it"

    def source(self, inode: int) -> object | None:
        """The file backing ``inode``'s open files now, if any."""
        held = self._by_inode.get(inode)
        return None if held is None else held.source

    def acquire(self, inode: int, source: object, open_backing: Callable[[], int]
                ) -> int | None:
        """The backing id for a new open of ``inode``, or None for a daemon-served open. An
        inode with a backing file keeps it: the open shares it, whatever ``source`` says.

        ``open_backing`` returns a fresh fd of the file ``source`` names (read-write for a
        file the kernel writes); it is called only when the inode has no backing id yet, and
        closed here.
        """
        if inode in self._by_inode:
            return self.share(inode)
        if self.refused is not None or not enabled():
            return None
        fd = open_backing()
        try:
            backing_id = register(fd)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            self.refused = (f"the kernel refused a backing file ({os.strerror(exc.errno)}): "
                            "passthrough needs a mount run as root (CAP_SYS_ADMIN)")
            log.info("passthrough off: %s", self.refused)
            return None
        finally:
            os.close(fd)
        self._by_inode[inode] = _Backing(backing_id, source, 1)
        return backing_id

    def sources(self) -> set[object]:
        """The files backing open files now."""
        return {held.source for held in self._by_inode.values()}

    def share(self, inode: int) -> int:
        """The backing id of an inode that has one, for one more open of it."""
        held = self._by_inode[inode]
        held.opens += 1
        return held.backing_id

    def release(self, inode: int) -> None:
        """An open that ``acquire`` gave a backing id ended; unregister it at the last one."""
        held = self._by_inode.get(inode)
        if held is None:
            return
        held.opens -= 1
        if held.opens == 0:
            del self._by_inode[inode]
            unregister(held.backing_id)

    def held(self) -> int:
        """How many inodes have a backing id registered now (for stats and tests)."""
        return len(self._by_inode)
