"""Copying trees between the host filesystem and a store: ``import`` and ``export``.

Import keeps what the caches rely on: relative symlinks (HF snapshots point into ``blobs/``),
hard links, modes, owners and times. Files are committed in batches: each batch's pack bytes
are synced, then one index transaction names them all, so an import cut short (a full disk, an
unreadable file, Ctrl-C) leaves the store consistent and a rerun dedupes what already landed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import contents, namespace
from .contents import PreparedContent
from .errors import FsError, HubfsError, StoreFullError
from .index import Inode, Txn
from .objects import OBJECT_MIN_BYTES
from .progress import Progress
from .store import Store

log = logging.getLogger(__name__)

BATCH_BYTES = 512 * 1024 * 1024
BATCH_FILES = 2000


@dataclass
class ImportReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    new_stored_bytes: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    rel: bytes  # path below the import root, b"" for the root itself
    st: os.stat_result


def _walk(src: bytes, report: ImportReport) -> list[_Entry]:
    """Every entry below ``src`` (not following symlinks), parents before children."""
    out = [_Entry(b"", os.lstat(src))]
    stack = [b""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(src, rel) if rel else src) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            report.errors.append(f"{os.fsdecode(os.path.join(src, rel))}: {exc.strerror}")
            continue
        for entry in entries:
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                report.errors.append(f"{os.fsdecode(entry.path)}: {exc.strerror}")
                continue
            out.append(_Entry(child, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
    return out


@dataclass(frozen=True)
class _Op:
    """One entry to name in the store; ``link_to`` marks a hard link to an earlier path."""

    entry: _Entry
    prepared: PreparedContent | None = None
    target: bytes = b""
    link_to: bytes | None = None
    copy: Path | None = None  # the bytes ``prepared`` hashed, to become its object


class _Batch:
    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.prepared: list[PreparedContent] = []
        self.bytes = 0


def import_tree(store: Store, src: Path, dest: str = "/", progress: bool | None = None
                ) -> ImportReport:
    """Copy the tree at ``src`` into the store under ``dest``."""
    ingestor = store.ingestor
    assert ingestor is not None, "import needs a writable store"
    src_b = os.fsencode(src)
    if not os.path.isdir(src_b):
        raise HubfsError(f"import source {src} is not a directory: name a cache directory such "
                         "as ~/.cache/huggingface/hub", 2)
    report = ImportReport()
    entries = _walk(src_b, report)
    total = sum(e.st.st_size for e in entries if stat.S_ISREG(e.st.st_mode))
    try:
        with store.write() as txn:
            inos = {b"": namespace.make_dirs(txn, dest, os.getuid(), os.getgid())}
    except FsError as exc:
        raise HubfsError(f"--dest {dest} cannot be a directory in the store ({exc}): name a "
                         "directory path, each part at most 255 bytes", 2) from None
    first_path: dict[tuple[int, int], bytes] = {}
    batch = _Batch()
    assert store.writer is not None
    mark = store.writer.mark()  # where this batch's records begin
    with store.ingest_gate.shared(), \
            Progress(f"import {os.fsdecode(src_b)}", total, enabled=progress) as bar:
        try:
            for entry in entries[1:]:
                op = _prepare_op(store, src_b, entry, first_path, bar, report)
                if op is None:
                    continue
                batch.ops.append(op)
                if op.prepared is not None:
                    batch.prepared.append(op.prepared)
                    batch.bytes += entry.st.st_size
                if batch.bytes >= BATCH_BYTES or len(batch.ops) >= BATCH_FILES:
                    _commit(store, batch, inos, report)
                    batch = _Batch()
                    mark = store.writer.mark()
            _commit(store, batch, inos, report)
        except BaseException as exc:
            if isinstance(exc, StoreFullError) or (
                    isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
                # Nothing references the uncommitted batch's records: give their space back
                # (the CLI import is the store's only writer, so nothing else appended).
                ingestor.forget_pending()
                store.writer.rollback(mark)
                raise _full(store) from None
            raise
    with store.write() as txn:  # children changed their directories' times: set them last
        for entry in reversed(entries[1:]):
            if stat.S_ISDIR(entry.st.st_mode) and entry.rel in inos:
                inode = namespace.get(txn, inos[entry.rel])
                txn.put_inode(inos[entry.rel], inode.with_(atime_ns=entry.st.st_atime_ns,
                                                           mtime_ns=entry.st.st_mtime_ns))
    return report


def _full(store: Store) -> StoreFullError:
    return StoreFullError(f"no space left on the disk holding the store {store.path}: free "
                          "space there (or run `hubfs gc`) and import again; nothing partial was "
                          "kept (files of batches committed before are in the store)")


def _prepare_op(store: Store, src: bytes, entry: _Entry, first_path: dict[tuple[int, int], bytes],
                bar: Progress, report: ImportReport) -> _Op | None:
    """Read what one entry needs (file bytes into packs, a link target); index untouched."""
    assert store.ingestor is not None
    mode = entry.st.st_mode
    path = os.path.join(src, entry.rel)
    if stat.S_ISLNK(mode):
        return _Op(entry, target=os.readlink(path))
    if not stat.S_ISREG(mode):
        return _Op(entry)
    if entry.st.st_nlink > 1:
        key = (entry.st.st_dev, entry.st.st_ino)
        if key in first_path:
            return _Op(entry, link_to=first_path[key])
        first_path[key] = entry.rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        report.errors.append(f"{os.fsdecode(path)}: {exc.strerror}")
        first_path.pop((entry.st.st_dev, entry.st.st_ino), None)
        bar.advance(entry.st.st_size)
        return None
    try:
        if store.objects is None or entry.st.st_size < OBJECT_MIN_BYTES:
            return _Op(entry, prepared=store.ingestor.prepare_fd(fd, bar.advance))
        copy = store.objects.copy_in(fd)
    finally:
        os.close(fd)
    try:
        with open(copy, "rb", buffering=0) as f:
            prepared = store.ingestor.prepare_stream(
                lambda o, n: os.pread(f.fileno(), n, o), os.fstat(f.fileno()).st_size,
                new_object=store.objects.new_id)
    except BaseException:
        copy.unlink()
        raise
    bar.advance(entry.st.st_size)
    if not prepared.object_id:
        copy.unlink()
        return _Op(entry, prepared=prepared)
    return _Op(entry, prepared=prepared, copy=copy)


def _commit(store: Store, batch: _Batch, inos: dict[bytes, int], report: ImportReport) -> None:
    """Name a batch's entries in one transaction, after their pack bytes are durable."""
    if not batch.ops:
        return
    try:
        with store.write() as txn:
            for op in batch.ops:
                if _apply(txn, op, inos, report) and op.copy is not None:
                    assert store.objects is not None and op.prepared is not None
                    store.objects.adopt(op.copy, op.prepared.object_id)
    finally:
        for op in batch.ops:  # copies no content took (a twin had an object already)
            if op.copy is not None:
                op.copy.unlink(missing_ok=True)
    assert store.ingestor is not None
    for prepared in batch.prepared:
        store.ingestor.committed(prepared)
        report.new_stored_bytes += prepared.new_stored_bytes


def _apply(txn: Txn, op: _Op, inos: dict[bytes, int], report: ImportReport) -> bool:
    """Name one entry; True when its prepared object is now its content's (see
    ``contents.register``)."""
    entry, st = op.entry, op.entry.st
    parent_rel, _, name = entry.rel.rpartition(b"/")
    parent = inos.get(parent_rel)
    if parent is None:
        return False  # its directory could not be imported; the error is already reported
    existing = txn.dirent(parent, name)
    if op.link_to is not None:
        target_ino = inos.get(op.link_to)
        if target_ino is None:
            return False
        if existing is not None:
            _remove_name(txn, parent, name)
        namespace.link(txn, target_ino, parent, name)
        inos[entry.rel] = target_ino
        report.hardlinks += 1
        return False
    if existing is not None:
        old = namespace.get(txn, existing[0])
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(old.mode):
            inos[entry.rel] = existing[0]
            _set_attrs(txn, existing[0], st)
            return False
        if stat.S_ISDIR(old.mode):
            report.errors.append(f"{os.fsdecode(entry.rel)}: a directory of that name is already "
                                 "in the store; import into another --dest")
            return False
        _remove_name(txn, parent, name)
    content = None
    adopted = False
    if op.prepared is not None:
        adopted = contents.register(txn, op.prepared)
        content = (op.prepared.content_id, op.prepared.table.size)
    ino = namespace.create(txn, parent, name, st.st_mode, st.st_uid, st.st_gid,
                           rdev=st.st_rdev, target=op.target, content=content,
                           times_ns=(st.st_atime_ns, st.st_mtime_ns))
    inos[entry.rel] = ino
    if stat.S_ISDIR(st.st_mode):
        report.dirs += 1
    elif stat.S_ISLNK(st.st_mode):
        report.symlinks += 1
    elif stat.S_ISREG(st.st_mode):
        report.files += 1
        report.bytes += st.st_size
    return adopted


def _remove_name(txn: Txn, parent: int, name: bytes) -> None:
    ino, inode = namespace.unlink(txn, parent, name)
    if inode.nlink == 0:
        namespace.remove_inode(txn, ino)


def _set_attrs(txn: Txn, ino: int, st: os.stat_result) -> None:
    inode = namespace.get(txn, ino)
    txn.put_inode(ino, inode.with_(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                                   atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))


def export_tree(store: Store, path: str, dest: Path, progress: bool | None = None) -> int:
    """Write the store tree at ``path`` out to ``dest`` (which must not exist); returns files."""
    dest_b = os.fsencode(dest)
    if os.path.lexists(dest_b):
        raise HubfsError(f"export destination {dest} already exists: name a new directory", 2)
    if not os.path.isdir(os.path.dirname(os.path.abspath(dest_b))):
        raise HubfsError(f"the directory to export {dest} into does not exist: create it first",
                         2)
    with store.read() as txn:
        try:
            top = namespace.resolve(txn, path)
        except FsError as exc:
            raise HubfsError(f"{path} is not in the store ({exc}): see `hubfs ls STORE`", 2) from None
        plan = _export_plan(txn, top)
    total = sum(inode.size for _rel, _ino, inode in plan if stat.S_ISREG(inode.mode))
    written: dict[int, bytes] = {}
    dirs: list[tuple[bytes, Inode]] = []
    is_root = os.geteuid() == 0
    with Progress(f"export {path}", total, enabled=progress) as bar:
        for rel, ino, inode in plan:
            out = os.path.join(dest_b, rel) if rel else dest_b
            mode = inode.mode
            if stat.S_ISDIR(mode):
                os.mkdir(out, 0o700)
                dirs.append((out, inode))
                continue
            if ino in written:
                os.link(written[ino], out)
                continue
            if stat.S_ISLNK(mode):
                os.symlink(inode.target, out)
            elif stat.S_ISREG(mode):
                _write_content(store, inode.content_id, out, bar)
            else:
                os.mknod(out, mode, inode.rdev)
            written[ino] = out
            _restore_attrs(out, inode, is_root)
        for out, inode in reversed(dirs):
            _restore_attrs(out, inode, is_root)
    return sum(1 for _r, _i, inode in plan if stat.S_ISREG(inode.mode))


def _export_plan(txn: Txn, top: int) -> list[tuple[bytes, int, Inode]]:
    plan: list[tuple[bytes, int, Inode]] = [(b"", top, namespace.get(txn, top))]
    stack = [(top, b"")]
    while stack:
        ino, rel = stack.pop()
        if not stat.S_ISDIR(namespace.get(txn, ino).mode):
            continue
        for _seq, name, child in namespace.readdir(txn, ino):
            child_rel = os.path.join(rel, name) if rel else name
            child_inode = namespace.get(txn, child)
            plan.append((child_rel, child, child_inode))
            if stat.S_ISDIR(child_inode.mode):
                stack.append((child, child_rel))
    return plan


def _write_content(store: Store, content_id: bytes, out: bytes, bar: Progress) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for data in store.reader.pieces(content_id):
            os.write(fd, data)
            bar.advance(len(data))
    finally:
        os.close(fd)


def _restore_attrs(out: bytes, inode: Inode, is_root: bool) -> None:
    if is_root:
        os.chown(out, inode.uid, inode.gid, follow_symlinks=False)
    if not stat.S_ISLNK(inode.mode):
        os.chmod(out, stat.S_IMODE(inode.mode))
    os.utime(out, ns=(inode.atime_ns, inode.mtime_ns), follow_symlinks=False)
