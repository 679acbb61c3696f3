"""Objects and kernel-served reads through a real hubfs mount (issue 10).

A large file whose bytes the store keeps raw becomes one object file; every name with those
bytes is then served by the kernel from it (FUSE passthrough). Page-cache facts come, as in
test_passthrough, from mincore(2) on the object file and from this process's own storage reads
(/proc/self/io): a kernel-served read is a storage read of the object by the reader itself,
while a daemon-served read is the daemon's.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from hubfs import passthrough
from hubfs.errors import StoreFormatError
from hubfs.index import ROOT_INO
from hubfs.reader import PIECE_BYTES
from hubfs.store import MARKER, Store
from hubfs.verify import verify
from hubfs.vfs import FileSystem
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check
from tests.engine_helpers import text_bytes
from tests.test_passthrough import evict, read_costs, resident_fraction

FILE_BYTES = 32 << 20
NOBODY = 65534
COMMIT_WAIT_S = 60.0


def objects(mounted: Mounted) -> list[Path]:
    return sorted((mounted.store / "objects").iterdir())


def status(mounted: Mounted) -> dict:
    return json.loads(run_hubfs("status", str(mounted.path), "--json").stdout)


def settled(mounted: Mounted) -> dict:
    """The daemon's status once every closed file is stored."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    while (state := status(mounted))["staged_files"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not state["staged_files"], state
    return state


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def released(mounted: Mounted, still_open: int = 0) -> None:
    """Until the daemon has had the kernel's RELEASE of every file closed: close(2) returns
    before the kernel sends it."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    while status(mounted)["open_files"] > still_open and time.monotonic() < deadline:
        time.sleep(0.02)


def copied(mounted: Mounted) -> dict:
    """The daemon's status once no copy on demand is under way."""
    deadline = time.monotonic() + COMMIT_WAIT_S
    while (state := status(mounted))["copies_under_way"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not state["copies_under_way"], state
    return state


def read_twice(mounted: Mounted, path: Path, still_open: int = 0) -> bytes:
    """Read ``path`` in two opens, one after the other (its second open starts a copy on
    demand, hubfs.materialise), and wait until the copy is done."""
    for _ in range(2):
        data = path.read_bytes()
        released(mounted, still_open)
    copied(mounted)
    return data


kernel = pytest.mark.skipif(not passthrough.available() or os.geteuid() != 0,
                            reason="passthrough needs the patched pyfuse3 and a root mount")


@pytest.mark.mount
@kernel
def test_one_object_one_page_cache_for_every_name(mounted: Mounted) -> None:
    data = os.urandom(FILE_BYTES)
    write(mounted.path / "a.bin", data)
    write(mounted.path / "b.bin", data)
    settled(mounted)
    (obj,) = objects(mounted)
    assert obj.stat().st_size == FILE_BYTES
    stats = mounted.stats()
    assert stats["stored_bytes"] <= 1.05 * FILE_BYTES, stats
    assert status(mounted)["read_mode"].startswith("kernel"), status(mounted)

    evict(obj)
    # The reader itself reads the object from storage: the kernel serves it, not the daemon.
    assert read_costs(mounted.path / "a.bin") >= 0.9 * FILE_BYTES
    assert resident_fraction(obj) > 0.99
    assert read_costs(mounted.path / "b.bin") < 0.01 * FILE_BYTES  # the same pages
    with open(mounted.path / "a.bin", "rb") as f, open(mounted.path / "b.bin", "rb") as g, \
            mmap.mmap(g.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert f.read() == data
        assert mm[:] == data
        assert status(mounted)["kernel_served_files"] == 2


@pytest.mark.mount
@kernel
def test_rewriting_a_kernel_served_file(mounted: Mounted) -> None:
    """The kernel wants every open of a kernel-served inode served from the same file: while
    readers have it open, writing fails with ETXTBSY (as for a running program), never with
    EIO; a reader that opens beside a writer is served by the daemon and sees the writes."""
    data = os.urandom(FILE_BYTES)
    path = mounted.path / "model.bin"
    write(path, data)
    settled(mounted)
    with open(path, "rb") as reader:
        assert reader.read(4) == data[:4]
        with pytest.raises(OSError) as failed, open(path, "r+b"):
            pass
        assert failed.value.errno == errno.ETXTBSY
        with pytest.raises(OSError) as failed:
            os.truncate(path, 10)
        assert failed.value.errno == errno.ETXTBSY
        assert reader.read() == data[4:]
    with open(path, "r+b") as writer:  # readers gone: a writer, then a reader beside it
        writer.write(b"XXXX")
        writer.flush()
        with open(path, "rb") as reader:
            assert reader.read(8) == b"XXXX" + data[4:8]
    settled(mounted)
    # Updated in place, it is stored as chunk references (4 new bytes, not a second copy);
    # opened for reading twice, it is copied into an object of its own and served by the
    # kernel.
    assert mounted.stats()["pack_bytes"] < 9 << 20  # the changed chunk(s), not a copy
    assert read_twice(mounted, path) == b"XXXX" + data[4:]
    with open(path, "rb") as reader:
        assert reader.read() == b"XXXX" + data[4:]
        assert status(mounted)["kernel_served_files"] == 1
    stats = mounted.stats()
    assert len(objects(mounted)) == 2 and stats["materialised_objects"] == 1, stats


@pytest.mark.mount
@kernel
def test_copy_on_demand_waits_for_a_second_open_of_unchanged_bytes(mounted: Mounted) -> None:
    """No open waits for a copy on demand, and a content opened once is never copied: a file
    rewritten between its reads (fsstress, a sqlite cache) costs no copies. The second open
    of the same bytes starts the copy in the background; the third is kernel-served."""
    data = bytearray(os.urandom(FILE_BYTES))
    path = mounted.path / "tuned.bin"
    write(mounted.path / "base.bin", bytes(data))
    for round_ in range(3):  # changed in place between its reads: a new content each time
        with open(path, "r+b" if round_ else "wb") as f:
            data[round_ * 4096:(round_ + 1) * 4096] = os.urandom(4096)
            f.write(data)
        settled(mounted)
        assert path.read_bytes() == data
        released(mounted)
        state = status(mounted)
        assert state["copies_under_way"] == 0 and state["materialised_bytes"] == 0, state
    assert len(objects(mounted)) == 1  # base.bin's; tuned.bin is chunk references
    with open(path, "rb") as second:  # the daemon serves it while the copy runs
        assert second.read() == data
        assert status(mounted)["kernel_served_files"] == 0
    released(mounted)
    assert copied(mounted)["materialised_bytes"] == FILE_BYTES
    with open(path, "rb") as third:
        assert third.read() == data
        assert status(mounted)["kernel_served_files"] == 1


@pytest.mark.mount
@kernel
def test_copy_on_demand_of_a_sparse_file_keeps_its_holes(mounted: Mounted) -> None:
    """A sparse file updated in place (chunk references) and read twice is copied into an
    object with the same holes: the copy costs its data, not its size."""
    path = mounted.path / "sparse.bin"
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(FILE_BYTES)
        f.write(b"tail")
    settled(mounted)
    with open(path, "r+b") as f:  # in place: stored as references to the first version
        f.write(b"HEAD")
    settled(mounted)
    expected = b"HEAD" + bytes(FILE_BYTES - 4) + b"tail"
    assert read_twice(mounted, path) == expected
    assert mounted.stats()["materialised_objects"] == 1
    copy = max(objects(mounted), key=lambda p: p.stat().st_mtime_ns)
    assert copy.stat().st_size == len(expected)
    # what it holds: the pieces (hubfs.reader.PIECE_BYTES) with data, not the 32 MiB hole
    assert copy.stat().st_blocks * 512 <= PIECE_BYTES + (64 << 10), copy.stat()
    with open(path, "rb") as f:
        assert f.read() == expected
        assert status(mounted)["kernel_served_files"] == 1


@pytest.mark.mount
@kernel
def test_writer_opening_while_a_download_commits_keeps_every_byte(mounted: Mounted) -> None:
    """A file the kernel wrote is committed after its close; a writer that opens it at once
    (while the commit hashes it) is served by the daemon, whose writes the commit sees: the
    file ends with every byte of both (the fixture verifies the store after)."""
    expected = {}
    size = 4 * FILE_BYTES  # its commit (hash, fsync) takes a good part of a second
    for i in range(3):
        path = mounted.path / f"download{i}.bin"
        data = bytearray(os.urandom(size))
        write(path, data)
        time.sleep(0.05)  # the kernel sends the release after close returns: let it land
        with open(path, "r+b") as writer:  # the commit of the download is running now
            writer.write(b"head")
            writer.seek(size)
            writer.write(b"tail")
        data[:4] = b"head"
        expected[path] = bytes(data) + b"tail"
    settled(mounted)
    for path, data in expected.items():
        assert path.read_bytes() == data, path


@pytest.mark.mount
@kernel
def test_near_identical_file_shares_chunks_not_an_object(mounted: Mounted) -> None:
    """A fine-tune that changed one tensor: chunk references into the first object. (Seeded
    bytes: how many chunks around the change differ depends on where CDC cuts, and random
    bytes once cost 8.3 MB of new chunks, above the bound.)"""
    rng = random.Random(9)
    data = bytearray(rng.randbytes(FILE_BYTES))
    write(mounted.path / "base.bin", bytes(data))
    settled(mounted)
    data[FILE_BYTES // 2 : FILE_BYTES // 2 + (1 << 20)] = rng.randbytes(1 << 20)
    write(mounted.path / "tuned.bin", bytes(data))
    settled(mounted)
    assert len(objects(mounted)) == 1
    stats = mounted.stats()
    assert stats["stored_bytes"] <= 1.2 * FILE_BYTES, stats
    assert (mounted.path / "tuned.bin").read_bytes() == bytes(data)


@pytest.mark.mount
@kernel
def test_gc_removes_an_object_once_no_file_or_open_holds_it(mounted: Mounted) -> None:
    data = os.urandom(FILE_BYTES)
    write(mounted.path / "gone.bin", data)
    settled(mounted)
    with open(mounted.path / "gone.bin", "rb") as reader:
        (mounted.path / "gone.bin").unlink()
        run_hubfs("gc", str(mounted.store))
        assert len(objects(mounted)) == 1  # the open file still holds its content
        assert reader.read() == data
    deadline = time.monotonic() + 10  # the release reaches the daemon after close()
    while objects(mounted) and time.monotonic() < deadline:
        run_hubfs("gc", str(mounted.store))
    assert objects(mounted) == []
    assert mounted.stats()["stored_bytes"] < FILE_BYTES / 10


@pytest.mark.mount
def test_checked_reads_keep_every_read_in_the_daemon(tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt", "--checked-reads")
    try:
        data = os.urandom(FILE_BYTES)
        write(mounted.path / "a.bin", data)
        state = settled(mounted)
        assert state["read_mode"] == "daemon" and "--checked-reads" in state["read_mode_why"]
        (obj,) = objects(mounted)
        evict(obj)
        assert read_costs(mounted.path / "a.bin") < 0.01 * FILE_BYTES  # the daemon read it
        assert (mounted.path / "a.bin").read_bytes() == data
    finally:
        unmount_and_check(mounted, request)


def _commit(store: Store, name: bytes, data: bytes) -> None:
    """Write and close a file through the in-process model, and let it be stored."""
    async def main() -> None:
        fs = FileSystem(store)
        async with fs.running():
            reply, _attrs = await fs.create(ROOT_INO, name, 0o644, 0, 0)
            await fs.write(reply.fh, 0, data)
            await fs.release(reply.fh)
    trio.run(main)


@pytest.mark.damaged_store
def test_verify_finds_a_flipped_byte_in_an_object(store: Store) -> None:
    _commit(store, b"w.bin", os.urandom(4 << 20))
    (obj,) = (store.path / "objects").iterdir()
    os.chmod(obj, 0o600)
    with open(obj, "r+b") as f:
        f.seek(3 << 20)
        byte = f.read(1)
        f.seek(3 << 20)
        f.write(bytes([byte[0] ^ 1]))
    report = verify(store, progress=False)
    assert report.damaged_files == ["/w.bin"], report
    assert any("holds other bytes" in p for p in report.problems), report.problems


@pytest.mark.damaged_store
@pytest.mark.allow_warnings
def test_repair_drops_the_mapping_to_a_damaged_object(store_path: Path) -> None:
    """The kernel must never serve a damaged object: repair unmaps it, and verify still
    names the file (its bytes have no other copy)."""
    from hubfs.repair import repair

    with Store(store_path) as store:
        _commit(store, b"w.bin", os.urandom(4 << 20))
    (obj,) = (store_path / "objects").iterdir()
    os.chmod(obj, 0o600)
    with open(obj, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\0rot")
    assert repair(store_path, progress=False).objects_fixed == 1
    with Store(store_path, readonly=True) as store:
        with store.read() as txn:
            assert list(txn.objects()) == []
        assert verify(store, progress=False).damaged_files == ["/w.bin"]


@pytest.mark.allow_warnings  # the upgrade is logged as a warning, once
def test_a_format_1_store_is_upgraded_in_place(store_path: Path) -> None:
    """A store made before objects: read-only commands say how to upgrade it, the first
    writable open does, and its files read back."""
    data = text_bytes(2 << 20)  # compressible: in packs, as every byte was before objects
    with Store(store_path) as store:
        _commit(store, b"old.bin", data)
        with store.index.write() as txn:  # the previous format: no objects, and says so
            settings = json.loads(txn.meta_get("settings") or b"{}")
            settings["format"] = 1
            txn.meta_put("settings", json.dumps(settings).encode())
            txn.raw.drop(store.index.dbs["objects"], delete=True)
    shutil.rmtree(store_path / "objects")
    (store_path / MARKER).write_text('{"format": 1}\n')
    with pytest.raises(StoreFormatError, match="upgrade it in place"):
        Store(store_path, readonly=True)
    with Store(store_path) as store:
        assert store.settings["format"] == 2
    with Store(store_path, readonly=True) as store:
        with store.read() as txn:
            ino = txn.dirent(ROOT_INO, b"old.bin")[0]
            content = txn.inode(ino).content_id
        assert b"".join(store.reader.pieces(content)) == data
        assert verify(store, progress=False).ok
    assert json.loads((store_path / MARKER).read_text())["format"] == 2


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to mount as an unprivileged user")
def test_non_root_mount_serves_objects_by_the_daemon(tmp_path: Path) -> None:
    """Without CAP_SYS_ADMIN the kernel refuses backing files: the daemon serves the object's
    bytes, right, and `hubfs status` says why."""
    top = Path(tempfile.mkdtemp(prefix="hubfs-test-nobody-", dir="/tmp"))
    os.chown(top, NOBODY, NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                 sys.executable, "-m", "hubfs.cli"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def hubfs(*args: str) -> str:
        return subprocess.run([*as_nobody, *args], cwd=top, env=env, capture_output=True,
                              text=True, check=True, timeout=120).stdout

    store, mnt = top / "store", top / "mnt"
    try:
        hubfs("init", str(store))
        mnt.mkdir()
        os.chown(mnt, NOBODY, NOBODY)
        hubfs("mount", str(store), str(mnt))
        data = os.urandom(8 << 20)
        script = ("import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read()); "
                  "import time; time.sleep(1); sys.stdout.buffer.write(open(sys.argv[1], "
                  "'rb').read())")
        out = subprocess.run([*as_nobody[:4], sys.executable, "-c", script, str(mnt / "w.bin")],
                             input=data, capture_output=True, check=True, cwd=top).stdout
        assert out == data
        deadline = time.monotonic() + COMMIT_WAIT_S
        while (state := json.loads(hubfs("status", str(mnt), "--json")))["staged_files"] \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        cat = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
        again = subprocess.run([*as_nobody[:4], sys.executable, "-c", cat, str(mnt / "w.bin")],
                               capture_output=True, check=True, cwd=top).stdout
        assert again == data
        state = json.loads(hubfs("status", str(mnt), "--json"))
        assert state["read_mode"] == "daemon", state
        assert "root" in state["read_mode_why"], state
        assert len(list((store / "objects").iterdir())) == 1
    finally:
        subprocess.run([*as_nobody, "umount", str(mnt)], cwd=top, env=env, check=False,
                       capture_output=True)
        subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, capture_output=True)
        shutil.rmtree(top)


@pytest.mark.mount
@kernel
def test_copies_on_demand_stay_within_their_budget(tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    """Near-identical files (chunk references) get an object when opened, least recently
    opened first out once the budget (here room for one) is full; open ones are never
    dropped."""
    store = tmp_path / "store"
    Store.init(store)
    budget = 1.5 * FILE_BYTES / (1 << 30)
    mounted = mount_store(store, tmp_path / "mnt", "--materialise-budget-gib", str(budget))
    try:
        base = bytearray(os.urandom(FILE_BYTES))
        write(mounted.path / "base.bin", bytes(base))
        variants = {}
        for name in ("tuned-a.bin", "tuned-b.bin"):
            base[:4096] = os.urandom(4096)
            variants[name] = bytes(base)
            write(mounted.path / name, variants[name])
        settled(mounted)
        assert len(objects(mounted)) == 1  # the variants are chunk references
        a_path, b_path = mounted.path / "tuned-a.bin", mounted.path / "tuned-b.bin"
        assert read_twice(mounted, a_path) == variants["tuned-a.bin"]
        with open(a_path, "rb") as a:
            assert a.read() == variants["tuned-a.bin"]
            assert mounted.stats()["materialised_objects"] == 1
            # no room for b while a is open: its second open makes no copy
            assert read_twice(mounted, b_path, still_open=1) == variants["tuned-b.bin"]
            assert mounted.stats()["materialised_objects"] == 1
            with open(b_path, "rb") as b:
                assert b.read() == variants["tuned-b.bin"]
                assert status(mounted)["kernel_served_files"] == 1  # a only
        released(mounted)
        # a is closed: b's copy takes its room
        assert read_twice(mounted, b_path) == variants["tuned-b.bin"]
        with open(b_path, "rb") as b:
            assert b.read() == variants["tuned-b.bin"]
            assert status(mounted)["kernel_served_files"] == 1
        stats = mounted.stats()
        assert stats["materialised_objects"] == 1, stats
        assert stats["materialised_bytes"] == FILE_BYTES, stats
        run_hubfs("gc", str(mounted.store))
        assert len(objects(mounted)) == 2  # base's and b's copy
    finally:
        unmount_and_check(mounted, request)


@pytest.mark.allow_warnings  # repair logs what it rebuilt
def test_repair_rebuilds_the_content_to_object_mapping(store_path: Path) -> None:
    """The mapping is re-derived from what the objects hold: a lost one comes back, one that
    names a damaged object goes (the daemon then serves that content from its chunks)."""
    from hubfs.repair import repair

    data = os.urandom(4 << 20)
    with Store(store_path) as store:
        _commit(store, b"w.bin", data)
        with store.read() as txn:
            ((content, object_id),) = list(txn.objects())
        with store.index.write() as txn:
            txn.delete_object(content)
    report = repair(store_path, progress=False)
    assert report.objects_fixed == 1
    with Store(store_path, readonly=True) as store:
        assert store.object_of(content) == object_id
        assert verify(store, progress=False).ok
    exported = store_path.parent / "out"
    assert run_hubfs("export", str(store_path), "/", str(exported)).returncode == 0
    assert (exported / "w.bin").read_bytes() == data


@pytest.mark.mount
@kernel
def test_kernel_written_files_keep_bytes_written_after_a_truncate(mounted: Mounted) -> None:
    """safetensors' save_file sizes its temp file with ftruncate, then writes: the daemon
    sees the truncate, never the writes (the kernel writes into staging). Every byte must
    survive the commit, also with holes, a shrink and a write past the end."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = {"w": np.random.default_rng(3).standard_normal(3 << 18, dtype=np.float32)}
    save_file(tensors, str(mounted.path / "model.safetensors"))
    path = mounted.path / "sparse.bin"
    body = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.truncate(8 << 20)
        f.write(body)
        f.seek(6 << 20)
        f.write(b"tail")
        f.truncate(7 << 20)
        f.seek(9 << 20)
        f.write(b"end")
    expected = body + bytes((6 << 20) - len(body)) + b"tail" + bytes((1 << 20) - 4) \
        + bytes(2 << 20) + b"end"
    assert path.stat().st_size == len(expected)
    settled(mounted)
    assert path.read_bytes() == expected
    loaded = load_file(str(mounted.path / "model.safetensors"))
    assert (loaded["w"] == tensors["w"]).all()
