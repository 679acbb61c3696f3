"""The mounted filesystem's model: open files, staging, lookup counts, over one store.

Everything a FUSE request needs, as plain synchronous methods, so it is tested without a mount
and ``fs.py`` only translates. Concurrency: metadata requests run on the trio thread; the slow
parts (decoding chunks, ingesting a written file, copying content into staging) run in worker
threads and touch shared state only under ``_lock``. Index write transactions are opened and
committed inside one call, never across an ``await``.

Write path: the first write to a file copies nothing until needed; new files and truncated files
start empty in ``STORE/staging/<ino>``, while a write into existing content first copies that
content there. Reads of a file with staging read the staging file. When the last writer
releases the file, the staging file is ingested and the inode switched to the new content in
one transaction. ``fsync`` makes the staging file durable; ``recover`` ingests staging files a
crash left behind at the next mount.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import contents, namespace
from .contents import PreparedContent
from .errors import FsError, HubfsError, IntegrityError, StoreFullError
from .index import ROOT_INO, Inode, Txn
from .policy import HOME_DIR, HOME_MODE, HOME_ROOT_MODE, SHARED_DIR, Policy, user_name
from .staging import INGEST_STEP_BYTES, SIDECAR_SUFFIX, Staging
from .store import Store
from .tensor_layout import HEADER_PROBE_BYTES, header_incomplete

log = logging.getLogger(__name__)

XATTR_VALUE_MAX_BYTES = 64 * 1024
BLOCK_BYTES = 512


@dataclass
class InodeState:
    """What the filesystem knows of an inode beyond the index."""

    lookups: int = 0
    handles: int = 0
    writers: int = 0
    staging: Staging | None = None
    # Held while a staging is made (which may copy the stored content): one per inode at a time.
    create_lock: threading.Lock = field(default_factory=threading.Lock)
    kernel_content: bytes | None = None  # content the kernel may hold in its page cache
    committing: bool = False


@dataclass
class Handle:
    ino: int
    writable: bool
    content_id: bytes = b""


@dataclass(frozen=True)
class Attributes:
    """An inode's attributes as the kernel should see them (staging overlaid)."""

    ino: int
    inode: Inode
    size: int
    mtime_ns: int
    ctime_ns: int


class FileSystem:
    def __init__(self, store: Store, policy: Policy | None = None,
                 ingest_step_bytes: int = INGEST_STEP_BYTES) -> None:
        if store.ingestor is None:
            raise ValueError("the filesystem needs a writable store")
        self.store = store
        self.ingestor = store.ingestor
        self.policy = policy or Policy()
        self.ingest_step_bytes = ingest_step_bytes
        self.staging_dir = store.path / "staging"
        self._states: dict[int, InodeState] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._lock = threading.RLock()
        self.home_ino = 0
        self.shared_ino = 0
        self._set_up_layout()

    def _set_up_layout(self) -> None:
        """Create (or repair the modes of) home/ and shared/ as the policy asks."""
        shared = self.policy.shared
        if not self.policy.homes and shared is None:
            return
        with self.store.write() as txn:
            if self.policy.homes:
                self.home_ino = self._ensure_dir(txn, HOME_DIR, 0, 0, HOME_ROOT_MODE)
            if shared is not None:
                self.shared_ino = self._ensure_dir(txn, SHARED_DIR, 0, shared.gid,
                                                   shared.root_mode())

    def _ensure_dir(self, txn: Txn, name: bytes, uid: int, gid: int, mode: int) -> int:
        found = txn.dirent(ROOT_INO, name)
        if found is None:
            return namespace.create(txn, ROOT_INO, name, stat.S_IFDIR | mode, uid, gid)
        inode = namespace.get_dir(txn, found[0])
        txn.put_inode(found[0], inode.with_(uid=uid, gid=gid, mode=stat.S_IFDIR | mode))
        return found[0]

    def _in_shared_tree(self, txn: Txn, ino: int) -> bool:
        if not self.shared_ino:
            return False
        for _depth in range(4096):  # bounded: a damaged index must not loop forever
            if ino == self.shared_ino:
                return True
            inode = txn.inode(ino)
            if ino == ROOT_INO or inode is None:
                return False
            ino = inode.parent
        return False

    # -- state bookkeeping
    def _state(self, ino: int) -> InodeState:
        state = self._states.get(ino)
        if state is None:
            state = self._states[ino] = InodeState()
        return state

    def _drop_state_if_idle(self, ino: int) -> None:
        state = self._states.get(ino)
        if state and not (state.lookups or state.handles or state.staging or state.committing):
            del self._states[ino]

    def attributes(self, ino: int) -> Attributes:
        with self.store.read() as txn:
            inode = namespace.get(txn, ino)
        return self._overlay(ino, inode)

    def _overlay(self, ino: int, inode: Inode) -> Attributes:
        state = self._states.get(ino)
        staging = state.staging if state else None
        if staging is not None:
            return Attributes(ino, inode, staging.size, staging.mtime_ns,
                              max(inode.ctime_ns, staging.ctime_ns))
        return Attributes(ino, inode, inode.size, inode.mtime_ns, inode.ctime_ns)

    def _counted(self, ino: int) -> Attributes:
        """Attributes of an inode the kernel now holds one more lookup reference to."""
        attrs = self.attributes(ino)
        with self._lock:
            self._state(ino).lookups += 1
        return attrs

    # -- names
    def lookup(self, parent: int, name: bytes, uid: int = 0) -> Attributes:
        try:
            with self.store.read() as txn:
                ino = namespace.lookup(txn, parent, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT or not self._is_own_home(parent, name, uid):
                raise
            ino = self._make_home(name, uid)
        return self._counted(ino)

    def _is_own_home(self, parent: int, name: bytes, uid: int) -> bool:
        return bool(self.home_ino) and parent == self.home_ino and name == user_name(uid)

    def _make_home(self, name: bytes, uid: int) -> int:
        """A user's private tree, made on their first lookup of it."""
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
        with self.store.write() as txn:
            found = txn.dirent(self.home_ino, name)
            if found is not None:
                return found[0]
            ino = namespace.create(txn, self.home_ino, name, stat.S_IFDIR | HOME_MODE, uid, gid)
        log.info("created the private tree home/%s for uid %d", name.decode(), uid)
        return ino

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        for ino, count in items:
            with self._lock:
                state = self._states.get(ino)
                if state is None:
                    continue
                state.lookups = max(0, state.lookups - count)
            self._remove_if_unused(ino)
            with self._lock:  # forgotten by the kernel, its page cache is gone too
                self._drop_state_if_idle(ino)

    def readdir(self, ino: int, after: int) -> list[tuple[int, bytes, Attributes]]:
        """Entries after offset ``after``; the caller reports each and calls ``counted``."""
        with self.store.read() as txn:
            rows = [(seq, name, self._overlay(child, namespace.get(txn, child)))
                    for seq, name, child in namespace.readdir(txn, ino, after)]
        return rows

    def count_lookup(self, ino: int) -> None:
        with self._lock:
            self._state(ino).lookups += 1

    def _new_owner(self, txn: Txn, parent: int, gid: int, mode: int) -> tuple[int, int]:
        """Group and mode for a new inode: setgid directories hand down their group, and the
        shared tree imposes its group and modes."""
        parent_inode = namespace.get_dir(txn, parent)
        if parent_inode.mode & stat.S_ISGID:
            gid = parent_inode.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        shared = self.policy.shared
        if shared is not None and self._in_shared_tree(txn, parent):
            gid, mode = shared.gid, shared.adjust_mode(mode)
        return gid, mode

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
             target: bytes = b"") -> Attributes:
        """mkdir, mknod, symlink: a new inode of any type but an open regular file."""
        with self.store.write() as txn:
            gid, mode = self._new_owner(txn, parent, gid, mode)
            ino = namespace.create(txn, parent, name, mode, uid, gid, rdev=rdev, target=target)
        return self._counted(ino)

    def link(self, ino: int, parent: int, name: bytes) -> Attributes:
        with self.store.write() as txn:
            namespace.link(txn, ino, parent, name)
        return self._counted(ino)

    def unlink(self, parent: int, name: bytes) -> None:
        with self.store.write() as txn:
            ino, _inode = namespace.unlink(txn, parent, name)
        self._remove_if_unused(ino)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self.store.write() as txn:
            ino = namespace.rmdir(txn, parent, name)
        self._remove_if_unused(ino)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int) -> None:
        with self.store.write() as txn:
            replaced = namespace.rename(txn, old_parent, old_name, new_parent, new_name, flags)
        if replaced is not None:
            self._remove_if_unused(replaced)

    def readlink(self, ino: int) -> bytes:
        with self.store.read() as txn:
            inode = namespace.get(txn, ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target

    def _remove_if_unused(self, ino: int) -> None:
        """Drop an inode with no names once the kernel and every open file are done with it."""
        with self._lock:
            state = self._states.get(ino)
            if state and (state.lookups or state.handles or state.committing):
                return
            staging = state.staging if state else None
            if state:
                state.staging = None
            self._states.pop(ino, None)
        if staging is not None:
            self._discard(staging)
        with self.store.write() as txn:
            inode = txn.inode(ino)
            if inode is None or inode.nlink > 0 or ino == ROOT_INO:
                return
            namespace.remove_inode(txn, ino)

    # -- attributes
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None) -> Attributes:
        if size is not None:
            self.truncate(ino, size)
        if mtime_ns is not None:
            with self._lock:  # before the transaction, so a commit after it writes this mtime
                state = self._states.get(ino)
                if state and state.staging:
                    state.staging.mtime_ns = mtime_ns
        now = namespace.now_ns()
        with self.store.write() as txn:
            inode = namespace.get(txn, ino)
            changes: dict[str, int] = {"ctime_ns": now}
            if mode is not None:
                mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
                if self.policy.shared and self._in_shared_tree(txn, ino):
                    mode = self.policy.shared.adjust_mode(mode)
                changes["mode"] = mode
            if uid is not None:
                changes["uid"] = uid
            if gid is not None:
                changes["gid"] = gid
            if atime_ns is not None:
                changes["atime_ns"] = atime_ns
            if mtime_ns is not None:
                changes["mtime_ns"] = mtime_ns
            inode = inode.with_(**changes)
            txn.put_inode(ino, inode)
        return self._overlay(ino, inode)

    def truncate(self, ino: int, size: int) -> None:
        with self.store.read() as txn:
            inode = namespace.get(txn, ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(inode.mode):
            raise FsError(errno.EINVAL)
        while True:
            staging = self._staging_for_write(ino, inode, keep=size > 0)
            with self._lock, staging.in_use() as alive:
                if not alive or self._state(ino).staging is not staging:
                    retry = True  # a commit stored and dropped it meanwhile: start again
                else:
                    retry = False
                    if 0 < size < staging.prefix_len:
                        self._unpin(staging.restore_front(self._chunk_bytes))
                    self._unpin(staging.truncate(size, namespace.now_ns()))
                    idle = self._state(ino).writers == 0
            if not retry:
                break
            with self.store.read() as txn:
                inode = namespace.get(txn, ino)
        if idle:  # truncate(2) by path: nobody will release this file, so commit now
            self.commit(ino)

    # -- xattrs
    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        _check_xattr_name(name)
        if len(value) > XATTR_VALUE_MAX_BYTES:
            raise FsError(errno.E2BIG)
        with self.store.write() as txn:
            inode = namespace.get(txn, ino)
            txn.put_xattr(ino, name, value)
            txn.put_inode(ino, inode.with_(ctime_ns=namespace.now_ns()))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        _check_xattr_name(name)
        with self.store.read() as txn:
            namespace.get(txn, ino)
            value = txn.xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        with self.store.read() as txn:
            namespace.get(txn, ino)
            return txn.xattr_names(ino)

    def removexattr(self, ino: int, name: bytes) -> None:
        _check_xattr_name(name)
        with self.store.write() as txn:
            inode = namespace.get(txn, ino)
            if not txn.delete_xattr(ino, name):
                raise FsError(errno.ENODATA)
            txn.put_inode(ino, inode.with_(ctime_ns=namespace.now_ns()))

    # -- open files
    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int
               ) -> tuple[int, Attributes]:
        with self.store.write() as txn:
            gid, mode = self._new_owner(txn, parent, gid, stat.S_IFREG | stat.S_IMODE(mode))
            ino = namespace.create(txn, parent, name, mode, uid, gid)
            inode = namespace.get(txn, ino)
        with self._lock:
            state = self._state(ino)
            state.lookups += 1
        fh = self._open_handle(ino, inode, writable=True)
        self._staging_for_write(ino, inode, keep=False)
        return fh, self.attributes(ino)

    def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Returns (handle, keep_cache): the kernel may keep its cached pages when the content
        is the one it cached before."""
        with self.store.read() as txn:
            inode = namespace.get(txn, ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        fh = self._open_handle(ino, inode, writable)
        if flags & os.O_TRUNC and writable:
            try:
                self.truncate(ino, 0)
            except BaseException:
                self.release(fh)
                raise
        with self._lock:
            state = self._state(ino)
            keep = state.staging is None and state.kernel_content == inode.content_id
            if state.staging is None:
                state.kernel_content = inode.content_id
        return fh, keep

    def _open_handle(self, ino: int, inode: Inode, writable: bool) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(ino, writable, inode.content_id)
            state = self._state(ino)
            state.handles += 1
            state.writers += int(writable)
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def needs_copy(self, fh: int) -> bool:
        """Whether the next write must first copy the stored content into staging (slow)."""
        state = self._states.get(self.handle(fh).ino)
        return state is None or state.staging is None

    def prepare_write(self, fh: int) -> None:
        """Make sure the file has staging (copying its content, so run it in a thread)."""
        ino = self.handle(fh).ino
        with self.store.read() as txn:
            inode = namespace.get(txn, ino)
        self._staging_for_write(ino, inode, keep=True)

    def _staging_for_write(self, ino: int, inode: Inode, keep: bool) -> Staging:
        with self._lock:
            state = self._state(ino)
        with state.create_lock:
            with self._lock:
                if state.staging is not None:
                    return state.staging
            staging = Staging.create(self.staging_dir, ino, inode.mtime_ns)
            try:
                if keep and inode.size:
                    staging.size = self._copy_content(inode.content_id, staging.fd)
            except BaseException:
                staging.discard()
                raise
            with self._lock:
                state.staging = staging
            return staging

    def _copy_content(self, content_id: bytes, fd: int) -> int:
        copied = 0
        for data in self.store.reader.pieces(content_id):
            copied += os.pwrite(fd, data, copied)
        return copied

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handle(fh)
        if not handle.writable:
            raise FsError(errno.EBADF)
        state = self._states[handle.ino]
        staging = state.staging
        if staging is None:
            raise FsError(errno.EIO, "write before prepare_write")
        with self._lock:
            if offset < staging.prefix_len:
                self._unpin(staging.restore_front(self._chunk_bytes))
            return staging.write(offset, data, namespace.now_ns())

    def front_due(self, fh: int) -> int | None:
        """The inode whose written front should be ingested now (see ``ingest_front``)."""
        ino = self.handle(fh).ino
        state = self._states.get(ino)
        staging = state.staging if state else None
        if staging is None or staging.ingesting:
            return None
        return ino if staging.size - staging.prefix_len >= self.ingest_step_bytes else None

    def ingest_front(self, ino: int) -> None:
        """Store the finished front of a file still being written and cut it out of its
        staging file, so a download never needs two full copies on disk (run in a thread)."""
        with self._lock:
            state = self._states.get(ino)
            staging = state.staging if state else None
            if staging is None or staging.ingesting or state is None:
                return
            staging.ingesting = True
            start, size, overwrites = staging.prefix_len, staging.size, staging.overwrites
        try:
            with staging.in_use() as alive:
                if alive:
                    self._ingest_front(ino, state, staging, start, size, overwrites)
        finally:
            staging.ingesting = False

    def _ingest_front(self, ino: int, state: InodeState, staging: Staging, start: int,
                      size: int, overwrites: int) -> None:
        def read(offset: int, length: int) -> bytes:
            return staging.read(offset, min(length, size - offset), self._chunk_bytes)

        if header_incomplete(read(0, HEADER_PROBE_BYTES), size):
            return  # tensor boundaries unknown until the whole header is written
        ids: list[bytes] = []
        lengths: list[int] = []
        with self.store.ingest_gate.shared():
            new, _ = self.ingestor.prepare_chunks(read, size, start, False, ids, lengths)
            if not ids:
                return
            with self.store.write() as txn:
                contents.register_chunks(txn, new)
            self._pin(ids)
        self.ingestor.committed(new)
        with self._lock:
            if (state.staging is not staging or staging.overwrites != overwrites
                    or staging.prefix_len != start):
                self._unpin(ids)  # a write changed those bytes meanwhile: keep them
                return
            staging.add_front(ids, lengths)
        log.debug("inode %d: front stored up to %d", ino, staging.prefix_len)

    def _chunk_bytes(self, chunk_id: bytes, lo: int, hi: int) -> bytes:
        with self.store.read() as txn:
            entry = txn.chunk(chunk_id)
        if entry is None:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]} of a file being written is gone "
                                 "from the index; run `hubfs verify`", chunk_id)
        return self.store.reader.chunk_range(chunk_id, entry.location, lo, hi)

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
        self._unpin(staging.prefix_ids)

    def read(self, fh: int, offset: int, size: int, decode: bool = True) -> bytes | None:
        """Bytes of an open file; ``None`` when ``decode`` is False and a chunk needs
        decoding (the caller then retries in a worker thread)."""
        handle = self.handle(fh)
        state = self._states.get(handle.ino)
        staging = state.staging if state else None
        if staging is not None:
            with staging.in_use() as alive:
                if alive:
                    return staging.read(offset, size, self._chunk_bytes)
            # committed and discarded meanwhile: the stored content has the same bytes
        with self._lock:
            content_id = self._current_content(handle)
        if decode:
            return self.store.reader.read(content_id, offset, size)
        return self.store.reader.read_without_decoding(content_id, offset, size)

    def _current_content(self, handle: Handle) -> bytes:
        state = self._states.get(handle.ino)
        if state is not None and state.kernel_content:
            handle.content_id = state.kernel_content
        return handle.content_id

    def fsync(self, fh: int) -> None:
        """Make written data durable: the staging file and its name (``recover`` finds it)."""
        state = self._states.get(self.handle(fh).ino)
        staging = state.staging if state else None
        if staging is not None:
            with staging.in_use() as alive:
                if alive:  # else a commit stored it already, durably
                    staging.sync()
                    self._check_room(staging)

    def _check_room(self, staging: Staging) -> None:
        """ENOSPC at fsync when the disk cannot take the file's unstored bytes once more (as
        chunks): better than a close that seems fine and a file that cannot be stored."""
        free = os.statvfs(self.store.path)
        if free.f_bavail * free.f_frsize < staging.size - staging.prefix_len:
            raise FsError(errno.ENOSPC, "the store's disk cannot take this file")

    def release(self, fh: int) -> int | None:
        """Close a handle; returns the inode when it now needs ``commit`` (run in a thread)."""
        with self._lock:
            handle = self._handles.pop(fh, None)
            if handle is None:
                return None
            state = self._state(handle.ino)
            state.handles -= 1
            state.writers -= int(handle.writable)
            needs_commit = state.writers == 0 and state.staging is not None
        if not needs_commit:
            self._remove_if_unused(handle.ino)
            return None
        return handle.ino

    def commit(self, ino: int) -> None:
        """Ingest a file's staging and switch the inode to the result in one transaction.

        A close during a running commit returns at once; the running one sees the newer
        generation when it ends and goes round again, so the last close is always stored."""
        while self._commit_once(ino):
            pass

    def _commit_once(self, ino: int) -> bool:
        """One commit; True when the staging changed meanwhile and needs another."""
        with self._lock:
            state = self._states.get(ino)
            if state is None or state.staging is None or state.committing:
                return False
            state.committing = True
            staging = state.staging
            generation = staging.generation
        prepared: PreparedContent | None = None
        alive = stored = False
        try:
            with self.store.read() as txn:
                alive = (txn.inode(ino) or Inode(0, 0, 0, nlink=0)).nlink > 0
            while staging.ingesting:  # a front ingest still runs: let it finish first
                time.sleep(0.01)
            if alive:
                with self.store.ingest_gate.shared():
                    prepared = self.ingestor.prepare_stream(
                        lambda o, n: staging.read(o, n, self._chunk_bytes), staging.size,
                        prefix=(staging.prefix_ids, staging.prefix_lengths))
                    with self.store.write() as txn:
                        contents.register(txn, prepared)
                        inode = namespace.set_content(txn, ino, prepared.content_id,
                                                      prepared.table.size)
                        with self._lock:  # a utime after close() must win over the write's
                            mtime_ns = staging.mtime_ns
                        txn.put_inode(ino, inode.with_(mtime_ns=mtime_ns))
                self.ingestor.committed(prepared)
            stored = True
        finally:
            with self._lock:
                state.committing = False
                current = state.staging is staging and staging.generation == generation
                # a failed commit (a full disk) keeps the staging: reads, a retry at the next
                # close or mount, and unlink all still find it
                done = stored and alive and current and state.writers == 0
                if done:
                    state.staging = None
                    state.kernel_content = prepared.content_id if prepared else None
                again = (stored and alive and not current and state.staging is not None
                         and state.writers == 0)
        if done:
            self._discard(staging)
        log.debug("committed inode %d (%s)", ino, "done" if done else "staging kept")
        if not alive:
            self._remove_if_unused(ino)  # its last open file or lookup discards the staging
        return again

    def flush_all(self) -> None:
        """Commit every file that still has staging (at unmount), after commits in flight."""
        while any(s.committing for s in list(self._states.values())):
            time.sleep(0.02)
        for ino in [i for i, s in list(self._states.items()) if s.staging is not None]:
            try:
                self.commit(ino)
            except HubfsError as exc:  # a full disk: expected, say it in one line
                log.error("inode %d is not stored at unmount (%s); its staging file is kept "
                          "for the next mount", ino, exc.message)
            except Exception:
                log.exception("could not store inode %d at unmount; its staging file is kept "
                              "and will be recovered at the next mount", ino)

    # -- mount-time recovery
    def recover(self) -> None:
        """Ingest staging files a crash left behind, and drop inodes no name refers to."""
        newest: dict[int, Path] = {}
        for entry in sorted(os.scandir(self.staging_dir), key=lambda e: e.name):
            if entry.name.endswith(SIDECAR_SUFFIX):
                continue  # read with its staging file
            ino = Staging.inode_of(entry.name)
            if ino is None:
                log.warning("removing stray file %s from staging", entry.path)
                os.unlink(entry.path)
                continue
            if ino in newest:  # names sort by time: an older staging was being replaced
                Staging.reopen(newest[ino]).discard()
            newest[ino] = Path(entry.path)
        for ino, path in newest.items():
            with self.store.read() as txn:
                inode = txn.inode(ino)
                staging = Staging.reopen(path)
                missing = [c for c in staging.prefix_ids if txn.chunk(c) is None]
            if inode is None or not stat.S_ISREG(inode.mode) or inode.nlink == 0 or missing:
                why = f"{len(missing)} of its stored chunks are gone" if missing else \
                    "its inode is gone"
                log.warning("dropping staging file %s: %s", path, why)
                staging.discard()
                continue
            self._pin(staging.prefix_ids)
            with self._lock:
                self._state(ino).staging = staging
            try:
                self.commit(ino)
            except StoreFullError as exc:
                log.error("inode %d keeps its %d bytes in staging, not stored yet: %s", ino,
                          staging.size, exc.message)
                continue
            log.warning("recovered %d bytes written to inode %d before the last crash",
                        staging.size, ino)
        with self.store.read() as txn:
            orphans = [ino for ino, inode in txn.inodes() if inode.nlink == 0 and ino != ROOT_INO]
        if orphans:
            with self.store.write() as txn:
                for ino in orphans:
                    namespace.remove_inode(txn, ino)
            log.warning("removed %d unlinked inodes left open at the last crash", len(orphans))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.store.path)


XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")


def _check_xattr_name(name: bytes) -> None:
    """Local filesystems know these namespaces only, and say EOPNOTSUPP to the rest."""
    if not name.startswith(XATTR_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP, f"xattr {name!r} has no known namespace")
