"""The LMDB index: every piece of metadata, and the binary layout of each value.

Named databases::

    meta          key           -> value (format version, settings JSON, counters)
    chunks        chunk id      -> ChunkEntry (pack location, codec, lengths, sums, refcount)
    contents      content id    -> ContentTable (size, chunk ids and lengths)
    content_refs  content id    -> u64 number of inodes that hold this content
    inodes        ino u64 BE    -> Inode (attributes, then content id / symlink target)
    dirents       parent+name   -> child ino u64, entry seq u64
    dirseq        parent+seq    -> name (readdir order: offsets stay valid as entries change)
    xattrs        ino+name      -> value
    objects       content id    -> u32 object id (the content's bytes as one file: hubfs.objects)
    materialised  u32 object id -> content id, u64 size: objects copied from chunks on demand

Integer keys are big-endian so LMDB's byte order is numeric order. Every value starts with a
version byte. ``Index`` hands out ``Txn`` objects; a write transaction is never held across an
``await`` (the FUSE layer runs them inside one thread call).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from .compression import Codec
from .errors import HubfsError, IntegrityError, StoreFormatError, StoreFullError
from .packs import SUM, ChunkLocation

log = logging.getLogger(__name__)

DB_NAMES = ("meta", "chunks", "contents", "content_refs", "inodes", "dirents", "dirseq", "xattrs",
            "objects", "materialised")
# Databases an index of an older store format lacks until it is opened for writing.
NEWER_DB_NAMES = ("objects", "materialised")
# Virtual address space reserved for the index; LMDB grows the file only as data is written.
MAP_SIZE_BYTES = 1 << 40
VALUE_VERSION = 1
ROOT_INO = 1
# Below this much free space a failed index write is a full disk, whatever LMDB says.
FULL_DISK_BYTES = 1024 * 1024
T = TypeVar("T")
# Errors LMDB raises when the pages it reads are not what they claim to be (or a transaction
# already hit such a page): damage to report, not a bug to show.
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError,
                 lmdb.PageFullError, lmdb.CursorFullError, lmdb.BadValsizeError,
                 lmdb.InvalidError, lmdb.IncompatibleError, lmdb.BadDbiError,
                 lmdb.ProblemError, lmdb.PanicError, lmdb.InvalidParameterError)
SETTINGS_TYPES: dict[str, type] = {"format": int, "chunker": dict, "compression": str,
                                   "pack_target_bytes": int}

U64 = struct.Struct(">Q")
U32 = struct.Struct("<I")
KEY2 = struct.Struct(">QQ")
CHUNK_ENTRY = struct.Struct("<BBIQIIIH")
CONTENT_HEAD = struct.Struct("<BQI")
CONTENT_ITEM = struct.Struct("<32sI")
INODE = struct.Struct("<BIIIIIQqqqQ")
DIRENT = struct.Struct(">QQ")


@dataclass(frozen=True)
class ChunkEntry:
    location: ChunkLocation
    refcount: int

    def encode(self) -> bytes:
        loc = self.location
        head = CHUNK_ENTRY.pack(VALUE_VERSION, loc.codec, loc.pack_id, loc.offset, loc.raw_len,
                                loc.stored_len, self.refcount, len(loc.sums))
        return head + b"".join(SUM.pack(s) for s in loc.sums)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> ChunkEntry:
        _v, codec, pack_id, offset, raw_len, stored_len, refs, n = CHUNK_ENTRY.unpack_from(raw)
        sums = struct.unpack_from(f"<{n}Q", raw, CHUNK_ENTRY.size)
        return cls(ChunkLocation(pack_id, offset, Codec(codec), raw_len, stored_len, sums), refs)


@dataclass(frozen=True)
class ContentTable:
    """A file's bytes as a list of chunks: ids and raw lengths, in file order."""

    size: int
    chunk_ids: tuple[bytes, ...]
    lengths: tuple[int, ...]

    def encode(self) -> bytes:
        head = CONTENT_HEAD.pack(VALUE_VERSION, self.size, len(self.chunk_ids))
        return head + b"".join(
            CONTENT_ITEM.pack(cid, n) for cid, n in zip(self.chunk_ids, self.lengths)
        )

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> ContentTable:
        _v, size, count = CONTENT_HEAD.unpack_from(raw)
        items = list(CONTENT_ITEM.iter_unpack(memoryview(raw)[CONTENT_HEAD.size :]))
        if len(items) != count:
            raise ValueError("content record length does not match its chunk count")
        return cls(size, tuple(i[0] for i in items), tuple(i[1] for i in items))


@dataclass(frozen=True)
class Inode:
    """Attributes of one inode. ``mode`` carries the file type bits (S_IFREG, S_IFDIR, ...)."""

    mode: int
    uid: int
    gid: int
    nlink: int = 1
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    parent: int = 0  # the directory of the latest name (a directory has only one)
    content_id: bytes = b""  # regular files: the committed content ("" = empty file)
    target: bytes = b""  # symlinks: the link target

    def encode(self) -> bytes:
        tail = self.content_id or self.target
        return INODE.pack(VALUE_VERSION, self.mode, self.uid, self.gid, self.nlink, self.rdev,
                          self.size, self.atime_ns, self.mtime_ns, self.ctime_ns,
                          self.parent) + tail

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Inode:
        (_v, mode, uid, gid, nlink, rdev, size, atime, mtime, ctime,
         parent) = INODE.unpack_from(raw)
        tail = bytes(raw[INODE.size :])
        is_reg = (mode & 0o170000) == 0o100000
        return cls(mode, uid, gid, nlink, rdev, size, atime, mtime, ctime, parent,
                   content_id=tail if is_reg else b"", target=b"" if is_reg else tail)

    def with_(self, **changes: Any) -> Inode:
        return replace(self, **changes)


# LMDB's data.mdb starts with two meta pages; each is a page header and an MDB_meta (lmdb.h,
# mdb.c). Only the fields the size check needs are read; offsets from the page start:
#     10  u16  page flags (P_META = 0x08)       16  u32  magic 0xBEEFC0DE
#     20  u32  format version (1)               40  u32  page size (free DB's md_pad)
#     80  u64  root page of the free DB         128 u64  root page of the main DB
#     136 u64  last page in use                 144 u64  transaction id
LMDB_META_BYTES = 152
LMDB_MAGIC = 0xBEEFC0DE
LMDB_P_META = 0x08
LMDB_P_INVALID = (1 << 64) - 1


def check_lmdb_file(path: Path) -> None:
    """Refuse a data.mdb whose pages lie past its end, before LMDB maps it.

    LMDB trusts its newest meta page: if the file lost its tail (an interrupted copy, a lost
    block), reading a page past the end of the mapping kills the process with SIGBUS, which no
    exception handler can catch. Both meta pages are read here with ``pread``; the one LMDB
    would use (the valid one with the higher transaction id) must point inside the file.
    """
    mdb = path / "data.mdb"
    try:
        fd = os.open(mdb, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a new index: LMDB creates the file
    except OSError:
        return  # unreadable: LMDB's own open reports it
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        first = os.pread(fd, LMDB_META_BYTES, 0)
        metas = [first]
        page_bytes = int.from_bytes(first[40:44], "little") if len(first) >= 44 else 0
        if page_bytes and page_bytes & (page_bytes - 1) == 0 and 512 <= page_bytes <= 65536:
            metas.append(os.pread(fd, LMDB_META_BYTES, page_bytes))
    finally:
        os.close(fd)
    best: tuple[int, int, int, int] | None = None  # txnid, last page, free root, main root
    for raw in metas:
        if len(raw) < LMDB_META_BYTES:
            continue
        flags = int.from_bytes(raw[10:12], "little")
        magic, version = struct.unpack_from("<II", raw, 16)
        if not flags & LMDB_P_META or magic != LMDB_MAGIC or version != 1:
            continue
        free_root, main_root = (struct.unpack_from("<Q", raw, o)[0] for o in (80, 128))
        last_page, txnid = struct.unpack_from("<QQ", raw, 136)
        if best is None or txnid > best[0]:
            best = (txnid, last_page, free_root, main_root)
    if best is None:
        raise _index_damaged(path, "neither meta page of data.mdb is intact")
    _txnid, last_page, free_root, main_root = best
    if page_bytes * (last_page + 1) > size:
        raise _index_damaged(path, f"data.mdb holds {size} bytes, its meta page needs "
                             f"{page_bytes * (last_page + 1)} (the file was cut short)")
    for root in (free_root, main_root):
        if root != LMDB_P_INVALID and root > last_page:
            raise _index_damaged(path, f"a root page ({root}) lies past the last page "
                                 f"({last_page})")


def _index_damaged(path: Path, why: str) -> StoreFormatError:
    return StoreFormatError(f"the index at {path} is damaged ({why}): run `hubfs verify "
                            "--repair STORE` to restore it from a snapshot", 3)


def _damaged(kind: str, exc: Exception) -> IntegrityError:
    return IntegrityError(f"a {kind} record in the index is damaged ({exc}): run "
                          "`hubfs verify --repair STORE` to restore it from a snapshot", None)


def decoded(kind: str, decode: Callable[[Any], T], raw: Any) -> T:
    """Decode an index value; damage (bit rot, a torn page) becomes a clean IntegrityError."""
    try:
        return decode(raw)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise _damaged(kind, exc) from None


class Txn:
    """One LMDB transaction with typed accessors for each database."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.raw = txn
        self.dbs = dbs

    # -- meta
    def meta_get(self, key: str) -> bytes | None:
        raw = self.raw.get(key.encode(), db=self.dbs["meta"])
        return bytes(raw) if raw is not None else None

    def meta_put(self, key: str, value: bytes) -> None:
        self.raw.put(key.encode(), value, db=self.dbs["meta"])

    def meta_delete(self, key: str) -> None:
        self.raw.delete(key.encode(), db=self.dbs["meta"])

    def next_counter(self, key: str, start: int = 1) -> int:
        raw = self.meta_get(key)
        value = decoded("counter", U64.unpack, raw)[0] if raw else start
        self.meta_put(key, U64.pack(value + 1))
        return value

    # -- chunks
    def chunk(self, chunk_id: bytes) -> ChunkEntry | None:
        raw = self.raw.get(chunk_id, db=self.dbs["chunks"])
        return decoded("chunk", ChunkEntry.decode, raw) if raw is not None else None

    def put_chunk(self, chunk_id: bytes, entry: ChunkEntry) -> None:
        self.raw.put(chunk_id, entry.encode(), db=self.dbs["chunks"])

    def delete_chunk(self, chunk_id: bytes) -> None:
        self.raw.delete(chunk_id, db=self.dbs["chunks"])

    def chunks(self) -> Iterator[tuple[bytes, ChunkEntry]]:
        with self.raw.cursor(db=self.dbs["chunks"]) as cur:
            for key, value in cur:
                yield bytes(key), decoded("chunk", ChunkEntry.decode, value)

    # -- contents
    def content(self, content_id: bytes) -> ContentTable | None:
        raw = self.raw.get(content_id, db=self.dbs["contents"])
        return decoded("content", ContentTable.decode, raw) if raw is not None else None

    def put_content(self, content_id: bytes, table: ContentTable) -> None:
        self.raw.put(content_id, table.encode(), db=self.dbs["contents"])

    def delete_content(self, content_id: bytes) -> None:
        self.raw.delete(content_id, db=self.dbs["contents"])
        self.raw.delete(content_id, db=self.dbs["content_refs"])

    def contents(self) -> Iterator[tuple[bytes, ContentTable]]:
        with self.raw.cursor(db=self.dbs["contents"]) as cur:
            for key, value in cur:
                yield bytes(key), decoded("content", ContentTable.decode, value)

    def content_refs(self, content_id: bytes) -> int:
        raw = self.raw.get(content_id, db=self.dbs["content_refs"])
        return decoded("content reference count", U64.unpack, raw)[0] if raw else 0

    def put_content_refs(self, content_id: bytes, refs: int) -> None:
        self.raw.put(content_id, U64.pack(refs), db=self.dbs["content_refs"])

    def all_content_refs(self) -> Iterator[tuple[bytes, int]]:
        with self.raw.cursor(db=self.dbs["content_refs"]) as cur:
            for key, value in cur:
                yield bytes(key), decoded("content reference count", U64.unpack, value)[0]

    # -- objects
    def object_of(self, content_id: bytes) -> int | None:
        raw = self.raw.get(content_id, db=self.dbs["objects"])
        return decoded("object", U32.unpack, raw)[0] if raw is not None else None

    def put_object(self, content_id: bytes, object_id: int) -> None:
        self.raw.put(content_id, U32.pack(object_id), db=self.dbs["objects"])

    def delete_object(self, content_id: bytes) -> None:
        self.raw.delete(content_id, db=self.dbs["objects"])

    def objects(self) -> Iterator[tuple[bytes, int]]:
        with self.raw.cursor(db=self.dbs["objects"]) as cur:
            for key, value in cur:
                yield bytes(key), decoded("object", U32.unpack, value)[0]

    def materialised(self) -> Iterator[tuple[int, bytes, int]]:
        """``(object id, content id, size)`` of every materialised object."""
        with self.raw.cursor(db=self.dbs["materialised"]) as cur:
            for key, value in cur:
                size = decoded("materialised object", U64.unpack, value[32:40])[0]
                yield decoded("materialised object", U32.unpack, key)[0], bytes(value[:32]), size

    def put_materialised(self, object_id: int, content_id: bytes, size: int) -> None:
        self.raw.put(U32.pack(object_id), content_id + U64.pack(size),
                     db=self.dbs["materialised"])

    def delete_materialised(self, object_id: int) -> None:
        self.raw.delete(U32.pack(object_id), db=self.dbs["materialised"])

    # -- inodes
    def inode(self, ino: int) -> Inode | None:
        raw = self.raw.get(U64.pack(ino), db=self.dbs["inodes"])
        return decoded("inode", Inode.decode, raw) if raw is not None else None

    def put_inode(self, ino: int, inode: Inode) -> None:
        self.raw.put(U64.pack(ino), inode.encode(), db=self.dbs["inodes"])

    def delete_inode(self, ino: int) -> None:
        self.raw.delete(U64.pack(ino), db=self.dbs["inodes"])

    def inodes(self) -> Iterator[tuple[int, Inode]]:
        with self.raw.cursor(db=self.dbs["inodes"]) as cur:
            for key, value in cur:
                yield (decoded("inode", U64.unpack, key)[0],
                       decoded("inode", Inode.decode, value))

    # -- directory entries
    def dirent(self, parent: int, name: bytes) -> tuple[int, int] | None:
        raw = self.raw.get(U64.pack(parent) + name, db=self.dbs["dirents"])
        return decoded("directory entry", DIRENT.unpack, raw) if raw is not None else None

    def put_dirent(self, parent: int, name: bytes, child: int, seq: int) -> None:
        self.raw.put(U64.pack(parent) + name, DIRENT.pack(child, seq), db=self.dbs["dirents"])
        self.raw.put(KEY2.pack(parent, seq), name, db=self.dbs["dirseq"])

    def delete_dirent(self, parent: int, name: bytes, seq: int) -> None:
        self.raw.delete(U64.pack(parent) + name, db=self.dbs["dirents"])
        self.raw.delete(KEY2.pack(parent, seq), db=self.dbs["dirseq"])

    def dir_has_entries(self, parent: int) -> bool:
        with self.raw.cursor(db=self.dbs["dirseq"]) as cur:
            return cur.set_range(U64.pack(parent)) and cur.key()[:8] == U64.pack(parent)

    def dir_entries(self, parent: int, after_seq: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """``(seq, name, child)`` of a directory in creation order, from ``after_seq`` on."""
        prefix = U64.pack(parent)
        dirents = self.dbs["dirents"]
        with self.raw.cursor(db=self.dbs["dirseq"]) as cur:
            if not cur.set_range(KEY2.pack(parent, after_seq + 1)):
                return
            for key, name in cur:
                if key[:8] != prefix:
                    return
                seq = decoded("directory order", U64.unpack, key[8:])[0]
                raw = self.raw.get(prefix + name, db=dirents) or b""
                child = decoded("directory entry", DIRENT.unpack, raw)[0]
                yield seq, bytes(name), child

    def all_dirents(self) -> Iterator[tuple[int, bytes, int, int]]:
        with self.raw.cursor(db=self.dbs["dirents"]) as cur:
            for key, value in cur:
                child, seq = decoded("directory entry", DIRENT.unpack, value)
                yield decoded("directory entry", U64.unpack, key[:8])[0], bytes(key[8:]), child, seq

    def all_dirseq(self) -> Iterator[tuple[int, int, bytes]]:
        """``(parent, seq, name)`` of every readdir-order record (for verify)."""
        with self.raw.cursor(db=self.dbs["dirseq"]) as cur:
            for key, name in cur:
                parent, seq = decoded("directory order", KEY2.unpack, key)
                yield parent, seq, bytes(name)

    def all_xattr_inos(self) -> Iterator[int]:
        """The inode of every extended attribute record (for verify)."""
        with self.raw.cursor(db=self.dbs["xattrs"]) as cur:
            for key in cur.iternext(values=False):
                yield decoded("extended attribute", U64.unpack, key[:8])[0]

    # -- extended attributes
    def xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self.raw.get(U64.pack(ino) + name, db=self.dbs["xattrs"])
        return bytes(raw) if raw is not None else None

    def put_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.raw.put(U64.pack(ino) + name, value, db=self.dbs["xattrs"])

    def delete_xattr(self, ino: int, name: bytes) -> bool:
        return bool(self.raw.delete(U64.pack(ino) + name, db=self.dbs["xattrs"]))

    def xattr_names(self, ino: int) -> list[bytes]:
        prefix = U64.pack(ino)
        names = []
        with self.raw.cursor(db=self.dbs["xattrs"]) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if key[:8] != prefix:
                        break
                    names.append(bytes(key[8:]))
        return names


class Index:
    """The LMDB environment of a store."""

    def __init__(self, path: Path, readonly: bool = False, create: bool = False,
                 sync_each_commit: bool = True, tolerate_missing: bool = False) -> None:
        """``sync_each_commit`` False: commits reach the OS at once (a killed process loses
        none) but the disk only at ``sync``: the mount's group commit, which calls it at
        fsync, fsyncdir, unmount and every ``SYNC_INTERVAL_S``."""
        self.path = path
        self.sync_each_commit = sync_each_commit
        self.unsynced = False  # commits since the last sync (when commits do not sync)
        check_lmdb_file(path)
        try:
            self.env = lmdb.open(str(path), map_size=MAP_SIZE_BYTES, max_dbs=len(DB_NAMES) + 2,
                                 readonly=readonly, create=create, subdir=True, max_readers=512,
                                 sync=sync_each_commit)
        except lmdb.InvalidError as exc:
            raise _index_damaged(path, f"LMDB: {exc}") from None
        except lmdb.Error as exc:
            raise StoreFormatError(
                f"cannot open the index at {path}: {exc}; check that this is a hubfs store "
                "(`hubfs init` makes one) and that you may read it") from exc
        try:
            self.dbs = {}
            for name in DB_NAMES:
                try:
                    self.dbs[name] = self.env.open_db(name.encode(), create=not readonly)
                except lmdb.NotFoundError:
                    if not (tolerate_missing and name in NEWER_DB_NAMES):
                        raise
        except lmdb.Error as exc:
            self.env.close()
            raise StoreFormatError(
                f"the index at {path} lacks the hubfs databases ({exc}); it is not a hubfs "
                "store, or a damaged one: `hubfs verify --repair` restores it", 3) from None

    @contextmanager
    def read(self) -> Iterator[Txn]:
        try:
            with self.env.begin(write=False, buffers=False) as txn:
                yield Txn(txn, self.dbs)
        except DAMAGE_ERRORS as exc:
            raise self._lmdb_damage(exc) from None

    def _lmdb_damage(self, exc: lmdb.Error) -> IntegrityError:
        return IntegrityError(f"the index at {self.path} is damaged (LMDB: {exc}): run "
                              "`hubfs verify --repair STORE` to restore it from a snapshot", None)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        try:
            with self.env.begin(write=True) as txn:
                yield Txn(txn, self.dbs)
            self.unsynced = True
        except DAMAGE_ERRORS as exc:
            raise self._lmdb_damage(exc) from None
        except lmdb.MapFullError as exc:
            raise HubfsError(f"the index at {self.path} is full ({exc})") from exc
        except lmdb.Error as exc:  # a disk error, or a short write on a full disk (EIO)
            raise self._write_failed(exc) from exc

    def settings(self) -> dict[str, Any]:
        """The store's settings, checked key by key (a flipped byte can leave valid JSON)."""
        with self.read() as txn:
            raw = txn.meta_get("settings")
        try:
            settings = json.loads(raw) if raw else {}
            if not isinstance(settings, dict):
                raise TypeError("not an object")
            for key, kind in SETTINGS_TYPES.items():
                if not isinstance(settings.get(key), kind) or isinstance(settings[key], bool):
                    raise TypeError(f"{key!r} missing or not a {kind.__name__}")
            return settings
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise StoreFormatError(f"the settings in the index at {self.path} are damaged "
                                   f"({exc}): `hubfs verify --repair` restores a snapshot", 3
                                   ) from None

    def sync(self) -> None:
        """Make every committed transaction durable."""
        self.unsynced = False  # a commit from now on sets it again
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise self._write_failed(exc) from exc

    def _write_failed(self, exc: lmdb.Error) -> HubfsError:
        """The error a user reads when the index cannot be written (LMDB says EIO for a
        short write on a full disk, so the free space decides)."""
        disk = os.statvfs(self.path)
        if ("No space" in str(exc) or "quota" in str(exc).lower()
                or disk.f_bavail * disk.f_frsize < FULL_DISK_BYTES):
            return StoreFullError(f"no space left on the disk holding the index {self.path}: "
                                  "free space there (or run `hubfs gc`) and retry")
        return HubfsError(f"cannot write the index at {self.path}: {exc}; "
                          "free space on its disk and retry")

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.name.endswith(".mdb"))

    def close(self) -> None:
        self.env.close()
