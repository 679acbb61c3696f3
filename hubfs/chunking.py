"""Content-defined chunking: where a file's bytes are cut into chunks.

FastCDC (pyfastcdc, Cython) finds cut points from the content, so an insertion does not shift
every later chunk. Safetensors files are first split at tensor boundaries from their header, and
CDC runs inside each tensor: an identical tensor then becomes identical chunks wherever it sits.
The parameters are recorded in the store at ``init`` and never change for that store, because
other parameters would cut the same bytes differently and silently stop deduplicating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import blake3
from pyfastcdc.cy import FastCDC

from .tensor_layout import HEADER_LEN, HEADER_PROBE_BYTES, TensorSpan, parse_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC sizes. pyfastcdc's mean chunk is about ``avg_bytes + min_bytes``."""

    min_bytes: int = 256 * 1024
    avg_bytes: int = 768 * 1024
    max_bytes: int = 4 * 1024 * 1024
    algorithm: str = "fastcdc2020-nc1"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChunkerParams:
        return cls(**data)


@dataclass(frozen=True)
class ChunkSpan:
    """A chunk's place in its file; ``elem_width`` hints the codec (0: not a known tensor)."""

    offset: int
    length: int
    elem_width: int
    zero: bool = field(default=False, compare=False)  # all zeros (a hole of a sparse file)


class Skip(Protocol):
    """What a caller of ``Chunker.stream`` already knows about a file being chunked again."""

    def __call__(self, pos: int, limit: int, elem_width: int) -> tuple[int, int]:
        """At final cut ``pos``: take whatever chunks are known from there (ending at or
        before ``limit``, the end of the tensor or file) and return where chunking resumes
        and how many bytes it should read next."""
        ...

    def wants(self, pos: int, limit: int) -> bool:
        """Whether a call at final cut ``pos`` would take chunks (cheap: asked per chunk)."""
        ...


# Bytes read first to tell a safetensors file from any other (its length, then "{").
SNIFF_BYTES = HEADER_LEN.size + 2
# Bytes chunked per step when streaming a file: bounds memory whatever the file size.
WINDOW_BYTES = 64 * 1024 * 1024
# Where a still-growing file ends, as far as chunking knows.
UNKNOWN_END = 1 << 62


def _all_zeros(data: memoryview) -> bool:
    """Whether ``data`` holds only zero bytes. Real data shows a non-zero byte among the
    first, middle and last at once, so numpy (whose import costs 0.13 s per CLI command and
    stalled a daemon's first commits for a second) is imported only for data that may be a
    hole."""
    if not data or data[0] or data[len(data) // 2] or data[-1]:
        return not data
    import numpy as np

    return not np.frombuffer(data, np.uint8).any()


class Chunker:
    """Cuts files into chunks; one instance per thread (pyfastcdc objects are not shared)."""

    def __init__(self, params: ChunkerParams) -> None:
        if params.algorithm != ChunkerParams.algorithm:
            raise ValueError(f"unknown chunking algorithm {params.algorithm!r}")
        self.params = params
        self._cdc = FastCDC(
            avg_size=params.avg_bytes, min_size=params.min_bytes, max_size=params.max_bytes
        )
        # CDC restarts at each cut, so zeros are cut into equal pieces: found once, here.
        self._zero_cut = next(iter(self._cdc.cut_buf(bytes(2 * params.max_bytes)))).length
        zero_chunk_id(self._zero_cut)

    def _cuts(self, data: memoryview) -> tuple[list[tuple[int, int]], bool]:
        """(offset, length) of the CDC chunks of ``data``, and whether it is all zeros (a hole
        in a sparse file: cut without running CDC, and named without hashing)."""
        if _all_zeros(data):
            whole, rest = divmod(len(data), self._zero_cut)
            lengths = [self._zero_cut] * whole + ([rest] if rest else [])
            return [(i * self._zero_cut, n) for i, n in enumerate(lengths)], True
        return [(cut.offset, cut.length) for cut in self._cdc.cut_buf(data)], False

    def spans(self, buf: memoryview | bytes) -> list[ChunkSpan]:
        """Chunks covering ``buf`` exactly, in order, cut at tensor boundaries where known."""
        view = memoryview(buf)
        return [span for span, _data in self.stream(lambda o, n: view[o : o + n], len(view))]

    def header_end(self, read: Callable[[int, int], bytes | memoryview], size: int) -> int:
        """Where the first tensor starts in a safetensors file (0 for any other file): a
        change before it may move every tensor boundary."""
        layout = _layout(read, size, True)
        return layout[0].end if layout else 0

    @property
    def zero_cut(self) -> int:
        """Length of every CDC chunk that starts at a cut and is all zeros."""
        return self._zero_cut

    def stream(self, read: Callable[[int, int], bytes | memoryview], size: int,
               start: int = 0, final: bool = True, window_bytes: int = WINDOW_BYTES,
               skip: Skip | None = None) -> Iterator[tuple[ChunkSpan, memoryview]]:
        """Chunks of a file of ``size`` bytes read through ``read(offset, length)``.

        Each window is cut by CDC and every chunk but the window's last is final: FastCDC's cut
        points depend only on the bytes since the previous cut, so restarting at a final cut
        (``start``) cuts exactly as one pass over the whole file would. A short read ends the
        file there. With ``final`` False the file is still growing: the chunk running into the
        end of what is written is held back, and tensor boundaries come from the header even
        where the tensors are not written yet.

        ``skip`` (only with ``final``) is asked at every final cut whether the caller already
        knows the chunks from there (stored chunks of unchanged bytes, zeros of a hole); see
        ``Skip``. Chunking goes on where it says, so a file with a few scattered changes is
        read only around them.
        """
        for seg in self._segments(read, size, final):
            if seg.end <= start:
                continue
            pos = max(seg.start, start)
            avail = min(seg.end, size)
            while pos < avail:
                want = window_bytes
                if skip is not None:
                    pos, want = skip(pos, avail, seg.elem_width)
                    if pos >= avail:
                        break
                end = min(pos + max(want, 1), avail)
                data = memoryview(read(pos, end - pos))
                if not data:
                    return
                if len(data) < end - pos:  # the file shrank meanwhile: it ends here
                    end = avail = pos + len(data)
                    if final:
                        seg = TensorSpan(seg.start, end, seg.elem_width)
                cuts, zero = self._cuts(data)
                growing = end == avail < seg.end
                if end < seg.end and (len(cuts) > 1 or growing):
                    cuts.pop()  # runs to the edge of what was read, not to a real cut point
                for offset, length in cuts:
                    yield (ChunkSpan(pos + offset, length, seg.elem_width, zero),
                           data[offset : offset + length])
                    if skip is not None and skip.wants(pos + offset + length, avail):
                        pos += offset + length  # a final cut: the caller takes it from here
                        break
                else:
                    pos += sum(length for _, length in cuts)
                if growing:
                    return

    def _segments(self, read: Callable[[int, int], bytes | memoryview], size: int,
                  final: bool) -> list[TensorSpan]:
        if size == 0:
            return []
        end = size if final else UNKNOWN_END
        layout = _layout(read, size, final)
        if not layout:
            return [TensorSpan(0, end, 0)]
        segments: list[TensorSpan] = []
        pos = 0
        for span in layout:
            if span.start == span.end:
                continue
            if span.start > pos:
                segments.append(TensorSpan(pos, span.start, 0))
            segments.append(span)
            pos = span.end
        if pos < end:
            segments.append(TensorSpan(pos, end, 0))
        return segments


def _layout(read: Callable[[int, int], bytes | memoryview], size: int, complete: bool
            ) -> list[TensorSpan] | None:
    """``parse_layout`` of a file, reading its first bytes before the whole probe: most files
    are not safetensors, and re-chunking a change should not read the file's first MiB."""
    head = read(0, min(size, SNIFF_BYTES))
    if len(head) < SNIFF_BYTES or head[HEADER_LEN.size] != ord("{"):
        return parse_layout(head, size, read, complete)  # None: not a safetensors file
    return parse_layout(read(0, min(size, HEADER_PROBE_BYTES)), size, read, complete)


def zeros(length: int) -> bytes | memoryview:
    """``length`` zero bytes without allocating them when they fit ``_ZEROS`` (holes are read
    as slices of it: a read or a chunking window is at most that long)."""
    return _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)


_ZEROS = memoryview(bytes(WINDOW_BYTES))  # calloc'd: pages never written cost no memory


def zero_chunk_id(length: int) -> bytes:
    """The id of a chunk of ``length`` zeros (holes of sparse files are made of them)."""
    chunk_id = _ZERO_IDS.get(length)
    if chunk_id is None:
        if len(_ZERO_IDS) >= ZERO_IDS_KEPT:
            _ZERO_IDS.clear()
            _ZERO_LENGTHS.clear()
        chunk_id = blake3.blake3(zeros(length)).digest()
        _ZERO_LENGTHS[chunk_id] = length
        _ZERO_IDS[length] = chunk_id
    return chunk_id


def known_zero_chunk(chunk_id: bytes) -> bool:
    """Whether ``chunk_id`` is a chunk of zeros this process has named (a cheap test, for
    reads: one it has not named yet reads from its pack, which is merely slower)."""
    return chunk_id in _ZERO_LENGTHS


# zero chunk ids by length and back; plain dicts (one step each under the GIL), kept small
ZERO_IDS_KEPT = 4096
_ZERO_IDS: dict[int, bytes] = {}
_ZERO_LENGTHS: dict[bytes, int] = {}
