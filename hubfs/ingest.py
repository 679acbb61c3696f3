"""Turning bytes into stored content: chunk, name, dedupe, encode, append to a pack.

``prepare`` does all the heavy work outside any write transaction (so it can run in a worker
thread while the index keeps serving); the result is committed later with
``contents.register`` inside the caller's transaction, after ``PackWriter.sync``. Chunks written
by a prepare that was never committed are remembered in ``_pending``, so a second prepare of the
same bytes in this process reuses them instead of writing them again.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from . import compression
from .chunking import WINDOW_BYTES, Chunker, ChunkerParams, ChunkSpan, zero_chunk_id, zeros
from .compression import Codec
from .contents import EMPTY, PreparedContent, content_id, held_by_a_file
from .index import ChunkEntry, ContentTable, Index
from .objects import OBJECT_MIN_BYTES, worth_an_object
from .packs import ChunkLocation, PackWriter, block_sums

log = logging.getLogger(__name__)

# Chunks looked up per read transaction: short transactions keep LMDB from pinning old pages.
LOOKUP_BATCH = 256
# Read this far past the next offset where re-chunking may meet the old cuts again.
REALIGN_MARGIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Reuse:
    """What storing a new version of a file may take without reading it: chunks of the old
    version whose bytes did not change, and holes (ranges never written, zeros).

    Chunking runs from each change and stops as soon as it cuts where a kept old chunk starts:
    FastCDC's cuts depend only on the bytes since the last cut, so from there on it would cut
    the old chunks again. In a hole, each chunk that starts at a cut is ``Chunker.zero_cut``
    zeros, named without reading them. A 4 KiB write into a 1 GiB file, or a few writes
    scattered over it, then chunk a few MiB around each, not the file."""

    starts: tuple[int, ...] = ()  # old chunks that may be kept: offsets, ids, lengths
    ids: tuple[bytes, ...] = ()
    lengths: tuple[int, ...] = ()
    holes: tuple[tuple[int, int], ...] = ()  # sorted, disjoint [start, end): zeros
    first_change: int = 0  # the first byte that may differ from the old version

    def up_to(self, offset: int) -> Reuse:
        """Only the old chunks that end by ``offset`` (a changed safetensors header may move
        every tensor boundary after it, and chunks are cut at those)."""
        keep = sum(1 for s, n in zip(self.starts, self.lengths, strict=True) if s + n <= offset)
        return Reuse(self.starts[:keep], self.ids[:keep], self.lengths[:keep], self.holes,
                     self.first_change)


class _Known:
    """``chunking.Skip`` over a ``Reuse``: hands known chunks to ``take`` and says how far
    to read next (to just past the next place chunking may realign, at most ``window``)."""

    def __init__(self, reuse: Reuse, zero_cut: int, params: ChunkerParams, window: int,
                 take: Callable[[bytes | None, ChunkSpan], None]) -> None:
        self.reuse = reuse
        self.at = {start: i for i, start in enumerate(reuse.starts)}
        self.hole_starts = [start for start, _ in reuse.holes]
        self.zero_cut = zero_cut
        # A window longer than the largest chunk holds a real cut before its edge, so each
        # read moves chunking on; one a little past the next known offset can realign there.
        self.least = params.max_bytes + REALIGN_MARGIN_BYTES
        self.window = max(window, self.least)
        self.take = take  # (old chunk id, span) or (None, span of zeros)

    def _hole_end(self, pos: int) -> int:
        i = bisect.bisect_right(self.hole_starts, pos) - 1
        return self.reuse.holes[i][1] if i >= 0 and pos < self.reuse.holes[i][1] else pos

    def wants(self, pos: int, limit: int) -> bool:
        i = self.at.get(pos)
        if i is not None and pos + self.reuse.lengths[i] <= limit:
            return True
        return pos + self.zero_cut <= min(self._hole_end(pos), limit)

    def __call__(self, pos: int, limit: int, elem_width: int) -> tuple[int, int]:
        while True:
            i = self.at.get(pos)
            if i is not None and pos + self.reuse.lengths[i] <= limit:
                self.take(self.reuse.ids[i], ChunkSpan(pos, self.reuse.lengths[i], elem_width))
                pos += self.reuse.lengths[i]
                continue
            hole_end = min(self._hole_end(pos), limit)
            if pos + self.zero_cut > hole_end:
                break
            while pos + self.zero_cut <= hole_end:
                self.take(None, ChunkSpan(pos, self.zero_cut, elem_width, True))
                pos += self.zero_cut
        # read to just past the next offset where chunking may take known chunks again
        j = bisect.bisect_right(self.reuse.starts, pos)
        k = bisect.bisect_right(self.hole_starts, pos)
        ahead = min(self.reuse.starts[j] if j < len(self.reuse.starts) else limit,
                    self.hole_starts[k] if k < len(self.hole_starts) else limit, limit)
        return pos, min(self.window, max(ahead - pos + REALIGN_MARGIN_BYTES, self.least))


@dataclass(frozen=True)
class HashedChunk:
    chunk_id: bytes
    span: ChunkSpan
    sums: tuple[int, ...]  # of its 64 KiB blocks, raw: what an object location records


def may_become_an_object(size: int, reuse: Reuse) -> bool:
    """Whether ``prepare_stream`` may store a file written from nothing as its object (small
    files and new versions of stored ones always go to packs)."""
    return size >= OBJECT_MIN_BYTES and not reuse.ids


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
        self._zero_block_sums: dict[int, tuple[int, ...]] = {}

    def _zero_id(self, length: int) -> bytes:
        """The id of a chunk of zeros (sparse files hold many, of few lengths)."""
        return zero_chunk_id(length)

    def _zero_sums(self, length: int) -> tuple[int, ...]:
        sums = self._zero_block_sums.get(length)
        if sums is None:
            sums = self._zero_block_sums[length] = block_sums(bytes(length))
        return sums

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
                       reuse: Reuse | None = None,
                       new_object: Callable[[], int] | None = None) -> PreparedContent:
        """Chunk a file and append the chunks the store lacks; the index is not changed.

        With ``reuse`` (a new version of a stored or partly stored file, or one with holes),
        only the changed ranges are read and chunked.
        With ``new_object`` (the bytes ``read`` reads are one file the caller can make an
        object of), a large file is stored by ``prepare_whole``."""
        reuse = reuse or Reuse()
        if new_object is not None and may_become_an_object(size, reuse):
            return self.prepare_whole(read, size, new_object, reuse.holes)
        if (reuse.ids and reuse.starts[-1] + reuse.lengths[-1] > reuse.first_change
                and self._chunker().header_end(read, size) > reuse.first_change):
            reuse = reuse.up_to(reuse.first_change)  # a new tensor layout
        ids: list[bytes] = []
        lengths: list[int] = []
        new, new_bytes = self.prepare_chunks(read, size, 0, True, ids, lengths, progress, reuse)
        total = sum(lengths)
        if total == 0:
            return EMPTY
        table = ContentTable(total, tuple(ids), tuple(lengths))
        return PreparedContent(content_id(total, ids), table, new, new_bytes)

    def prepare_whole(self, read: Callable[[int, int], bytes | memoryview], size: int,
                      new_object: Callable[[], int],
                      holes: tuple[tuple[int, int], ...] = ()) -> PreparedContent:
        """A file written from nothing, whole in one file that ``read`` reads: it becomes an
        object (hubfs.objects: the caller links the file in) when it qualifies; otherwise its
        missing chunks go to packs, as ``prepare_stream`` would put them.

        Hashing comes first and stores nothing, because whether the file qualifies depends on
        how much of it the store already holds. ``holes`` are skipped, not read."""
        chunker = self._chunker()
        hashed: list[HashedChunk] = []

        def take(_old: bytes | None, span: ChunkSpan) -> None:
            hashed.append(HashedChunk(self._zero_id(span.length), span,
                                      self._zero_sums(span.length)))

        skip = (_Known(Reuse(holes=holes), chunker.zero_cut, self.params,
                       WINDOW_BYTES, take) if holes else None)
        for span, data in chunker.stream(read, size, skip=skip):
            hashed.append(HashedChunk(self._zero_id(span.length) if span.zero
                                      else blake3.blake3(data).digest(), span,
                                      self._zero_sums(span.length) if span.zero
                                      else block_sums(data)))
        ids = [h.chunk_id for h in hashed]
        total = sum(h.span.length for h in hashed)
        if total == 0:
            return EMPTY
        table = ContentTable(total, tuple(ids), tuple(h.span.length for h in hashed))
        cid = content_id(total, ids)
        missing: dict[bytes, HashedChunk] = {}
        unused: dict[bytes, HashedChunk] = {}
        for i in range(0, len(hashed), LOOKUP_BATCH):
            with self.index.read() as txn:
                if i == 0:
                    known = txn.content(cid) is not None
                    has_object = txn.object_of(cid) is not None
                for h in hashed[i : i + LOOKUP_BATCH]:
                    if h.chunk_id in missing or h.chunk_id in unused:
                        continue
                    entry = txn.chunk(h.chunk_id)
                    if entry is None or entry.location.remote:  # remote: not held here
                        missing[h.chunk_id] = h
                    elif not held_by_a_file(entry):
                        unused[h.chunk_id] = h  # kept only until gc: bytes no file holds
        new_bytes = sum(h.span.length for h in (*missing.values(), *unused.values()))
        if (not has_object and worth_an_object(total, new_bytes, known)
                and self.kept_raw(read, total, hashed[len(hashed) // 2].span)):
            object_id = new_object()
            located: dict[bytes, ChunkLocation] = {}
            for h in hashed:  # every chunk: copies in packs move here (contents.register)
                located.setdefault(h.chunk_id, ChunkLocation(
                    object_id, h.span.offset, Codec.RAW, h.span.length, h.span.length, h.sums))
            return PreparedContent(cid, table, located, 0, object_id)
        stored: dict[bytes, ChunkLocation] = {}
        counts = [0]
        for h in missing.values():
            data = memoryview(read(h.span.offset, h.span.length))
            if len(data) != h.span.length or blake3.blake3(data).digest() != h.chunk_id:
                # Written over (or cut) since it was hashed: never store these bytes under the
                # old id. One pass over what is there now stores each chunk under its own id;
                # the caller sees the write (its generation) and goes round again anyway.
                log.debug("a file changed while it was stored; chunking it again")
                return self.prepare_stream(read, size)
            self._store_missing([(h.chunk_id, h.span, data)], stored, counts, None)
        return PreparedContent(cid, table, stored, counts[0])

    def kept_raw(self, read: Callable[[int, int], bytes | memoryview], size: int,
                 span: ChunkSpan | None = None) -> bool:
        """Whether the store would keep a file's bytes raw, judged on one chunk (``span``, or
        the middle of what is written): only such files become objects, since an object
        cannot be compressed."""
        if span is None:
            length = min(size // 2, self.params.max_bytes)
            span = ChunkSpan(size // 2 - length, length, 0)
        codec, _ = compression.choose(read(span.offset, span.length), span.elem_width,
                                      self.policy)
        return codec == Codec.RAW

    def prepare_chunks(self, read: Callable[[int, int], bytes | memoryview], size: int,
                       start: int, final: bool, ids: list[bytes], lengths: list[int],
                       progress: Callable[[int], None] | None = None,
                       reuse: Reuse | None = None) -> tuple[dict[bytes, ChunkLocation], int]:
        """Chunk from ``start`` (a final cut), appending ids and lengths; returns the chunks
        this call appended to packs (or found pending) and the stored bytes it added. With
        ``reuse`` (only when ``final``), known chunks are taken instead of read and cut."""
        new: dict[bytes, ChunkLocation] = {}
        counts = [0]  # new stored bytes
        batch: list[tuple[bytes, ChunkSpan, memoryview]] = []
        chunker = self._chunker()
        skip: _Known | None = None
        if reuse is not None and (reuse.ids or reuse.holes):

            def take(old: bytes | None, span: ChunkSpan) -> None:
                if old is None:  # zeros of a hole: stored like any chunk, if missing
                    old = self._zero_id(span.length)
                    batch.append((old, span, memoryview(zeros(span.length))))
                ids.append(old)
                lengths.append(span.length)

            skip = _Known(reuse, chunker.zero_cut, self.params, WINDOW_BYTES, take)
        for span, data in chunker.stream(read, size, start, final, WINDOW_BYTES, skip):
            if batch and data.obj is not batch[-1][2].obj:
                # A new chunker window: store the last window's chunks now, so the batch's
                # views keep at most one window alive besides the one being cut.
                self._store_missing(batch, new, counts, progress)
                batch = []
            chunk_id = self._zero_id(span.length) if span.zero else blake3.blake3(data).digest()
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
                       if item[0] not in new and _not_held(txn.chunk(item[0]))]
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


def _not_held(entry: ChunkEntry | None) -> bool:
    """A chunk this store must write: unknown, or known only to the cluster's object store."""
    return entry is None or entry.location.remote
