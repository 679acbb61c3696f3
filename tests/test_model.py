"""The mounted filesystem's model in-process, no mount: interleavings forced step by step.

A ``Pause`` holds one worker step (a commit's or a front ingest's chunking) until the test lets
it go, so each test runs other requests exactly while that step is under way, then checks what
every request saw, and ends with ``verify`` (the ``store`` fixture). Nothing is mocked: the
store, its packs and index are real; the pause only waits.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from hubfs.compression import Codec
from hubfs.index import ROOT_INO, ChunkEntry
from hubfs.packs import PackFiles, PackWriter, remote_location
from hubfs.staging import INGEST_STEP_BYTES, Snapshot
from hubfs.store import Store
from hubfs.vfs import FileSystem
from tests.engine_helpers import text_bytes

MIB = 1024 * 1024
STEP = 1 * MIB


class Pause:
    """Holds calls of a worker-thread function until ``go`` (a pause point, not a mock)."""

    def __init__(self, obj: Any, name: str, calls: int = 1) -> None:
        """``reached`` once ``calls`` calls are held."""
        self.reached = threading.Event()
        self.released = threading.Event()
        original = getattr(obj, name)
        held = [0]
        lock = threading.Lock()

        def paused(*args: Any, **kwargs: Any) -> Any:
            with lock:
                held[0] += 1
                if held[0] >= calls:
                    self.reached.set()
            assert self.released.wait(30), "the test never let the paused step go"
            return original(*args, **kwargs)

        setattr(obj, name, paused)
        self._undo = lambda: setattr(obj, name, original)

    async def wait_reached(self) -> None:
        assert await trio.to_thread.run_sync(self.reached.wait, 30), "step never reached"

    def go(self) -> None:
        self._undo()
        self.released.set()


def run(store: Store, scenario: Callable[[FileSystem], Awaitable[None]],
        step: int = INGEST_STEP_BYTES) -> None:
    async def main() -> None:
        fs = FileSystem(store, ingest_step_bytes=step)
        async with fs.running():
            await scenario(fs)
            await fs.writeback.settle()
        assert fs.writeback.counts()["staged_files"] == 0, "something stayed unstored"

    trio.run(main)


async def write_file(fs: FileSystem, name: bytes, data: bytes, piece: int = 128 * 1024,
                     close: bool = True) -> tuple[int, int]:
    reply, attrs = await fs.create(ROOT_INO, name, 0o644, 0, 0)
    fh = reply.fh
    for offset in range(0, len(data), piece):
        await fs.write(fh, offset, data[offset : offset + piece])
    if close:
        await fs.release(fh)
    return fh, attrs.ino


async def read_all(fs: FileSystem, name: bytes) -> bytes:
    attrs = await fs.lookup(ROOT_INO, name, 0)
    fh = (await fs.open(attrs.ino, os.O_RDONLY)).fh
    try:
        data = await fs.read(fh, 0, attrs.size + 1)
        assert len(data) == attrs.size, f"read {len(data)} bytes of {attrs.size}"
        return data
    finally:
        await fs.release(fh)


async def committing(fs: FileSystem, name: bytes, data: bytes) -> tuple[Pause, int]:
    """Write and close a file, and hold its commit in the worker: (the pause, the inode)."""
    pause = Pause(fs.writeback.ingestor, "prepare_stream")
    _, ino = await write_file(fs, name, data)
    await pause.wait_reached()
    return pause, ino


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_reader_right_after_close_and_rename_sees_every_byte(store: Store) -> None:
    """The bug a download hit: close, rename, open, read while the commit switches over."""
    data = payload(3 * MIB)

    async def scenario(fs: FileSystem) -> None:
        pause = Pause(fs.writeback.ingestor, "prepare_stream")
        await write_file(fs, b"model.incomplete", data)
        await pause.wait_reached()  # the commit is chunking in its worker
        await fs.rename(ROOT_INO, b"model.incomplete", ROOT_INO, b"model", 0)
        assert (await fs.lookup(ROOT_INO, b"model", 0)).size == len(data)
        assert await read_all(fs, b"model") == data  # served from staging
        attrs = await fs.lookup(ROOT_INO, b"model", 0)
        fh = (await fs.open(attrs.ino, os.O_RDONLY)).fh  # open before the switch, read after
        pause.go()
        await fs.writeback.settle()
        assert fs.writeback.staged(attrs.ino) is None
        assert (await fs.attributes(attrs.ino)).size == len(data)
        assert await fs.read(fh, 0, len(data)) == data  # served from the stored content
        await fs.release(fh)
        assert await read_all(fs, b"model") == data

    run(store, scenario)


def test_overwrite_while_a_new_file_is_hashed_stores_no_wrong_chunk(store: Store) -> None:
    """A new file is hashed first and its missing chunks are read again to be stored: bytes
    overwritten in between must not be stored under the ids of the bytes hashed before (the
    store's ``verify`` after the test would find such a record)."""
    first = text_bytes(3 * MIB, 3)  # compressible: it goes to packs, not to an object
    second = text_bytes(3 * MIB, 4)

    async def scenario(fs: FileSystem) -> None:
        pause = Pause(fs.writeback.ingestor, "kept_raw")  # between hashing and storing
        _, ino = await write_file(fs, b"f", first)
        await pause.wait_reached()
        fh = (await fs.open(ino, os.O_WRONLY)).fh
        await fs.write(fh, 0, second)
        await fs.release(fh)
        pause.go()
        await fs.writeback.settle()
        assert await read_all(fs, b"f") == second

    run(store, scenario)


def test_reopen_and_write_during_commit_is_stored_too(store: Store) -> None:
    first, more = payload(2 * MIB, 1), payload(MIB, 2)

    async def scenario(fs: FileSystem) -> None:
        pause, ino = await committing(fs, b"f", first)
        fh = (await fs.open(ino, os.O_WRONLY)).fh
        await fs.write(fh, len(first), more)  # lands while the commit prepares
        pause.go()
        await fs.writeback.settle()
        assert fs.writeback.staged(ino) is not None, "a stale commit replaced newer bytes"
        assert await read_all(fs, b"f") == first + more
        await fs.release(fh)
        await fs.writeback.settle()
        assert fs.writeback.staged(ino) is None
        assert await read_all(fs, b"f") == first + more

    run(store, scenario)


def test_truncate_and_fsync_during_commit(store: Store) -> None:
    data = payload(2 * MIB, 3)

    async def scenario(fs: FileSystem) -> None:
        pause, ino = await committing(fs, b"f", data)
        fh = (await fs.open(ino, os.O_WRONLY)).fh
        await fs.fsync(fh)
        await fs.setattr(ino, size=MIB // 2)
        await fs.fsync(fh)
        pause.go()
        await fs.writeback.settle()
        await fs.release(fh)
        await fs.writeback.settle()
        assert await read_all(fs, b"f") == data[: MIB // 2]

    run(store, scenario)


def test_truncate_by_path_during_commit(store: Store) -> None:
    data = payload(2 * MIB, 4)

    async def scenario(fs: FileSystem) -> None:
        pause, ino = await committing(fs, b"f", data)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: fs.setattr(ino, size=1000))  # waits for the commit
            await trio.sleep(0.05)
            assert (await fs.attributes(ino)).size == 1000
            pause.go()
        assert await read_all(fs, b"f") == data[:1000]

    run(store, scenario)


def test_unlink_during_commit_leaves_no_inode(store: Store) -> None:
    data = payload(MIB, 5)

    async def scenario(fs: FileSystem) -> None:
        pause, ino = await committing(fs, b"f", data)
        await fs.unlink(ROOT_INO, b"f")
        pause.go()
        await fs.writeback.settle()
        await fs.forget([(ino, 1)])
        with store.read() as txn:
            assert txn.inode(ino) is None

    run(store, scenario)


def test_write_truncate_fsync_during_front_ingest(store: Store) -> None:
    """A download's front is being stored while the writer goes on, rewrites, truncates.
    (Text: a file whose bytes would be kept raw is kept whole for its object instead.)"""
    data = text_bytes(6 * STEP, 6)

    async def scenario(fs: FileSystem) -> None:
        fh, ino = await write_file(fs, b"dl", data[: STEP - 1], close=False)
        pause = Pause(fs.writeback.ingestor, "prepare_chunks")
        # this write makes the front due: it is stored in the background, the write returns
        await fs.write(fh, STEP - 1, data[STEP - 1 : STEP + STEP // 2])
        await pause.wait_reached()
        other = (await fs.open(ino, os.O_RDWR)).fh
        await fs.write(other, 10, b"rewritten")  # inside the front being stored
        await fs.fsync(other)
        assert await fs.read(other, 0, 2 * STEP) == (
            data[:10] + b"rewritten" + data[19 : STEP + STEP // 2])
        await fs.setattr(ino, size=STEP + 1000)
        pause.go()
        await fs.write(other, STEP + 1000, data[STEP + 1000 : 5 * STEP])  # more fronts
        await fs.release(other)
        await fs.release(fh)
        await fs.writeback.settle()
        expected = data[:10] + b"rewritten" + data[19 : 5 * STEP]
        assert await read_all(fs, b"dl") == expected

    run(store, scenario, step=STEP)


def test_front_ingest_then_commit_equals_one_shot_import(store: Store) -> None:
    """Chunking that restarts at stored fronts cuts as one pass would: same content id."""
    data = text_bytes(7 * STEP + 12345, 7)

    async def scenario(fs: FileSystem) -> None:
        _, ino = await write_file(fs, b"dl", data)
        await fs.writeback.settle()
        with store.read() as txn:
            stored = txn.inode(ino)
        assert stored is not None
        assert stored.content_id == store.ingestor.prepare(data).content_id  # type: ignore[union-attr]

    run(store, scenario, step=STEP)


def test_small_write_into_big_file_rechunks_only_around_it(store: Store) -> None:
    data = bytearray(payload(48 * MIB, 8))

    async def scenario(fs: FileSystem) -> None:
        _, ino = await write_file(fs, b"big", bytes(data), piece=4 * MIB)
        await fs.writeback.settle()
        prepared: list[Any] = []
        original = fs.writeback.ingestor.prepare_stream

        def recording(*args: Any, **kwargs: Any) -> Any:
            prepared.append(result := original(*args, **kwargs))
            return result

        fs.writeback.ingestor.prepare_stream = recording  # type: ignore[method-assign]
        fh = (await fs.open(ino, os.O_WRONLY)).fh
        await fs.write(fh, 20 * MIB + 7, b"x" * 4096)
        await fs.release(fh)
        await fs.writeback.settle()
        data[20 * MIB + 7 : 20 * MIB + 7 + 4096] = b"x" * 4096
        assert await read_all(fs, b"big") == bytes(data)
        assert prepared and prepared[-1].new_stored_bytes < 12 * MIB
        with store.read() as txn:
            inode = txn.inode(ino)
        assert inode is not None
        # the same bytes imported in one pass cut the same: dedup is not lost
        assert inode.content_id == store.ingestor.prepare(bytes(data)).content_id  # type: ignore[union-attr]

    run(store, scenario)


def test_scattered_writes_and_holes_are_read_only_around_them(store: Store) -> None:
    """Storing a file again reads and cuts only around each change, not from the first to the
    last, and reads no hole; what it stores cuts exactly as one pass over the bytes would."""
    rng = random.Random(12)
    data = bytearray(payload(48 * MIB, 12))
    read_bytes = [0]
    original_read = Snapshot.read

    def counted(self: Snapshot, offset: int, size: int, chunk_bytes: Any) -> Any:
        out = original_read(self, offset, size, chunk_bytes)
        read_bytes[0] += len(out)
        return out

    async def scenario(fs: FileSystem) -> None:
        _, ino = await write_file(fs, b"big", bytes(data), piece=4 * MIB)
        await fs.writeback.settle()
        Snapshot.read = counted  # type: ignore[method-assign]
        try:
            for round_ in range(4):
                read_bytes[0] = 0
                fh = (await fs.open(ino, os.O_RDWR)).fh
                for offset in (3 * MIB + 5, 21 * MIB + 9, 40 * MIB + 1):
                    piece = rng.randbytes(4096)
                    await fs.write(fh, offset + round_ * 12_345, piece)
                    data[offset + round_ * 12_345 : offset + round_ * 12_345 + 4096] = piece
                if round_ == 1:  # extended far past its end: a 70 MiB hole, then a tail
                    end = len(data) + 70 * MIB
                    await fs.write(fh, end, b"tail")
                    data.extend(bytes(70 * MIB) + b"tail")
                if round_ == 2:  # cut into its last chunks, extended again: another hole
                    await fs.setattr(ino, size=len(data) - 3 * MIB)
                    del data[len(data) - 3 * MIB :]
                    await fs.setattr(ino, size=len(data) + 9 * MIB)
                    data.extend(bytes(9 * MIB))
                await fs.release(fh)
                await fs.writeback.settle()
                # three changes cost a few chunks each (under 48 MiB lie between the first and
                # the last), the headers probe 2 MiB; the holes cost nothing
                assert read_bytes[0] < 32 * MIB, f"round {round_}: read {read_bytes[0]}"
                with store.read() as txn:
                    inode = txn.inode(ino)
                assert inode is not None
                assert inode.content_id == store.ingestor.prepare(bytes(data)).content_id  # type: ignore[union-attr]
        finally:
            Snapshot.read = original_read  # type: ignore[method-assign]
        assert await read_all(fs, b"big") == bytes(data)

    run(store, scenario)


def test_in_place_updates_at_random_keep_every_byte(store: Store) -> None:
    rng = random.Random(9)
    data = bytearray(payload(6 * MIB, 9))

    async def scenario(fs: FileSystem) -> None:
        _, ino = await write_file(fs, b"f", bytes(data))
        for _round in range(12):
            fh = (await fs.open(ino, os.O_RDWR)).fh
            for _ in range(rng.randrange(1, 6)):
                offset = rng.randrange(0, len(data) + MIB)
                piece = rng.randbytes(rng.randrange(1, 300_000))
                await fs.write(fh, offset, piece)
                if offset > len(data):
                    data.extend(bytes(offset - len(data)))
                data[offset : offset + len(piece)] = piece
            if rng.random() < 0.3:
                size = rng.randrange(0, len(data) + 1)
                await fs.setattr(ino, size=size)
                del data[size:]
            assert await fs.read(fh, 0, len(data) + 1) == bytes(data)
            await fs.release(fh)
            await fs.writeback.settle()
            assert await read_all(fs, b"f") == bytes(data)

    run(store, scenario)


def test_in_place_update_over_remote_chunks_fetches_what_the_new_version_keeps(
        store: Store) -> None:
    """On a cluster node a file's chunks may be held by the bucket only (hubfs.cluster marks
    them remote and sets the reader's fetcher). An in-place update asks the fetcher for the
    base chunks a read of unchanged bytes needs, and at commit for those the new version keeps
    (its upload sends it whole from this node), never for chunks written over or cut off."""
    data = bytearray(payload(24 * MIB, 14))
    cut = 10 * MIB
    asked: list[tuple[int, int, int | None]] = []

    async def scenario(fs: FileSystem) -> None:
        _, ino = await write_file(fs, b"f", bytes(data), piece=4 * MIB)
        await fs.writeback.settle()
        with store.read() as txn:
            inode = txn.inode(ino)
            assert inode is not None
            cid = inode.content_id
            table = txn.content(cid)
        assert table is not None
        starts = [sum(table.lengths[:i]) for i in range(len(table.lengths))]
        held = {}
        with store.metadata_write() as txn:  # what the cache does when it evicts the content
            for chunk_id in table.chunk_ids:
                entry = txn.chunk(chunk_id)
                assert entry is not None
                held[chunk_id] = entry.location
                txn.put_chunk(chunk_id, ChunkEntry(remote_location(entry.location.raw_len),
                                                   entry.refcount))
        store.reader.forget_tables()

        def fetch(content_id: bytes, offset: int, size: int, /, *,
                  limit: int | None = None) -> None:  # ClusterNode.fetch, from the packs
            assert content_id == cid
            asked.append((offset, size, limit))
            with store.metadata_write() as txn:
                for chunk_id, start, length in zip(table.chunk_ids, starts, table.lengths,
                                                   strict=True):
                    entry = txn.chunk(chunk_id)
                    assert entry is not None
                    if start < offset + size and start + length > offset and \
                            entry.location.remote:
                        txn.put_chunk(chunk_id, ChunkEntry(held[chunk_id], entry.refcount))

        store.reader.fetch = fetch
        try:
            fh = (await fs.open(ino, os.O_RDWR)).fh
            over = payload(3 * MIB, 15)
            await fs.write(fh, 4 * MIB, over)  # writes over the chunks inside it
            data[4 * MIB : 7 * MIB] = over
            await fs.setattr(ino, size=cut)
            del data[cut:]
            assert not asked  # opens, writes and truncates fetch nothing
            assert await fs.read(fh, 9 * MIB, MIB // 2) == data[9 * MIB : 9 * MIB + MIB // 2]
            assert asked and all(limit == cut for _, _, limit in asked)  # ahead: no further
            read_asks = len(asked)
            await fs.write(fh, cut, b"appended")
            data.extend(b"appended")
            await fs.release(fh)
            await fs.writeback.settle()
            assert all(limit == offset + size for offset, size, limit in asked[read_asks:])
        finally:
            store.reader.fetch = None
        assert await read_all(fs, b"f") == bytes(data)
        with store.read() as txn:
            inode = txn.inode(ino)
            assert inode is not None
            new = txn.content(inode.content_id)
            assert new is not None
            assert not any(txn.chunk(c).location.remote for c in new.chunk_ids)  # type: ignore[union-attr]
            still_remote = {i for i, c in enumerate(table.chunk_ids)
                            if txn.chunk(c).location.remote}  # type: ignore[union-attr]
        untouched = {i for i, (start, length) in enumerate(zip(starts, table.lengths))
                     if start >= cut or (start >= 4 * MIB and start + length <= 7 * MIB)}
        assert untouched and still_remote == untouched

    run(store, scenario)


@pytest.mark.allow_warnings  # recovery says what it recovered
def test_crash_with_staged_overlay_and_front_recovers_every_byte(store_path: Path) -> None:
    """A daemon that dies (no unmount) leaves stagings and sidecars; the next mount stores
    them: an in-place overlay over stored content and a download with a stored front."""
    base, more = payload(4 * STEP, 10), text_bytes(5 * STEP, 11)
    expected: dict[bytes, bytes] = {}

    def crashed(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated crash: the daemon dies before storing anything more")

    async def before_crash(fs: FileSystem) -> None:
        _, ino = await write_file(fs, b"over", base)
        await fs.writeback.settle()
        fs.writeback.ingestor.prepare_stream = crashed  # type: ignore[method-assign]
        fh = (await fs.open(ino, os.O_RDWR)).fh
        await fs.write(fh, STEP + 3, b"patched")
        await fs.write(fh, 6 * STEP, b"tail")
        await fs.release(fh)  # closed: it must survive the crash
        expected[b"over"] = (base[: STEP + 3] + b"patched" + base[STEP + 10 :]
                             + bytes(2 * STEP) + b"tail")
        await write_file(fs, b"dl", more, close=False)  # a front stored, never closed
        expected[b"dl"] = more

    async def crash() -> None:
        fs = FileSystem(store, ingest_step_bytes=STEP)
        async with fs.running():
            await before_crash(fs)

    store = Store(store_path, sync_each_commit=False)
    trio.run(crash)
    store.writer.sync()  # type: ignore[union-attr]
    store.index.close()
    store.packs.close()
    store._release_lock()
    assert any(p.name.endswith(".log") for p in (store_path / "staging").iterdir())

    with Store(store_path) as reopened:
        async def after(fs: FileSystem) -> None:
            await fs.recover()
            for name, data in expected.items():
                assert await read_all(fs, name) == data

        run(reopened, after, step=STEP)


def test_spare_files_serve_creates_and_leave_nothing_behind(store_path: Path) -> None:
    """New stagings are spare files renamed into place; the spares go at unmount, and a
    crash's spares at the next mount."""
    async def scenario(fs: FileSystem) -> None:
        await trio.sleep(0.2)  # the first spares are made
        spares = {entry.inode() for entry in os.scandir(store_path / "spare")}
        assert spares
        reply, attrs = await fs.create(ROOT_INO, b"f", 0o644, 0, 0)
        staged = fs.writeback.staged(attrs.ino)
        assert staged is not None
        assert os.fstat(staged.fd).st_ino in spares
        await fs.write(reply.fh, 0, b"spare")
        await fs.release(reply.fh)

    with Store(store_path) as store:
        run(store, scenario)
    assert os.listdir(store_path / "spare") == []
    (store_path / "spare" / "left-by-a-crash").write_bytes(b"")
    with Store(store_path) as store:
        async def after(fs: FileSystem) -> None:
            await fs.recover()
            assert os.listdir(store_path / "spare") == []
            assert await read_all(fs, b"f") == b"spare"

        run(store, after)


def test_concurrent_appends_across_pack_boundaries(tmp_path: Path) -> None:
    """Every location an append returns holds that record, while other threads start new
    packs (the location used to be read after the lock was released)."""
    writer = PackWriter(tmp_path, target_bytes=64 * 1024)
    packs = PackFiles(tmp_path)
    results: list[tuple[bytes, bytes, Any]] = []
    lock = threading.Lock()

    def append(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(150):
            body = rng.randbytes(rng.randrange(100, 20_000))
            chunk_id = seed.to_bytes(2, "little") + i.to_bytes(30, "little")
            loc = writer.append(chunk_id, Codec.RAW, len(body), body)
            with lock:
                results.append((chunk_id, body, loc))

    threads = [threading.Thread(target=append, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.sync()
    assert len({loc.pack_id for _, _, loc in results}) > 20
    for chunk_id, body, loc in results:
        assert packs.read_stored(chunk_id, loc) == body
    writer.close()
    packs.close()


def test_near_identical_files_committed_at_once_make_one_object(store: Store) -> None:
    """Two commits hash at once, each finding the other's chunks new: the second to register
    must see that its file is now mostly stored and become references, not a second copy."""
    base = payload(4 * MIB, 20)
    tuned = base[:MIB] + payload(4096, 21) + base[MIB + 4096 :]

    async def scenario(fs: FileSystem) -> None:
        pause = Pause(fs.writeback.ingestor, "prepare_stream", calls=2)
        await write_file(fs, b"base", base)
        await write_file(fs, b"tuned", tuned)
        await pause.wait_reached()  # both commits are about to hash
        pause.go()
        await fs.writeback.settle()
        assert await read_all(fs, b"base") == base
        assert await read_all(fs, b"tuned") == tuned
        with store.read() as txn:
            assert len(list(txn.objects())) == 1

    run(store, scenario)
