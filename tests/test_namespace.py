"""POSIX names over the index: create, lookup, link, unlink, rmdir, rename, readdir, xattrs.

Each test works on a fresh store through ``namespace`` functions inside write transactions, as
the FUSE adapter does; the ``store`` fixture then runs ``verify``, which checks link counts,
parent pointers and every content and chunk reference count against what the tree implies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubfs import contents, namespace
from hubfs.errors import FsError
from hubfs.index import ROOT_INO, Txn
from hubfs.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE
from hubfs.store import Store
from hubfs.verify import verify

DIR = stat.S_IFDIR | 0o755
FILE = stat.S_IFREG | 0o644


@pytest.fixture
def txn(store: Store) -> Iterator[Txn]:
    """One write transaction for the whole test (committed at the end, then verified)."""
    with store.write() as t:
        yield t


def mkdir(txn: Txn, parent: int, name: bytes) -> int:
    return namespace.create(txn, parent, name, DIR, 0, 0)


def mkfile(txn: Txn, parent: int, name: bytes) -> int:
    return namespace.create(txn, parent, name, FILE, 0, 0)


def names(txn: Txn, ino: int) -> list[bytes]:
    return [name for _seq, name, _child in namespace.readdir(txn, ino)]


def nlink(txn: Txn, ino: int) -> int:
    return namespace.get(txn, ino).nlink


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


def drop(txn: Txn, ino: int | None) -> None:
    """What the FUSE layer does once nothing holds an inode that lost its last name."""
    if ino is not None and namespace.get(txn, ino).nlink == 0:
        namespace.remove_inode(txn, ino)


# -- create / lookup --------------------------------------------------------------------------


def test_create_and_lookup(txn: Txn) -> None:
    d = mkdir(txn, ROOT_INO, b"d")
    f = mkfile(txn, d, b"f")
    link = namespace.create(txn, d, b"l", stat.S_IFLNK | 0o777, 0, 0, target=b"../x")
    fifo = namespace.create(txn, d, b"p", stat.S_IFIFO | 0o600, 0, 0)
    assert namespace.lookup(txn, ROOT_INO, b"d") == d
    assert namespace.lookup(txn, d, b"f") == f
    assert namespace.lookup(txn, d, b".") == d
    assert namespace.lookup(txn, d, b"..") == ROOT_INO
    assert namespace.lookup(txn, ROOT_INO, b"..") == ROOT_INO
    assert namespace.resolve(txn, "/d/f") == f
    assert namespace.resolve(txn, b"//d/./l") == link
    assert namespace.get(txn, link).target == b"../x" and namespace.get(txn, link).size == 4
    assert stat.S_ISFIFO(namespace.get(txn, fifo).mode)
    assert namespace.get(txn, f).size == 0
    assert namespace.get(txn, d).parent == ROOT_INO
    assert names(txn, d) == [b"f", b"l", b"p"]
    # directories: 2 + subdirectories; files: their names
    assert nlink(txn, ROOT_INO) == 3 and nlink(txn, d) == 2 and nlink(txn, f) == 1


def test_create_errors(txn: Txn) -> None:
    d = mkdir(txn, ROOT_INO, b"d")
    f = mkfile(txn, d, b"f")
    assert errno_of(mkfile, txn, d, b"f") == errno.EEXIST
    assert errno_of(mkdir, txn, d, b"f") == errno.EEXIST
    assert errno_of(mkfile, txn, f, b"x") == errno.ENOTDIR
    assert errno_of(mkfile, txn, 999_999, b"x") == errno.ENOENT
    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        assert errno_of(mkfile, txn, d, bad) == errno.EINVAL, bad
    assert errno_of(mkfile, txn, d, b"x" * 256) == errno.ENAMETOOLONG
    mkfile(txn, d, b"x" * 255)
    mkfile(txn, d, b"\xff\xfe not utf-8")
    assert errno_of(namespace.lookup, txn, d, b"missing") == errno.ENOENT
    assert errno_of(namespace.lookup, txn, f, b"x") == errno.ENOTDIR
    assert errno_of(namespace.resolve, txn, "/d/f/x") == errno.ENOTDIR
    assert errno_of(namespace.make_dirs, txn, "/d/f/sub", 0, 0) == errno.ENOTDIR


def test_make_dirs(txn: Txn) -> None:
    leaf = namespace.make_dirs(txn, "a/b/c", 0, 0)
    assert namespace.make_dirs(txn, "/a/b/c/", 0, 0) == leaf
    assert namespace.resolve(txn, "/a/b/c") == leaf
    assert nlink(txn, namespace.resolve(txn, "/a")) == 3


# -- link / unlink / rmdir --------------------------------------------------------------------


def test_hard_links_and_unlink(txn: Txn) -> None:
    a, b = mkdir(txn, ROOT_INO, b"a"), mkdir(txn, ROOT_INO, b"b")
    f = mkfile(txn, a, b"f")
    namespace.link(txn, f, b, b"g")
    namespace.link(txn, f, a, b"h")
    assert nlink(txn, f) == 3
    assert namespace.lookup(txn, b, b"g") == f
    assert nlink(txn, a) == 2  # hard links to files do not count as subdirectories
    assert errno_of(namespace.link, txn, f, b, b"g") == errno.EEXIST
    assert errno_of(namespace.link, txn, a, b, b"dirlink") == errno.EPERM
    ino, inode = namespace.unlink(txn, a, b"f")
    assert ino == f and inode.nlink == 2
    namespace.unlink(txn, b, b"g")
    ino, inode = namespace.unlink(txn, a, b"h")
    assert inode.nlink == 0
    # an inode with no names stays until its holder removes it (an open file, say)
    assert namespace.get(txn, f).nlink == 0
    assert errno_of(namespace.remove_inode, txn, mkfile(txn, a, b"busy")) == errno.EBUSY
    namespace.remove_inode(txn, f)
    assert txn.inode(f) is None
    namespace.remove_inode(txn, f)  # twice is harmless
    assert names(txn, a) == [b"busy"] and names(txn, b) == []


def test_unlink_and_rmdir_errors(txn: Txn) -> None:
    d = mkdir(txn, ROOT_INO, b"d")
    f = mkfile(txn, d, b"f")
    assert errno_of(namespace.unlink, txn, ROOT_INO, b"d") == errno.EISDIR
    assert errno_of(namespace.unlink, txn, d, b"missing") == errno.ENOENT
    assert errno_of(namespace.rmdir, txn, ROOT_INO, b"d") == errno.ENOTEMPTY
    assert errno_of(namespace.rmdir, txn, d, b"f") == errno.ENOTDIR
    assert errno_of(namespace.rmdir, txn, d, b"missing") == errno.ENOENT
    namespace.unlink(txn, d, b"f")
    namespace.remove_inode(txn, f)
    sub = mkdir(txn, d, b"sub")
    assert nlink(txn, d) == 3
    assert namespace.rmdir(txn, d, b"sub") == sub
    assert nlink(txn, d) == 2 and nlink(txn, sub) == 0
    namespace.remove_inode(txn, sub)
    namespace.rmdir(txn, ROOT_INO, b"d")
    namespace.remove_inode(txn, d)
    assert nlink(txn, ROOT_INO) == 2 and names(txn, ROOT_INO) == []


def test_dot_names_are_errors_not_crashes(txn: Txn) -> None:
    d = mkdir(txn, ROOT_INO, b"d")
    mkdir(txn, ROOT_INO, b"e")
    for call in (lambda: namespace.rmdir(txn, d, b"."),
                 lambda: namespace.rename(txn, d, b".", ROOT_INO, b"x")):
        with pytest.raises(FsError):
            call()


# -- rename -----------------------------------------------------------------------------------


def test_rename_file_within_and_across_directories(txn: Txn) -> None:
    a, b = mkdir(txn, ROOT_INO, b"a"), mkdir(txn, ROOT_INO, b"b")
    f = mkfile(txn, a, b"f")
    assert namespace.rename(txn, a, b"f", a, b"g") is None
    assert names(txn, a) == [b"g"]
    assert namespace.rename(txn, a, b"g", b, b"h") is None
    assert names(txn, a) == [] and names(txn, b) == [b"h"]
    assert namespace.lookup(txn, b, b"h") == f
    assert nlink(txn, a) == 2 and nlink(txn, b) == 2 and nlink(txn, f) == 1


def test_rename_directory_moves_its_parent_link(txn: Txn) -> None:
    a, b = mkdir(txn, ROOT_INO, b"a"), mkdir(txn, ROOT_INO, b"b")
    d = mkdir(txn, a, b"d")
    mkfile(txn, d, b"inside")
    assert nlink(txn, a) == 3
    namespace.rename(txn, a, b"d", b, b"d2")
    assert namespace.get(txn, d).parent == b
    assert namespace.lookup(txn, d, b"..") == b
    assert nlink(txn, a) == 2 and nlink(txn, b) == 3
    assert namespace.resolve(txn, "/b/d2/inside")


def test_rename_noreplace(txn: Txn) -> None:
    f, g = mkfile(txn, ROOT_INO, b"f"), mkfile(txn, ROOT_INO, b"g")
    assert errno_of(namespace.rename, txn, ROOT_INO, b"f", ROOT_INO, b"g",
                    RENAME_NOREPLACE) == errno.EEXIST
    assert namespace.lookup(txn, ROOT_INO, b"f") == f
    assert namespace.lookup(txn, ROOT_INO, b"g") == g
    namespace.rename(txn, ROOT_INO, b"f", ROOT_INO, b"h", RENAME_NOREPLACE)
    assert names(txn, ROOT_INO) == [b"g", b"h"]


def test_rename_over_existing_file(txn: Txn) -> None:
    d = mkdir(txn, ROOT_INO, b"d")
    f, g = mkfile(txn, d, b"f"), mkfile(txn, ROOT_INO, b"g")
    replaced = namespace.rename(txn, d, b"f", ROOT_INO, b"g")
    assert replaced == g and nlink(txn, g) == 0
    drop(txn, replaced)
    assert namespace.lookup(txn, ROOT_INO, b"g") == f
    # over a file that has another name: that name keeps it alive
    h = mkfile(txn, ROOT_INO, b"h")
    namespace.link(txn, h, d, b"h-too")
    replaced = namespace.rename(txn, ROOT_INO, b"g", ROOT_INO, b"h")
    assert replaced == h and nlink(txn, h) == 1
    assert namespace.lookup(txn, d, b"h-too") == h


def test_rename_onto_another_name_of_the_same_inode_does_nothing(txn: Txn) -> None:
    f = mkfile(txn, ROOT_INO, b"f")
    namespace.link(txn, f, ROOT_INO, b"g")
    assert namespace.rename(txn, ROOT_INO, b"f", ROOT_INO, b"g") is None
    assert names(txn, ROOT_INO) == [b"f", b"g"] and nlink(txn, f) == 2


def test_rename_over_directories(txn: Txn) -> None:
    src = mkdir(txn, ROOT_INO, b"src")
    mkfile(txn, src, b"payload")
    empty = mkdir(txn, ROOT_INO, b"empty")
    full = mkdir(txn, ROOT_INO, b"full")
    mkfile(txn, full, b"x")
    f = mkfile(txn, ROOT_INO, b"file")
    assert errno_of(namespace.rename, txn, ROOT_INO, b"src", ROOT_INO, b"full") == \
        errno.ENOTEMPTY
    assert errno_of(namespace.rename, txn, ROOT_INO, b"src", ROOT_INO, b"file") == errno.ENOTDIR
    assert errno_of(namespace.rename, txn, ROOT_INO, b"file", ROOT_INO, b"empty") == errno.EISDIR
    assert nlink(txn, ROOT_INO) == 5
    replaced = namespace.rename(txn, ROOT_INO, b"src", ROOT_INO, b"empty")
    assert replaced == empty and nlink(txn, empty) == 0
    drop(txn, replaced)
    assert nlink(txn, ROOT_INO) == 4
    assert namespace.resolve(txn, "/empty/payload")
    # an empty directory replaced from another parent
    other = mkdir(txn, ROOT_INO, b"other")
    target = mkdir(txn, other, b"target")
    replaced = namespace.rename(txn, ROOT_INO, b"empty", other, b"target")
    assert replaced == target
    drop(txn, replaced)
    assert nlink(txn, other) == 3 and nlink(txn, ROOT_INO) == 4
    assert namespace.get(txn, src).parent == other
    assert f


def test_rename_directory_into_its_own_subtree(txn: Txn) -> None:
    a = mkdir(txn, ROOT_INO, b"a")
    b = mkdir(txn, a, b"b")
    c = mkdir(txn, b, b"c")
    for parent in (a, b, c):
        assert errno_of(namespace.rename, txn, ROOT_INO, b"a", parent, b"x") == errno.EINVAL
    assert errno_of(namespace.rename, txn, a, b"b", c, b"x") == errno.EINVAL
    assert errno_of(namespace.rename, txn, a, b"b", b, b"x") == errno.EINVAL
    # exchanging a directory with one of its descendants
    assert errno_of(namespace.rename, txn, b, b"c", ROOT_INO, b"a",
                    RENAME_EXCHANGE) == errno.EINVAL
    assert errno_of(namespace.rename, txn, ROOT_INO, b"a", b, b"c",
                    RENAME_EXCHANGE) == errno.EINVAL
    # nothing moved
    assert namespace.resolve(txn, "/a/b/c") == c
    # renaming onto itself is fine
    assert namespace.rename(txn, ROOT_INO, b"a", ROOT_INO, b"a") is None


def test_rename_exchange(txn: Txn) -> None:
    a, b = mkdir(txn, ROOT_INO, b"a"), mkdir(txn, ROOT_INO, b"b")
    f = mkfile(txn, a, b"f")
    d = mkdir(txn, b, b"d")
    mkfile(txn, d, b"inside")
    seqs_before = {name: seq for seq, name, _ in namespace.readdir(txn, a)}
    namespace.rename(txn, a, b"f", b, b"d", RENAME_EXCHANGE)
    assert namespace.lookup(txn, a, b"f") == d
    assert namespace.lookup(txn, b, b"d") == f
    assert namespace.get(txn, d).parent == a
    assert nlink(txn, a) == 3 and nlink(txn, b) == 2
    # the names keep their readdir positions
    assert {name: seq for seq, name, _ in namespace.readdir(txn, a)} == seqs_before
    assert namespace.resolve(txn, "/a/f/inside")
    # within one directory; and with a missing target
    g = mkfile(txn, a, b"g")
    namespace.rename(txn, a, b"f", a, b"g", RENAME_EXCHANGE)
    assert namespace.lookup(txn, a, b"f") == g and namespace.lookup(txn, a, b"g") == d
    assert nlink(txn, a) == 3
    assert errno_of(namespace.rename, txn, a, b"g", a, b"missing", RENAME_EXCHANGE) == \
        errno.ENOENT
    assert errno_of(namespace.rename, txn, a, b"missing", a, b"g") == errno.ENOENT


# -- readdir ----------------------------------------------------------------------------------


def test_readdir_offsets_survive_changes(txn: Txn) -> None:
    """A listing resumed from an offset sees every entry that existed throughout exactly once,
    whatever was added or removed meanwhile (telldir/seekdir semantics)."""
    d = mkdir(txn, ROOT_INO, b"d")
    for i in range(10):
        mkfile(txn, d, b"e%d" % i)
    first = list(namespace.readdir(txn, d))
    assert [n for _s, n, _c in first] == [b"e%d" % i for i in range(10)]
    seqs = [s for s, _n, _c in first]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    seen = [n for _s, n, _c in first[:4]]
    resume = first[3][0]
    # meanwhile: remove entries before and after the cursor, add new ones, rename one
    for name in (b"e1", b"e6"):
        ino, _inode = namespace.unlink(txn, d, name)
        namespace.remove_inode(txn, ino)
    mkfile(txn, d, b"new1")
    namespace.rename(txn, d, b"e8", d, b"e8-renamed")
    mkfile(txn, d, b"new2")
    rest = [n for _s, n, _c in namespace.readdir(txn, d, resume)]
    assert rest == [b"e4", b"e5", b"e7", b"e9", b"new1", b"e8-renamed", b"new2"]
    survivors = {b"e0", b"e2", b"e3", b"e4", b"e5", b"e7", b"e9"}
    assert survivors <= set(seen) | set(rest)
    assert not set(seen) & set(rest)
    # an offset past the end gives nothing; the offset of a deleted entry still works
    last = list(namespace.readdir(txn, d))[-1][0]
    assert list(namespace.readdir(txn, d, last)) == []
    gone = first[6][0]  # e6's seq
    assert [n for _s, n, _c in namespace.readdir(txn, d, gone)][:2] == [b"e7", b"e9"]
    # other directories' entries never leak into a listing
    mkfile(txn, ROOT_INO, b"zzz")
    assert b"zzz" not in [n for _s, n, _c in namespace.readdir(txn, d)]
    assert errno_of(lambda: list(namespace.readdir(txn, namespace.resolve(txn, "/d/e0")))) \
        == errno.ENOTDIR


# -- xattrs -----------------------------------------------------------------------------------


def test_xattrs(txn: Txn) -> None:
    f, g = mkfile(txn, ROOT_INO, b"f"), mkfile(txn, ROOT_INO, b"g")
    txn.put_xattr(f, b"user.a", b"1")
    txn.put_xattr(f, b"user.b", b"\x00binary\xff")
    txn.put_xattr(f, b"user.empty", b"")
    txn.put_xattr(g, b"user.a", b"other")
    txn.put_xattr(f, b"user.a", b"2")  # replace
    assert txn.xattr(f, b"user.a") == b"2"
    assert txn.xattr(f, b"user.b") == b"\x00binary\xff"
    assert txn.xattr(f, b"user.empty") == b""
    assert txn.xattr(f, b"user.missing") is None
    assert txn.xattr_names(f) == [b"user.a", b"user.b", b"user.empty"]
    assert txn.xattr_names(g) == [b"user.a"]
    assert txn.delete_xattr(f, b"user.b") is True
    assert txn.delete_xattr(f, b"user.b") is False
    assert txn.xattr_names(f) == [b"user.a", b"user.empty"]
    # removing the inode takes its xattrs, and only its own
    namespace.unlink(txn, ROOT_INO, b"f")
    namespace.remove_inode(txn, f)
    assert txn.xattr_names(f) == [] and txn.xattr(f, b"user.a") is None
    assert txn.xattr(g, b"user.a") == b"other"


# -- content references -----------------------------------------------------------------------


def _content(store: Store, data: bytes) -> contents.PreparedContent:
    assert store.ingestor is not None
    return store.ingestor.prepare(data)


def test_content_refcounts(store: Store) -> None:
    x = _content(store, b"x" * 300_000 + b"tail-x")
    y = _content(store, b"y" * 300_000 + b"tail-y")
    with store.write() as txn:
        contents.register(txn, x)
        contents.register(txn, x)  # registering twice is a no-op
        a = namespace.create(txn, ROOT_INO, b"a", FILE, 0, 0, content=(x.content_id, x.table.size))
        b = namespace.create(txn, ROOT_INO, b"b", FILE, 0, 0, content=(x.content_id, x.table.size))
        assert txn.content_refs(x.content_id) == 2
        for chunk_id in x.table.chunk_ids:
            entry = txn.chunk(chunk_id)
            assert entry is not None and entry.refcount >= 1
        # a hard link shares the inode, not another content reference
        namespace.link(txn, a, ROOT_INO, b"a2")
        assert txn.content_refs(x.content_id) == 2
        # b moves to y: x loses one holder
        contents.register(txn, y)
        namespace.set_content(txn, b, y.content_id, y.table.size)
        assert txn.content_refs(x.content_id) == 1
        assert txn.content_refs(y.content_id) == 1
        assert namespace.get(txn, b).size == y.table.size
        # setting the same content again changes nothing
        namespace.set_content(txn, b, y.content_id, y.table.size)
        assert txn.content_refs(y.content_id) == 1
    with store.write() as txn:
        for name in (b"a", b"a2"):
            ino, _inode = namespace.unlink(txn, ROOT_INO, name)
        namespace.remove_inode(txn, ino)
        # x's last holder is gone: its table goes, its chunks drop to zero (gc reclaims them)
        assert txn.content(x.content_id) is None
        assert txn.content_refs(x.content_id) == 0
        for chunk_id in set(x.table.chunk_ids) - set(y.table.chunk_ids):
            entry = txn.chunk(chunk_id)
            assert entry is not None and entry.refcount == 0
    assert store.stats()["unreferenced_bytes"] > 0
    # the bytes come back for free: a new file of x's content reuses the dead chunks
    again = _content(store, b"x" * 300_000 + b"tail-x")
    assert again.new_stored_bytes == 0
    with store.write() as txn:
        contents.register(txn, again)
        namespace.create(txn, ROOT_INO, b"c", FILE, 0, 0,
                         content=(again.content_id, again.table.size))
    assert store.stats()["unreferenced_bytes"] == 0


def test_repeated_chunks_count_each_occurrence(store: Store) -> None:
    data = bytes(12 * 1024 * 1024)  # the same max-size chunk three times
    prepared = _content(store, data)
    assert len(prepared.table.chunk_ids) >= 3
    with store.write() as txn:
        contents.register(txn, prepared)
        f = namespace.create(txn, ROOT_INO, b"zeros", FILE, 0, 0,
                             content=(prepared.content_id, len(data)))
        counts: dict[bytes, int] = {}
        for chunk_id in prepared.table.chunk_ids:
            counts[chunk_id] = counts.get(chunk_id, 0) + 1
        for chunk_id, n in counts.items():
            entry = txn.chunk(chunk_id)
            assert entry is not None and entry.refcount == n
    assert store.reader.read(prepared.content_id, 0, len(data)) == data
    with store.write() as txn:
        namespace.unlink(txn, ROOT_INO, b"zeros")
        namespace.remove_inode(txn, f)
        for chunk_id in counts:
            entry = txn.chunk(chunk_id)
            assert entry is not None and entry.refcount == 0


def test_set_content_only_on_regular_files(txn: Txn) -> None:
    d = mkdir(txn, ROOT_INO, b"d")
    cid, size = contents.empty_content(txn)
    assert errno_of(namespace.set_content, txn, d, cid, size) == errno.EINVAL


# -- differential: the namespace against Linux itself -----------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
NAMES = ("a", "b", "c")
random_paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(tuple)
# When both calls fail, POSIX leaves the choice of errno open if several apply; Linux checks
# in another order than the namespace here. Through FUSE the kernel makes these checks itself
# before asking hubfs, so only the fact of failure must match for these pairs.
SAME_FAILURE = {
    ("link", frozenset({errno.EEXIST, errno.EPERM})),  # link(dir, existing name)
    ("rename", frozenset({errno.EINVAL, errno.EEXIST})),  # dir into itself, NOREPLACE
    ("rename", frozenset({errno.EINVAL, errno.ENOENT})),  # dir into itself, EXCHANGE
    ("rename", frozenset({errno.EISDIR, errno.ENOTEMPTY})),  # file over its own ancestor
}


def _draw_op(data: st.DataObject, root: str) -> tuple:
    """An operation on mostly existing paths (or new names in existing directories)."""
    existing = [tuple(p.split("/")) for p in sorted(_os_tree(root))]
    dirs = [()] + [p for p in existing if os.path.isdir(os.path.join(root, *p))]
    fresh = [d + (n,) for d in dirs for n in NAMES]
    choices = sorted(set(existing + fresh))
    path = st.one_of(st.sampled_from(choices), random_paths)
    kind = data.draw(st.sampled_from(["mkdir", "create", "link", "unlink", "rmdir", "rename",
                                      "rename"]))
    if kind in ("mkdir", "create", "unlink", "rmdir"):
        return (kind, data.draw(path))
    if kind == "link":
        return (kind, data.draw(path), data.draw(path))
    return (kind, data.draw(path), data.draw(path),
            data.draw(st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])))


def _os_apply(root: str, op: tuple) -> int:
    """Run ``op`` on a real directory; 0 or the errno Linux answers."""
    kind, *args = op

    def p(parts: tuple[str, ...]) -> str:
        return os.path.join(root, *parts)

    try:
        if kind == "mkdir":
            os.mkdir(p(args[0]))
        elif kind == "create":
            os.close(os.open(p(args[0]), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        elif kind == "link":
            os.link(p(args[0]), p(args[1]), follow_symlinks=False)
        elif kind == "unlink":
            os.unlink(p(args[0]))
        elif kind == "rmdir":
            os.rmdir(p(args[0]))
        else:
            if _libc.renameat2(AT_FDCWD, p(args[0]).encode(), AT_FDCWD, p(args[1]).encode(),
                               args[2]) != 0:
                return ctypes.get_errno()
    except OSError as exc:
        return exc.errno or -1
    return 0


def _ns_apply(store: Store, op: tuple) -> int:
    """The same ``op`` through the namespace, as the FUSE adapter would issue it."""
    kind, *args = op

    def parent_of(txn: Txn, parts: tuple[str, ...]) -> tuple[int, bytes]:
        # the kernel walks the path itself: a missing or non-directory parent fails there
        parent = namespace.resolve(txn, "/".join(parts[:-1]))
        namespace.get_dir(txn, parent)
        return parent, parts[-1].encode()

    try:
        with store.write() as txn:
            if kind in ("mkdir", "create"):
                parent, name = parent_of(txn, args[0])
                namespace.create(txn, parent, name, DIR if kind == "mkdir" else FILE, 0, 0)
            elif kind == "link":
                src_parent, src_name = parent_of(txn, args[0])
                ino = namespace.lookup(txn, src_parent, src_name)
                parent, name = parent_of(txn, args[1])
                namespace.link(txn, ino, parent, name)
            elif kind == "unlink":
                parent, name = parent_of(txn, args[0])
                ino, _inode = namespace.unlink(txn, parent, name)
                drop(txn, ino)
            elif kind == "rmdir":
                parent, name = parent_of(txn, args[0])
                drop(txn, namespace.rmdir(txn, parent, name))
            else:
                old_parent, old_name = parent_of(txn, args[0])
                new_parent, new_name = parent_of(txn, args[1])
                drop(txn, namespace.rename(txn, old_parent, old_name, new_parent, new_name,
                                           args[2]))
    except FsError as exc:
        return exc.errno
    return 0


def _os_tree(root: str) -> dict[str, tuple[bool, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            out[os.path.relpath(path, root)] = (stat.S_ISDIR(st_.st_mode), st_.st_nlink,
                                                st_.st_ino)
    return out


def _ns_tree(store: Store) -> dict[str, tuple[bool, int, int]]:
    out = {}
    with store.read() as txn:
        for ino, found in namespace.paths(txn).items():
            inode = namespace.get(txn, ino)
            for path in found:
                if path != b"/":
                    out[path.decode().lstrip("/")] = (stat.S_ISDIR(inode.mode), inode.nlink, ino)
    return out


def _same_shape(a: dict[str, tuple[bool, int, int]], b: dict[str, tuple[bool, int, int]]
                ) -> None:
    """Same paths, types and link counts, and the same grouping of names into inodes."""
    assert {k: v[:2] for k, v in a.items()} == {k: v[:2] for k, v in b.items()}

    def groups(tree: dict[str, tuple[bool, int, int]]) -> set[frozenset[str]]:
        by_ino: dict[int, set[str]] = {}
        for path, (_d, _n, ino) in tree.items():
            by_ino.setdefault(ino, set()).add(path)
        return {frozenset(g) for g in by_ino.values()}

    assert groups(a) == groups(b)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_namespace_behaves_like_linux(data: st.DataObject) -> None:
    """Random mkdir/create/link/unlink/rmdir/rename(2) sequences: every call succeeds or fails
    as it does on a real Linux directory, and the trees end up the same shape."""
    # on tmpfs where there is one: every step commits, and fsync on a busy disk is slow
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else None
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        real = os.path.join(tmp, "real")
        os.mkdir(real)
        Store.init(Path(tmp) / "store")
        with Store(Path(tmp) / "store") as store:
            for _ in range(data.draw(st.integers(0, 40), label="steps")):
                op = _draw_op(data, real)
                want = _os_apply(real, op)
                got = _ns_apply(store, op)
                if got != want and got and want:
                    assert (op[0], frozenset({got, want})) in SAME_FAILURE, \
                        (op, errno.errorcode[got], errno.errorcode[want])
                else:
                    assert (got, errno.errorcode.get(got)) == \
                        (want, errno.errorcode.get(want)), op
            _same_shape(_ns_tree(store), _os_tree(real))
            with store.read() as txn:
                assert namespace.get(txn, ROOT_INO).nlink == os.lstat(real).st_nlink
            report = verify(store, progress=False)
            assert report.ok, report.problems
            assert not report.notes, report.notes  # no inode left without a name
