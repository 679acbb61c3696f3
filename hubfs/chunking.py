"""Content-defined chunking: where a file's bytes are cut into chunks.

FastCDC (pyfastcdc, Cython) finds cut points from the content, so an insertion does not shift
every later chunk. Safetensors files are first split at tensor boundaries from their header, and
CDC runs inside each tensor: an identical tensor then becomes identical chunks wherever it sits.
The parameters are recorded in the store at ``init`` and never change for that store, because
other parameters would cut the same bytes differently and silently stop deduplicating.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from pyfastcdc.cy import FastCDC

from .tensor_layout import TensorSpan, parse_layout

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


class Chunker:
    """Cuts buffers into chunks; one instance per thread (pyfastcdc objects are not shared)."""

    def __init__(self, params: ChunkerParams) -> None:
        if params.algorithm != ChunkerParams.algorithm:
            raise ValueError(f"unknown chunking algorithm {params.algorithm!r}")
        self.params = params
        self._cdc = FastCDC(
            avg_size=params.avg_bytes, min_size=params.min_bytes, max_size=params.max_bytes
        )

    def spans(self, buf: memoryview | bytes) -> list[ChunkSpan]:
        """Chunks covering ``buf`` exactly, in order, cut at tensor boundaries where known."""
        size = len(buf)
        if size == 0:
            return []
        layout = parse_layout(buf)
        segments = _segments(layout, size) if layout else [TensorSpan(0, size, 0)]
        view = memoryview(buf)
        out: list[ChunkSpan] = []
        for seg in segments:
            for chunk in self._cdc.cut_buf(view[seg.start : seg.end]):
                out.append(ChunkSpan(seg.start + chunk.offset, chunk.length, seg.elem_width))
        return out


def _segments(layout: list[TensorSpan], size: int) -> list[TensorSpan]:
    """Tile ``[0, size)`` with the layout's spans, filling gaps and the tail as width-0 spans."""
    segments: list[TensorSpan] = []
    pos = 0
    for span in layout:
        if span.start == span.end:
            continue
        if span.start > pos:
            segments.append(TensorSpan(pos, span.start, 0))
        segments.append(span)
        pos = span.end
    if pos < size:
        segments.append(TensorSpan(pos, size, 0))
    return segments
