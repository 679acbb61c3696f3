"""``hubfs verify``: re-read every record and cross-check the whole index.

Checks, against one consistent index snapshot: every pack record's header and block checksums,
that each record decodes to bytes whose BLAKE3 is its chunk id, that every object re-chunks to
the content the index maps to it (the kernel serves objects without the daemon's checks), that every index location points
at such a record, that chunk and content reference counts equal what the tables and inodes
imply, and that the namespace is a tree whose link counts add up. Damage is reported as the
paths of the files it touches, which is what a user can act on.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

import blake3

from .chunking import ChunkerParams
from .compression import decode
from .contents import EMPTY, content_id
from .errors import IntegrityError
from .index import ROOT_INO, ChunkEntry
from .objects import object_ids, scan_object
from .packs import ChunkLocation, PackFiles, ScannedRecord, location_name, pack_ids, scan
from .progress import Progress
from .store import Store

log = logging.getLogger(__name__)
FILE_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK,
              stat.S_IFSOCK)


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    bytes_checked: int = 0
    # problems of the index itself (not of pack bytes): a snapshot can repair these
    index_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damaged_files

    def index_problem(self, text: str) -> None:
        self.problems.append(text)
        self.index_problems += 1


@dataclass
class Intact:
    """What the store's files hold, read without the index: intact records by (pack or
    object id, offset), and the content each object's bytes make."""

    records: dict[tuple[int, int], ScannedRecord] = field(default_factory=dict)
    object_contents: dict[int, bytes] = field(default_factory=dict)


def verify(store: Store, progress: bool | None = None, intact: Intact | None = None
           ) -> VerifyReport:
    """Check ``store``; ``intact`` is ``check_files``'s result when the caller has it already
    (repair checks several candidate indexes against the same files)."""
    report = VerifyReport()
    with store.read() as txn:
        objects = dict(txn.objects())
        chunks = dict(txn.chunks())
        tables = dict(txn.contents())
        content_refs = dict(txn.all_content_refs())
        inodes = dict(txn.inodes())
        dirents = list(txn.all_dirents())
        dirseq = list(txn.all_dirseq())
        xattr_inos = set(txn.all_xattr_inos())
    if intact is None:
        intact = check_files(store.packs, store.params, report, progress)
    good = {key: (rec.chunk_id, rec.location) for key, rec in intact.records.items()}
    paths = _paths(dirents)
    damaged: set[int] = set()
    bad_chunks = _check_chunks(chunks, good, report)
    bad_objects = _check_objects(objects, intact, report)
    damaged |= {ino for ino, inode in inodes.items() if inode.content_id in bad_objects}
    damaged |= _check_refs(chunks, tables, content_refs, inodes, bad_chunks, report)
    damaged |= _check_tree(inodes, dirents, dirseq, xattr_inos, report)
    for ino, inode in sorted(inodes.items()):
        table = tables.get(inode.content_id) if inode.content_id else None
        if table is not None and any(c in bad_chunks for c in table.chunk_ids):
            damaged.add(ino)
    for ino in sorted(damaged):
        names = paths.get(ino) or [f"<unlinked inode {ino}>".encode()]
        report.damaged_files.extend(os.fsdecode(p) for p in names)
    return report


def _paths(dirents: list[tuple[int, bytes, int, int]]) -> dict[int, list[bytes]]:
    """Every inode's paths from the root, as ``namespace.paths``, but safe on a damaged
    index: a directory reached twice (a loop) is not walked again."""
    children: dict[int, list[tuple[bytes, int]]] = {}
    for parent, name, child, _seq in dirents:
        children.setdefault(parent, []).append((name, child))
    out: dict[int, list[bytes]] = {ROOT_INO: [b"/"]}
    stack = [(ROOT_INO, b"")]
    walked = {ROOT_INO}
    while stack:
        ino, prefix = stack.pop()
        for name, child in children.get(ino, []):
            path = prefix + b"/" + name
            out.setdefault(child, []).append(path)
            if child in children and child not in walked:
                walked.add(child)
                stack.append((child, path))
    return out


def check_files(packs: PackFiles, params: ChunkerParams, report: VerifyReport,
                progress: bool | None) -> Intact:
    """Every byte of every pack and object read, decoded and hashed."""
    intact = Intact()
    ids = sorted(pack_ids(packs.directory))
    objects = sorted(object_ids(packs.objects_dir))
    total = sum(packs.path(p).stat().st_size for p in ids + objects)
    with Progress("verify", total, enabled=progress) as bar:
        for pack_id in ids:
            _check_pack(packs, pack_id, intact, report, bar)
        for object_id in objects:
            path = packs.path(object_id)
            try:
                size, records = scan_object(path, params, object_id)
            except OSError as exc:
                report.problems.append(f"{location_name(object_id)} cannot be read "
                                       f"({exc.strerror})")
                continue
            for rec in records:
                intact.records[(object_id, rec.location.offset)] = rec
            intact.object_contents[object_id] = content_id(size, [r.chunk_id for r in records])
            report.records += len(records)
            report.bytes_checked += size
            bar.advance(size)
    return intact


def _check_pack(packs: PackFiles, pack_id: int, intact: Intact, report: VerifyReport,
                bar: Progress) -> None:
    fd = packs.fd(pack_id)
    end = 0
    for rec in scan(fd, pack_id):
        loc = rec.location
        try:
            raw = decode(packs.read_stored(rec.chunk_id, loc), loc.codec, loc.raw_len)
            if blake3.blake3(raw).digest() != rec.chunk_id:
                raise IntegrityError("content does not hash to its chunk id", rec.chunk_id)
        except (IntegrityError, ValueError) as exc:
            report.problems.append(f"pack {pack_id:08x} offset {loc.offset}: damaged "
                                   f"record of chunk {rec.chunk_id.hex()[:16]} ({exc})")
        else:
            intact.records[(pack_id, loc.offset)] = rec
        report.records += 1
        report.bytes_checked += loc.stored_len
        bar.advance(loc.record_end - end if end else loc.record_end)
        end = loc.record_end
    size = os.fstat(fd).st_size
    if end and end < size or (not end and size > 16):
        report.notes.append(f"pack {pack_id:08x}: {size - max(end, 16)} bytes after the "
                            "last intact record (a torn or damaged tail)")
    bar.advance(size - end)


def _check_objects(objects: dict[bytes, int], intact: Intact, report: VerifyReport
                   ) -> set[bytes]:
    """Each content's object must hold exactly its bytes; returns the contents whose object
    does not (the kernel would serve wrong bytes: repair drops such mappings)."""
    bad = set()
    for cid, object_id in objects.items():
        found = intact.object_contents.get(object_id)
        if found != cid:
            bad.add(cid)
            what = "is missing" if found is None else "holds other bytes (damaged)"
            report.problems.append(f"{location_name(object_id)} of content {cid.hex()[:16]} "
                                   f"{what}")
    unmapped = set(intact.object_contents) - set(objects.values())
    if unmapped:
        report.notes.append(f"{len(unmapped)} object files belong to no content (an "
                            "interrupted commit or a deleted file): `hubfs gc` removes them")
    return bad


def _check_chunks(chunks: dict[bytes, ChunkEntry],
                  good: dict[tuple[int, int], tuple[bytes, ChunkLocation]],
                  report: VerifyReport) -> set[bytes]:
    """Every entry must name an intact record of its chunk exactly: codec, lengths and block
    sums too (a flipped sum in the index makes every read of that block fail)."""
    bad: set[bytes] = set()
    for chunk_id, entry in chunks.items():
        loc = entry.location
        if loc.remote:
            continue  # a cluster node's chunk that only the object store holds (yet)
        if good.get((loc.pack_id, loc.offset)) != (chunk_id, loc):
            bad.add(chunk_id)
            if entry.refcount:
                report.problems.append(f"chunk {chunk_id.hex()[:16]}: no intact record at "
                                       f"{location_name(loc.pack_id)} offset {loc.offset}")
    return bad


def _check_refs(chunks: dict[bytes, ChunkEntry], tables: dict, content_refs: dict[bytes, int],
                inodes: dict, bad: set[bytes], report: VerifyReport) -> set[int]:
    """Reference counts and chunk tables; returns the inodes whose content is wrong."""
    damaged: set[int] = set()
    expected_chunk_refs: Counter[bytes] = Counter()
    bad_tables: set[bytes] = set()
    for cid, table in tables.items():
        if len(table.chunk_ids) != len(table.lengths) or sum(table.lengths) != table.size:
            report.index_problem(f"content {cid.hex()[:16]}: chunk table does not add up")
            bad_tables.add(cid)
        for chunk_id in table.chunk_ids:
            expected_chunk_refs[chunk_id] += 1
            if chunk_id not in chunks:
                bad.add(chunk_id)
                report.index_problem(f"content {cid.hex()[:16]} references missing chunk "
                                     f"{chunk_id.hex()[:16]}")
    for chunk_id, entry in chunks.items():
        if entry.refcount != expected_chunk_refs[chunk_id]:
            report.index_problem(f"chunk {chunk_id.hex()[:16]}: refcount {entry.refcount}, "
                                 f"tables reference it {expected_chunk_refs[chunk_id]} times")
    expected_content_refs: Counter[bytes] = Counter()
    for ino, inode in inodes.items():
        if not stat.S_ISREG(inode.mode):
            continue
        expected_content_refs[inode.content_id] += 1
        table = tables.get(inode.content_id)
        if table is None:
            report.index_problem(f"inode {ino}: its content {inode.content_id.hex()[:16]} "
                                 "is missing")
            damaged.add(ino)
        elif table.size != inode.size:
            report.index_problem(f"inode {ino}: size {inode.size} but content holds "
                                 f"{table.size} bytes")
            damaged.add(ino)
        elif inode.content_id in bad_tables:
            damaged.add(ino)
    for cid in set(tables) | set(content_refs):
        if content_refs.get(cid, 0) != expected_content_refs[cid] and not (
            cid == EMPTY.content_id and not expected_content_refs[cid]
        ):
            report.index_problem(f"content {cid.hex()[:16]}: refcount "
                                 f"{content_refs.get(cid, 0)}, inodes hold it "
                                 f"{expected_content_refs[cid]} times")
    return damaged


def _check_tree(inodes: dict, dirents: list[tuple[int, bytes, int, int]],
                dirseq: list[tuple[int, int, bytes]], xattr_inos: set[int],
                report: VerifyReport) -> set[int]:
    """The namespace: entries, their readdir order, link counts, xattr owners. Returns the
    directories (and files) whose entries are wrong."""
    damaged: set[int] = set()
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for parent, name, child, _seq in dirents:
        if parent not in inodes or not stat.S_ISDIR(inodes[parent].mode):
            report.index_problem(f"entry {name!r} sits in {parent}, which is not a directory")
            damaged.add(parent)
        if child not in inodes:
            report.index_problem(f"entry {name!r} in directory {parent} points at missing "
                                 f"inode {child}")
            damaged.add(parent)
            continue
        names[child] += 1
        if stat.S_ISDIR(inodes[child].mode):
            subdirs[parent] += 1
            if inodes[child].parent != parent:
                report.index_problem(f"directory {name!r} (inode {child}) records parent "
                                     f"{inodes[child].parent}, but sits in {parent}")
                damaged.add(child)
    by_entry = {(parent, seq): name for parent, name, _child, seq in dirents}
    by_order = {(parent, seq): name for parent, seq, name in dirseq}
    for key in by_entry.keys() | by_order.keys():
        if by_entry.get(key) != by_order.get(key):
            report.index_problem(f"directory {key[0]}: readdir record {key[1]} names "
                                 f"{by_order.get(key)!r}, the entry {by_entry.get(key)!r}")
            damaged.add(key[0])
    for ino in sorted(xattr_inos - inodes.keys()):
        report.index_problem(f"extended attributes of missing inode {ino}")
    for ino, inode in inodes.items():
        if stat.S_IFMT(inode.mode) not in FILE_TYPES:
            report.index_problem(f"inode {ino}: unknown file type in mode {inode.mode:o}")
            damaged.add(ino)
        if ino == ROOT_INO:
            continue
        if names[ino] == 0:
            report.notes.append(f"inode {ino} has no name (open while unlinked, or left by a "
                                "crash: the next mount removes it)")
            continue
        if stat.S_ISDIR(inode.mode):
            want = 2 + subdirs[ino]
            if names[ino] != 1:
                report.index_problem(f"directory inode {ino} has {names[ino]} names")
                damaged.add(ino)
        else:
            want = names[ino]
        if inode.nlink != want:
            report.index_problem(f"inode {ino}: nlink {inode.nlink}, expected {want}")
            damaged.add(ino)
    return damaged
