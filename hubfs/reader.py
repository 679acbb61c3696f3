"""Reading content back: chunk table lookup, checksum-checked pack reads, a decoded-chunk LRU.

``read(content_id, offset, size)`` bisects the cumulative chunk offsets. Raw chunks are read
straight from the pack, only the 64 KiB checksum blocks the request touches, so small random
reads stay small. No prefetching of our own: measured, ext4's readahead on the pack files
already streams them, and fadvise(WILLNEED) ahead of readers changed nothing. Compressed chunks are read whole, checked, decoded and kept in a byte-bounded
LRU, because a sequential reader asks for the same chunk many times in kernel-sized pieces.

On a cluster node, a chunk may be held only by the object store (``ChunkLocation.remote``):
a read that touches one calls ``fetch`` (set by ``hubfs.cluster``; it stores the verified
chunks locally) and reads again. ``read_without_decoding`` never fetches: it answers None, so
the FUSE layer retries in a worker thread. ``chunk_range`` knows no content to fetch a chunk
by: it raises ``NotLocal``, and its caller (write-back, for a staged file's base) fetches.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from .compression import Codec, decode
from .errors import IntegrityError
from .index import Index
from .packs import CHECK_BLOCK_BYTES, PACK_DAMAGE_FIX, ChunkLocation, PackFiles, PackMissingError

log = logging.getLogger(__name__)

DECODED_CACHE_BYTES = 256 * 1024 * 1024
TABLE_CACHE_ENTRIES = 256
PIECE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ResolvedTable:
    """A content's chunks with their file offsets and pack locations, ready to serve reads."""

    size: int
    starts: tuple[int, ...]  # file offset of each chunk
    chunk_ids: tuple[bytes, ...]
    locations: tuple[ChunkLocation, ...]


class _LRU:
    """Thread-safe LRU bounded by the summed ``weight`` of its values."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> object | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: bytes, value: object, weight: int) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
            self._items[key] = (value, weight)
            self.used += weight
            while self.used > self.capacity and len(self._items) > 1:
                _, (_, w) = self._items.popitem(last=False)
                self.used -= w

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0


class NotLocal(IntegrityError):
    """A read touched a chunk only the cluster's object store holds."""


class Fetcher(Protocol):
    """A cluster node's fetcher (``ClusterNode.fetch``): returns once the chunks of a
    content that bytes ``[offset, offset+size)`` touch are local. Blocking (network): never
    called on the trio thread. It may fetch ahead of the range, never past ``limit`` (None:
    up to the content's end)."""

    def __call__(self, content_id: bytes, offset: int, size: int, /, *,
                 limit: int | None = None) -> None: ...


class ContentReader:
    def __init__(self, index: Index, packs: PackFiles,
                 cache_bytes: int = DECODED_CACHE_BYTES) -> None:
        self.index = index
        self.packs = packs
        self.fetch: Fetcher | None = None  # set on a cluster node
        self._decoded = _LRU(cache_bytes)
        self._tables = _LRU(TABLE_CACHE_ENTRIES)

    def table(self, content_id: bytes) -> ResolvedTable:
        cached = self._tables.get(content_id)
        if cached is not None:
            return cached  # type: ignore[return-value]
        with self.index.read() as txn:
            table = txn.content(content_id)
            if table is None:
                raise IntegrityError(f"content {content_id.hex()[:16]} is missing from the index "
                                     "(the index is damaged): run `hubfs verify --repair STORE` "
                                     "to restore it from a snapshot", None)
            locations = []
            for chunk_id in table.chunk_ids:
                entry = txn.chunk(chunk_id)
                if entry is None:
                    raise IntegrityError(
                        f"chunk {chunk_id.hex()[:16]} is missing from the index (the index is "
                        "damaged): run `hubfs verify --repair STORE` to re-derive it from the "
                        "packs", chunk_id)
                locations.append(entry.location)
        starts, pos = [], 0
        for length in table.lengths:
            starts.append(pos)
            pos += length
        resolved = ResolvedTable(table.size, tuple(starts), table.chunk_ids, tuple(locations))
        self._tables.put(content_id, resolved, 1)
        return resolved

    def cached_bytes(self) -> int:
        """Bytes of decoded chunks held in memory."""
        return self._decoded.used

    def forget_tables(self) -> None:
        """Drop cached locations (after ``gc`` moved chunks)."""
        self._tables.clear()

    def pieces(self, content_id: bytes) -> Iterator[bytes]:
        """A whole content, front to back, in ``PIECE_BYTES`` pieces (export, cat, staging)."""
        size = self.table(content_id).size
        for offset in range(0, size, PIECE_BYTES):
            yield self.read(content_id, offset, PIECE_BYTES)

    def read(self, content_id: bytes, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of a content (fewer at its end)."""
        data = self._read(content_id, offset, size, decode=True)
        assert data is not None
        return data

    def read_without_decoding(self, content_id: bytes, offset: int, size: int) -> bytes | None:
        """Like ``read``, but ``None`` where a compressed chunk is not decoded yet: the FUSE
        layer then retries in a worker thread, keeping slow work off its event loop."""
        return self._read(content_id, offset, size, decode=False)

    def _read(self, content_id: bytes, offset: int, size: int, decode: bool) -> bytes | None:
        try:
            return self._read_once(content_id, offset, size, decode)
        except PackMissingError:
            # gc moved the chunks after this table was resolved: resolve again, once
            self._tables.clear()
            return self._read_once(content_id, offset, size, decode)
        except NotLocal:
            if self.fetch is None:
                raise
            self.fetch(content_id, offset, size)
            self._tables.clear()  # the fetched chunks have local locations now
            return self._read_once(content_id, offset, size, decode)

    def _read_once(self, content_id: bytes, offset: int, size: int, decode: bool
                   ) -> bytes | None:
        table = self.table(content_id)
        end = min(offset + size, table.size)
        if offset >= end:
            return b""
        i = bisect.bisect_right(table.starts, offset) - 1
        pieces = []
        pos = offset
        while pos < end:
            start = table.starts[i]
            loc = table.locations[i]
            lo, hi = pos - start, min(end - start, loc.raw_len)
            if loc.remote:
                if not decode:
                    return None
                raise NotLocal(f"content {content_id.hex()[:16]} is held by the cluster's "
                               "object store only: read it through the node's mount", None)
            if not decode and not self.is_quick(table.chunk_ids[i], loc):
                return None
            pieces.append(self.chunk_range(table.chunk_ids[i], loc, lo, hi))
            pos = start + hi
            i += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def is_quick(self, chunk_id: bytes, loc: ChunkLocation) -> bool:
        """Whether ``chunk_range`` of this chunk needs no decoding (raw, or decoded already)."""
        if loc.remote:
            return False
        return loc.codec == Codec.RAW or self._decoded.get(chunk_id) is not None

    def chunk_range(self, chunk_id: bytes, loc: ChunkLocation, lo: int, hi: int) -> bytes:
        """Bytes ``[lo, hi)`` of one chunk's raw content."""
        if loc.remote:  # the caller fetches it through a content that holds it
            raise NotLocal(f"chunk {chunk_id.hex()[:16]} is held by the cluster's object store "
                           "only", chunk_id)
        if loc.codec == Codec.RAW:
            first, last = lo // CHECK_BLOCK_BYTES, -(-hi // CHECK_BLOCK_BYTES)
            data = self.packs.read_blocks(chunk_id, loc, first, last)
            skip = first * CHECK_BLOCK_BYTES
            return data[lo - skip : hi - skip] if (lo - skip, hi - skip) != (0, len(data)) else data
        decoded = self._decoded.get(chunk_id)
        if decoded is None:
            decoded = self.decode_chunk(chunk_id, loc)
            self._decoded.put(chunk_id, decoded, len(decoded))
        return decoded[lo:hi]  # type: ignore[index]

    def decode_chunk(self, chunk_id: bytes, loc: ChunkLocation) -> bytes:
        stored = self.packs.read_stored(chunk_id, loc)
        try:
            return decode(stored, loc.codec, loc.raw_len)
        except ValueError as exc:
            raise IntegrityError(
                f"chunk {chunk_id.hex()[:16]} in {self.packs.path(loc.pack_id)} does not decode "
                f"({exc}); {PACK_DAMAGE_FIX}", chunk_id) from exc
