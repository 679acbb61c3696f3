"""A cluster node's local store as a bounded cache (``--cache-size``): what goes when the store
outgrows its limit, and how the space comes back.

*Use* is the bytes of the store's pack and object files, whatever they hold: fetched data, the
node's own files, copies on demand (hubfs.materialise: counted here, and evicted with their
content), and dead records gc has not reclaimed yet. The index, staging files and the upload
queue are not counted. Above the limit, contents are evicted until use is at ``LOW_WATER`` of it.

*What may go*: a content the bucket holds (the pull that brought it or the upload that sent it
said so, or a HEAD; contents are immutable and nothing deletes them from the bucket) that is
not queued for upload, not open, and not what a staged write is laid over. A chunk goes only when every content that holds it
goes (its reference count equals its occurrences in the evicted contents): so a chunk only this
node holds never goes, and an evicted chunk can be fetched again through any content that holds
it, by the ordinary lazy fetch (hubfs.cluster). Chunks pinned for staged writes and objects the
kernel serves opens from stay too.

*Order*: least recently used first, among the contents known to be in the bucket; the bucket is
asked (HEAD, once per content and mount) about the others, again least recently used first,
only when those free too little. A content's last use is the newest of this mount's opens
and closes of it (in memory) and the access times its inodes record (relatime-style, at opens:
``Names.accessed``), so there is no index write per read and the order survives a restart at the
granularity relatime keeps (a day, or the first open after a change).

*How* (a crash loses nothing): the plan is made in a worker (an index read, HEADs); then, with
ingests held off (``IngestGate``, so no file being stored counts on a chunk the plan takes) and on
the trio thread (so the open files it checks are the current ones), one index transaction
re-checks every chunk and re-points it to ``packs.REMOTE_PACK_ID``, and drops the evicted
contents' objects from the index. The index is made durable, and only then does ``gc.collect``
rewrite the packs that held those chunks (live records copied, the pack deleted) and delete the
objects no content maps. A crash before that sync keeps the old index and every byte; after it,
the bytes are garbage that gc drops. While a pack is rewritten its live records exist twice, so
use can briefly exceed the limit by one pack's live bytes; it can also exceed it by what is
fetched in the ``CHECK_INTERVAL_S`` before a check, and by what may not go.

*Costs*: a check stats the pack and object files when the index changed since the last one
(at most every ``CHECK_INTERVAL_S``); an eviction reads every inode and the chunk entries of
every content (O(chunks), in a worker), and with the ``LOW_WATER`` hysteresis runs about once
per tenth of the limit fetched.

*Counters*: this mount's reads (content bytes the daemon served; reads the kernel serves from
objects are not seen, and are all local), bytes fetched from the bucket, and evictions, for
``hubfs status``; lifetime totals in the index (``CACHE_META``, written at each eviction and at
unmount) for ``hubfs stats``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import gc
from .contents import EMPTY
from .errors import HubfsError, RemoteError
from .index import ChunkEntry, Txn
from .packs import OBJECT_BIT, ChunkLocation, remote_location
from .store import Store

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5
UNBOUNDED_CHECK_S = 10.0  # without a limit, use is measured for `hubfs status` only
LOW_WATER = 0.9  # an eviction brings use down to this fraction of the limit
CACHE_META = "cache_counters"  # JSON: lifetime totals of the counters below
COUNTERS = ("evicted_bytes", "evicted_contents", "read_bytes", "fetched_bytes")

# What must stay now (``FileSystem.held_open``): contents of open files, chunks staged writes
# are laid over or pinned, files the kernel serves opens from (object ids among them).
Held = tuple[set[bytes], set[bytes], set[object]]


@dataclass(frozen=True)
class Plan:
    contents: list[bytes]  # least recently used first
    tables: dict[bytes, tuple[bytes, ...]]  # their chunk ids
    chunks: dict[bytes, ChunkLocation]  # chunks that go with them, where they were planned
    freed_bytes: int


def footprint(loc: ChunkLocation) -> int:
    """Disk bytes a chunk's copy takes (a pack record with its header, or a span of an object)."""
    return loc.record_end - loc.offset


def disk_use(store: Store) -> int:
    """Bytes of the store's pack and object files (files gc deletes meanwhile count as gone)."""
    total = 0
    for directory, suffix in ((store.packs.directory, ".pack"), (store.packs.objects_dir, ".obj")):
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.endswith(suffix):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:
                    continue
    return total


def load_counters(txn: Txn) -> dict[str, int]:
    raw = txn.meta_get(CACHE_META)
    try:
        saved = json.loads(raw) if raw else {}
    except ValueError:
        saved = {}
    return {k: int(saved.get(k, 0)) if isinstance(saved, dict) else 0 for k in COUNTERS}


class Cache:
    """Eviction for one mount of a cluster store; its methods run on the mount's trio thread
    unless they say otherwise. ``limit_bytes`` None: nothing is evicted, reads are counted."""

    def __init__(self, store: Store, limit_bytes: int | None,
                 in_remote: Callable[[bytes, bool], bool | None]) -> None:
        self.store = store
        self.limit_bytes = limit_bytes
        # (worker thread) whether the bucket holds a content; None: not known without asking
        # it (the second argument: ask); may raise RemoteError
        self._in_remote = in_remote
        self._last_use: dict[bytes, int] = {}  # content id -> time.time_ns() of last open/close
        # set by the mount: what must stay, a dropped copy on demand, the read counters
        self.held: Callable[[], Held] = lambda: (set(), set(), set())
        self.dropped_object: Callable[[int], None] = lambda object_id: None
        self.reads: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (read, fetched)
        self.used_bytes: int | None = None  # at the last check
        self.evicted_bytes = 0
        self.evicted_contents = 0
        self._stuck = False  # said once per episode: over the limit and nothing may go
        with store.read() as txn:
            self._saved = load_counters(txn)

    def used(self, content_id: bytes) -> None:
        """A content was opened or closed: it is the most recently used now."""
        if content_id:
            self._last_use[content_id] = time.time_ns()

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Measure the use whenever the index changed (at most every ``CHECK_INTERVAL_S``) and
        evict above the limit, until cancelled."""
        seen = -1
        while True:
            await trio.sleep(CHECK_INTERVAL_S if self.limit_bytes else UNBOUNDED_CHECK_S)
            txn_id = int(self.store.index.env.info()["last_txnid"])
            if txn_id == seen:
                continue
            seen = txn_id
            try:
                if self.limit_bytes is None:  # measured for `hubfs status` only
                    self.used_bytes = await trio.to_thread.run_sync(disk_use, self.store)
                    continue
                await self.check()
            except HubfsError as exc:
                log.error("cache eviction failed: %s; retried at the next check", exc.message)
            except Exception:
                log.exception("cache eviction failed; retried at the next check")

    async def check(self) -> int:
        """Measure the use and, above the limit, evict down to ``LOW_WATER`` of it; returns
        the bytes evicted."""
        assert self.limit_bytes is not None
        self.used_bytes = await trio.to_thread.run_sync(disk_use, self.store)
        if self.used_bytes <= self.limit_bytes:
            self._stuck = False
            return 0
        goal = self.used_bytes - int(LOW_WATER * self.limit_bytes)
        held = self.held()
        uses = dict(self._last_use)
        plan = await trio.to_thread.run_sync(self.plan, held, uses, goal)
        if not plan.chunks and not plan.contents:
            if not self._stuck:
                log.info("cache: %d bytes in use, above the limit of %d, and nothing more "
                            "may go (data the bucket does not hold yet, or open files)",
                            self.used_bytes, self.limit_bytes)
            self._stuck = True
            return 0
        gate = self.store.ingest_gate
        await trio.to_thread.run_sync(gate.enter_exclusive)
        try:
            flipped, dropped = self.apply(plan, self.held())
        finally:
            gate.exit_exclusive()
        if not flipped and not dropped:
            return 0
        rewrite = {loc.pack_id for loc in flipped.values() if not loc.pack_id & OBJECT_BIT}

        def reclaim() -> None:
            self.store.sync_index()  # no byte goes before the index that drops it is durable
            gc.collect(self.store, show_bar=False, rewrite=rewrite)

        await trio.to_thread.run_sync(reclaim)
        self.used_bytes = await trio.to_thread.run_sync(disk_use, self.store)
        evicted = sum(loc.raw_len for loc in flipped.values())
        log.info("cache: evicted %d bytes of chunks and %d objects (copies on demand among "
                 "them); %d of %d bytes in use", evicted, len(dropped), self.used_bytes,
                 self.limit_bytes)
        return evicted

    # ---- planning (a worker thread) ------------------------------------------------------

    def plan(self, held: Held, uses: dict[bytes, int], goal_bytes: int) -> Plan:
        """The least recently used contents that may go and whose chunks free ``goal_bytes``
        (or as many as there are). Asks the bucket (HEAD) about contents it does not know."""
        open_contents, pinned, serving = held
        tables: dict[bytes, tuple[bytes, ...]] = {}
        entries: dict[bytes, ChunkEntry] = {}
        copies: dict[bytes, int] = {}  # content -> bytes of its copy on demand
        protected = set(pinned)
        with self.store.read() as txn:
            for _ino, inode in txn.inodes():
                cid = inode.content_id
                if cid and cid != EMPTY.content_id:
                    uses[cid] = max(uses.get(cid, 0), inode.atime_ns)
            for cid in open_contents:
                table = txn.content(cid)
                if table is not None:
                    protected.update(table.chunk_ids)
            copy_sizes = {object_id: size for object_id, _cid, size in txn.materialised()}
            for cid in sorted(uses, key=uses.__getitem__):
                table = txn.content(cid)
                if cid in open_contents or table is None:
                    continue
                local = False
                for chunk_id in table.chunk_ids:
                    entry = entries.get(chunk_id) or txn.chunk(chunk_id)
                    if entry is None:
                        continue
                    entries[chunk_id] = entry
                    local = local or not entry.location.remote
                object_id = txn.object_of(cid)
                if object_id in copy_sizes:
                    copies[cid] = copy_sizes[object_id]
                if local or cid in copies:
                    tables[cid] = table.chunk_ids
        chosen: list[bytes] = []
        taken: dict[bytes, ChunkLocation] = {}
        occurrences: Counter[bytes] = Counter()
        freed = 0
        unknown: list[bytes] = []
        for ask, order in ((False, list(tables)), (True, unknown)):  # least recently used first
            for cid in order:
                if freed >= goal_bytes:
                    break
                try:
                    there = self._in_remote(cid, ask)
                except RemoteError as exc:
                    log.info("cache: the bucket does not answer (%s); only contents known to "
                             "be there are evicted until it does", exc.message)
                    break
                if there is None:
                    unknown.append(cid)  # asked about only if the known ones free too little
                if not there:
                    continue
                chosen.append(cid)
                occurrences.update(tables[cid])
                freed += copies.get(cid, 0)
                for chunk_id in tables[cid]:
                    entry = entries.get(chunk_id)
                    if (entry is None or chunk_id in taken or entry.location.remote
                            or occurrences[chunk_id] != entry.refcount or chunk_id in protected
                            or entry.location.pack_id in serving):
                        continue
                    taken[chunk_id] = entry.location
                    freed += footprint(entry.location)
        return Plan(chosen, {cid: tables[cid] for cid in chosen}, taken, freed)

    # ---- the index change (trio thread, ingests held off) ----------------------------------

    def apply(self, plan: Plan, held: Held) -> tuple[dict[bytes, ChunkLocation], list[int]]:
        """Re-point the planned chunks that may still go to the bucket, in one transaction;
        returns them (with their old locations) and the object ids no longer mapped."""
        open_contents, pinned, serving = held
        flipped: dict[bytes, ChunkLocation] = {}
        dropped: list[int] = []
        with self.store.metadata_write() as txn:
            alive = [cid for cid in plan.contents
                     if cid not in open_contents and txn.content(cid) is not None]
            occurrences: Counter[bytes] = Counter()
            for cid in alive:
                occurrences.update(plan.tables[cid])
            protected = set(pinned)
            for cid in open_contents:
                table = txn.content(cid)
                if table is not None:
                    protected.update(table.chunk_ids)
            for chunk_id, loc in plan.chunks.items():
                entry = txn.chunk(chunk_id)
                # every reference is one of the evicted contents', now, in this transaction
                if (entry is None or entry.location != loc or chunk_id in protected
                        or entry.refcount != occurrences[chunk_id] or loc.pack_id in serving):
                    continue
                txn.put_chunk(chunk_id, ChunkEntry(remote_location(loc.raw_len), entry.refcount))
                flipped[chunk_id] = loc
            gone = {cid for cid in alive if any(c in flipped for c in plan.tables[cid])}
            materialised = {object_id for object_id, _cid, _size in txn.materialised()}
            for cid in alive:
                object_id = txn.object_of(cid)
                if object_id is None or object_id in serving:
                    continue
                if object_id in materialised or cid in gone:
                    txn.delete_object(cid)  # gc deletes the file (moving chunks still used)
                    txn.delete_materialised(object_id)
                    dropped.append(object_id)
                    gone.add(cid)
            self.evicted_bytes += sum(loc.raw_len for loc in flipped.values())
            self.evicted_contents += len(gone)
            txn.meta_put(CACHE_META, json.dumps(self.totals()).encode())
        for object_id in dropped:
            self.dropped_object(object_id)
        self.store.reader.forget_tables()
        return flipped, dropped

    # ---- reports ---------------------------------------------------------------------------

    def _mount_counts(self) -> dict[str, int]:
        read, fetched = self.reads()
        return {"evicted_bytes": self.evicted_bytes, "evicted_contents": self.evicted_contents,
                "read_bytes": read, "fetched_bytes": fetched}

    def totals(self) -> dict[str, int]:
        """Lifetime counters: those saved in the index plus this mount's."""
        mine = self._mount_counts()
        return {k: self._saved[k] + mine[k] for k in COUNTERS}

    def save(self) -> None:
        """Write the lifetime counters to the index (at unmount)."""
        with self.store.metadata_write() as txn:
            txn.meta_put(CACHE_META, json.dumps(self.totals()).encode())

    def status(self) -> dict[str, Any]:
        mine = self._mount_counts()
        return {
            "cache_limit_bytes": self.limit_bytes,
            "cache_used_bytes": self.used_bytes,
            "cache_evicted_bytes": mine["evicted_bytes"],
            "cache_evicted_contents": mine["evicted_contents"],
            "cache_read_bytes": mine["read_bytes"],
            "cache_hit_rate": hit_rate(mine),
        }


def hit_rate(counters: dict[str, int]) -> float | None:
    """The share of the content bytes the daemon served that it did not have to fetch:
    1 - fetched / read (fetched ahead but never read counts as a miss too)."""
    read, fetched = counters["read_bytes"], counters["fetched_bytes"]
    return round(1 - min(fetched, read) / read, 4) if read else None


def report(store: Store, limit_bytes: int | None, used_bytes: int) -> dict[str, Any]:
    """A store's cache figures for ``hubfs stats`` (lifetime counters, as of the last save)."""
    with store.read() as txn:
        counters = load_counters(txn)
    return {"limit_bytes": limit_bytes, "used_bytes": used_bytes, **counters,
            "hit_rate": hit_rate(counters)}
