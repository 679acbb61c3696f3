"""Index snapshots, and ``hubfs verify --repair``: rebuilding a damaged index.

Snapshots are LMDB's own consistent copies (``env.copy(compact=True)``, taken inside one read
transaction while writers go on), kept in ``STORE/snapshots/<time>/`` and pruned to the newest
``SNAPSHOTS_KEPT``. The daemon takes one every ``SNAPSHOT_INTERVAL_S`` and at unmount; ``import``
and ``gc`` take one when they finish.

Repair, on an unmounted store (it holds the writer lock throughout):
1. Scan every pack's self-describing records once, checking each one's checksums.
2. The candidates are the live index, then the snapshots, newest first; each is first read
   through in a child process (a damaged LMDB page can kill its reader with SIGBUS), and one
   that does not read back is skipped.
3. On each candidate in turn: point every chunk entry at an intact record of that chunk id,
   wherever it is, recompute chunk and content reference counts from the chunk tables and the
   inodes, then verify. The first whose index is consistent is kept (its only problems, if
   any, are chunks with no intact copy in any pack, which no snapshot can bring back). A
   snapshot replaces the live index only then; the live index is kept aside, and changes made
   after the snapshot are lost from the index (their bytes stay in the packs until gc).
4. If no candidate comes out consistent, the live index (or the first that reads back) is
   re-derived without lowering any reference count: a count that a damaged table lost would
   otherwise let gc delete bytes that a file still needs.
What cannot be repaired is reported as damaged files.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from .chunking import ChunkerParams
from .errors import HubfsError
from .index import ChunkEntry, Index, Txn
from .packs import ChunkLocation, PackFiles
from .verify import Intact, VerifyReport, check_files, verify

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
    objects_fixed: int = 0  # content -> object mappings dropped or re-made
    refcounts_fixed: int = 0
    missing_chunks: int = 0
    notes: list[str] = field(default_factory=list)


PROBE_TIMEOUT_S = 600.0


def index_readable(path: Path) -> bool:
    """Whether an index opens and every value in it decodes (run it in a child: see
    ``probe``)."""
    try:
        index = Index(path, readonly=True, tolerate_missing=True)
    except HubfsError:
        return False
    try:
        index.settings()  # raises when damaged
        with index.read() as txn:
            for _ in txn.chunks():
                pass
            if "objects" in index.dbs:
                for _ in txn.objects():
                    pass
            for parent, _name, _child, _seq in list(txn.all_dirents()):
                for _ in txn.dir_entries(parent):
                    pass
            for _ in txn.contents():
                pass
            for _ in txn.inodes():
                pass
            for _ in txn.all_dirseq():
                pass
            for _ in txn.all_xattr_inos():
                pass
            for _ in txn.all_content_refs():
                pass
        return True
    except Exception as exc:  # noqa: BLE001  (any failure to decode means damage)
        log.info("index at %s does not read back: %s", path, exc)
        return False
    finally:
        index.close()


def probe(path: Path) -> bool:
    """``index_readable`` in a child process: a damaged index may crash its reader."""
    if not (path / "data.mdb").is_file():
        return False
    code = "import sys; from hubfs.repair import index_readable as r; " \
        "sys.exit(0 if r(__import__('pathlib').Path(sys.argv[1])) else 1)"
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        log.info("index at %s: the read-through did not finish", path)
        return False
    if done.returncode != 0:
        log.info("index at %s does not read back (exit %d)", path, done.returncode)
    return done.returncode == 0


def repair(store_path: Path, progress: bool | None = None) -> RepairReport:
    """Repair an unmounted store in place (see the module docstring)."""
    from .store import Store, _check_marker, _take_lock

    _check_marker(store_path)
    lock_fd = _take_lock(store_path)
    try:
        report = RepairReport()
        index_dir = store_path / "index"
        candidates: list[Path] = [p for p in [index_dir, *snapshots(store_path)] if probe(p)]
        if not candidates:
            raise HubfsError(f"the index of {store_path} is damaged and no snapshot reads back: "
                             "nothing to restore from (the packs still hold every chunk, but "
                             "not the file names)", 3)
        packs = PackFiles(store_path / "packs")
        try:
            intact = check_files(packs, _chunker_params(candidates), VerifyReport(), progress)
        finally:
            packs.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = store_path / f"index.damaged-{stamp}"
        original = None
        if (index_dir / "data.mdb").exists():  # the live index, untouched, until we know
            aside.mkdir(mode=0o700)
            shutil.copyfile(index_dir / "data.mdb", aside / "data.mdb")
            original = aside
        chosen = None
        for candidate in candidates:
            if candidate != index_dir:
                _install(candidate / "data.mdb", index_dir)
            trial = RepairReport()
            try:  # a page that reads back can still fail a write (a damaged free list)
                _rederive(store_path, intact, trial, lower_refs=True)
                with Store(store_path, readonly=True) as store:
                    checked = verify(store, progress=False, intact=intact)
            except HubfsError as exc:
                log.info("repair: %s cannot be re-derived: %s", candidate, exc.message)
            else:
                if not checked.index_problems:
                    chosen, report = candidate, trial
                    break
                log.info("repair: %s still has %d index problems after re-deriving",
                         candidate, checked.index_problems)
            if original is not None:  # back to the live index as it was
                _install(original / "data.mdb", index_dir)
        if chosen is None:  # nothing comes out clean: keep every reference count
            chosen = _rederive_first(store_path, candidates, original, intact, report)
            report.notes.append("the index still has problems that no snapshot repairs; "
                                "reference counts were only raised, never lowered, so gc "
                                "keeps every chunk a damaged table may still need")
        if chosen != index_dir:
            report.restored_from = chosen.name
            kept = f"the damaged index is kept in {aside.name}" if original else \
                "there was no index file"
            report.notes.append(f"the index was damaged: restored snapshot {chosen.name}; "
                                f"{kept}; changes made after the snapshot are lost (their "
                                "bytes stay until gc)")
        elif original is not None:
            shutil.rmtree(original)
        with Store(store_path, readonly=True) as store:
            clean = verify(store, progress=False, intact=intact).ok
        if clean:  # never keep a snapshot of an index that still has problems
            index = Index(index_dir, readonly=True)
            try:
                snapshot_or_warn(index, store_path)
            finally:
                index.close()
        return report
    finally:
        os.close(lock_fd)


def _chunker_params(candidates: list[Path]) -> ChunkerParams:
    """The store's chunking parameters (re-chunking objects needs them), from the first
    candidate index whose settings read back."""
    for candidate in candidates:
        try:
            index = Index(candidate, readonly=True, tolerate_missing=True)
            try:
                return ChunkerParams.from_dict(index.settings()["chunker"])
            finally:
                index.close()
        except (HubfsError, TypeError, ValueError):
            continue
    raise HubfsError("no index or snapshot of this store keeps its settings: nothing to "
                     "restore from", 3)


def _rederive_first(store_path: Path, candidates: list[Path], original: Path | None,
                    intact: Intact, report: RepairReport) -> Path:
    """Install the first candidate that takes a re-derivation that only raises counts."""
    index_dir = store_path / "index"
    for candidate in candidates:
        source = original if candidate == index_dir else candidate
        if source is not None:  # the live index as it was, or a snapshot
            _install(source / "data.mdb", index_dir)
        try:
            _rederive(store_path, intact, report, lower_refs=False)
        except HubfsError as exc:
            log.info("repair: %s cannot be re-derived: %s", candidate, exc.message)
            continue
        return candidate
    if original is not None:
        _install(original / "data.mdb", index_dir)
    raise HubfsError(f"the index of {store_path} and every snapshot are too damaged to rewrite: "
                     "nothing to restore from; `hubfs verify --repair` cannot help, copy out "
                     "what `hubfs cat` still reads and import it into a new store", 3)


def _install(data_mdb: Path, index_dir: Path) -> None:
    """Make ``data_mdb`` (a copy) the store's index; LMDB makes a new lock file."""
    if index_dir.exists():
        shutil.rmtree(index_dir)
    index_dir.mkdir(mode=0o700)
    shutil.copyfile(data_mdb, index_dir / "data.mdb")


def _rederive(store_path: Path, intact: Intact, report: RepairReport, lower_refs: bool) -> None:
    """Chunk locations from the packs and objects, each content's object from what the
    objects hold, reference counts from the tables and inodes. With ``lower_refs`` False no
    count goes down (the index is known to be damaged)."""
    from .store import upgrade_settings

    found: dict[bytes, ChunkLocation] = {}
    for rec in intact.records.values():
        found.setdefault(rec.chunk_id, rec.location)
    index = Index(store_path / "index")
    try:
        with index.write() as txn:
            upgrade_settings(txn)  # a snapshot older than the store's format
            _rederive_objects(txn, intact, report)
            tables = dict(txn.contents())
            uses: Counter[bytes] = Counter(c for t in tables.values() for c in t.chunk_ids)
            for chunk_id in set(uses) | {cid for cid, _ in txn.chunks()}:
                entry = txn.chunk(chunk_id)
                refs = uses[chunk_id]
                if entry is not None and not lower_refs:
                    refs = max(refs, entry.refcount)
                loc = found.get(chunk_id)
                if loc is None:
                    if uses[chunk_id]:
                        report.missing_chunks += 1
                    if entry is not None and entry.refcount != refs:
                        report.refcounts_fixed += 1
                        txn.put_chunk(chunk_id, ChunkEntry(entry.location, refs))
                    continue
                here = None if entry is None else intact.records.get(
                    (entry.location.pack_id, entry.location.offset))
                if entry is None or here is None or here.chunk_id != chunk_id \
                        or here.location != entry.location:
                    report.relocated += 1
                    txn.put_chunk(chunk_id, ChunkEntry(loc, refs))
                elif entry.refcount != refs:
                    report.refcounts_fixed += 1
                    txn.put_chunk(chunk_id, ChunkEntry(entry.location, refs))
            holders: Counter[bytes] = Counter(
                inode.content_id for _ino, inode in txn.inodes() if inode.content_id)
            for cid in set(tables) | {c for c, _ in txn.all_content_refs()}:
                refs = holders[cid]
                if not lower_refs:
                    refs = max(refs, txn.content_refs(cid))
                if cid in tables and txn.content_refs(cid) != refs:
                    report.refcounts_fixed += 1
                    txn.put_content_refs(cid, refs)
    finally:
        index.close()


def _rederive_objects(txn: Txn, intact: Intact, report: RepairReport) -> None:
    """Map each content to an object that holds exactly its bytes, and no other."""
    by_content = {cid: object_id for object_id, cid in intact.object_contents.items()}
    for cid, object_id in list(txn.objects()):
        if intact.object_contents.get(object_id) != cid:
            txn.delete_object(cid)  # the daemon serves it from its chunks instead
            report.objects_fixed += 1
    for cid, object_id in by_content.items():
        if txn.content(cid) is not None and txn.object_of(cid) is None:
            txn.put_object(cid, object_id)
            report.objects_fixed += 1
