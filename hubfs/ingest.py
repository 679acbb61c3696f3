"""Turning bytes into stored content: chunk, name, dedupe, encode, append to a pack.

``prepare`` does all the heavy work outside any write transaction (so it can run in a worker
thread while the index keeps serving); the result is committed later with
``contents.register`` inside the caller's transaction, after ``PackWriter.sync``. Chunks written
by a prepare that was never committed are remembered in ``_pending``, so a second prepare of the
same bytes in this process reuses them instead of writing them again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import blake3

from . import compression
from .chunking import Chunker, ChunkerParams, ChunkSpan
from .contents import EMPTY, PreparedContent, content_id
from .index import ContentTable, Index
from .packs import ChunkLocation, PackWriter

log = logging.getLogger(__name__)

# Chunks looked up per read transaction: short transactions keep LMDB from pinning old pages.
LOOKUP_BATCH = 256


class Ingestor:
    def __init__(self, index: Index, writer: PackWriter, params: ChunkerParams,
                 policy: str) -> None:
        if policy not in compression.POLICIES:
            raise ValueError(f"unknown compression policy {policy!r}")
        self.index = index
        self.writer = writer
        self.params = params
        self.policy = policy
        self._local = threading.local()
        self._pending: dict[bytes, ChunkLocation] = {}
        self._pending_lock = threading.Lock()

    def _chunker(self) -> Chunker:
        chunker = getattr(self._local, "chunker", None)
        if chunker is None:
            chunker = self._local.chunker = Chunker(self.params)
        return chunker

    def prepare(self, buf: memoryview | bytes,
                progress: Callable[[int], None] | None = None) -> PreparedContent:
        """``prepare_stream`` over bytes already in memory."""
        view = memoryview(buf)
        return self.prepare_stream(lambda o, n: view[o : o + n], len(view), progress)

    def prepare_fd(self, fd: int, progress: Callable[[int], None] | None = None
                   ) -> PreparedContent:
        """``prepare_stream`` over an open file, read with ``pread`` (a file that shrinks
        meanwhile ends early instead of faulting, as a mapping would)."""
        return self.prepare_stream(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size,
                                   progress)

    def prepare_stream(self, read: Callable[[int, int], bytes | memoryview], size: int,
                       progress: Callable[[int], None] | None = None,
                       prefix: tuple[list[bytes], list[int]] = ([], [])) -> PreparedContent:
        """Chunk a file and append the chunks the store lacks; the index is not changed.

        ``prefix`` is the file's front, already ingested as chunks (ids, lengths) while it was
        being written; chunking goes on from its end."""
        ids, lengths = list(prefix[0]), list(prefix[1])
        new, new_bytes = self.prepare_chunks(read, size, sum(lengths), True, ids, lengths,
                                             progress)
        total = sum(lengths)
        if total == 0:
            return EMPTY
        table = ContentTable(total, tuple(ids), tuple(lengths))
        return PreparedContent(content_id(total, ids), table, new, new_bytes)

    def prepare_chunks(self, read: Callable[[int, int], bytes | memoryview], size: int,
                       start: int, final: bool, ids: list[bytes], lengths: list[int],
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[dict[bytes, ChunkLocation], int]:
        """Chunk from ``start`` (a final cut), appending ids and lengths; returns the chunks
        this call appended to packs (or found pending) and the stored bytes it added."""
        new: dict[bytes, ChunkLocation] = {}
        counts = [0]  # new stored bytes
        batch: list[tuple[bytes, ChunkSpan, memoryview]] = []
        for span, data in self._chunker().stream(read, size, start, final):
            if batch and data.obj is not batch[-1][2].obj:
                # A new chunker window: store the last window's chunks now, so the batch's
                # views keep at most one window alive besides the one being cut.
                self._store_missing(batch, new, counts, progress)
                batch = []
            chunk_id = blake3.blake3(data).digest()
            ids.append(chunk_id)
            lengths.append(span.length)
            batch.append((chunk_id, span, data))
            if len(batch) >= LOOKUP_BATCH:
                self._store_missing(batch, new, counts, progress)
                batch = []
        self._store_missing(batch, new, counts, progress)
        return new, counts[0]

    def _store_missing(self, batch: list[tuple[bytes, ChunkSpan, memoryview]],
                       new: dict[bytes, ChunkLocation], counts: list[int],
                       progress: Callable[[int], None] | None) -> None:
        """Append the chunks of ``batch`` that neither the index nor this process has."""
        if not batch:
            return
        with self.index.read() as txn:
            missing = [item for item in batch
                       if item[0] not in new and txn.chunk(item[0]) is None]
        for chunk_id, span, data in missing:
            if chunk_id in new:
                continue
            with self._pending_lock:
                loc = self._pending.get(chunk_id)
            if loc is None:
                codec, stored = compression.choose(data, span.elem_width, self.policy)
                loc = self.writer.append(chunk_id, codec, span.length, stored)
                counts[0] += loc.stored_len
                with self._pending_lock:
                    self._pending[chunk_id] = loc
            new[chunk_id] = loc
        if progress:
            progress(sum(item[1].length for item in batch))

    def forget_pending(self) -> None:
        """Drop every pending chunk (gc calls this while no ingest is in flight)."""
        with self._pending_lock:
            self._pending.clear()

    def committed(self, chunks: PreparedContent | dict[bytes, ChunkLocation]) -> None:
        """Forget pending chunks once the index holds them."""
        ids = chunks.new_chunks if isinstance(chunks, PreparedContent) else chunks
        with self._pending_lock:
            for chunk_id in ids:
                self._pending.pop(chunk_id, None)
