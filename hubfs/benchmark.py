"""Read throughput through a hubfs mount against a native copy of the same files: ``hubfs bench``.

Owns the measuring pieces the developer benchmarks in ``bench/`` share (timing with repeats, CPU
meters, page-cache control, machine facts) and the user's benchmark built from them: the files
are copied to the store's disk, then each measurement alternates native and hubfs reads so that
drift on a busy machine hits both alike, and the result is a ratio from one run.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from .errors import HubfsError
from .progress import Progress, human_bytes

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MB = 1_000_000
READ_BLOCK_BYTES = 1 * MIB
RANDOM_READ_BYTES = 4096
PAGE_BYTES = mmap.PAGESIZE
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
LIBRARIES = ("blake3", "pyfastcdc", "zstandard", "lmdb", "xxhash", "numpy", "safetensors",
             "torch")
# The native copy must leave this much free on its disk besides its own size.
SPARE_BYTES = 1 << 30
PLOT_INSTALL_HINT = ("--plot needs matplotlib, which is not installed: "
                     "`pip install 'hubfs[bench]'` (or `pip install matplotlib`), or drop --plot")


# -- measurements
@dataclass
class Measurement:
    """One thing timed ``len(seconds)`` times over ``nbytes`` bytes; ``info`` is free-form."""

    name: str
    nbytes: int
    seconds: list[float]
    info: dict[str, Any] = field(default_factory=dict)
    meters: list[CpuMeter] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def mbps(self) -> float:
        """Throughput at the median time: the figure targets are judged on."""
        return self.nbytes / self.median_s / MB if self.median_s > 0 else float("inf")

    @property
    def best_mbps(self) -> float:
        return self.nbytes / self.min_s / MB if self.min_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.nbytes,
            "seconds": [round(s, 6) for s in self.seconds],
            "median_s": round(self.median_s, 6),
            "min_s": round(self.min_s, 6),
            "mbps_median": round(self.mbps, 1),
            "mbps_best": round(self.best_mbps, 1),
            **({"own_cpu_s": [round(m.own_s, 3) for m in self.meters],
                "others_cpu_s": [round(m.others_s, 3) for m in self.meters]}
               if self.meters else {}),
            **({"info": self.info} if self.info else {}),
        }


def _machine_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(f) for f in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Wall time, this process's CPU time, and the CPU time every other process took meanwhile.

    ``others_s`` is the busy time of the whole machine less our own: on a shared 2-core box, a
    run where others took a core is not comparable with one where they did not.
    """

    def __init__(self) -> None:
        self.wall_s = self.own_s = self.others_s = 0.0

    def __enter__(self) -> Self:
        self._t = os.times()
        self._busy = _machine_busy_s()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        t = os.times()
        self.own_s = (t.user + t.system + t.children_user + t.children_system) - (
            self._t.user + self._t.system + self._t.children_user + self._t.children_system)
        self.others_s = max(_machine_busy_s() - self._busy - self.own_s, 0.0)


def wait_quiet(max_wait_s: float, busy_cpus: float = 0.15, sample_s: float = 0.5) -> float:
    """Wait until the rest of the machine is idle (under ``busy_cpus`` CPUs busy over a
    ``sample_s`` sample), at most ``max_wait_s``; returns the busy CPUs of the last sample.

    On a shared machine other jobs come and go; a run that starts while they hold a core
    measures them, not us. The ``others_cpu_s`` of each run still tell whether they came back.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before = _machine_busy_s()
        time.sleep(sample_s)
        busy = (_machine_busy_s() - before) / sample_s
        if busy < busy_cpus or time.monotonic() >= deadline:
            return busy


def timed(fn: Callable[[], object], meters: list[CpuMeter] | None = None) -> float:
    """Wall-clock seconds of one call; its ``CpuMeter`` is appended to ``meters`` if given."""
    with CpuMeter() as meter:
        fn()
    if meters is not None:
        meters.append(meter)
    return meter.wall_s


def time_repeats(fn: Callable[[], object], repeats: int,
                 setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, each after an untimed ``setup()``."""
    seconds = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        seconds.append(timed(fn))
    return seconds


# -- page cache
@dataclass(frozen=True)
class CacheDrop:
    """How a cold start was made: ``method`` is ``drop_caches``, ``fadvise`` or ``none``."""

    method: str
    note: str = ""


def _files_below(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file())
        else:
            out.append(path)
    return out


def fadvise_dontneed(paths: Iterable[Path]) -> int:
    """Evict the clean cached pages of these files (directories: every file below); returns
    how many files were evicted. Unreadable files are skipped."""
    evicted = 0
    for file in _files_below(paths):
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            evicted += 1
        finally:
            os.close(fd)
    return evicted


def drop_caches(fallback_files: tuple[Path, ...] = (), whole_cache: bool = True) -> CacheDrop:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (needs root), else ``posix_fadvise``.

    Without root (or with ``whole_cache=False``, which leaves the rest of the machine's cache
    alone), the named files' clean pages are evicted with ``posix_fadvise(DONTNEED)`` instead;
    whatever else they are read through (a store's index and packs, when unreadable) may stay
    cached then, and the result says so.
    """
    os.sync()
    reason = "asked to evict only the measured files"
    if whole_cache:
        try:
            DROP_CACHES.write_text("3\n")
            return CacheDrop("drop_caches")
        except OSError as exc:
            reason = f"cannot write {DROP_CACHES} ({exc.strerror}; it needs root)"
    evicted = fadvise_dontneed(fallback_files)
    if evicted:
        return CacheDrop("fadvise", f"{reason}: evicted {evicted} files with "
                         "posix_fadvise(DONTNEED)")
    return CacheDrop("none", f"{reason}: cold figures are not cold")


def settle(seconds: float) -> None:
    """Flush dirty pages, then idle so the machine is in the same state before every timed run.

    On a VM that hands freed memory back to its host (virtio-balloon free page reporting), memory
    freed just before a run is cheap to reuse and memory freed seconds earlier is not: idling a
    few seconds makes every run pay the same (the realistic, pessimistic) price.
    """
    os.sync()
    if seconds > 0:
        time.sleep(seconds)


def warm(path: Path, block_bytes: int = 8 * MIB) -> int:
    """Read a file (or every file below a directory) so its pages are cached; returns bytes."""
    total = 0
    for file in _files_below([path]):
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(block_bytes):
                total += len(chunk)
    return total


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files below ``path``, not following symlinks."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# -- machine facts
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def filesystem_of(path: Path) -> dict[str, str]:
    """The mount (device, mount point, type) that holds ``path``."""
    best = ("", "", "")
    target = os.path.abspath(path)
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                    best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    return {"device": best[0], "mount": best[1], "type": best[2]}


def _git_commit() -> str:
    """The commit of a hubfs run from a git checkout (editable installs), else ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "."],
                               check=False, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts(workdir: Path | None = None) -> dict[str, Any]:
    from . import __version__

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _mem_total_bytes(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "hubfs_version": __version__,
        "hubfs_commit": _git_commit(),
        "libraries": versions,
        "root": os.geteuid() == 0,
    }
    if workdir is not None:
        facts["workdir"] = str(workdir)
        facts["workdir_filesystem"] = filesystem_of(workdir)
    return facts


# -- what is timed
def read_sequential(path: Path) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while data := os.read(fd, READ_BLOCK_BYTES):
            total += len(data)
    finally:
        os.close(fd)
    return total


def read_random(path: Path, offsets: list[int]) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            os.pread(fd, RANDOM_READ_BYTES, offset)
    finally:
        os.close(fd)
    return len(offsets) * RANDOM_READ_BYTES


def touch_pages(path: Path) -> int:
    """One byte of every page through an mmap, as a lazy safetensors load touches them."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        total = 0
        for offset in range(0, len(mapped), PAGE_BYTES):
            total += mapped[offset]
        return len(mapped)


def touch_tensors(loaded: Any) -> int:
    """One byte of every page of every tensor storage in ``loaded`` (dicts and lists walked);
    returns their bytes. A load that maps the file reads almost nothing by itself, a forward
    pass reads it all: touching makes mapped and copying loads comparable."""
    import torch

    seen: set[int] = set()
    total = 0
    stack: list[Any] = [loaded]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, (list, tuple)):
            stack += list(item)
        elif isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
            int(as_bytes[::PAGE_BYTES].sum())
            total += storage.nbytes()
    return total


def load_safetensors(path: Path) -> int:
    """``safetensors.torch.load_file``, then every page touched (recent versions map the file
    instead of reading it)."""
    from safetensors.torch import load_file

    return touch_tensors(load_file(str(path)))


def load_torch_mmap(path: Path) -> int:
    """``torch.load(mmap=True)``, then every page touched."""
    import torch

    return touch_tensors(torch.load(str(path), mmap=True, weights_only=True,
                                    map_location="cpu"))


def cache_alike(files: Iterable[Path], evict: tuple[Path, ...] = (),
                whole_cache: bool = True) -> CacheDrop:
    """Drop the page cache, then read every file of ``files`` with read(2): the start of a
    series of hot runs, so that native and hubfs files are cached the same way.

    How a file's pages came into the page cache decides how fast a hot mmap load is.
    read(2) readahead caches large folios (up to 2 MiB), which one page fault maps whole;
    mmap faults after a drop cache mostly 4 KiB ones, a fault per 64 KiB (fault-around).
    Warming with read(2) alone is not enough after a series of cold runs: those alternate
    and end with hubfs's, so its object keeps the folios the last cold load faulted in,
    while the native file, dropped since, is read in whole. ``safetensors`` load_file and a
    touch of every page of 1 GiB then took 38 ms natively and 102 ms through the mount;
    with both read in, 39 and 40 ms (both faulted in: 127 and 96 ms).
    """
    drop = drop_caches((*evict, *files), whole_cache=whole_cache)
    for file in files:
        warm(file)
    return drop


def measure_pair(name: str, nbytes: int, fn: Callable[[Path], object],
                 pairs: list[tuple[Path, Path]], repeats: int,
                 prepare: Callable[[str], object], step: Callable[[], None] | None = None,
                 begin: Callable[[], object] | None = None
                 ) -> tuple[Measurement, Measurement]:
    """Time ``fn`` over every file of ``pairs`` (native, hubfs), ``repeats`` times each,
    alternating native and hubfs runs so drift on a noisy machine hits both alike.
    ``begin()`` runs untimed once before the first run (``cache_alike`` for hot runs),
    ``prepare(label)`` before each run (drop or warm the cache)."""
    results: dict[str, list[float]] = {"native": [], "hubfs": []}
    if begin is not None:
        begin()
    for _ in range(repeats):
        for index, label in enumerate(("native", "hubfs")):
            prepare(label)
            start = time.perf_counter()
            for pair in pairs:
                fn(pair[index])
            results[label].append(time.perf_counter() - start)
            if step is not None:
                step()
    return (Measurement(f"{name}/native", nbytes, results["native"]),
            Measurement(f"{name}/hubfs", nbytes, results["hubfs"]))


# -- hubfs bench
@dataclass(frozen=True)
class BenchFile:
    """A file to measure: ``path`` as given (inside the mount), ``kind`` from its first bytes."""

    path: Path
    size: int
    kind: str  # "safetensors", "torch" (a torch.save zip) or "other"


def sniff_kind(path: Path, size: int) -> str:
    """Recognised by content, since hub blobs are named by hash."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if len(head) == 9 and head[8:9] == b"{":
                header_bytes = int.from_bytes(head[:8], "little")
                if 0 < header_bytes <= size - 8:
                    return "safetensors"
            if head[:4] == b"PK\x03\x04":
                f.seek(0)
                with zipfile.ZipFile(f) as zf:
                    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in zf.namelist()):
                        return "torch"
    except (OSError, zipfile.BadZipFile, ValueError):
        pass
    return "other"


def collect_files(paths: list[Path]) -> list[BenchFile]:
    """Regular files named or below the named directories, symlinks followed (a hub snapshot is
    symlinks to blobs), each file once."""
    seen: set[tuple[int, int]] = set()
    files: list[BenchFile] = []

    def add(path: Path) -> None:
        try:
            st = path.stat()
        except OSError:
            return
        if not os.path.isfile(path) or (st.st_dev, st.st_ino) in seen or st.st_size == 0:
            return
        seen.add((st.st_dev, st.st_ino))
        files.append(BenchFile(path, st.st_size, sniff_kind(path, st.st_size)))

    for path in paths:
        if not path.exists():
            raise HubfsError(f"{path}: no such file or directory", 2)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    add(Path(dirpath) / name)
        else:
            add(path)
    if not files:
        raise HubfsError(f"no non-empty files under {' '.join(map(str, paths))}: name a model "
                         "file or a directory holding some", 2)
    return files


def hubfs_mount_of(path: Path) -> tuple[Path, Path]:
    """(mount point, store) of the hubfs mount holding ``path``, or a user error."""
    from .mount import mounts

    target = Path(os.path.abspath(path))
    found = [m for m in mounts() if m.mountpoint == target or m.mountpoint in target.parents]
    if not found:
        raise HubfsError(f"{path} is not inside a hubfs mount: mount a store (`hubfs mount "
                         "STORE DIR`) and name files inside DIR", 2)
    best = max(found, key=lambda m: len(m.mountpoint.parts))
    return best.mountpoint, Path(best.source)


def plan_workdir(store: Path, workdir: Path | None, need_bytes: int) -> tuple[Path, list[str]]:
    """Where the native copy goes (next to the store, so on its disk), checked for room."""
    notes: list[str] = []
    parent = workdir if workdir is not None else store.parent
    if not parent.is_dir():
        raise HubfsError(f"{parent} is not a directory: create it or pass --workdir DIR", 2)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HubfsError(f"cannot write the native copy into {parent}: pass --workdir DIR, a "
                         "writable directory on the same disk as the store", 2)
    try:
        if os.stat(parent).st_dev != os.stat(store).st_dev:
            notes.append(f"the native copy ({parent}) is not on the store's disk ({store}): "
                         "the ratios compare two disks")
    except OSError:
        pass
    free = shutil.disk_usage(parent).free
    if free < need_bytes + SPARE_BYTES:
        raise HubfsError(f"the native copy needs {human_bytes(need_bytes)} plus "
                         f"{human_bytes(SPARE_BYTES)} spare on {parent}, which has "
                         f"{human_bytes(free)} free: free some space, name fewer files, or "
                         "pass --workdir DIR on a disk with room", 1)
    return parent, notes


def copy_native(files: list[BenchFile], dest: Path, bar: Progress) -> list[Path]:
    """Copy each file into ``dest`` (name kept, for the suffix), fsync'd; returns the copies."""
    copies = []
    for index, item in enumerate(files):
        target = dest / f"{index:04d}-{item.path.name}"
        with open(item.path, "rb") as src, open(target, "wb") as out:
            while data := src.read(8 * MIB):
                out.write(data)
                bar.advance(len(data))
            out.flush()
            os.fsync(out.fileno())
        copies.append(target)
    return copies


@dataclass
class BenchRow:
    """One line of the table: a measurement with its native and hubfs figures."""

    name: str
    what: str
    native: Measurement
    hubfs: Measurement

    @property
    def ratio(self) -> float:
        """hubfs speed over native speed (1.0: as fast; 0.5: half as fast)."""
        return self.native.median_s / self.hubfs.median_s if self.hubfs.median_s > 0 else 0.0


@dataclass
class BenchResult:
    files: list[BenchFile]
    rows: list[BenchRow]
    notes: list[str]
    cache_drop: CacheDrop
    facts: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "hubfs bench",
            "timestamp": time.strftime("%Y%m%dT%H%M%S"),
            "machine": self.facts,
            "files": [{"path": str(f.path), "bytes": f.size, "kind": f.kind}
                      for f in self.files],
            "cache_drop": {"method": self.cache_drop.method, "note": self.cache_drop.note},
            "notes": self.notes,
            "ratios": {row.name: round(row.ratio, 4) for row in self.rows},
            "rows": [{"name": row.name, "what": row.what, "ratio": round(row.ratio, 4),
                      "native_mbps": round(row.native.mbps, 1),
                      "hubfs_mbps": round(row.hubfs.mbps, 1),
                      "native_median_s": round(row.native.median_s, 6),
                      "hubfs_median_s": round(row.hubfs.median_s, 6)} for row in self.rows],
            "measurements": [m.to_dict() for row in self.rows for m in (row.native, row.hubfs)],
        }


def importable(module: str) -> str | None:
    """None if ``module`` imports, else why not (one line)."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001  (a broken install can raise anything)
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def run_bench(paths: list[Path], *, repeats: int = 3, random_reads: int = 2000,
              workdir: Path | None = None, whole_cache: bool = True,
              out: Callable[[str], None] = print) -> BenchResult:
    """Copy the files natively next to the store, measure both, remove the copy."""
    mountpoint, store = hubfs_mount_of(paths[0])
    for path in paths[1:]:
        if hubfs_mount_of(path)[0] != mountpoint:
            raise HubfsError(f"{path} is on another mount than {paths[0]}: bench one mount "
                             "at a time", 2)
    files = collect_files(paths)
    total = sum(f.size for f in files)
    parent, notes = plan_workdir(store, workdir, total)
    kinds = {k: sum(1 for f in files if f.kind == k) for k in ("safetensors", "torch")}
    out(f"hubfs bench: {len(files)} files, {human_bytes(total)} on the mount {mountpoint} "
        f"(store {store}); a native copy of the same size goes to {parent} "
        f"({human_bytes(shutil.disk_usage(parent).free)} free) and is removed afterwards")
    work = Path(tempfile.mkdtemp(prefix=".hubfs-bench-", dir=parent))
    try:
        with Progress("copying to the native disk", total) as bar:
            copies = copy_native(files, work, bar)
        mounted = [f.path for f in files]
        pairs = list(zip(copies, mounted))
        evict = (*copies, *mounted, store / "packs", store / "objects")
        drops: list[CacheDrop] = []

        def cold(_label: str) -> None:
            drops.append(drop_caches(evict, whole_cache=whole_cache))

        def hot(label: str) -> None:
            for native, hubfs in pairs:
                warm(native if label == "native" else hubfs)

        rng = random.Random(0)
        big = [(i, f) for i, f in enumerate(files) if f.size >= RANDOM_READ_BYTES]
        offsets: dict[int, list[int]] = {i: [] for i, _ in big}
        if big:
            weights = [f.size for _, f in big]
            for _ in range(random_reads):
                i, f = rng.choices(big, weights)[0]
                offsets[i].append(rng.randrange(0, f.size - RANDOM_READ_BYTES + 1)
                                  // RANDOM_READ_BYTES * RANDOM_READ_BYTES)

        plan: list[tuple[str, str, int, Callable[[Path], object], list[tuple[Path, Path]],
                         Callable[[str], object]]] = [
            ("seq_cold", "sequential read, 1 MiB reads, page cache dropped", total,
             read_sequential, pairs, cold),
            ("seq_hot", "sequential re-read, from the page cache", total, read_sequential,
             pairs, hot),
        ]
        if big:
            by_path = {p: i for i, pair in enumerate(pairs) for p in pair}
            plan.append((
                "random_4k_cold", f"{random_reads} random 4 KiB reads, page cache dropped",
                random_reads * RANDOM_READ_BYTES,
                lambda p: read_random(p, offsets.get(by_path[p], [])), pairs, cold))
        loaders = [("safetensors", "safetensors_load",
                    "safetensors.torch.load_file, every page touched",
                    ("safetensors.torch",), load_safetensors),
                   ("torch", "torch_load_mmap", "torch.load(mmap=True), every page touched",
                    ("torch",), load_torch_mmap)]
        for kind, name, what, modules, loader in loaders:
            if not kinds[kind]:
                continue
            missing = next((f"{m} ({why})" for m in modules if (why := importable(m))), None)
            if missing:
                notes.append(f"{name}: skipped, {missing} is not importable here: "
                             f"`pip install {'safetensors torch' if kind == 'safetensors' else 'torch'}`")
                continue
            chosen = [pair for pair, f in zip(pairs, files) if f.kind == kind]
            nbytes = sum(f.size for f in files if f.kind == kind)
            plan.append((f"{name}_cold", f"{what}, page cache dropped", nbytes, loader, chosen,
                         cold))
            plan.append((f"{name}_hot", f"{what}, from the page cache", nbytes, loader, chosen,
                         hot))
        if not kinds["safetensors"] and not kinds["torch"]:
            notes.append("no safetensors or torch.save files among them: no model load times")

        rows: list[BenchRow] = []
        with Progress("measuring", len(plan) * repeats * 2, unit="runs") as bar:
            for name, what, nbytes, fn, chosen, prepare in plan:
                both = [path for pair in chosen for path in pair]
                begin = None if prepare is cold else partial(cache_alike, both, evict,
                                                             whole_cache)
                native_m, hubfs_m = measure_pair(name, nbytes, fn, chosen, repeats, prepare,
                                                 lambda: bar.advance(1), begin)
                rows.append(BenchRow(name, what, native_m, hubfs_m))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    methods = {d.method for d in drops}
    drop = next((d for d in drops if d.method != "drop_caches"), drops[0] if drops else
                CacheDrop("none", "no cold measurement"))
    if methods != {"drop_caches"} and drop.note:
        notes.append(f"cold runs: {drop.note}")
    return BenchResult(files, rows, notes, drop, machine_facts(parent))


def format_table(result: BenchResult) -> str:
    lines = [f"{'measurement':22s} {'native':>12s} {'hubfs':>12s} {'ratio':>6s}  what"]
    for row in result.rows:
        if row.name.startswith(("seq", "random")):
            native, hubfs = f"{row.native.mbps:.0f} MB/s", f"{row.hubfs.mbps:.0f} MB/s"
        else:
            native, hubfs = f"{row.native.median_s:.3f} s", f"{row.hubfs.median_s:.3f} s"
        lines.append(f"{row.name:22s} {native:>12s} {hubfs:>12s} {row.ratio:6.2f}  {row.what}")
    lines.append("ratio: hubfs speed / native speed of the same files on the same disk "
                 "(median of the repeats); 1.00 = as fast")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def check_plot_available() -> None:
    if importable("matplotlib") is not None:
        raise HubfsError(PLOT_INSTALL_HINT, 2)


def write_plot(result: BenchResult, path: Path) -> None:
    """Two panels: native and hubfs speed per measurement, and the ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first

    names = [row.name for row in result.rows]
    fig, (ax_speed, ax_ratio) = plt.subplots(1, 2, figsize=(12, 1.5 + 0.55 * len(names)))
    ys = list(range(len(names)))
    native = [row.native.mbps for row in result.rows]
    hubfs = [row.hubfs.mbps for row in result.rows]
    ax_speed.barh([y - 0.2 for y in ys], native, height=0.4, label="native")
    ax_speed.barh([y + 0.2 for y in ys], hubfs, height=0.4, label="hubfs")
    ax_speed.set_yticks(ys, names, fontsize=8)
    ax_speed.invert_yaxis()
    ax_speed.set_xlabel("MB/s (median run)")
    ax_speed.legend(fontsize=8)
    ax_speed.grid(axis="x", alpha=0.3)
    ratios = [row.ratio for row in result.rows]
    bars = ax_ratio.barh(ys, ratios, height=0.6, color="tab:green")
    for bar, ratio in zip(bars, ratios):
        ax_ratio.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratio:.2f}",
                      va="center", fontsize=8)
    ax_ratio.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_ratio.set_yticks(ys, names, fontsize=8)
    ax_ratio.invert_yaxis()
    ax_ratio.set_xlim(0, max([1.1, *ratios]) * 1.15)
    ax_ratio.set_xlabel("hubfs / native (1.0 = as fast)")
    total = sum(f.size for f in result.files)
    fig.suptitle(f"hubfs bench: {len(result.files)} files, {human_bytes(total)}; cold runs: "
                 f"{result.cache_drop.method}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
