"""Tensor boundaries of a safetensors file, read from its header.

Chunking cuts at these offsets so an identical tensor dedupes whatever the header length or the
tensor order. Files are recognised by content (an 8-byte length, then a JSON object), since
cache blobs carry hashes for names. The bytes are untrusted: anything malformed yields ``None`` (plain CDC is used),
never an exception, and the header size is bounded before it is read.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The safetensors format caps its JSON header at 100 MB; anything larger is not one.
MAX_HEADER_BYTES = 100_000_000
HEADER_LEN = struct.Struct("<Q")
MAX_FILE_BYTES = 1 << 50
# Read first when sniffing a file: enough for the header of most checkpoints in one read.
HEADER_PROBE_BYTES = 1024 * 1024

# Element width of the dtypes whose byte planes group well for compression.
DTYPE_WIDTH = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's bytes as absolute file offsets, with its element width (0 if unknown)."""

    start: int
    end: int
    elem_width: int


def header_incomplete(head: memoryview | bytes, size: int) -> bool:
    """Whether a file being written starts like a safetensors header not written in full yet:
    its tensor boundaries are not known, so nothing of it should be chunked yet."""
    if len(head) < HEADER_LEN.size + 1:
        return True
    if head[HEADER_LEN.size] != ord("{"):
        return False
    (header_len,) = HEADER_LEN.unpack_from(head, 0)
    return 0 < header_len <= MAX_HEADER_BYTES and HEADER_LEN.size + header_len > size


def parse_layout(head: memoryview | bytes, size: int | None = None,
                 read: Callable[[int, int], bytes | memoryview] | None = None,
                 complete: bool = True) -> list[TensorSpan] | None:
    """Return the header as one span (width 0) followed by every tensor, sorted by offset.

    ``head`` is the start of a file of ``size`` bytes (default: ``head`` is the whole file);
    ``read(offset, length)`` fetches a header longer than ``head``. ``None`` when the bytes are
    not a well-formed safetensors file. With ``complete`` False the file is still being
    written, so tensors may lie beyond ``size`` (its header must be there already).
    """
    size = len(head) if size is None else size
    # Sniff rather than trust names: Hugging Face blobs are named by hash, not ".safetensors".
    if len(head) < HEADER_LEN.size + 2 or head[HEADER_LEN.size] != ord("{"):
        return None
    (header_len,) = HEADER_LEN.unpack_from(head, 0)
    data_start = HEADER_LEN.size + header_len
    if header_len == 0 or header_len > MAX_HEADER_BYTES or data_start > size:
        return None
    if data_start <= len(head):
        text = bytes(head[HEADER_LEN.size : data_start])
    elif read is not None:
        text = bytes(read(HEADER_LEN.size, header_len))
    else:
        return None
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        log.debug("safetensors header is not JSON; plain chunking")
        return None
    if not isinstance(header, dict):
        return None
    spans = [TensorSpan(0, data_start, 0)]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return None
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(v) is int for v in offsets)
        ):
            return None
        begin, end = offsets
        if not 0 <= begin <= end or data_start + end > (size if complete else MAX_FILE_BYTES):
            return None
        dtype = entry.get("dtype")
        width = DTYPE_WIDTH.get(dtype, 0) if isinstance(dtype, str) else 0
        spans.append(TensorSpan(data_start + begin, data_start + end, width))
    spans[1:] = sorted(spans[1:], key=lambda s: (s.start, s.end))
    for before, after in itertools.pairwise(spans):
        if after.start < before.end:
            log.debug("safetensors tensors overlap; plain chunking")
            return None
    return spans
