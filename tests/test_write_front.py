"""A download never costs two full copies on disk: the written front is stored as it grows.

With ``--ingest-step-mib 1`` every MiB a file grows by, its finished front becomes chunks and
is cut out of the staging file. The tests check the disk use while writing, that reads during
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

pytestmark = pytest.mark.mount

STEP_MIB = 1


@pytest.fixture
def stepped(tmp_path: Path, request: pytest.FixtureRequest) -> Mounted:
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt", "--ingest-step-mib", str(STEP_MIB))
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
    data = weights(24)
    path = stepped.path / "model.safetensors.incomplete"
    peak = 0
    with open(path, "wb") as f:
        for i in range(0, len(data), 256 * 1024):
            f.write(data[i : i + 256 * 1024])
            f.flush()
            if i % (2 << 20) == 0:
                peak = max(peak, staging_disk_bytes(stepped.store))
                assert path.read_bytes()[: i + 1] == data[: i + 1]  # reads see the front
    os.rename(path, stepped.path / "model.safetensors")
    assert (stepped.path / "model.safetensors").read_bytes() == data
    print(f"staging peak {peak / 1e6:.1f} MB while writing {len(data) / 1e6:.1f} MB")
    assert peak < len(data) / 3, f"staging held {peak} of {len(data)} bytes"

    # the same bytes imported in one go dedupe completely: identical chunking
    before = stepped.stats()["unique_bytes"]
    (stepped.path / "copy.safetensors").write_bytes(data)
    after = stepped.stats()
    assert after["unique_bytes"] == before


def test_writes_into_the_stored_front(stepped: Mounted) -> None:
    data = bytearray(os.urandom(5 << 20))
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
        f.write(os.urandom(3 << 20))
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
    mounted = mount_store(store, tmp_path / "mnt", "--ingest-step-mib", str(STEP_MIB))
    data = os.urandom(6 << 20)
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
