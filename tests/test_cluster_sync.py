"""The namespace log through a real SeaweedFS: nodes publish, pull and reach one view; a node
offline for a while catches up; torn, partial and damaged objects are never merged."""

from __future__ import annotations

import http.client
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from hubfs.cluster_sync import ClusterLog, join_cluster, segment_key, snapshot_key
from hubfs.errors import HubfsError, RemoteConflictError
from hubfs.namespace_log import (
    HLC,
    Entry,
    HybridClock,
    Kind,
    Outbox,
    Segment,
    View,
    encode_segment,
    encode_snapshot,
)
from hubfs.remote import Remote
from hubfs.upload_queue import UploadQueue
from tests.cluster_helpers import FileContents
from tests.seaweed import BUCKET, Seaweed


class Node:
    """A cluster node without a mount: its clock, outbox, view and log, sealing by hand."""

    def __init__(self, remote_url: str, name: str, wall_ms: list[int] | None = None) -> None:
        self.name = name
        self.wall = wall_ms
        clock = HybridClock(name, (lambda: self.wall[0]) if self.wall is not None else None)
        self.log = ClusterLog(Remote(remote_url), name, clock)
        self.clock = clock
        self.view = View()
        self.outbox = Outbox(name)
        self.seq = self.log.next_seq()

    def write(self, path: str, kind: Kind = Kind.FILE, **kw: Any) -> Entry:
        if kind is Kind.FILE:
            kw.setdefault("content", os.urandom(32))
        if kind is Kind.SYMLINK:
            kw.setdefault("target", "x")
        entry = Entry(path, kind, self.clock.now(), **kw)
        self.outbox.add(entry)
        self.view.merge(entry)
        return entry

    def delete(self, path: str) -> None:
        entry = self.view.entries[path].tombstone(self.clock.now())
        self.outbox.add(entry)
        self.view.merge(entry)

    def seal(self) -> Segment | None:
        seg = self.outbox.seal(self.seq)
        if seg is not None:
            self.seq += 1
            self.view.frontier[self.name] = seg.seq  # its own entries are merged already
        return seg

    def sync(self) -> None:
        seg = self.seal()
        if seg is not None:
            assert self.log.publish(seg)
        self.log.pull(self.view)


def test_two_nodes_reach_one_view(remote_url: str, tmp_path: Path) -> None:
    a, b = Node(remote_url, "node-a"), Node(remote_url, "node-b")
    # Node a's content goes through its upload queue ahead of the segment that names it.
    files = FileContents(tmp_path / "a-contents")
    data = os.urandom(1_500_000)
    cid = files.add(data)
    queue = UploadQueue(tmp_path / "a-queue", a.log.remote, files.source)
    a.write("hub/models--m", Kind.DIR, mode=0o755)
    a.write("hub/models--m/blobs/e1", content=cid, size=len(data))
    a.write("hub/models--m/snapshots/r1/model.bin", Kind.SYMLINK, target="../../blobs/e1")
    a.write("hub/models--m/refs/main", size=2)
    queue.put_content(cid)
    seg = a.seal()
    assert seg is not None
    queue.put_object(*a.log.segment_object(seg))
    queue.start()
    assert queue.wait_empty(20)
    queue.close()

    report = b.log.pull(b.view)
    assert report.segments == 1 and {e.path for e in report.changed} == \
        {e.path for e in seg.entries}
    got = b.view.tree()["hub/models--m/blobs/e1"]
    assert Remote(b.log.remote.url).read_content(got.content or b"", 0, len(data)) == data

    # Both touch refs/main; b writes after it has seen a's write, so b's wins everywhere.
    b.write("hub/models--m/refs/main", size=3)
    b.write("torch/hub/checkpoints/x.pt")
    a.write("hub/.locks/l", mode=0o600, uid=1000)
    b.sync()
    a.sync()
    b.sync()
    assert a.view.tree() == b.view.tree()
    assert a.view.tree()["hub/models--m/refs/main"].size == 3
    assert a.view.frontier == b.view.frontier == {"node-a": 2, "node-b": 1}

    a.delete("torch/hub/checkpoints/x.pt")
    a.sync()
    b.sync()
    assert "torch/hub/checkpoints/x.pt" not in b.view.tree()
    # Its directories were never written as entries: implied, they go with their last child.
    assert "torch/hub/checkpoints" not in b.view.tree() and "torch" not in b.view.tree()
    assert a.view.tree() == b.view.tree()
    # A node that lost its local state carries on after its newest segment.
    assert ClusterLog(Remote(remote_url), "node-a").next_seq() == 4


def test_offline_node_catches_up_from_a_snapshot(remote_url: str) -> None:
    wall = [1_000_000]
    a, b = Node(remote_url, "a", wall), Node(remote_url, "b", wall)
    c = Node(remote_url, "c", wall)
    a.write("shared/x", size=1)
    a.sync()
    c.sync()  # c sees shared/x
    wall[0] += 10
    c.write("shared/x", size=2)  # c changes it, then goes offline holding the change
    held = c.seal()
    for round_ in range(12):
        wall[0] += 1000
        a.write(f"a/{round_}")
        b.write(f"b/{round_}", mode=0o600)
        a.sync()
        b.sync()
        if round_ in (3, 7, 10):
            assert (a if round_ != 7 else b).log.compact((a if round_ != 7 else b).view)
    a.delete("shared/x")  # deleted after c's offline change
    a.sync()
    assert a.log.compact(a.view) == 4
    deleted = a.log.prune(keep=2)
    snaps = [o.key for o in a.log.remote.list_objects("snap/")]
    assert snaps == [snapshot_key(3), snapshot_key(4)]
    assert not a.log.remote.exists(segment_key("a", 1))  # covered by snapshot 3 and pruned
    assert deleted > 10

    # c returns: its held segment goes out (an old timestamp), then it pulls.
    assert held is not None
    assert c.log.publish(held)
    report = c.log.pull(c.view)
    assert report.snapshot == 4 and report.stalled == ()
    a.sync()
    b.sync()
    assert c.view.tree() == a.view.tree() == b.view.tree()
    assert "shared/x" not in c.view.tree()  # the later deletion wins over c's older change
    assert len([p for p in c.view.tree() if p.startswith(("a/", "b/"))]) == 24
    # A newcomer with no state gets the same view from the snapshot and the later segments.
    d = Node(remote_url, "d")
    d.log.pull(d.view)
    assert d.view.tree() == a.view.tree()


def _presigned_put(remote: Remote, key: str) -> str:
    url: str = remote._client.generate_presigned_url(
        "put_object", Params={"Bucket": remote.url.bucket, "Key": remote.url.key(key)},
        ExpiresIn=60)
    return url


@pytest.mark.allow_warnings
def test_torn_partial_and_damaged_objects_are_never_merged(remote_url: str,
                                                           seaweed: Seaweed) -> None:
    a, b = Node(remote_url, "a"), Node(remote_url, "b")
    a.write("one")
    a.sync()
    remote = a.log.remote

    # Torn: segment 2 is sent halfway and the connection is reset (a node killed mid-PUT).
    a.write("two")
    seg2 = a.seal()
    assert seg2 is not None
    data = encode_segment(seg2) + os.urandom(200_000)  # long enough to be cut mid-body

    def start_put(key: str) -> http.client.HTTPConnection:
        url = urlsplit(_presigned_put(remote, key))
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
        conn.putrequest("PUT", f"{url.path}?{url.query}")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders()
        return conn

    control = start_put("control")  # the same request sent whole does create the object
    control.send(data)
    assert control.getresponse().status == 200 and remote.get("control") == data
    remote.delete("control")
    conn = start_put(segment_key("a", 2))
    conn.send(data[:len(data) // 2])
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()  # RST, as a kill -9 would leave it

    # Partial: a multipart upload of segment 2 that was never completed.
    raw: Any = seaweed.client()
    key2 = remote.url.key(segment_key("a", 2))
    upload = raw.create_multipart_upload(Bucket=BUCKET, Key=key2)["UploadId"]
    raw.upload_part(Bucket=BUCKET, Key=key2, UploadId=upload, PartNumber=1,
                    Body=encode_segment(seg2))

    report = b.log.pull(b.view)
    assert report.segments == 1 and set(b.view.tree()) == {"one"}
    assert not remote.exists(segment_key("a", 2))
    raw.abort_multipart_upload(Bucket=BUCKET, Key=key2, UploadId=upload)

    # Damaged: a flipped byte in segment 2; b merges nothing from it, nor from segment 3.
    bad = bytearray(encode_segment(seg2))
    bad[-3] ^= 0x10
    assert remote.put_if_absent(segment_key("a", 2), bytes(bad))
    a.write("three")
    seg3 = a.seal()
    assert seg3 is not None and a.log.publish(seg3)
    report = b.log.pull(b.view)
    assert report.stalled == ("a",) and report.segments == 0
    assert set(b.view.tree()) == {"one"} and b.view.frontier == {"a": 1}
    # The publisher's idempotent retry notices the clash rather than trusting the key.
    with pytest.raises(RemoteConflictError):
        a.log.publish(seg2)
    # Put right (the operator deletes it; the publisher's queue resends it): b moves on.
    remote.delete(segment_key("a", 2))
    assert a.log.publish(seg2)
    b.log.pull(b.view)
    assert set(b.view.tree()) == {"one", "two", "three"}

    # A damaged newest snapshot: readers fall back to the older one.
    assert a.log.compact(a.view) == 1
    newest = bytearray(encode_snapshot(a.view.snapshot(2)))
    newest[50] ^= 1
    assert remote.put_if_absent(snapshot_key(2), bytes(newest))
    c = Node(remote_url, "c")
    report = c.log.pull(c.view)
    assert report.snapshot == 1 and c.view.tree() == a.view.tree()


def test_racing_compactions_publish_each_generation_once(remote_url: str) -> None:
    nodes = [Node(remote_url, f"n{i}") for i in range(3)]
    for n in nodes:
        n.write(f"{n.name}/f")
        n.sync()
    results: list[int | None] = []
    barrier = threading.Barrier(3)

    def compact(node: Node) -> None:
        barrier.wait()
        results.append(node.log.compact(node.view))

    threads = [threading.Thread(target=compact, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [g for g in results if g is not None]
    assert len(won) == len(set(won)) >= 1
    fresh = Node(remote_url, "fresh")
    fresh.log.pull(fresh.view)
    nodes[0].log.pull(nodes[0].view)
    assert fresh.view.tree() == nodes[0].view.tree()
    assert {p for p in fresh.view.tree()} == {"n0", "n0/f", "n1", "n1/f", "n2", "n2/f"}


def test_entries_keep_owner_and_mode(remote_url: str) -> None:
    a, b = Node(remote_url, "a"), Node(remote_url, "b")
    a.write("users/ann", Kind.DIR, mode=0o700, uid=1001, gid=1001)
    a.write("users/ann/secret.bin", mode=0o600, uid=1001, gid=1001)
    a.sync()
    b.sync()
    tree = b.view.tree()
    assert (tree["users/ann"].mode, tree["users/ann"].uid) == (0o700, 1001)
    assert (tree["users/ann/secret.bin"].mode, tree["users/ann/secret.bin"].gid) == (0o600, 1001)
    assert tree["users"].mode == 0o700 and tree["users"].uid == 1001  # implied: as private
    assert HLC(0, 0, "a") < tree["users/ann"].hlc


def test_nodes_must_share_the_cluster_settings(remote_url: str) -> None:
    settings = {"chunk_min": 65536, "chunk_avg": 262144, "chunk_max": 1048576}
    join_cluster(Remote(remote_url), settings)
    join_cluster(Remote(remote_url), dict(settings))  # a second node with the same: fine
    with pytest.raises(HubfsError, match="created with chunk_avg=262144, this store has "
                                         "chunk_avg=131072"):
        join_cluster(Remote(remote_url), {**settings, "chunk_avg": 131072})
