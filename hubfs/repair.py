"""Index snapshots, and ``hubfs verify --repair``: rebuilding a damaged index.

Snapshots are LMDB's own consistent copies (``env.copy(compact=True)``, taken inside one read
transaction while writers go on), kept in ``STORE/snapshots/<time>/`` and pruned to the newest
``SNAPSHOTS_KEPT``. The daemon takes one every ``SNAPSHOT_INTERVAL_S`` and at unmount; ``import``
and ``gc`` take one when they finish.

Repair, on an unmounted store:
1. If the index does not open or read back, move it aside and restore the newest snapshot that
   does (changes after that snapshot are lost from the index; their bytes stay in the packs
   until gc).
2. Scan every pack's self-describing records, checking each one's checksums, and point every
   chunk entry at an intact record of that chunk id, wherever it is.
3. Recompute chunk and content reference counts from the chunk tables and the inodes.
What cannot be repaired (a chunk with no intact record anywhere) is reported as damaged files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from .errors import HubfsError, StoreFormatError
from .index import ChunkEntry, Index
from .packs import ChunkLocation
from .verify import VerifyReport, check_packs

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
SNAPSHOTS_KEPT = 3
SNAPSHOT_INTERVAL_S = 600.0


def snapshot(index: Index, store: Path) -> Path:
    """A consistent copy of the index in ``STORE/snapshots/<time>``; old ones pruned."""
    root = store / SNAPSHOT_DIR
    root.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
    tmp = root / f".{stamp}.tmp"
    tmp.mkdir(mode=0o700)
    index.env.copy(str(tmp), compact=True)
    fd = os.open(tmp / "data.mdb", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    final = root / stamp
    os.rename(tmp, final)
    for old in sorted(p for p in root.iterdir() if not p.name.startswith("."))[:-SNAPSHOTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("index snapshot %s", final)
    return final


def snapshot_or_warn(index: Index, store: Path) -> Path | None:
    """``snapshot``, where failing (a full disk) must not stop what asked for it."""
    try:
        return snapshot(index, store)
    except (OSError, lmdb.Error) as exc:
        log.warning("no index snapshot this time (%s); the previous ones are kept", exc)
        for tmp in (store / SNAPSHOT_DIR).glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        return None


def snapshots(store: Path) -> list[Path]:
    root = store / SNAPSHOT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if not p.name.startswith(".")), reverse=True)


@dataclass
class RepairReport:
    restored_from: str = ""
    relocated: int = 0
    refcounts_fixed: int = 0
    missing_chunks: int = 0
    notes: list[str] = field(default_factory=list)


def _index_readable(path: Path) -> bool:
    """Whether an index opens and every value in it decodes."""
    try:
        index = Index(path, readonly=True)
    except (StoreFormatError, HubfsError):
        return False
    try:
        index.settings()  # raises when damaged
        with index.read() as txn:
            if not txn.meta_get("settings"):
                return False
            for _ in txn.chunks():
                pass
            for parent, _name, _child, _seq in list(txn.all_dirents()):
                for _ in txn.dir_entries(parent):
                    pass
            for _ in txn.contents():
                pass
            for _ in txn.inodes():
                pass
            for _ in txn.all_dirents():
                pass
            for _ in txn.all_content_refs():
                pass
        return True
    except Exception as exc:  # noqa: BLE001  (any failure to decode means damage)
        log.info("index at %s does not read back: %s", path, exc)
        return False
    finally:
        index.close()


def restore_index_if_damaged(store: Path, report: RepairReport) -> None:
    index_dir = store / "index"
    if _index_readable(index_dir):
        return
    for snap in snapshots(store):
        if _index_readable(snap):
            aside = store / f"index.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
            os.rename(index_dir, aside)
            index_dir.mkdir(mode=0o700)
            shutil.copyfile(snap / "data.mdb", index_dir / "data.mdb")
            report.restored_from = snap.name
            report.notes.append(f"the index did not read back: restored snapshot {snap.name}; "
                                f"the damaged index is kept in {aside.name}; changes made after "
                                "the snapshot are lost (their bytes stay until gc)")
            return
    raise HubfsError(f"the index of {store} is damaged and no snapshot reads back: nothing to "
                     "restore from (the packs still hold every chunk, but not the file names)",
                     3)


def repair(store_path: Path, progress: bool | None = None) -> RepairReport:
    """Repair an unmounted store in place (see the module docstring)."""
    from .store import Store

    report = RepairReport()
    restore_index_if_damaged(store_path, report)
    with Store(store_path) as store:
        intact = check_packs(store.packs, VerifyReport(), progress)
        found: dict[bytes, ChunkLocation] = {}
        for rec in intact.values():
            found.setdefault(rec.chunk_id, rec.location)
        with store.write() as txn:
            tables = dict(txn.contents())
            uses: Counter[bytes] = Counter(c for t in tables.values() for c in t.chunk_ids)
            for chunk_id in set(uses) | {cid for cid, _ in txn.chunks()}:
                entry = txn.chunk(chunk_id)
                loc = found.get(chunk_id)
                refs = uses[chunk_id]
                if loc is None:
                    if refs:
                        report.missing_chunks += 1
                    continue
                here = None if entry is None else intact.get(
                    (entry.location.pack_id, entry.location.offset))
                if entry is None or here is None or here.chunk_id != chunk_id:
                    report.relocated += 1
                    txn.put_chunk(chunk_id, ChunkEntry(loc, refs))
                elif entry.refcount != refs:
                    report.refcounts_fixed += 1
                    txn.put_chunk(chunk_id, ChunkEntry(entry.location, refs))
            holders: Counter[bytes] = Counter(
                inode.content_id for _ino, inode in txn.inodes() if inode.content_id)
            for cid in set(tables) | {c for c, _ in txn.all_content_refs()}:
                if cid in tables and txn.content_refs(cid) != holders[cid]:
                    report.refcounts_fixed += 1
                    txn.put_content_refs(cid, holders[cid])
    from .verify import verify

    with Store(store_path, readonly=True) as store:
        clean = verify(store, progress=False).ok
    if clean:  # never keep a snapshot of an index that still has problems
        with Store(store_path) as store:
            snapshot_or_warn(store.index, store.path)
    return report
