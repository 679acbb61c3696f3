"""The durable upload queue against a real SeaweedFS: order, outages, kill -9 mid-upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hubfs.remote import Remote, content_key
from hubfs.upload_queue import ContentSource, UploadQueue
from tests.cluster_helpers import FileContents
from tests.seaweed import BUCKET, Seaweed


def _wait_for(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _check_bucket(remote: Remote, files: FileContents, cids: list[bytes]) -> None:
    """The bucket holds exactly these contents, each whole and matching its id."""
    held = sorted(o.key for o in remote.list_objects("content/"))
    assert held == sorted(content_key(c) for c in cids)
    reader = Remote(remote.url)
    for cid in cids:
        data = files.path(cid).read_bytes()
        assert reader.read_content(cid, 0, len(data)) == data


def test_queue_sends_in_order_once(remote_url: str, tmp_path: Path) -> None:
    files = FileContents(tmp_path / "contents")
    first, second = files.add_random(2_500_000), files.add_random(100_000)
    remote = Remote(remote_url)
    entered, release = threading.Event(), threading.Event()

    def gated(cid: bytes) -> ContentSource | None:
        if cid == first:
            entered.set()
            release.wait(10)
        return files.source(cid)

    queue = UploadQueue(tmp_path / "queue", remote, gated)
    assert queue.put_content(first)
    assert not queue.put_content(first)  # queued once
    assert queue.put_content(second)
    assert queue.put_object("log/n1/1", b"names both contents")
    with pytest.raises(ValueError, match="other bytes"):
        queue.put_object("log/n1/1", b"something else")
    queue.start()
    try:
        assert entered.wait(10)
        time.sleep(0.2)
        # The first content is held up: nothing queued behind it has gone out.
        assert remote.head("log/n1/1") is None and not remote.has_content(second)
        assert queue.status().queued == 3
        release.set()
        assert queue.wait_empty(20)
    finally:
        release.set()
        queue.close()
    _check_bucket(remote, files, [first, second])
    assert remote.get("log/n1/1") == b"names both contents"
    assert remote.stats.contents_uploaded == 2 and remote.stats.contents_present == 0
    assert list((tmp_path / "queue" / "jobs").iterdir()) == []
    status = queue.status()
    assert (status.queued, status.sent, status.failed, status.last_error) == (0, 3, 0, None)


def test_content_no_longer_held_is_skipped(remote_url: str, tmp_path: Path) -> None:
    files = FileContents(tmp_path / "contents")
    gone = files.add_random(1000)
    files.path(gone).unlink()
    queue = UploadQueue(tmp_path / "queue", Remote(remote_url), files.source)
    queue.put_content(gone)
    assert queue.drain_once()
    assert queue.status().queued == 0
    assert not Remote(remote_url).has_content(gone)


@pytest.mark.allow_warnings
def test_outage_keeps_jobs_and_drains_without_duplicates(remote_url: str, tmp_path: Path,
                                                         seaweed: Seaweed) -> None:
    files = FileContents(tmp_path / "contents")
    remote = Remote(remote_url, connect_timeout_s=0.5, read_timeout_s=0.5, deadline_s=1)
    queue = UploadQueue(tmp_path / "queue", remote, files.source)
    queue.start()
    seaweed.pause()
    try:
        cids = [files.add_random(300_000 * (i + 1)) for i in range(4)]
        for cid in cids:
            queue.put_content(cid)  # local work goes on while the store is down
        queue.put_object("log/n1/1", b"segment")
        _wait_for(lambda: queue.status().last_error is not None, 10, "the outage to show")
        assert "no answer within" in (queue.status().last_error or "")
        assert queue.status().queued == 5
    finally:
        seaweed.resume()
    queue.kick()
    assert queue.wait_empty(20)
    queue.close()
    assert queue.status().last_error is None
    _check_bucket(remote, files, cids)
    # Each content went up at most once; one whose answer was lost in the outage is found
    # present by the resend's HEAD, not sent again.
    assert remote.stats.contents_uploaded + remote.stats.contents_present == 4
    assert remote.stats.bytes_up <= sum(files.path(c).stat().st_size + 24 + 36 * 2
                                        for c in cids) + len(b"segment")
    raw: Any = seaweed.client()
    assert not raw.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


CHILD = r"""
import io, sys, time
from pathlib import Path
from hubfs.remote import Remote
from hubfs.upload_queue import ContentSource, UploadQueue
from tests.cluster_helpers import FileContents

url, contents, queue_dir = sys.argv[1:4]
files = FileContents(Path(contents))
cids = files.load()
opened = [0]

class SlowFile(io.FileIO):
    # The second open of a content is botocore sending it (the first hashes it): slow down
    # after 1 MiB, say so, and let the parent kill this process mid-body.
    sent = 0
    def read(self, n=-1):
        data = super().read(min(n if n >= 0 else 1 << 20, 256 << 10))
        SlowFile.sent += len(data)
        if SlowFile.sent > 1 << 20:
            print("mid-body", flush=True)
            time.sleep(0.5)
        return data

def source(cid):
    src = files.source(cid)
    def open_data():
        opened[0] += 1
        return SlowFile(files.path(cid)) if opened[0] == 2 else open(files.path(cid), "rb")
    return ContentSource(src.chunk_lengths, src.chunk_ids, open_data)

queue = UploadQueue(queue_dir, Remote(url), source)
for cid in sorted(cids, key=lambda c: -files.path(c).stat().st_size):
    queue.put_content(cid)
queue.put_object("log/n1/00000000000000000001", b"names the contents")
queue.start()
time.sleep(60)
"""


def test_kill_9_mid_upload_resumes_and_never_shows_a_torn_object(
        remote_url: str, tmp_path: Path, seaweed: Seaweed) -> None:
    files = FileContents(tmp_path / "contents")
    big = files.add_random(8 << 20)
    small = [files.add_random(50_000), files.add_random(70_000)]
    env = {**os.environ, **seaweed.env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, remote_url, str(files.root),
                              str(tmp_path / "queue")], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == b"mid-body\n", line
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    remote = Remote(remote_url)
    time.sleep(0.5)  # let the store notice the broken connection
    assert list(remote.list_objects("")) == []  # nothing half-sent is visible
    raw: Any = seaweed.client()
    prefix = remote.url.key("")
    assert [o["Key"] for o in raw.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
            .get("Contents", [])] == []

    files.load()
    queue = UploadQueue(tmp_path / "queue", remote, files.source)
    assert queue.status().queued == 4  # every job survived the kill
    queue.start()
    assert queue.wait_empty(20)
    queue.close()
    _check_bucket(remote, files, [big, *small])
    assert remote.get("log/n1/00000000000000000001") == b"names the contents"
    assert remote.stats.contents_uploaded == 3


@pytest.mark.allow_warnings
def test_damaged_local_copy_is_parked_not_retried(remote_url: str, tmp_path: Path) -> None:
    files = FileContents(tmp_path / "contents")
    bad, good = files.add_random(2_000_000), files.add_random(10_000)
    data = bytearray(files.path(bad).read_bytes())
    data[1_500_000] ^= 1
    files.path(bad).write_bytes(bytes(data))
    queue = UploadQueue(tmp_path / "queue", Remote(remote_url), files.source)
    queue.put_content(bad)
    queue.put_content(good)
    queue.start()
    assert queue.wait_empty(20)
    queue.close()
    assert queue.status().failed == 1
    assert not Remote(remote_url).has_content(bad) and Remote(remote_url).has_content(good)


@pytest.mark.allow_warnings
def test_torn_job_files_are_never_sent(remote_url: str, tmp_path: Path) -> None:
    jobs = tmp_path / "queue" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "00000000000000000001.tmp").write_bytes(b'{"v": 1, "kind": "object", "ke')
    (jobs / "00000000000000000002").write_bytes(
        b'{"v": 1, "kind": "object", "key": "log/n1/2", "size": 100}\n' + b"x" * 10)
    queue = UploadQueue(tmp_path / "queue", Remote(remote_url), lambda cid: None)
    assert queue.status().queued == 0 and queue.status().failed == 1
    assert not (jobs / "00000000000000000001.tmp").exists()
    assert queue.put_object("log/n1/3", b"ok")  # numbering continues past the parked job
    assert (jobs / "00000000000000000003").exists()
    assert queue.drain_once()
    assert Remote(remote_url).get("log/n1/3") == b"ok"


def test_a_content_is_uploaded_once_cluster_wide(remote_url: str, tmp_path: Path) -> None:
    """Two nodes hold the same download: the second finds it in the bucket and sends nothing."""
    data = os.urandom(3_000_000)
    nodes = []
    for name in ("a", "b"):
        files = FileContents(tmp_path / name / "contents")
        cid = files.add(data)
        remote = Remote(remote_url)
        nodes.append((remote, UploadQueue(tmp_path / name / "queue", remote, files.source)))
    for remote, queue in nodes:
        queue.put_content(cid)
        assert queue.drain_once()
    (a, _), (b, _) = nodes
    assert a.stats.contents_uploaded == 1 and a.stats.bytes_up >= len(data)
    assert b.stats.contents_uploaded == 0 and b.stats.contents_present == 1
    assert b.stats.bytes_up == 0
