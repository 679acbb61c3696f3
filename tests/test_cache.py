"""The cluster cache's eviction (hubfs.cache) on a store in-process, no mount and no bucket: the
rules for which chunks go, the space that comes back, a store that verifies clean afterwards."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from hubfs import namespace
from hubfs.cache import Cache, disk_use
from hubfs.importer import import_tree
from hubfs.reader import NotLocal
from hubfs.store import Store
from hubfs.verify import verify

MIB = 1 << 20


def content_of(store: Store, path: str) -> bytes:
    with store.read() as txn:
        return namespace.get(txn, namespace.resolve(txn, path)).content_id


def test_eviction_takes_what_only_evicted_contents_hold(tmp_path: Path) -> None:
    """old (least recently used), mine and new: new shares old's first half. old goes, but
    only its second half (new still holds the first); mine, which the bucket does not hold,
    stays although it is older than new. The space comes back; the store verifies clean."""
    src = tmp_path / "src"
    src.mkdir()
    old, mine = os.urandom(8 * MIB), os.urandom(8 * MIB)
    new = old[: 4 * MIB] + os.urandom(4 * MIB)
    for name, data in (("old", old), ("mine", mine), ("new", new)):
        (src / name).write_bytes(data)
    Store.init(tmp_path / "store")
    with Store(tmp_path / "store") as store:
        import_tree(store, src, "/", progress=False)
        ids = {name: content_of(store, f"/{name}") for name in ("old", "mine", "new")}
        in_bucket = {ids["old"], ids["new"]}
        cache = Cache(store, 1, lambda cid, ask: cid in in_bucket)
        now = time.time_ns()
        cache.used(ids["new"])  # the most recently used; old and mine count by their atimes
        before = disk_use(store)
        # just over the limit: it frees 10% of it and 1 MiB (~3.3 MiB), less than old's own
        cache.limit_bytes = before - MIB
        with store.write() as txn:  # mine is older than old: first in line, were it allowed
            for name, age in (("old", 2), ("mine", 3)):
                ino = namespace.resolve(txn, f"/{name}")
                txn.put_inode(ino, namespace.get(txn, ino).with_(atime_ns=now - age * 10**9))
        with store.read() as txn:  # the chunks old and new share: their first ~4 MiB
            old_table, new_table = txn.content(ids["old"]), txn.content(ids["new"])
        shared = 0
        for chunk_id, length in zip(old_table.chunk_ids, old_table.lengths):
            if chunk_id not in new_table.chunk_ids:
                break
            shared += length
        assert 0 < shared <= 4 * MIB
        evicted = trio.run(cache.check)
        after = disk_use(store)
        assert evicted == 8 * MIB - shared  # old's own chunks, not those new holds too
        assert before - after >= evicted and after <= cache.limit_bytes
        assert cache.evicted_contents == 1
        assert store.reader.read(ids["new"], 0, 8 * MIB) == new
        assert store.reader.read(ids["mine"], 0, 8 * MIB) == mine
        assert store.reader.read(ids["old"], 0, shared) == old[:shared]
        with pytest.raises(NotLocal):  # fetched again through the bucket on a mount
            store.reader.read(ids["old"], shared, 1)
        assert store.object_of(ids["old"]) is None  # its object file went (gc moved the rest)
        assert store.stats()["remote_only_bytes"] == evicted
        # nothing else may go: the rest is held by new (recent, but in the bucket: it goes
        # only when it is the least recently used) and by mine (never)
        cache.used(ids["new"])
        cache.limit_bytes = 1
        trio.run(cache.check)
        assert store.reader.read(ids["mine"], 0, 8 * MIB) == mine
        with pytest.raises(NotLocal):
            store.reader.read(ids["new"], 0, 8 * MIB)
        assert disk_use(store) <= 8 * MIB + 64 * 1024
        report = verify(store, progress=False)
    assert report.ok, report.problems


def test_a_node_knows_what_the_bucket_holds(remote_url: str, tmp_path: Path) -> None:
    """What eviction asks a node (``ClusterNode.in_remote``): a content the bucket holds is
    known after one HEAD, or at once when the node's own upload confirmed it; one queued for
    upload is not, whatever the bucket says; without asking, an unknown content is None."""
    from hubfs.cluster import ClusterNode, config_of, init_remote
    from hubfs.remote import Remote
    from tests.cluster_helpers import FileContents

    files = FileContents(tmp_path / "files")
    theirs, ours, absent = (files.add_random(3 * MIB) for _ in range(3))
    bucket = Remote(remote_url)
    src = files.source(theirs)
    assert src is not None
    bucket.put_content(theirs, src.chunk_lengths, src.chunk_ids, src.open)
    Store.init(tmp_path / "store")
    init_remote(tmp_path / "store", remote_url, "n")
    with Store(tmp_path / "store") as store:
        config = config_of(store)
        assert config is not None
        node = ClusterNode(store, config)
        node.queue.source = files.source
        try:
            assert node.in_remote(theirs, ask=False) is None
            requests = node.remote.stats.requests
            assert node.in_remote(theirs, ask=True) is True
            assert node.in_remote(theirs, ask=True) is True  # remembered: one HEAD only
            assert node.remote.stats.requests == requests + 1
            assert node.in_remote(absent, ask=True) is False
            node.queue.put_content(theirs)  # queued: not evicted, though the bucket holds it
            node.queue.put_content(ours)
            assert node.in_remote(theirs, ask=True) is False
            assert node.in_remote(ours, ask=True) is False
            assert node.queue.drain_once() and node.queue.drain_once()
            assert node.in_remote(ours, ask=False) is True  # its upload confirmed it
        finally:
            node.close()
