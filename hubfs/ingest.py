"""Turning bytes into stored content: chunk, name, dedupe, encode, append to a pack.

``prepare`` does all the heavy work outside any write transaction (so it can run in a worker
thread while the index keeps serving); the result is committed later with
``contents.register`` inside the caller's transaction, after ``PackWriter.sync``. Chunks written
by a prepare that was never committed are remembered in ``_pending``, so a second prepare of the
same bytes in this process reuses them instead of writing them again.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable

import blake3

from . import compression
from .chunking import Chunker, ChunkerParams
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
        """Chunk ``buf`` and append the chunks the store lacks; the index is not changed."""
        if len(buf) == 0:
            return EMPTY
        view = memoryview(buf)
        spans = self._chunker().spans(view)
        ids = [blake3.blake3(view[s.offset : s.offset + s.length]).digest() for s in spans]
        new: dict[bytes, ChunkLocation] = {}
        new_bytes = 0
        for first in range(0, len(spans), LOOKUP_BATCH):
            batch = range(first, min(first + LOOKUP_BATCH, len(spans)))
            with self.index.read() as txn:
                missing = [i for i in batch if ids[i] not in new and txn.chunk(ids[i]) is None]
            for i in missing:
                chunk_id, span = ids[i], spans[i]
                if chunk_id in new:
                    continue
                with self._pending_lock:
                    loc = self._pending.get(chunk_id)
                if loc is None:
                    data = view[span.offset : span.offset + span.length]
                    codec, stored = compression.choose(data, span.elem_width, self.policy)
                    loc = self.writer.append(chunk_id, codec, span.length, stored)
                    new_bytes += loc.stored_len
                    with self._pending_lock:
                        self._pending[chunk_id] = loc
                new[chunk_id] = loc
            if progress:
                progress(sum(spans[i].length for i in batch))
        table = ContentTable(len(view), tuple(ids), tuple(s.length for s in spans))
        return PreparedContent(content_id(len(view), ids), table, new, new_bytes)

    def prepare_fd(self, fd: int, progress: Callable[[int], None] | None = None
                   ) -> PreparedContent:
        """``prepare`` the whole of an open file, mapped rather than copied into memory."""
        size = os.fstat(fd).st_size
        if size == 0:
            return EMPTY
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
            try:
                return self.prepare(view, progress)
            finally:
                view.release()

    def committed(self, prepared: PreparedContent) -> None:
        """Forget pending chunks once the index holds them."""
        with self._pending_lock:
            for chunk_id in prepared.new_chunks:
                self._pending.pop(chunk_id, None)
