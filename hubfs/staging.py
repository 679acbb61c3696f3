"""A file being written through the mount: its bytes until they are stored.

The bytes live in ``STORE/staging/<ino>-<stamp>`` (a new name each time, so discarding an old
staging can never remove its successor's file). While a file grows front to back (every download),
its finished front is ingested every ``INGEST_STEP_BYTES`` and cut out of the staging file
with ``fallocate(PUNCH_HOLE)``, so a download never needs two full copies on disk: the front is
then the list of chunks in ``prefix_ids`` (indexed, pinned against gc), also written to the
append-only sidecar ``STORE/staging/<ino>.prefix`` *before* the hole is punched, so that a
crash recovers the front from the sidecar and the rest from the staging file.

Sidecar layout: 8-byte magic ``HUBFSPFX``, then per chunk 32 bytes of chunk id and a u32 LE
length. A torn last entry (a crash mid-append) is ignored: its bytes were not punched yet.

Callers serialise changes with the filesystem's lock. Readers in other threads hold ``in_use``:
a discarded staging closes its file only when the last of them is done.
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

from .packs import fsync_directory

log = logging.getLogger(__name__)

INGEST_STEP_BYTES = 64 * 1024 * 1024
SIDECAR_MAGIC = b"HUBFSPFX"
SIDECAR_ENTRY = struct.Struct("<32sI")
SIDECAR_SUFFIX = ".prefix"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

# chunk id, first byte, end byte -> those bytes of the chunk (from the store)
ChunkBytes = Callable[[bytes, int, int], bytes]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give back the disk blocks of a range, keeping the file's size (reads see zeros)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Staging:
    path: Path
    fd: int
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    generation: int = 0  # bumped by every change, so a commit can tell it raced a write
    overwrites: int = 0  # writes below the end and truncations: front ingests racing them stop
    durable: bool = False
    ingesting: bool = False
    prefix_ids: list[bytes] = field(default_factory=list)
    prefix_lengths: list[int] = field(default_factory=list)
    prefix_starts: list[int] = field(default_factory=list)
    prefix_len: int = 0
    _users: int = 0
    _discarded: bool = False
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name + SIDECAR_SUFFIX)

    @classmethod
    def create(cls, directory: Path, ino: int, mtime_ns: int) -> Staging:
        path = directory / f"{ino:016x}-{time.time_ns():x}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return cls(path, fd, 0, mtime_ns)

    @staticmethod
    def inode_of(name: str) -> int | None:
        """The inode a staging file name belongs to (``None``: not a staging file)."""
        ino, sep, stamp = name.partition("-")
        try:
            return int(ino, 16) if sep and int(stamp, 16) >= 0 else None
        except ValueError:
            return None

    @classmethod
    def reopen(cls, path: Path) -> Staging:
        """A staging file a crash left, with the front its sidecar names."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(fd)
        staging = cls(path, fd, st.st_size, st.st_mtime_ns, durable=True)
        try:
            raw = staging.sidecar.read_bytes()
        except FileNotFoundError:
            return staging
        if not raw.startswith(SIDECAR_MAGIC):
            log.warning("ignoring %s: not a staging sidecar", staging.sidecar)
            return staging
        body = raw[len(SIDECAR_MAGIC) :]
        whole = len(body) - len(body) % SIDECAR_ENTRY.size
        for chunk_id, length in SIDECAR_ENTRY.iter_unpack(body[:whole]):
            staging._add_prefix(chunk_id, length)
        return staging

    def _add_prefix(self, chunk_id: bytes, length: int) -> None:
        self.prefix_ids.append(chunk_id)
        self.prefix_lengths.append(length)
        self.prefix_starts.append(self.prefix_len)
        self.prefix_len += length

    def read(self, offset: int, size: int, chunk_bytes: ChunkBytes) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        pieces = []
        pos = offset
        if pos < self.prefix_len:
            i = bisect.bisect_right(self.prefix_starts, pos) - 1
            while pos < min(end, self.prefix_len):
                start = self.prefix_starts[i]
                hi = min(end - start, self.prefix_lengths[i])
                pieces.append(chunk_bytes(self.prefix_ids[i], pos - start, hi))
                pos = start + hi
                i += 1
        if pos < end:
            pieces.append(os.pread(self.fd, end - pos, pos))
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def write(self, offset: int, data: bytes, now_ns: int) -> int:
        """Write into the staging file; the caller has restored the front if ``offset`` lies
        inside it."""
        written = os.pwrite(self.fd, data, offset)
        if offset < self.size:
            self.overwrites += 1
        self.size = max(self.size, offset + written)
        self.mtime_ns = self.ctime_ns = now_ns
        self.generation += 1
        return written

    def truncate(self, size: int, now_ns: int) -> list[bytes]:
        """Cut the file to ``size`` (the caller has restored the front if ``size`` lies inside
        it); returns the front's chunk ids when truncating to nothing drops the front."""
        released: list[bytes] = []
        if size == 0 and self.prefix_ids:
            released = self._drop_front()
        os.ftruncate(self.fd, size)
        self.size = size
        self.mtime_ns = self.ctime_ns = now_ns
        self.generation += 1
        self.overwrites += 1
        return released

    def _drop_front(self) -> list[bytes]:
        self.sidecar.unlink(missing_ok=True)
        released = self.prefix_ids
        self.prefix_ids, self.prefix_lengths, self.prefix_starts = [], [], []
        self.prefix_len = 0
        return released

    def add_front(self, ids: list[bytes], lengths: list[int]) -> None:
        """Record newly ingested front chunks durably, then cut their bytes out of the file."""
        new = not self.prefix_ids
        entries = b"".join(SIDECAR_ENTRY.pack(c, n) for c, n in zip(ids, lengths, strict=True))
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if new else 0)
        fd = os.open(self.sidecar, flags, 0o600)
        try:
            os.write(fd, (SIDECAR_MAGIC if new else b"") + entries)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_directory(self.path.parent)
        start = self.prefix_len
        for chunk_id, length in zip(ids, lengths, strict=True):
            self._add_prefix(chunk_id, length)
        try:
            punch_hole(self.fd, start, self.prefix_len - start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.info("%s cannot punch holes; the front stays on disk too", self.path)

    def restore_front(self, chunk_bytes: ChunkBytes) -> list[bytes]:
        """Put the front's bytes back into the staging file (a write or truncate reaches into
        it); returns the chunk ids it no longer needs pinned."""
        for chunk_id, start, length in zip(self.prefix_ids, self.prefix_starts,
                                           self.prefix_lengths, strict=True):
            os.pwrite(self.fd, chunk_bytes(chunk_id, 0, length), start)
        os.fsync(self.fd)
        return self._drop_front()

    def sync(self) -> None:
        os.fsync(self.fd)
        if not self.durable:
            fsync_directory(self.path.parent)
            self.durable = True

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
        for path in (self.path, self.sidecar):
            path.unlink(missing_ok=True)
        if close:
            os.close(self.fd)
