"""Write-back: a file's written bytes, from its first write until they are stored content.

Every file with unstored writes has a ``Staging`` (staging.py). This module decides when and how
its bytes become stored content:

- *front ingest*: while a file grows front to back (a download), every ``step_bytes`` its
  finished front is stored and cut out of the staging file;
- *commit*: when the last writer closes the file (or a truncate by path, or unmount), the
  staging is stored and the inode switched to the result; only what changed is chunked again
  (on a cluster node, after fetching the base chunks the result keeps: hubfs.cluster);
- *recovery*: at mount, stagings a crash left behind are committed.

Concurrency (the whole picture is in vfs.py): every method here runs on the mount's trio
thread, which owns ``_files`` and every Staging. Chunking, hashing, compression and pack
appends run in worker threads on an immutable ``Snapshot`` and hand back prepared content;
the trio thread then registers it and switches the inode and this module's state in one step
(no ``await`` between the index transaction and the state change), so no request can see the
index and the in-memory state disagree. One trio lock per file (``Pending.busy``) keeps one
front ingest or commit of it at a time.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from . import contents, namespace
from .contents import PreparedContent
from .errors import FsError, HubfsError, IntegrityError, StoreFullError
from .index import Inode
from .ingest import may_become_an_object
from .packs import ChunkLocation
from .reader import NotLocal
from .staging import (
    OLD_SIDECAR_SUFFIX,
    SIDECAR_SUFFIX,
    Layout,
    Spare,
    Staging,
    make_spares,
    remove_spares,
)
from .store import Store
from .tensor_layout import HEADER_PROBE_BYTES, header_incomplete

log = logging.getLogger(__name__)

T = TypeVar("T")
# Writes into staging stop this far from a full disk, so that the index can still record a
# rename or an unlink and a commit can free the staging (ext4 keeps a reserve for root alike).
DISK_RESERVE_BYTES = 8 * 1024 * 1024
MAX_BACKGROUND_COMMITS = 256
# A writer waits for the front ingest under way once this many steps are staged behind it.
FRONT_BACKLOG_STEPS = 2
# Commits' pack syncs start at most this often: those of the interval share one (GroupSync).
PACK_SYNC_GATHER_S = 0.1
PACK_SYNC_GATHER_MAX_BYTES = 1024 * 1024  # only commits of files smaller than this wait
# Empty files kept ready for new stagings (staging.make_spares); refilled at half.
SPARE_FILES = 32


class NeedsDecoding(Exception):
    """A read would decode a compressed chunk: too slow for the trio thread."""


@dataclass(eq=False)
class Pending:
    """A file with unstored writes."""

    staging: Staging
    busy: trio.Lock = field(default_factory=trio.Lock)
    # Kept whole (no front ingest): the file's bytes would be stored raw, so at commit its
    # staging file can become its object (hubfs.objects) instead of being copied into packs.
    keep_whole: bool = False


class GroupSync:
    """One fsync for many waiters: each caller returns after a sync that started after it
    called, so everything it appended before is durable. Callers that arrive while a sync
    runs share the next one (group commit). Syncs start at most every ``gather_s``: files
    closed one after another (an untar: each commit alone, a sync done before the next close)
    would otherwise each get a sync of their own; now those of the interval share one."""

    def __init__(self, sync: Callable[[], None], gather_s: float = 0.0) -> None:
        self._sync = sync
        self._gather_s = gather_s
        self._started = 0
        self._done = 0
        self._running: trio.Event | None = None
        self._last_start = -float("inf")

    async def __call__(self, gather: bool = True) -> None:
        """``gather`` False: start at once (a caller that stores files one after another,
        unmount and recovery, would wait ``gather_s`` for each)."""
        target = self._started + 1
        while self._done < target:
            if self._running is not None:
                await self._running.wait()
                continue
            self._running = running = trio.Event()
            try:
                if gather:
                    await trio.sleep_until(self._last_start + self._gather_s)  # others join
                self._started += 1
                epoch = self._started
                self._last_start = trio.current_time()
                await trio.to_thread.run_sync(self._sync)
                self._done = epoch
            finally:
                self._running = None
                running.set()


class WriteBack:
    def __init__(self, store: Store, step_bytes: int, limiter: trio.CapacityLimiter,
                 writers: Callable[[int], int],
                 switched: Callable[[int, bytes], None], idle: Callable[[int], None],
                 read_limiter: trio.CapacityLimiter | None = None) -> None:
        if store.ingestor is None or store.writer is None:
            raise ValueError("write-back needs a writable store")
        self.store = store
        self.ingestor = store.ingestor
        self.step_bytes = step_bytes
        self.staging_dir = store.path / "staging"
        self.spare_dir = store.path / "spare"  # beside staging/, which is empty when all is stored
        self.spare_dir.mkdir(mode=0o700, exist_ok=True)
        self._spares: list[Spare] = []
        self._spares_low = trio.Event()
        self._limiter = limiter
        # reads and fsyncs (a request waits for them) need not queue behind storing
        self._read_limiter = read_limiter or limiter
        self._writers = writers  # how many open handles may still write an inode
        self._switched = switched  # told when a commit gave an inode new content
        self._idle = idle  # told when a background commit is over (the inode may be unused)
        self._nursery: trio.Nursery | None = None
        self._background = trio.Semaphore(MAX_BACKGROUND_COMMITS)
        self._background_done = trio.Event()  # set (and renewed) as each one ends
        self._files: dict[int, Pending] = {}
        self._sync_packs = GroupSync(store.writer.sync, PACK_SYNC_GATHER_S)

    async def _thread(self, func: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(func, *args, limiter=self._limiter)

    # -- what the rest of the mount asks
    def staged(self, ino: int) -> Staging | None:
        pending = self._files.get(ino)
        return pending.staging if pending else None

    def busy(self, ino: int) -> bool:
        """A front ingest or commit of the inode is under way."""
        pending = self._files.get(ino)
        return pending is not None and pending.busy.locked()

    def base_chunks(self) -> set[bytes]:
        """Chunks that staged files are laid over (their bytes are read at commit)."""
        return {chunk_id for p in self._files.values() for chunk_id in p.staging.base_ids}

    def counts(self) -> dict[str, int]:
        return {"staged_files": len(self._files),
                "ingests_running": sum(p.busy.locked() for p in self._files.values()),
                "staged_bytes": sum(p.staging.staged_bytes for p in self._files.values())}

    async def idle(self, ino: int) -> None:
        """Wait for a running commit of a file the kernel writes: its writes bump no
        generation, so the commit must not race one (a writable open that must be
        kernel-served, beside kernel-served opens, waits here)."""
        pending = self._files.get(ino)
        if pending is not None and pending.staging.kernel_written and pending.busy.locked():
            async with pending.busy:
                pass

    # -- writes
    def for_write(self, ino: int, inode: Inode, keep: bool) -> Staging:
        """The inode's staging, made now if it has none: over its stored content when the
        bytes are kept (nothing is copied), else empty."""
        pending = self._files.get(ino)
        if pending is not None:
            return pending.staging
        if len(self._spares) <= SPARE_FILES // 2:
            self._spares_low.set()
        spare = self._spares.pop() if self._spares else None
        if keep and inode.size:
            staging = Staging.over(self.staging_dir, ino, inode.mtime_ns, inode.content_id,
                                   *self._content_chunks(inode.content_id), spare=spare)
        else:
            staging = Staging.create(self.staging_dir, ino, inode.mtime_ns, spare)
        self._files[ino] = Pending(staging)
        return staging

    async def _keep_spares(self) -> None:
        """Refill the spare files whenever they run low (until cancelled)."""
        while True:
            wanted = SPARE_FILES - len(self._spares)
            if wanted > 0:
                self._spares += await trio.to_thread.run_sync(make_spares, self.spare_dir,
                                                              wanted)
            await self._spares_low.wait()
            self._spares_low = trio.Event()

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """Write into the inode's staging (``for_write`` made it)."""
        pending = self._files[ino]
        staging = pending.staging
        free = os.statvfs(self.staging_dir)
        if free.f_bavail * free.f_frsize < len(data) + DISK_RESERVE_BYTES:
            raise StoreFullError(f"the disk holding the store {self.store.path} is full: free "
                                 "space there (or run `hubfs gc`) and write again")
        written = staging.write(offset, data, namespace.now_ns())
        if (staging.front_due(self.step_bytes) and not pending.keep_whole
                and not pending.busy.locked()):
            if self._nursery is None:
                await self._ingest_front(ino, pending)
            else:  # the writer goes on while the front is stored
                self._nursery.start_soon(self._ingest_front_in_background, ino, pending)
        elif (pending.busy.locked()
              and staging.size - staging.base_len >= FRONT_BACKLOG_STEPS * self.step_bytes):
            async with pending.busy:  # the writer waits: staging stays bounded
                pass
        return written

    async def _ingest_front_in_background(self, ino: int, pending: Pending) -> None:
        await _reporting(self._ingest_front(ino, pending), f"the front of inode {ino} is not "
                         "stored yet; its bytes stay in staging")

    def truncate(self, ino: int, inode: Inode, size: int) -> None:
        staging = self.for_write(ino, inode, keep=size > 0)
        if staging.kernel_written:
            staging.refresh()
        self._unpin(staging.truncate(size, namespace.now_ns()))

    def set_mtime(self, ino: int, mtime_ns: int) -> None:
        """A utime of a staged file: its commit must write this time, not the write's."""
        staging = self.staged(ino)
        if staging is not None:
            if staging.kernel_written:  # its writes so far moved the mtime before this utime:
                staging.refresh()  # taken in now, a later refresh keeps this time
            staging.mtime_ns = mtime_ns

    async def fsync(self, ino: int) -> None:
        """Make a staged file's bytes durable (``recover`` finds them after a crash)."""
        staging = self.staged(ino)
        if staging is None:
            return

        def sync() -> None:
            with staging.in_use() as alive:
                if alive:  # else a commit stored it, durably
                    staging.sync()
                    _check_room(self.store.path, staging)

        await trio.to_thread.run_sync(sync, limiter=self._read_limiter)  # a request waits

    # -- reads of staged files
    def read(self, staging: Staging, offset: int, size: int) -> bytes:
        """Inline read; raises ``NeedsDecoding`` when a compressed chunk is in the way."""
        return staging.read(offset, size, self._quick_chunk_bytes)

    async def read_decoding(self, staging: Staging, offset: int, size: int) -> bytes | None:
        """Read in a worker thread, fetching base chunks only the cluster's bucket holds; None
        when the staging was stored and dropped meanwhile."""
        snap = staging.snapshot()

        def read() -> bytes | None:
            with staging.in_use() as alive:
                if not alive:
                    return None
                try:
                    return bytes(snap.read(offset, size, self._chunk_bytes))
                except NotLocal:
                    # ahead as for any reader, but not into base bytes the file no longer has
                    self._fetch_base(snap.layout, offset, offset + size,
                                     limit=snap.layout.base_valid)
                    return bytes(snap.read(offset, size, self._chunk_bytes))

        return await trio.to_thread.run_sync(read, limiter=self._read_limiter)

    def _fetch_base(self, lay: Layout, start: int, end: int, limit: int | None = None) -> None:
        """Make local the base chunks that bytes ``[start, end)`` of a staged file are read
        from, where only the cluster's bucket holds them: an in-place update, on a cluster
        node, of a file another node wrote (hubfs.cluster fetches them as for a read of the
        base content, ahead no further than ``limit``; None: than each run of them). A worker
        thread; raises ``FsError`` (EIO) when the bucket does not answer."""
        fetch = self.store.reader.fetch
        if fetch is None or not lay.base_content:
            return  # a stored front is this node's own: always local
        with self.store.read() as txn:
            remote = [i for i in lay.base_chunks_in(start, end)
                      if (e := txn.chunk(lay.base_ids[i])) is not None and e.location.remote]
        runs: list[list[int]] = []
        for i in remote:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        for first, stop in runs:
            run_start = lay.base_starts[first]
            run_end = lay.base_starts[stop - 1] + lay.base_lengths[stop - 1]
            fetch(lay.base_content, run_start, run_end - run_start,
                  limit=run_end if limit is None else limit)

    def _location(self, chunk_id: bytes) -> ChunkLocation:
        with self.store.read() as txn:
            entry = txn.chunk(chunk_id)
        if entry is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} of a file being written is gone "
                                 "from the index; run `hubfs verify --repair STORE`", chunk_id)
        return entry.location

    def _chunk_bytes(self, chunk_id: bytes, lo: int, hi: int) -> bytes:
        return self.store.reader.chunk_range(chunk_id, self._location(chunk_id), lo, hi)

    def _quick_chunk_bytes(self, chunk_id: bytes, lo: int, hi: int) -> bytes:
        loc = self._location(chunk_id)
        if not self.store.reader.is_quick(chunk_id, loc):
            raise NeedsDecoding
        return self.store.reader.chunk_range(chunk_id, loc, lo, hi)

    # -- storing
    @asynccontextmanager
    async def _prepared(self, prepare: Callable[[], T], gather: bool) -> AsyncIterator[T]:
        """Run ``prepare`` (chunk and append to packs) in a worker, sync the packs (``gather``:
        with other commits, GroupSync), and hold gc off until the caller has put the result in
        the index, on this thread."""
        gate = self.store.ingest_gate
        if not gate.enter_shared(wait=False):
            await trio.to_thread.run_sync(gate.enter_shared)  # a gc step runs: wait off-thread
        try:
            result = await self._thread(prepare)
            await self._sync_packs(gather)  # pack bytes durable before an index entry names them
            yield result
        finally:
            gate.exit_shared()

    async def _ingest_front(self, ino: int, pending: Pending) -> None:
        async with pending.busy:
            staging = pending.staging
            if self._files.get(ino) is not pending or not staging.front_due(self.step_bytes):
                return
            snap = staging.snapshot()
            start, size, overwrites = staging.base_len, snap.layout.size, staging.overwrites

            def unchanged() -> bool:
                return (self._files.get(ino) is pending and staging.overwrites == overwrites
                        and staging.base_len == start)

            def prepare() -> (tuple[dict[bytes, ChunkLocation], list[bytes], list[int]]
                              | str | None):
                with staging.in_use() as alive:
                    if not alive:
                        return None

                    def read(offset: int, length: int) -> bytes | memoryview:
                        return snap.read(offset, length, self._chunk_bytes)

                    if header_incomplete(read(0, HEADER_PROBE_BYTES), size):
                        return None  # tensor boundaries unknown until the header is written
                    if not start and self.ingestor.kept_raw(read, size):
                        return "whole"
                    ids: list[bytes] = []
                    lengths: list[int] = []
                    new, _ = self.ingestor.prepare_chunks(read, size, start, False, ids, lengths)
                    return new, ids, lengths

            async with self._prepared(prepare, gather=False) as result:
                if result == "whole":
                    pending.keep_whole = True
                    return
                if result is None or not result[1] or not unchanged():
                    return
                assert not isinstance(result, str)
                new, ids, lengths = result
                with self.store.metadata_write() as txn:
                    contents.register_chunks(txn, new)
                self.ingestor.committed(new)
                self._pin(ids)
            # the sidecar is about to name these chunks: their index entries must outlive an
            # OS crash before the staging file's copy of the bytes is punched out
            await self._thread(self.store.sync_index)
            if not unchanged():
                self._unpin(ids)  # a write changed those bytes meanwhile: keep them staged
                return
            staging.add_front(ids, lengths)
        log.debug("inode %d: front stored up to %d", ino, staging.base_len)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Commit closed files in the background while open; at exit, store everything."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                spares = trio.CancelScope()
                nursery.start_soon(self._spares_until, spares)
                try:
                    yield
                finally:
                    spares.cancel()
                    await self.flush_all()
                    self._nursery = None
        finally:
            remove_spares(self.spare_dir, self._spares)

    async def _spares_until(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._keep_spares()

    async def closed(self, ino: int) -> None:
        """The last writer closed the file: store it in the background. The close returns at
        once (an untar does not wait for each file's fsync'd pack bytes); past
        ``MAX_BACKGROUND_COMMITS`` closes wait, which bounds staging files held open."""
        if ino not in self._files:
            return
        if self._nursery is None:
            await self.commit(ino)
            return
        await self._background.acquire()
        self._nursery.start_soon(self._commit_in_background, ino)

    async def _commit_in_background(self, ino: int) -> None:
        try:
            await _reporting(self.commit(ino), f"inode {ino} is not stored yet; it stays in "
                             "staging and is stored at its next close or at the next mount")
        finally:
            self._background.release()
            self._background_done.set()
            self._background_done = trio.Event()
            self._idle(ino)

    async def settle(self) -> None:
        """Wait until every background commit has finished."""
        while self._background.value < MAX_BACKGROUND_COMMITS:
            await self._background_done.wait()

    async def commit(self, ino: int, *, force: bool = False) -> None:
        """Store a file's staging and switch the inode to it. Goes round again while writes
        land meanwhile; leaves the staging to a later close while a writer has the file open
        (unless ``force``: unmount and recovery)."""
        pending = self._files.get(ino)
        if pending is None:
            return
        async with pending.busy:
            while self._files.get(ino) is pending and (force or not self._writers(ino)):
                # a background commit shares its pack sync; one awaited by its caller does not
                gather = not force and self._nursery is not None
                if await self._commit_once(ino, pending, gather):
                    return

    async def _commit_once(self, ino: int, pending: Pending, gather: bool) -> bool:
        """One try; False when a write changed the staging meanwhile. ``gather``: share a
        pack sync with other commits (a background commit; not at unmount or recovery)."""
        staging = pending.staging
        if staging.kernel_written:
            staging.refresh()  # what the kernel wrote (its writers are gone: it is final)
        if not staging.whole:  # (a whole one may become its object: that needs no room)
            _check_room(self.store.path, staging)  # fail before appending what cannot fit
        if staging.base_content:
            # Every base byte the new version keeps must be here, read or not: its upload
            # (hubfs.cluster) sends the whole content from this node's packs. Fetched outside
            # the ingest gate, which gc waits for, and of the worker slots (it waits on the
            # network); the cache keeps a staging's base chunks until the commit is done.
            lay = staging.layout()
            await trio.to_thread.run_sync(self._fetch_base, lay, 0, lay.size)
        snap = staging.snapshot()
        reuse = snap.reuse()
        objects = self.store.objects
        whole = staging.whole  # the staging file is the file: it can become its object

        def prepare() -> PreparedContent | None:
            with staging.in_use() as alive:
                if not alive:
                    return None

                def read(offset: int, length: int) -> bytes | memoryview:
                    return snap.read(offset, length, self._chunk_bytes)

                if (objects is None or not whole
                        or not may_become_an_object(snap.layout.size, reuse)):
                    return self.ingestor.prepare_stream(read, snap.layout.size, reuse=reuse)
                # The file may become its object, whose bytes must be durable before the
                # index names it: the disk writes them while the CPU hashes them.
                return _fsynced_while(staging.fd, lambda: self.ingestor.prepare_stream(
                    read, snap.layout.size, reuse=reuse, new_object=objects.new_id))

        # only small files wait to share a sync: a large one's sync is worth its wait alone
        gather = gather and snap.layout.size < PACK_SYNC_GATHER_MAX_BYTES
        async with self._prepared(prepare, gather) as prepared:
            if prepared is None:
                return True
            if staging.generation != snap.generation:
                self.ingestor.committed(prepared)
                return False
            if prepared.object_id:
                with self.store.read() as txn:
                    if not contents.object_still_worth_it(txn, prepared):
                        return False  # prepared again: as references to what is stored now
            with self.store.metadata_write() as txn:
                inode = txn.inode(ino)
                alive = inode is not None and inode.nlink > 0
                if alive:
                    if contents.register(txn, prepared):
                        assert objects is not None  # no await from here to the commit:
                        objects.link(staging.path, prepared.object_id)  # no write between
                    inode = namespace.set_content(txn, ino, prepared.content_id,
                                                  prepared.table.size)
                    txn.put_inode(ino, inode.with_(mtime_ns=staging.mtime_ns))
            self.ingestor.committed(prepared)
        if not alive:
            return True  # unlinked meanwhile: removing the inode drops the staging
        del self._files[ino]
        self._switched(ino, prepared.content_id)
        if staging.durable:  # fsync'd bytes: the index that now holds them must be on disk
            await self._thread(self.store.sync_index)  # before their staging file goes
        self._discard(staging)
        log.debug("committed inode %d", ino)
        return True

    def drop(self, ino: int) -> None:
        """Forget an inode's unstored writes (the inode is being removed)."""
        pending = self._files.pop(ino, None)
        if pending is not None:
            self._discard(pending.staging)

    async def flush_all(self) -> None:
        """Commit every staged file (at unmount)."""
        for ino in list(self._files):
            await _reporting(self.commit(ino, force=True), f"inode {ino} is not stored at "
                             "unmount; its staging file is kept for the next mount")

    # -- pins: chunks at refcount 0 that a staged front still needs; gc must keep them
    def _pin(self, ids: list[bytes]) -> None:
        with self.store.pinned_lock:
            self.store.pinned.update(ids)

    def _unpin(self, ids: list[bytes]) -> None:
        with self.store.pinned_lock:
            self.store.pinned.subtract(ids)
            for chunk_id in ids:
                if self.store.pinned[chunk_id] <= 0:
                    del self.store.pinned[chunk_id]

    def _discard(self, staging: Staging) -> None:
        staging.discard()
        self._unpin(staging.front_ids)

    # -- mount-time recovery
    async def recover(self) -> None:
        """Commit the stagings a crash left behind."""
        remove_spares(self.spare_dir, self._spares)  # a crash's spare files
        newest: dict[int, str] = {}
        for entry in sorted(os.scandir(self.staging_dir), key=lambda e: e.name):
            if entry.name.endswith((SIDECAR_SUFFIX, OLD_SIDECAR_SUFFIX)):
                continue  # read with its staging file
            ino = Staging.inode_of(entry.name)
            if ino is None:
                log.warning("removing stray file %s from staging", entry.path)
                os.unlink(entry.path)
                continue
            if ino in newest:  # names sort by time: an older staging was being replaced
                _remove_staging_files(newest[ino])
            newest[ino] = entry.path
        for ino, path in newest.items():
            staging = self._reopen(ino, path)
            if staging is None:
                continue
            self._pin(staging.front_ids)
            self._files[ino] = Pending(staging)
            try:
                await self.commit(ino, force=True)
            except (StoreFullError, FsError) as exc:  # a full disk; a bucket that is down
                log.error("inode %d keeps its %d bytes in staging, not stored yet: %s", ino,
                          staging.size, _message(exc))
                continue
            log.warning("recovered %d bytes written to inode %d before the last crash",
                        staging.size, ino)

    def _reopen(self, ino: int, path: str) -> Staging | None:
        """A crash's staging, if it still belongs to its inode."""
        with self.store.read() as txn:
            inode = txn.inode(ino)
        try:
            staging = Staging.reopen(Path(path), self._content_chunks)
        except (OSError, ValueError, IntegrityError) as exc:
            log.warning("dropping staging file %s: it cannot be read back (%s)", path, exc)
            _remove_staging_files(path)
            return None
        with self.store.read() as txn:
            missing = sum(txn.chunk(c) is None for c in staging.base_ids)
        why = ""
        if inode is None or not stat.S_ISREG(inode.mode) or inode.nlink == 0:
            why = "its inode is gone"
        elif missing:
            why = f"{missing} of its stored chunks are gone"
        elif staging.base_content and staging.base_content != inode.content_id:
            why = "it was stored already"
        if why:
            log.warning("dropping staging file %s: %s", path, why)
            staging.discard()
            return None
        return staging

    def _content_chunks(self, content_id: bytes) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
        table = self.store.reader.table(content_id)
        return table.chunk_ids, tuple(loc.raw_len for loc in table.locations)


async def _reporting(work: Awaitable[None], what: str) -> None:
    """Run background storing work; a failure is logged (it keeps the bytes staged), one line
    when a user can cause it (a full disk), with a traceback when it is a bug."""
    try:
        await work
    except (HubfsError, FsError) as exc:  # FsError: EIO from a cluster's bucket that is down
        log.error("%s (%s)", what, _message(exc))
    except Exception:
        log.exception("%s", what)


def _message(exc: HubfsError | FsError) -> str:
    return exc.message if isinstance(exc, HubfsError) else str(exc)


def _fsynced_while(fd: int, work: Callable[[], T]) -> T:
    """``work()``, with ``fsync(fd)`` running beside it in a thread; both done on return."""
    failed: list[OSError] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            failed.append(exc)

    syncing = threading.Thread(target=sync, name="hubfs-fsync")
    syncing.start()
    try:
        return work()
    finally:
        syncing.join()
        if failed:
            raise failed[0]


def _remove_staging_files(path: str) -> None:
    for suffix in ("", SIDECAR_SUFFIX, OLD_SIDECAR_SUFFIX):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def _check_room(store_path: Path, staging: Staging) -> None:
    """ENOSPC at fsync when the disk cannot take the file's unstored bytes once more (as
    chunks): better than a close that seems fine and a file that cannot be stored."""
    free = os.statvfs(store_path)
    if free.f_bavail * free.f_frsize < staging.staged_bytes:
        raise StoreFullError(f"the disk holding the store {store_path} cannot take this file's "
                             f"{staging.staged_bytes} written bytes: free space there (or run "
                             "`hubfs gc`); the file stays readable and is stored at its next "
                             "close or mount")
