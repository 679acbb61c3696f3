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
from dataclasses import dataclass, field

import blake3

from . import compression
from .chunking import WINDOW_BYTES, Chunker, ChunkerParams, ChunkSpan
from .compression import Codec
from .contents import EMPTY, PreparedContent, content_id
from .index import ChunkEntry, ContentTable, Index
from .objects import OBJECT_MIN_BYTES
from .packs import ChunkLocation, PackWriter, block_sums

log = logging.getLogger(__name__)

# Chunks looked up per read transaction: short transactions keep LMDB from pinning old pages.
LOOKUP_BATCH = 256
# Read window while re-chunking around a small change: a few chunks, not 64 MiB.
RESYNC_WINDOW_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Reuse:
    """Stored chunks a new version of a file keeps: ``head`` up to the first changed byte,
    then, once chunking after the last change cuts where the old content cut (at an offset
    in ``tail_at``), that old chunk and all after it. Storing a 4 KiB write into a 1 GiB file
    then chunks a few MiB, not the whole file."""

    head_ids: tuple[bytes, ...] = ()
    head_lengths: tuple[int, ...] = ()
    first_change: int = 0
    tail_from: int = 0  # no tail cut is taken before this offset
    tail_ids: tuple[bytes, ...] = ()
    tail_lengths: tuple[int, ...] = ()
    tail_at: dict[int, int] = field(default_factory=dict)  # cut offset -> index in tail_ids

    @property
    def restart(self) -> int:
        return sum(self.head_lengths)


@dataclass(frozen=True)
class HashedChunk:
    chunk_id: bytes
    span: ChunkSpan
    sums: tuple[int, ...]  # of its 64 KiB blocks, raw: what an object location records


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
        self._zero_ids: dict[int, bytes] = {}  # ids are pure functions: racing writers agree

    def _zero_id(self, length: int) -> bytes:
        """The id of a chunk of zeros (sparse files hold many, of few lengths)."""
        chunk_id = self._zero_ids.get(length)
        if chunk_id is None:
            chunk_id = self._zero_ids[length] = blake3.blake3(bytes(length)).digest()
        return chunk_id

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

        With ``reuse`` (a new version of a stored or partly stored file), its head chunks are
        kept, chunking starts at their end, and stops where it cuts where the old tail did.
        With ``new_object`` (the bytes ``read`` reads are one file the caller can make an
        object of), a large file is stored by ``prepare_whole``."""
        if new_object is not None and size >= OBJECT_MIN_BYTES and reuse is None:
            return self.prepare_whole(read, size, new_object)
        reuse = reuse or Reuse()
        ids, lengths = list(reuse.head_ids), list(reuse.head_lengths)
        if reuse.tail_ids and self._chunker().header_end(read, size) > reuse.first_change:
            reuse = Reuse(reuse.head_ids, reuse.head_lengths, reuse.first_change)  # new layout
        new, new_bytes = self.prepare_chunks(read, size, reuse.restart, True, ids, lengths,
                                             progress, reuse)
        total = sum(lengths)
        if total == 0:
            return EMPTY
        table = ContentTable(total, tuple(ids), tuple(lengths))
        return PreparedContent(content_id(total, ids), table, new, new_bytes)

    def prepare_whole(self, read: Callable[[int, int], bytes | memoryview], size: int,
                      new_object: Callable[[], int]) -> PreparedContent:
        """A file written from nothing, whole in one file that ``read`` reads: it becomes an
        object (hubfs.objects: the caller links the file in) when it qualifies; otherwise its
        missing chunks go to packs, as ``prepare_stream`` would put them.

        Hashing comes first and stores nothing, because whether the file qualifies depends on
        how much of it the store already holds."""
        hashed = [HashedChunk(self._zero_id(span.length) if span.zero
                              else blake3.blake3(data).digest(), span, block_sums(data))
                  for span, data in self._chunker().stream(read, size)]
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
                    elif not entry.refcount:
                        unused[h.chunk_id] = h  # kept only until gc: bytes no file holds
        new_bytes = sum(h.span.length for h in (*missing.values(), *unused.values()))
        if (total >= OBJECT_MIN_BYTES and not has_object and (known or 2 * new_bytes >= total)
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
            if len(data) != h.span.length:
                raise OSError(f"a file being stored shrank under its commit (at {h.span.offset})")
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
        this call appended to packs (or found pending) and the stored bytes it added. With a
        tail in ``reuse``, reads small windows and ends on the first cut the old tail shares."""
        new: dict[bytes, ChunkLocation] = {}
        counts = [0]  # new stored bytes
        batch: list[tuple[bytes, ChunkSpan, memoryview]] = []
        tail = reuse if reuse is not None and reuse.tail_ids else None
        window = RESYNC_WINDOW_BYTES if tail else WINDOW_BYTES
        for span, data in self._chunker().stream(read, size, start, final, window):
            if batch and data.obj is not batch[-1][2].obj:
                # A new chunker window: store the last window's chunks now, so the batch's
                # views keep at most one window alive besides the one being cut.
                self._store_missing(batch, new, counts, progress)
                batch = []
            chunk_id = self._zero_id(span.length) if span.zero else blake3.blake3(data).digest()
            ids.append(chunk_id)
            lengths.append(span.length)
            batch.append((chunk_id, span, data))
            end = span.offset + span.length
            if tail and end >= tail.tail_from and end in tail.tail_at:
                j = tail.tail_at[end]
                ids.extend(tail.tail_ids[j:])
                lengths.extend(tail.tail_lengths[j:])
                break
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
