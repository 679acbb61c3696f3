"""Moving the namespace log through the object store: join, publish, pull, compact, prune.

The rules and formats are ``namespace_log``'s; this module only knows where they live in the
bucket (``cluster.json``, ``log/NODE/SEQ``, ``snap/GEN``) and in which order to read them. A
damaged object is never merged: a reader stops at it (a segment) or falls back to an older one
(a snapshot).

Wiring into the mount (for the session that does it)
----------------------------------------------------
- ``hubfs init STORE --remote URL``: ``join_cluster`` with the store's chunking parameters
  (content ids depend on them, so every node must share them), and a node name (default: the
  host name; unique per node, or ``publish`` reports a clash). Store both in the store's meta.
- New content (at ingest commit): ``UploadQueue.put_content(cid)``; its ``source`` reads the
  content's chunk table and bytes from the local store. Never evict a content whose job is
  still queued.
- Namespace changes become ``Entry``s (``HybridClock.now()``) in an ``Outbox`` kept in the
  index in the same transaction as the change. Every ``SYNC_INTERVAL_S`` and at ``hubfs
  sync``: seal the outbox at the next sequence number, ``UploadQueue.put_object`` the
  segment, then commit "outbox empty, next seq + 1". Encoding is deterministic, so a crash
  between the two re-seals the same bytes under the same key, which the queue takes as queued.
- Pull on the same interval: ``ClusterLog.pull(view)``; apply ``report.changed`` to the local
  namespace. A file whose content the node lacks gets an inode with size and content id and no
  local bytes; reads fetch ``Remote.read_content`` ranges (off the trio thread), keep the
  verified chunks in the local store, and map ``RemoteUnavailableError`` to EIO with its one
  line logged. Persist the view's frontier and snapshot generation with the namespace.
- Compact when segments since the newest snapshot exceed ``COMPACT_AFTER_SEGMENTS``, then prune.
- ``hubfs status``/``stats``: ``UploadQueue.status()``, ``ClusterLog.last_pull``,
  ``Remote.stats``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from .errors import HubfsError
from .namespace_log import (
    SEQ_DIGITS,
    DamagedObject,
    Entry,
    HybridClock,
    Segment,
    View,
    check_node_name,
    decode_segment,
    decode_snapshot,
    encode_segment,
    encode_snapshot,
)
from .remote import Remote

log = logging.getLogger(__name__)

KEEP_SNAPSHOTS = 3
SYNC_INTERVAL_S = 5.0  # the issue promises propagation within 10 s: push, then pull
COMPACT_AFTER_SEGMENTS = 256
CLUSTER_KEY = "cluster.json"
CLUSTER_FORMAT = 1


def join_cluster(remote: Remote, settings: dict[str, Any]) -> None:
    """Record the cluster's settings in the bucket if this is its first node, else check that
    this node's settings are the same (content ids depend on the chunking parameters)."""
    doc = {"format": CLUSTER_FORMAT, **settings}
    data = json.dumps(doc, sort_keys=True).encode()
    if remote.put_if_absent(CLUSTER_KEY, data):
        log.info("%s: a new cluster store", remote.url)
        return
    raw = remote.get(CLUSTER_KEY)
    try:
        theirs = json.loads(raw or b"")
    except ValueError:
        theirs = None
    if not isinstance(theirs, dict):
        raise HubfsError(f"{remote.url}/{CLUSTER_KEY} is damaged: restore it from another "
                         "node's settings, or use a new prefix", 3)
    if theirs.get("format") != CLUSTER_FORMAT:
        raise HubfsError(f"{remote.url} holds a cluster store of format {theirs.get('format')}; "
                         f"this hubfs writes format {CLUSTER_FORMAT}: upgrade hubfs", 2)
    for key in sorted(set(doc) | set(theirs)):
        if doc.get(key) != theirs.get(key):
            raise HubfsError(f"{remote.url} was created with {key}={theirs.get(key)!r}, this "
                             f"store has {key}={doc.get(key)!r}: initialise this node's store "
                             "with the cluster's settings", 2)


def segment_key(node: str, seq: int) -> str:
    return f"log/{node}/{seq:0{SEQ_DIGITS}d}"


def snapshot_key(gen: int) -> str:
    return f"snap/{gen:0{SEQ_DIGITS}d}"


def _number(key: str) -> int | None:
    tail = key.rpartition("/")[2]
    return int(tail) if tail.isdigit() and len(tail) == SEQ_DIGITS else None


@dataclass(frozen=True)
class PullReport:
    changed: tuple[Entry, ...]  # entries that changed the view, for the mount to apply
    segments: int
    snapshot: int | None  # the generation applied, if one was
    stalled: tuple[str, ...]  # nodes whose next segment is missing or damaged


class ClusterLog:
    """One node's side of the namespace log."""

    def __init__(self, remote: Remote, node: str, clock: HybridClock | None = None) -> None:
        check_node_name(node)
        self.remote = remote
        self.node = node
        self.clock = clock or HybridClock(node)
        self.last_pull: float | None = None
        self._damaged: set[str] = set()  # keys reported damaged (see ``_report_damaged``)

    def _report_damaged(self, key: str, exc: DamagedObject, then: str) -> None:
        """One WARNING per damaged object: every pull meets it again until it is put right,
        and a mount pulls every few seconds."""
        if key in self._damaged:
            log.debug("%s; %s", exc, then)
            return
        self._damaged.add(key)
        log.warning("%s; %s", exc, then)

    # ---- writing ------------------------------------------------------------------------------

    def next_seq(self) -> int:
        """The sequence number after this node's newest published segment (a fresh node, or
        one that lost its local state, starts from the bucket). Pruning deletes a node's old
        segments, all of them if it has been quiet since: the newest snapshot's frontier
        counts too, else the node would publish below every reader's frontier for it."""
        last = 0
        for obj in self.remote.list_objects(f"log/{self.node}/"):
            n = _number(obj.key)
            if n is not None:
                last = max(last, n)
        covered = View()
        self._load_snapshot(covered, self._snapshot_gens())
        return max(last, covered.frontier.get(self.node, 0)) + 1

    def segment_object(self, seg: Segment) -> tuple[str, bytes]:
        """The key and bytes of a sealed segment, for the upload queue."""
        if seg.node != self.node:
            raise ValueError(f"segment of {seg.node} published as {self.node}")
        return segment_key(seg.node, seg.seq), encode_segment(seg)

    def publish(self, seg: Segment) -> bool:
        """Publish a segment now (the mount goes through the upload queue instead)."""
        key, data = self.segment_object(seg)
        return self.remote.publish(key, data)

    # ---- reading ------------------------------------------------------------------------------

    def _snapshot_gens(self) -> list[int]:
        gens = [_number(o.key) for o in self.remote.list_objects("snap/")]
        return sorted(g for g in gens if g is not None)

    def _load_snapshot(self, view: View, gens: list[int]) -> tuple[list[Entry], int | None]:
        """Apply the newest readable snapshot that is ahead of the view, if any."""
        for gen in reversed(gens):
            if gen <= view.snapshot_gen:
                break
            data = self.remote.get(snapshot_key(gen))
            if data is None:
                continue  # pruned since the listing
            try:
                snap = decode_snapshot(data, f"{self.remote.url}/{snapshot_key(gen)}")
            except DamagedObject as exc:
                self._report_damaged(snapshot_key(gen), exc, "trying an older snapshot")
                continue
            self._damaged.discard(snapshot_key(gen))
            if view.covers(snap.frontier):
                view.snapshot_gen = max(view.snapshot_gen, gen)
                return [], None
            return view.apply_snapshot(snap), gen
        return [], None

    def pull(self, view: View) -> PullReport:
        """Bring the view up to date: the newest useful snapshot, then every node's segments
        after its frontier, in sequence."""
        changed, gen = self._load_snapshot(view, self._snapshot_gens())
        if gen is not None:
            log.info("%s: snapshot %d applied (%d paths changed)", self.remote.url, gen,
                     len(changed))
        segments = 0
        stalled = []
        for node in sorted(self.remote.list_dirs("log/")):
            try:
                check_node_name(node)
            except ValueError:
                continue
            start = segment_key(node, view.frontier.get(node, 0))
            for obj in self.remote.list_objects(f"log/{node}/", start_after=start):
                seq = _number(obj.key)
                if seq is None:
                    continue
                if seq != view.frontier.get(node, 0) + 1:
                    log.info("%s: %s's segment %d is missing; waiting for it", self.remote.url,
                             node, view.frontier.get(node, 0) + 1)
                    stalled.append(node)
                    break
                data = self.remote.get(obj.key)
                try:
                    if data is None:
                        raise DamagedObject(f"{self.remote.url}/{obj.key}: vanished")
                    seg = decode_segment(data, f"{self.remote.url}/{obj.key}")
                    if (seg.node, seg.seq) != (node, seq):
                        raise DamagedObject(f"{self.remote.url}/{obj.key}: holds segment "
                                            f"{seg.node}/{seg.seq}")
                except DamagedObject as exc:
                    self._report_damaged(obj.key, exc,
                                         f"{node}'s later segments wait until it is readable")
                    stalled.append(node)
                    break
                self._damaged.discard(obj.key)
                changed += view.apply_segment(seg)
                segments += 1
        top = view.max_hlc()
        if top is not None:
            self.clock.observe(top)
        self.last_pull = time.time()
        return PullReport(tuple(changed), segments, gen, tuple(stalled))

    # ---- compaction ---------------------------------------------------------------------------

    def compact(self, view: View) -> int | None:
        """Pull, then publish the view as the next snapshot (``publish_snapshot``)."""
        self.pull(view)
        return self.publish_snapshot(view)

    def publish_snapshot(self, view: View) -> int | None:
        """Publish a view just pulled as the next snapshot: its generation, or None when
        another node published that generation first (its snapshot serves as well). The view
        must hold nothing beyond its frontier (a node's own entries from segments it has not
        published yet): a snapshot is the join of the segments its frontier covers."""
        gens = self._snapshot_gens()
        gen = (gens[-1] if gens else 0) + 1
        if not self.remote.put_if_absent(snapshot_key(gen), encode_snapshot(view.snapshot(gen))):
            return None
        view.snapshot_gen = gen
        log.info("%s: snapshot %d published (%d entries)", self.remote.url, gen,
                 len(view.entries))
        return gen

    def prune(self, keep: int = KEEP_SNAPSHOTS) -> int:
        """Delete all but the newest ``keep`` snapshots, and the segments at or below the
        oldest kept snapshot's frontier. The number of objects deleted."""
        gens = self._snapshot_gens()
        if len(gens) < keep:
            return 0
        kept = gens[-keep:]
        data = self.remote.get(snapshot_key(kept[0]))
        if data is None:
            return 0
        try:
            oldest = decode_snapshot(data, f"{self.remote.url}/{snapshot_key(kept[0])}")
        except DamagedObject as exc:
            self._report_damaged(snapshot_key(kept[0]), exc, "nothing pruned")
            return 0
        deleted = 0
        for gen in gens[:-keep]:
            self.remote.delete(snapshot_key(gen))
            deleted += 1
        for node, upto in oldest.frontier.items():
            for obj in self.remote.list_objects(f"log/{node}/"):
                seq = _number(obj.key)
                if seq is None or seq > upto:
                    break
                self.remote.delete(obj.key)
                deleted += 1
        return deleted
