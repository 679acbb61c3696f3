"""``hubfs gc``: give back the space of chunks no file references any more.

Two steps, each safe to kill at any point:

1. Drop index entries of chunks whose refcount is 0. This runs under the store's ingest gate
   held exclusively, so no ingest is between finding such a chunk (and deciding to reuse it) and
   committing its reference.
2. Rewrite every sealed pack whose live bytes fall under ``REWRITE_LIVE_FRACTION``: its live
   records are copied, as stored, to the newest pack and synced; one index transaction moves
   their locations; only then is the old pack deleted. An object (hubfs.objects) whose content
   is gone is treated the same way, whatever its live bytes: chunks other contents still use
   move to a pack, and the file goes. An object file no index entry names (a crash between
   its link and its commit) is deleted. Killed before the transaction, the copies
   are garbage the next gc drops; killed after it, the old pack has no live bytes and the next gc
   deletes it. An index entry never points at a deleted pack.

Readers keep working: cached chunk tables are dropped once locations move, and a reader that
still opens an old pack retries with fresh locations (``ContentReader``).

A cluster node's cache eviction (hubfs.cache) gives its space back through ``collect`` too: it
names the packs it emptied in part (``rewrite``), which are then rewritten whatever their live
bytes. One ``collect`` runs at a time in a process (a second waits): two at once would copy
the same records.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .errors import IntegrityError
from .index import ChunkEntry
from .objects import object_ids
from .packs import PACK_HEADER, fsync_directory, location_name, pack_ids
from .progress import Progress
from .store import Store

log = logging.getLogger(__name__)

# A pack is rewritten when less than this fraction of its bytes is still referenced: routine
# gc leaves at most a fifth of a pack dead rather than rewrite 128 MiB to win back a little.
REWRITE_LIVE_FRACTION = 0.8
_one_at_a_time = threading.Lock()


@dataclass
class GcReport:
    chunks_dropped: int = 0
    packs_rewritten: int = 0
    packs_deleted: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    records_moved: int = 0
    damaged_packs: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def collect(store: Store, progress: Callable[[int, int], None] | None = None,
            show_bar: bool | None = None, full: bool = False,
            rewrite: Collection[int] = ()) -> GcReport:
    """Run both steps on a writable store (the CLI's, or the mount daemon's own). ``full``
    rewrites every pack holding any dead byte, instead of only the sparse ones; the packs in
    ``rewrite`` are rewritten whatever their live bytes (the current pack too: it is sealed)."""
    if store.writer is None or store.ingestor is None:
        raise ValueError("gc needs a writable store")
    with _one_at_a_time:
        return _collect(store, progress, show_bar, full, rewrite)


def _collect(store: Store, progress: Callable[[int, int], None] | None,
             show_bar: bool | None, full: bool, rewrite: Collection[int]) -> GcReport:
    writer, ingestor = store.writer, store.ingestor
    assert writer is not None and ingestor is not None
    report = GcReport(bytes_before=_pack_bytes(store))
    with store.ingest_gate.exclusive():
        ingestor.forget_pending()  # nothing is between prepare and commit now
        with store.write() as txn:
            with store.pinned_lock:
                pinned = set(store.pinned)
            dead = [cid for cid, entry in txn.chunks()
                    if entry.refcount == 0 and cid not in pinned]
            for cid in dead:
                txn.delete_chunk(cid)
            mapped = {object_id for _cid, object_id in txn.objects()}
        # An object is linked just before the commit that maps it, while its ingest holds the
        # gate: chosen now, no unmapped object is one being made.
        unmapped = [o for o in object_ids(store.packs.objects_dir) if o not in mapped]
        report.chunks_dropped = len(dead)
        writer.seal()
    live: dict[int, int] = {}
    members: dict[int, list[tuple[bytes, ChunkEntry]]] = {}
    with store.read() as txn:
        for cid, entry in txn.chunks():
            loc = entry.location
            live[loc.pack_id] = live.get(loc.pack_id, 0) + loc.record_end - loc.offset
            members.setdefault(loc.pack_id, []).append((cid, entry))
    candidates = [(object_id, live.get(object_id, 0)) for object_id in unmapped]
    for pack_id in sorted(pack_ids(store.packs.directory)):
        if pack_id == writer.current_pack:
            continue
        size = store.packs.path(pack_id).stat().st_size
        threshold = size - PACK_HEADER.size if full else REWRITE_LIVE_FRACTION * size
        if live.get(pack_id, 0) < threshold or pack_id in rewrite:
            candidates.append((pack_id, live.get(pack_id, 0)))
    total = sum(n for _p, n in candidates)
    done = 0
    with Progress("gc", total, enabled=show_bar) as bar:
        for pack_id, live_bytes in candidates:
            _rewrite(store, pack_id, members.get(pack_id, []), report)
            done += live_bytes
            bar.advance(live_bytes)
            if progress:
                progress(done, total)
    store.packs.close_retired()
    report.bytes_after = _pack_bytes(store)
    log.info("gc: %s", report.to_dict())
    return report


def _rewrite(store: Store, pack_id: int, entries: list[tuple[bytes, ChunkEntry]],
             report: GcReport) -> None:
    assert store.writer is not None
    with store.ingest_gate.exclusive():
        moved = []
        try:
            for cid, entry in entries:
                old = entry.location
                stored = store.packs.read_stored(cid, old)
                moved.append((cid, old, store.writer.append(cid, old.codec, old.raw_len, stored)))
        except IntegrityError as exc:
            log.error("gc keeps %s: it holds damaged data (%s); run `hubfs verify`",
                      location_name(pack_id), exc.message)
            report.damaged_packs += 1
            return
        with store.write() as txn:  # syncs the copies first
            for cid, old, new in moved:
                current = txn.chunk(cid)
                if current is not None and current.location == old:
                    txn.put_chunk(cid, ChunkEntry(new, current.refcount))
        store.sync_index()  # the new locations are on disk before the old pack goes
        store.reader.forget_tables()
        store.packs.retire(pack_id)
        path = store.packs.path(pack_id)
        os.unlink(path)  # an object the kernel serves from stays readable to its opens
        fsync_directory(path.parent)
    report.records_moved += len(moved)
    report.packs_rewritten += bool(moved)
    report.packs_deleted += 1


def _pack_bytes(store: Store) -> int:
    """Bytes of packs and objects."""
    return sum(store.packs.path(p).stat().st_size
               for p in [*pack_ids(store.packs.directory), *object_ids(store.packs.objects_dir)])
