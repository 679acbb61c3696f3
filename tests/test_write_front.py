"""A download never costs two full copies on disk.

These mounts use ``--checked-reads``, so the daemon receives every write, as on a non-root
mount (as root, a new file is written by the kernel straight into its staging file instead;
test_objects covers that). Bytes the store compresses (text, say a dataset's JSON): with
``--ingest-step-mib 1`` every MiB a file grows by, its finished front becomes chunks and is cut
out of the staging file. Bytes it keeps raw (weights): the staging file is kept whole and
becomes the content's object at commit (hubfs.objects), with no copy at all. The tests check the disk use while writing, that reads during
the write see every byte, that the stored chunking equals a one-shot import (so dedup is not
lost), that writes and truncates into the stored front work, and that a crash recovers the
front from its sidecar.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from hubfs.staging import SIDECAR_SUFFIX
from hubfs.store import Store
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check
from tests.engine_helpers import text_bytes

pytestmark = pytest.mark.mount

STEP_MIB = 1


@pytest.fixture
def stepped(tmp_path: Path, request: pytest.FixtureRequest) -> Mounted:
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt", "--ingest-step-mib", str(STEP_MIB),
                          "--checked-reads")
    yield mounted  # type: ignore[misc]
    unmount_and_check(mounted, request)


def staging_disk_bytes(store: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in (store / "staging").iterdir())


def weights(mib: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {f"layer{i}.weight": rng.standard_normal((mib * 1024 * 1024 // 4 // 8,),
                                                       dtype=np.float32) for i in range(8)}
    return save(tensors)


def test_sequential_write_keeps_staging_small(stepped: Mounted) -> None:
    data = text_bytes(24 << 20)
    path = stepped.path / "data.json.incomplete"
    peak = 0
    with open(path, "wb") as f:
        for i in range(0, len(data), 256 * 1024):
            f.write(data[i : i + 256 * 1024])
            f.flush()
            if i % (2 << 20) == 0:
                peak = max(peak, staging_disk_bytes(stepped.store))
                assert path.read_bytes()[: i + 1] == data[: i + 1]  # reads see the front
    os.rename(path, stepped.path / "data.json")
    assert (stepped.path / "data.json").read_bytes() == data
    print(f"staging peak {peak / 1e6:.1f} MB while writing {len(data) / 1e6:.1f} MB")
    assert peak < len(data) / 3, f"staging held {peak} of {len(data)} bytes"

    # the same bytes imported in one go dedupe completely: identical chunking
    before = stepped.stats()["unique_bytes"]
    (stepped.path / "copy.json").write_bytes(data)
    after = stepped.stats()
    assert after["unique_bytes"] == before


def stored(mounted: Mounted, key: str, want: int) -> dict:
    """The store's stats once ``key`` reaches ``want`` (commits run after close)."""
    deadline = time.monotonic() + 60
    while (stats := mounted.stats())[key] < want and time.monotonic() < deadline:
        time.sleep(0.2)
    return stats


def test_weights_download_becomes_its_object_without_a_copy(stepped: Mounted) -> None:
    data = weights(24)
    path = stepped.path / "model.safetensors.incomplete"
    with open(path, "wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i : i + (1 << 20)])
            f.flush()
        staged = os.stat(next((stepped.store / "staging").iterdir()))
    os.rename(path, stepped.path / "model.safetensors")
    stats = stored(stepped, "objects", 1)
    assert stats["objects"] == 1 and stats["object_bytes"] == len(data)
    assert stats["pack_bytes"] < len(data) / 100, "the weights were copied into packs"
    assert stats["stored_bytes"] <= 1.05 * len(data) + (1 << 20)
    obj = next((stepped.store / "objects").iterdir())
    assert (obj.stat().st_ino, obj.stat().st_dev) == (staged.st_ino, staged.st_dev), \
        "the object is not the staging file itself"
    assert (stepped.path / "model.safetensors").read_bytes() == data

    # a second download of the same bytes adds no object and no pack bytes
    (stepped.path / "again.safetensors").write_bytes(data)
    assert stored(stepped, "files", 2)["object_bytes"] == len(data)


def test_writes_into_the_stored_front(stepped: Mounted) -> None:
    data = bytearray(text_bytes(5 << 20))
    path = stepped.path / "f.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        f.seek(100)  # back into the stored front
        f.write(b"XYZ")
        data[100:103] = b"XYZ"
        f.seek(len(data))
        f.write(b"tail")
        data += b"tail"
    assert path.read_bytes() == bytes(data)
    with open(path, "r+b") as f:
        f.write(text_bytes(3 << 20, 1))
        f.truncate(1000)
    assert path.stat().st_size == 1000


def front_sidecars(store: Path) -> list[Path]:
    """Sidecars that name at least one stored chunk of a file's front."""
    return [p for p in (store / "staging").glob("*" + SIDECAR_SUFFIX) if p.stat().st_size]


@pytest.mark.allow_warnings  # recovery logs what it recovered
def test_crash_while_writing_recovers_front_and_tail(tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt", "--ingest-step-mib", str(STEP_MIB),
                          "--checked-reads")
    data = text_bytes(6 << 20)
    path = mounted.path / "partial.bin"
    f = open(path, "wb")  # noqa: SIM115  (left open on purpose: the daemon dies first)
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        deadline = time.monotonic() + 10  # the front is stored by a worker, after the write
        while not front_sidecars(store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front_sidecars(store), "nothing of the front was stored"
        os.kill(int((store / "lock").read_text()), signal.SIGKILL)
        time.sleep(0.3)
    finally:
        try:
            f.close()
        except OSError:
            pass
        subprocess.run(["fusermount3", "-uz", str(mounted.path)], check=False)
    mounted = mount_store(store, mounted.path)
    try:
        assert path.read_bytes() == data
    finally:
        unmount_and_check(mounted, request)
    assert not list((store / "staging").iterdir())
    assert run_hubfs("verify", str(store)).returncode == 0
