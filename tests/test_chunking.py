"""Chunking and the safetensors header parser, as properties over arbitrary bytes.

Chunks must tile any input exactly, respect the size bounds, and be a pure function of the
bytes (that is what makes them dedupe). The header parser reads untrusted bytes: whatever it is
given, it answers ``None`` or a well-formed layout, and never raises.
"""

from __future__ import annotations

import itertools
import json
import random
import struct
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyfastcdc.cy import FastCDC

from hubfs import chunking
from hubfs.chunking import Chunker, ChunkerParams, ChunkSpan
from hubfs.tensor_layout import DTYPE_WIDTH, MAX_HEADER_BYTES, TensorSpan, parse_layout

from .engine_helpers import MODEL_FILE, ST_DTYPES, safetensors_bytes

# The smallest sizes pyfastcdc accepts, so that a few KB of input already makes many chunks.
SMALL = ChunkerParams(min_bytes=64, avg_bytes=256, max_bytes=1024)
FAST = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Bytes with long runs and repeats (which CDC cuts at max size) as well as noise.
data_bytes = st.one_of(
    st.binary(max_size=12_000),
    st.lists(st.tuples(st.binary(min_size=1, max_size=64), st.integers(1, 200)), max_size=30)
    .map(lambda parts: b"".join(piece * n for piece, n in parts)),
)


def segment_ends(buf: bytes) -> list[int]:
    """Where a chunk must end: the end of the header and of every non-empty tensor."""
    layout = parse_layout(buf)
    if not layout:
        return [len(buf)] if buf else []
    ends = sorted({s.end for s in layout if s.end > s.start} | {len(buf)})
    # a gap before a tensor is its own segment, so its start is an end too
    ends = sorted(set(ends) | {s.start for s in layout if s.start > 0})
    return ends


def assert_tiles(spans: list[ChunkSpan], buf: bytes, params: ChunkerParams) -> None:
    """Spans are contiguous from 0 to len(buf); sizes within bounds except a segment's last."""
    pos = 0
    ends = segment_ends(buf)
    for span in spans:
        assert span.offset == pos, f"gap or overlap at {pos}: {span}"
        assert 1 <= span.length <= params.max_bytes, span
        pos += span.length
        if pos not in ends:
            # not the last chunk of its segment: FastCDC's minimum holds
            assert span.length >= params.min_bytes, span
        # no chunk straddles a tensor boundary
        assert not any(span.offset < end < pos for end in ends), (span, ends)
    assert pos == len(buf)


# -- chunking ---------------------------------------------------------------------------------


def test_empty_buffer_has_no_chunks() -> None:
    assert Chunker(SMALL).spans(b"") == []
    assert Chunker(ChunkerParams()).spans(b"") == []
    assert list(Chunker(SMALL).stream(lambda o, n: b"", 0)) == []


@FAST
@given(data_bytes)
@example(b"")
@example(b"x")
@example(b"\0" * 5000)
def test_spans_tile_any_buffer(buf: bytes) -> None:
    spans = Chunker(SMALL).spans(buf)
    assert_tiles(spans, buf, SMALL)
    # deterministic: a fresh chunker and another buffer type cut the same way
    assert Chunker(SMALL).spans(memoryview(bytearray(buf))) == spans


@FAST
@given(data_bytes.filter(lambda b: len(b) > 0))
def test_buffer_of_exactly_one_chunk(buf: bytes) -> None:
    """A buffer that ends exactly at a cut point is one chunk; every prefix ending at a cut
    chunks as the whole buffer does up to there (cut points depend only on preceding bytes)."""
    chunker = Chunker(SMALL)
    spans = chunker.spans(buf)
    first = spans[0]
    assert chunker.spans(buf[: first.length]) == [ChunkSpan(0, first.length, first.elem_width)]
    for k, span in enumerate(spans):
        end = span.offset + span.length
        if parse_layout(buf[:end]) is None and parse_layout(buf) is None:
            assert chunker.spans(buf[:end]) == spans[: k + 1]


@pytest.mark.parametrize("size", [1, SMALL.min_bytes, SMALL.min_bytes + 1, SMALL.avg_bytes,
                                  SMALL.max_bytes])
def test_buffers_up_to_max_size_are_one_chunk_or_cut_within_bounds(size: int) -> None:
    rng = np.random.default_rng(size)
    buf = b"\x01" + rng.bytes(size - 1)  # byte 8 is not "{": never sniffed as safetensors
    spans = Chunker(SMALL).spans(buf)
    assert_tiles(spans, buf, SMALL)
    if size <= SMALL.min_bytes:
        assert spans == [ChunkSpan(0, size, 0)]
    if size == SMALL.max_bytes:  # one byte more cannot be one chunk
        assert len(Chunker(SMALL).spans(buf + b"\x02")) >= 2


def test_default_parameters_tile_a_large_buffer() -> None:
    params = ChunkerParams()
    buf = np.random.default_rng(1).bytes(9 * 1024 * 1024 + 123)
    spans = Chunker(params).spans(buf)
    assert_tiles(spans, buf, params)
    assert len(spans) > 5


def test_insertion_shifts_only_nearby_chunks() -> None:
    """The point of CDC: 100 bytes inserted mid-file leave almost every chunk unchanged."""
    rng = np.random.default_rng(2)
    buf = rng.bytes(200_000)
    edited = buf[:100_000] + rng.bytes(100) + buf[100_000:]
    chunker = Chunker(SMALL)

    def pieces(b: bytes) -> set[bytes]:
        return {b[s.offset : s.offset + s.length] for s in chunker.spans(b)}

    before, after = pieces(buf), pieces(edited)
    assert len(after - before) <= 4, len(after - before)


@FAST
@given(data_bytes, st.integers(min_value=SMALL.max_bytes + 1, max_value=4 * SMALL.max_bytes))
def test_stream_in_windows_cuts_as_one_pass(buf: bytes, window: int) -> None:
    """``stream`` chunks a file window by window; the result must not depend on the window."""
    chunker = Chunker(SMALL)
    whole = chunker.spans(buf)
    with mock.patch.object(chunking, "WINDOW_BYTES", window):
        streamed = list(chunker.stream(lambda o, n: buf[o : o + n], len(buf)))
    assert [span for span, _data in streamed] == whole
    for span, data in streamed:
        assert bytes(data) == buf[span.offset : span.offset + span.length]


@FAST
@given(data_bytes.filter(lambda b: len(b) > 0), st.data())
def test_stream_of_a_file_that_shrinks_covers_what_is_left(buf: bytes,
                                                          data: st.DataObject) -> None:
    """A file cut short while being read yields chunks covering exactly the bytes it had."""
    left = data.draw(st.integers(0, len(buf) - 1))
    short = buf[:left]
    with mock.patch.object(chunking, "WINDOW_BYTES", 2 * SMALL.max_bytes):
        spans = [span for span, _ in
                 Chunker(SMALL).stream(lambda o, n: short[o : o + n], len(buf))]
    pos = 0
    for span in spans:
        assert span.offset == pos and span.length > 0
        pos += span.length
    assert pos == left


# -- safetensors: tensor cuts -----------------------------------------------------------------

DTYPES = [np.dtype(d) for d in ("float32", "float16", "int64", "int8", "uint8", "bool",
                                "float64", "int32", "int16")]


@st.composite
def tensor_lists(draw: st.DrawFn, max_tensors: int = 8) -> list[tuple[str, np.ndarray]]:
    n = draw(st.integers(0, max_tensors))
    names = draw(st.lists(st.text("abcdefghij._", min_size=1, max_size=12), min_size=n,
                          max_size=n, unique=True))
    out = []
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        count = draw(st.integers(0, 700))
        raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        arr = np.frombuffer(raw, dtype=np.uint8).view(dtype) if dtype != np.bool_ else \
            (np.frombuffer(raw, dtype=np.uint8) & 1).astype(np.bool_)
        out.append((name, arr))
    return out


@FAST
@given(tensor_lists(), st.one_of(st.none(), st.dictionaries(st.text(max_size=8),
                                                            st.text(max_size=40), max_size=3)))
def test_layout_of_a_safetensors_file(tensors: list[tuple[str, np.ndarray]],
                                      metadata: dict[str, str] | None) -> None:
    buf = safetensors_bytes(tensors, metadata)
    layout = parse_layout(buf)
    assert layout is not None
    (header_len,) = struct.unpack_from("<Q", buf)
    data_start = 8 + header_len
    assert layout[0] == TensorSpan(0, data_start, 0)
    expected = []
    pos = data_start
    for _name, arr in tensors:
        expected.append(TensorSpan(pos, pos + arr.nbytes, DTYPE_WIDTH[ST_DTYPES[arr.dtype]]))
        pos += arr.nbytes
    def key(s: TensorSpan) -> tuple[int, int, int]:
        return (s.start, s.end, s.elem_width)

    assert sorted(layout[1:], key=key) == sorted(expected, key=key)
    # the chunker cuts at every tensor boundary and carries each tensor's element width
    spans = Chunker(SMALL).spans(buf)
    assert_tiles(spans, buf, SMALL)
    for tensor in expected:
        if tensor.end > tensor.start:
            inside = [s for s in spans if tensor.start <= s.offset < tensor.end]
            assert inside[0].offset == tensor.start
            assert all(s.elem_width == tensor.elem_width for s in inside)
    # safetensors itself reads what we wrote
    from safetensors.numpy import load
    loaded = load(buf)
    assert set(loaded) == {name for name, _ in tensors}


@FAST
@given(tensor_lists(max_tensors=6), st.randoms(use_true_random=False),
       st.dictionaries(st.text(max_size=8), st.text(max_size=200), max_size=3))
def test_identical_tensors_dedupe_whatever_the_order_and_header(
        tensors: list[tuple[str, np.ndarray]], rnd: object, metadata: dict[str, str]) -> None:
    """Reordering tensors or changing ``__metadata__`` changes only the header's chunks."""
    first = safetensors_bytes(tensors)
    shuffled = list(tensors)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    second = safetensors_bytes(shuffled, metadata)
    chunker = Chunker(SMALL)

    def tensor_chunks(buf: bytes) -> set[bytes]:
        layout = parse_layout(buf)
        assert layout is not None
        data_start = layout[0].end
        return {buf[s.offset : s.offset + s.length] for s in chunker.spans(buf)
                if s.offset >= data_start}

    assert tensor_chunks(second) == tensor_chunks(first)


# -- safetensors: the parser on garbage -------------------------------------------------------

def assert_none_or_sound(buf: bytes) -> None:
    """The parser's contract on any bytes: no exception; ``None`` or a sane, sorted layout."""
    layout = parse_layout(buf)
    if layout is None:
        return
    assert layout[0].start == 0 and layout[0].end <= len(buf)
    for before, after in itertools.pairwise(layout):
        assert after.start >= before.end
        assert after.start <= after.end <= len(buf)


def header_file(header: bytes | str, body: bytes = b"", length: int | None = None) -> bytes:
    text = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + body


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=4000))
@example(b"")
@example(b"\x02\0\0\0\0\0\0\0{}")  # a valid file with no tensors at all
def test_random_bytes_never_raise(buf: bytes) -> None:
    assert_none_or_sound(buf)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=6), st.binary(max_size=600),
       st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_arbitrary_json_headers_never_raise(header: dict, body: bytes,
                                            length: int | None) -> None:
    text = json.dumps(header)
    assert_none_or_sound(header_file(text, body, length))
    # truncated anywhere: still no exception
    whole = header_file(text, body, length)
    assert_none_or_sound(whole[: len(whole) // 2])


@st.composite
def bad_entries(draw: st.DrawFn) -> object:
    """A tensor entry that makes the file not a safetensors file."""
    return draw(st.one_of(
        json_values.filter(lambda v: not isinstance(v, dict)),
        st.just({}),
        st.just({"dtype": "F32"}),
        st.fixed_dictionaries({"data_offsets": json_values.filter(
            lambda v: not (isinstance(v, list) and len(v) == 2
                           and all(type(x) is int for x in v)))}),
        st.fixed_dictionaries({"data_offsets": st.tuples(st.integers(-(2**40), -1),
                                                         st.integers(0, 10)).map(list)}),
        st.fixed_dictionaries({"data_offsets": st.tuples(st.integers(5, 100),
                                                         st.integers(0, 4)).map(list)}),
        st.fixed_dictionaries({"data_offsets": st.tuples(st.integers(0, 10),
                                                         st.integers(10**6, 2**80)).map(list)}),
        st.fixed_dictionaries({"data_offsets": st.just([True, 4])}),
        st.fixed_dictionaries({"data_offsets": st.just([0.0, 4.0])}),
    ))


@settings(max_examples=100, deadline=None)
@given(bad_entries(), st.binary(min_size=0, max_size=200))
def test_bad_tensor_entries_give_none(entry: object, body: bytes) -> None:
    good = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    buf = header_file(json.dumps({"ok": good, "bad": entry}), b"\0" * 4 + body)
    assert parse_layout(buf) is None


@pytest.mark.parametrize("buf", [
    pytest.param(header_file("{}", length=2**64 - 1), id="length-2**64-1"),
    pytest.param(header_file("{}", length=MAX_HEADER_BYTES + 1) + b" " * 64, id="over-cap"),
    pytest.param(header_file("{}", length=0), id="length-zero"),
    pytest.param(header_file('{"a": {"dtype": "F32", "data_offsets": [0, 4]}}')[:-3],
                 id="truncated-header"),
    pytest.param(header_file('{"a": {"dtype": "F32", "data_offsets": [0, 4]}}', b"\0\0"),
                 id="tensor-past-end"),
    pytest.param(header_file("[1, 2, 3]"), id="json-array"),
    pytest.param(header_file('"text"'), id="json-string"),
    pytest.param(header_file("12"), id="json-number"),
    pytest.param(header_file("null"), id="json-null"),
    pytest.param(header_file("{} trailing"), id="trailing-garbage"),
    pytest.param(header_file("{" * 100_000), id="deep-nesting"),
    pytest.param(header_file('{"a": ' * 50_000 + "1" + "}" * 50_000), id="deep-objects"),
    pytest.param(header_file('{"a": {"data_offsets": [0, 1' + "0" * 5000 + "]}}"),
                 id="int-too-long-for-python"),
    pytest.param(header_file(b"{\xff\xfe\x00}"), id="not-utf8"),
    pytest.param(header_file('{"a": {"dtype": "F32", "data_offsets": [0, 8]}, '
                             '"b": {"dtype": "F32", "data_offsets": [4, 12]}}', b"\0" * 12),
                 id="overlapping"),
    pytest.param(header_file('{"a": {"dtype": "F32", "data_offsets": [8, 4]}}', b"\0" * 8),
                 id="reversed-offsets"),
    pytest.param(b"\x05\0\0\0\0\0\0\0{", id="nine-bytes"),
    pytest.param(b"\x02\0\0\0\0\0\0\0", id="length-only"),
])
def test_malformed_headers_give_none(buf: bytes) -> None:
    assert parse_layout(buf) is None
    # and chunking falls back to plain CDC over the whole file
    spans = Chunker(SMALL).spans(buf)
    assert sum(s.length for s in spans) == len(buf)
    assert all(s.elem_width == 0 for s in spans)


def test_odd_dtypes_do_not_reject_the_file() -> None:
    """An unknown or non-string dtype only loses the codec hint, not the tensor cuts."""
    header = {"a": {"dtype": ["F32"], "data_offsets": [0, 4]},
              "b": {"dtype": {"x": 1}, "data_offsets": [4, 8]},
              "c": {"dtype": "F12", "data_offsets": [8, 12]},
              "__metadata__": [1, 2]}
    buf = header_file(json.dumps(header), b"\0" * 12)
    layout = parse_layout(buf)
    assert layout is not None and [s.elem_width for s in layout] == [0, 0, 0, 0]


@FAST
@given(tensor_lists(max_tensors=4), st.data())
def test_long_header_read_through_callback(tensors: list[tuple[str, np.ndarray]],
                                           data: st.DataObject) -> None:
    """Given only the first bytes, the parser fetches the rest of the header via ``read``;
    a ``read`` that comes back short (the file shrank) gives ``None``, not an exception."""
    buf = safetensors_bytes(tensors, {"pad": "x" * data.draw(st.integers(0, 3000))})
    head_len = data.draw(st.integers(10, len(buf)))
    calls: list[tuple[int, int]] = []

    def read(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return buf[offset : offset + length]

    assert parse_layout(buf[:head_len], len(buf), read) == parse_layout(buf)
    cut = data.draw(st.integers(0, len(buf)))
    layout = parse_layout(buf[:head_len], len(buf), lambda o, n: buf[:cut][o : o + n])
    assert layout is None or layout == parse_layout(buf)
    # with no callback, a header longer than the head is not guessed at
    if 8 + struct.unpack_from("<Q", buf)[0] > head_len:
        assert parse_layout(buf[:head_len], len(buf)) is None


def test_real_model_layout_matches_safetensors() -> None:
    from safetensors import safe_open

    buf = MODEL_FILE.read_bytes()
    layout = parse_layout(buf)
    assert layout is not None
    with safe_open(str(MODEL_FILE), "np") as f:
        names = list(f.keys())
    assert len(layout) == 1 + len(names)
    spans = Chunker(ChunkerParams()).spans(buf)
    starts = {s.offset for s in spans}
    assert all(t.start in starts for t in layout if t.end > t.start)
    assert {s.elem_width for s in spans} == {0, 4, 8}


@pytest.mark.parametrize("layout", [[("z", 3_000_000)], [("z", 700_000), ("r", 900_000),
                                                         ("z", 5_000_000), ("r", 10)]])
def test_holes_cut_as_cdc_cuts_them(layout: list[tuple[str, int]]) -> None:
    """Windows of zeros (holes of sparse files) skip CDC and hashing: cut the same all the
    same, in windows small enough that whole windows are zeros."""
    rng = random.Random(5)
    buf = b"".join(bytes(n) if kind == "z" else rng.randbytes(n) for kind, n in layout)
    chunker = Chunker(SMALL)
    expected = [(c.offset, c.length) for c in FastCDC(
        avg_size=SMALL.avg_bytes, min_size=SMALL.min_bytes,
        max_size=SMALL.max_bytes).cut_buf(buf)]
    view = memoryview(buf)
    spans = list(chunker.stream(lambda o, n: view[o : o + n], len(buf),
                                window_bytes=2 * SMALL.max_bytes))
    assert [(s.offset, s.length) for s, _ in spans] == expected
    assert any(s.zero for s, _ in spans)
    assert all(s.zero == (not any(data)) for s, data in spans if s.zero)
