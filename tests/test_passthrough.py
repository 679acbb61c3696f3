"""FUSE passthrough through hubfs.passthrough and the patched pyfuse3, on a tiny filesystem.

tests/passthrough_fs.py mounts two names over one real backing file. The kernel must serve
read and mmap from that file with no READ request reaching the daemon, and both names must
use the backing file's page cache, not copies of their own. Page-cache facts come from
mincore(2) on the backing file and from this process's storage reads (/proc/self/io
read_bytes), both exact where /proc/meminfo would be noisy on a shared machine. A control
mount without passthrough shows that these measures do see daemon-served reads.
"""

from __future__ import annotations

import ctypes
import grp
import hashlib
import json
import mmap
import os
import pwd
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubfs import passthrough

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not passthrough.available(),
                       reason="pyfuse3 lacks the passthrough patch (scripts/setup builds it)"),
]

REPO = Path(__file__).resolve().parent.parent
FILE_BYTES = 32 << 20
MOUNT_WAIT_S = 15.0
_libc = ctypes.CDLL(None, use_errno=True)


class TwoNames:
    """A running tests/passthrough_fs.py mount."""

    def __init__(self, path: Path, backing: Path, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.path = path
        self.backing = backing
        self.proc = proc
        self.log = log

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "reads").read_bytes())

    def wait_state(self, key: str, value: object) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while (state := self.state())[key] != value and time.monotonic() < deadline:
            time.sleep(0.02)  # release reaches the daemon after close() returns
        return state


def is_mounted(path: Path) -> bool:
    """From /proc/mounts: root cannot even stat another user's FUSE mount."""
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return str(path) in points


def _mount(tmp_path: Path, *extra: str, user: list[str] | None = None) -> Iterator[TwoNames]:
    backing = tmp_path / "backing.bin"
    with open(backing, "wb") as f:
        f.write(os.urandom(FILE_BYTES))
        os.fsync(f.fileno())  # clean pages, so that POSIX_FADV_DONTNEED can drop them
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    os.chown(mnt, tmp_path.stat().st_uid, tmp_path.stat().st_gid)  # the mounting user's
    log = tmp_path / "daemon.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([*(user or []), sys.executable, "-m", "tests.passthrough_fs",
                                 str(backing), str(mnt), *extra],
                                cwd=REPO, stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + MOUNT_WAIT_S
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"passthrough_fs did not mount: {log.read_text()}")
        time.sleep(0.05)
    try:
        yield TwoNames(mnt, backing, proc, log)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
            proc.kill()
            code = proc.wait()
        assert code == 0, f"passthrough_fs exited {code}: {log.read_text()}"


@pytest.fixture
def kernel_served(tmp_path: Path) -> Iterator[TwoNames]:
    yield from _mount(tmp_path)


@pytest.fixture
def daemon_served(tmp_path: Path) -> Iterator[TwoNames]:
    yield from _mount(tmp_path, "--no-passthrough")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def storage_read_bytes() -> int:
    """Bytes this process has had fetched from storage (not from the page cache)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def read_costs(path: Path) -> int:
    """Read ``path`` whole; return the storage bytes it cost this process."""
    before = storage_read_bytes()
    sha256(path)
    return storage_read_bytes() - before


def resident_fraction(path: Path) -> float:
    """The share of ``path``'s pages in the page cache, by mincore(2)."""
    size = path.stat().st_size
    # A private mapping, since ctypes wants a writable buffer; untouched, it shows the
    # file's own page cache.
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        start = ctypes.c_char.from_buffer(mm)
        result = _libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size),
                               vec)
        del start  # the mmap cannot close while a ctypes view of it exists
        if result != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec) / pages


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert resident_fraction(path) < 0.01


def test_kernel_serves_read_and_mmap(kernel_served: TwoNames) -> None:
    fs = kernel_served
    state = fs.state()
    assert state["enabled"] and state["on"], state
    want = sha256(fs.backing)
    assert sha256(fs.path / "a") == want
    assert sha256(fs.path / "b") == want
    backing = fs.backing.read_bytes()
    with open(fs.path / "a", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert len(mm) == FILE_BYTES
        assert mm[FILE_BYTES // 2:FILE_BYTES // 2 + 4096] == backing[FILE_BYTES // 2:
                                                                    FILE_BYTES // 2 + 4096]
        assert mm[:] == backing
    # Concurrent opens of one inode share its backing id; a new id per open would fail
    # the second open with EIO.
    with open(fs.path / "a", "rb") as a1, open(fs.path / "a", "rb") as a2, \
            open(fs.path / "b", "rb") as b1:
        assert a1.read(4096) == a2.read(4096) == b1.read(4096) == backing[:4096]
        assert fs.state()["held"] == 2
    state = fs.wait_state("held", 0)
    assert state["held"] == 0, state
    assert state["reads"] == 0, state
    assert state["passthrough_opens"] == 6, state


def test_two_names_share_the_backing_page_cache(kernel_served: TwoNames) -> None:
    fs = kernel_served
    evict(fs.backing)
    # A cold read through /a is a storage read of the backing file, in this process...
    assert read_costs(fs.path / "a") >= 0.9 * FILE_BYTES
    assert resident_fraction(fs.backing) > 0.99
    # ...which /b then reads from that same page cache...
    assert read_costs(fs.path / "b") < 0.01 * FILE_BYTES
    # ...and neither name keeps a copy of its own: with the backing pages gone, both
    # names go back to storage.
    evict(fs.backing)
    assert read_costs(fs.path / "b") >= 0.9 * FILE_BYTES
    evict(fs.backing)
    assert read_costs(fs.path / "a") >= 0.9 * FILE_BYTES
    assert fs.state()["reads"] == 0


def test_without_passthrough_the_daemon_reads(daemon_served: TwoNames) -> None:
    """The control: the measures above do see a daemon-served mount for what it is."""
    fs = daemon_served
    state = fs.state()
    assert not state["enabled"] and not state["on"], state
    evict(fs.backing)
    assert read_costs(fs.path / "a") < 0.01 * FILE_BYTES  # the daemon did the storage reads
    after_a = fs.state()["reads"]
    assert after_a > 0
    assert sha256(fs.path / "b") == sha256(fs.backing)
    assert fs.state()["reads"] > after_a  # b is a second inode with its own page cache
    assert fs.state()["passthrough_opens"] == 0


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_non_root_mount_falls_back_to_daemon_reads() -> None:
    """Without CAP_SYS_ADMIN the kernel refuses backing files (EPERM): the daemon serves."""
    with tempfile.TemporaryDirectory() as tmp:
        top = Path(tmp)
        os.chmod(top, 0o755)
        os.chown(top, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        for fs in _mount(top, user=NOBODY):  # fusermount3 mounts it for nobody
            assert os.stat(fs.backing).st_mode & 0o004
            # Only nobody may enter the mount (no allow_other), so nobody reads it.
            script = ("import hashlib, sys; "
                      "[print(hashlib.sha256(open(p, 'rb').read()).hexdigest()) "
                      "for p in sys.argv[1:3]]; print(open(sys.argv[3]).read())")
            out = subprocess.run([*NOBODY, sys.executable, "-c", script, str(fs.path / "a"),
                                  str(fs.path / "b"), str(fs.path / "reads")], cwd="/",
                                 capture_output=True, text=True, check=True).stdout.split("\n")
            assert out[0] == out[1] == sha256(fs.backing)
            state = json.loads(out[2])
            assert state["enabled"] and not state["on"], state
            assert "Operation not permitted" in state["why"], state
            assert state["reads"] > 0 and state["passthrough_opens"] == 0, state
