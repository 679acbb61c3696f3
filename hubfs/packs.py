"""Pack files: chunk records at rest, append-only, each record self-describing.

A record carries its chunk id, codec, lengths and checksums, so the index can be rebuilt by
scanning packs, and ``verify`` can check every byte without the index. Checksums cover blocks of
``CHECK_BLOCK_BYTES`` of the stored bytes rather than the whole record: a 4 KiB read of a raw
chunk then reads and checks 64 KiB, not the whole chunk. Packs are sealed at
``PACK_TARGET_BYTES``; a record whose write failed is cut off again, so a pack only ever ends
with whole records; a torn tail a crash left is never cut (damage could make intact records
look torn): appending moves on to a new pack and gc drops the unreferenced bytes.

Pack file layout::

    offset  size  field
    0       8     magic b"HUBFSPAK"
    8       4     pack format version (u32 LE)
    12      4     pack id (u32 LE)
    16      ...   records, back to back

Record layout (little endian)::

    0       4     magic b"HCK1"
    4       1     record format version
    5       1     codec (hubfs.compression.Codec)
    6       2     n = number of block checksums
    8       4     raw length
    12      4     stored length
    16      32    chunk id: BLAKE3-256 of the raw bytes
    48      8*n   xxh3-64 of each CHECK_BLOCK_BYTES block of the stored bytes
    48+8n   8     xxh3-64 of bytes [0, 48+8n): guards the header itself
    56+8n   ...   stored bytes
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .compression import Codec
from .errors import IntegrityError, StoreFullError

log = logging.getLogger(__name__)

PACK_MAGIC = b"HUBFSPAK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII")
RECORD_MAGIC = b"HCK1"
RECORD_VERSION = 1
RECORD_FIXED = struct.Struct("<4sBBHII32s")
SUM = struct.Struct("<Q")
CHECK_BLOCK_BYTES = 64 * 1024
PACK_TARGET_BYTES = 128 * 1024 * 1024
MAX_RECORD_RAW_BYTES = 64 * 1024 * 1024  # far above any chunk size; bounds what a scan reads
OPEN_PACKS_MAX = 64
# Chunk locations share one id space: packs count up from 1, objects (hubfs.objects: one raw
# file per content, no record headers) carry this bit.
OBJECT_BIT = 1 << 31
# Pack id 0 is never a pack: a cluster node's chunk whose bytes only the object store holds
# (hubfs.cluster); a read fetches it first. No pack file, no sums.
REMOTE_PACK_ID = 0


# What a user can do about pack bytes that are damaged or gone, said the same way everywhere.
PACK_DAMAGE_FIX = ("`hubfs verify --repair STORE` re-points such chunks to an intact copy if a "
                   "pack holds one, but cannot bring back bytes no pack holds: it lists the "
                   "files to restore from their source")


class PackMissingError(IntegrityError):
    """A pack file is gone: gc deleted it after moving its chunks, or the store is damaged."""


def block_sums(stored: bytes | memoryview) -> tuple[int, ...]:
    view = memoryview(stored)
    return tuple(
        xxhash.xxh3_64_intdigest(view[i : i + CHECK_BLOCK_BYTES])
        for i in range(0, len(view), CHECK_BLOCK_BYTES)
    )


def header_bytes(n_sums: int) -> int:
    return RECORD_FIXED.size + SUM.size * n_sums + SUM.size


@dataclass(frozen=True)
class ChunkLocation:
    """Where a chunk's record lives and how to read it back."""

    pack_id: int  # a pack, or an object (``OBJECT_BIT`` set)
    offset: int  # of the record header in the pack file; of the bytes themselves in an object
    codec: Codec
    raw_len: int
    stored_len: int
    sums: tuple[int, ...]

    @property
    def in_object(self) -> bool:
        return bool(self.pack_id & OBJECT_BIT)

    @property
    def remote(self) -> bool:
        """Only the cluster's object store holds the bytes (``REMOTE_PACK_ID``)."""
        return self.pack_id == REMOTE_PACK_ID

    @property
    def payload_offset(self) -> int:
        return self.offset if self.in_object else self.offset + header_bytes(len(self.sums))

    @property
    def record_end(self) -> int:
        return self.payload_offset + self.stored_len


def remote_location(raw_len: int) -> ChunkLocation:
    """Where a chunk the node does not hold yet is: nowhere local (``REMOTE_PACK_ID``)."""
    return ChunkLocation(REMOTE_PACK_ID, 0, Codec.RAW, raw_len, 0, ())


def encode_header(chunk_id: bytes, codec: Codec, raw_len: int, stored_len: int,
                  sums: tuple[int, ...]) -> bytes:
    head = RECORD_FIXED.pack(RECORD_MAGIC, RECORD_VERSION, codec, len(sums), raw_len,
                             stored_len, chunk_id)
    head += b"".join(SUM.pack(s) for s in sums)
    return head + SUM.pack(xxhash.xxh3_64_intdigest(head))


@dataclass(frozen=True)
class ScannedRecord:
    chunk_id: bytes
    location: ChunkLocation


def pack_name(pack_id: int) -> str:
    return f"{pack_id:08x}.pack"


def object_name(object_id: int) -> str:
    return f"{object_id & ~OBJECT_BIT:08x}.obj"


def location_name(pack_id: int) -> str:
    """A pack's or an object's name in messages."""
    return f"object {object_name(pack_id)}" if pack_id & OBJECT_BIT else f"pack {pack_id:08x}"


class PackFiles:
    """Reads records: a bounded set of open pack (and object) descriptors and checksum-checked
    ``pread``. Objects live in ``objects_dir`` (by default ``objects`` beside the packs)."""

    def __init__(self, directory: Path, objects_dir: Path | None = None) -> None:
        self.directory = directory
        self.objects_dir = objects_dir or directory.parent / "objects"
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._retired: list[int] = []
        self._lock = threading.Lock()

    def path(self, pack_id: int) -> Path:
        if pack_id & OBJECT_BIT:
            return self.objects_dir / object_name(pack_id)
        return self.directory / pack_name(pack_id)

    def fd(self, pack_id: int) -> int:
        with self._lock:
            fd = self._fds.get(pack_id)
            if fd is not None:
                self._fds.move_to_end(pack_id)
                return fd
            try:
                fd = os.open(self.path(pack_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise PackMissingError(
                    f"{location_name(pack_id)} file {self.path(pack_id)} is missing (put it back if it was moved); "
                    f"{PACK_DAMAGE_FIX}", None) from None
            self._fds[pack_id] = fd
            if len(self._fds) > OPEN_PACKS_MAX:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def retire(self, pack_id: int) -> None:
        """Stop handing out a pack that gc deletes; its descriptor stays open for reads in
        flight until ``close_retired``."""
        with self._lock:
            fd = self._fds.pop(pack_id, None)
            if fd is not None:
                self._retired.append(fd)

    def close_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        for fd in retired:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()

    def read_blocks(self, chunk_id: bytes, loc: ChunkLocation, first: int, last: int) -> bytes:
        """Stored bytes of blocks ``[first, last)``, each checked against its checksum."""
        start = first * CHECK_BLOCK_BYTES
        end = min(last * CHECK_BLOCK_BYTES, loc.stored_len)
        data = os.pread(self.fd(loc.pack_id), end - start, loc.payload_offset + start)
        if len(data) != end - start:
            raise self._damaged(chunk_id, loc, "the pack is shorter than the index says")
        view = memoryview(data)
        for i, block in enumerate(range(first, last)):
            piece = view[i * CHECK_BLOCK_BYTES : (i + 1) * CHECK_BLOCK_BYTES]
            if xxhash.xxh3_64_intdigest(piece) != loc.sums[block]:
                raise self._damaged(chunk_id, loc, f"checksum mismatch in block {block}")
        return data

    def read_stored(self, chunk_id: bytes, loc: ChunkLocation) -> bytes:
        return self.read_blocks(chunk_id, loc, 0, len(loc.sums))

    def _damaged(self, chunk_id: bytes, loc: ChunkLocation, why: str) -> IntegrityError:
        return IntegrityError(
            f"damaged chunk {chunk_id.hex()[:16]} in {self.path(loc.pack_id)} at offset "
            f"{loc.offset}: {why}; {PACK_DAMAGE_FIX}",
            chunk_id,
        )


class PackWriter:
    """Appends records to the newest pack; thread-safe; seals packs at the target size.

    Appended bytes are not durable until ``sync``: callers sync before the index transaction
    that references them commits, so an index entry never points at missing bytes.
    """

    def __init__(self, directory: Path, target_bytes: int = PACK_TARGET_BYTES) -> None:
        self.directory = directory
        self.target_bytes = target_bytes
        # Lock order: _sync_lock, then _lock. _lock guards the fields below and is held only
        # for an append's pwrite, never across an fsync.
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._unsynced: dict[int, int] = {}  # pack id -> fd with bytes not yet fsync'd
        self._retired: list[int] = []  # fds of sealed packs, closed by the next sync
        self._dir_unsynced = False
        existing = sorted(pack_ids(directory))
        self._pack_id = existing[-1] if existing else 0
        self._fd = -1
        self._end = 0
        if existing:
            self._open_existing(self._pack_id)
        else:
            self._start_pack(1)

    def _open_existing(self, pack_id: int) -> None:
        path = self.directory / pack_name(pack_id)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        end = valid_end(fd)
        size = os.fstat(fd).st_size
        self._pack_id, self._fd, self._end = pack_id, fd, end
        if end < size:
            # A torn write, or damage that hides intact records from the scanner: never cut
            # bytes the index may reference. gc drops what nothing references.
            log.warning("pack %s ends in %d bytes that are not an intact record; they are left "
                        "for verify and gc, new records go to a new pack", path, size - end)
            self._start_pack(pack_id + 1)
        elif end >= self.target_bytes:
            self._start_pack(pack_id + 1)

    def _start_pack(self, pack_id: int) -> None:
        if self._fd >= 0:
            self._retired.append(self._fd)  # the next sync syncs (if need be) and closes it
        path = self.directory / pack_name(pack_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, [PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, pack_id)], 0)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(self.directory) from exc
            raise
        self._pack_id, self._fd, self._end = pack_id, fd, PACK_HEADER.size
        self._unsynced[pack_id] = fd
        self._dir_unsynced = True

    def append(self, chunk_id: bytes, codec: Codec, raw_len: int,
               stored: bytes | memoryview) -> ChunkLocation:
        sums = block_sums(stored)
        header = encode_header(chunk_id, codec, raw_len, len(stored), sums)
        with self._lock:
            if self._end >= self.target_bytes:
                self._start_pack(self._pack_id + 1)
            offset = self._end
            try:
                _write_all(self._fd, [header, stored], offset)
            except OSError as exc:
                os.ftruncate(self._fd, offset)  # never leave a torn record behind
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _disk_full(self.directory) from exc
                raise
            self._end = offset + len(header) + len(stored)
            self._unsynced[self._pack_id] = self._fd
            # under the lock: a concurrent append may start a new pack right after it
            return ChunkLocation(self._pack_id, offset, codec, raw_len, len(stored), sums)

    def mark(self) -> tuple[int, int]:
        """Where the next record goes: ``rollback`` returns here."""
        with self._lock:
            return self._pack_id, self._end

    def rollback(self, mark: tuple[int, int]) -> None:
        """Drop every record appended since ``mark``: packs started since are deleted, the
        pack of the mark is cut back to it. Only for a caller that is the store's one writer
        and has committed nothing since ``mark`` (``hubfs import`` on a full disk): nothing
        may reference these records."""
        pack_id, end = mark
        with self._lock:
            for later in sorted((p for p in pack_ids(self.directory) if p > pack_id),
                                reverse=True):
                fd = self._unsynced.pop(later, None)
                if fd is not None and fd != self._fd:
                    os.close(fd)
                if later == self._pack_id:
                    os.close(self._fd)
                    self._fd = -1
                os.unlink(self.directory / pack_name(later))
                self._dir_unsynced = True
            if self._fd < 0 or self._pack_id != pack_id:
                self._fd = self._unsynced.get(pack_id, -1)
                if self._fd < 0:
                    self._fd = os.open(self.directory / pack_name(pack_id),
                                       os.O_RDWR | os.O_CLOEXEC)
            os.ftruncate(self._fd, end)
            self._pack_id, self._end = pack_id, end
            self._unsynced[pack_id] = self._fd

    @property
    def current_pack(self) -> int:
        return self._pack_id

    def seal(self) -> None:
        """Start a new pack, so every existing one is sealed (gc rewrites only sealed packs)."""
        with self._lock:
            if self._end > PACK_HEADER.size:
                self._start_pack(self._pack_id + 1)

    def sync(self) -> None:
        """Make every record appended before this call durable (and new pack files' names).

        Appends go on while the fsync runs. Callers that arrive meanwhile wait for it and
        then find their records synced by it or sync what is left: one fsync serves many
        (group commit)."""
        with self._sync_lock:
            with self._lock:
                pending, self._unsynced = self._unsynced, {}
                retired, self._retired = self._retired, []
                dir_pending, self._dir_unsynced = self._dir_unsynced, False
            try:
                for fd in pending.values():
                    os.fsync(fd)
                if dir_pending:
                    fsync_directory(self.directory)
            except BaseException:
                with self._lock:  # not durable: the next sync tries again
                    self._unsynced = {**pending, **self._unsynced}
                    self._retired = retired + self._retired
                    self._dir_unsynced |= dir_pending
                raise
            for fd in retired:
                os.close(fd)

    def close(self) -> None:
        self.sync()
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _disk_full(directory: Path) -> StoreFullError:
    return StoreFullError(f"no space left on the disk holding {directory}: free space there "
                          "(or run `hubfs gc`) and retry")


def fsync_directory(path: Path) -> None:
    """Make the names in a directory durable (a new or removed file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def pack_ids(directory: Path) -> list[int]:
    ids = []
    for entry in os.scandir(directory):
        stem, _, ext = entry.name.partition(".")
        if ext == "pack" and len(stem) == 8:
            try:
                ids.append(int(stem, 16))
            except ValueError:
                continue
    return ids


def parse_header(buf: bytes, pack_id: int, offset: int) -> ScannedRecord | None:
    """The record whose header starts ``buf``, or ``None`` if it is not an intact header."""
    if len(buf) < RECORD_FIXED.size:
        return None
    magic, version, codec, n, raw_len, stored_len, chunk_id = RECORD_FIXED.unpack_from(buf, 0)
    if magic != RECORD_MAGIC or version != RECORD_VERSION:
        return None
    if raw_len > MAX_RECORD_RAW_BYTES or stored_len > MAX_RECORD_RAW_BYTES + 1024:
        return None
    if n != -(-stored_len // CHECK_BLOCK_BYTES):
        return None
    size = header_bytes(n)
    if len(buf) < size:
        return None
    (check,) = SUM.unpack_from(buf, size - SUM.size)
    if xxhash.xxh3_64_intdigest(memoryview(buf)[: size - SUM.size]) != check:
        return None
    try:
        codec = Codec(codec)
    except ValueError:
        return None
    sums = tuple(SUM.unpack_from(buf, RECORD_FIXED.size + SUM.size * i)[0] for i in range(n))
    return ScannedRecord(chunk_id, ChunkLocation(pack_id, offset, codec, raw_len, stored_len, sums))


def scan(fd: int, pack_id: int) -> Iterator[ScannedRecord]:
    """Intact records of a pack in order. Reads headers only; payload checksums are the
    caller's to check. A damaged header is skipped by searching for the next intact one, so
    one flipped bit costs one record, not the rest of the pack."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, PACK_HEADER.size, 0)
    if len(head) < PACK_HEADER.size or PACK_HEADER.unpack(head)[:2] != (PACK_MAGIC, PACK_VERSION):
        return
    offset = PACK_HEADER.size
    while offset < size:
        rec = _record_at(fd, pack_id, offset, size)
        if rec is None:
            rec = _resync(fd, pack_id, offset + 1, size)
            if rec is None:
                return
        yield rec
        offset = rec.location.record_end


MAX_HEADER_BYTES = header_bytes(-(-(MAX_RECORD_RAW_BYTES + 1024) // CHECK_BLOCK_BYTES))
RESYNC_WINDOW_BYTES = 1024 * 1024


def _record_at(fd: int, pack_id: int, offset: int, size: int) -> ScannedRecord | None:
    first = os.pread(fd, min(header_bytes(16), size - offset), offset)
    rec = parse_header(first, pack_id, offset)
    if rec is None and len(first) >= RECORD_FIXED.size:
        n = RECORD_FIXED.unpack_from(first, 0)[3]
        if header_bytes(n) <= MAX_HEADER_BYTES:
            rec = parse_header(os.pread(fd, header_bytes(n), offset), pack_id, offset)
    if rec is None or rec.location.record_end > size:
        return None
    return rec


def _resync(fd: int, pack_id: int, offset: int, size: int) -> ScannedRecord | None:
    """The next intact record at or after ``offset``: every magic inside a window is tried
    before the next window is read, so lookalike bytes cost one window read, not one each."""
    while offset < size:
        window = os.pread(fd, RESYNC_WINDOW_BYTES + len(RECORD_MAGIC) - 1, offset)
        found = window.find(RECORD_MAGIC)
        while 0 <= found < RESYNC_WINDOW_BYTES:
            rec = _record_at(fd, pack_id, offset + found, size)
            if rec is not None:
                return rec
            found = window.find(RECORD_MAGIC, found + 1)
        offset += RESYNC_WINDOW_BYTES
    return None


def valid_end(fd: int) -> int:
    """Offset just past the last intact record (the pack header if none): what follows is a
    torn tail that a crash left."""
    end = PACK_HEADER.size
    for rec in scan(fd, 0):
        end = rec.location.record_end
    return end
