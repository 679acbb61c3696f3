"""The cluster wiring's reconcile rules on a real store, without a mount or a bucket.

``local_changes`` finds a node's own changes by comparing its namespace with the tree it last
agreed on; ``apply_tree`` makes the namespace follow the merged tree, leaving paths the node
changed itself alone. Every test ends with the ``store`` fixture's verify: contents registered
from the remote (chunks without local bytes) keep the reference counts consistent.
"""

from __future__ import annotations

import os
import stat

import pytest

from hubfs import namespace
from hubfs.cluster import Local, apply_tree, local_changes, register_remote, walk
from hubfs.contents import EMPTY
from hubfs.index import ContentTable
from hubfs.namespace_log import HLC, Entry, HybridClock, Kind, View
from hubfs.reader import NotLocal
from hubfs.store import Store
from tests.cluster_helpers import table_of


def uid_gid() -> tuple[int, int]:
    return os.getuid(), os.getgid()


def local(store: Store) -> dict[str, Local]:
    with store.read() as txn:
        return walk(txn)


def remote_file(path: str, data: bytes, wall: int, node: str = "a"
                ) -> tuple[Entry, ContentTable]:
    cid, lengths, ids = table_of(data, 4096)
    uid, gid = uid_gid()
    entry = Entry(path, Kind.FILE, HLC(wall, 0, node), 0o644, uid, gid, 123_000, len(data),
                  content=cid)
    return entry, ContentTable(len(data), ids, lengths)


def test_own_changes_are_found_and_nothing_twice(store: Store) -> None:
    clock = HybridClock("b")
    uid, gid = uid_gid()
    with store.write() as txn:
        d = namespace.make_dirs(txn, "m/snap", uid, gid)
        namespace.create(txn, d, b"link", stat.S_IFLNK | 0o777, uid, gid, target=b"../x")
        namespace.create(txn, d, b"empty", stat.S_IFREG | 0o600, uid, gid)
    changes = local_changes(local(store), {}, clock)
    assert {(e.path, e.kind) for e in changes} == {
        ("m", Kind.DIR), ("m/snap", Kind.DIR), ("m/snap/link", Kind.SYMLINK),
        ("m/snap/empty", Kind.FILE)}
    assert next(e for e in changes if e.kind is Kind.FILE).content == EMPTY.content_id
    view = View()
    view.merge_all(changes)
    assert local_changes(local(store), view.tree(), clock) == []
    with store.write() as txn:
        namespace.rename(txn, namespace.resolve(txn, "m"), b"snap",
                         namespace.resolve(txn, "m"), b"snap2")
    moved = local_changes(local(store), view.tree(), clock)
    assert {(e.path, e.live) for e in moved} == {
        ("m/snap", False), ("m/snap/link", False), ("m/snap/empty", False),
        ("m/snap2", True), ("m/snap2/link", True), ("m/snap2/empty", True)}


def test_a_staged_file_is_published_after_its_commit_not_before(store: Store) -> None:
    """A file renamed into place while its commit runs still names its old content (a new
    file: none): publishing that would send other nodes an empty ``refs/main``."""
    clock = HybridClock("b")
    uid, gid = uid_gid()
    with store.write() as txn:
        refs = namespace.make_dirs(txn, "refs", uid, gid)
        old = namespace.create(txn, refs, b"main", stat.S_IFREG | 0o644, uid, gid)
    view = View()
    view.merge_all(local_changes(local(store), {}, clock))
    with store.write() as txn:  # main.tmp written (staged), renamed over main
        new = namespace.create(txn, refs, b"main.tmp", stat.S_IFREG | 0o644, uid, gid,
                               times_ns=(5_000, 5_000))
        namespace.rename(txn, refs, b"main.tmp", refs, b"main")
    staged = {new}
    assert old != new
    assert local_changes(local(store), view.tree(), clock, staged.__contains__) == []
    staged.clear()  # committed
    (change,) = local_changes(local(store), view.tree(), clock, staged.__contains__)
    assert change.path == "refs/main" and change.live


def test_remote_tree_is_applied_with_remote_only_contents(store: Store) -> None:
    data = os.urandom(20_000)
    entry, table = remote_file("m/blob", data, 1000)
    uid, gid = uid_gid()
    link = Entry("m/latest", Kind.SYMLINK, HLC(1000, 1, "a"), 0o777, uid, gid, target="blob")
    view = View()
    view.merge_all([entry, link])
    with store.write() as txn:
        done = apply_tree(txn, {}, view.tree(), walk(txn), {entry.content: table},  # type: ignore[dict-item]
                          lambda ino: False)
    assert len(done.names) == 3 and not done.removed
    here = local(store)
    assert stat.S_ISDIR(here["m"].inode.mode)
    assert here["m/blob"].inode.content_id == entry.content
    assert here["m/blob"].inode.size == len(data) and here["m/blob"].inode.mtime_ns == 123_000
    assert here["m/latest"].inode.target == b"blob"
    assert store.stats()["remote_only_bytes"] == len(data)
    with pytest.raises(NotLocal):
        store.reader.read(entry.content, 0, 10)  # type: ignore[arg-type]
    # what was applied is not a change of this node's own
    assert local_changes(here, view.tree(), HybridClock("b")) == []


def test_a_later_remote_write_replaces_and_a_tombstone_removes(store: Store) -> None:
    first, t1 = remote_file("refs/main", b"abc", 1000)
    second, t2 = remote_file("refs/main", b"def", 2000)
    gone = Entry("x/y", Kind.FILE, HLC(1000, 0, "a"), content=EMPTY.content_id)
    view = View()
    view.merge_all([first, gone])
    old = view.tree()
    tables = {first.content: t1, second.content: t2}
    with store.write() as txn:
        apply_tree(txn, {}, old, walk(txn), tables, lambda ino: False)  # type: ignore[arg-type]
    view.merge_all([second, gone.tombstone(HLC(2000, 0, "a"))])
    with store.write() as txn:
        done = apply_tree(txn, old, view.tree(), walk(txn), tables,  # type: ignore[arg-type]
                          lambda ino: False)
    for ino in done.unlinked:
        with store.write() as txn:
            namespace.remove_inode(txn, ino)
    here = local(store)
    assert here["refs/main"].inode.content_id == second.content
    assert "x/y" not in here and "x" not in here  # the directory it implied went with it


def test_a_path_changed_here_meanwhile_is_left_alone(store: Store) -> None:
    first, t1 = remote_file("refs/main", b"abc", 1000)
    second, t2 = remote_file("refs/main", b"def", 2000)
    view = View()
    view.merge(first)
    old = view.tree()
    tables = {first.content: t1, second.content: t2}
    with store.write() as txn:
        apply_tree(txn, {}, old, walk(txn), tables, lambda ino: False)  # type: ignore[arg-type]
    uid, gid = uid_gid()
    with store.write() as txn:  # this node rewrites it before the next pull
        refs = namespace.resolve(txn, "refs")
        ino, _ = namespace.unlink(txn, refs, b"main")
        namespace.remove_inode(txn, ino)
        namespace.create(txn, refs, b"main", stat.S_IFREG | 0o644, uid, gid)
    view.merge(second)
    with store.write() as txn:
        done = apply_tree(txn, old, view.tree(), walk(txn), tables,  # type: ignore[arg-type]
                          lambda ino: False)
    assert done.skipped == 1
    here = local(store)
    assert here["refs/main"].inode.content_id in (b"", EMPTY.content_id)
    # ... and the node's next seal publishes its own version, which then wins everywhere
    (mine,) = local_changes(here, view.tree(), HybridClock("b"))
    assert mine.path == "refs/main" and mine.hlc.wall_ms > second.hlc.wall_ms


def test_register_remote_counts_references_like_any_content(store: Store) -> None:
    data = b"z" * 10_000 + os.urandom(5000)
    cid, lengths, ids = table_of(data, 4096)
    with store.write() as txn:
        register_remote(txn, cid, ContentTable(len(data), ids, lengths))
        register_remote(txn, cid, ContentTable(len(data), ids, lengths))  # idempotent
        uid, gid = uid_gid()
        namespace.create(txn, 1, b"f", stat.S_IFREG | 0o644, uid, gid,
                         content=(cid, len(data)))
        namespace.create(txn, 1, b"g", stat.S_IFREG | 0o644, uid, gid,
                         content=(cid, len(data)))
        assert txn.content_refs(cid) == 2
        assert txn.chunk(ids[0]).refcount == 2  # type: ignore[union-attr]  # two equal chunks
        assert txn.chunk(ids[0]).location.remote  # type: ignore[union-attr]
