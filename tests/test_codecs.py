"""Codecs and pack records: any bytes round-trip; damage is an error, never wrong bytes.

Every ``Codec`` and every compression policy must give back exactly what went in. Corrupted
stored bytes must be caught: by zstd's frame checksum in ``decode``, and before that by the
per-block xxh3 sums of a pack record, which also guard raw chunks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hubfs import compression
from hubfs.compression import POLICIES, Codec, choose, decode, encode
from hubfs.errors import IntegrityError, StoreFullError
from hubfs.packs import (
    CHECK_BLOCK_BYTES,
    PACK_HEADER,
    PackFiles,
    PackWriter,
    parse_header,
    scan,
    valid_end,
)

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

payloads = st.one_of(
    st.binary(max_size=5000),
    # compressible: repeats of a short pattern, so zstd really encodes something
    st.tuples(st.binary(min_size=1, max_size=16), st.integers(1, 3000)).map(lambda t: t[0] * t[1]),
)


@FAST
@given(payloads, st.sampled_from(list(Codec)))
@example(b"", Codec.ZSTD_PLANES4)
@example(b"abc", Codec.ZSTD_PLANES4)  # shorter than one element
@example(b"abcde", Codec.ZSTD_PLANES2)  # odd tail
def test_every_codec_round_trips(data: bytes, codec: Codec) -> None:
    stored = encode(data, codec)
    assert decode(bytes(stored), codec, len(data)) == data
    assert decode(memoryview(bytes(stored)), codec, len(data)) == data


@FAST
@given(payloads, st.sampled_from([0, 1, 2, 3, 4, 8]), st.sampled_from(POLICIES))
def test_every_policy_round_trips(data: bytes, elem_width: int, policy: str) -> None:
    codec, stored = choose(data, elem_width, policy)
    assert decode(bytes(stored), codec, len(data)) == data
    if policy == "raw" or not data:
        assert codec == Codec.RAW
    # no policy ever stores a chunk bigger than it is
    assert len(stored) <= len(data)
    if policy == "auto" and codec != Codec.RAW:
        assert len(stored) <= (1 - compression.AUTO_MIN_SAVING) * len(data)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["random", "zeros", "fp32-weights", "fp16-weights", "text",
                                  "random-with-compressible-middle"])
def test_policies_on_large_chunks(policy: str, kind: str) -> None:
    """Chunks above the sampling threshold: the sample decides, the result still round-trips."""
    rng = np.random.default_rng(7)
    size = 3 * compression.SAMPLE_BYTES + 5
    width = 0
    if kind == "random":
        data = rng.bytes(size)
    elif kind == "zeros":
        data = bytes(size)
    elif kind == "fp32-weights":
        data, width = rng.normal(0, 0.02, size // 4).astype(np.float32).tobytes(), 4
    elif kind == "fp16-weights":
        data, width = rng.normal(0, 0.02, size // 2).astype(np.float16).tobytes(), 2
    elif kind == "text":
        data = b"".join(b'{"token_%d": %d},\n' % (i, i * 7) for i in range(size // 20))
    else:
        mid = size // 2
        data = rng.bytes(mid - 1000) + bytes(compression.SAMPLE_BYTES + 2000) + rng.bytes(mid)
    codec, stored = choose(data, width, policy)
    assert decode(bytes(stored), codec, len(data)) == data
    if policy == "raw" or kind == "random":
        assert codec == Codec.RAW
    if policy == "auto" and kind == "fp32-weights":
        # DESIGN.md: weights barely compress, so auto stores them raw for read speed
        assert codec == Codec.RAW
    if kind in ("zeros", "text") and policy != "raw":
        assert codec != Codec.RAW and len(stored) < len(data) / 5


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        choose(b"x" * 100, 0, "fastest")


@FAST
@given(payloads.filter(lambda d: len(d) > 0),
       st.sampled_from([Codec.ZSTD, Codec.ZSTD_PLANES2, Codec.ZSTD_PLANES4]), st.data())
def test_corrupted_zstd_payload_is_an_error_not_wrong_bytes(data: bytes, codec: Codec,
                                                            draw: st.DataObject) -> None:
    """A flipped byte in a zstd frame's blocks or checksum: ValueError, or (rarely, when the
    byte did not matter) the right bytes; never different bytes. Frame *header* damage is
    covered by ``test_decode_never_allocates_what_a_damaged_header_claims``."""
    stored = bytearray(encode(data, codec))
    first = zstandard.frame_header_size(bytes(stored))
    index = draw.draw(st.integers(first, len(stored) - 1))
    stored[index] ^= draw.draw(st.integers(1, 255))
    try:
        out = decode(bytes(stored), codec, len(data))
    except ValueError:
        return
    assert out == data


@FAST
@given(payloads.filter(lambda d: len(d) > 0),
       st.sampled_from([Codec.ZSTD, Codec.ZSTD_PLANES2, Codec.ZSTD_PLANES4]))
def test_truncated_or_mislabelled_frames_are_errors(data: bytes, codec: Codec) -> None:
    # (an empty chunk is never compressed: ``choose`` stores it raw)
    stored = bytes(encode(data, codec))
    with pytest.raises(ValueError):
        decode(stored[: len(stored) // 2], codec, len(data))
    with pytest.raises(ValueError):
        decode(stored, codec, len(data) + 1)
    with pytest.raises(ValueError):
        decode(stored, codec, len(data) - 1)


@FAST
@given(st.binary(max_size=2000).filter(lambda b: not b.startswith(b"\x28\xb5\x2f\xfd")),
       st.sampled_from([Codec.ZSTD, Codec.ZSTD_PLANES2, Codec.ZSTD_PLANES4]),
       st.integers(1, 10_000))
def test_garbage_is_a_value_error(garbage: bytes, codec: Codec, raw_len: int) -> None:
    with pytest.raises(ValueError):
        decode(garbage, codec, raw_len)


def test_decode_never_allocates_what_a_damaged_header_claims() -> None:
    data = b"abc" * 100
    stored = bytearray(encode(data, Codec.ZSTD))
    stored[4] ^= 0x80  # Frame_Content_Size_flag: 1 byte -> 8 bytes, read from the payload
    with pytest.raises(ValueError):
        decode(bytes(stored), Codec.ZSTD, len(data))


# -- pack records -----------------------------------------------------------------------------


def _chunk_id(data: bytes) -> bytes:
    import blake3

    return blake3.blake3(data).digest()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(payloads, st.sampled_from(list(Codec))), min_size=1, max_size=12),
       st.integers(200, 20_000))
def test_pack_records_round_trip_and_scan(records: list[tuple[bytes, Codec]],
                                          target: int) -> None:
    """Records read back through the index's view (locations) and through a scan alike;
    a small target seals packs as they fill."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        writer = PackWriter(directory, target_bytes=target)
        locations = []
        for data, codec in records:
            stored = bytes(encode(data, codec))
            locations.append((data, _chunk_id(data), writer.append(_chunk_id(data), codec,
                                                                    len(data), stored)))
        writer.close()
        packs = PackFiles(directory)
        try:
            for data, chunk_id, loc in locations:
                assert decode(packs.read_stored(chunk_id, loc), loc.codec, loc.raw_len) == data
            scanned = []
            for pack_id in sorted({loc.pack_id for _d, _c, loc in locations}):
                fd = packs.fd(pack_id)
                scanned += [(r.chunk_id, r.location) for r in scan(fd, pack_id)]
                assert valid_end(fd) == os.fstat(fd).st_size
            assert scanned == [(chunk_id, loc) for _d, chunk_id, loc in locations]
        finally:
            packs.close()


def test_partial_block_reads_check_only_what_they_touch(tmp_path: Path) -> None:
    data = np.random.default_rng(3).bytes(5 * CHECK_BLOCK_BYTES + 17)
    writer = PackWriter(tmp_path)
    loc = writer.append(_chunk_id(data), Codec.RAW, len(data), data)
    writer.close()
    # damage block 3
    with open(tmp_path / "00000001.pack", "r+b") as f:
        f.seek(loc.payload_offset + 3 * CHECK_BLOCK_BYTES + 5)
        f.write(b"\x00" if data[3 * CHECK_BLOCK_BYTES + 5] else b"\x01")
    packs = PackFiles(tmp_path)
    try:
        assert packs.read_blocks(_chunk_id(data), loc, 0, 3) == data[: 3 * CHECK_BLOCK_BYTES]
        assert packs.read_blocks(_chunk_id(data), loc, 4, 6) == data[4 * CHECK_BLOCK_BYTES :]
        for first, last in [(3, 4), (2, 4), (0, 6)]:
            with pytest.raises(IntegrityError, match="checksum mismatch in block 3"):
                packs.read_blocks(_chunk_id(data), loc, first, last)
    finally:
        packs.close()


def test_missing_pack_is_an_integrity_error(tmp_path: Path) -> None:
    writer = PackWriter(tmp_path)
    loc = writer.append(_chunk_id(b"x"), Codec.RAW, 1, b"x")
    writer.close()
    os.unlink(tmp_path / "00000001.pack")
    packs = PackFiles(tmp_path)
    with pytest.raises(IntegrityError, match="missing"):
        packs.read_stored(_chunk_id(b"x"), loc)
    packs.close()


@pytest.mark.allow_warnings
def test_torn_tail_is_left_alone_on_reopen(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    """A crash mid-append leaves a torn record: reopening never cuts it (damage can make intact
    records look torn), appends go on in a new pack, and the intact records stay readable."""
    writer = PackWriter(tmp_path)
    first = writer.append(_chunk_id(b"a" * 100), Codec.RAW, 100, b"a" * 100)
    second = writer.append(_chunk_id(b"b" * 100), Codec.RAW, 100, b"b" * 100)
    writer.close()
    path = tmp_path / "00000001.pack"
    os.truncate(path, second.record_end - 10)  # a crash mid-append
    writer = PackWriter(tmp_path)
    assert path.stat().st_size == second.record_end - 10
    assert any("not an intact record" in r.getMessage() for r in caplog.records)
    third = writer.append(_chunk_id(b"c"), Codec.RAW, 1, b"c")
    writer.close()
    assert third.pack_id == 2
    packs = PackFiles(tmp_path)
    assert packs.read_stored(_chunk_id(b"c"), third) == b"c"
    assert packs.read_stored(_chunk_id(b"a" * 100), first) == b"a" * 100
    assert [r.chunk_id for r in scan(packs.fd(1), 1)] == [_chunk_id(b"a" * 100)]
    packs.close()


@FAST
@given(st.binary(max_size=400))
@example(b"HCK1" + bytes(44))
@example(b"HCK1\x01\x00\xff\xff" + bytes(40))
def test_parse_header_never_raises(buf: bytes) -> None:
    assert parse_header(buf, 1, PACK_HEADER.size) is None or len(buf) >= 56


@FAST
@given(st.binary(max_size=3000))
def test_scan_of_garbage_never_raises(garbage: bytes) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(garbage)
        f.flush()
        assert list(scan(f.fileno(), 1)) == [] or garbage.startswith(b"HUBFSPAK")
        valid_end(f.fileno())


def test_full_disk_during_append_keeps_no_partial_record(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC mid-record: StoreFullError, and the pack is cut back to its last whole record."""
    import errno

    from hubfs import packs as packs_mod

    writer = PackWriter(tmp_path)
    good = writer.append(_chunk_id(b"ok"), Codec.RAW, 2, b"ok")
    real = packs_mod.os.pwritev

    def full(fd: int, buffers: list, offset: int) -> int:
        real(fd, [memoryview(buffers[0])[:7]], offset)  # a torn write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packs_mod.os, "pwritev", full)
    with pytest.raises(StoreFullError, match="no space"):
        writer.append(_chunk_id(b"big"), Codec.RAW, 3, b"big")
    monkeypatch.setattr(packs_mod.os, "pwritev", real)
    assert (tmp_path / "00000001.pack").stat().st_size == good.record_end
    after = writer.append(_chunk_id(b"next"), Codec.RAW, 4, b"next")
    writer.close()
    assert after.offset == good.record_end
