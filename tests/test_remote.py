"""The object-store client against a real SeaweedFS: contents, conditional publishing, damage,
credentials and a store that is down or hung."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import hubfs.remote as remote_mod
from hubfs.errors import (
    RemoteAuthError,
    RemoteConflictError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)
from hubfs.remote import Remote, RemoteURL, content_key
from tests.cluster_helpers import table_of
from tests.seaweed import BUCKET, SECRET_KEY, Seaweed


def _put(remote: Remote, data: bytes, chunk_bytes: int = 1 << 20) -> bytes:
    cid, lengths, ids = table_of(data, chunk_bytes)
    assert remote.put_content(cid, lengths, ids, lambda: io.BytesIO(data))
    return cid


def test_url_parse() -> None:
    assert RemoteURL.parse("s3://b/p/q/") == RemoteURL("b", "p/q")
    assert RemoteURL.parse("s3://b").key("log/x") == "log/x"
    assert str(RemoteURL.parse("s3://b/p/")) == "s3://b/p"
    with pytest.raises(Exception, match="s3://BUCKET/PREFIX"):
        RemoteURL.parse("https://b/p")


def test_content_round_trip_in_ranges(remote_url: str) -> None:
    remote = Remote(remote_url)
    data = os.urandom(3 * 1024 * 1024 + 12345)
    cid = _put(remote, data, chunk_bytes=700_000)
    fresh = Remote(remote_url)  # no cached table
    for off, n in [(0, 1), (699_999, 2), (1_000_000, 2_000_000), (len(data) - 5, 100),
                   (0, len(data))]:
        assert fresh.read_content(cid, off, n) == data[off:off + n]
    assert fresh.read_content(cid, len(data), 10) == b""
    # What a lazy read keeps locally: the whole chunks it touched, verified.
    got = fresh.fetch_chunks(cid, 1_500_000, 10)
    assert (got.first, got.stop, got.start) == (2, 3, 1_400_000)
    assert [(cid_, bytes(b)) for cid_, b in got.chunks()] == \
        [(table_of(data, 700_000)[2][2], data[1_400_000:2_100_000])]
    # Idempotent: the second put sends no bytes.
    before = remote.stats.bytes_up
    cid2, lengths, ids = table_of(data, 700_000)
    assert not remote.put_content(cid2, lengths, ids, lambda: io.BytesIO(data))
    assert remote.stats.bytes_up == before
    assert remote.stats.contents_present == 1
    # The object is the table followed by the bytes, so range GETs map to file offsets.
    table = fresh.content_table(cid)
    assert remote.head(content_key(cid)) == table.data_offset + len(data)
    assert remote.get_range(content_key(cid), table.data_offset, table.data_offset + 10) \
        == data[:10]


def test_empty_content(remote_url: str) -> None:
    remote = Remote(remote_url)
    cid = _put(remote, b"")
    assert Remote(remote_url).read_content(cid, 0, 10) == b""


def test_multipart_upload(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_mod, "MULTIPART_THRESHOLD_BYTES", 1 << 20)
    monkeypatch.setattr(remote_mod, "PART_BYTES", 5 << 20)  # S3's smallest part
    remote = Remote(remote_url)
    data = os.urandom(11 << 20)
    cid = _put(remote, data)
    assert Remote(remote_url).read_content(cid, 0, len(data)) == data
    # A second complete of the same key is refused by If-None-Match and aborted.
    table = remote_mod.ContentTable.build(cid, *table_of(data)[1:])
    body = remote_mod._ContentBody(table, lambda: io.BytesIO(data))
    assert remote._put_multipart(content_key(cid), body) is False


def test_conditional_put_has_one_winner(remote_url: str) -> None:
    """SeaweedFS enforces If-None-Match: *, so publishing is atomic across nodes. (It makes
    racing writers of one key wait in steps of a second, hence few writers here.)"""
    remote = Remote(remote_url)
    for trial in range(2):
        won: list[int] = []
        barrier = threading.Barrier(4)

        def put(i: int, key: str, won: list[int], barrier: threading.Barrier) -> None:
            barrier.wait()
            if remote.put_if_absent(key, b"%d" % i * 1000):
                won.append(i)

        threads = [threading.Thread(target=put, args=(i, f"race/{trial}", won, barrier))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert remote.get(f"race/{trial}") == b"%d" % won[0] * 1000


def test_publish_is_idempotent_and_detects_clashes(remote_url: str) -> None:
    remote = Remote(remote_url)
    assert remote.publish("log/a/1", b"segment")
    assert not remote.publish("log/a/1", b"segment")  # a retry whose answer was lost
    with pytest.raises(RemoteConflictError, match="node name"):
        remote.publish("log/a/1", b"other segment")


def test_list_and_ranges(remote_url: str) -> None:
    remote = Remote(remote_url)
    for key in ("log/a/001", "log/a/002", "log/a/003", "log/b/001", "snap/001"):
        remote.put_if_absent(key, key.encode())
    assert [o.key for o in remote.list_objects("log/a/", start_after="log/a/001")] == \
        ["log/a/002", "log/a/003"]
    assert sorted(remote.list_dirs("log/")) == ["a", "b"]
    assert remote.get_range("log/a/001", 4, 100) == b"a/001"
    assert remote.get_range("log/a/001", 50, 100) == b""
    assert remote.get("log/none") is None and remote.head("log/none") is None


def test_listing_pages(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = Remote(remote_url)
    for i in range(7):
        remote.put_if_absent(f"p/{i:03d}", b"x")
    real = remote._client.list_objects_v2

    def small_pages(**kw: Any) -> Any:
        return real(**kw, MaxKeys=2)

    monkeypatch.setattr(remote._client, "list_objects_v2", small_pages)
    assert [o.key for o in remote.list_objects("p/")] == [f"p/{i:03d}" for i in range(7)]


@pytest.mark.allow_warnings
def test_flipped_byte_is_detected_and_repaired(remote_url: str, seaweed: Seaweed) -> None:
    remote = Remote(remote_url)
    data = os.urandom(2_500_000)
    cid = _put(remote, data)
    url = RemoteURL.parse(remote_url)
    key = url.key(content_key(cid))
    raw: Any = seaweed.client()
    stored = bytearray(raw.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    offset = len(stored) - len(data) + 1_500_000
    stored[offset] ^= 0x01
    raw.put_object(Bucket=BUCKET, Key=key, Body=bytes(stored))
    reader = Remote(remote_url)
    assert reader.read_content(cid, 0, 1000) == data[:1000]  # chunk 0 is intact
    with pytest.raises(RemoteIntegrityError, match=f"{content_key(cid)} is damaged") as err:
        reader.read_content(cid, 1_400_000, 10)
    assert "\n" not in str(err.value)
    assert reader.stats.integrity_failures == 1
    # A node holding a good copy puts it back.
    _, lengths, ids = table_of(data)
    remote.repair_content(cid, lengths, ids, lambda: io.BytesIO(data))
    assert reader.read_content(cid, 1_400_000, 10) == data[1_400_000:1_400_010]

    # A flipped byte in the table is caught against the content id.
    stored = bytearray(raw.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    stored[30] ^= 0x80
    raw.put_object(Bucket=BUCKET, Key=key, Body=bytes(stored))
    with pytest.raises(RemoteIntegrityError, match="table"):
        Remote(remote_url).read_content(cid, 0, 10)


def test_damaged_local_copy_is_never_uploaded(remote_url: str) -> None:
    remote = Remote(remote_url)
    data = os.urandom(3_000_000)
    cid, lengths, ids = table_of(data)
    bad = bytearray(data)
    bad[2_100_000] ^= 0x04
    with pytest.raises(RemoteIntegrityError, match="local chunk 2"):
        remote.put_content(cid, lengths, ids, lambda: io.BytesIO(bytes(bad)))
    assert not remote.has_content(cid)
    short = data[:2_000_000]
    with pytest.raises(RemoteIntegrityError, match="ends 1000000 bytes early"):
        remote.put_content(cid, lengths, ids, lambda: io.BytesIO(short))
    assert list(remote.list_objects("")) == []


def _one_line_auth_error(remote_url: str, fix: str, secret: str) -> None:
    remote = Remote(remote_url)
    for op in (lambda: remote.head("x"), lambda: remote.get("x"),
               lambda: remote.put_if_absent("x", b"1"), lambda: list(remote.list_objects(""))):
        with pytest.raises(RemoteAuthError) as err:
            op()
        msg = str(err.value)
        assert fix in msg and remote_url in msg, msg
        assert "\n" not in msg and secret not in msg


def test_wrong_secret_names_the_variable(remote_url: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-9c2e")
    _one_line_auth_error(remote_url, "set AWS_SECRET_ACCESS_KEY", "not-the-secret-9c2e")


def test_unknown_key_id_names_the_variable(remote_url: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    _one_line_auth_error(remote_url, "set AWS_ACCESS_KEY_ID", SECRET_KEY)


def test_credentials_file_is_read_and_named(remote_url: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = hubfs-test-key\n"
                     f"aws_secret_access_key = {SECRET_KEY}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    assert Remote(remote_url).put_if_absent("from-file", b"ok")  # the file's key works
    creds.write_text("[default]\naws_access_key_id = hubfs-test-key\n"
                     "aws_secret_access_key = wrong-in-file\n")
    _one_line_auth_error(remote_url, f"aws_secret_access_key in {creds}", "wrong-in-file")


def test_no_credentials_names_the_variables(remote_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteAuthError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Remote(remote_url).head("x")


def test_credentials_are_never_logged(remote_url: str, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, botocore's wire logging included
    remote = Remote(remote_url)
    data = os.urandom(100_000)
    cid = _put(remote, data)
    remote.read_content(cid, 0, 10)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-7d1a")
    with pytest.raises(RemoteAuthError):
        Remote(remote_url).get("x")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) > 10  # the capture saw botocore's debug records
    assert SECRET_KEY not in text and "wrong-secret-7d1a" not in text
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hubfs"))
    assert "hubfs-test-key" not in ours


def _assert_bounded_failure(op: Any, bound_s: float, remote_url: str) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteUnavailableError) as err:
        op()
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert elapsed < bound_s, f"took {elapsed:.1f}s"
    assert remote_url in msg and "no answer within" in msg and "\n" not in msg


def test_store_down_fails_in_bounded_time(remote_url: str, monkeypatch: pytest.MonkeyPatch,
                                          seaweed: Seaweed) -> None:
    from tests.seaweed import _free_ports
    (port,) = _free_ports(1)  # nothing listens there: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    remote = Remote(remote_url, connect_timeout_s=0.5, read_timeout_s=1, deadline_s=2)
    _assert_bounded_failure(lambda: remote.get("x"), 2.5, remote_url)
    assert remote.stats.retries >= 3  # retried with backoff, not given up at once


def test_hung_store_fails_in_bounded_time(remote_url: str, seaweed: Seaweed) -> None:
    """A stopped process still accepts connections (the kernel does) and never answers."""
    data = os.urandom(10_000)
    cid = _put(Remote(remote_url), data)
    reader = Remote(remote_url, connect_timeout_s=0.5, read_timeout_s=0.5, deadline_s=1)
    seaweed.pause()
    try:
        # deadline + one connect and one read timeout, and a second of slack for a busy machine
        _assert_bounded_failure(lambda: reader.read_content(cid, 0, 10), 3.0, remote_url)
        _assert_bounded_failure(lambda: reader.put_if_absent("y", b"1"), 3.0, remote_url)
    finally:
        seaweed.resume()
    assert reader.read_content(cid, 0, 10) == data[:10]  # back, the same client works


def test_stale_multipart_uploads_are_aborted(remote_url: str, seaweed: Seaweed) -> None:
    remote = Remote(remote_url)
    raw: Any = seaweed.client()
    key = remote.url.key("content/00/dangling")
    upload = raw.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    raw.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1000)
    assert remote.abort_stale_uploads(older_than_s=3600) == 0  # maybe another node's, live
    assert remote.abort_stale_uploads(older_than_s=0) == 1
    left = raw.list_multipart_uploads(Bucket=BUCKET, Prefix=remote.url.key("")).get("Uploads")
    assert not left


def test_bad_settings_are_one_line(remote_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(RemoteError, match="AWS_PROFILE names 'no-such-profile'.*fix AWS_PROFILE"):
        Remote(remote_url)
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:8333")  # no scheme
    with pytest.raises(RemoteError, match="fix AWS_ENDPOINT_URL"):
        Remote(remote_url)


def test_missing_bucket_is_named(remote_url: str) -> None:
    with pytest.raises(RemoteError, match="the bucket does not exist"):
        Remote("s3://no-such-bucket-hubfs/p").check()
