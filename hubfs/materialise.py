"""Objects made on demand for contents stored as chunk references, within a byte budget.

Why: a file that shares most of its chunks with other contents (``pytorch_model.bin`` beside
``model.safetensors`` with the same tensors, a fine-tune with two tensors changed) is stored as
references to their chunks, which costs only its new bytes on disk, but then no single file
holds its bytes and the kernel cannot serve it (FUSE passthrough needs one backing file). When
such a content of at least ``OBJECT_MIN_BYTES`` is opened for reading, it is copied once into
an object of its own (its chunks stay where they are), and from then on the kernel serves it.
These copies are a cache: they stay within ``budget_bytes`` (``hubfs mount
--materialise-budget-gib``), the least recently opened go first, and ``hubfs stats`` shows them.

State: the index's ``materialised`` database lists them (object id -> content id, size), with
the content -> object mapping of any object; this class, on the mount's trio thread, keeps their
last opens in memory (after a restart, all count as opened at start). The copy runs in a worker
thread; the index change and eviction run on the trio thread. An evicted object's file is
unlinked after the index no longer names it; opens it serves go on (the kernel holds it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .objects import OBJECT_MIN_BYTES
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 8 << 30


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
        self._making: dict[bytes, trio.Event] = {}
        with store.read() as txn:
            for object_id, _cid, size in txn.materialised():
                self._copies[object_id] = _Copy(size, time.monotonic())

    @property
    def used_bytes(self) -> int:
        return sum(copy.size for copy in self._copies.values())

    def dropped(self, object_id: int) -> None:
        """A copy the index no longer names (a cluster node's cache evicted its content)."""
        self._copies.pop(object_id, None)

    def opened(self, object_id: int) -> None:
        copy = self._copies.get(object_id)
        if copy is not None:
            copy.last_open = time.monotonic()

    async def object_for(self, content_id: bytes, size: int, in_use: Callable[[int], bool]
                         ) -> int | None:
        """An object of ``content_id`` made now if the budget allows (None if not): evicts
        the least recently opened copies ``in_use`` does not name."""
        if self.store.objects is None or size < OBJECT_MIN_BYTES or size > self.budget_bytes:
            return None
        if not self.store.held_locally(content_id):
            return None  # a cluster node's remote content: its reads fetch only what they read
        making = self._making.get(content_id)
        if making is not None:  # another open is copying it: share the result
            await making.wait()
            return self.store.object_of(content_id)
        if not await self._make_room(size, in_use):
            return None
        done = self._making[content_id] = trio.Event()
        try:
            object_id = self.store.objects.new_id()
            copy = await self._thread(self._copy, content_id)
            # gc deletes object files the index does not map, chosen while it holds the
            # ingest gate alone: the copy becomes an object and is mapped while holding it
            gate = self.store.ingest_gate
            if not gate.enter_shared(wait=False):
                await self._thread(gate.enter_shared)
            try:
                if self.store.object_of(content_id) is not None:  # committed meanwhile
                    copy.unlink()
                    return self.store.object_of(content_id)
                with self.store.metadata_write() as txn:
                    # its name is made durable before the index is (Store.sync_index)
                    self.store.objects.adopt(copy, object_id)
                    txn.put_object(content_id, object_id)
                    txn.put_materialised(object_id, content_id, size)
            finally:
                gate.exit_shared()
            self._copies[object_id] = _Copy(size, time.monotonic())
            log.info("made an object of %d bytes for content %s (materialised: %d of %d "
                     "bytes)", size, content_id.hex()[:16], self.used_bytes, self.budget_bytes)
            return object_id
        finally:
            del self._making[content_id]
            done.set()

    def _copy(self, content_id: bytes) -> Path:
        assert self.store.objects is not None
        copy, fd = self.store.objects.new_copy()
        try:
            for piece in self.store.reader.pieces(content_id):  # checked as it is read
                os.write(fd, piece)
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
