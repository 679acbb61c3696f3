"""``hubfs verify``: re-read every record and cross-check the whole index.

Checks, against one consistent index snapshot: every pack record's header and block checksums,
that each record decodes to bytes whose BLAKE3 is its chunk id, that every index location points
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

from . import namespace
from .compression import decode
from .contents import EMPTY
from .errors import IntegrityError
from .index import ROOT_INO, ChunkEntry
from .packs import PackFiles, ScannedRecord, pack_ids, scan
from .progress import Progress
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damaged_files


def verify(store: Store, progress: bool | None = None) -> VerifyReport:
    report = VerifyReport()
    with store.read() as txn:
        chunks = dict(txn.chunks())
        tables = dict(txn.contents())
        content_refs = dict(txn.all_content_refs())
        inodes = dict(txn.inodes())
        dirents = list(txn.all_dirents())
        paths = namespace.paths(txn)
    good = {key: rec.chunk_id for key, rec in check_packs(store.packs, report, progress).items()}
    bad_chunks = _check_chunks(chunks, good, report)
    _check_refs(chunks, tables, content_refs, inodes, bad_chunks, report)
    _check_tree(inodes, dirents, report)
    for ino, inode in sorted(inodes.items()):
        table = tables.get(inode.content_id) if inode.content_id else None
        if table is not None and any(c in bad_chunks for c in table.chunk_ids):
            names = paths.get(ino) or [f"<unlinked inode {ino}>".encode()]
            report.damaged_files.extend(os.fsdecode(p) for p in names)
    return report


def check_packs(packs: PackFiles, report: VerifyReport, progress: bool | None
                ) -> dict[tuple[int, int], ScannedRecord]:
    """Intact records by (pack id, offset); every byte read, decoded and hashed."""
    good: dict[tuple[int, int], ScannedRecord] = {}
    ids = sorted(pack_ids(packs.directory))
    total = sum(packs.path(p).stat().st_size for p in ids)
    with Progress("verify", total, enabled=progress) as bar:
        for pack_id in ids:
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
                    good[(pack_id, loc.offset)] = rec
                report.records += 1
                report.bytes_checked += loc.stored_len
                bar.advance(loc.record_end - end if end else loc.record_end)
                end = loc.record_end
            size = os.fstat(fd).st_size
            if end and end < size or (not end and size > 16):
                report.notes.append(f"pack {pack_id:08x}: {size - max(end, 16)} bytes after the "
                                    "last intact record (a torn or damaged tail)")
            bar.advance(size - end)
    return good


def _check_chunks(chunks: dict[bytes, ChunkEntry], good: dict[tuple[int, int], bytes],
                  report: VerifyReport) -> set[bytes]:
    bad: set[bytes] = set()
    for chunk_id, entry in chunks.items():
        loc = entry.location
        if good.get((loc.pack_id, loc.offset)) != chunk_id:
            bad.add(chunk_id)
            if entry.refcount:
                report.problems.append(f"chunk {chunk_id.hex()[:16]}: no intact record at pack "
                                       f"{loc.pack_id:08x} offset {loc.offset}")
    return bad


def _check_refs(chunks: dict[bytes, ChunkEntry], tables: dict, content_refs: dict[bytes, int],
                inodes: dict, bad: set[bytes], report: VerifyReport) -> None:
    expected_chunk_refs: Counter[bytes] = Counter()
    for cid, table in tables.items():
        if len(table.chunk_ids) != len(table.lengths) or sum(table.lengths) != table.size:
            report.problems.append(f"content {cid.hex()[:16]}: chunk table does not add up")
        for chunk_id in table.chunk_ids:
            expected_chunk_refs[chunk_id] += 1
            if chunk_id not in chunks:
                bad.add(chunk_id)
                report.problems.append(f"content {cid.hex()[:16]} references missing chunk "
                                       f"{chunk_id.hex()[:16]}")
    for chunk_id, entry in chunks.items():
        if entry.refcount != expected_chunk_refs[chunk_id]:
            report.problems.append(f"chunk {chunk_id.hex()[:16]}: refcount {entry.refcount}, "
                                   f"tables reference it {expected_chunk_refs[chunk_id]} times")
    expected_content_refs: Counter[bytes] = Counter()
    for ino, inode in inodes.items():
        if not stat.S_ISREG(inode.mode):
            continue
        expected_content_refs[inode.content_id] += 1
        table = tables.get(inode.content_id)
        if table is None:
            report.problems.append(f"inode {ino}: its content {inode.content_id.hex()[:16]} "
                                   "is missing")
        elif table.size != inode.size:
            report.problems.append(f"inode {ino}: size {inode.size} but content holds "
                                   f"{table.size} bytes")
    for cid in set(tables) | set(content_refs):
        if content_refs.get(cid, 0) != expected_content_refs[cid] and not (
            cid == EMPTY.content_id and not expected_content_refs[cid]
        ):
            report.problems.append(f"content {cid.hex()[:16]}: refcount {content_refs.get(cid, 0)}"
                                   f", inodes hold it {expected_content_refs[cid]} times")


def _check_tree(inodes: dict, dirents: list[tuple[int, bytes, int, int]],
                report: VerifyReport) -> None:
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for parent, name, child, _seq in dirents:
        if parent not in inodes or not stat.S_ISDIR(inodes[parent].mode):
            report.problems.append(f"entry {name!r} sits in {parent}, which is not a directory")
        if child not in inodes:
            report.problems.append(f"entry {name!r} in directory {parent} points at missing "
                                   f"inode {child}")
            continue
        names[child] += 1
        if stat.S_ISDIR(inodes[child].mode):
            subdirs[parent] += 1
            if inodes[child].parent != parent:
                report.problems.append(f"directory {name!r} (inode {child}) records parent "
                                       f"{inodes[child].parent}, but sits in {parent}")
    for ino, inode in inodes.items():
        if ino == ROOT_INO:
            continue
        if names[ino] == 0:
            report.notes.append(f"inode {ino} has no name (open while unlinked, or left by a "
                                "crash: the next mount removes it)")
            continue
        if stat.S_ISDIR(inode.mode):
            want = 2 + subdirs[ino]
            if names[ino] != 1:
                report.problems.append(f"directory inode {ino} has {names[ino]} names")
        else:
            want = names[ino]
        if inode.nlink != want:
            report.problems.append(f"inode {ino}: nlink {inode.nlink}, expected {want}")
