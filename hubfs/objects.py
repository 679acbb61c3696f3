"""Objects: one file per large content, its bytes raw and contiguous, shared by every reader.

Why: FUSE passthrough lets the kernel serve an open file's read and mmap straight from a real
file, at disk speed, and every FUSE inode over that file shares its page cache (issue 10). A
content spread over pack records cannot be such a file; an object is. Ten users with one model
then cost one copy on disk and one in RAM.

Layout: ``STORE/objects/<n:08x>.obj``, mode 0400. Object ids share the chunk-location id space
with packs (``packs.OBJECT_BIT`` set), so a chunk of an object is indexed like any other chunk,
as (object id, offset, length, block sums): other contents reuse it (sub-file dedup) and daemon
reads check it. The index maps content id -> object id (``Txn.object_of``).

Which contents: a new content of at least ``OBJECT_MIN_BYTES``, whose bytes the store would keep
raw anyway (``compression.choose`` on a sample: weights, archives; not text), and at least half
of whose bytes are new. A near-identical file (a fine-tune sharing most tensors, a file updated
in place) stays chunk references into objects and packs, and the daemon serves it.

Made without a copy: a file written through the mount from nothing sits whole in its staging
file; at commit its bytes are hashed (the content id is their hash, so they are checked as they
become an object) and fsync'd in a worker, and then, on the mount's trio thread, in the same
step as the index commit (no write can land between), the staging file is hard-linked into
``objects/``. Its page cache carries over: it is the same file. The objects directory is
fsync'd before the index is synced (``Store.sync_index``), so a durable index never names an
object whose name is not durable. An object file no index entry names (a crash between the link
and the commit) is removed by gc.

Lifetime: an object lives while its content does or any chunk located in it is referenced; gc
moves such chunks into packs and then unlinks the file. Unlinking a file the kernel holds as a
backing file is safe: the kernel keeps its own reference, and opens already served go on.

Integrity: passthrough reads bypass the daemon's checksums, so ``verify`` re-chunks every object
and compares ids (``scan_object``), and ``hubfs mount -o checked`` turns passthrough off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3

from .chunking import WINDOW_BYTES, Chunker, ChunkerParams
from .compression import Codec
from .packs import OBJECT_BIT, ChunkLocation, ScannedRecord, block_sums, fsync_directory

OBJECT_MIN_BYTES = 1024 * 1024
OBJECT_SUFFIX = ".obj"
COPY_PREFIX = ".copy-"  # an import's copy of a file, until it is made an object or dropped


def worth_an_object(size: int, new_bytes: int, known: bool) -> bool:
    """The rule for a content the store would keep raw: an object when it is large and at
    least half new (or stored before without one); a near-identical file stays references."""
    return size >= OBJECT_MIN_BYTES and (known or 2 * new_bytes >= size)


def object_ids(directory: Path) -> list[int]:
    """The ids of the object files in ``directory`` (``OBJECT_BIT`` set)."""
    ids = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        stem, _, ext = entry.name.partition(".")
        if "." + ext == OBJECT_SUFFIX and len(stem) == 8:
            try:
                ids.append(int(stem, 16) | OBJECT_BIT)
            except ValueError:
                continue
    return ids


class ObjectFiles:
    """Makes objects: hands out ids, links staging files in, syncs the directory's names.

    Thread-safe (a lock guards the id counter and the unsynced flag)."""

    def __init__(self, directory: Path) -> None:
        """Opened by the store's one writer, which owns every copy left from a crash."""
        self.directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)
        for stale in directory.glob(COPY_PREFIX + "*"):
            stale.unlink()
        existing = object_ids(directory)
        self._next = (max(existing) & ~OBJECT_BIT) + 1 if existing else 1
        self._lock = threading.Lock()
        self._dir_unsynced = False
        self._copies = 0

    def path(self, object_id: int) -> Path:
        return self.directory / f"{object_id & ~OBJECT_BIT:08x}{OBJECT_SUFFIX}"

    def new_id(self) -> int:
        """A fresh object id (an id never linked is simply skipped)."""
        with self._lock:
            object_id = self._next | OBJECT_BIT
            self._next += 1
            return object_id

    def link(self, source: Path, object_id: int) -> None:
        """Make the (fsync'd) file ``source`` the object ``object_id``, read-only."""
        target = self.path(object_id)
        os.link(source, target)
        os.chmod(target, 0o400)
        with self._lock:
            self._dir_unsynced = True

    def new_copy(self) -> tuple[Path, int]:
        """A new empty file in the objects directory, open for writing, to become an object
        (``adopt``) or be removed."""
        with self._lock:
            self._copies += 1
            path = self.directory / f"{COPY_PREFIX}{os.getpid()}-{self._copies}"
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def copy_in(self, fd: int) -> Path:
        """A durable copy of the open file ``fd`` in the objects directory, not yet an object
        (an import hashes the copy, so the object holds exactly the bytes it hashed)."""
        path, out = self.new_copy()
        try:
            size, done = os.fstat(fd).st_size, 0
            while done < size:
                copied = os.sendfile(out, fd, done, size - done)  # in the kernel, any fs
                if copied == 0:
                    break  # the source shrank: the copy is what there was
                done += copied
            os.fsync(out)
        except BaseException:
            os.close(out)
            path.unlink()
            raise
        os.close(out)
        return path

    def adopt(self, copy: Path, object_id: int) -> None:
        """Make a ``copy_in`` copy the object ``object_id``."""
        target = self.path(object_id)
        os.rename(copy, target)
        os.chmod(target, 0o400)
        with self._lock:
            self._dir_unsynced = True

    def sync_directory(self) -> None:
        """Make the names of new objects durable (before an index sync that names them)."""
        with self._lock:
            pending, self._dir_unsynced = self._dir_unsynced, False
        if pending:
            try:
                fsync_directory(self.directory)
            except BaseException:
                with self._lock:
                    self._dir_unsynced = True
                raise


def chunk_file(read: Callable[[int, int], bytes | memoryview], size: int, params: ChunkerParams,
               object_id: int) -> Iterator[ScannedRecord]:
    """Cut an object's bytes as its commit did (chunking depends only on the bytes), hashing
    each chunk: the records an index holds for it, located in ``object_id``."""
    for span, data in Chunker(params).stream(read, size, 0, True, WINDOW_BYTES):
        yield ScannedRecord(blake3.blake3(data).digest(),
                            ChunkLocation(object_id, span.offset, Codec.RAW, span.length,
                                          span.length, block_sums(data)))


def scan_object(path: Path, params: ChunkerParams, object_id: int
                ) -> tuple[int, list[ScannedRecord]]:
    """An object file's size and chunk records, every byte read and hashed (verify, repair)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        records = list(chunk_file(lambda o, n: os.pread(fd, n, o), size, params, object_id))
    finally:
        os.close(fd)
    return size, records
