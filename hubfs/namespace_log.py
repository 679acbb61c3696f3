"""The cluster namespace: a log of entries every node publishes, and the rules that merge them.

Pure data (no I/O): entries, hybrid logical clocks, the binary format of log segments and
snapshots, and ``View``, the merged state one node holds. ``cluster_sync`` moves segments and
snapshots through the object store; the mount turns local operations into entries and a
``View``'s tree back into its namespace.

Design (issue 11)
-----------------
*Entries.* The namespace is a map from path to the newest ``Entry`` for that path: a file
(mode, owner, mtime, size, content id), a directory, a symlink (target), or a tombstone (a
deletion, keeping the attributes of what it deleted). Every entry carries a hybrid logical
timestamp ``HLC(wall_ms, counter, node)``: wall-clock milliseconds, a counter that orders events
within one millisecond or while the wall clock lags, and the node's name, which breaks ties. A
node's clock ``observe``s every timestamp it merges, so an entry written after seeing another
is newer than it even when the writer's wall clock is behind.

*Merge.* Per path, the entry with the greatest timestamp wins (last writer wins); merging is a
join (commutative, associative, idempotent), so every node that has merged the same entries holds
the same view, whatever the order or repetition. The caches this serves grow by adding
content-named files, so conflicts are rare and confined to small mutable files (``refs/main``).
The tree a node shows is the view's live entries plus, for each live entry, its ancestors as
directories: a directory deleted on one node while another node wrote into it comes back (with
the deleted directory's owner and mode), and a path that is a file on one node and a directory
with live entries below it on another shows as the directory. Renames are a tombstone at the old
path and an entry at the new one; hard links are separate entries; locks (``flock``) stay
node-local. Owners and modes travel with entries, so private trees stay private on every node
as long as the nodes agree on uids (as with NFS).

*Log objects.* A node collects its changes and seals them, every few seconds or at ``hubfs
sync``, into an immutable segment ``PREFIX/log/NODE/SEQ`` (SEQ = 1, 2, 3... zero-padded so keys
sort by number). Segments go through the durable upload queue behind the contents they name, and
are created with ``If-None-Match: *``: an S3 PUT is atomic, so a torn upload is never visible,
and a segment key is written once. Each object carries a BLAKE3 checksum of its body; a reader
checks it and never merges a damaged object. A reader merges each node's segments strictly in
sequence and stops at a gap, recording per node the last sequence it merged (the *frontier*).

*Snapshots.* Any node may compact: it pulls, then writes its whole view with its frontier as
``PREFIX/snap/GEN`` (GEN = the newest existing + 1) with ``If-None-Match: *``; of nodes racing
for one GEN exactly one wins. A snapshot is by construction the join of every segment at or below
its frontier. A node that was offline for days reads the newest snapshot whose frontier is ahead
of its own, then the segments after that frontier. Pruning keeps the newest few snapshots and
deletes segments at or below the oldest kept snapshot's frontier, so a damaged newest snapshot
still has an older one to fall back on. Tombstones are kept in snapshots: an old segment that a
node held in its queue while offline must not bring a deleted path back. (Dropping tombstones
older than a stated horizon is left for later.)
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import blake3
import zstandard

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"HUBFSLOG"
SNAPSHOT_MAGIC = b"HUBFSSNP"
# 0 8s magic | 8 B version | 9 3x | 12 32s BLAKE3 of the body | 44 body: zstd of UTF-8 JSON
OBJECT_HEAD = struct.Struct("<8sB3x32s")
SEQ_DIGITS = 20
MAX_NODE_NAME = 64
NODE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class DamagedObject(ValueError):
    """A log segment or snapshot that does not check out; it is never merged."""


class Kind(str, Enum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    TOMBSTONE = "x"


@dataclass(frozen=True, order=True)
class HLC:
    """A hybrid logical timestamp; ordered by wall time, then counter, then node name."""

    wall_ms: int
    counter: int
    node: str


class HybridClock:
    """A node's source of timestamps: never goes back, and moves past every timestamp it saw."""

    def __init__(self, node: str, wall_ms: Callable[[], int] | None = None) -> None:
        check_node_name(node)
        self.node = node
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = (0, 0)

    def now(self) -> HLC:
        phys = self._wall_ms()
        wall, counter = self._last
        self._last = (phys, 0) if phys > wall else (wall, counter + 1)
        return HLC(*self._last, self.node)

    def observe(self, seen: HLC) -> None:
        phys = self._wall_ms()
        wall, counter = self._last
        top = max(phys, wall, seen.wall_ms)
        if top == wall == seen.wall_ms:
            counter = max(counter, seen.counter) + 1
        elif top == wall:
            counter += 1
        elif top == seen.wall_ms:
            counter = seen.counter + 1
        else:
            counter = 0
        self._last = (top, counter)


def check_node_name(node: str) -> None:
    if not node or len(node) > MAX_NODE_NAME or not set(node) <= NODE_NAME_CHARS:
        raise ValueError(f"node name {node!r}: use 1-{MAX_NODE_NAME} letters, digits, '.', '_' "
                         "or '-'")


def check_path(path: str) -> None:
    """Paths are relative to the mount's root, '/'-separated, without '.', '..' or ''."""
    parts = path.split("/")
    if not path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path!r} is not a normalised relative path")


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


@dataclass(frozen=True)
class Entry:
    """The newest state of one path as one node wrote it."""

    path: str
    kind: Kind
    hlc: HLC
    mode: int = 0o644  # permission bits only (07777)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    content: bytes | None = None  # FILE: its content id
    target: str | None = None  # SYMLINK: its target

    def __post_init__(self) -> None:
        check_path(self.path)
        if (self.kind is Kind.FILE) != (self.content is not None):
            raise ValueError(f"{self.path}: a file entry, and only one, names a content")
        if (self.kind is Kind.SYMLINK) != (self.target is not None):
            raise ValueError(f"{self.path}: a symlink entry, and only one, has a target")

    def tombstone(self, hlc: HLC) -> Entry:
        """The deletion of this entry: it keeps the owner and mode of what it deleted."""
        return Entry(self.path, Kind.TOMBSTONE, hlc, self.mode, self.uid, self.gid,
                     self.mtime_ns)

    def order_key(self) -> tuple[HLC, tuple[object, ...]]:
        # Equal timestamps come only from a misbehaving node; the rest of the row still
        # decides, so that every node picks the same winner.
        return self.hlc, _row(self)[1:]

    @property
    def live(self) -> bool:
        return self.kind is not Kind.TOMBSTONE


def _row(e: Entry) -> tuple[object, ...]:
    extra = e.content.hex() if e.content is not None else e.target
    return (e.path, e.kind.value, e.hlc.wall_ms, e.hlc.counter, e.hlc.node, e.mode, e.uid,
            e.gid, e.mtime_ns, e.size, extra)


def _entry(row: list[Any]) -> Entry:
    path, kind, wall, counter, node, mode, uid, gid, mtime, size, extra = row
    k = Kind(kind)
    return Entry(str(path), k, HLC(int(wall), int(counter), str(node)), int(mode), int(uid),
                 int(gid), int(mtime), int(size),
                 bytes.fromhex(str(extra)) if k is Kind.FILE else None,
                 str(extra) if k is Kind.SYMLINK else None)


@dataclass(frozen=True)
class Segment:
    """One immutable log object: entries a node sealed together, in the order written."""

    node: str
    seq: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Snapshot:
    """A compacted view: every entry merged from the segments at or below ``frontier``."""

    gen: int
    frontier: dict[str, int]
    entries: tuple[Entry, ...]


def _pack(magic: bytes, doc: dict[str, object]) -> bytes:
    body = zstandard.ZstdCompressor(level=3).compress(
        json.dumps(doc, separators=(",", ":")).encode())
    return OBJECT_HEAD.pack(magic, FORMAT_VERSION, blake3.blake3(body).digest()) + body


def _unpack(magic: bytes, data: bytes, what: str) -> dict[str, Any]:
    if len(data) < OBJECT_HEAD.size:
        raise DamagedObject(f"{what}: cut short ({len(data)} bytes)")
    got_magic, version, digest = OBJECT_HEAD.unpack_from(data)
    body = data[OBJECT_HEAD.size:]
    if got_magic != magic:
        raise DamagedObject(f"{what}: not a {magic.decode()} object")
    if version != FORMAT_VERSION:
        raise DamagedObject(f"{what}: format version {version}; this hubfs reads "
                            f"{FORMAT_VERSION}: upgrade hubfs on this node")
    if blake3.blake3(body).digest() != digest:
        raise DamagedObject(f"{what}: checksum mismatch")
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(body))
    except (zstandard.ZstdError, ValueError) as exc:
        raise DamagedObject(f"{what}: {exc}") from None
    if not isinstance(doc, dict):
        raise DamagedObject(f"{what}: not an object")
    return doc


def encode_segment(seg: Segment) -> bytes:
    return _pack(SEGMENT_MAGIC, {"node": seg.node, "seq": seg.seq,
                                 "entries": [_row(e) for e in seg.entries]})


def decode_segment(data: bytes, what: str = "segment") -> Segment:
    doc = _unpack(SEGMENT_MAGIC, data, what)
    try:
        return Segment(str(doc["node"]), int(doc["seq"]),
                       tuple(_entry(r) for r in doc["entries"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedObject(f"{what}: {exc}") from None


def encode_snapshot(snap: Snapshot) -> bytes:
    return _pack(SNAPSHOT_MAGIC, {"gen": snap.gen, "frontier": snap.frontier,
                                  "entries": [_row(e) for e in snap.entries]})


def decode_snapshot(data: bytes, what: str = "snapshot") -> Snapshot:
    doc = _unpack(SNAPSHOT_MAGIC, data, what)
    try:
        frontier = {str(k): int(v) for k, v in doc["frontier"].items()}
        return Snapshot(int(doc["gen"]), frontier, tuple(_entry(r) for r in doc["entries"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedObject(f"{what}: {exc}") from None


def _dir_mode(mode: int) -> int:
    """A directory brought back for a live entry below it: search where it could be read."""
    return (mode | (mode & 0o444) >> 2) & 0o7777


@dataclass
class View:
    """What one node has merged: the newest entry per path and, per node, the last segment."""

    entries: dict[str, Entry] = field(default_factory=dict)
    frontier: dict[str, int] = field(default_factory=dict)
    snapshot_gen: int = 0  # the newest snapshot this view has looked at

    def merge(self, entry: Entry) -> bool:
        """Last writer wins; True if the entry changed the view."""
        old = self.entries.get(entry.path)
        if old is not None and old.order_key() >= entry.order_key():
            return False
        self.entries[entry.path] = entry
        return True

    def merge_all(self, entries: Iterable[Entry]) -> list[Entry]:
        """Merge entries; those that changed the view, for the mount to apply."""
        return [e for e in entries if self.merge(e)]

    def apply_segment(self, seg: Segment) -> list[Entry]:
        """Merge a node's next segment. Segments apply in sequence: an old one is a no-op,
        one past a gap raises ``ValueError``."""
        have = self.frontier.get(seg.node, 0)
        if seg.seq <= have:
            return []
        if seg.seq != have + 1:
            raise ValueError(f"segment {seg.node}/{seg.seq} after {have}: a gap")
        changed = self.merge_all(seg.entries)
        self.frontier[seg.node] = seg.seq
        return changed

    def covers(self, frontier: dict[str, int]) -> bool:
        return all(self.frontier.get(n, 0) >= s for n, s in frontier.items())

    def apply_snapshot(self, snap: Snapshot) -> list[Entry]:
        changed = self.merge_all(snap.entries)
        for node, seq in snap.frontier.items():
            self.frontier[node] = max(seq, self.frontier.get(node, 0))
        self.snapshot_gen = max(self.snapshot_gen, snap.gen)
        return changed

    def snapshot(self, gen: int) -> Snapshot:
        return Snapshot(gen, dict(self.frontier),
                        tuple(self.entries[p] for p in sorted(self.entries)))

    def max_hlc(self) -> HLC | None:
        return max((e.hlc for e in self.entries.values()), default=None)

    def tree(self) -> dict[str, Entry]:
        """The namespace to show: live entries, and their ancestors as directories."""
        out = {p: e for p, e in self.entries.items() if e.live}
        for path in sorted(out):  # sorted: the same implied attributes on every node
            child = out[path]
            parent = parent_of(path)
            while parent and (out.get(parent) is None or out[parent].kind is not Kind.DIR):
                old = self.entries.get(parent)
                base = old if old is not None else child
                out[parent] = Entry(parent, Kind.DIR, base.hlc, _dir_mode(base.mode), base.uid,
                                    base.gid, base.mtime_ns)
                parent = parent_of(parent)
        return dict(sorted(out.items()))


@dataclass
class Outbox:
    """A node's changes not yet sealed into a segment: the newest entry per path, since only
    that one can win anywhere. (Persisting it across a crash is the mount's index's job.)"""

    node: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        if entry.hlc.node != self.node:
            raise ValueError(f"{entry.path}: entry of node {entry.hlc.node} in {self.node}'s log")
        old = self.entries.get(entry.path)
        if old is None or old.order_key() < entry.order_key():
            self.entries[entry.path] = entry

    def seal(self, seq: int) -> Segment | None:
        if not self.entries:
            return None
        seg = Segment(self.node, seq, tuple(sorted(self.entries.values(),
                                                   key=lambda e: e.order_key())))
        self.entries = {}
        return seg


def rename_entries(view_tree: dict[str, Entry], old: str, new: str,
                   clock: HybridClock) -> list[Entry]:
    """The entries of a rename: the moved path and everything below it, a tombstone at each
    old path and a copy at each new one."""
    moved = [e for p, e in view_tree.items() if p == old or p.startswith(old + "/")]
    out: list[Entry] = []
    for e in sorted(moved, key=lambda e: e.path):
        out.append(e.tombstone(clock.now()))
        out.append(replace(e, path=new + e.path[len(old):], hlc=clock.now()))
    return out
