"""What the kernel holds of the mounted tree: lookup references, open handles, cached pages.

An inode the kernel has looked up or opened is *tracked* here until the kernel forgets it and
closes every handle. Only then may an inode with no names be dropped from the index. The mount's
trio thread owns all of it; there is no lock.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from .errors import FsError


class Served(enum.Enum):
    """How the kernel serves an open file's bytes."""

    KERNEL = "kernel"  # FUSE passthrough from the content's object: no daemon, shared pages
    CACHED = "cached"  # the daemon fills the FUSE inode's page cache


@dataclass
class Tracked:
    lookups: int = 0
    handles: int = 0
    writers: int = 0
    cached: int = 0  # handles of ``Served.CACHED``: the kernel then refuses passthrough opens
    # The stored content reads are served from (when no staging overlays it): kept here, so a
    # read needs no index lookup, and switched by a commit in the same step as the index.
    content_id: bytes = b""
    # The content whose pages the kernel may still cache for this inode (FOPEN_KEEP_CACHE).
    cached_content: bytes | None = None


@dataclass(frozen=True)
class Handle:
    ino: int
    writable: bool
    served: Served = Served.CACHED


class OpenFiles:
    def __init__(self) -> None:
        self._tracked: dict[int, Tracked] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1

    def _track(self, ino: int) -> Tracked:
        tracked = self._tracked.get(ino)
        if tracked is None:
            tracked = self._tracked[ino] = Tracked()
        return tracked

    def looked_up(self, ino: int) -> None:
        self._track(ino).lookups += 1

    def forget(self, ino: int, count: int) -> None:
        tracked = self._tracked.get(ino)
        if tracked is not None:
            tracked.lookups = max(0, tracked.lookups - count)
            self._drop_if_idle(ino, tracked)

    def open(self, ino: int, writable: bool, content_id: bytes,
             served: Served = Served.CACHED) -> int:
        tracked = self._track(ino)
        tracked.handles += 1
        tracked.writers += writable
        tracked.cached += served is Served.CACHED
        tracked.content_id = content_id  # read from the index on this thread: current
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(ino, writable, served)
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def close(self, fh: int) -> Handle | None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            tracked = self._tracked[handle.ino]
            tracked.handles -= 1
            tracked.writers -= handle.writable
            tracked.cached -= handle.served is Served.CACHED
            self._drop_if_idle(handle.ino, tracked)
        return handle

    def _drop_if_idle(self, ino: int, tracked: Tracked) -> None:
        if not (tracked.lookups or tracked.handles):
            del self._tracked[ino]  # forgotten by the kernel: its page cache is gone too

    def busy(self, ino: int) -> bool:
        return ino in self._tracked

    def cached(self, ino: int) -> int:
        """Open handles of the inode whose pages the kernel caches (``Served.CACHED``)."""
        tracked = self._tracked.get(ino)
        return tracked.cached if tracked else 0

    def writers(self, ino: int) -> int:
        tracked = self._tracked.get(ino)
        return tracked.writers if tracked else 0

    def content(self, ino: int) -> bytes:
        return self._track(ino).content_id

    def switched(self, ino: int, content_id: bytes, cached_by_kernel: bool) -> None:
        """A commit gave the inode new content (whose bytes the kernel's pages hold, when it
        wrote them through this mount)."""
        tracked = self._tracked.get(ino)
        if tracked is not None:
            tracked.content_id = content_id
            tracked.cached_content = content_id if cached_by_kernel else None

    def keep_cache(self, ino: int, content_id: bytes, staged: bool) -> bool:
        """Whether an open may keep the kernel's cached pages: they hold this very content.
        Records that the kernel will cache ``content_id`` from now on."""
        tracked = self._track(ino)
        keep = not staged and tracked.cached_content == content_id
        if not staged:
            tracked.cached_content = content_id
        return keep

    def open_contents(self) -> set[bytes]:
        """The stored contents open files read from now."""
        return {t.content_id for t in self._tracked.values() if t.handles and t.content_id}

    def open_count(self) -> int:
        return len(self._handles)
