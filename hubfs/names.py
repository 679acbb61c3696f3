"""Names and attributes of the mounted tree, with the multi-user rules (``policy``).

Plain synchronous calls on the index, each one short transaction; they run on the mount's trio
thread, which is the only writer of names. None of them touches file bytes: a file being written
is ``writeback``'s, and ``vfs`` lays its size and times over what these return.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from . import namespace
from .errors import FsError
from .index import ROOT_INO, Inode, Txn
from .policy import HOME_DIR, HOME_MODE, HOME_ROOT_MODE, SHARED_DIR, Policy, user_name
from .store import Store

log = logging.getLogger(__name__)

XATTR_VALUE_MAX_BYTES = 64 * 1024
# File capabilities: dropped, with the setuid/setgid bits, when a file changes (see
# drop_privileges).
CAPS_XATTR = b"security.capability"
CAP_FSETID = 4  # linux/capability.h: may keep setuid/setgid bits on a file it writes
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
# relatime: an access is recorded when the last one is older than a change or than this
ATIME_REFRESH_NS = 24 * 3600 * 10**9


@dataclass(frozen=True)
class Caller:
    """The process behind a request (from the kernel's request header). What it may do is read
    from /proc only when a file has setuid/setgid bits to lose, which is rare."""

    pid: int
    uid: int
    gid: int

    def _status(self) -> dict[bytes, bytes]:
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                return dict(line.rstrip(b"\n").split(b":\t", 1) for line in f if b":\t" in line)
        except OSError:
            return {}  # gone meanwhile: it may do nothing (the bits go: the safe side)

    def may_keep_privileges(self) -> bool:
        """``capable(CAP_FSETID)``: the capability held in the initial user namespace."""
        try:
            caps = int(self._status().get(b"CapEff", b"0"), 16)
            return bool(caps >> CAP_FSETID & 1) and (
                os.readlink(f"/proc/{self.pid}/ns/user") == os.readlink("/proc/self/ns/user"))
        except (OSError, ValueError):
            return False

    def in_group(self, gid: int) -> bool:
        if gid == self.gid:
            return True
        return str(gid).encode() in self._status().get(b"Groups", b"").split()


def privileges_to_drop(mode: int, gid: int, caller: Caller, *, chown: bool,
                       capable: bool | None = None) -> int:
    """The setuid/setgid bits Linux's VFS drops from a file of ``mode`` and group ``gid`` when
    ``caller`` writes or truncates it, or (``chown``) gives it a new owner
    (``setattr_should_drop_suidgid``, ``chown_common``). ``capable``: CAP_FSETID, when the
    kernel has said already."""
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return 0
    fsetid = caller.may_keep_privileges() if capable is None else capable
    if not chown and fsetid:
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not (fsetid or caller.in_group(gid))):
        kill |= stat.S_ISGID
    return kill


class Names:
    def __init__(self, store: Store, policy: Policy) -> None:
        self.store = store
        self.policy = policy
        self.home_ino = 0
        self.shared_ino = 0
        self._set_up_layout()

    def _set_up_layout(self) -> None:
        """Create (or repair the modes of) home/ and shared/ as the policy asks."""
        shared = self.policy.shared
        if not self.policy.homes and shared is None:
            return
        with self.store.metadata_write() as txn:
            if self.policy.homes:
                self.home_ino = _ensure_dir(txn, HOME_DIR, 0, 0, HOME_ROOT_MODE)
            if shared is not None:
                self.shared_ino = _ensure_dir(txn, SHARED_DIR, 0, shared.gid, shared.root_mode())

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

    def inode(self, ino: int) -> Inode:
        with self.store.read() as txn:
            return namespace.get(txn, ino)

    def lookup(self, parent: int, name: bytes, uid: int) -> int:
        try:
            with self.store.read() as txn:
                return namespace.lookup(txn, parent, name)
        except FsError as exc:
            if exc.errno != errno.ENOENT or not self._is_own_home(parent, name, uid):
                raise
            return self._make_home(name, uid)

    def _is_own_home(self, parent: int, name: bytes, uid: int) -> bool:
        return bool(self.home_ino) and parent == self.home_ino and name == user_name(uid)

    def _make_home(self, name: bytes, uid: int) -> int:
        """A user's private tree, made on their first lookup of it."""
        gid = pwd.getpwuid(uid).pw_gid
        with self.store.metadata_write() as txn:
            found = txn.dirent(self.home_ino, name)
            if found is not None:
                return found[0]
            ino = namespace.create(txn, self.home_ino, name, stat.S_IFDIR | HOME_MODE, uid, gid)
        log.info("created the private tree home/%s for uid %d", name.decode(), uid)
        return ino

    def readdir(self, ino: int, after: int) -> Iterator[tuple[int, bytes, int, Inode]]:
        """(seq, name, child, child inode) after entry ``after``, in one read transaction."""
        with self.store.read() as txn:
            for seq, name, child in namespace.readdir(txn, ino, after):
                yield seq, name, child, namespace.get(txn, child)

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

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
               target: bytes = b"") -> tuple[int, Inode]:
        """A new inode of any type (a regular file starts empty)."""
        with self.store.metadata_write() as txn:
            gid, mode = self._new_owner(txn, parent, gid, mode)
            ino = namespace.create(txn, parent, name, mode, uid, gid, rdev=rdev, target=target)
            return ino, namespace.get(txn, ino)

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        with self.store.metadata_write() as txn:
            return namespace.link(txn, ino, parent, name)

    def unlink(self, parent: int, name: bytes) -> int:
        with self.store.metadata_write() as txn:
            return namespace.unlink(txn, parent, name)[0]

    def rmdir(self, parent: int, name: bytes) -> int:
        with self.store.metadata_write() as txn:
            return namespace.rmdir(txn, parent, name)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int) -> int | None:
        """Returns the inode the rename replaced, if any."""
        with self.store.metadata_write() as txn:
            return namespace.rename(txn, old_parent, old_name, new_parent, new_name, flags)

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target

    def remove_if_orphan(self, ino: int) -> bool:
        """Drop an inode no name refers to any more (its last user is gone)."""
        with self.store.read() as txn:
            inode = txn.inode(ino)
        if inode is None or inode.nlink > 0 or ino == ROOT_INO:
            return False
        with self.store.metadata_write() as txn:
            namespace.remove_inode(txn, ino)
        return True

    def remove_orphans(self) -> int:
        """Drop every inode no name refers to (open but unlinked when a crash came)."""
        with self.store.read() as txn:
            orphans = [ino for ino, inode in txn.inodes() if inode.nlink == 0 and ino != ROOT_INO]
        if orphans:
            with self.store.metadata_write() as txn:
                for ino in orphans:
                    namespace.remove_inode(txn, ino)
        return len(orphans)

    def set_attributes(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                       gid: int | None = None, atime_ns: int | None = None,
                       mtime_ns: int | None = None) -> Inode:
        with self.store.metadata_write() as txn:
            inode = namespace.get(txn, ino)
            changes: dict[str, int] = {"ctime_ns": namespace.now_ns()}
            if mode is not None:
                mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
                if self.policy.shared and self._in_shared_tree(txn, ino):
                    mode = self.policy.shared.adjust_mode(mode)
                changes["mode"] = mode
            for key, value in (("uid", uid), ("gid", gid), ("atime_ns", atime_ns),
                               ("mtime_ns", mtime_ns)):
                if value is not None:
                    changes[key] = value
            inode = inode.with_(**changes)
            txn.put_inode(ino, inode)
        return inode

    def accessed(self, ino: int, inode: Inode) -> Inode:
        """Record a read access the way relatime does: only when the last recorded one is
        older than the last change or than a day, so reads cost no index write."""
        now = namespace.now_ns()
        if inode.atime_ns > max(inode.mtime_ns, inode.ctime_ns, now - ATIME_REFRESH_NS):
            return inode
        with self.store.metadata_write() as txn:
            current = txn.inode(ino)
            if current is None:
                return inode
            inode = current.with_(atime_ns=now)
            txn.put_inode(ino, inode)
        return inode

    def drop_privileges(self, ino: int, caller: Caller, *, chown: bool = False,
                        capable: bool | None = None) -> None:
        """A file is written, truncated or given a new owner: drop what the kernel leaves to the
        filesystem under FUSE_HANDLE_KILLPRIV_V2, as Linux's VFS would: its file capabilities
        always, its setuid/setgid bits as ``privileges_to_drop`` says. One index read when
        there is nothing to drop, which is nearly always."""
        with self.store.read() as txn:
            inode = txn.inode(ino)
            if inode is None:
                return
            caps = txn.xattr(ino, CAPS_XATTR) is not None
        kill = privileges_to_drop(inode.mode, inode.gid, caller, chown=chown, capable=capable)
        if not kill and not caps:
            return
        with self.store.metadata_write() as txn:
            current = namespace.get(txn, ino)
            if caps:
                txn.delete_xattr(ino, CAPS_XATTR)
            txn.put_inode(ino, current.with_(mode=current.mode & ~kill,
                                             ctime_ns=namespace.now_ns()))

    # -- xattrs
    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        _check_xattr_name(name)
        if len(value) > XATTR_VALUE_MAX_BYTES:
            raise FsError(errno.E2BIG)
        with self.store.metadata_write() as txn:
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
        with self.store.metadata_write() as txn:
            inode = namespace.get(txn, ino)
            if not txn.delete_xattr(ino, name):
                raise FsError(errno.ENODATA)
            txn.put_inode(ino, inode.with_(ctime_ns=namespace.now_ns()))

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.store.path)


def _ensure_dir(txn: Txn, name: bytes, uid: int, gid: int, mode: int) -> int:
    found = txn.dirent(ROOT_INO, name)
    if found is None:
        return namespace.create(txn, ROOT_INO, name, stat.S_IFDIR | mode, uid, gid)
    inode = namespace.get_dir(txn, found[0])
    txn.put_inode(found[0], inode.with_(uid=uid, gid=gid, mode=stat.S_IFDIR | mode))
    return found[0]


def _check_xattr_name(name: bytes) -> None:
    """Local filesystems know these namespaces only, and say EOPNOTSUPP to the rest."""
    if not name.startswith(XATTR_NAMESPACES):
        raise FsError(errno.EOPNOTSUPP, f"xattr {name!r} has no known namespace")
