"""A file being written through the mount: its new bytes over the content it had, until stored.

A staging is an overlay. Its *base* is a list of stored chunks: the content the file had when
its first write came (an in-place update), or the front of a file still being written that is
already stored (a download). Bytes written since live in a sparse file
``STORE/staging/<ino>-<stamp>`` at their own offsets, and ``extents`` says which ranges of it
hold them. A byte of the file comes, in this order, from an extent (the staging file), from the
base (below ``base_valid``), or is zero (a hole left by a truncate and a later extension).
So the first write into a 1 GiB stored file copies nothing, and storing it again re-chunks only
around what changed (``Snapshot.reuse``).

A download writes front to back from nothing: one extent ``[base_len, size)``. Every
``INGEST_STEP_BYTES`` its finished front is stored, appended to the base and cut out of the
staging file with ``fallocate(PUNCH_HOLE)``, so a download never needs two full copies on disk.

Crash recovery. With an empty base the staging file *is* the file and needs nothing else.
Otherwise the append-only sidecar ``<staging name>.log`` says how to rebuild it::

    magic  b"HUBFSOV1", then records, each a tag byte and its fields:
    b"B"  content id (32)            the base is this stored content (an in-place update)
    b"F"  chunk id (32), u32 length  the stored front grew by this chunk
    b"W"  u64 offset, u64 length     bytes were written there (they are in the staging file)
    b"T"  u64 size                   the file was truncated (or extended) to size

A torn last record (a crash mid-append) is ignored: the write it logged was never acknowledged
as durable. Sidecars of the previous layout (magic ``HUBFSPFX``, front chunks only) still read.

A staging with no base may be handed to the kernel (``kernel_written``): FUSE passthrough then
writes into its file directly, at native speed, and ``refresh`` takes in what was written.

Ownership: only the mount's trio thread changes a staging. Worker threads read it through an
immutable ``Snapshot`` while holding ``in_use``, so a discard closes the file only after the
last of them is done (that guard is the one lock here).
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chunking import known_zero_chunk, zeros
from .ingest import Reuse
from .packs import fsync_directory

log = logging.getLogger(__name__)

INGEST_STEP_BYTES = 64 * 1024 * 1024
SIDECAR_MAGIC = b"HUBFSOV1"
OLD_SIDECAR_MAGIC = b"HUBFSPFX"
OLD_SIDECAR_ENTRY = struct.Struct("<32sI")
SIDECAR_SUFFIX = ".log"
OLD_SIDECAR_SUFFIX = ".prefix"
RECORD_BASE = struct.Struct("<c32s")
RECORD_FRONT = struct.Struct("<c32sI")
RECORD_WRITE = struct.Struct("<cQQ")
RECORD_TRUNCATE = struct.Struct("<cQ")
RECORDS = {b"B": RECORD_BASE, b"F": RECORD_FRONT, b"W": RECORD_WRITE, b"T": RECORD_TRUNCATE}
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# chunk id, first byte, end byte -> those bytes of the chunk (from the store)
ChunkBytes = Callable[[bytes, int, int], bytes]
# content id -> its chunk ids and lengths (from the index)
ContentChunks = Callable[[bytes], tuple[tuple[bytes, ...], tuple[int, ...]]]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give back the disk blocks of a range, keeping the file's size (reads see zeros)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Extents:
    """Sorted, disjoint, merged ``[start, end)`` ranges: where the staging file holds bytes."""

    def __init__(self, ranges: list[tuple[int, int]] | None = None) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for start, end in ranges or []:
            self.add(start, end)

    def __len__(self) -> int:
        return len(self.starts)

    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.starts, self.ends, strict=True))

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self.ends, start)  # first range ending at or after start
        j = bisect.bisect_right(self.starts, end)  # ranges before j start at or before end
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        """Forget ``[start, end)`` (those bytes now come from elsewhere)."""
        kept = [(s, e) for s, e in self.pairs() if e <= start or s >= end]
        cut = [(s, e) for s, e in self.pairs() if not (e <= start or s >= end)]
        for s, e in cut:
            if s < start:
                kept.append((s, start))
            if e > end:
                kept.append((end, e))
        kept.sort()
        self.starts = [s for s, _ in kept]
        self.ends = [e for _, e in kept]

    def clip(self, size: int) -> None:
        i = bisect.bisect_left(self.starts, size)
        del self.starts[i:], self.ends[i:]
        if self.ends and self.ends[-1] > size:
            self.ends[-1] = size


@dataclass(frozen=True)
class Layout:
    """Where each byte of a staged file comes from, frozen: what worker threads read."""

    size: int
    base_ids: tuple[bytes, ...]
    base_lengths: tuple[int, ...]
    base_starts: tuple[int, ...]
    base_valid: int  # base bytes below this are the file's, unless an extent covers them
    base_content: bytes  # the stored content the base is (an in-place update), or b""
    extents: tuple[tuple[int, int], ...]

    @property
    def base_len(self) -> int:
        return self.base_starts[-1] + self.base_lengths[-1] if self.base_ids else 0

    @property
    def base_final(self) -> bool:
        """Whether the base ends at a final chunk cut (a stored front), not at an EOF."""
        return not self.base_content

    def base_chunks_in(self, start: int, end: int) -> list[int]:
        """The base chunks (indexes) bytes ``[start, end)`` of the file are read from: those
        below ``base_valid`` that no extent covers there."""
        end = min(end, self.base_valid)
        ext_starts = [s for s, _ in self.extents]
        found = []
        i = max(0, bisect.bisect_right(self.base_starts, start) - 1)
        while i < len(self.base_ids) and self.base_starts[i] < end:
            lo = max(start, self.base_starts[i])
            hi = min(end, self.base_starts[i] + self.base_lengths[i])
            j = bisect.bisect_right(ext_starts, lo) - 1  # extents are merged: one covers or none
            if lo < hi and not (j >= 0 and self.extents[j][1] >= hi):
                found.append(i)
            i += 1
        return found


class Snapshot:
    """A staging's layout at one moment, with the file held open for the reader."""

    def __init__(self, staging: Staging, layout: Layout) -> None:
        self.staging = staging
        self.layout = layout
        self.generation = staging.generation

    def read(self, offset: int, size: int, chunk_bytes: ChunkBytes) -> bytes | memoryview:
        return read_layout(self.staging.fd, self.layout, offset, size, chunk_bytes)

    def reuse(self) -> Reuse:
        """What storing this version may take without reading (see ``Reuse``): the base
        chunks no write or truncate touched, and the holes."""
        lay = self.layout
        holes: list[tuple[int, int]] = []
        pos = lay.base_valid  # below it, bytes are the base's or written
        for start, end in lay.extents:
            if start > pos:
                holes.append((pos, start))
            pos = max(pos, end)
        if pos < lay.size:
            holes.append((pos, lay.size))
        first_change = min([s for s, _ in lay.extents]
                           + ([lay.base_valid] if lay.base_valid < lay.size else []),
                           default=lay.size)
        # The last base chunk ends where the old file ended, not at a cut chunking would make
        # again, unless the file still ends there or the base is a stored front (final cuts).
        eof_cut_ok = lay.base_final or lay.base_len == lay.size
        starts: list[int] = []
        ids: list[bytes] = []
        lengths: list[int] = []
        ext_starts = [s for s, _ in lay.extents]
        last = len(lay.base_ids) - 1
        for i, (start, length) in enumerate(zip(lay.base_starts, lay.base_lengths,
                                                strict=True)):
            end = start + length
            if end > lay.base_valid or (i == last and not eof_cut_ok):
                break
            j = bisect.bisect_left(ext_starts, end)  # extents starting before the chunk ends
            if j and lay.extents[j - 1][1] > start:
                continue  # written over
            starts.append(start)
            ids.append(lay.base_ids[i])
            lengths.append(length)
        return Reuse(tuple(starts), tuple(ids), tuple(lengths), tuple(holes), first_change)


def read_layout(fd: int, lay: Layout, offset: int, size: int, chunk_bytes: ChunkBytes
                ) -> bytes | memoryview:
    """Bytes ``[offset, offset+size)`` of a staged file (fewer at its end)."""
    end = min(offset + size, lay.size)
    pieces: list[bytes | memoryview] = []
    pos = offset
    starts = [s for s, _ in lay.extents]
    while pos < end:
        i = bisect.bisect_right(starts, pos) - 1
        if i >= 0 and pos < lay.extents[i][1]:
            stop = min(end, lay.extents[i][1])
            pieces.append(_pread_full(fd, pos, stop - pos))
            pos = stop
            continue
        next_extent = lay.extents[i + 1][0] if i + 1 < len(lay.extents) else end
        stop = min(end, next_extent)
        if pos < lay.base_valid:
            stop = min(stop, lay.base_valid)
            j = bisect.bisect_right(lay.base_starts, pos) - 1
            chunk_start = lay.base_starts[j]
            stop = min(stop, chunk_start + lay.base_lengths[j])
            if known_zero_chunk(lay.base_ids[j]):  # a stored hole
                pieces.append(zeros(stop - pos))
            else:
                pieces.append(chunk_bytes(lay.base_ids[j], pos - chunk_start, stop - chunk_start))
        else:  # a hole: zeros without allocating them
            pieces.append(zeros(stop - pos))
        pos = stop
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    # the staging file is sparse and may end before an extent's end after a crash: zeros
    return data if len(data) == length else data + bytes(length - len(data))


@dataclass(frozen=True)
class Spare:
    """An empty file made ahead of need, open (``make_spares``)."""

    path: Path
    fd: int


def make_spares(directory: Path, count: int) -> list[Spare]:
    """Empty files for stagings to come, made in a worker thread. Making a file costs the
    filesystem an inode allocation (0.3-1 ms on ext4 on the benchmark VM, where a rename costs
    30 us), which each create request would wait for on the trio thread; ``Staging.create``
    renames a spare into place instead. Stops early, quietly, when the disk refuses: a create
    without a spare then makes its file itself and reports the error."""
    stamp = time.time_ns()
    made: list[Spare] = []
    for i in range(count):
        path = directory / f"{stamp:x}-{i}"
        try:
            made.append(Spare(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                            | os.O_CLOEXEC, 0o600)))
        except OSError:
            break
    return made


def remove_spares(directory: Path, spares: list[Spare]) -> None:
    """Close ``spares`` and remove every file in their directory (a crash leaves some)."""
    for spare in spares:
        os.close(spare.fd)
    spares.clear()
    for entry in os.scandir(directory):
        os.unlink(entry.path)


@dataclass(eq=False)
class Staging:
    path: Path
    fd: int
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    base_ids: list[bytes] = field(default_factory=list)
    base_lengths: list[int] = field(default_factory=list)
    base_starts: list[int] = field(default_factory=list)
    base_valid: int = 0
    base_content: bytes = b""  # the stored content the base came from, if any
    extents: Extents = field(default_factory=Extents)
    generation: int = 0  # bumped by every change: a commit can tell it raced a write
    overwrites: int = 0  # writes below the end and truncations: front ingests racing them stop
    durable: bool = False
    # Written by the kernel straight into the file (FUSE passthrough): writes never reach the
    # daemon, so size and mtime come from the file itself (``refresh``). Only a staging with
    # no base, whose file is the whole file, is handed to the kernel.
    kernel_written: bool = False
    _file_mtime_seen: int = 0
    _sidecar_fd: int = -1
    _users: int = 0
    _discarded: bool = False
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- life
    @classmethod
    def create(cls, directory: Path, ino: int, mtime_ns: int,
               spare: Spare | None = None) -> Staging:
        """An empty staging: ``spare`` (see ``make_spares``) renamed into place, if given."""
        path = directory / f"{ino:016x}-{time.time_ns():x}"
        if spare is not None:
            try:
                os.rename(spare.path, path)
                return cls(path, spare.fd, 0, mtime_ns)
            except OSError:
                os.close(spare.fd)  # made anew below, which reports a real problem
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return cls(path, fd, 0, mtime_ns)

    @classmethod
    def over(cls, directory: Path, ino: int, mtime_ns: int, content_id: bytes,
             ids: tuple[bytes, ...], lengths: tuple[int, ...],
             spare: Spare | None = None) -> Staging:
        """A staging over stored content: an in-place update, which copies nothing."""
        staging = cls.create(directory, ino, mtime_ns, spare)
        try:
            staging.base_content = content_id
            for chunk_id, length in zip(ids, lengths, strict=True):
                staging._add_base(chunk_id, length)
            staging.size = staging.base_valid = staging.base_len
            staging._log(RECORD_BASE.pack(b"B", content_id))
        except BaseException:
            staging.discard()
            raise
        return staging

    @staticmethod
    def inode_of(name: str) -> int | None:
        """The inode a staging file name belongs to (``None``: not a staging file)."""
        ino, sep, stamp = name.partition("-")
        try:
            return int(ino, 16) if sep and int(stamp, 16) >= 0 else None
        except ValueError:
            return None

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    @property
    def base_len(self) -> int:
        return self.base_starts[-1] + self.base_lengths[-1] if self.base_ids else 0

    @property
    def whole(self) -> bool:
        """Whether the staging file holds every byte of the file (no stored base)."""
        return not self.base_ids

    @property
    def staged_bytes(self) -> int:
        """Bytes held by the staging file: what storing this file may add at most."""
        return sum(end - start for start, end in self.extents.pairs())

    @property
    def front_ids(self) -> list[bytes]:
        """Base chunks that no stored content holds (the stored front): pinned against gc."""
        return [] if self.base_content else self.base_ids

    def layout(self) -> Layout:
        return Layout(self.size, tuple(self.base_ids), tuple(self.base_lengths),
                      tuple(self.base_starts), self.base_valid, self.base_content,
                      self.extents.pairs())

    def snapshot(self) -> Snapshot:
        return Snapshot(self, self.layout())

    def _add_base(self, chunk_id: bytes, length: int) -> None:
        self.base_starts.append(self.base_len)
        self.base_ids.append(chunk_id)
        self.base_lengths.append(length)
        self.base_valid = self.base_len

    # -- changes (the owner's thread only)
    def read(self, offset: int, size: int, chunk_bytes: ChunkBytes) -> bytes:
        return bytes(read_layout(self.fd, self.layout(), offset, size, chunk_bytes))

    def write(self, offset: int, data: bytes, now_ns: int) -> int:
        written = os.pwrite(self.fd, data, offset)
        if self._sidecar_fd >= 0:
            self._log(RECORD_WRITE.pack(b"W", offset, written))
        self.extents.add(offset, offset + written)
        if offset < self.size:
            self.overwrites += 1
        self.size = max(self.size, offset + written)
        self.mtime_ns = self.ctime_ns = now_ns
        self.generation += 1
        return written

    def refresh(self) -> None:
        """Take in what the kernel wrote into a ``kernel_written`` file: its size, every byte
        of it (a range a truncate extended is a hole to the daemon, but the kernel may have
        written there since), and its mtime when a write moved it (a utime set through the
        daemon holds until then)."""
        st = os.fstat(self.fd)
        whole = ((0, st.st_size),) if st.st_size else ()
        if st.st_size != self.size or self.extents.pairs() != whole:
            self.extents = Extents(list(whole))
            self.size = st.st_size
            self.generation += 1
        if st.st_mtime_ns > self._file_mtime_seen:
            self._file_mtime_seen = st.st_mtime_ns
            self.mtime_ns = self.ctime_ns = st.st_mtime_ns
            self.generation += 1

    def truncate(self, size: int, now_ns: int) -> list[bytes]:
        """Cut or extend the file to ``size``; returns the stored front's chunk ids when
        truncating to nothing drops the base (they need no pin any more)."""
        released: list[bytes] = []
        if size == 0 and self.base_ids:
            released = self.front_ids
            self.base_ids, self.base_lengths, self.base_starts = [], [], []
            self.base_content = b""
            self._drop_sidecar()
        self.extents.clip(size)
        self.base_valid = min(self.base_valid, size)
        os.ftruncate(self.fd, size)
        if self._sidecar_fd >= 0:
            self._log(RECORD_TRUNCATE.pack(b"T", size))
        self.size = size
        self.mtime_ns = self.ctime_ns = now_ns
        self.generation += 1
        self.overwrites += 1
        return released

    def front_due(self, step_bytes: int) -> bool:
        """Whether this is a file written front to back whose unstored front has grown by a
        step: one extent from the stored front to the end, nothing else changed."""
        return (not self.base_content and self.base_valid == self.base_len
                and self.extents.pairs() == ((self.base_len, self.size),)
                and self.size - self.base_len >= step_bytes)

    def add_front(self, ids: list[bytes], lengths: list[int]) -> None:
        """Record newly stored front chunks durably, then cut their bytes out of the file."""
        start = self.base_len
        if self._sidecar_fd < 0:
            self._open_sidecar()
        self._log(b"".join(RECORD_FRONT.pack(b"F", c, n)
                           for c, n in zip(ids, lengths, strict=True)))
        os.fsync(self._sidecar_fd)  # before the punch: the bytes then live only in chunks
        for chunk_id, length in zip(ids, lengths, strict=True):
            self._add_base(chunk_id, length)
        self.extents.remove(start, self.base_len)
        try:
            punch_hole(self.fd, start, self.base_len - start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.info("%s cannot punch holes; the front stays on disk too", self.path)

    def sync(self) -> None:
        os.fsync(self.fd)
        if self._sidecar_fd >= 0:
            os.fsync(self._sidecar_fd)
        if not self.durable:
            fsync_directory(self.path.parent)
            self.durable = True

    # -- the sidecar
    def _open_sidecar(self) -> None:
        """Start the sidecar with everything a recovery needs so far."""
        fd = os.open(self.sidecar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                     | os.O_CLOEXEC, 0o600)
        records = [SIDECAR_MAGIC]
        if self.base_content:
            records.append(RECORD_BASE.pack(b"B", self.base_content))
        else:
            records += [RECORD_FRONT.pack(b"F", c, n)
                        for c, n in zip(self.base_ids, self.base_lengths, strict=True)]
        if self.base_valid < self.base_len:
            records.append(RECORD_TRUNCATE.pack(b"T", self.base_valid))
        records += [RECORD_WRITE.pack(b"W", s, e - s) for s, e in self.extents.pairs()]
        records.append(RECORD_TRUNCATE.pack(b"T", self.size))
        self._sidecar_fd = fd
        self._log(b"".join(records))
        self.durable = False  # a new name in the staging directory

    def _log(self, record: bytes) -> None:
        if self._sidecar_fd < 0:
            self._open_sidecar()  # writes this state, which already includes the record
            return
        os.write(self._sidecar_fd, record)

    def _drop_sidecar(self) -> None:
        if self._sidecar_fd >= 0:  # a sidecar exists only while it is open (see _replay)
            os.close(self._sidecar_fd)
            self._sidecar_fd = -1
            self.sidecar.unlink(missing_ok=True)

    @classmethod
    def reopen(cls, path: Path, content_chunks: ContentChunks) -> Staging:
        """A staging a crash left, rebuilt from its file and its sidecar."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(fd)
        staging = cls(path, fd, st.st_size, st.st_mtime_ns, durable=True)
        try:
            staging._replay(st.st_size, content_chunks)
        except BaseException:
            os.close(fd)
            raise
        return staging

    def _replay(self, file_size: int, content_chunks: ContentChunks) -> None:
        old = self.path.with_name(self.path.name + OLD_SIDECAR_SUFFIX)
        if old.exists():  # the previous layout: the front, then the file from there on
            body = old.read_bytes()[len(OLD_SIDECAR_MAGIC):]
            body = body[: len(body) - len(body) % OLD_SIDECAR_ENTRY.size]
            for chunk_id, length in OLD_SIDECAR_ENTRY.iter_unpack(body):
                self._add_base(chunk_id, length)
            self.size = max(file_size, self.base_len)
            self.extents.add(self.base_len, self.size)
            old.unlink()
            self._open_sidecar()
            return
        try:
            raw = self.sidecar.read_bytes()
        except FileNotFoundError:
            self.extents.add(0, file_size)
            return
        if not raw.startswith(SIDECAR_MAGIC):
            raise ValueError(f"{self.sidecar} is not a staging sidecar")
        pos = len(SIDECAR_MAGIC)
        while pos < len(raw):
            record = RECORDS.get(raw[pos : pos + 1])
            if record is None or pos + record.size > len(raw):
                break  # torn or unknown: the log ends here
            fields = record.unpack_from(raw, pos)
            pos += record.size
            self._apply(fields, content_chunks)
        self._sidecar_fd = os.open(self.sidecar, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def _apply(self, fields: tuple[Any, ...], content_chunks: ContentChunks) -> None:
        tag = fields[0]
        if tag == b"B":
            ids, lengths = content_chunks(fields[1])
            self.base_content = fields[1]
            for chunk_id, length in zip(ids, lengths, strict=True):
                self._add_base(chunk_id, length)
            self.size = self.base_len
        elif tag == b"F":
            start = self.base_len
            self._add_base(fields[1], fields[2])
            self.extents.remove(start, self.base_len)
            self.size = max(self.size, self.base_len)
        elif tag == b"W":
            offset, length = fields[1], fields[2]
            self.extents.add(offset, offset + length)
            self.size = max(self.size, offset + length)
        else:
            self.extents.clip(fields[1])
            self.base_valid = min(self.base_valid, fields[1])
            self.size = fields[1]

    # -- readers in other threads
    @contextmanager
    def in_use(self) -> Iterator[bool]:
        """Hold the file open while reading it; yields False if it was discarded already."""
        with self._guard:
            alive = not self._discarded
            self._users += alive
        try:
            yield alive
        finally:
            if alive:
                with self._guard:
                    self._users -= 1
                    close = self._discarded and self._users == 0
                if close:
                    os.close(self.fd)

    def discard(self) -> None:
        """Remove the files now; close the descriptor once no reader holds it."""
        with self._guard:
            if self._discarded:
                return
            self._discarded = True
            close = self._users == 0
        self._drop_sidecar()
        self.path.unlink(missing_ok=True)
        if close:
            os.close(self.fd)
