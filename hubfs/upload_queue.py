"""The durable upload queue of a cluster node: what must reach the object store, on disk.

Owns the directory of pending jobs and the background thread that drains it. A job is either a
content (by id; its bytes are read from the local store when it is sent) or an immutable object
with its bytes inline (a namespace log segment). Jobs are sent one at a time in the order they
were queued, so a log segment that names a content is published only after that content.

On disk, one file per job, named by its queue sequence number::

    QUEUE/jobs/00000000000000000042   header line (JSON: version, kind, id or key) + payload
    QUEUE/failed/...                  jobs that can never succeed (local damage, a name clash)

A job file is written to a temporary name, fsync'd and renamed, then the directory fsync'd: a
job is either queued whole or not at all. It is deleted (and the directory fsync'd) only after
the object store confirmed the object. A kill -9 at any point leaves the job queued; at restart
it is sent again. An S3 PUT is atomic, so the bucket never holds a torn object; every send asks
first (HEAD) and then writes conditionally (``If-None-Match: *``), so an object that made it
before the kill, or that another node uploaded, is not sent again. One job at a time keeps the
order simple; parallel sends of contents between two log segments are a later optimisation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import RemoteConflictError, RemoteError, RemoteIntegrityError
from .packs import fsync_directory
from .remote import Remote, content_key

log = logging.getLogger(__name__)

QUEUE_VERSION = 1
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
IDLE_WAKE_S = 5.0


@dataclass(frozen=True)
class ContentSource:
    """What the local store hands the queue to upload one content."""

    chunk_lengths: tuple[int, ...]
    chunk_ids: tuple[bytes, ...]
    open: Callable[[], IO[bytes]]


# The local store's answer to "give me this content": None once it no longer holds it.
SourceFn = Callable[[bytes], ContentSource | None]


@dataclass(frozen=True)
class Job:
    seq: int
    kind: str  # "content" or "object"
    key: str  # the key relative to the remote's prefix
    content: bytes | None = None
    payload: bytes | None = None


@dataclass(frozen=True)
class QueueStatus:
    queued: int
    sent: int  # jobs confirmed since the queue was opened
    failed: int  # jobs parked in failed/
    last_success: float | None  # time.time() of the last confirmed job
    last_error: str | None  # the current outage's error, None while the remote answers


class UploadQueue:
    """Jobs on disk plus one drain thread. ``put_*`` may be called from any thread."""

    def __init__(self, path: Path | str, remote: Remote, source: SourceFn) -> None:
        self.path = Path(path)
        self.remote = remote
        self.source = source
        self._jobs_dir = self.path / "jobs"
        self._failed_dir = self.path / "failed"
        for d in (self._jobs_dir, self._failed_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._put_lock = threading.Lock()  # one enqueue at a time: check, write, publish
        self._pending: dict[int, Job] = {}
        self._by_key: dict[str, int] = {}
        self._next_seq = 1
        self._sent = 0
        self._last_success: float | None = None
        self._last_error: str | None = None
        self._kicked = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # told (on the drain thread) of each content the bucket is now known to hold
        self.confirmed: Callable[[bytes], None] = lambda cid: None
        self._load()

    # ---- disk ---------------------------------------------------------------------------------

    def _load(self) -> None:
        for tmp in self._jobs_dir.glob("*.tmp"):
            tmp.unlink()  # never renamed: the job was not queued
        for f in sorted(self._jobs_dir.iterdir()):
            try:
                job = self._read(f)
            except (ValueError, KeyError, OSError) as exc:
                log.warning("upload queue: %s is not a job (%s); moved to %s", f.name, exc,
                            self._failed_dir)
                os.replace(f, self._failed_dir / f.name)
                continue
            self._pending[job.seq] = job
            self._by_key[job.key] = job.seq
        if self._pending:
            self._next_seq = max(self._pending) + 1
        failed = [int(f.name) for f in self._failed_dir.iterdir() if f.name.isdigit()]
        self._next_seq = max([self._next_seq, *(n + 1 for n in failed)])
        if self._pending:
            log.info("upload queue: %d jobs left from an earlier run", len(self._pending))

    @staticmethod
    def _read(f: Path) -> Job:
        raw = f.read_bytes()
        head, sep, payload = raw.partition(b"\n")
        if not sep:
            raise ValueError("no header line")
        meta = json.loads(head)
        if meta["v"] != QUEUE_VERSION:
            raise ValueError(f"version {meta['v']}")
        if meta["kind"] == "content":
            cid = bytes.fromhex(meta["id"])
            return Job(int(f.name), "content", content_key(cid), content=cid)
        if meta["kind"] == "object":
            if len(payload) != meta["size"]:
                raise ValueError("payload cut short")
            return Job(int(f.name), "object", meta["key"], payload=payload)
        raise ValueError(f"kind {meta['kind']!r}")

    def _write(self, seq: int, meta: dict[str, object], payload: bytes) -> None:
        final = self._jobs_dir / f"{seq:020d}"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(meta).encode() + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_directory(self._jobs_dir)

    def _remove(self, job: Job, *, failed: bool = False) -> None:
        f = self._jobs_dir / f"{job.seq:020d}"
        if failed:
            os.replace(f, self._failed_dir / f.name)
        else:
            f.unlink()
        fsync_directory(self._jobs_dir)
        with self._cond:
            del self._pending[job.seq]
            if self._by_key.get(job.key) == job.seq:
                del self._by_key[job.key]
            self._cond.notify_all()

    # ---- queueing -----------------------------------------------------------------------------

    def put_content(self, cid: bytes) -> bool:
        """Queue a content for upload; False if it is queued already. Durable on return."""
        return self._put(content_key(cid), {"kind": "content", "id": cid.hex()}, b"",
                         Job(0, "content", content_key(cid), content=cid))

    def put_object(self, key: str, payload: bytes) -> bool:
        """Queue an immutable object (a log segment); False if this key is queued already
        with these bytes. Durable on return."""
        return self._put(key, {"kind": "object", "key": key, "size": len(payload)}, payload,
                         Job(0, "object", key, payload=payload))

    def _put(self, key: str, meta: dict[str, object], payload: bytes, job: Job) -> bool:
        with self._put_lock:
            with self._cond:
                seq = self._by_key.get(key)
                if seq is not None:
                    if self._pending[seq].payload != job.payload:
                        raise ValueError(f"{key} is queued already with other bytes")
                    return False
                seq = self._next_seq
            self._write(seq, {"v": QUEUE_VERSION, **meta}, payload)
            with self._cond:
                self._next_seq = seq + 1
                self._pending[seq] = Job(seq, job.kind, job.key, job.content, job.payload)
                self._by_key[key] = seq
                self._cond.notify_all()
        return True

    def is_queued(self, cid: bytes) -> bool:
        """Whether a content waits to be sent (its upload is not confirmed)."""
        with self._cond:
            return content_key(cid) in self._by_key

    # ---- draining ---------------------------------------------------------------------------

    def _send(self, job: Job) -> None:
        if job.kind == "object":
            assert job.payload is not None
            self.remote.publish(job.key, job.payload)
            return
        assert job.content is not None
        src = self.source(job.content)
        if src is None:
            log.info("upload queue: content %s is no longer held locally; not uploaded",
                     job.content.hex())
            return
        self.remote.put_content(job.content, src.chunk_lengths, src.chunk_ids, src.open)
        self.confirmed(job.content)  # uploaded now, or found there

    def drain_once(self) -> bool:
        """Send the oldest job. True if the queue made progress (sent or parked a job); a
        remote that does not answer raises ``RemoteUnavailableError``."""
        with self._cond:
            if not self._pending:
                return False
            job = self._pending[min(self._pending)]
        try:
            self._send(job)
        except RemoteIntegrityError as exc:  # the local copy is damaged: retrying cannot help
            log.error("upload queue: %s", exc.message)
            self._remove(job, failed=True)
            return True
        except RemoteConflictError as exc:  # another node's bytes under our key: never ours
            log.error("upload queue: %s; the job is kept in %s", exc.message, self._failed_dir)
            self._remove(job, failed=True)
            return True
        self._remove(job)
        with self._cond:
            self._sent += 1
            self._last_success = time.time()
        return True

    def _run(self) -> None:
        try:
            aborted = self.remote.abort_stale_uploads()
            if aborted:
                log.info("upload queue: aborted %d stale multipart uploads", aborted)
        except RemoteError as exc:
            log.info("upload queue: stale multipart uploads not checked: %s", exc.message)
        backoff = 0.0
        while True:
            with self._cond:
                until = time.monotonic() + backoff
                while not self._stopping and not self._kicked:
                    left = until - time.monotonic()
                    if self._pending and left <= 0:
                        break
                    self._cond.wait(left if left > 0 else IDLE_WAKE_S)
                if self._stopping:
                    return
                self._kicked = False
            try:
                while not self._stopping and self.drain_once():
                    pass
            except RemoteError as exc:
                with self._cond:
                    first = self._last_error is None
                    self._last_error = exc.message
                    backoff = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, backoff * 2))
                    queued = len(self._pending)
                if first:
                    log.warning("upload queue: %s; %d jobs wait and are retried", exc.message,
                                queued)
                continue
            except Exception:
                log.exception("upload queue: the drain thread failed; jobs stay queued")
                backoff = BACKOFF_MAX_S
                continue
            with self._cond:
                if self._last_error is not None:
                    log.info("upload queue: the remote answers again")
                self._last_error = None
            backoff = 0.0

    def start(self) -> None:
        """Start the drain thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hubfs-upload", daemon=True)
            self._thread.start()

    def kick(self) -> None:
        """Try now, whatever the backoff (``hubfs sync``)."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until every job queued so far is sent; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the drain thread; jobs not sent stay on disk for the next run."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def status(self) -> QueueStatus:
        with self._cond:
            return QueueStatus(len(self._pending), self._sent,
                               sum(1 for _ in self._failed_dir.iterdir()), self._last_success,
                               self._last_error)
