"""A store as one node of a cluster store: the wiring of remote, upload queue and namespace log.

``remote`` (bytes in the bucket), ``upload_queue`` (what must reach it) and ``namespace_log`` /
``cluster_sync`` (the shared namespace) know nothing of a store or a mount; this module ties
them to both. ``hubfs init STORE --remote URL`` calls ``init_remote``; a mount of such a store
runs one ``ClusterNode`` in its daemon.

Semantics (what a user of a cluster gets)
-----------------------------------------
*What is shared.* Every regular file, directory and symlink under the mount, with its
permission bits, owner, group and (files) mtime, size and content. Not shared: xattrs, hard
links as links (each name is a file of its own on other nodes), device nodes, FIFOs, sockets,
atimes and ctimes, locks (``flock`` is node-local). Names that are not UTF-8 stay local.

*How a node finds its own changes.* By comparison, not by hooks in every operation: at each
sync the node walks its namespace and compares every path with the view it last agreed with
(``View.tree()``, kept in the index). Each difference becomes an entry stamped with the node's
hybrid clock at that moment; a path gone is a tombstone. A file being written is not seen until
its content is committed (so a half-written file is never published), and a crash loses
nothing: the namespace is the outbox. The price: a change is timestamped when the sync sees it
(≤ ``SYNC_INTERVAL_S`` late), and the walk costs O(files) per sync that follows a local index
change (skipped while the index has not changed). A rename is a tombstone plus a new entry.

*Order of one sync* (``sync_once``, serialised): (1) seal: walk, diff, queue each new content
for upload (``UploadQueue.put_content``, durable), merge the node's entries into its view and
seal them as segment SEQ; the view, SEQ+1 and the sealed segment's bytes commit in one index
transaction, then the segment is queued (``put_object``) and its bytes dropped from the index.
A crash between the two queues the same bytes again at the next mount. The queue sends jobs in
order, so a segment is published only after the contents it names. (2) pull: the bucket's newer
snapshots and segments are merged into a copy of the view (off the trio thread), the chunk
tables of new contents fetched, then (3) apply, on the trio thread in one index transaction
with the new view: every path whose entry in the merged tree changed is made so locally
(created, replaced by a new inode, removed). A path the node changed itself meanwhile is left
alone (its change is published at the next sync and wins by its later timestamp). Last writer
wins per path, by hybrid timestamp, on every node alike (``namespace_log``).

*Contents the node does not hold.* An applied file gets an inode with its size and content id;
the content's chunk table is registered with the chunks at ``packs.REMOTE_PACK_ID`` (no local
bytes), reference-counted like any other. Such a content is fetched in *parts*: the chunks
that begin in each ``FETCH_PART_BYTES`` of it, each part one ``Remote.fetch_chunks`` range GET
(every chunk checked against its BLAKE3 id), appended raw to a pack and re-pointed in one index
transaction. A read that touches remote chunks (``ContentReader`` calls ``fetch``, in a worker
thread) queues the parts it touches but the first, and those of the ``FETCH_AHEAD_BYTES``
after it, for ``FETCH_THREADS`` background threads, then fetches the parts it touches itself,
or waits for the thread that has one in flight (a queued part not begun yet it takes over).
So a sequential reader's GETs, appends and commits overlap, and it waits, if at all, for the
one part it is in, not for a window of them; the node's disk grows by what it read, plus at
most ``FETCH_AHEAD_BYTES`` per content. Those commits wait for no fsync: the mount's index is
durable only at ``Store.sync_index``, which syncs the packs first. A file replaced by another
node is a new inode here, so no page cache holds its old bytes (processes
that hold the old one open keep reading it, as after a local rename over it). Such files are
served by the daemon, not by the kernel from objects, until wholly fetched: then an open may
copy one into an object of its own (a copy on demand, hubfs.materialise), which the kernel
serves. A remote that does not answer fails the
read with EIO within ``MOUNT_DEADLINE_S`` plus the connect and read timeouts (about 13 s), with
one log line per outage; a damaged object fails it with EIO and an error naming the object.
``hubfs verify`` skips remote chunks; ``gc`` drops unreferenced ones as any other.

*In-place updates of such contents* (hubfs.writeback): the staging is laid over the remote
content as over any other. A read of the staged file that meets remote base chunks fetches
them as above (ahead no further than the bytes the file still takes from its base); a commit
first fetches every base chunk the new version keeps, read or not, because the bucket holds
one object per content and the node uploads the new version whole from its packs (chunks
written over or truncated away are not fetched, at ``FETCH_PART_BYTES`` granularity). Opens
and writes need no fetch. A commit that cannot fetch (the bucket down) fails within the bound
above with one more log line and keeps the staging (recovered after a crash, as any) for the
file's next close, the unmount or the next mount (whose recovery runs once the node can fetch).

*The cache* (``--cache-size``, hubfs.cache): with a limit, the store's packs and objects are
kept under it by evicting the least recently used contents the bucket holds (known from the
pull that brought them, the upload that sent them, or a HEAD; never one queued for upload, open,
or under a staged write): their chunks are re-pointed to ``REMOTE_PACK_ID``, so the next read
fetches them again as above, and gc gives their space back. Copies on demand count against the
limit and go with their content (rather than fetched contents being exempt from copies): a
model a node loads again is then served by the kernel, at disk speed. The price: a fetched
file opened twice takes twice its size until evicted (copies stay within
``--materialise-budget-gib`` too), so the disk grows by what is read and copied, not only read.
``hubfs status`` shows the limit, the use, what was evicted and the hit rate of daemon reads.

*Uploads* go through the durable queue (``STORE/uploads``), in the background, with backoff
while the remote is down; a content another node uploaded is found by a HEAD and not sent.

*Compaction.* Each node, after every ``COMPACT_AFTER_SEGMENTS`` of its own segments (the
mount's environment variable ``HUBFS_COMPACT_AFTER_SEGMENTS`` sets another number, read by
``compact_after_segments``), pulls into a copy of its view and, once the bucket holds every
segment the node sealed, publishes it as a snapshot (``ClusterLog.publish_snapshot``; the local
namespace follows it at the next pull) and prunes (``ClusterLog.prune``). A snapshot thus holds
only what its frontier covers, never an entry of a segment still queued, whose contents may not
be in the bucket yet; while the queue is behind, compaction waits for a later sync.

*Costs.* Each sync that follows a local index change walks the namespace; each sync that
changed something rewrites the node's view (one index value, O(paths)). Fine for caches of
thousands of files; a tree of millions wants per-operation entries and an incremental view.

Missing (said here so that nobody assumes it): an index snapshot taken between a fetch and
the next ``sync_index`` may name fetched chunks an OS crash then loses (``verify --repair`` from
it reports those files rather than marking them remote again); an in-place update uploads the
new version's kept bytes again (no server-side copy from the old object), and a commit that
failed for an outage is not retried when the bucket answers again, only at the events above.
"""

from __future__ import annotations

import bisect
import errno
import io
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from . import namespace
from .cache import Cache
from .cluster_sync import (
    COMPACT_AFTER_SEGMENTS,
    SYNC_INTERVAL_S,
    ClusterLog,
    join_cluster,
    segment_key,
)
from .compression import Codec
from .contents import EMPTY
from .errors import FsError, HubfsError, RemoteError, RemoteIntegrityError
from .index import ROOT_INO, ChunkEntry, ContentTable, Inode, Txn
from .namespace_log import (
    DamagedObject,
    Entry,
    HybridClock,
    Kind,
    Outbox,
    Segment,
    View,
    check_node_name,
    decode_segment,
    decode_snapshot,
    encode_segment,
    encode_snapshot,
)
from .packs import remote_location
from .remote import ContentTable as RemoteTable
from .remote import FetchedChunks, Remote
from .store import CLUSTER_META, Store
from .upload_queue import ContentSource, UploadQueue

log = logging.getLogger(__name__)

VIEW_META = "cluster_view"  # the node's view, as a snapshot object (gen = its snapshot_gen)
SEQ_META = "cluster_next_seq"  # decimal: the sequence number of the node's next segment
SEALED_META = "cluster_sealed"  # a sealed segment not queued yet (a crash came between)
UPLOADS_DIR = "uploads"
# A content is fetched in parts: the chunks that begin in each FETCH_PART_BYTES of it, one
# range GET each, stored and re-pointed in one index transaction each.
FETCH_PART_BYTES = 8 << 20
FETCH_AHEAD_BYTES = 64 << 20
FETCH_THREADS = 4
# A read of remote-only data fails (EIO) within about deadline + connect + read timeouts.
MOUNT_CONNECT_TIMEOUT_S = 2.0
MOUNT_READ_TIMEOUT_S = 5.0
MOUNT_DEADLINE_S = 6.0
SYNC_UPLOAD_WAIT_S = 300.0  # `hubfs sync` waits this long for the queue to drain
COMPACT_ENV = "HUBFS_COMPACT_AFTER_SEGMENTS"


def compact_after_segments() -> int:
    """How many of its own segments a node seals between two compactions:
    ``COMPACT_AFTER_SEGMENTS``, unless the mount's environment says otherwise (tests compact
    after a few; a cluster whose nodes sync rarely may want snapshots more often)."""
    raw = os.environ.get(COMPACT_ENV)
    if raw is None:
        return COMPACT_AFTER_SEGMENTS
    if not raw.strip().isdigit() or int(raw) < 1:
        raise HubfsError(f"{COMPACT_ENV}={raw!r}: give a whole number of segments (1 or more), "
                         f"or unset it for the default {COMPACT_AFTER_SEGMENTS}", 2)
    return int(raw)


@dataclass(frozen=True)
class ClusterConfig:
    remote: str
    node: str
    cache_bytes: int | None = None  # --cache-size (hubfs.cache); None: unbounded


def config_of(store: Store) -> ClusterConfig | None:
    doc = store.cluster_config()
    if not doc:
        return None
    limit = doc.get("cache_bytes")
    return ClusterConfig(str(doc["remote"]), str(doc["node"]),
                         int(limit) if isinstance(limit, int) else None)


def set_cache_size(store: Store, cache_bytes: int | None) -> ClusterConfig:
    """Record a cluster store's ``--cache-size`` (None: unbounded) for this and later mounts."""
    config = config_of(store)
    assert config is not None
    config = ClusterConfig(config.remote, config.node, cache_bytes)
    with store.metadata_write() as txn:
        txn.meta_put(CLUSTER_META, json.dumps(config.__dict__).encode())
    return config


def default_node_name() -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return name[:64] or "node"


def init_remote(store_path: Path, url: str, node: str | None,
                cache_bytes: int | None = None) -> ClusterConfig:
    """Make a new store one node of the cluster store at ``url`` (``hubfs init --remote``)."""
    node = node or default_node_name()
    try:
        check_node_name(node)
    except ValueError as exc:
        raise HubfsError(f"--node: {exc}", 2) from None
    remote = Remote(url)
    with Store(store_path) as store:
        join_cluster(remote, {"chunker": store.settings["chunker"]})
        seq = ClusterLog(remote, node).next_seq()
        if seq > 1:
            raise HubfsError(f"{remote.url} already has a node named {node!r}: give this one "
                             "another name with --node", 2)
        config = ClusterConfig(str(remote.url), node, cache_bytes)
        with store.metadata_write() as txn:
            txn.meta_put(CLUSTER_META, json.dumps(config.__dict__).encode())
            txn.meta_put(SEQ_META, b"1")
    log.info("store %s is node %s of %s", store_path, node, remote.url)
    return config


# ---- the local namespace as paths ---------------------------------------------------------


@dataclass(frozen=True)
class Local:
    ino: int
    inode: Inode


def _kind(inode: Inode) -> Kind | None:
    fmt = stat.S_IFMT(inode.mode)
    return {stat.S_IFREG: Kind.FILE, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK}.get(fmt)


def walk(txn: Txn) -> dict[str, Local]:
    """Every shared path of the namespace (regular files, directories, symlinks)."""
    out: dict[str, Local] = {}
    stack: list[tuple[int, str]] = [(ROOT_INO, "")]
    while stack:
        ino, prefix = stack.pop()
        for _seq, raw_name, child in txn.dir_entries(ino):
            try:
                name = raw_name.decode()
            except UnicodeDecodeError:
                continue
            inode = txn.inode(child)
            if inode is None or _kind(inode) is None:
                continue
            path = f"{prefix}/{name}" if prefix else name
            out[path] = Local(child, inode)
            if stat.S_ISDIR(inode.mode):
                stack.append((child, path))
    return out


def _local_sig(inode: Inode | None) -> tuple[object, ...] | None:
    if inode is None:
        return None
    kind = _kind(inode)
    perm, owner = stat.S_IMODE(inode.mode), (inode.uid, inode.gid)
    if kind is Kind.FILE:
        return ("f", perm, owner, inode.mtime_ns, inode.size,
                inode.content_id or EMPTY.content_id)
    if kind is Kind.DIR:
        return ("d", perm, owner)
    if kind is Kind.SYMLINK:
        return ("l", owner, inode.target.decode(errors="surrogateescape"))
    return None


def _entry_sig(e: Entry | None) -> tuple[object, ...] | None:
    if e is None or not e.live:
        return None
    owner = (e.uid, e.gid)
    if e.kind is Kind.FILE:
        return ("f", e.mode, owner, e.mtime_ns, e.size, e.content)
    if e.kind is Kind.DIR:
        return ("d", e.mode, owner)
    return ("l", owner, e.target)


def _entry_of(path: str, inode: Inode, clock: HybridClock) -> Entry:
    kind = _kind(inode)
    assert kind is not None
    return Entry(path, kind, clock.now(), stat.S_IMODE(inode.mode), inode.uid, inode.gid,
                 inode.mtime_ns, inode.size if kind is Kind.FILE else 0,
                 (inode.content_id or EMPTY.content_id) if kind is Kind.FILE else None,
                 inode.target.decode() if kind is Kind.SYMLINK else None)


def local_changes(local: dict[str, Local], base: dict[str, Entry], clock: HybridClock,
                  staged: Callable[[int], bool] = lambda ino: False) -> list[Entry]:
    """The node's own changes: where its namespace differs from the tree it last agreed on.
    A path whose file is ``staged`` (written, or closed with its commit still running) is left
    as it was: its inode still names the content it had before the writes (a new file: none),
    which is not what it holds; it is published by the first sync after its commit."""
    out = []
    for path, item in sorted(local.items()):
        if staged(item.ino):
            continue
        if _local_sig(item.inode) != _entry_sig(base.get(path)):
            try:
                out.append(_entry_of(path, item.inode, clock))
            except (UnicodeDecodeError, ValueError):
                continue  # a symlink target that is not UTF-8 stays local
    for path, entry in sorted(base.items()):
        if path not in local:
            out.append(entry.tombstone(clock.now()))
    return out


def register_remote(txn: Txn, cid: bytes, table: ContentTable) -> None:
    """Make a content the node does not hold known to the index: its chunks the store lacks
    get remote locations; references are counted as for any content (``contents.register``)."""
    if txn.content(cid) is not None:
        return
    for chunk_id, length in zip(table.chunk_ids, table.lengths):
        entry = txn.chunk(chunk_id) or ChunkEntry(remote_location(length), 0)
        txn.put_chunk(chunk_id, ChunkEntry(entry.location, entry.refcount + 1))
    txn.put_content(cid, table)


class TableMissing(Exception):
    """A content the pull took for known is gone: the apply is retried at the next sync."""


@dataclass
class Applied:
    """What an apply did that the mount must follow up on the trio thread."""

    names: list[tuple[int, bytes]]  # (parent, name) created or replaced
    removed: list[tuple[int, bytes]]  # (parent, name) gone or replaced: the kernel may cache
    unlinked: list[int]  # inodes that lost a name (drop them once unused)
    skipped: int = 0


def apply_tree(txn: Txn, old: dict[str, Entry], new: dict[str, Entry],
               local: dict[str, Local], tables: dict[bytes, ContentTable],
               busy: Callable[[int], bool]) -> Applied:
    """Make the local namespace follow the merged tree where it changed (``old`` -> ``new``),
    except at paths the node changed itself since it last agreed on ``old``."""
    changed = sorted(p for p in old.keys() | new.keys()
                     if _entry_sig(old.get(p)) != _entry_sig(new.get(p)))
    out = Applied([], [], [])
    inos: dict[str, int] = {p: item.ino for p, item in local.items()}
    inos[""] = ROOT_INO
    skip: set[str] = set()
    for path in changed:
        here = local.get(path)
        if _local_sig(here.inode if here else None) != _entry_sig(old.get(path)) or \
                (here is not None and busy(here.ino)):
            skip.add(path)
    out.skipped = len(skip)
    # removals (and replacements) deepest first
    for path in reversed(changed):
        here = local.get(path)
        want = new.get(path)
        if path in skip or here is None:
            continue
        if want is not None and want.kind is Kind.DIR and stat.S_ISDIR(here.inode.mode):
            continue  # a directory's attributes change in place
        parent, name = _split(path, inos)
        if parent is None:
            continue
        try:
            if stat.S_ISDIR(here.inode.mode):
                if txn.dir_has_entries(here.ino):
                    skip.add(path)
                    continue
                namespace.rmdir(txn, parent, name)
            else:
                namespace.unlink(txn, parent, name)
        except FsError:
            skip.add(path)
            continue
        out.unlinked.append(here.ino)
        out.removed.append((parent, name))
        inos.pop(path, None)
    for path in changed:
        want = new.get(path)
        if path in skip or want is None:
            continue
        parent, name = _split(path, inos)
        if parent is None:
            continue
        found = txn.dirent(parent, name)
        if found is not None:
            inode = txn.inode(found[0])
            if inode is not None and want.kind is Kind.DIR and stat.S_ISDIR(inode.mode):
                txn.put_inode(found[0], inode.with_(mode=stat.S_IFDIR | want.mode, uid=want.uid,
                                                    gid=want.gid))
                inos[path] = found[0]
            continue
        times = (want.mtime_ns, want.mtime_ns)
        if want.kind is Kind.DIR:
            ino = namespace.create(txn, parent, name, stat.S_IFDIR | want.mode, want.uid,
                                   want.gid, times_ns=times)
        elif want.kind is Kind.SYMLINK:
            assert want.target is not None
            ino = namespace.create(txn, parent, name, stat.S_IFLNK | 0o777, want.uid, want.gid,
                                   target=os.fsencode(want.target), times_ns=times)
        else:
            assert want.content is not None
            content = None
            if want.content != EMPTY.content_id:
                if txn.content(want.content) is None:
                    if want.content not in tables:  # dropped here since the pull looked
                        raise TableMissing(want.content.hex())
                    register_remote(txn, want.content, tables[want.content])
                content = (want.content, want.size)
            ino = namespace.create(txn, parent, name, stat.S_IFREG | want.mode, want.uid,
                                   want.gid, content=content, times_ns=times)
        inos[path] = ino
        out.names.append((parent, name))
    return out


def _split(path: str, inos: dict[str, int]) -> tuple[int | None, bytes]:
    parent, _, name = path.rpartition("/")
    return inos.get(parent), name.encode()


# ---- reading contents for upload ----------------------------------------------------------


class _ContentStream(io.RawIOBase):
    """A local content's bytes, read through the store's reader (for the upload queue)."""

    def __init__(self, store: Store, cid: bytes, size: int) -> None:
        self._store, self._cid, self._size, self._pos = store, cid, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        data = self._store.reader.read(self._cid, self._pos, len(buf))
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def content_source(store: Store) -> Callable[[bytes], ContentSource | None]:
    def source(cid: bytes) -> ContentSource | None:
        with store.read() as txn:
            table = txn.content(cid)
            if table is None:
                return None
            for chunk_id in table.chunk_ids:
                entry = txn.chunk(chunk_id)
                if entry is None or entry.location.remote:
                    return None  # not all here: the remote had it (another node sent it)
        return ContentSource(table.lengths, table.chunk_ids,
                             lambda: io.BufferedReader(_ContentStream(store, cid, table.size),
                                                       4 << 20))
    return source


# ---- the node in the mount's daemon -------------------------------------------------------


class ClusterNode:
    """One mount's side of the cluster: sync loop, upload queue, lazy fetches."""

    def __init__(self, store: Store, config: ClusterConfig) -> None:
        self.store = store
        self.config = config
        self.remote = Remote(config.remote, connect_timeout_s=MOUNT_CONNECT_TIMEOUT_S,
                             read_timeout_s=MOUNT_READ_TIMEOUT_S, deadline_s=MOUNT_DEADLINE_S)
        self.log = ClusterLog(self.remote, config.node)
        self.compact_after = compact_after_segments()
        self.queue = UploadQueue(store.path / UPLOADS_DIR, self.remote, content_source(store))
        self.view = View()
        self.last_sync: float | None = None
        self.last_error: str | None = None
        self.fetched_bytes = 0
        self._in_remote: set[bytes] = set()  # contents the bucket is known to hold
        self.cache = Cache(store, config.cache_bytes, self.in_remote)
        self.queue.confirmed = self._in_remote.add
        self._lock = trio.Lock()  # one sync at a time
        self._seen_txn = -1  # the index's last transaction when the node last looked
        # parts in flight, (content id, part) -> done; a part queued for the pool, not begun
        # yet, is pending (a read may take it over)
        self._parts: dict[tuple[bytes, int], Future[None]] = {}
        self._parts_guard = threading.Lock()
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="hubfs-fetch")
        self._closing = False
        self._outage = False
        # set by the mount: is an inode busy (staged: written, or its commit running), wait
        # for the commits of closed files, tell the kernel a name changed
        self.busy: Callable[[int], bool] = lambda ino: False
        self.settle: Callable[[], Awaitable[None]] = _nothing_to_settle
        self.invalidate: Callable[[int, bytes], None] = lambda parent, name: None
        self.unlinked: Callable[[int], None] = lambda ino: None
        self._load()

    def _load(self) -> None:
        with self.store.read() as txn:
            raw = txn.meta_get(VIEW_META)
            seq = txn.meta_get(SEQ_META)
            sealed = txn.meta_get(SEALED_META)
        if raw is not None:
            try:
                snap = decode_snapshot(raw, f"{self.store.path} cluster view")
            except DamagedObject as exc:
                raise HubfsError(f"{exc}: the node's view of the cluster is damaged; "
                                 "`hubfs verify --repair` restores an index snapshot", 3) from None
            self.view = View({e.path: e for e in snap.entries}, dict(snap.frontier), snap.gen)
            top = self.view.max_hlc()
            if top is not None:
                self.log.clock.observe(top)
        self.next_seq = int(seq or b"1")
        self._compacted_upto = self._compaction_mark()
        if sealed is not None:
            self._queue_sealed(sealed)

    def start(self) -> None:
        self.queue.start()
        self.store.reader.fetch = self.fetch

    def close(self) -> None:
        self.store.reader.fetch = None
        with self._parts_guard:
            self._closing = True
        # parts being fetched write to the store, which closes next; queued ones are dropped
        self._pool.shutdown(cancel_futures=True)
        self.queue.close()
        self.cache.save()

    # ---- sync ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Sync every ``SYNC_INTERVAL_S`` until cancelled."""
        while True:
            try:
                await self.sync_once()
            except HubfsError as exc:
                if self.last_error != exc.message:
                    log.warning("cluster sync: %s; retried every %.0f s", exc.message,
                                SYNC_INTERVAL_S)
                self.last_error = exc.message
            except Exception:
                log.exception("cluster sync failed; retried in %.0f s", SYNC_INTERVAL_S)
            await trio.sleep(SYNC_INTERVAL_S)

    async def sync_now(self, progress: Callable[[int, int], None]) -> dict[str, Any]:
        """``hubfs sync``: publish the node's changes, wait until they are in the bucket,
        then pull the other nodes' changes. Files closed before it are published: it waits
        for their commits (files still open for writing are published after their close)."""
        await self.settle()
        first = await self.sync_once()
        self.queue.kick()
        drained = await trio.to_thread.run_sync(self.queue.wait_empty, SYNC_UPLOAD_WAIT_S)
        if not drained:
            st = self.queue.status()
            raise HubfsError(f"{self.remote.url}: {st.queued} uploads still queued after "
                             f"{SYNC_UPLOAD_WAIT_S:.0f}s ({st.last_error or 'slow'}); they go on "
                             "in the background", 5)
        report = await self.sync_once()
        for key, value in first.items():
            report[key] += value
        return {**report, **self.status()}

    async def sync_once(self) -> dict[str, int]:
        async with self._lock:
            try:
                published = await self._seal()
                pulled, applied, skipped = await self._pull()
                await self._compact_if_due()
            except HubfsError as exc:
                self.last_error = exc.message
                raise
            self.last_error = None
            self.last_sync = time.time()
            return {"published_entries": published, "pulled_segments": pulled,
                    "applied_paths": applied, "skipped_paths": skipped}

    def _compaction_mark(self) -> int:
        return (self.next_seq - 1) // self.compact_after * self.compact_after

    async def _compact_if_due(self) -> None:
        """Every ``compact_after`` of its own segments, a node writes a snapshot of
        the merged view and prunes what older snapshots cover, so that a new or long-offline
        node reads a snapshot and a few segments, not the whole history."""
        mark = self._compaction_mark()
        if mark <= self._compacted_upto:
            return
        scratch = View(dict(self.view.entries), dict(self.view.frontier),
                       self.view.snapshot_gen)
        sealed = self.next_seq - 1

        def compact() -> bool:
            self.log.pull(scratch)
            # The view holds the entries of every segment the node sealed, published or still
            # queued; a snapshot must hold only what its frontier covers (contents a queued
            # segment names may not be in the bucket yet). Until the queue has sent them all,
            # the snapshot waits for a later sync.
            if scratch.frontier.get(self.config.node, 0) < sealed:
                return False
            if self.log.publish_snapshot(scratch) is not None:
                self.log.prune()
            return True

        if await trio.to_thread.run_sync(compact):
            self._compacted_upto = mark

    def _txn_id(self) -> int:
        return int(self.store.index.env.info()["last_txnid"])

    async def _seal(self) -> int:
        seen = self._txn_id()
        if seen == self._seen_txn:
            return 0
        with self.store.read() as txn:
            local = walk(txn)
        own = local_changes(local, self.view.tree(), self.log.clock, self.busy)
        if not own:
            self._seen_txn = seen
            return 0
        new_contents = sorted({e.content for e in own if e.kind is Kind.FILE and e.content
                               and e.content != EMPTY.content_id})
        await trio.to_thread.run_sync(self._queue_contents, new_contents)
        outbox = Outbox(self.config.node)
        for e in own:
            outbox.add(e)
        seg = outbox.seal(self.next_seq)
        assert seg is not None
        data = encode_segment(seg)
        view = View(dict(self.view.entries), dict(self.view.frontier), self.view.snapshot_gen)
        view.merge_all(own)
        with self.store.metadata_write() as txn:
            _save_view(txn, view)
            txn.meta_put(SEQ_META, str(seg.seq + 1).encode())
            txn.meta_put(SEALED_META, data)
        self.view, self.next_seq = view, seg.seq + 1  # committed
        await trio.to_thread.run_sync(self._queue_sealed, data)
        self._seen_txn = seen
        log.info("cluster: segment %d sealed (%d entries)", seg.seq, len(seg.entries))
        return len(seg.entries)

    def _queue_contents(self, cids: list[bytes]) -> None:
        source = self.queue.source
        for cid in cids:
            if source(cid) is not None:  # not held here: it came from the remote
                self.queue.put_content(cid)

    def _queue_sealed(self, data: bytes) -> None:
        seg: Segment = decode_segment(data, "sealed segment")
        self.queue.put_object(segment_key(seg.node, seg.seq), data)
        with self.store.metadata_write() as txn:
                txn.meta_delete(SEALED_META)

    async def _pull(self) -> tuple[int, int, int]:
        scratch = View(dict(self.view.entries), dict(self.view.frontier),
                       self.view.snapshot_gen)

        def pull() -> tuple[int, dict[bytes, ContentTable]]:
            report = self.log.pull(scratch)
            tables: dict[bytes, ContentTable] = {}
            if not report.changed:
                return report.segments, tables
            with self.store.read() as txn:
                wanted = {e.content for e in report.changed
                          if e.kind is Kind.FILE and e.content and e.content != EMPTY.content_id
                          and txn.content(e.content) is None}
            for cid in sorted(wanted):  # type: ignore[type-var]
                assert cid is not None
                t = self.remote.content_table(cid)
                tables[cid] = ContentTable(t.size, t.chunk_ids, t.chunk_lengths)
            return report.segments, tables

        segments, tables = await trio.to_thread.run_sync(pull)
        if scratch.frontier == self.view.frontier and scratch.snapshot_gen == \
                self.view.snapshot_gen:
            return segments, 0, 0
        old_tree, new_tree = self.view.tree(), scratch.tree()
        try:
            with self.store.metadata_write() as txn:
                local = walk(txn)
                done = apply_tree(txn, old_tree, new_tree, local, tables, self.busy)
                _save_view(txn, scratch)
            self.view = scratch  # committed
        except TableMissing as exc:
            log.info("cluster: content %s went away during the pull; applied at the next "
                     "sync", exc)
            return segments, 0, 0
        self._in_remote.update(tables)  # their tables came from the bucket: it holds them
        for ino in done.unlinked:
            self.unlinked(ino)
        if done.removed:
            await trio.to_thread.run_sync(self._invalidate, done.removed)
        applied = len(done.names) + len(done.removed)
        if applied or done.skipped:
            log.info("cluster: %d segments pulled, %d names changed, %d left to local "
                     "changes", segments, applied, done.skipped)
        return segments, applied, done.skipped

    def _invalidate(self, names: list[tuple[int, bytes]]) -> None:
        """Tell the kernel that names it may have cached changed (a worker thread: the call
        waits for requests on those directories, which the trio thread serves)."""
        for parent, name in names:
            self.invalidate(parent, name)

    # ---- lazy reads -----------------------------------------------------------------------

    def fetch(self, cid: bytes, offset: int, size: int, *, limit: int | None = None) -> None:
        """Make the chunks a read touches local (``reader.Fetcher``; a worker thread): the
        parts they lie in, in this thread (or waiting for the fetch that has them in flight),
        after asking the pool for the others and for the parts of the ``FETCH_AHEAD_BYTES``
        after the read (not past ``limit``), so that a sequential reader rarely waits for the
        network and then for one part only (a random reader's disk grows by at most that much
        per stall), and a range of many parts comes down in parallel."""
        try:
            table = self.remote.content_table(cid)
            end = min(offset + max(size, 1), table.size)
            if offset < end:
                first = bisect.bisect_right(table.chunk_starts, offset) - 1
                last = bisect.bisect_left(table.chunk_starts, end) - 1
                parts = range(table.chunk_starts[first] // FETCH_PART_BYTES,
                              table.chunk_starts[last] // FETCH_PART_BYTES + 1)
                horizon = min(end + FETCH_AHEAD_BYTES, table.size if limit is None else limit)
                self._fetch_ahead(cid, table, parts.start + 1, max(horizon, end))
                for part in parts:
                    self._fetch_needed(cid, table, part)
        except RemoteIntegrityError as exc:
            log.error("%s", exc.message)
            raise FsError(errno.EIO, exc.message) from None
        except RemoteError as exc:
            if not self._outage:
                log.error("cannot fetch data only the cluster holds (reads of it fail with EIO, "
                          "in-place updates of it stay staged): %s", exc.message)
            self._outage = True
            raise FsError(errno.EIO, exc.message) from None
        if self._outage:
            log.info("%s answers again: data only the cluster holds can be fetched",
                     self.remote.url)
            self._outage = False

    def _fetch_needed(self, cid: bytes, table: RemoteTable, part: int) -> None:
        """Fetch a part a read waits for: here, unless a thread has it in flight already (a
        part the pool has not begun is taken back and fetched here)."""
        key = (cid, part)
        with self._parts_guard:
            running = self._parts.get(key)
            if running is None or running.cancel():
                running = None
                mine: Future[None] = Future()
                mine.set_running_or_notify_cancel()
                self._parts[key] = mine
        if running is not None:
            running.result()  # its error is this read's too
            return
        self._run_part(cid, table, part, mine)

    def _fetch_ahead(self, cid: bytes, table: RemoteTable, first: int, horizon: int) -> None:
        """Queue in the pool the parts from ``first`` that hold remote chunks beginning before
        ``horizon``, unless in flight already."""
        last = bisect.bisect_left(table.chunk_starts, horizon) - 1
        stop = table.chunk_starts[last] // FETCH_PART_BYTES + 1
        with self._parts_guard:
            wanted = [p for p in range(first, stop) if (cid, p) not in self._parts]
        if not wanted:
            return
        with self.store.read() as txn:
            wanted = [p for p in wanted if _remote_chunks(txn, table, p)]
        with self._parts_guard:
            for part in wanted:
                if self._closing:
                    return
                if (cid, part) in self._parts:
                    continue
                queued: Future[None] = Future()
                self._parts[(cid, part)] = queued
                self._pool.submit(self._run_ahead, cid, table, part, queued)

    def _run_ahead(self, cid: bytes, table: RemoteTable, part: int, queued: Future[None]
                   ) -> None:
        if not queued.set_running_or_notify_cancel():
            return  # a read took it over
        try:
            self._run_part(cid, table, part, queued)
        except (HubfsError, FsError) as exc:  # the read that needs it will say so
            log.info("fetch ahead of content %s: %s", cid.hex()[:16], exc)
        except Exception:
            log.exception("fetch ahead of content %s failed", cid.hex()[:16])

    def _run_part(self, cid: bytes, table: RemoteTable, part: int, done: Future[None]) -> None:
        try:
            self._fetch_part(cid, table, part)
        except BaseException as exc:
            done.set_exception(exc)
            raise
        else:
            done.set_result(None)
        finally:
            with self._parts_guard:
                if self._parts.get((cid, part)) is done:
                    del self._parts[(cid, part)]

    def _fetch_part(self, cid: bytes, table: RemoteTable, part: int) -> None:
        """Fetch the remote chunks of one part (one range GET), store them, re-point them."""
        with self.store.read() as txn:
            wanted = _remote_chunks(txn, table, part)
        if not wanted:
            return  # held already (fetched by another content's reader, say)
        start = table.chunk_starts[wanted[0]]
        end = table.chunk_starts[wanted[-1]] + table.chunk_lengths[wanted[-1]]
        self._place(self.remote.fetch_chunks(cid, start, end - start))

    def _place(self, got: FetchedChunks) -> None:
        """Append fetched chunks the index still has as remote to a pack, and re-point them,
        in one transaction."""
        writer = self.store.writer
        assert writer is not None
        with self.store.ingest_gate.shared():
            placed = {}
            with self.store.read() as txn:
                for chunk_id, data in got.chunks():
                    entry = txn.chunk(chunk_id)
                    if entry is not None and entry.location.remote and chunk_id not in placed:
                        placed[chunk_id] = (len(data), data)
            if not placed:
                return
            locations = {chunk_id: writer.append(chunk_id, Codec.RAW, n, data)
                         for chunk_id, (n, data) in placed.items()}
            # No fsync here: the mount's index commits are durable only at its next
            # ``sync_index``, which syncs the packs first (a fetched chunk can be fetched again).
            with self.store.metadata_write() as txn:
                for chunk_id, loc in locations.items():
                    entry = txn.chunk(chunk_id)
                    if entry is not None and entry.location.remote:
                        txn.put_chunk(chunk_id, ChunkEntry(loc, entry.refcount))
        with self._parts_guard:
            self.fetched_bytes += sum(n for n, _ in placed.values())

    def in_remote(self, cid: bytes, ask: bool) -> bool | None:
        """Whether the bucket holds a content and the node may drop its own copy (hubfs.cache):
        not while its upload is queued. Known from the pulls and uploads of this mount, else
        (with ``ask``) from a HEAD, once: contents are immutable and nothing deletes them from
        the bucket. None: not known, not asked. A worker thread; raises ``RemoteError``."""
        if self.queue.is_queued(cid):
            return False
        if cid in self._in_remote:
            return True
        if not ask:
            return None
        if not self.remote.has_content(cid):
            return False
        self._in_remote.add(cid)
        return True

    # ---- reports --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        q = self.queue.status()
        st = self.remote.stats
        return {
            "remote": self.config.remote,
            "node": self.config.node,
            "uploads_queued": q.queued,
            "uploads_sent": q.sent,
            "uploads_failed": q.failed,
            "last_upload": q.last_success,
            "upload_error": q.last_error,
            "last_sync": self.last_sync,
            "sync_error": self.last_error,
            "log_segments_published": self.next_seq - 1,
            "fetched_bytes": self.fetched_bytes,
            "remote_bytes_down": st.bytes_down,
            "remote_bytes_up": st.bytes_up,
            "remote_requests": st.requests,
            **self.cache.status(),
        }


async def _nothing_to_settle() -> None:
    """A node without a mount (tests of the engine) has no commits to wait for."""


def _save_view(txn: Txn, view: View) -> None:
    txn.meta_put(VIEW_META, encode_snapshot(view.snapshot(view.snapshot_gen)))


def _remote_chunks(txn: Txn, table: RemoteTable, part: int) -> list[int]:
    """The chunks of a part (those that begin in its ``FETCH_PART_BYTES`` of the content) the
    index has as remote, by index in the table."""
    lo = bisect.bisect_left(table.chunk_starts, part * FETCH_PART_BYTES)
    hi = bisect.bisect_left(table.chunk_starts, (part + 1) * FETCH_PART_BYTES)
    return [i for i in range(lo, hi)
            if (e := txn.chunk(table.chunk_ids[i])) is not None and e.location.remote]
