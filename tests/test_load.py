"""Sustained mixed load through a real mount, with the daemon's memory watched.

Writers stream big files (random bytes, stored raw, and text, stored zstd) to a temporary name
and rename them into place, rename and unlink older ones; readers open registered files and
check random ranges and whole files byte for byte (a file a writer unlinks or renames while a
reader holds it open must keep its bytes); ``ls -R`` walks the tree all along. Nothing may fail.

The daemon's RSS (``/proc/<pid>/status``; the pid is in ``STORE/lock``) is sampled every
``RSS_SAMPLE_S``; the peak and the kernel's high-water mark (VmHWM) are printed (run with
``-s``) and recorded as test properties. The bound is the design's own arithmetic:

- the decoded-chunk LRU: ``reader.DECODED_CACHE_BYTES`` (256 MiB);
- the files being ingested: one chunker window each (``chunking.WINDOW_BYTES``, 64 MiB; the
  files here are at most 64 MB), and up to four at once, since ``close()`` does not wait for
  the commit and the daemon runs ``fs.WORKER_THREADS`` (4) of them in parallel;
- a baseline for the interpreter, numpy, pyfuse3, LMDB's touched pages and request buffers,
  ``BASELINE_RSS_BYTES`` = 128 MiB (an idle mount measures 33 MiB here).

That is 640 MiB. Files larger than a window may hold two windows each while the first one's
last chunks are stored: the same arithmetic bounds four big files committed at once, and a
``hubfs import`` of one big file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest

from hubfs.chunking import WINDOW_BYTES
from hubfs.reader import DECODED_CACHE_BYTES
from hubfs.store import Store
from tests.conftest import Mounted, mount_store, unmount_and_check

pytestmark = [pytest.mark.mount, pytest.mark.slow]

DURATION_S = 20.0
WRITERS = 2
READERS = 2
RSS_SAMPLE_S = 0.5
BLOCK_BYTES = 1 << 20
FILE_SIZES = (100_000, 1_000_000, 8_000_000, 32_000_000, 64_000_000)
BASELINE_RSS_BYTES = 128 * 1024 * 1024
# the daemon commits up to fs.WORKER_THREADS files at once: close() does not wait for it
COMMITS_AT_ONCE = 4
RSS_BOUND_BYTES = DECODED_CACHE_BYTES + COMMITS_AT_ONCE * WINDOW_BYTES + BASELINE_RSS_BYTES
BIG_WRITERS = 4
BIG_FILE_BYTES = 300_000_000
IMPORT_FILE_BYTES = 600_000_000
WORDS = ("weight", "bias", "layer", "norm", "attention", "token", "embed", "head", "vocab",
         "merges", "config", "0.125", "-1.5", "{", "}", "[", "]", ",", "\n")


@dataclass(frozen=True)
class Spec:
    """A file's bytes, computable at any offset: 1 MiB blocks of a per-file base (random or
    text), each stamped with its index so that no two blocks are alike."""

    seed: int
    size: int
    text: bool

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        out = bytearray()
        while offset < end:
            index, inner = divmod(offset, BLOCK_BYTES)
            block = self.block(index)
            piece = block[inner : inner + end - offset]
            assert piece, (self, offset)
            out += piece
            offset += len(piece)
        return bytes(out)

    def block(self, index: int) -> bytes:
        stamp = blake3.blake3(f"{self.seed}:{index}".encode()).hexdigest().encode()
        return stamp + base_block(self.seed, self.text)[len(stamp) :]

    def blocks(self) -> Iterator[bytes]:
        for offset in range(0, self.size, BLOCK_BYTES):
            yield self.read(offset, BLOCK_BYTES)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for block in self.blocks():
            digest.update(block)
        return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def base_block(seed: int, text: bool) -> bytes:
    rng = random.Random(seed)
    if not text:
        return rng.randbytes(BLOCK_BYTES)
    words = []
    length = 0
    while length < BLOCK_BYTES:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return (" ".join(words).encode() + b" " * BLOCK_BYTES)[:BLOCK_BYTES]


class Registry:
    """Files that are complete, by path; opening and renaming happen under its lock, so a
    reader never races a rename to ENOENT, while an open file may lose its name at any time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[Path, Spec] = {}


@dataclass
class Counters:
    bytes_written: int = 0
    files_written: int = 0
    renames: int = 0
    unlinks: int = 0
    reads: int = 0
    bytes_read: int = 0
    whole_files_checked: int = 0
    listings: int = 0


class Load:
    def __init__(self, mnt: Path, store: Path) -> None:
        self.mnt = mnt
        self.store = store
        self.registry = Registry()
        self.counters = Counters()
        self.count_lock = threading.Lock()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.rss_samples: list[int] = []

    def count(self, **amounts: int) -> None:
        with self.count_lock:
            for name, amount in amounts.items():
                setattr(self.counters, name, getattr(self.counters, name) + amount)

    def guarded(self, name: str, work: object) -> threading.Thread:
        def run() -> None:
            try:
                work()  # type: ignore[operator]
            except BaseException as exc:  # noqa: BLE001 - every failure is a finding
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                self.stop.set()

        return threading.Thread(target=run, name=name, daemon=True)

    # -- workers
    def writer(self, k: int) -> None:
        rng = random.Random(1000 + k)
        directory = self.mnt / f"w{k}"
        directory.mkdir()
        own: list[Path] = []
        n = 0
        while not self.stop.is_set():
            n += 1
            spec = Spec(seed=k * 1_000_000 + n, size=rng.choice(FILE_SIZES),
                        text=rng.random() < 0.4)
            tmp = directory / f"f{n}.incomplete"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for block in spec.blocks():
                    os.write(fd, block)
            finally:
                os.close(fd)
            final = directory / f"f{n}.{'txt' if spec.text else 'bin'}"
            with self.registry.lock:
                os.rename(tmp, final)
                self.registry.files[final] = spec
            own.append(final)
            self.count(bytes_written=spec.size, files_written=1)
            if len(own) > 3 and rng.random() < 0.3:  # rename an older file
                old = own.pop(rng.randrange(len(own)))
                new = old.with_name("renamed-" + old.name)
                with self.registry.lock:
                    os.rename(old, new)
                    self.registry.files[new] = self.registry.files.pop(old)
                own.append(new)
                self.count(renames=1)
            if len(own) > 6 or (len(own) > 3 and rng.random() < 0.3):  # unlink an older file
                victim = own.pop(rng.randrange(len(own) - 1))
                with self.registry.lock:
                    del self.registry.files[victim]
                    os.unlink(victim)
                self.count(unlinks=1)

    def reader(self, k: int) -> None:
        rng = random.Random(2000 + k)
        while not self.stop.is_set():
            with self.registry.lock:
                if not self.registry.files:
                    fd = -1
                else:
                    path = rng.choice(sorted(self.registry.files))
                    spec = self.registry.files[path]
                    fd = os.open(path, os.O_RDONLY)
            if fd < 0:
                time.sleep(0.05)
                continue
            try:
                if rng.random() < 0.15:  # the whole file, sequentially
                    digest = hashlib.sha256()
                    while chunk := os.read(fd, BLOCK_BYTES):
                        digest.update(chunk)
                        self.count(bytes_read=len(chunk))
                    assert digest.hexdigest() == spec.sha256(), f"{path}: wrong bytes"
                    self.count(whole_files_checked=1)
                    continue
                for _ in range(20):
                    offset = rng.randrange(spec.size)
                    length = rng.choice([4096, 65536, BLOCK_BYTES])
                    data = os.pread(fd, length, offset)
                    assert data == spec.read(offset, length), f"{path}: wrong bytes at {offset}"
                    self.count(reads=1, bytes_read=len(data))
            finally:
                os.close(fd)

    def lister(self) -> None:
        while not self.stop.is_set():
            result = subprocess.run(["ls", "-R", str(self.mnt)], check=False, capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            self.count(listings=1)
            time.sleep(0.2)

    def sampler(self) -> None:
        pid = int((self.store / "lock").read_text().strip())
        while not self.stop.is_set():
            self.rss_samples.append(status_kib(pid, "VmRSS") * 1024)
            self.stop.wait(RSS_SAMPLE_S)

    def run(self, duration_s: float) -> None:
        threads = [self.guarded("rss", self.sampler), self.guarded("ls -R", self.lister)]
        threads += [self.guarded(f"writer {k}", functools.partial(self.writer, k))
                    for k in range(WRITERS)]
        threads += [self.guarded(f"reader {k}", functools.partial(self.reader, k))
                    for k in range(READERS)]
        for thread in threads:
            thread.start()
        self.stop.wait(duration_s)
        self.stop.set()
        for thread in threads:
            thread.join(timeout=120)
            if thread.is_alive():
                self.errors.append(f"{thread.name}: still running 120 s after the end")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@dataclass(frozen=True)
class LoadResult:
    elapsed_s: float
    counters: Counters
    errors: list[str]
    idle_rss: int
    peak_rss: int  # sampled VmRSS
    hwm_rss: int  # the kernel's VmHWM at the end of the load


@pytest.fixture(scope="module")
def load_result(tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[LoadResult]:
    """One ``DURATION_S`` run of the mixed load on a fresh mount, unmounted (log checked,
    store verified) before the tests look at it; the store (several GB) is deleted after."""
    root = tmp_path_factory.mktemp("load")
    store = root / "store"
    Store.init(store)
    mounted = mount_store(store, root / "mnt")
    try:
        pid = int((store / "lock").read_text().strip())
        idle = status_kib(pid, "VmRSS") * 1024
        load = Load(mounted.path, store)
        start = time.monotonic()
        load.run(DURATION_S)
        elapsed = time.monotonic() - start
        hwm = status_kib(pid, "VmHWM") * 1024
        for path, spec in sorted(load.registry.files.items()):  # all that is left reads back
            if hashlib.sha256(path.read_bytes()).hexdigest() != spec.sha256():
                load.errors.append(f"{path}: wrong bytes after the load")
    finally:
        unmount_and_check(mounted, request)
    try:
        yield LoadResult(elapsed, load.counters, load.errors, idle,
                         max(load.rss_samples, default=0), hwm)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def test_mixed_load_has_no_errors(load_result: LoadResult,
                                  record_property: Callable[[str, object], None]) -> None:
    c, elapsed = load_result.counters, load_result.elapsed_s
    print(f"\nload for {elapsed:.0f}s: {c.files_written} files / {c.bytes_written / 1e6:.0f} MB "
          f"written ({c.bytes_written / 1e6 / elapsed:.0f} MB/s), {c.renames} renames, "
          f"{c.unlinks} unlinks, {c.reads} random reads + {c.whole_files_checked} whole files / "
          f"{c.bytes_read / 1e6:.0f} MB read, {c.listings} ls -R")
    record_property("mb_written", round(c.bytes_written / 1e6))
    record_property("mb_read", round(c.bytes_read / 1e6))
    assert not load_result.errors, "\n".join(load_result.errors)
    assert c.files_written >= 10 and c.reads >= 100 and c.listings >= 10, c
    assert c.renames and c.unlinks and c.whole_files_checked, c


def test_mixed_load_rss_stays_within_design_bound(load_result: LoadResult,
                                                  record_property: Callable[[str, object], None]
                                                  ) -> None:
    print(f"\ndaemon RSS: idle {load_result.idle_rss / 2**20:.0f} MiB, sampled peak "
          f"{load_result.peak_rss / 2**20:.0f} MiB, VmHWM {load_result.hwm_rss / 2**20:.0f} MiB, "
          f"bound {RSS_BOUND_BYTES / 2**20:.0f} MiB")
    record_property("rss_idle_mib", round(load_result.idle_rss / 2**20))
    record_property("rss_peak_mib", round(load_result.peak_rss / 2**20))
    record_property("rss_hwm_mib", round(load_result.hwm_rss / 2**20))
    assert load_result.peak_rss < RSS_BOUND_BYTES
    assert load_result.hwm_rss < RSS_BOUND_BYTES


@pytest.fixture
def big_mount(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mounted]:
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt")
    try:
        yield mounted
    finally:
        unmount_and_check(mounted, request)
        shutil.rmtree(store, ignore_errors=True)


def test_concurrent_big_file_commits_stay_within_window_bound(big_mount: Mounted) -> None:
    """``BIG_WRITERS`` files of ``BIG_FILE_BYTES`` (random: stored raw, so the LRU stays
    empty) closed at once, so their commits run together in the daemon's worker threads."""
    pid = int((big_mount.store / "lock").read_text().strip())
    barrier = threading.Barrier(BIG_WRITERS)
    errors: list[str] = []

    def write(k: int) -> None:
        try:
            spec = Spec(seed=500 + k, size=BIG_FILE_BYTES, text=False)
            with open(big_mount.path / f"big{k}.bin", "wb") as f:
                f.writelines(spec.blocks())
                barrier.wait(timeout=120)
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"writer {k}: {exc!r}")
            barrier.abort()

    threads = [threading.Thread(target=write, args=(k,)) for k in range(BIG_WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    samples = []
    deadline = time.monotonic() + 120
    while os.listdir(big_mount.store / "staging") and time.monotonic() < deadline:
        samples.append(status_kib(pid, "VmRSS") * 1024)  # the commits run after close()
        time.sleep(RSS_SAMPLE_S / 5)
    hwm = status_kib(pid, "VmHWM") * 1024
    bound = BIG_WRITERS * 2 * WINDOW_BYTES + BASELINE_RSS_BYTES
    print(f"\n{BIG_WRITERS} commits of {BIG_FILE_BYTES / 1e6:.0f} MB at once: daemon VmHWM "
          f"{hwm / 2**20:.0f} MiB (sampled peak {max(samples, default=0) / 2**20:.0f} MiB), "
          f"bound {bound / 2**20:.0f} MiB")
    assert not os.listdir(big_mount.store / "staging"), "commits did not finish"
    assert hwm < bound


MEASURE_CHILD = r"""
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(done.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_import_of_a_big_file_stays_within_window_bound(tmp_path: Path) -> None:
    store, src = tmp_path / "store", tmp_path / "src"
    Store.init(store)
    src.mkdir()
    spec = Spec(seed=900, size=IMPORT_FILE_BYTES, text=False)
    with open(src / "model.bin", "wb") as f:
        f.writelines(spec.blocks())
    try:
        done = subprocess.run([sys.executable, "-c", MEASURE_CHILD, sys.executable, "-m",
                               "hubfs.cli", "import", str(store), str(src)],
                              capture_output=True, text=True, timeout=600, check=True)
        code, maxrss_kib = (int(v) for v in done.stdout.split())
        assert code == 0, done.stderr
        bound = 2 * WINDOW_BYTES + BASELINE_RSS_BYTES
        print(f"\nimport of {IMPORT_FILE_BYTES / 1e6:.0f} MB: max RSS {maxrss_kib / 1024:.0f} MiB, "
              f"bound {bound / 2**20:.0f} MiB")
        assert maxrss_kib * 1024 < bound
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
