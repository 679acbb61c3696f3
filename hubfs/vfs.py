"""The mounted filesystem's model: one async call per FUSE request, over three parts.

- ``names.Names``: names and attributes, with the multi-user rules;
- ``openfiles.OpenFiles``: what the kernel holds (lookups, handles, cached pages);
- ``writeback.WriteBack``: written bytes until they are stored content;
- ``passthrough.BackingTable``: the object file the kernel serves each inode's opens from.

How an open is served (``_open_reply``). A read-only open of stored content that has an
object (hubfs.objects) is served by the kernel from that object (FUSE passthrough): no READ
request reaches the daemon, and every inode, user and mount over that content shares one page
cache. A new file (``create``, or an ``O_TRUNC`` open that empties a file nobody else has open)
is written by the kernel straight into its staging file, which at commit becomes its object:
a download runs at the disk's speed and its page cache stays valid. Any other open (an
in-place update, a file the daemon is staging, content without an object) is served by the
daemon through the FUSE inode's page cache. The kernel requires every open of an inode that
has passthrough opens to be one too, from the same file (else the open fails with EIO): such
opens share that file, and while it is an object (or a staged file already stored), opening
the inode for writing or truncating it fails with ETXTBSY ("text file busy"), as writing a
running program does. ML libraries never hit this: they replace files by rename.

This class only ties them together, so ``fs.py`` translates and decides nothing, and tests drive
the whole model in-process, without a mount (tests/test_model.py).

Concurrency, in one page
------------------------
*One owner.* Every method here, and every piece of mutable state of the three parts, belongs to
the mount's trio thread. Code between two ``await``\\ s runs alone, so a request that reads the
index and the in-memory state (``attributes``, ``open``, ``read``) sees them agree: a commit
changes both in one step, with no ``await`` between its index transaction and its state change.

*Worker threads get immutable inputs.* Chunking, hashing, compression, pack appends, decoding
and fsyncs run in worker threads (``trio.to_thread``, at most ``WORKER_THREADS`` at once). They
get a ``staging.Snapshot`` (a frozen layout plus the file held open by ``Staging.in_use``) or a
content id, and return bytes or ``PreparedContent``. They never change state of this model.

*Per-file order.* A trio lock per staged file (``writeback.Pending.busy``) lets one front ingest
or commit of it run at a time. A write that lands while a commit prepares bumps the staging's
generation; the commit sees it when it comes back and goes round again (or leaves the file to
the writer's close). Nothing sleeps and polls.

*Locks that remain*, all short and never held across an ``await`` or each other except where
named: ``PackWriter._sync_lock`` then ``PackWriter._lock`` (appends vs. fsync);
``Ingestor._pending_lock``; ``Store.pinned_lock`` (pins vs. gc); ``IngestGate`` (ingests vs. a
gc step: an ingest holds it shared from its first index lookup to its registration, entering
in a worker if gc runs and leaving on the trio thread; a cluster node's cache eviction,
hubfs.cache, takes it alone in a worker and leaves it on the trio thread after one index
transaction); ``Staging._guard`` (a staging file's
descriptor vs. its readers); the reader's LRU locks. LMDB allows one write transaction at a
time: the trio thread writes names, attributes and commits; gc (a worker, under the gate) moves
chunks. No write transaction spans an ``await``.

*Durability* is what POSIX promises, not more (group commit). Index transactions commit without
a disk sync, so a killed daemon loses nothing (the OS has every commit), and ``Index.sync``
makes them durable at fsync, fsyncdir, unmount and every ``SYNC_INTERVAL_S``. Pack bytes are
fsync'd before the index transaction that names them commits (``writeback.GroupSync`` shares one
fsync between all commits waiting for it). A closed file is in its staging file until committed,
and ``recover`` commits it after a crash.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from .errors import FsError
from .index import Inode
from .materialise import DEFAULT_BUDGET_BYTES, Materialiser
from .names import Caller, Names
from .openfiles import OpenFiles, Served
from .passthrough import BackingTable
from .passthrough import enabled as passthrough_enabled
from .policy import Policy
from .staging import INGEST_STEP_BYTES
from .store import Store
from .writeback import NeedsDecoding, WriteBack

log = logging.getLogger(__name__)

WORKER_THREADS = 4
READ_THREADS = 4
SYNC_INTERVAL_S = 1.0
# readdir offsets: "." and ".." come first, then each entry at its sequence number plus this
DOT_ENTRIES = 2
T = TypeVar("T")


@dataclass(frozen=True)
class OpenReply:
    """What the kernel is told about a new open file."""

    fh: int
    keep_cache: bool = False  # its cached pages hold this very content
    backing_id: int | None = None  # served by the kernel from this backing file


@dataclass(frozen=True)
class Attributes:
    """An inode's attributes as the kernel should see them (a staged file's size and times
    laid over the stored ones)."""

    ino: int
    inode: Inode
    size: int
    mtime_ns: int
    ctime_ns: int


class FileSystem:
    def __init__(self, store: Store, policy: Policy | None = None,
                 ingest_step_bytes: int = INGEST_STEP_BYTES, checked_reads: bool = False,
                 materialise_budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        """``checked_reads``: never let the kernel serve bytes from objects (passthrough
        bypasses the daemon's checksums); the daemon serves and checks every read.
        ``materialise_budget_bytes``: room for objects copied from chunk references when such
        a file is opened (hubfs.materialise)."""
        self.store = store
        self.limiter = trio.CapacityLimiter(WORKER_THREADS)
        # Reads and index syncs wait for a request; their own threads keep them from queueing
        # behind the commits that fill ``limiter`` (an fsstress read waited 5.8 ms on average).
        self.read_limiter = trio.CapacityLimiter(READ_THREADS)
        self.names = Names(store, policy or Policy())
        # The kernel left dropping setuid/setgid bits and capabilities to us (killpriv v2):
        # set by the FUSE adapter once the kernel has answered.
        self.kills_privileges = False
        self.open_files = OpenFiles()
        self.backing = BackingTable(
            "the mount was asked for checked reads (--checked-reads): the daemon serves and "
            "checks every read" if checked_reads else None)
        self.materialiser = Materialiser(store, materialise_budget_bytes, self._thread)
        # A cluster node's cache (hubfs.cache) is told when a content is opened or closed
        # (its last use), and counts the content bytes the daemon served (its hit rate).
        self.content_used: Callable[[bytes], None] = lambda content_id: None
        self.content_read_bytes = 0
        self.writeback = WriteBack(store, ingest_step_bytes, self.limiter,
                                   self.open_files.writers, self._switched,
                                   self._remove_if_unused, read_limiter=self.read_limiter)

    def _switched(self, ino: int, content_id: bytes) -> None:
        # the kernel's pages of a file written through this mount hold exactly these bytes
        self.open_files.switched(ino, content_id, cached_by_kernel=True)

    async def _thread(self, func: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(func, *args, limiter=self.limiter)

    # -- attributes
    def _attributes(self, ino: int, inode: Inode) -> Attributes:
        staging = self.writeback.staged(ino)
        if staging is not None:
            if staging.kernel_written:
                staging.refresh()
            return Attributes(ino, inode, staging.size, staging.mtime_ns,
                              max(inode.ctime_ns, staging.ctime_ns))
        return Attributes(ino, inode, inode.size, inode.mtime_ns, inode.ctime_ns)

    async def attributes(self, ino: int) -> Attributes:
        return self._attributes(ino, self.names.inode(ino))

    def _counted(self, ino: int, inode: Inode | None = None) -> Attributes:
        """Attributes of an inode the kernel now holds one more lookup reference to."""
        attrs = self._attributes(ino, inode or self.names.inode(ino))
        self.open_files.looked_up(ino)
        return attrs

    # -- names
    async def lookup(self, parent: int, name: bytes, uid: int) -> Attributes:
        return self._counted(self.names.lookup(parent, name, uid))

    async def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, count in items:
            self.open_files.forget(ino, count)
            self._remove_if_unused(ino)

    async def readdir(self, ino: int, after: int) -> list[tuple[int, bytes, Attributes]]:
        """Entries after offset ``after``: ".", "..", then the directory's own. The caller
        reports each and calls ``count_lookup`` for those the kernel keeps (not the dots)."""
        rows: list[tuple[int, bytes, Attributes]] = []
        inode = self.names.inode(ino)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        if after < 1:
            rows.append((1, b".", self._attributes(ino, inode)))
        if after < 2:
            parent = inode.parent or ino
            rows.append((2, b"..", self._attributes(parent, self.names.inode(parent))))
        for seq, name, child, child_inode in self.names.readdir(ino,
                                                                 max(0, after - DOT_ENTRIES)):
            rows.append((seq + DOT_ENTRIES, name, self._attributes(child, child_inode)))
        return rows

    def count_lookup(self, ino: int) -> None:
        self.open_files.looked_up(ino)

    async def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                   rdev: int = 0, target: bytes = b"") -> Attributes:
        """mkdir, mknod, symlink: a new inode of any type but an open regular file."""
        ino, inode = self.names.create(parent, name, mode, uid, gid, rdev, target)
        return self._counted(ino, inode)

    async def link(self, ino: int, parent: int, name: bytes) -> Attributes:
        return self._counted(ino, self.names.link(ino, parent, name))

    async def unlink(self, parent: int, name: bytes) -> None:
        self._remove_if_unused(self.names.unlink(parent, name))

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._remove_if_unused(self.names.rmdir(parent, name))

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        replaced = self.names.rename(old_parent, old_name, new_parent, new_name, flags)
        if replaced is not None:
            self._remove_if_unused(replaced)

    async def readlink(self, ino: int) -> bytes:
        return self.names.readlink(ino)

    def _remove_if_unused(self, ino: int) -> None:
        """Drop an inode with no names once the kernel and every open file are done with it."""
        if self.open_files.busy(ino) or self.writeback.busy(ino):
            return
        if self.names.remove_if_orphan(ino):
            self.writeback.drop(ino)

    # -- attributes
    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime_ns: int | None = None, mtime_ns: int | None = None,
                      caller: Caller | None = None, kill_suidgid: bool = False) -> Attributes:
        """``kill_suidgid``: the kernel says (killpriv v2) that the caller of this truncate
        lacks CAP_FSETID, or that this is a chown.

        A SETATTR that sets nothing comes, under killpriv v2, from the kernel's
        file_remove_privs: a write (or fallocate) found setuid/setgid bits its caller may not
        keep, or file capabilities, and leaves dropping them to us. A write the kernel makes
        itself (passthrough) reaches the daemon only this way. ``chown(f, -1, -1)`` sends the
        same request, and drops as any chown does: it is taken for one when nobody has the
        file open for writing."""
        if size is not None:
            await self.truncate(ino, size)
        if mtime_ns is not None:
            self.writeback.set_mtime(ino, mtime_ns)
        inode = self.names.set_attributes(ino, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns,
                                          mtime_ns=mtime_ns)
        chown = uid is not None or gid is not None
        removing_privileges = not kill_suidgid and all(
            value is None for value in (mode, uid, gid, size, atime_ns, mtime_ns))
        if self.kills_privileges and caller is not None:
            if size is not None or chown:
                self.names.drop_privileges(ino, caller, chown=chown,
                                           capable=None if chown else not kill_suidgid)
                inode = self.names.inode(ino)
            elif removing_privileges:
                self.names.drop_privileges(ino, caller,
                                           chown=not self.open_files.writers(ino))
                inode = self.names.inode(ino)
        return self._attributes(ino, inode)

    async def truncate(self, ino: int, size: int) -> None:
        inode = self.names.inode(ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(inode.mode):
            raise FsError(errno.EINVAL)
        self._check_writable(ino)
        self.writeback.truncate(ino, inode, size)
        if not self.open_files.writers(ino):  # truncate(2) by path: no close will commit it
            # stored in the background, as after a close: the staging (and its sidecar) hold
            # the truncation until then, and recovery stores it after a crash
            await self.writeback.closed(ino)

    # -- xattrs
    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.names.setxattr(ino, name, value)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        return self.names.getxattr(ino, name)

    async def listxattr(self, ino: int) -> list[bytes]:
        return self.names.listxattr(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self.names.removexattr(ino, name)

    # -- open files
    async def opendir(self, ino: int) -> None:
        if not stat.S_ISDIR(self.names.inode(ino).mode):
            raise FsError(errno.ENOTDIR)

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int
                     ) -> tuple[OpenReply, Attributes]:
        ino, inode = self.names.create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid,
                                       gid)
        self.open_files.looked_up(ino)
        self.writeback.for_write(ino, inode, keep=False)
        return self._open_reply(ino, inode.content_id, True), self._attributes(ino, inode)

    async def open(self, ino: int, flags: int, caller: Caller | None = None) -> OpenReply:
        inode = self.names.inode(ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._check_writable(ino)
            if self.backing.source(ino) is not None:
                # beside kernel-served opens a writer is kernel-served too, and the kernel's
                # writes bump no generation: it waits for a commit of kernel-written bytes
                await self.writeback.idle(ino)
                self._check_writable(ino)
            inode = self.names.inode(ino)
        else:
            inode = self.names.accessed(ino, inode)
            if self._materialisable(ino, inode):
                self.materialiser.opened_without_object(inode.content_id, inode.size,
                                                        self.backing.sources().__contains__)
        if flags & os.O_TRUNC and writable:
            self.writeback.truncate(ino, inode, 0)
            if self.kills_privileges and caller is not None:
                self.names.drop_privileges(ino, caller)
                inode = self.names.inode(ino)
        return self._open_reply(ino, inode.content_id, writable)

    def _open_reply(self, ino: int, content_id: bytes, writable: bool) -> OpenReply:
        """Serve a new open (see the module docstring) and count it."""
        backing_id = self._kernel_served(ino, content_id, writable)
        if content_id:
            self.content_used(content_id)
        served = Served.CACHED if backing_id is None else Served.KERNEL
        fh = self.open_files.open(ino, writable, content_id, served)
        if backing_id is not None:
            return OpenReply(fh, backing_id=backing_id)
        staged = self.writeback.staged(ino) is not None
        return OpenReply(fh, keep_cache=self.open_files.keep_cache(ino, content_id, staged))

    def _kernel_served(self, ino: int, content_id: bytes, writable: bool) -> int | None:
        """The backing id the kernel serves a new open from, or None (the daemon serves)."""
        if self.backing.source(ino) is not None:  # every open shares it (the kernel's rule)
            return self.backing.share(ino)
        if self.open_files.cached(ino):
            return None  # the kernel would refuse it beside page-cache opens
        staging = self.writeback.staged(ino)
        if staging is not None:
            if not (writable and staging.whole and staging.size == 0):
                return None  # the daemon has bytes of it: it goes on serving them
            if self.writeback.busy(ino):
                return None  # a commit reads it: the daemon's writes bump its generation
            path = staging.path
            backing_id = self._acquire(ino, path, path, os.O_RDWR)
            staging.kernel_written = backing_id is not None
            return backing_id
        object_id = None if writable else self.store.object_of(content_id)
        if object_id is None:
            return None
        self.materialiser.opened(object_id)
        return self._acquire(ino, object_id, self.store.packs.path(object_id), os.O_RDONLY)

    def _materialisable(self, ino: int, inode: Inode) -> bool:
        """Whether later read-only opens could be kernel-served if the content had an object."""
        return (self.backing.refused is None and passthrough_enabled()
                and self.writeback.staged(ino) is None
                and self.store.object_of(inode.content_id) is None)

    def _acquire(self, ino: int, source: object, path: Path, mode: int) -> int | None:
        try:
            return self.backing.acquire(ino, source,
                                        lambda: os.open(path, mode | os.O_CLOEXEC))
        except OSError as exc:  # an object gone or unreadable: its chunks may still serve
            log.error("cannot serve inode %d from %s (%s): the daemon serves it; run "
                      "`hubfs verify STORE`", ino, path, exc.strerror)
            return None

    def _check_writable(self, ino: int) -> None:
        """ETXTBSY while the kernel serves the inode from a file that must not change: only
        a staging the kernel writes may be written and truncated beside its opens."""
        if self.backing.source(ino) is None:
            return
        staging = self.writeback.staged(ino)
        if staging is None or not staging.kernel_written:
            raise FsError(errno.ETXTBSY)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        ino = self.open_files.handle(fh).ino
        while (staging := self.writeback.staged(ino)) is not None:
            try:
                return self.writeback.read(staging, offset, size)
            except NeedsDecoding:
                data = await self.writeback.read_decoding(staging, offset, size)
                if data is not None:
                    return data
                # stored and dropped meanwhile: the content has the same bytes
        content_id = self.open_files.content(ino)
        data = self.store.reader.read_without_decoding(content_id, offset, size)
        if data is None:
            data = await trio.to_thread.run_sync(self.store.reader.read, content_id, offset,
                                                 size, limiter=self.read_limiter)
        self.content_read_bytes += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes, caller: Caller | None = None
                    ) -> int:
        handle = self.open_files.handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF)
        if self.kills_privileges and caller is not None and caller.pid:
            # (pid 0: the kernel writing back an mmap'd page; Linux drops nothing for those)
            self.names.drop_privileges(handle.ino, caller)
        if self.writeback.staged(handle.ino) is None:
            self.writeback.for_write(handle.ino, self.names.inode(handle.ino), keep=True)
        return await self.writeback.write(handle.ino, offset, data)

    async def fsync(self, fh: int) -> None:
        """Make the file durable: its staged bytes, and the index (its name, attributes and
        any content committed already)."""
        await self.writeback.fsync(self.open_files.handle(fh).ino)
        await self.sync_index()

    async def sync_index(self) -> None:
        await trio.to_thread.run_sync(self.store.sync_index, limiter=self.read_limiter)

    async def release(self, fh: int) -> None:
        with suppress(FsError):
            self.content_used(self.open_files.content(self.open_files.handle(fh).ino))
        handle = self.open_files.close(fh)
        if handle is None:
            return
        if handle.served is Served.KERNEL:
            self.backing.release(handle.ino)
        if handle.writable and not self.open_files.writers(handle.ino):
            await self.writeback.closed(handle.ino)
        self._remove_if_unused(handle.ino)

    async def statfs(self) -> os.statvfs_result:
        return self.names.statfs()

    def held_open(self) -> tuple[set[bytes], set[bytes], set[object]]:
        """What a cluster node's cache must not evict now (hubfs.cache): the contents of open
        files, the chunks staged files are laid over (and those pinned for them), and the
        files the kernel serves opens from."""
        with self.store.pinned_lock:
            chunks = set(self.store.pinned)
        return (self.open_files.open_contents(), chunks | self.writeback.base_chunks(),
                self.backing.sources())

    # -- the daemon's life
    async def sync_periodically(self) -> None:
        """Bound what an OS crash can lose: committed index changes reach the disk within
        ``SYNC_INTERVAL_S`` (as a journaling filesystem's commit interval does)."""
        while True:
            await trio.sleep(SYNC_INTERVAL_S)
            if self.store.index.unsynced:
                await self.sync_index()

    async def recover(self) -> None:
        """At mount: commit what a crash left in staging; drop inodes no name refers to."""
        await self.writeback.recover()
        removed = self.names.remove_orphans()
        if removed:
            log.warning("removed %d unlinked inodes left open at the last crash", removed)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve with background commits and copies on demand; at exit (unmount) drop the
        copy under way, store every staged file and make the index durable."""
        async with self.writeback.running(), self.materialiser.running():
            yield
        await self.sync_index()

    def status(self) -> dict[str, Any]:
        on, why = self.backing.status()
        return {"open_files": self.open_files.open_count(),
                "kernel_served_files": self.backing.held(),
                "materialised_bytes": self.materialiser.used_bytes,
                "materialise_budget_bytes": self.materialiser.budget_bytes,
                "copies_under_way": self.materialiser.copying,
                "read_mode": "kernel (passthrough) for files with an object" if on else "daemon",
                "read_mode_why": why, **self.writeback.counts()}
