"""A cluster node with ``--cache-size`` (hubfs.cache), through real mounts on a real ``weed mini``.

Node A writes files; node B, with a cache smaller than all of them, reads them in turn. B's packs
and objects stay within the limit, what it evicted reads back right (fetched again), files open
on B keep their bytes local, and a file B wrote that the bucket does not hold yet never goes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubfs import control
from tests.conftest import Mounted, run_hubfs
from tests.seaweed import Seaweed
from tests.test_cluster_mount import sync, two_nodes

pytestmark = [pytest.mark.mount, pytest.mark.slow]

FILE_BYTES = 8 << 20
LIMIT = "20MiB"
LIMIT_BYTES = 20 << 20
# Above the limit, eviction runs within a check interval (0.5 s) and takes ~1 s here; a
# check that asks the hung bucket about a content takes up to ~13 s.
SETTLE_S = 30.0
NAMES = ("f1.bin", "f2.bin", "f3.bin")


@pytest.fixture
def nodes(tmp_path: Path, remote_url: str, request: pytest.FixtureRequest
          ) -> Iterator[tuple[Mounted, Mounted]]:
    """A plain node A and a node B whose cache holds two of the test's files, not three."""
    with two_nodes(tmp_path, remote_url, request, ("--cache-size", LIMIT)) as pair:
        yield pair


def disk_use(node: Mounted) -> int:
    """What the cache limit bounds: the bytes of the store's pack and object files."""
    return sum(f.stat().st_size for d, pattern in (("packs", "*.pack"), ("objects", "*.obj"))
               for f in (node.store / d).glob(pattern))


def settled(node: Mounted) -> int:
    """The disk use once eviction has brought it within the limit (fails if it does not)."""
    deadline = time.monotonic() + SETTLE_S
    while (use := disk_use(node)) > LIMIT_BYTES:
        assert time.monotonic() < deadline, f"{use} bytes in use, limit {LIMIT_BYTES}"
        time.sleep(0.1)
    return use


def cluster_status(node: Mounted) -> dict:
    """The daemon's status, asked in-process on its control socket (as `hubfs status --json`
    asks it, without the second or two of a new interpreter)."""
    return control.request(node.store, "status", lambda done, total: None)["cluster"]


def read_uncached(path: Path) -> bytes:
    """A file's bytes read through the daemon: the kernel's cached pages of it dropped first
    (an open may keep them: they hold these very bytes)."""
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


def write_files(a: Mounted) -> dict[str, bytes]:
    files = {name: os.urandom(FILE_BYTES) for name in NAMES}
    for name, data in files.items():
        (a.path / name).write_bytes(data)
    return files


def test_reads_stay_within_the_limit_and_evicted_files_read_back(
        nodes: tuple[Mounted, Mounted]) -> None:
    a, b = nodes
    files = write_files(a)
    sync(a)
    sync(b)
    for name in NAMES:  # two fit, the third evicts the least recently used: f1
        assert (b.path / name).read_bytes() == files[name]
        assert settled(b) <= LIMIT_BYTES
    st = cluster_status(b)
    assert st["cache_limit_bytes"] == LIMIT_BYTES
    assert st["cache_evicted_bytes"] >= FILE_BYTES and st["cache_evicted_contents"] >= 1
    fetched = st["fetched_bytes"]
    assert 3 * FILE_BYTES <= fetched <= 3.1 * FILE_BYTES
    # f1 went (it is fetched again, and reads right); then f2 is the least recently used
    assert read_uncached(b.path / "f1.bin") == files["f1.bin"]
    st = cluster_status(b)
    assert st["fetched_bytes"] - fetched >= FILE_BYTES
    fetched = st["fetched_bytes"]
    settled(b)
    # f3 stayed: read again, nothing is fetched (a copy on demand of it may be made, and
    # counts against the limit: hubfs.cache)
    assert read_uncached(b.path / "f3.bin") == files["f3.bin"]
    assert cluster_status(b)["fetched_bytes"] == fetched
    settled(b)
    st = cluster_status(b)
    assert st["cache_read_bytes"] >= 4 * FILE_BYTES
    assert st["cache_hit_rate"] is not None and 0 <= st["cache_hit_rate"] < 0.5
    text = run_hubfs("status", str(b.path)).stdout
    assert "cluster cache limit bytes 21.0 MB" in text, text
    stats = run_hubfs("stats", str(b.store)).stdout  # (counters as of the last eviction)
    assert "cluster cache use / limit" in stats and "/ 21.0 MB" in stats, stats


def test_a_file_open_during_eviction_keeps_its_bytes(nodes: tuple[Mounted, Mounted],
                                                     seaweed: Seaweed) -> None:
    """f1 is read and held open while f2 and f3 are read: f1 is the least recently used, but
    open, so f2 goes instead; with the bucket hung, f1 still reads right from B's own disk."""
    a, b = nodes
    files = write_files(a)
    sync(a)
    sync(b)
    with open(b.path / "f1.bin", "rb", buffering=0) as held:
        assert held.read() == files["f1.bin"]
        for name in NAMES[1:]:
            assert (b.path / name).read_bytes() == files[name]
            settled(b)
        assert cluster_status(b)["cache_evicted_bytes"] >= FILE_BYTES
        seaweed.pause()
        try:
            # the kernel's cached pages dropped: these reads reach the daemon, which would
            # have to fetch (and, the bucket hung, fail with EIO) had f1 been evicted
            os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(held.fileno(), FILE_BYTES, 0) == files["f1.bin"]
        finally:
            seaweed.resume()
    fetched = cluster_status(b)["fetched_bytes"]
    assert read_uncached(b.path / "f2.bin") == files["f2.bin"]  # f2 went: fetched again
    assert cluster_status(b)["fetched_bytes"] - fetched >= FILE_BYTES
    settled(b)


@pytest.mark.allow_warnings  # the hung bucket: uploads wait and retry
def test_a_file_the_bucket_does_not_hold_yet_is_never_evicted(
        nodes: tuple[Mounted, Mounted], seaweed: Seaweed) -> None:
    """B writes a file while the bucket hangs (so the bucket cannot hold it), and it is the
    least recently used; the cache overflows: A's f1 goes, B's own file stays and reads right."""
    a, b = nodes
    files = write_files(a)
    sync(a)
    sync(b)
    for name in NAMES[:2]:
        assert (b.path / name).read_bytes() == files[name]
    assert settled(b) + FILE_BYTES > LIMIT_BYTES  # B's own file will not fit beside
    seaweed.pause()
    try:
        mine = os.urandom(FILE_BYTES)
        path = b.path / "mine.bin"
        path.write_bytes(mine)
        os.utime(path, (time.time() - 86400, time.time()))  # used long ago: first in line
        deadline = time.monotonic() + SETTLE_S  # (stored in the background after its close)
        while cluster_status(b)["cache_evicted_bytes"] < FILE_BYTES:  # f1 goes instead
            assert time.monotonic() < deadline, "nothing evicted"
            time.sleep(0.1)
        settled(b)
        assert read_uncached(b.path / "f2.bin") == files["f2.bin"]  # local: not evicted
        assert read_uncached(path) == mine  # from B's disk: the bucket hangs
    finally:
        seaweed.resume()
    sync(b)
    sync(a)
    assert (a.path / "mine.bin").read_bytes() == mine
