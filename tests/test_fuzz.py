"""Fuzzing every parser of bytes hubfs cannot trust: they answer or refuse, quickly, in bounded
memory, and never crash or hang.

The parsers and where their bytes come from:

- ``tensor_layout.parse_layout``: the header of any file written into the mount or imported.
- ``packs.parse_header`` / ``packs.scan``: pack files after bit rot, a torn write, or a copy
  from elsewhere (``verify`` and ``verify --repair`` rebuild from them).
- ``ChunkEntry``/``ContentTable``/``Inode.decode``: LMDB values after damage.
- ``compression.decode``: stored chunks; ``raw_len`` is the only size it may produce.
- the chunker: any file at all.

Each call is timed (``CALL_BUDGET_S``), reads from packs are counted through a wrapped
``os.pread``, and allocations of the decompression bombs are measured with tracemalloc.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import blake3
import pytest
import xxhash
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hubfs import chunking, packs
from hubfs.chunking import Chunker, ChunkerParams
from hubfs.compression import Codec, decode, encode
from hubfs.index import ChunkEntry, ContentTable, Inode
from hubfs.packs import (
    CHECK_BLOCK_BYTES,
    MAX_RECORD_RAW_BYTES,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_VERSION,
    RECORD_FIXED,
    RECORD_MAGIC,
    RECORD_VERSION,
    SUM,
    ChunkLocation,
    block_sums,
    encode_header,
    header_bytes,
    parse_header,
    scan,
    valid_end,
)
from hubfs.tensor_layout import DTYPE_WIDTH, HEADER_LEN, MAX_HEADER_BYTES, parse_layout

# A hang guard, not a speed target (work is bounded by counting reads, below): the slowest
# call, a scan through 256 KiB of record-magic lookalikes, takes 0.2-0.8 s on this machine
# and was seen at 1.2 s on a loaded one.
CALL_BUDGET_S = 10.0
FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The largest header a record can legally have.
MAX_HEADER_READ_BYTES = header_bytes(-(-(MAX_RECORD_RAW_BYTES + 1024) // CHECK_BLOCK_BYTES))
# The most scan may ask for in one read: a header, or a window searched for the next record
# after a damaged one (1 MiB today); never a payload, whatever a header claims.
SCAN_READ_MAX_BYTES = 2 * 1024 * 1024
# Bytes scan (and valid_end, a second pass) may read per byte of pack: linear work. The worst
# case is a record-magic lookalike every 4 bytes behind a damaged header, each costing a
# header probe (192 bytes) per pass: ~100. Re-reading a resync window per lookalike, as scan
# once did, costs ~16,000 per byte on 64 KiB and grows with the pack.
SCAN_READS_PER_BYTE = 128
# What a bomb may allocate while being refused: its input and raw_len, plus slack.
BOMB_ALLOC_BUDGET_BYTES = 16 * 1024 * 1024
# Errors a decoder may raise on bytes that are not a value of its kind.
DECODE_ERRORS = (ValueError, struct.error)


@contextmanager
def quick(what: object = "") -> Iterator[None]:
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    assert elapsed < CALL_BUDGET_S, f"{elapsed:.2f}s for {what!r:.200}"


def mutate(data: bytes, draw: st.DataObject) -> bytes:
    """Flip bytes, cut, or splice garbage into ``data``."""
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4), label="mutations")):
        kind = draw.draw(st.sampled_from(["flip", "cut", "insert", "overwrite"]))
        pos = draw.draw(st.integers(0, len(buf)))
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= draw.draw(st.integers(1, 255))
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = draw.draw(st.binary(min_size=1, max_size=64))
        elif kind == "overwrite":
            piece = draw.draw(st.binary(min_size=1, max_size=16))
            buf[pos : pos + len(piece)] = piece
    return bytes(buf)


# -- tensor_layout.parse_layout ---------------------------------------------------------------


def checked_layout(file: bytes, probe: int | None = None) -> list | None:
    """``parse_layout`` of ``file`` as the chunker calls it; checks the answer and what it read."""
    probe = len(file) if probe is None else probe
    asked: list[tuple[int, int]] = []

    def read(offset: int, length: int) -> bytes:
        asked.append((offset, length))
        return file[offset : offset + length]

    with quick(file[:64]):
        spans = parse_layout(file[:probe], len(file), read)
    for offset, length in asked:  # only ever the header, and never past the end of the file
        assert 0 <= offset and 0 <= length <= MAX_HEADER_BYTES and offset + length <= len(file)
    if spans is None:
        return None
    assert spans, "a layout has at least the header span"
    header_len = HEADER_LEN.unpack_from(file)[0]
    assert (spans[0].start, spans[0].end, spans[0].elem_width) == (0, 8 + header_len, 0)
    widths = set(DTYPE_WIDTH.values()) | {0}
    for before, after in itertools.pairwise(spans):
        assert before.end <= after.start, (before, after)
    for span in spans:
        assert 0 <= span.start <= span.end <= len(file), span
        assert span.elem_width in widths
    return spans


@FUZZ
@given(st.binary(max_size=4096), st.integers(0, 4096))
@example(b"", 0)
@example(b"\xff" * 8 + b"{", 9)
def test_layout_of_random_bytes(file: bytes, probe: int) -> None:
    checked_layout(file, probe)


@FUZZ
@given(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 600)), st.binary(max_size=600),
       st.integers(0, 700))
def test_layout_of_a_header_length_that_lies(claimed: int, rest: bytes, probe: int) -> None:
    checked_layout(HEADER_LEN.pack(claimed) + b"{" + rest, probe)


offsets = st.one_of(
    st.integers(0, 4096),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 8, -1]),
    st.floats(allow_nan=True), st.text(max_size=4), st.none(),
)
entries = st.one_of(
    st.fixed_dictionaries({
        "dtype": st.one_of(st.sampled_from(sorted(DTYPE_WIDTH) + ["F4", "", "BOOLEAN"]),
                           st.integers(), st.lists(st.integers(), max_size=2), st.none()),
        "shape": st.lists(st.integers(-5, 2**40), max_size=3),
        "data_offsets": st.one_of(st.lists(offsets, max_size=3),
                                  st.tuples(st.integers(0, 4096), st.integers(0, 4096)).map(list),
                                  offsets),
    }),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=3),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "w", "__metadata__", "x.weight"]), entries),
                max_size=8),
       st.integers(0, 4096), st.integers(-16, 16), st.integers(0, 2048))
def test_layout_of_adversarial_headers(items: list[tuple[str, Any]], data_len: int,
                                       len_error: int, probe: int) -> None:
    """Tensors with absurd, overflowing, overlapping or duplicated offsets (the JSON text keeps
    duplicate names: a parser sees the last), odd dtypes, and a length field a little off."""
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"
    body = text.encode()
    claimed = max(0, len(body) + len_error)
    checked_layout(HEADER_LEN.pack(claimed) + body + b"\0" * data_len, probe)


def test_layout_overlapping_and_duplicate_tensors_are_refused() -> None:
    def file(header: str, data_len: int = 64) -> bytes:
        return HEADER_LEN.pack(len(header)) + header.encode() + bytes(data_len)

    overlap = '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},' \
              '"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}'
    assert checked_layout(file(overlap)) is None
    same = '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},' \
           '"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    assert checked_layout(file(same)) is None
    duplicate = '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},' \
                '"a":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}}'
    spans = checked_layout(file(duplicate))
    assert spans is not None and len(spans) == 2  # the header, and the last "a" alone
    past_end = '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,65]}}'
    assert checked_layout(file(past_end)) is None
    overflow = '{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,' \
               '18446744073709551620]}}'
    assert checked_layout(file(overflow)) is None


@pytest.mark.parametrize("text", [
    "[" * 200_000 + "]" * 200_000,
    '{"a":' * 200_000 + "1" + "}" * 200_000,
    '{"t":{"dtype":"F32","data_offsets":[0,' + "[" * 100_000 + "]" * 100_000 + "]}}",
    '{"t":{"dtype":"F32","data_offsets":[0,1' + "0" * 50_000 + "]}}",  # a 50,000-digit int
    '{"t":{"dtype":"F32","data_offsets":[0,1e999999]}}',
    '{"t":' + '"' + "\\u0000" * 100_000 + '"}',
])
def test_layout_of_deep_or_huge_json_is_refused_fast(text: str) -> None:
    body = text.encode()
    for claimed in (len(body), len(body) - 1, 2**64 - 1):
        file = HEADER_LEN.pack(claimed) + body + bytes(64)
        assert checked_layout(file, probe=1024) is None


def test_layout_header_length_beyond_the_limit_is_never_read() -> None:
    """A header claiming the 100 MB limit plus one, in a file that would hold it: refused
    before any read; at the limit it is read once, through the callback, never more."""
    asked: list[int] = []

    def read(offset: int, length: int) -> bytes:
        asked.append(length)
        return b"{" + b" " * (length - 2) + b"}"

    head = HEADER_LEN.pack(MAX_HEADER_BYTES + 1) + b"{"
    with quick("over the limit"):
        assert parse_layout(head, 2**40, read) is None
    assert asked == []
    head = HEADER_LEN.pack(2**64 - 1) + b"{"
    assert parse_layout(head, 2**70, read) is None
    assert asked == []


# -- packs.parse_header and packs.scan --------------------------------------------------------


def record(payload: bytes, codec: Codec = Codec.RAW) -> bytes:
    return encode_header(blake3.blake3(payload).digest(), codec, len(payload), len(payload),
                         block_sums(payload)) + payload


def pack_bytes(payloads: list[bytes], pack_id: int = 7) -> bytes:
    return PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, pack_id) + b"".join(
        record(p) for p in payloads)


class CountingOs:
    """``os`` as seen by hubfs.packs, with every ``pread`` measured: the largest request (what
    it allocates) and the bytes it actually read."""

    def __init__(self) -> None:
        self.largest = 0
        self.total = 0

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        self.largest = max(self.largest, length)
        data = os.pread(fd, length, offset)
        self.total += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def scan_bytes(data: bytes, pack_id: int = 7) -> tuple[list[packs.ScannedRecord], CountingOs]:
    """``scan`` (and ``valid_end``) over ``data`` in a memfd, timed, with reads counted."""
    fd = os.memfd_create("pack")
    try:
        os.write(fd, data)
        counter = CountingOs()
        with mock.patch.object(packs, "os", counter), quick(data[:64]):
            records = list(scan(fd, pack_id))
            end = valid_end(fd)
        file_size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    assert counter.largest <= SCAN_READ_MAX_BYTES, counter.largest
    assert counter.total <= SCAN_READS_PER_BYTE * len(data) + 64 * 1024, counter.total
    pos = PACK_HEADER.size
    for rec in records:
        loc = rec.location
        assert loc.offset >= pos and loc.pack_id == pack_id
        assert loc.record_end <= file_size
        assert len(loc.sums) == -(-loc.stored_len // CHECK_BLOCK_BYTES)
        pos = loc.record_end
    assert end == (records[-1].location.record_end if records else PACK_HEADER.size)
    return records, counter


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 2**40))
@example(RECORD_MAGIC + bytes([RECORD_VERSION]) + bytes(200), 16)
def test_parse_header_of_random_bytes(buf: bytes, offset: int) -> None:
    with quick(buf):
        rec = parse_header(buf, 3, offset)
    if rec is not None:
        loc = rec.location
        assert loc.raw_len <= MAX_RECORD_RAW_BYTES
        assert len(loc.sums) == -(-loc.stored_len // CHECK_BLOCK_BYTES)
        assert len(buf) >= header_bytes(len(loc.sums))


long_runs = st.integers(1, 3 * CHECK_BLOCK_BYTES).map(lambda n: b"\x5a" * n)
payload_lists = st.lists(st.one_of(st.binary(max_size=300), long_runs), min_size=1, max_size=5)


@FUZZ
@given(payload_lists, st.data())
def test_parse_header_never_accepts_a_mutated_header_as_another_record(
        payloads: list[bytes], draw: st.DataObject) -> None:
    good = record(payloads[0])
    original = parse_header(good, 1, 16)
    assert original is not None
    head_len = header_bytes(len(original.location.sums))
    mutated = mutate(good[:head_len], draw) + good[head_len:]
    with quick(mutated[:64]):
        rec = parse_header(mutated, 1, 16)
    assert rec is None or rec == original


@FUZZ
@given(payload_lists, st.data())
def test_scan_of_mutated_packs_yields_only_intact_records(payloads: list[bytes],
                                                         draw: st.DataObject) -> None:
    data = pack_bytes(payloads)
    intact, _ = scan_bytes(data)
    assert [r.chunk_id for r in intact] == [blake3.blake3(p).digest() for p in payloads]
    records, _ = scan_bytes(mutate(data, draw))
    # whatever the mutation, scan yields only records that were written (their offsets may
    # shift where bytes were cut or inserted before them)
    written = {unplaced(r) for r in intact}
    for rec in records:
        assert unplaced(rec) in written, rec


def unplaced(rec: packs.ScannedRecord) -> tuple[object, ...]:
    loc = rec.location
    return rec.chunk_id, loc.codec, loc.raw_len, loc.stored_len, loc.sums


@FUZZ
@given(payload_lists, st.data())
def test_scan_skips_only_the_record_whose_header_is_damaged(payloads: list[bytes],
                                                            draw: st.DataObject) -> None:
    data = bytearray(pack_bytes(payloads))
    intact, _ = scan_bytes(bytes(data))
    victim = draw.draw(st.sampled_from(intact))
    loc = victim.location
    data[draw.draw(st.integers(loc.offset, loc.payload_offset - 1))] ^= draw.draw(
        st.integers(1, 255))
    records, _ = scan_bytes(bytes(data))
    assert records == [r for r in intact if r.location.offset != loc.offset]


@FUZZ
@given(st.binary(max_size=2048))
def test_scan_of_random_bytes(garbage: bytes) -> None:
    scan_bytes(garbage)
    scan_bytes(PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, 7) + garbage)


def lying_header(raw_len: int, stored_len: int, n: int, codec: int = 0) -> bytes:
    """A record header whose own checksum is right, whatever the lengths it claims."""
    head = RECORD_FIXED.pack(RECORD_MAGIC, RECORD_VERSION, codec, n, raw_len, stored_len,
                             b"\x11" * 32)
    head += b"".join(SUM.pack(i) for i in range(n))
    return head + SUM.pack(xxhash.xxh3_64_intdigest(head))


@pytest.mark.parametrize("raw_len,stored_len,n", [
    (2**32 - 1, 2**32 - 1, 65535),  # 4 GiB, as many sums as the field holds
    (2**32 - 1, 2**32 - 1, 0),
    (MAX_RECORD_RAW_BYTES, MAX_RECORD_RAW_BYTES, MAX_RECORD_RAW_BYTES // CHECK_BLOCK_BYTES),
    (MAX_RECORD_RAW_BYTES + 1, 100, 1),
    (100, MAX_RECORD_RAW_BYTES + 2048, 1026),
])
def test_scan_reads_headers_only_whatever_a_record_claims(raw_len: int, stored_len: int,
                                                          n: int) -> None:
    """A record claiming up to 4 GiB in a pack that does not hold it: scan reads the file's
    few bytes, never the claimed payload, allocates next to nothing, and goes on to the
    record after it."""
    data = pack_bytes([b"first record"]) + lying_header(raw_len, stored_len, n) + \
        record(b"last record")
    tracemalloc.start()
    try:
        records, counter = scan_bytes(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counter.total < 4 * len(data) + 64 * 1024, counter.total  # claims: 64 MiB, 4 GiB
    assert peak < 2 * SCAN_READ_MAX_BYTES, peak
    assert [r.chunk_id for r in records] == [blake3.blake3(b"first record").digest(),
                                             blake3.blake3(b"last record").digest()]


@pytest.mark.parametrize("flood_bytes", [64 * 1024, 256 * 1024])
def test_scan_resync_is_linear_in_magic_lookalikes(flood_bytes: int) -> None:
    """A raw payload full of record-magic lookalikes behind one damaged header: scan must find
    the record after it in time and reads linear in the pack's size (scan_bytes checks both)."""
    flood = b"HCK1" * (flood_bytes // 4)
    data = bytearray(pack_bytes([flood, b"after the flood"]))
    data[PACK_HEADER.size] ^= 1  # the flood record's header is damaged
    records, counter = scan_bytes(bytes(data))
    assert [r.chunk_id for r in records] == [blake3.blake3(b"after the flood").digest()]
    print(f"\n{flood_bytes} bytes of lookalikes: {counter.total / len(data):.0f} bytes read "
          "per byte of pack")


# -- index value decoders ---------------------------------------------------------------------


sums = st.lists(st.integers(0, 2**64 - 1), max_size=8).map(tuple)
chunk_entries = st.builds(
    lambda codec, pack, off, raw, stored, s, refs: ChunkEntry(
        ChunkLocation(pack, off, codec, raw, stored, s), refs),
    st.sampled_from(list(Codec)), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), sums, st.integers(0, 2**32 - 1))
content_tables = st.lists(st.tuples(st.binary(min_size=32, max_size=32),
                                    st.integers(0, 2**32 - 1)), max_size=8).map(
    lambda items: ContentTable(sum(n for _, n in items), tuple(c for c, _ in items),
                               tuple(n for _, n in items)))
inodes = st.builds(
    Inode, st.sampled_from([0o100644, 0o40755, 0o120777, 0o10644, 0o20600]),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**64 - 1))
DECODERS: dict[str, tuple[Callable[[bytes], object], st.SearchStrategy[Any]]] = {
    "chunk entry": (ChunkEntry.decode, chunk_entries),
    "content table": (ContentTable.decode, content_tables),
    "inode": (Inode.decode, inodes),
}


def decode_or_refuse(decoder: Callable[[bytes], object], raw: bytes) -> object | None:
    with quick(raw[:64]):
        try:
            return decoder(raw)
        except DECODE_ERRORS:
            return None


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=1024))
@example("chunk entry", bytes(26) + b"\xff\xff")  # claims 65535 sums, holds none
@example("content table", b"\x01" + bytes(8) + b"\xff\xff\xff\xff")  # claims 4G chunks
def test_index_decoders_on_random_bytes(name: str, raw: bytes) -> None:
    decode_or_refuse(DECODERS[name][0], raw)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_index_decoders_round_trip_and_survive_mutation(name: str, draw: st.DataObject) -> None:
    decoder, values = DECODERS[name]
    value = draw.draw(values)
    encoded = value.encode()  # type: ignore[attr-defined]
    assert decoder(encoded) == value
    decode_or_refuse(decoder, mutate(encoded, draw))


# -- compression.decode -----------------------------------------------------------------------


@FUZZ
@given(st.sampled_from(list(Codec)), st.binary(max_size=2048), st.integers(0, 1 << 20))
def test_decode_of_random_bytes_returns_raw_len_bytes_or_refuses(codec: Codec, stored: bytes,
                                                                 raw_len: int) -> None:
    with quick(stored[:64]):
        try:
            out = decode(stored, codec, raw_len)
        except ValueError:
            return
    assert len(out) == raw_len


@FUZZ
@given(st.sampled_from(list(Codec)), st.one_of(st.binary(max_size=3000),
                                                st.text(max_size=3000).map(str.encode)),
       st.data())
def test_decode_of_mutated_frames_never_gives_other_bytes(codec: Codec, data: bytes,
                                                          draw: st.DataObject) -> None:
    stored = bytes(encode(data, codec))
    assert decode(stored, codec, len(data)) == data
    raw_len = draw.draw(st.sampled_from([len(data), len(data) + 1, max(0, len(data) - 1)]))
    with quick(codec):
        try:
            out = decode(mutate(stored, draw), codec, raw_len)
        except ValueError:
            return
    assert len(out) == raw_len
    if codec != Codec.RAW and raw_len == len(data):  # a zstd frame carries its checksum
        assert out == data


def zstd_frame(content_size: int | None, blocks: int, block_bytes: int = 128 * 1024) -> bytes:
    """A hand-made zstd frame: ``blocks`` RLE blocks of ``block_bytes`` zero bytes each (four
    bytes apiece: a frame of 32 KiB inflates to 1 GiB), declaring ``content_size`` or not."""
    descriptor = 0xC0 if content_size is not None else 0x00  # 8-byte Frame_Content_Size
    out = struct.pack("<I", 0xFD2FB528) + bytes([descriptor, (27 - 10) << 3])  # window 128 MiB
    if content_size is not None:
        out += struct.pack("<Q", content_size)
    for i in range(blocks):
        last = int(i == blocks - 1)
        out += (last | (1 << 1) | (block_bytes << 3)).to_bytes(3, "little") + b"\0"
    if blocks == 0:
        out += (1 | (0 << 1) | (1 << 3)).to_bytes(3, "little") + b"x"  # one raw byte, last
    return out


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.ZSTD_PLANES4])
@pytest.mark.parametrize("frame", [
    pytest.param(lambda: zstd_frame(None, 8192), id="undeclared-size-inflates-1GiB"),
    pytest.param(lambda: zstd_frame(1 << 30, 8192), id="declares-and-inflates-1GiB"),
    pytest.param(lambda: zstd_frame(1 << 30, 0), id="declares-1GiB-holds-1-byte"),
    pytest.param(lambda: zstd_frame(1 << 40, 0), id="declares-1TiB"),
    pytest.param(lambda: zstd_frame((1 << 20) + 1, 8), id="declares-raw_len+1"),
    pytest.param(lambda: zstd_frame(1 << 20, 8192), id="declares-raw_len-inflates-1GiB"),
])
def test_zstd_bombs_are_bounded_by_raw_len(codec: Codec, frame: Callable[[], bytes]) -> None:
    """Frames of a few KiB that claim or inflate to far more than ``raw_len``: refused with
    ValueError, quickly, having allocated about ``raw_len``, not what the frame says."""
    stored = frame()
    raw_len = 1 << 20
    tracemalloc.start()
    try:
        with quick("bomb"), pytest.raises(ValueError):
            decode(stored, codec, raw_len)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BOMB_ALLOC_BUDGET_BYTES, f"refusing a {len(stored)}-byte frame took {peak} bytes"


# -- the chunker ------------------------------------------------------------------------------


SMALL = ChunkerParams(min_bytes=64, avg_bytes=256, max_bytes=1024)  # pyfastcdc's smallest


def assert_tiling(spans: list, size: int, params: ChunkerParams) -> None:
    pos = 0
    for span in spans:
        assert span.offset == pos and 1 <= span.length <= params.max_bytes, span
        pos += span.length
    assert pos == size


@FUZZ
@given(st.one_of(st.binary(max_size=20_000),
                 st.tuples(st.binary(min_size=1, max_size=32), st.integers(1, 600))
                 .map(lambda t: t[0] * t[1])),
       st.integers(SMALL.max_bytes, 8 * SMALL.max_bytes))
def test_chunker_tiles_random_input_and_windows_cut_as_one_pass(buf: bytes, window: int) -> None:
    chunker = Chunker(SMALL)
    with quick(buf[:64]):
        spans = chunker.spans(buf)
    assert_tiling(spans, len(buf), SMALL)
    with mock.patch.object(chunking, "WINDOW_BYTES", window):
        windowed = [span for span, _ in chunker.stream(lambda o, n: buf[o : o + n], len(buf))]
    assert windowed == spans


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]),
                          st.sampled_from(["F32", "F16", "U8", "I64", "X"]),
                          st.integers(-64, 5000), st.integers(-64, 5000)), max_size=6),
       st.binary(min_size=0, max_size=12_000), st.integers(-8, 8))
def test_chunker_on_safetensors_shaped_input(tensors: list[tuple[str, str, int, int]],
                                             body: bytes, len_error: int) -> None:
    """Headers whose tensors may overlap, run past the end or be empty: the chunks still tile
    the file, and when the layout is accepted every tensor boundary is a cut."""
    header = json.dumps({name: {"dtype": dtype, "shape": [1], "data_offsets": [lo, hi]}
                         for name, dtype, lo, hi in tensors}).encode()
    buf = HEADER_LEN.pack(max(0, len(header) + len_error)) + header + body
    with quick(buf[:64]):
        spans = Chunker(SMALL).spans(buf)
    assert_tiling(spans, len(buf), SMALL)
    layout = parse_layout(buf)
    if layout:
        cuts = {s.offset for s in spans} | {len(buf)}
        for span in layout:
            if span.end > span.start:
                assert span.start in cuts and span.end in cuts, span
