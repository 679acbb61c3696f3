"""Objects made on demand for contents stored as chunk references, within a byte budget.

Why: a file that shares most of its chunks with other contents (``pytorch_model.bin`` beside
``model.safetensors`` with the same tensors, a fine-tune with two tensors changed) is stored as
references to their chunks, which costs only its new bytes on disk, but then no single file
holds its bytes and the kernel cannot serve it (FUSE passthrough needs one backing file). When
such a content of at least ``OBJECT_MIN_BYTES`` is opened for reading a second time, it is
copied once into an object of its own (its chunks stay where they are), and from then on the
kernel serves its opens. These copies are a cache: they stay within ``budget_bytes`` (``hubfs
mount --materialise-budget-gib``), the least recently opened go first, and ``hubfs stats``
shows them.

When: the copy runs in the background, started by the second read-only open of the same
content (a content id never changes, so "the same" means unchanged), while the daemon serves
that open. A content opened once (a file a program keeps rewriting and reading back, as
fsstress or a sqlite cache does) is never copied, and no open waits for a copy: when copies
ran in the open itself, each read-only open of such a file copied and fsync'd all of it first
(fsstress ran 140x native with them, 32x without). Copies run one at a time.

State: the index's ``materialised`` database lists them (object id -> content id, size), with
the content -> object mapping of any object; this class, on the mount's trio thread, keeps their
last opens in memory (after a restart, all count as opened at start) and the contents opened
once. The copy runs in a worker thread; the index change and eviction run on the trio thread. An
evicted object's file is unlinked after the index no longer names it; opens it serves go on
(the kernel holds it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .errors import HubfsError
from .objects import OBJECT_MIN_BYTES
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 8 << 30
# Contents opened once without an object, remembered until their second open (least recent out).
OPENED_ONCE_REMEMBERED = 4096


class CopyStopped(Exception):
    """The mount is shutting down: a copy under way is dropped (it is only a cache)."""


@dataclass
class _Copy:
    size: int
    last_open: float  # monotonic time


class Materialiser:
    def __init__(self, store: Store, budget_bytes: int,
                 run_in_thread: Callable[..., Awaitable[Any]]) -> None:
        self.store = store
        self.budget_bytes = budget_bytes
        self._thread = run_in_thread
        self._copies: dict[int, _Copy] = {}  # by object id
        self._opened_once: OrderedDict[bytes, None] = OrderedDict()
        self._making: set[bytes] = set()
        self._one_at_a_time = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._stopping = threading.Event()  # read by the copying worker thread
        with store.read() as txn:
            for object_id, _cid, size in txn.materialised():
                self._copies[object_id] = _Copy(size, time.monotonic())

    @property
    def used_bytes(self) -> int:
        return sum(copy.size for copy in self._copies.values())

    @property
    def copying(self) -> int:
        """Copies started or waiting to start."""
        return len(self._making)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Make copies in the background while open; at exit, drop the one under way."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                self._stopping.set()
                nursery.cancel_scope.cancel()

    def dropped(self, object_id: int) -> None:
        """A copy the index no longer names (a cluster node's cache evicted its content)."""
        self._copies.pop(object_id, None)

    def opened(self, object_id: int) -> None:
        copy = self._copies.get(object_id)
        if copy is not None:
            copy.last_open = time.monotonic()

    def opened_without_object(self, content_id: bytes, size: int,
                              in_use: Callable[[int], bool]) -> None:
        """A read-only open the daemon serves because ``content_id`` has no object: at the
        content's second such open, start copying it into one (evicting the least recently
        opened copies ``in_use`` does not name, if the budget needs room)."""
        if (self.store.objects is None or size < OBJECT_MIN_BYTES or size > self.budget_bytes
                or content_id in self._making or self._nursery is None):
            return
        if not self.store.held_locally(content_id):
            return  # a cluster node's remote content: its reads fetch only what they read
        if self._opened_once.pop(content_id, False) is False:
            self._opened_once[content_id] = None
            while len(self._opened_once) > OPENED_ONCE_REMEMBERED:
                self._opened_once.popitem(last=False)
            return
        self._making.add(content_id)
        self._nursery.start_soon(self._make, content_id, size, in_use)

    async def _make(self, content_id: bytes, size: int, in_use: Callable[[int], bool]
                    ) -> None:
        try:
            async with self._one_at_a_time:
                if self.store.object_of(content_id) is None:
                    await self._make_object(content_id, size, in_use)
        except CopyStopped:
            pass
        except (HubfsError, OSError) as exc:  # a cache: the daemon goes on serving its reads
            with self.store.read() as txn:
                if txn.content(content_id) is None:
                    return  # rewritten or removed while it was copied: nothing to serve
            log.error("could not copy content %s into an object (%s): the daemon goes on "
                      "serving its reads; free disk space, or run `hubfs verify STORE` if the "
                      "store is damaged", content_id.hex()[:16], exc)
        finally:
            self._making.discard(content_id)

    async def _make_object(self, content_id: bytes, size: int,
                           in_use: Callable[[int], bool]) -> None:
        assert self.store.objects is not None
        if not await self._make_room(size, in_use):
            return
        object_id = self.store.objects.new_id()
        copy = await self._thread(self._copy, content_id)
        # gc deletes object files the index does not map, chosen while it holds the
        # ingest gate alone: the copy becomes an object and is mapped while holding it
        gate = self.store.ingest_gate
        if not gate.enter_shared(wait=False):
            await self._thread(gate.enter_shared)
        try:
            with self.store.metadata_write() as txn:
                if txn.object_of(content_id) is not None or txn.content(content_id) is None:
                    copy.unlink()  # committed as an object meanwhile, or no longer stored
                    return
                # its name is made durable before the index is (Store.sync_index)
                self.store.objects.adopt(copy, object_id)
                txn.put_object(content_id, object_id)
                txn.put_materialised(object_id, content_id, size)
        finally:
            gate.exit_shared()
        self._copies[object_id] = _Copy(size, time.monotonic())
        log.info("made an object of %d bytes for content %s (materialised: %d of %d bytes)",
                 size, content_id.hex()[:16], self.used_bytes, self.budget_bytes)

    def _copy(self, content_id: bytes) -> Path:
        assert self.store.objects is not None
        copy, fd = self.store.objects.new_copy()
        try:
            offset = 0
            for piece in self.store.reader.pieces(content_id):  # checked as it is read
                if self._stopping.is_set():
                    raise CopyStopped
                if piece != bytes(len(piece)):  # holes stay holes: a sparse file's copy
                    os.pwrite(fd, piece, offset)  # costs its data, not its size
                offset += len(piece)
            os.ftruncate(fd, offset)
            os.fsync(fd)
        except BaseException:
            copy.unlink()
            raise
        finally:
            os.close(fd)
        return copy

    async def _make_room(self, size: int, in_use: Callable[[int], bool]) -> bool:
        evict = []
        used = self.used_bytes
        for object_id in sorted(self._copies, key=lambda o: self._copies[o].last_open):
            if used + size <= self.budget_bytes:
                break
            if not in_use(object_id):
                evict.append(object_id)
                used -= self._copies[object_id].size
        if used + size > self.budget_bytes:
            return False
        if evict:
            with self.store.metadata_write() as txn:
                for object_id, content_id, _size in list(txn.materialised()):
                    if object_id in evict:
                        if txn.object_of(content_id) == object_id:
                            txn.delete_object(content_id)
                        txn.delete_materialised(object_id)
            for object_id in evict:
                del self._copies[object_id]
            await self._thread(self._remove, evict)
        return True

    def _remove(self, object_ids: list[int]) -> None:
        """Unlink evicted objects once the index that no longer names them is durable."""
        self.store.sync_index()
        for object_id in object_ids:
            self.store.packs.path(object_id).unlink(missing_ok=True)
            log.info("dropped materialised object %08x (least recently opened)", object_id)
