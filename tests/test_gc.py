"""gc gives the space back, while mounted, while a reader streams, and survives kill -9.

Write, delete and overwrite files through the mount; run ``hubfs gc`` (which goes to the
daemon's control socket) while a thread streams another file and checks every byte; the packs
must come down to within 5% of what the live files need. Then the same again with the daemon
killed in the middle of gc: after a remount and another gc, same result, verify clean.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hubfs.store import Store
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check

FILE_BYTES = 16 * 1024 * 1024
FILES = 8


def compressible(size: int) -> bytes:
    """Bytes zstd halves: the store keeps them in packs, which gc rewrites (random bytes of this
    size would each become an object, which gc only deletes)."""
    return os.urandom(size // 2).hex().encode()


def churn(mnt: Path, seed: int) -> dict[str, str]:
    """Write FILES files, delete half, overwrite a quarter; returns live name -> sha256."""
    live = {}
    for i in range(FILES):
        data = compressible(FILE_BYTES)
        (mnt / f"f{seed}-{i}").write_bytes(data)
        live[f"f{seed}-{i}"] = hashlib.sha256(data).hexdigest()
    for i in range(0, FILES, 2):
        (mnt / f"f{seed}-{i}").unlink()
        del live[f"f{seed}-{i}"]
    for i in range(1, FILES, 4):
        data = compressible(FILE_BYTES // 2)
        (mnt / f"f{seed}-{i}").write_bytes(data)
        live[f"f{seed}-{i}"] = hashlib.sha256(data).hexdigest()
    return live


def pack_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "packs").glob("*.pack"))


def live_bytes(store: Path) -> int:
    with Store(store, readonly=True) as opened:
        return opened.stats()["chunk_stored_bytes"]


class Streamer(threading.Thread):
    """Reads one file over and over, checking its bytes, until stopped."""

    def __init__(self, path: Path, digest: str) -> None:
        super().__init__(daemon=True)
        self.path, self.digest = path, digest
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)  # every read reaches hubfs
                try:
                    h = hashlib.sha256()
                    buf = mmap.mmap(-1, 1 << 20)
                    while n := os.readv(fd, [buf]):
                        h.update(buf[:n])
                finally:
                    os.close(fd)
            except OSError as exc:
                if not self.stop.is_set():
                    self.errors.append(repr(exc))
                return
            if h.hexdigest() != self.digest:
                self.errors.append("wrong bytes")
            self.rounds += 1


def test_gc_while_mounted_with_a_reader(mounted: Mounted) -> None:
    live = churn(mounted.path, 1)
    streamed = min(live)
    reader = Streamer(mounted.path / streamed, live[streamed])
    reader.start()
    try:
        before = pack_bytes(mounted.store)
        result = run_hubfs("gc", str(mounted.store))
        time.sleep(0.5)
    finally:
        reader.stop.set()
        reader.join(timeout=60)
    assert not reader.errors, reader.errors
    assert reader.rounds >= 1
    after = pack_bytes(mounted.store)
    need = live_bytes(mounted.store)
    print(f"gc: packs {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB; live {need / 1e6:.0f} MB "
          f"({result.stdout.strip()})")
    assert after <= 1.05 * need
    for name, digest in live.items():
        assert hashlib.sha256((mounted.path / name).read_bytes()).hexdigest() == digest


@pytest.mark.slow
@pytest.mark.allow_warnings  # the remount after the kill reports what it found
def test_kill_9_during_gc_then_rerun(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = tmp_path / "store"
    Store.init(store)
    mnt = mount_store(store, tmp_path / "mnt")
    live = churn(mnt.path, 2)
    pid = int((store / "lock").read_text())
    packs_before = set((store / "packs").iterdir())
    gc = subprocess.Popen([sys.executable, "-m", "hubfs.cli", "gc", "--full", str(store)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while set((store / "packs").iterdir()) <= packs_before and time.monotonic() < deadline:
        time.sleep(0.005)  # gc seals the newest pack first: it has begun once a new one exists
    assert set((store / "packs").iterdir()) > packs_before, "gc never began"
    time.sleep(0.05)  # into the copying of live records
    os.kill(pid, signal.SIGKILL)
    gc.wait(timeout=60)
    subprocess.run(["fusermount3", "-uz", str(mnt.path)], check=False)
    time.sleep(0.3)
    mnt = mount_store(store, mnt.path)
    try:
        for name, digest in live.items():
            assert hashlib.sha256((mnt.path / name).read_bytes()).hexdigest() == digest
        run_hubfs("gc", "--full", str(store))
        assert pack_bytes(store) <= 1.05 * live_bytes(store)
    finally:
        unmount_and_check(mnt, request)
