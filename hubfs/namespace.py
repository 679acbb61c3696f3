"""Names and inodes: POSIX directory semantics over one index transaction.

Every function takes the caller's ``Txn`` so that a FUSE request, an import batch or a rename
of a whole tree commits as one unit. Errors are ``FsError(errno)``, which the FUSE adapter
returns unchanged. An inode whose last name goes away keeps ``nlink == 0`` until its holder
calls ``remove_inode`` (the FUSE layer waits for the last open handle; tools remove at once).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator

from . import contents
from .errors import FsError
from .index import ROOT_INO, Inode, Txn

log = logging.getLogger(__name__)

NAME_MAX_BYTES = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def now_ns() -> int:
    return time.time_ns()


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid file name {name!r}")
    if len(name) > NAME_MAX_BYTES:
        raise FsError(errno.ENAMETOOLONG)


def init_root(txn: Txn, uid: int, gid: int, mode: int = 0o755) -> None:
    t = now_ns()
    txn.put_inode(ROOT_INO, Inode(stat.S_IFDIR | mode, uid, gid, nlink=2, atime_ns=t,
                                  mtime_ns=t, ctime_ns=t, parent=ROOT_INO))
    txn.meta_put("next_ino", (ROOT_INO + 1).to_bytes(8, "big"))


def get(txn: Txn, ino: int) -> Inode:
    inode = txn.inode(ino)
    if inode is None:
        raise FsError(errno.ENOENT, f"no inode {ino}")
    return inode


def get_dir(txn: Txn, ino: int) -> Inode:
    inode = get(txn, ino)
    if not stat.S_ISDIR(inode.mode):
        raise FsError(errno.ENOTDIR)
    return inode


def lookup(txn: Txn, parent: int, name: bytes) -> int:
    get_dir(txn, parent)
    if len(name) > NAME_MAX_BYTES:
        raise FsError(errno.ENAMETOOLONG)
    if name == b".":
        return parent
    if name == b"..":
        return get(txn, parent).parent
    found = txn.dirent(parent, name)
    if found is None:
        raise FsError(errno.ENOENT)
    return found[0]


def _touch_dir(txn: Txn, ino: int, nlink_delta: int = 0) -> None:
    inode = get(txn, ino)
    t = now_ns()
    txn.put_inode(ino, inode.with_(mtime_ns=t, ctime_ns=t, nlink=inode.nlink + nlink_delta))


def _add_entry(txn: Txn, parent: int, name: bytes, child: int) -> None:
    txn.put_dirent(parent, name, child, txn.next_counter("next_seq"))


def create(txn: Txn, parent: int, name: bytes, mode: int, uid: int, gid: int, *,
           rdev: int = 0, target: bytes = b"", content: tuple[bytes, int] | None = None,
           times_ns: tuple[int, int] | None = None) -> int:
    """Make a new inode of any type under ``parent``; ``content`` is (content id, size)."""
    check_name(name)
    get_dir(txn, parent)
    if txn.dirent(parent, name) is not None:
        raise FsError(errno.EEXIST)
    ino = txn.next_counter("next_ino")
    t = now_ns()
    atime, mtime = times_ns or (t, t)
    is_dir = stat.S_ISDIR(mode)
    inode = Inode(mode, uid, gid, nlink=2 if is_dir else 1, rdev=rdev, atime_ns=atime,
                  mtime_ns=mtime, ctime_ns=t, parent=parent, target=target,
                  size=len(target))
    if stat.S_ISREG(mode):
        cid, size = content if content else contents.empty_content(txn)
        contents.add_ref(txn, cid)
        inode = inode.with_(content_id=cid, size=size)
    txn.put_inode(ino, inode)
    _add_entry(txn, parent, name, ino)
    _touch_dir(txn, parent, 1 if is_dir else 0)
    return ino


def set_content(txn: Txn, ino: int, content_id: bytes, size: int) -> Inode:
    """Point a regular file at new content; the old content loses one reference."""
    inode = get(txn, ino)
    if not stat.S_ISREG(inode.mode):
        raise FsError(errno.EINVAL, "only regular files have content")
    contents.add_ref(txn, content_id)
    if inode.content_id:
        contents.drop_ref(txn, inode.content_id)
    t = now_ns()
    inode = inode.with_(content_id=content_id, size=size, mtime_ns=t, ctime_ns=t)
    txn.put_inode(ino, inode)
    return inode


def link(txn: Txn, ino: int, parent: int, name: bytes) -> Inode:
    inode = get(txn, ino)
    if stat.S_ISDIR(inode.mode):
        raise FsError(errno.EPERM, "hard links to directories are not allowed")
    check_name(name)
    get_dir(txn, parent)
    if txn.dirent(parent, name) is not None:
        raise FsError(errno.EEXIST)
    inode = inode.with_(nlink=inode.nlink + 1, ctime_ns=now_ns())
    txn.put_inode(ino, inode)
    _add_entry(txn, parent, name, ino)
    _touch_dir(txn, parent)
    return inode


def _check_existing_name(name: bytes) -> None:
    """``.`` and ``..`` name no entry of their own: they cannot be removed or moved."""
    if name in (b".", b".."):
        raise FsError(errno.EINVAL, f"cannot remove or move {name!r}")


def unlink(txn: Txn, parent: int, name: bytes) -> tuple[int, Inode]:
    """Remove a non-directory name; returns the inode, whose ``nlink`` may now be 0."""
    _check_existing_name(name)
    ino = lookup(txn, parent, name)
    inode = get(txn, ino)
    if stat.S_ISDIR(inode.mode):
        raise FsError(errno.EISDIR)
    seq = txn.dirent(parent, name)[1]  # type: ignore[index]
    txn.delete_dirent(parent, name, seq)
    inode = inode.with_(nlink=inode.nlink - 1, ctime_ns=now_ns())
    txn.put_inode(ino, inode)
    _touch_dir(txn, parent)
    return ino, inode


def rmdir(txn: Txn, parent: int, name: bytes) -> int:
    _check_existing_name(name)
    ino = lookup(txn, parent, name)
    get_dir(txn, ino)
    if txn.dir_has_entries(ino):
        raise FsError(errno.ENOTEMPTY)
    seq = txn.dirent(parent, name)[1]  # type: ignore[index]
    txn.delete_dirent(parent, name, seq)
    txn.put_inode(ino, get(txn, ino).with_(nlink=0, ctime_ns=now_ns()))
    _touch_dir(txn, parent, -1)
    return ino


def remove_inode(txn: Txn, ino: int) -> None:
    """Drop an inode that no name refers to any more, with its xattrs and content reference."""
    inode = txn.inode(ino)
    if inode is None:
        return
    if inode.nlink > 0:
        raise FsError(errno.EBUSY, f"inode {ino} still has {inode.nlink} names")
    for name in txn.xattr_names(ino):
        txn.delete_xattr(ino, name)
    if inode.content_id:
        contents.drop_ref(txn, inode.content_id)
    txn.delete_inode(ino)


def _is_ancestor(txn: Txn, ancestor: int, ino: int) -> bool:
    while True:
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        ino = get(txn, ino).parent


def rename(txn: Txn, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
           flags: int = 0) -> int | None:
    """POSIX rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE.

    Returns the inode a plain rename replaced (its ``nlink`` may now be 0), else ``None``.
    """
    check_name(new_name)
    _check_existing_name(old_name)
    src = lookup(txn, old_parent, old_name)
    src_inode = get(txn, src)
    get_dir(txn, new_parent)
    dst_entry = txn.dirent(new_parent, new_name)
    src_is_dir = stat.S_ISDIR(src_inode.mode)
    if src_is_dir and _is_ancestor(txn, src, new_parent):
        raise FsError(errno.EINVAL, "cannot move a directory into itself")
    if flags & RENAME_EXCHANGE:
        if dst_entry is None:
            raise FsError(errno.ENOENT)
        _exchange(txn, old_parent, old_name, src, new_parent, new_name, dst_entry[0])
        return None
    if dst_entry is not None and flags & RENAME_NOREPLACE:
        raise FsError(errno.EEXIST)
    if dst_entry is not None and dst_entry[0] == src:
        return None  # both names are links to one inode: POSIX says do nothing
    replaced: int | None = None
    if dst_entry is not None:
        dst, dst_seq = dst_entry
        dst_inode = get(txn, dst)
        dst_is_dir = stat.S_ISDIR(dst_inode.mode)
        if src_is_dir and not dst_is_dir:
            raise FsError(errno.ENOTDIR)
        if dst_is_dir and not src_is_dir:
            raise FsError(errno.EISDIR)
        if dst_is_dir and txn.dir_has_entries(dst):
            raise FsError(errno.ENOTEMPTY)
        txn.delete_dirent(new_parent, new_name, dst_seq)
        t = now_ns()
        txn.put_inode(dst, dst_inode.with_(nlink=0 if dst_is_dir else dst_inode.nlink - 1,
                                           ctime_ns=t))
        if dst_is_dir:
            _touch_dir(txn, new_parent, -1)
        replaced = dst
    seq = txn.dirent(old_parent, old_name)[1]  # type: ignore[index]
    txn.delete_dirent(old_parent, old_name, seq)
    _add_entry(txn, new_parent, new_name, src)
    src_inode = get(txn, src).with_(ctime_ns=now_ns(), parent=new_parent)
    if src_is_dir and old_parent != new_parent:
        _touch_dir(txn, old_parent, -1)
        _touch_dir(txn, new_parent, +1)
    else:
        _touch_dir(txn, old_parent)
        if new_parent != old_parent:
            _touch_dir(txn, new_parent)
    txn.put_inode(src, src_inode)
    return replaced


def _exchange(txn: Txn, parent_a: int, name_a: bytes, ino_a: int, parent_b: int, name_b: bytes,
              ino_b: int) -> None:
    a, b = get(txn, ino_a), get(txn, ino_b)
    if stat.S_ISDIR(b.mode) and _is_ancestor(txn, ino_b, parent_a):
        raise FsError(errno.EINVAL, "cannot move a directory into itself")
    seq_a = txn.dirent(parent_a, name_a)[1]  # type: ignore[index]
    seq_b = txn.dirent(parent_b, name_b)[1]  # type: ignore[index]
    txn.put_dirent(parent_a, name_a, ino_b, seq_a)
    txn.put_dirent(parent_b, name_b, ino_a, seq_b)
    t = now_ns()
    if parent_a != parent_b:
        a_dir, b_dir = stat.S_ISDIR(a.mode), stat.S_ISDIR(b.mode)
        txn.put_inode(ino_a, a.with_(parent=parent_b, ctime_ns=t))
        txn.put_inode(ino_b, b.with_(parent=parent_a, ctime_ns=t))
        _touch_dir(txn, parent_a, int(b_dir) - int(a_dir))
        _touch_dir(txn, parent_b, int(a_dir) - int(b_dir))
    else:
        txn.put_inode(ino_a, a.with_(ctime_ns=t))
        txn.put_inode(ino_b, b.with_(ctime_ns=t))
        _touch_dir(txn, parent_a)


def readdir(txn: Txn, ino: int, after_seq: int = 0) -> Iterator[tuple[int, bytes, int]]:
    get_dir(txn, ino)
    return txn.dir_entries(ino, after_seq)


def resolve(txn: Txn, path: str | bytes) -> int:
    """Inode of a slash-separated path from the root (symlinks inside are not followed)."""
    ino = ROOT_INO
    for part in os.fsencode(path).split(b"/"):
        if part and part != b".":
            ino = lookup(txn, ino, part)
    return ino


def make_dirs(txn: Txn, path: str | bytes, uid: int, gid: int, mode: int = 0o755) -> int:
    """Like ``mkdir -p`` inside the store; returns the last directory's inode."""
    ino = ROOT_INO
    for part in os.fsencode(path).split(b"/"):
        if not part or part == b".":
            continue
        found = txn.dirent(ino, part)
        if found is None:
            ino = create(txn, ino, part, stat.S_IFDIR | mode, uid, gid)
        else:
            ino = found[0]
            get_dir(txn, ino)
    return ino


def paths(txn: Txn) -> dict[int, list[bytes]]:
    """Every inode's paths from the root (hard links give several), for reports."""
    children: dict[int, list[tuple[bytes, int]]] = {}
    for parent, name, child, _seq in txn.all_dirents():
        children.setdefault(parent, []).append((name, child))
    out: dict[int, list[bytes]] = {ROOT_INO: [b"/"]}
    stack = [(ROOT_INO, b"")]
    while stack:
        ino, prefix = stack.pop()
        for name, child in children.get(ino, []):
            path = prefix + b"/" + name
            out.setdefault(child, []).append(path)
            if child in children:
                stack.append((child, path))
    return out
