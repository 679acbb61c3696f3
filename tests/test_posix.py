"""POSIX semantics through a real mount, held to what ext4 does on the same machine.

Most tests run one scenario twice, on a plain directory of the temp disk (ext4) and on the
mount, and compare what each step returned (data, sizes, modes, errno names). The rest check
what has no local twin: data visible across file descriptors and processes while a file is
being written, concurrency, locks between processes, O_DIRECT, and that a remount gives back
the same bytes and metadata. Tests whose docstring starts "Pins a bug" failed on hubfs bugs
this suite found (each was an xfail until fixed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hubfs.mount import mounts
from hubfs.store import Store
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check

pytestmark = pytest.mark.mount

MiB = 1024 * 1024
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


# -- helpers
def renameat2(src: Path | bytes, dst: Path | bytes, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def attempt(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The call's result, or the name of the errno it failed with (for comparing runs)."""
    try:
        result = func(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok" if result is None else result


def on_ext4_and_mount(tmp_path: Path, mounted: Mounted,
                      scenario: Callable[[Path], Any]) -> Any:
    """Run ``scenario`` on a local directory, then on the mount; both must observe the same."""
    local = tmp_path / "ext4"
    local.mkdir()
    expected = scenario(local)
    got = scenario(mounted.path)
    assert got == expected
    settle(mounted.path)
    return expected


def remount(mounted: Mounted) -> None:
    """Unmount (the daemon stores everything first) and mount the same store at the same place,
    so the fixture's final unmount and checks apply to the new daemon."""
    run_hubfs("umount", str(mounted.path))
    mount_store(mounted.store, mounted.path)


def wait_committed(mounted: Mounted, timeout_s: float = 10.0) -> None:
    """Wait until the daemon has ingested every closed file (its staging dir is empty)."""
    deadline = time.monotonic() + timeout_s
    while any((mounted.store / "staging").iterdir()):
        assert time.monotonic() < deadline, "files stayed in staging"
        time.sleep(0.02)


def settle(path: Path) -> None:
    """``wait_committed`` when ``path`` lies in a hubfs mount, nothing elsewhere (ext4).

    Scenarios call it after closing a file and before reading, reopening or truncating it, so
    that tests about other things do not depend on a commit's timing; the races of a close
    with what follows it have tests of their own (test_read_while_commit_finishes,
    test_o_trunc_truncates_a_file_being_written, test_close_during_commit_is_committed).
    """
    for info in mounts():
        if path == info.mountpoint or info.mountpoint in path.parents:
            wait_committed(Mounted(Path(info.source), info.mountpoint))


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path | bytes, *, times: bool = True, inos: bool = True) -> dict[bytes, tuple]:
    """Everything a user can see of a tree, by path relative to ``root`` (atime and ctime
    aside). Hard links show as equal inode numbers when ``inos`` is set."""
    base = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            body: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    body = sha(f.read())
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(full)
            xattrs = sorted((n, os.getxattr(full, n, follow_symlinks=False))
                            for n in os.listxattr(full, follow_symlinks=False))
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[os.path.relpath(full, base)] = (
                st.st_mode, st.st_uid, st.st_gid, st.st_nlink, size, st.st_rdev, body, xattrs,
                st.st_mtime_ns if times else None, st.st_ino if inos else None)
    return out


def same_layout(a: dict[bytes, tuple], b: dict[bytes, tuple]) -> None:
    """Two ``tree`` results agree, with inode numbers compared as hard-link groups."""
    assert sorted(a) == sorted(b)
    groups_a: dict[int, list[bytes]] = {}
    groups_b: dict[int, list[bytes]] = {}
    for path in a:
        assert a[path][:-1] == b[path][:-1], path
        groups_a.setdefault(a[path][-1], []).append(path)
        groups_b.setdefault(b[path][-1], []).append(path)
    assert sorted(groups_a.values()) == sorted(groups_b.values())


PY_CHILD = [sys.executable, "-c"]


def child(code: str, *args: str, timeout: float = 20) -> str:
    """Run a small Python program in another process; its stdout, stripped."""
    result = subprocess.run([*PY_CHILD, code, *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# -- file data
def io_scenario(root: Path) -> list[Any]:
    out: list[Any] = []
    p = root / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    out.append(os.write(fd, b"hello"))
    out.append(os.pwrite(fd, b"world", 10))  # past EOF: bytes 5..9 are a hole
    out.append(os.pread(fd, 100, 0))
    out.append(os.fstat(fd).st_size)
    out.append(os.pread(fd, 10, 100))  # at and past EOF: nothing
    os.ftruncate(fd, 3)
    out.append((os.pread(fd, 100, 0), os.fstat(fd).st_size))
    os.ftruncate(fd, 8)  # growing shows zeros, not the old bytes
    out.append((os.pread(fd, 100, 0), os.fstat(fd).st_size))
    out.append(os.lseek(fd, 0, os.SEEK_END))
    os.write(fd, b"END")
    out.append(os.lseek(fd, 0, os.SEEK_CUR))
    os.close(fd)
    settle(root)
    out.append(p.read_bytes())
    out.append(attempt(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY))

    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"+app")  # O_APPEND ignores the position
    out.append(os.lseek(fd, 0, os.SEEK_CUR))
    os.pwrite(fd, b"+pw", 0)  # Linux: pwrite on O_APPEND appends too
    os.close(fd)
    settle(root)
    out.append(p.read_bytes())
    with open(p, "ab") as f:
        f.write(b"+again")
    settle(root)
    out.append(p.read_bytes())

    os.truncate(p, 4)
    out.append(p.read_bytes())
    os.truncate(p, 7)
    out.append(p.read_bytes())
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    out.append(os.fstat(fd).st_size)
    os.write(fd, b"new")
    os.close(fd)
    settle(root)
    out.append(p.read_bytes())
    fd = os.open(p, os.O_CREAT | os.O_RDWR)  # O_CREAT without O_EXCL keeps the content
    out.append(os.read(fd, 100))
    os.close(fd)

    fd = os.open(p, os.O_RDONLY)
    out.append(attempt(os.write, fd, b"x"))
    out.append(attempt(os.ftruncate, fd, 0))
    os.close(fd)
    fd = os.open(p, os.O_WRONLY)
    out.append(attempt(os.read, fd, 1))
    os.close(fd)
    (root / "d").mkdir()
    out.append(attempt(os.truncate, root / "d", 0))
    out.append(attempt(os.open, root / "d", os.O_WRONLY))
    out.append(attempt(os.open, root / "f" / "x", os.O_RDONLY))
    out.append(attempt(os.open, root / "missing", os.O_RDONLY))

    sparse = root / "sparse"
    fd = os.open(sparse, os.O_CREAT | os.O_WRONLY, 0o600)
    os.pwrite(fd, b"x", 3 * MiB)
    os.pwrite(fd, b"y", 1)
    os.close(fd)
    settle(root)
    data = sparse.read_bytes()
    out.append((len(data), data.count(0), data[:2], data[-1:]))

    stored = root / "stored"
    stored.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    settle(root)
    with open(stored, "r+b") as f:  # rewrite in the middle of a stored file
        f.seek(700_000)
        f.write(b"MIDDLE" * 50_000)
    settle(root)
    out.append(sha(stored.read_bytes()))
    with open(stored, "r+b") as f:
        f.seek(5)
        out.append(f.read(3))
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    settle(root)
    os.truncate(stored, 3 * MiB)
    out.append(sha(stored.read_bytes()))
    os.truncate(stored, 1_000_001)
    out.append(sha(stored.read_bytes()))
    with open(stored, "rb+") as f:
        f.truncate(10)
        f.seek(20)
        f.write(b"Z")
    settle(root)
    out.append(stored.read_bytes())
    empty = root / "empty"
    empty.touch()
    settle(root)  # see test_close_during_commit_is_committed
    out.append((empty.read_bytes(), empty.stat().st_size))
    os.truncate(empty, 0)
    out.append(empty.read_bytes())
    return out


def test_file_io_matches_ext4_and_survives_remount(tmp_path: Path, mounted: Mounted) -> None:
    on_ext4_and_mount(tmp_path, mounted, io_scenario)
    local = tree(tmp_path / "ext4", times=False, inos=False)
    remount(mounted)
    assert tree(mounted.path, times=False, inos=False) == local


def test_other_fds_and_processes_see_data_before_close(mounted: Mounted) -> None:
    p = mounted.path / "growing"
    writer = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    reader = os.open(p, os.O_RDONLY)  # opened before any write
    written = b""
    for i in range(6):
        piece = os.urandom(100_000 + i)
        os.write(writer, piece)
        written += piece
        assert os.pread(reader, len(written) + 10, 0) == written
        assert os.stat(p).st_size == len(written)
        with open(p, "rb") as late:  # a reader opened mid-way
            assert late.read() == written
        if i % 3 == 0:
            out = child("import sys,hashlib;print(hashlib.sha256(open(sys.argv[1],'rb')"
                        ".read()).hexdigest())", str(p))
            assert out == sha(written)
    os.pwrite(writer, b"PATCH", 1000)  # overwrite inside what was written
    written = written[:1000] + b"PATCH" + written[1005:]
    assert os.pread(reader, len(written), 0) == written
    os.fsync(writer)
    os.close(writer)
    wait_committed(mounted)  # see test_read_while_commit_finishes
    assert os.pread(reader, len(written), 0) == written
    os.close(reader)
    assert p.read_bytes() == written


def test_large_file_round_trip_and_rewrite_middle(mounted: Mounted) -> None:
    data = bytearray(random.Random(7).randbytes(50 * MiB))
    p = mounted.path / "large.bin"
    with open(p, "wb") as f:
        f.writelines(data[off:off + MiB] for off in range(0, len(data), MiB))
    assert p.stat().st_size == len(data)
    wait_committed(mounted)  # see test_read_while_commit_finishes
    assert sha(p.read_bytes()) == sha(data)
    patch = os.urandom(MiB + 12345)
    with open(p, "r+b") as f:  # the middle of a stored file
        f.seek(25 * MiB - 777)
        f.write(patch)
    data[25 * MiB - 777:25 * MiB - 777 + len(patch)] = patch
    wait_committed(mounted)
    with open(p, "rb") as f:
        f.seek(25 * MiB - 1000)
        assert f.read(2 * MiB) == data[25 * MiB - 1000:27 * MiB - 1000]
    assert sha(p.read_bytes()) == sha(data)
    remount(mounted)
    assert p.stat().st_size == len(data)
    assert sha(p.read_bytes()) == sha(data)


def growing_files_scenario(root: Path) -> list[Any]:
    """Files written front to back (what downloads do), with every kind of change behind the
    writer's back: hubfs stores the front of such files while they grow."""
    out: list[Any] = []
    step = 256 * 1024
    data = bytearray(random.Random(1).randbytes(6 * MiB))
    p = root / "download"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    reader = os.open(p, os.O_RDONLY)
    for off in range(0, len(data), step):
        os.write(fd, data[off:off + step])
        if off % MiB == 0:  # the whole file so far, through another fd
            out.append(sha(os.pread(reader, off + step, 0)) == sha(data[:off + step]))
    out.append(os.pread(reader, 64, 10_000) == data[10_000:10_064])
    os.pwrite(fd, b"FRONT", 100_000)  # overwrite inside the front
    out.append(os.pread(reader, 15, 99_995))
    more = random.Random(2).randbytes(3 * MiB)
    os.write(fd, more)  # keep growing after that
    out.append(os.fstat(reader).st_size)
    os.ftruncate(fd, 1_500_000)  # cut back into the front
    out.append(sha(os.pread(reader, 2 * MiB, 0)))
    os.pwrite(fd, b"end", 4 * MiB)  # grow again with a hole
    os.fsync(fd)
    out.append(sha(os.pread(reader, 5 * MiB, 0)))
    os.close(fd)
    os.close(reader)
    settle(root)
    out.append(sha(p.read_bytes()))

    q = root / "renamed-while-written"
    fd = os.open(q, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data[:3 * MiB])
    os.rename(q, root / "q2")
    os.write(fd, data[3 * MiB:])
    os.close(fd)
    r = root / "unlinked-while-written"
    fd = os.open(r, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, data[:3 * MiB])
    os.unlink(r)
    os.write(fd, data[3 * MiB:])
    out.append(sha(os.pread(fd, len(data), 0)))
    os.close(fd)
    settle(root)
    out.append(sha((root / "q2").read_bytes()))
    out.append(sorted(os.listdir(root)))

    t = root / "rewritten"
    t.write_bytes(data)
    settle(root)
    with open(t, "r+b") as f:  # a stored file grown again from its middle
        f.seek(2 * MiB)
        f.write(more)
    settle(root)
    out.append(sha(t.read_bytes()))
    fd = os.open(t, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, data[:2 * MiB])
    os.close(fd)
    settle(root)
    out.append(sha(t.read_bytes()))
    return out


def test_growing_files_with_front_ingest_match_ext4(tmp_path: Path, mounted: Mounted) -> None:
    run_hubfs("umount", str(mounted.path))
    mount_store(mounted.store, mounted.path, "--ingest-step-mib", "1")  # store fronts often
    on_ext4_and_mount(tmp_path, mounted, growing_files_scenario)
    local = tree(tmp_path / "ext4", times=False, inos=False)
    assert tree(mounted.path, times=False, inos=False) == local
    remount(mounted)
    assert tree(mounted.path, times=False, inos=False) == local


def test_o_trunc_truncates_a_file_being_written(mounted: Mounted) -> None:
    """Pins a bug this suite found: O_TRUNC was ignored when the file already had staging,
    because another fd was writing it or because its last close was still being committed
    (vfs.FileSystem.open reused the staging untruncated)."""
    p = mounted.path / "log"
    first = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(first, b"hello world")
    second = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.write(second, b"hi")
    os.close(second)
    os.close(first)
    assert p.read_bytes() == b"hi"
    q = mounted.path / "config"
    seen = []
    for _ in range(20):  # `echo hello world > f; echo hi > f`
        with open(q, "wb") as f:
            f.write(b"hello world\n")
        with open(q, "wb") as f:
            f.write(b"hi\n")
        seen.append(q.read_bytes())
    assert seen == [b"hi\n"] * 20
    remount(mounted)
    assert (p.read_bytes(), q.read_bytes()) == (b"hi", b"hi\n")


def crash_and_remount(mounted: Mounted) -> None:
    """Kill the daemon (as a crash or the OOM killer would), clear the dead mount, mount again:
    the new daemon recovers what the old one left in staging."""
    pid = int((mounted.store / "lock").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run(["fusermount3", "-uz", str(mounted.path)], check=True)
    mount_store(mounted.store, mounted.path)


@pytest.mark.allow_warnings  # the new daemon logs what it recovered
def test_fsync_survives_daemon_crash(mounted: Mounted) -> None:
    m = mounted.path
    run_hubfs("umount", str(m))
    mount_store(mounted.store, m, "--ingest-step-mib", "1")  # the download's front gets stored
    (m / "stored").write_bytes(b"s" * MiB)
    wait_committed(mounted)
    new = m / "new"
    fd_new = os.open(new, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd_new, b"fsynced bytes")
    os.fsync(fd_new)
    fd_old = os.open(m / "stored", os.O_WRONLY)
    os.pwrite(fd_old, b"PATCH", 1000)
    os.fsync(fd_old)
    download = random.Random(9).randbytes(5 * MiB)
    fd_dl = os.open(m / "download", os.O_CREAT | os.O_WRONLY, 0o644)
    for off in range(0, len(download), 256 * 1024):
        os.write(fd_dl, download[off:off + 256 * 1024])
    os.fsync(fd_dl)
    crash_and_remount(mounted)
    for fd in (fd_new, fd_old, fd_dl):
        with contextlib.suppress(OSError):
            os.close(fd)  # ENOTCONN: the old mount is gone
    assert new.read_bytes() == b"fsynced bytes"
    assert (m / "stored").read_bytes() == b"s" * 1000 + b"PATCH" + b"s" * (MiB - 1005)
    assert sha((m / "download").read_bytes()) == sha(download)


@pytest.mark.allow_warnings  # the new daemon logs what it recovered
def test_o_trunc_during_first_write_to_stored_file(mounted: Mounted) -> None:
    """Pins a bug this suite found: an O_TRUNC open while a write copies the stored content into
    staging: both threads of vfs._staging_for_write create the same staging path; the loser's
    discard unlinks the winner's file, so its data, even fsynced, is not recovered after a
    crash.
    """
    p = mounted.path / "big"
    p.write_bytes(random.Random(3).randbytes(24 * MiB))
    wait_committed(mounted)
    staging = mounted.store / "staging"

    def write_one_byte() -> None:  # the first write copies 24 MiB into staging
        fd = os.open(p, os.O_WRONLY)
        os.pwrite(fd, b"X", 0)
        os.close(fd)

    writer = threading.Thread(target=write_one_byte)
    writer.start()
    deadline = time.monotonic() + 10
    while not any(staging.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.001)
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)  # while the copy runs
    writer.join(30)
    os.write(fd, b"new data")
    os.fsync(fd)
    assert p.read_bytes() == b"new data"
    crash_and_remount(mounted)
    with contextlib.suppress(OSError):
        os.close(fd)
    assert p.read_bytes() == b"new data"


def test_read_while_commit_finishes(mounted: Mounted) -> None:
    """Pins a bug this suite found: a read served from staging races the commit that closes the
    staging fd (vfs.FileSystem.read takes state.staging without the lock; commit discards it
    after dropping the lock): EBADF, EIO to the reader.
    """
    # Read a file right after closing it, while the daemon ingests it. O_DIRECT sends every
    # read to the daemon instead of the page cache.
    data = random.Random(5).randbytes(4 * MiB)
    buf = mmap.mmap(-1, 128 * 1024)
    failures: list[str] = []
    deadline = time.monotonic() + 2
    rounds = 0
    while not failures and time.monotonic() < deadline:
        p = mounted.path / f"r{rounds % 3}"
        rounds += 1
        with open(p, "wb") as f:
            f.write(data)
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            while any((mounted.store / "staging").iterdir()) and not failures:
                for off in range(0, len(data), len(buf)):
                    try:
                        n = os.preadv(fd, [buf], off)
                    except OSError as exc:
                        failures.append(f"round {rounds} offset {off}: {exc}")
                        break
                    if buf[:n] != data[off:off + n]:
                        failures.append(f"round {rounds} offset {off}: wrong bytes")
                        break
        finally:
            os.close(fd)
    log_lines = [line for line in mounted.log().splitlines() if " ERROR " in line]
    assert not failures and not log_lines, (failures, log_lines[:3])


def test_close_during_commit_is_committed(mounted: Mounted) -> None:
    """Pins a bug this suite found: a file closed while its previous commit is still running is
    never committed (vfs.FileSystem.commit returns at once when `committing`; the running
    commit sees a newer generation and keeps the staging), so it stays in staging until
    unmount.
    """
    for i in range(4):
        p = mounted.path / f"f{i}"
        p.write_bytes(os.urandom(2 * MiB))  # close: its commit starts
        with open(p, "r+b") as f:  # write and close again while that commit runs
            f.write(b"second")
    deadline = time.monotonic() + 3
    while any((mounted.store / "staging").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(e.name for e in (mounted.store / "staging").iterdir()) == []


# -- attributes
def attrs_scenario(root: Path) -> list[Any]:
    old_umask = os.umask(0o022)
    try:
        out: list[Any] = []

        def st(path: Path) -> tuple[int, int, int, int, int, int]:
            s = os.lstat(path)
            size = 0 if stat.S_ISDIR(s.st_mode) else s.st_size
            return (s.st_mode, s.st_uid, s.st_gid, s.st_nlink, size, s.st_rdev)

        f = root / "file"
        fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o666)  # umask applies
        os.write(fd, b"12345")
        out.append(st(f))
        os.close(fd)
        os.chmod(f, 0o4751)
        out.append(st(f))
        os.chown(f, 1234, 5678)  # root's chown of a regular file drops set-user-ID
        out.append(st(f))
        os.chown(f, -1, 42)
        out.append(st(f))
        os.chmod(f, 0o6777)
        out.append(st(f))
        with open(f, "ab") as h:  # root's write does not drop the bits (it has CAP_FSETID)
            h.write(b"6")
        out.append(st(f))
        os.chmod(f, 0o1000)
        out.append(st(f))

        d = root / "dir"
        d.mkdir(0o777)
        out.append(st(d))
        (d / "sub1").mkdir()
        (d / "sub2").mkdir()
        (d / "plain").touch()
        out.append(st(d))  # nlink = 2 + subdirectories
        os.rmdir(d / "sub1")
        out.append(st(d))
        os.chown(d, 1000, 2000)
        os.chmod(d, 0o2775)  # setgid directory hands down its group
        (d / "inherit").touch()
        (d / "inheritdir").mkdir()
        out.append((st(d), st(d / "inherit"), st(d / "inheritdir")))
        os.mknod(d / "node")  # a regular file by mknod
        out.append(st(d / "node"))
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
        os.symlink("file", root / "link")
        out.append([st(root / n) for n in ("fifo", "chr", "blk", "link")])
        os.chown(root / "link", 77, 88, follow_symlinks=False)
        out.append((st(root / "link"), st(f)))
        out.append(attempt(os.chmod, root / "missing", 0o600))
        return out
    finally:
        os.umask(old_umask)


def test_modes_owners_nlink_match_ext4(tmp_path: Path, mounted: Mounted) -> None:
    on_ext4_and_mount(tmp_path, mounted, attrs_scenario)
    local = tree(tmp_path / "ext4", times=False, inos=False)
    assert tree(mounted.path, times=False, inos=False) == local
    remount(mounted)
    assert tree(mounted.path, times=False, inos=False) == local


def test_timestamps(mounted: Mounted) -> None:
    m = mounted.path
    f = m / "f"
    f.write_bytes(b"data")
    wait_committed(mounted)

    os.utime(f, ns=(1_234_567_890_123_456_789, 987_654_321_987_654_321))
    s = os.stat(f)
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_234_567_890_123_456_789, 987_654_321_987_654_321)
    os.utime(f, ns=(-1_500_000_000, -2_000_000_001))  # before 1970
    s = os.stat(f)
    assert (s.st_atime_ns, s.st_mtime_ns) == (-1_500_000_000, -2_000_000_001)
    before = time.time_ns()
    os.utime(f)  # now
    s = os.stat(f)
    assert before - 10**7 <= s.st_mtime_ns <= time.time_ns()
    assert before - 10**7 <= s.st_atime_ns <= time.time_ns()

    def changed(action: Callable[[], Any], path: Path = f) -> tuple[bool, bool]:
        wait_committed(mounted)  # see test_utime_right_after_close_survives_remount
        os.utime(path, ns=(10**18, 10**18))
        old = os.lstat(path)
        time.sleep(0.01)
        action()
        new = os.lstat(path)
        assert new.st_ctime_ns <= time.time_ns()
        return new.st_mtime_ns != old.st_mtime_ns, new.st_ctime_ns != old.st_ctime_ns

    def write() -> None:
        with open(f, "r+b") as h:
            h.write(b"x")

    # Two bugs this suite found: a write did not change ctime, an O_TRUNC open not mtime.
    assert changed(write) == (True, True)
    assert changed(lambda: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))) == (True, True)
    assert os.stat(f).st_size == 0
    with open(f, "r+b") as h:  # while the file is open: ctime follows mtime
        h.write(b"yy")
        h.flush()
        during = os.fstat(h.fileno())
        assert during.st_ctime_ns >= during.st_mtime_ns
    assert changed(lambda: os.chmod(f, 0o600)) == (False, True)
    assert changed(lambda: os.chown(f, 4242, 4343)) == (False, True)
    assert changed(lambda: os.truncate(f, 1)) == (True, True)
    assert changed(lambda: os.setxattr(f, "user.k", b"v")) == (False, True)
    assert changed(lambda: os.link(f, m / "f2")) == (False, True)
    assert changed(lambda: os.rename(m / "f2", m / "f3")) == (False, True)
    assert changed(lambda: f.read_bytes()) == (False, False)
    assert changed(lambda: os.stat(f)) == (False, False)
    # Directory times follow changes of their entries.
    d = m / "d"
    d.mkdir()
    assert changed(lambda: (d / "new").touch(), d) == (True, True)
    assert changed(lambda: os.rename(d / "new", d / "renamed"), d) == (True, True)
    assert changed(lambda: os.unlink(d / "renamed"), d) == (True, True)
    assert changed(lambda: os.mkdir(d / "sub"), d) == (True, True)
    assert changed(lambda: os.rmdir(d / "sub"), d) == (True, True)
    assert changed(lambda: os.symlink("x", d / "sl"), d) == (True, True)
    assert changed(lambda: os.listdir(d), d) == (False, False)
    # utime while the file is open for writing sticks when no write follows
    with open(f, "r+b") as h:
        h.write(b"abc")
        h.flush()
        os.utime(f, ns=(5 * 10**17, 5 * 10**17))
        assert os.fstat(h.fileno()).st_mtime_ns == 5 * 10**17
    wait_committed(mounted)
    assert os.stat(f).st_mtime_ns == 5 * 10**17
    remount(mounted)
    assert os.stat(f).st_mtime_ns == 5 * 10**17


def test_utime_right_after_close_survives_remount(mounted: Mounted) -> None:
    """Pins a bug this suite found: a commit racing os.utime right after close overwrites the new
    mtime with the staging's (vfs.FileSystem.commit writes the mtime it read before ingesting).
    """
    # What cp -p, rsync, tar and pip do: write, close, set the times.
    for i in range(20):
        p = mounted.path / f"f{i}"
        p.write_bytes(os.urandom(300_000))
        os.utime(p, ns=(10**18 + i, 10**18 + i))
    remount(mounted)
    assert [os.stat(mounted.path / f"f{i}").st_mtime_ns for i in range(20)] == [
        10**18 + i for i in range(20)]


def test_utime_while_open_for_writing_holds(tmp_path: Path, mounted: Mounted) -> None:
    """A utime while the writer still has the file open: the kernel wrote the bytes straight
    into the staging file (passthrough), whose mtime those writes moved; the utime's time
    must win over it, at once and once stored (a bug: the next look at the staging file took
    the writes' time back)."""

    def scenario(root: Path) -> list[int]:
        out = []
        for i in range(5):
            path = root / f"f{i}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"x" * 1000)
                os.utime(path, ns=(10**18 + i, 10**18 + i))
                out.append(os.stat(path).st_mtime_ns)
            finally:
                os.close(fd)
        settle(root)
        return out + [os.stat(root / f"f{i}").st_mtime_ns for i in range(5)]

    assert on_ext4_and_mount(tmp_path, mounted, scenario)[0] == 10**18
    remount(mounted)
    assert [os.stat(mounted.path / f"f{i}").st_mtime_ns for i in range(5)] == [
        10**18 + i for i in range(5)]


# -- directories and names
def namespace_scenario(root: Path) -> list[Any]:
    out: list[Any] = []
    a, b = root / "a", root / "b"
    a.mkdir()
    (a / "sub").mkdir()
    (a / "sub" / "f").write_bytes(b"f")
    b.mkdir()
    (root / "file").write_bytes(b"file")
    (root / "other").write_bytes(b"other")
    (root / "empty").mkdir()
    (root / "empty2").mkdir()
    (root / "full").mkdir()
    (root / "full" / "x").touch()
    out.append(attempt(os.mkdir, a))
    out.append(attempt(os.mkdir, root / "missing" / "x"))
    out.append(attempt(os.mkdir, root / "file" / "x"))
    out.append(attempt(os.rmdir, a))
    out.append(attempt(os.rmdir, root / "file"))
    out.append(attempt(os.rmdir, root / "missing"))
    out.append(attempt(os.unlink, a))
    out.append(attempt(os.unlink, root / "missing"))
    out.append(attempt(os.listdir, root / "file"))
    out.append(attempt(os.rename, a, a / "sub" / "into"))  # into its own subdirectory
    out.append(attempt(os.rename, a, a / "self"))
    out.append(attempt(os.rename, root / "file", a))  # file over directory
    out.append(attempt(os.rename, a, root / "file"))  # directory over file
    out.append(attempt(os.rename, b, root / "full"))  # over a non-empty directory
    out.append(attempt(os.rename, root / "missing", root / "x"))
    out.append(attempt(os.link, a, root / "dirlink"))
    out.append(attempt(os.link, root / "file", root / "other"))
    out.append(attempt(os.symlink, "t", root / "file"))
    out.append(attempt(os.rename, b, root / "empty"))  # over an empty directory
    out.append(attempt(os.rename, root / "other", root / "file"))  # over a file
    out.append(attempt(os.rename, root / "file", root / "file"))
    out.append(attempt(os.rename, root / "file", a / "sub" / "moved"))
    out.append(attempt(os.rename, a / "sub", root / "sub"))  # directory to another parent
    out.append(attempt(os.rename, root / "empty2", root / "sub" / "nested"))
    # renameat2
    (root / "p").write_bytes(b"p")
    (root / "q").write_bytes(b"q")
    out.append(attempt(renameat2, root / "p", root / "q", RENAME_NOREPLACE))
    out.append(attempt(renameat2, root / "p", root / "r", RENAME_NOREPLACE))
    out.append(attempt(renameat2, root / "r", root / "q", RENAME_EXCHANGE))
    out.append(((root / "r").read_bytes(), (root / "q").read_bytes()))
    out.append(attempt(renameat2, root / "r", root / "nope", RENAME_EXCHANGE))
    out.append(attempt(renameat2, root / "q", root / "sub", RENAME_EXCHANGE))  # file <-> dir
    out.append(attempt(renameat2, root / "q", root / "empty" / "q2", RENAME_EXCHANGE))
    out.append(attempt(renameat2, root / "sub", root / "sub" / "nested", RENAME_EXCHANGE))
    (root / "empty" / "inner").mkdir()
    out.append(attempt(renameat2, root / "empty", root / "a", RENAME_EXCHANGE))  # two dirs
    out.append(attempt(renameat2, root / "r", root / "q",
                       RENAME_EXCHANGE | RENAME_NOREPLACE))
    out.append(sorted(os.listdir(root)))
    for d in ("a", "empty", "q", "sub"):
        out.append((d, os.lstat(root / d).st_nlink, sorted(os.listdir(root / d))
                    if (root / d).is_dir() else None))
    out.append(attempt(os.rmdir, root / "a" / "inner"))
    out.append(os.lstat(root / "a").st_nlink)
    return out


def test_mkdir_rmdir_rename_match_ext4(tmp_path: Path, mounted: Mounted) -> None:
    on_ext4_and_mount(tmp_path, mounted, namespace_scenario)
    local = tree(tmp_path / "ext4", times=False, inos=False)
    assert tree(mounted.path, times=False, inos=False) == local
    remount(mounted)
    assert tree(mounted.path, times=False, inos=False) == local


NAMES = [b"a" * 255, "é".encode() * 127 + b"x", b"with space", b"new\nline", b"tab\tname",
         b" lead", b"trail ", b"-dash", b".hidden", b"..dots", b"back\\slash", b"q'\"`$(x)",
         "emoji-😀".encode(), "日本語のファイル".encode(), b"\xff\xfe-not-utf8", b"bad\x80utf8",
         b"\x01ctrl", b"*?[glob]", b"CASE", b"case"]


def names_scenario(root: Path) -> list[Any]:
    out: list[Any] = []
    base = os.fsencode(root)
    for name in NAMES:
        full = os.path.join(base, name)
        with open(full, "wb") as f:
            f.write(name)
        out.append(attempt(os.mkdir, os.path.join(base, b"d-" + name[:250])))
    settle(root)
    out.append(sorted(os.listdir(base)))
    out.append(sorted(e.name for e in os.scandir(base)))
    out.append([Path(os.fsdecode(os.path.join(base, n))).read_bytes() == n for n in NAMES])
    long = b"n" * 256
    for op in (lambda p: os.open(p, os.O_CREAT | os.O_WRONLY), os.mkdir,
               lambda p: os.symlink(b"t", p), lambda p: os.link(os.path.join(base, NAMES[2]), p),
               lambda p: os.rename(os.path.join(base, NAMES[2]), p), os.mknod):
        out.append(attempt(op, os.path.join(base, long)))
    # lookups of an overlong name (hubfs said ENOENT: a bug this suite found)
    out += [attempt(os.stat, os.path.join(base, long)),
            attempt(os.open, os.path.join(base, long), os.O_RDONLY),
            attempt(os.unlink, os.path.join(base, long))]
    out.append(attempt(os.mkdir, os.path.join(base, "é".encode() * 128)))
    out.append(attempt(os.rename, os.path.join(base, NAMES[2]), os.path.join(base, b"b" * 255)))
    out.append(attempt(os.symlink, b"/" + b"x" * 4000, os.path.join(base, b"longtarget")))
    out.append(len(os.readlink(os.path.join(base, b"longtarget"))))
    out.append(sorted(os.listdir(base)))
    return out


def test_names_match_ext4(tmp_path: Path, mounted: Mounted) -> None:
    on_ext4_and_mount(tmp_path, mounted, names_scenario)


def readdir_scenario(root: Path) -> list[Any]:
    d = root / "many"
    d.mkdir()
    originals = [f"f{i:04d}" for i in range(1000)]
    for name in originals:
        os.mknod(d / name)
    assert sorted(os.listdir(d)) == originals
    removed = set(originals[::10])
    added = [f"new{i:03d}" for i in range(100)]
    seen: list[str] = []
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 300:  # mid-listing: remove seen and unseen entries, add new ones
                for name in removed:
                    os.unlink(d / name)
                for name in added:
                    os.mknod(d / name)
    untouched = set(originals) - removed
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    missing = sorted(untouched - set(seen))
    strangers = sorted(set(seen) - set(originals) - set(added))
    listing = sorted(os.listdir(d))
    assert listing == sorted(untouched | set(added))
    return [dupes, missing, strangers, len(listing)]


def test_readdir_many_entries_changing_during_listing(tmp_path: Path,
                                                      mounted: Mounted) -> None:
    assert on_ext4_and_mount(tmp_path, mounted, readdir_scenario) == [[], [], [], 1000]


def test_readdir_lists_exactly_the_entries(tmp_path: Path, mounted: Mounted) -> None:
    def scenario(root: Path) -> list[Any]:
        (root / "d").mkdir()
        (root / "f").write_bytes(b"x")
        os.symlink("f", root / "l")
        os.mkfifo(root / "p")
        os.link(root / "f", root / "h")
        (root / "gone").touch()
        os.unlink(root / "gone")
        (root / "d" / "inner").touch()
        listing = sorted((e.name, e.is_dir(follow_symlinks=False),
                          e.is_file(follow_symlinks=False), e.is_symlink())
                         for e in os.scandir(root))
        by_ino = {e.name: e.inode() == os.lstat(e.path).st_ino for e in os.scandir(root)}
        (root / "e").mkdir()
        return [listing, by_ino, os.listdir(root / "e"), os.listdir(root / "d")]

    on_ext4_and_mount(tmp_path, mounted, scenario)


def test_unlink_open_file(mounted: Mounted) -> None:
    p = mounted.path / "victim"
    data = os.urandom(3 * MiB)
    p.write_bytes(data)
    wait_committed(mounted)
    logical = mounted.stats()["logical_bytes"]
    rw = os.open(p, os.O_RDWR)
    ro = os.open(p, os.O_RDONLY)
    os.unlink(p)
    assert not p.exists() and "victim" not in os.listdir(mounted.path)
    assert os.fstat(rw).st_nlink == 0
    assert os.pread(ro, MiB, MiB) == data[MiB:2 * MiB]
    os.pwrite(rw, b"after unlink", 10)
    os.write(rw, b"!")  # at the fd's position, 0
    assert os.pread(ro, 30, 0) == b"!" + data[1:10] + b"after unlink" + data[22:30]
    assert os.fstat(rw).st_size == len(data)
    p.write_bytes(b"a new file under the old name")  # independent of the open one
    assert os.pread(ro, 5, 10) == b"after"
    os.close(ro)
    os.close(rw)
    assert p.read_bytes() == b"a new file under the old name"
    deadline = time.monotonic() + 10
    while mounted.stats()["logical_bytes"] != logical - len(data) + 29:
        assert time.monotonic() < deadline, "the unlinked file's content was never released"
        time.sleep(0.05)
    # unlink while a new file is still being written: closing must not bring it back
    q = mounted.path / "tmpfile"
    fd = os.open(q, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"scratch" * 1000)
    os.unlink(q)
    os.write(fd, b"more")
    os.close(fd)
    wait_committed(mounted)
    assert sorted(os.listdir(mounted.path)) == ["victim"]


def test_unlinked_file_keeps_its_data_for_other_fds(mounted: Mounted) -> None:
    """Pins a bug this suite found: when the writer of an unlinked file closes, its data vanishes
    for fds still open (vfs.FileSystem.commit discards the staging of an inode with no names
    although other handles still read it).
    """
    p = mounted.path / "tmp"
    data = os.urandom(MiB)
    p.write_bytes(data)
    wait_committed(mounted)
    rw = os.open(p, os.O_RDWR)
    ro = os.open(p, os.O_RDONLY | os.O_DIRECT)  # O_DIRECT: every read reaches the daemon
    os.unlink(p)
    os.pwrite(rw, b"after unlink", 4096)
    buf = mmap.mmap(-1, 8192)
    os.preadv(ro, [buf], 0)
    assert buf[4096:4108] == b"after unlink"
    os.close(rw)  # the file lives on while ro is open
    deadline = time.monotonic() + 0.5
    while any((mounted.store / "staging").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)  # let the daemon finish with the writer's close
    os.preadv(ro, [buf], 0)
    os.close(ro)
    assert buf[4096:4108] == b"after unlink"


def test_rename_directories_with_open_files(mounted: Mounted) -> None:
    m = mounted.path
    (m / "a" / "b").mkdir(parents=True)
    (m / "c").mkdir()
    stored = os.urandom(2 * MiB)
    (m / "a" / "b" / "stored").write_bytes(stored)
    wait_committed(mounted)
    reader = os.open(m / "a" / "b" / "stored", os.O_RDONLY)
    writer = os.open(m / "a" / "b" / "new", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(writer, b"before")
    os.rename(m / "a", m / "c" / "a2")
    assert not (m / "a").exists()
    assert os.listdir(m / "c" / "a2" / "b") == ["stored", "new"]
    assert os.pread(reader, 100, MiB) == stored[MiB:MiB + 100]
    os.write(writer, b"+after")
    assert (m / "c" / "a2" / "b" / "new").read_bytes() == b"before+after"
    os.rename(m / "c" / "a2" / "b", m / "b-top")  # move the inner dir up, files still open
    os.write(writer, b"+again")
    os.close(writer)
    assert os.pread(reader, 10, 0) == stored[:10]
    os.close(reader)
    # rename a file over one that is open
    (m / "target").write_bytes(b"target")
    held = os.open(m / "target", os.O_RDONLY)
    os.rename(m / "b-top" / "new", m / "target")
    assert os.pread(held, 100, 0) == b"target"
    os.close(held)
    wait_committed(mounted)  # see test_read_while_commit_finishes
    assert (m / "target").read_bytes() == b"before+after+again"
    assert (m / "b-top" / "stored").read_bytes() == stored
    assert sorted(os.listdir(m)) == ["b-top", "c", "target"]
    assert os.listdir(m / "c" / "a2") == []
    assert [os.lstat(m / d).st_nlink for d in ("c", "c/a2", "b-top")] == [3, 2, 2]
    remount(mounted)
    assert (m / "target").read_bytes() == b"before+after+again"
    assert (m / "b-top" / "stored").read_bytes() == stored


def test_symlinks(tmp_path: Path, mounted: Mounted) -> None:
    def scenario(root: Path) -> list[Any]:
        (root / "dir").mkdir()
        (root / "dir" / "f").write_bytes(b"through the link")
        os.symlink("dir/f", root / "rel")
        os.symlink("../dir", root / "dir" / "up")
        os.symlink(str(root / "dir" / "f"), root / "abs")
        os.symlink("nowhere", root / "dangling")
        os.symlink("loop", root / "loop")
        settle(root)
        out: list[Any] = [os.readlink(root / n) == t for n, t in
               (("rel", "dir/f"), ("abs", str(root / "dir" / "f")), ("dangling", "nowhere"))]
        out.append([(root / n).read_bytes() for n in ("rel", "abs")])
        out.append((root / "dir" / "up" / "up" / "f").read_bytes())
        out.append(attempt(os.stat, root / "dangling"))
        out.append(attempt(os.stat, root / "loop"))
        s = os.lstat(root / "rel")
        out.append((stat.S_ISLNK(s.st_mode), stat.S_IMODE(s.st_mode), s.st_size))
        out.append(attempt(os.readlink, root / "dir" / "f"))
        out.append(attempt(os.open, root / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        fd = os.open(root / "dangling", os.O_CREAT | os.O_WRONLY, 0o644)  # creates the target
        os.write(fd, b"made")
        os.close(fd)
        settle(root)
        out.append((root / "nowhere").read_bytes())
        os.rename(root / "rel", root / "dir" / "moved")  # relative target now dangles
        out.append(attempt(os.stat, root / "dir" / "moved"))
        out.append(os.readlink(root / "dir" / "moved"))
        os.link(root / "abs", root / "abs-hard", follow_symlinks=False)
        out.append(os.lstat(root / "abs").st_nlink)
        os.unlink(root / "abs")
        out.append(os.readlink(root / "abs-hard") == str(root / "dir" / "f"))
        return out

    on_ext4_and_mount(tmp_path, mounted, scenario)


def test_hard_links(mounted: Mounted) -> None:
    m = mounted.path
    (m / "d1").mkdir()
    (m / "d2").mkdir()
    a, b, c = m / "d1" / "a", m / "d2" / "b", m / "c"
    a.write_bytes(b"one")
    os.link(a, b)
    os.link(b, c)
    assert len({os.stat(p).st_ino for p in (a, b, c)}) == 1
    assert [os.stat(p).st_nlink for p in (a, b, c)] == [3, 3, 3]
    with open(b, "r+b") as f:  # a write through one name shows through the others at once
        f.write(b"TWO")
        f.flush()
        assert a.read_bytes() == b"TWO" and c.read_bytes() == b"TWO"
        f.write(b"-longer")
    wait_committed(mounted)  # see test_read_while_commit_finishes
    assert a.read_bytes() == b"TWO-longer" and os.stat(c).st_size == 10
    os.setxattr(a, "user.shared", b"yes")
    assert os.getxattr(c, "user.shared") == b"yes"
    os.rename(c, b)  # two names of one inode: rename does nothing
    assert c.exists() and b.exists()
    os.unlink(a)
    assert not a.exists()
    assert [os.stat(p).st_nlink for p in (b, c)] == [2, 2]
    assert b.read_bytes() == b"TWO-longer"
    os.truncate(c, 3)
    wait_committed(mounted)
    assert b.read_bytes() == b"TWO"
    ino = os.stat(b).st_ino
    remount(mounted)
    assert [os.stat(p).st_ino for p in (b, c)] == [ino, ino]
    assert [os.stat(p).st_nlink for p in (b, c)] == [2, 2]
    os.unlink(c)
    assert os.stat(b).st_nlink == 1 and b.read_bytes() == b"TWO"


def test_fifo_and_devices(mounted: Mounted) -> None:
    fifo = mounted.path / "pipe"
    os.mkfifo(fifo, 0o600)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    data = os.urandom(2 * MiB)  # more than a pipe buffer: the two sides must interleave
    code = "import sys,hashlib;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())"
    reader = subprocess.Popen([*PY_CHILD, code, str(fifo)], stdout=subprocess.PIPE, text=True)
    try:
        with open(fifo, "wb") as f:
            f.write(data)
        out, _ = reader.communicate(timeout=20)
    finally:
        reader.kill()
    assert out.strip() == sha(data)
    # and between two threads of one process
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    t.start()
    with open(fifo, "wb") as f:
        f.write(b"x" * 100_000)
    t.join(20)
    assert got == [b"x" * 100_000]
    os.mknod(mounted.path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    s = os.stat(mounted.path / "null")
    assert stat.S_ISCHR(s.st_mode) and s.st_rdev == os.makedev(1, 3)
    remount(mounted)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.stat(mounted.path / "null").st_rdev == os.makedev(1, 3)


def test_statfs(mounted: Mounted) -> None:
    vfs = os.statvfs(mounted.path)
    disk = os.statvfs(mounted.store)
    assert vfs.f_namemax == 255
    assert vfs.f_bsize > 0 and vfs.f_frsize > 0
    free, real = vfs.f_bavail * vfs.f_frsize, disk.f_bavail * disk.f_frsize
    assert abs(free - real) < 0.01 * real + 64 * MiB
    assert vfs.f_blocks * vfs.f_frsize == disk.f_blocks * disk.f_frsize
    assert vfs.f_bfree >= vfs.f_bavail


# -- extended attributes
def xattr_scenario(root: Path) -> list[Any]:
    f = root / "f"
    f.write_bytes(b"x")
    (root / "d").mkdir()
    os.symlink("f", root / "l")
    out: list[Any] = []
    out.append(os.listxattr(f))
    out.append(attempt(os.getxattr, f, "user.missing"))
    out.append(attempt(os.removexattr, f, "user.missing"))
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "user.bin", bytes(range(256)) + b"\0tail")
    os.setxattr(f, "trusted.root-only", b"t")
    os.setxattr(root / "d", "user.ondir", b"dir")
    out.append(sorted(os.listxattr(f)))
    out.append([os.getxattr(f, n) for n in ("user.a", "user.empty", "user.bin",
                                            "trusted.root-only")])
    out.append(attempt(os.setxattr, f, "user.a", b"2", os.XATTR_CREATE))
    out.append(attempt(os.setxattr, f, "user.new", b"2", os.XATTR_REPLACE))
    out.append(attempt(os.setxattr, f, "user.a", b"replaced", os.XATTR_REPLACE))
    out.append(attempt(os.setxattr, f, "user.c", b"created", os.XATTR_CREATE))
    out.append(os.getxattr(f, "user.a"))
    out.append(attempt(os.setxattr, root / "l", "user.x", b"1", follow_symlinks=False))
    out.append(os.getxattr(root / "l", "user.a"))  # follows the link to f
    out.append(os.listxattr(root / "d"))
    out.append(attempt(os.setxattr, f, "user." + "n" * 250, b"v"))  # 255-byte name
    out.append(attempt(os.setxattr, f, "user." + "n" * 251, b"v"))  # 256: too long
    # names outside the known namespaces (hubfs took them: a bug this suite found)
    out.append(attempt(os.setxattr, f, "nonamespace", b"v"))
    out.append(attempt(os.setxattr, f, "bogus.name", b"v"))
    out.append(attempt(os.getxattr, f, "bogus.name"))
    os.removexattr(f, "user.a")
    out.append(attempt(os.getxattr, f, "user.a"))
    out.append(sorted(os.listxattr(f)))
    fd = os.open(f, os.O_RDONLY)
    os.setxattr(fd, "user.byfd", b"fd")
    out.append(os.getxattr(fd, "user.byfd"))
    os.close(fd)
    return out


def test_xattrs_match_ext4(tmp_path: Path, mounted: Mounted) -> None:
    on_ext4_and_mount(tmp_path, mounted, xattr_scenario)
    f = mounted.path / "f"
    big = os.urandom(65536)  # the kernel's limit; ext4 stores this little
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.big") == big
    assert attempt(os.setxattr, f, "user.big2", big + b"x") == "E2BIG"
    local = tree(tmp_path / "ext4", times=False, inos=False)
    wait_committed(mounted)
    before = os.stat(f).st_ctime_ns
    time.sleep(0.01)
    os.removexattr(f, "user.big")  # changes ctime (hubfs did not: a bug this suite found)
    remount(mounted)  # the kernel bumps its cached ctime itself; the daemon's copy lasts
    assert os.stat(f).st_ctime_ns > before
    assert tree(mounted.path, times=False, inos=False) == local


NOBODY = 65534
# security.capability, VFS_CAP_REVISION_2: CAP_NET_BIND_SERVICE permitted
FILE_CAPS = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)


def as_nobody(action: Callable[[], Any]) -> None:
    """Run ``action`` in a child that gave up root (and with it CAP_FSETID)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            action()
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def privilege_scenario(root: Path) -> list[tuple[str, str, Any]]:
    """setuid/setgid bits and file capabilities after writes, truncates and chowns by root and
    by another user, through descriptors root opened."""
    cases: list[tuple[str, int, str, Callable[[int, Path], Any]]] = [
        ("write-root", 0o6777, "", lambda fd, p: os.write(fd, b"y")),
        ("write-root-caps", 0o6777, "caps", lambda fd, p: os.write(fd, b"y")),
        ("write-user", 0o6777, "", lambda fd, p: as_nobody(lambda: os.write(fd, b"y"))),
        ("write-user-sgid-nox", 0o2767, "", lambda fd, p: as_nobody(lambda: os.write(fd, b"y"))),
        ("write-user-caps", 0o0666, "caps", lambda fd, p: as_nobody(lambda: os.write(fd, b"y"))),
        ("ftruncate-root", 0o6777, "caps", lambda fd, p: os.ftruncate(fd, 3)),
        ("ftruncate-user", 0o6777, "", lambda fd, p: as_nobody(lambda: os.ftruncate(fd, 3))),
        ("truncate-root", 0o6777, "", lambda fd, p: os.truncate(p, 2)),
        ("chown-root", 0o6777, "caps", lambda fd, p: os.chown(p, NOBODY, NOBODY)),
        ("chown-root-sgid-nox", 0o2767, "", lambda fd, p: os.chown(p, NOBODY, -1)),
        ("o-trunc-root", 0o6777, "caps",
         lambda fd, p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))),
    ]
    out: list[tuple[str, str, Any]] = []
    for name, mode, extra, action in cases:
        path = root / name
        path.write_bytes(b"hello")
        settle(root)
        os.chmod(path, mode)
        if extra == "caps":
            os.setxattr(path, "security.capability", FILE_CAPS)
        fd = os.open(path, os.O_WRONLY)
        try:
            action(fd, path)
        finally:
            os.close(fd)
        settle(root)
        st = os.stat(path)
        out.append((name, oct(stat.S_IMODE(st.st_mode)),
                    attempt(os.getxattr, path, "security.capability")))
    d = root / "d"
    d.mkdir()
    os.chmod(d, 0o3777)
    os.chown(d, NOBODY, NOBODY)  # a directory keeps its bits
    out.append(("dir-chown", oct(stat.S_IMODE(os.stat(d).st_mode)), None))
    return out


def test_setuid_setgid_and_capabilities_dropped_as_ext4_drops_them(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The mount drops these itself (FUSE_HANDLE_KILLPRIV_V2, which spares a getxattr before
    each write): a write or truncate by a caller without CAP_FSETID drops setuid, and setgid
    when group-executable or the caller is not in the group; a chown drops them always; file
    capabilities go with any of these."""
    store = tmp_path / "store"
    Store.init(store)
    # --checked-reads: no passthrough, so every write reaches the daemon (the kernel-written
    # path has test_kernel_written_files_lose_privileges_as_on_ext4)
    mounted = mount_store(store, tmp_path / "mnt", "--allow-other", "--checked-reads")
    try:
        expected = on_ext4_and_mount(tmp_path, mounted, privilege_scenario)
        assert ("write-user", "0o777", "ENODATA") in expected  # ext4 did drop them
    finally:
        unmount_and_check(mounted, request)
    assert "killpriv v2: on" in mounted.log()


def kernel_written_privilege_scenario(root: Path) -> list[tuple[str, str, Any]]:
    """setuid/setgid bits and file capabilities of new files, which the kernel writes straight
    into their staging files (passthrough: no WRITE request), after writes by root and by
    another user through the creator's descriptor, and after ``chown(f, -1, -1)``."""
    cases: list[tuple[str, int, str, Callable[[int], Any]]] = [
        ("write-user", 0o6777, "", lambda fd: as_nobody(lambda: os.write(fd, b"by nobody"))),
        ("write-user-sgid-nox", 0o2767, "",
         lambda fd: as_nobody(lambda: os.write(fd, b"by nobody"))),
        ("write-user-caps", 0o0666, "caps",
         lambda fd: as_nobody(lambda: os.write(fd, b"by nobody"))),
        ("write-root", 0o6777, "", lambda fd: os.write(fd, b"by root")),
        ("write-root-caps", 0o6777, "caps", lambda fd: os.write(fd, b"by root")),
        ("fallocate-user", 0o6777, "",
         lambda fd: as_nobody(lambda: os.posix_fallocate(fd, 0, 8192))),
    ]
    out: list[tuple[str, str, Any]] = []
    for name, mode, extra, action in cases:
        path = root / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"first")  # the kernel has looked at this file once (S_NOSEC)
            os.fchmod(fd, mode)
            if extra == "caps":
                os.setxattr(fd, "security.capability", FILE_CAPS)
            action(fd)
            os.write(fd, b" then root")
            during = oct(stat.S_IMODE(os.fstat(fd).st_mode))
        finally:
            os.close(fd)
        settle(root)
        out.append((name, during, oct(stat.S_IMODE(os.stat(path).st_mode)),
                    attempt(os.getxattr, path, "security.capability"),
                    (root / name).read_bytes()))
    path = root / "chown-root-unchanged"
    path.write_bytes(b"x")
    os.chmod(path, 0o6755)
    os.chown(path, -1, -1)  # drops setuid even for root, as any chown does
    out.append(("chown-root-unchanged", oct(stat.S_IMODE(os.stat(path).st_mode)), None))
    return out


def test_kernel_written_files_lose_privileges_as_on_ext4(tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    """A file the kernel writes straight into its staging file (passthrough) sends no WRITE:
    the kernel's own check (file_remove_privs) must still drop setuid/setgid and capabilities
    as ext4 does, through the request it sends instead."""
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt", "--allow-other")
    try:
        expected = on_ext4_and_mount(tmp_path, mounted, kernel_written_privilege_scenario)
        assert expected[0][1] == "0o777"  # ext4 did drop them
    finally:
        unmount_and_check(mounted, request)
    assert "killpriv v2: on" in mounted.log()
    assert "reads: kernel-served" in mounted.log()


# -- concurrency
def test_threads_write_different_files(mounted: Mounted) -> None:
    blobs = {f"t{i}": random.Random(i).randbytes(3 * MiB + i) for i in range(8)}
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            with open(mounted.path / name, "wb") as f:
                data = blobs[name]
                for off in range(0, len(data), 64 * 1024):
                    f.write(data[off:off + 64 * 1024])
                    os.stat(mounted.path / name)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    wait_committed(mounted)  # see test_read_while_commit_finishes
    for name, data in blobs.items():
        assert sha((mounted.path / name).read_bytes()) == sha(data)


def test_two_fds_write_one_file_at_different_offsets(mounted: Mounted) -> None:
    block = 64 * 1024
    for existing in (False, True):
        p = mounted.path / f"shared-{existing}"
        if existing:
            p.write_bytes(b"." * 64 * block)
        else:
            p.touch()
        wait_committed(mounted)  # see test_close_during_commit_is_committed
        barrier = threading.Barrier(2)

        def write(parity: int, path: Path = p, barrier: threading.Barrier = barrier) -> None:
            fd = os.open(path, os.O_WRONLY)
            barrier.wait()
            for i in range(parity, 64, 2):
                os.pwrite(fd, bytes([65 + parity]) * block, i * block)
            os.close(fd)

        threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        wait_committed(mounted)  # see test_read_while_commit_finishes
        assert p.read_bytes() == (b"A" * block + b"B" * block) * 32
    remount(mounted)
    for existing in (False, True):
        assert (mounted.path / f"shared-{existing}").read_bytes() == (
            b"A" * block + b"B" * block) * 32


def test_concurrent_readers(mounted: Mounted) -> None:
    data = random.Random(11).randbytes(16 * MiB)
    p = mounted.path / "shared"
    p.write_bytes(data)
    wait_committed(mounted)
    bad: list[tuple[int, int]] = []

    def read(seed: int) -> None:
        rng = random.Random(seed)
        with open(p, "rb", buffering=0) as f:
            for _ in range(30):
                off, n = rng.randrange(len(data)), rng.randrange(1, 2 * MiB)
                if os.pread(f.fileno(), n, off) != data[off:off + n]:
                    bad.append((off, n))

    threads = [threading.Thread(target=read, args=(s,)) for s in range(8)]
    threads.append(threading.Thread(target=lambda: bad.extend(
        [(-1, -1)] if p.read_bytes() != data else [])))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert bad == []


# -- locks
LOCK_PROBE = r"""
import errno, fcntl, os, struct, sys
path, what = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
try:
    if what.startswith("flock"):
        op = {"flock_ex": fcntl.LOCK_EX, "flock_sh": fcntl.LOCK_SH}[what]
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        print("ok")
    elif what == "flock_wait":
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("ok")
    elif what == "getlk":
        res = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        kind, _, start, length, pid = struct.unpack("hhqqi4x", res)
        print(kind, start, length, pid)
    else:
        kind, start, length = what.split(":")
        op = {"w": fcntl.LOCK_EX, "r": fcntl.LOCK_SH}[kind]
        fcntl.lockf(fd, op | fcntl.LOCK_NB, int(length), int(start))
        print("ok")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def locks_scenario(root: Path) -> list[Any]:
    p = root / "locked"
    p.write_bytes(b"x" * 1000)
    out: list[Any] = []

    def probe(what: str) -> str:
        return child(LOCK_PROBE, str(p), what)

    fd = os.open(p, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    out += [probe("flock_ex"), probe("flock_sh")]
    fcntl.flock(fd, fcntl.LOCK_SH)
    out += [probe("flock_sh"), probe("flock_ex")]
    fcntl.flock(fd, fcntl.LOCK_UN)
    out += [probe("flock_ex")]
    fcntl.flock(fd, fcntl.LOCK_EX)
    waiter = subprocess.Popen([*PY_CHILD, LOCK_PROBE, str(p), "flock_wait"],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    out.append(waiter.poll())  # still blocked
    fcntl.flock(fd, fcntl.LOCK_UN)
    out.append(waiter.communicate(timeout=20)[0].strip())

    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)  # POSIX record lock on bytes 0..99
    out += [probe("w:50:10"), probe("r:0:1"), probe("w:100:10"), probe("r:500:0")]
    out.append(probe("getlk").split() == [str(fcntl.F_WRLCK), "0", "100", str(os.getpid())])
    fcntl.lockf(fd, fcntl.LOCK_SH, 100, 0)
    out += [probe("r:0:100"), probe("w:99:1")]
    fd2 = os.open(p, os.O_RDONLY)
    os.close(fd2)  # closing any fd of the file drops this process's POSIX locks
    out += [probe("w:0:100")]
    os.close(fd)
    return out


def test_flock_and_posix_locks_between_processes(tmp_path: Path, mounted: Mounted) -> None:
    out = on_ext4_and_mount(tmp_path, mounted, locks_scenario)
    assert out[:5] == ["EAGAIN", "EAGAIN", "ok", "EAGAIN", "ok"]


# -- O_DIRECT
def test_o_direct_does_not_hurt_the_mount(mounted: Mounted) -> None:
    p = mounted.path / "direct"
    buf = mmap.mmap(-1, 4 * 4096)
    pattern = os.urandom(len(buf))
    buf.write(pattern)
    results: dict[str, Any] = {}
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
    try:
        results["write"] = attempt(os.pwrite, fd, buf, 0)
        results["write2"] = attempt(os.pwrite, fd, buf, len(buf))
        results["unaligned"] = attempt(os.pwrite, fd, b"odd", 3)
    finally:
        os.close(fd)
    wait_committed(mounted)  # see test_read_while_commit_finishes
    rbuf = mmap.mmap(-1, 8 * 4096)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        results["read"] = attempt(os.preadv, fd, [rbuf], 0)
    finally:
        os.close(fd)
    if results["write"] == len(buf) and results["read"] == 2 * len(buf):
        expected = bytearray(pattern * 2)
        if results["unaligned"] == 3:
            expected[3:6] = b"odd"
        assert rbuf[:2 * len(buf)] == bytes(expected)
        assert p.read_bytes() == bytes(expected)
    # a normally written file, then read and overwritten with O_DIRECT
    q = mounted.path / "mixed"
    q.write_bytes(b"A" * 65536)
    wait_committed(mounted)  # see test_close_during_commit_is_committed
    assert q.read_bytes() == b"A" * 65536  # now in the page cache
    fd = os.open(q, os.O_RDWR | os.O_DIRECT)
    try:
        ok = attempt(os.pwrite, fd, buf, 8192) == len(buf)
    finally:
        os.close(fd)
    wait_committed(mounted)
    if ok:
        assert q.read_bytes() == b"A" * 8192 + pattern + b"A" * (65536 - 8192 - len(buf))
    # whatever happened, the mount still works
    (mounted.path / "after").write_bytes(b"still fine")
    assert (mounted.path / "after").read_bytes() == b"still fine"
    assert "after" in os.listdir(mounted.path)


# -- persistence
def test_remount_keeps_bytes_and_metadata(mounted: Mounted) -> None:
    m = mounted.path
    (m / "dir" / "sub").mkdir(parents=True)
    (m / "dir" / "small").write_bytes(b"small")
    (m / "dir" / "sub" / "random").write_bytes(os.urandom(3 * MiB + 1))
    (m / "zeros").write_bytes(bytes(2 * MiB))
    (m / "empty").touch()
    fd = os.open(m / "sparse", os.O_CREAT | os.O_WRONLY, 0o640)
    os.pwrite(fd, b"end", 5 * MiB)
    os.close(fd)
    os.link(m / "dir" / "small", m / "dir" / "sub" / "hard")
    os.symlink("dir/small", m / "rel")
    os.symlink("/absolute/dangling", m / "abs")
    os.mkfifo(m / "fifo")
    os.mknod(m / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    for name in (b"\xff\xfe-not-utf8", "ünï cödé 😀".encode(), b"new\nline"):
        with open(os.path.join(os.fsencode(m), name), "wb") as f:
            f.write(name * 3)
    os.mkdir(os.path.join(os.fsencode(m), b"dir-\xff"))
    wait_committed(mounted)
    os.chmod(m / "dir" / "small", 0o4750)
    os.chmod(m / "dir", 0o2711)
    os.chown(m / "dir" / "sub" / "random", 1001, 1002)
    os.chown(m / "rel", 7, 8, follow_symlinks=False)
    os.setxattr(m / "zeros", "user.checksum", b"\x00\x01binary")
    os.setxattr(m / "dir", "user.dir", b"d")
    os.setxattr(m / "dir" / "sub" / "hard", "trusted.t", b"")
    for i, path in enumerate(sorted(m.rglob("*"))):
        os.utime(path, ns=(10**18 + i, 10**17 + 3 * i + 1), follow_symlinks=False)
    before = tree(m)
    remount(mounted)
    same_layout(before, tree(m))
    remount(mounted)  # twice: a clean mount leaves nothing to recover
    same_layout(before, tree(m))
