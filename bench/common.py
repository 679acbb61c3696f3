"""Shared parts of the benchmarks: timing with repeats, cache control, test data, result files.

Every result file carries the machine facts next to the raw numbers of each measurement
(every repeat, not only the median), so a figure can be checked and re-derived later. Sizes are
decimal in rates (MB/s = 10**6 bytes a second, as ``hubfs.progress`` prints them) and binary in
data sizes (``--size-mib``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Self

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 1024 * 1024
MB = 1_000_000
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
LIBRARIES = ("blake3", "pyfastcdc", "zstandard", "lmdb", "xxhash", "numpy", "safetensors")


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
    return [_setup_then_time(fn, setup) for _ in range(repeats)]


def _setup_then_time(fn: Callable[[], object], setup: Callable[[], object] | None) -> float:
    if setup is not None:
        setup()
    return timed(fn)


# -- page cache
@dataclass(frozen=True)
class CacheDrop:
    """How a cold start was made: ``method`` is ``drop_caches``, ``fadvise`` or ``none``."""

    method: str
    note: str = ""


def drop_caches(fallback_files: tuple[Path, ...] = ()) -> CacheDrop:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; needs root.

    Without root, the named files' clean pages are evicted with ``posix_fadvise(DONTNEED)``
    instead (index and pack pages of a store stay cached then), and the result says so.
    """
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
        return CacheDrop("drop_caches")
    except OSError as exc:
        reason = f"cannot write {DROP_CACHES} ({exc.strerror}; it needs root)"
    evicted = 0
    for path in fallback_files:
        for file in (sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir()
                     else [path]):
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                evicted += 1
            finally:
                os.close(fd)
    if evicted:
        return CacheDrop("fadvise", f"{reason}: evicted {evicted} source files with fadvise")
    return CacheDrop("none", f"{reason}: cold figures are not cold")


def settle(seconds: float) -> None:
    """Flush dirty pages, then idle so the machine is in the same state before every timed run.

    On a VM that hands freed memory back to its host (virtio-balloon free page reporting, as
    here), memory freed just before a run is cheap to reuse and memory freed seconds earlier is
    not: idling a few seconds makes every run pay the same (the realistic, pessimistic) price.
    """
    os.sync()
    if seconds > 0:
        time.sleep(seconds)


def page_cache_probe(directory: Path, size_bytes: int = 256 * MIB,
                     idle_s: float = 3.0) -> dict[str, float]:
    """MB/s of buffered writes of a new file (no fsync): after ``idle_s`` idle, and again at once.

    Each new page-cache page costs a page of memory. On bare metal both figures are several
    GB/s. On a VM that returns free memory to its host (virtio-balloon free page reporting) the
    first can be ~0.5 GB/s: memory the guest gave back must be faulted in from the host again,
    and that then caps every write of new data (pack appends, ``cp``) and every cold read.
    """
    block = os.urandom(4 * MIB)
    path = directory / ".page-cache-probe"
    rates = {}
    for label, pause in (("after_idle", idle_s), ("reused", 0.0)):
        settle(pause)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            start = time.perf_counter()
            for _ in range(size_bytes // len(block)):
                os.write(fd, block)
            rates[f"{label}_mbps"] = round(size_bytes / (time.perf_counter() - start) / MB, 1)
        finally:
            os.close(fd)
            os.unlink(path)
    return rates


def warm(path: Path, block_bytes: int = 8 * MIB) -> int:
    """Read a file (or every file below a directory) so its pages are cached; returns bytes."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(block_bytes):
                total += len(chunk)
    return total


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files below ``path``, not following symlinks."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# -- test data
DTYPES = ("fp32", "fp16")


def _transformer_shapes(hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    """One layer's tensors, biases and norms included, as in a BERT/GPT block."""
    return [
        ("attn.q.weight", (hidden, hidden)), ("attn.q.bias", (hidden,)),
        ("attn.k.weight", (hidden, hidden)), ("attn.k.bias", (hidden,)),
        ("attn.v.weight", (hidden, hidden)), ("attn.v.bias", (hidden,)),
        ("attn.o.weight", (hidden, hidden)), ("attn.o.bias", (hidden,)),
        ("ln1.weight", (hidden,)), ("ln1.bias", (hidden,)),
        ("mlp.up.weight", (4 * hidden, hidden)), ("mlp.up.bias", (4 * hidden,)),
        ("mlp.down.weight", (hidden, 4 * hidden)), ("mlp.down.bias", (hidden,)),
        ("ln2.weight", (hidden,)), ("ln2.bias", (hidden,)),
    ]


def make_weights(path: Path, size_mib: int, dtype: str = "fp32", seed: int = 0,
                 hidden: int = 1024, progress: Callable[[int], None] | None = None) -> int:
    """Write a safetensors file of ``size_mib`` MiB of random-normal tensors; returns its size.

    Deterministic for a given (size, dtype, seed, hidden): an embedding, then transformer layers,
    the last tensor cut short so the tensor bytes come to exactly ``size_mib`` MiB. Random
    normal floats barely compress (random mantissas), like trained weights.
    """
    import numpy as np
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    np_dtype = np.float32 if dtype == "fp32" else np.float16
    itemsize = np.dtype(np_dtype).itemsize
    budget = size_mib * MIB // itemsize  # elements still to make
    rng = np.random.default_rng(seed)
    tensors: dict[str, Any] = {}

    def add(name: str, shape: tuple[int, ...]) -> None:
        nonlocal budget
        count = int(np.prod(shape))
        if count > budget:
            shape, count = (budget,), budget
        arr = rng.standard_normal(count, dtype=np.float32)
        arr *= 0.02
        tensors[name] = (arr if np_dtype is np.float32 else arr.astype(np_dtype)).reshape(shape)
        budget -= count
        if progress is not None:
            progress(count * itemsize)

    add("embed.weight", (min(32000, max(budget // hidden // 8, 1)), hidden))
    layer = 0
    while budget > 0:
        for name, shape in _transformer_shapes(hidden):
            if budget == 0:
                break
            add(f"layers.{layer}.{name}", shape)
        layer += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"generator": "hubfs bench", "seed": str(seed)})
    os.replace(tmp, path)
    return path.stat().st_size


# -- results
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


def _filesystem(path: Path) -> dict[str, str]:
    """The mount (device, mount point, type) that holds ``path``."""
    best = ("", "", "")
    target = str(path.resolve())
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
    try:
        out = subprocess.run(["git", "-C", str(BENCH_DIR), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "status", "--porcelain", "hubfs"],
            check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts(workdir: Path | None = None) -> dict[str, Any]:
    import hubfs

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
        "hubfs_version": hubfs.__version__,
        "hubfs_commit": _git_commit(),
        "libraries": versions,
        "root": os.geteuid() == 0,
    }
    if workdir is not None:
        facts["workdir"] = str(workdir)
        facts["workdir_filesystem"] = _filesystem(workdir)
    return facts


def write_result(name: str, measurements: list[Measurement], facts: dict[str, Any],
                 extra: dict[str, Any] | None = None, path: Path | None = None) -> Path:
    """Write ``bench/results/<name>-<timestamp>.json`` (or ``path``); returns where."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}-{stamp}.json"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "timestamp": stamp,
        "machine": facts,
        "measurements": [m.to_dict() for m in measurements],
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# -- a real mount, driven through the CLI as a user would
def hubfs_cli(*args: str, timeout_s: float = 900.0) -> subprocess.CompletedProcess[str]:
    """``hubfs ARGS`` in a child process (this interpreter, so PYTHONPATH picks the code)."""
    return subprocess.run([sys.executable, "-m", "hubfs.cli", *args], capture_output=True,
                          text=True, check=False, timeout=timeout_s)


def syncfs(path: Path) -> None:
    """``syncfs(2)`` on the filesystem holding ``path``: flushes that filesystem only, where
    ``os.sync`` would also flush every other job's dirty pages on a shared machine."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY if path.is_dir() else os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class HubfsMount:
    """A fresh store at ``store`` mounted at ``mountpoint`` (``hubfs init``, ``hubfs mount``);
    leaving the block runs ``hubfs umount`` (lazy ``fusermount3 -uz`` if that fails).

    ``verify()`` runs ``hubfs verify`` after the unmount; ``umount_s`` is how long the unmount
    took (it waits until the daemon has stored everything still open).
    """

    def __init__(self, store: Path, mountpoint: Path, *mount_args: str) -> None:
        self.store = store
        self.path = mountpoint
        self.mount_args = mount_args
        self.umount_s: float | None = None
        self.umount_error = ""

    def __enter__(self) -> Self:
        subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True, check=False)
        if self.store.exists():
            shutil.rmtree(self.store)
        self.path.mkdir(parents=True, exist_ok=True)
        for args in (("init", str(self.store)),
                     ("mount", str(self.store), str(self.path), *self.mount_args)):
            done = hubfs_cli(*args)
            if done.returncode != 0:
                raise RuntimeError(f"hubfs {args[0]} failed: {done.stderr.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.umount()

    def umount(self) -> None:
        if self.umount_s is not None:
            return
        start = time.perf_counter()
        done = hubfs_cli("umount", str(self.path))
        self.umount_s = time.perf_counter() - start
        if done.returncode != 0:
            self.umount_error = done.stderr.strip()
            log.error("hubfs umount failed (%s); unmounting lazily", self.umount_error)
            subprocess.run(["fusermount3", "-uz", str(self.path)], capture_output=True,
                           check=False)

    def verify(self) -> dict[str, Any]:
        """``hubfs verify`` of the unmounted store: exit code, seconds, its last lines."""
        self.umount()
        start = time.perf_counter()
        done = hubfs_cli("verify", str(self.store))
        out = (done.stdout + done.stderr).strip().splitlines()
        return {"ok": done.returncode == 0, "exit_code": done.returncode,
                "seconds": round(time.perf_counter() - start, 3), "output": out[-8:]}

    def log_problems(self) -> list[str]:
        """ERROR/WARNING/Traceback lines of the daemon's log."""
        log_file = self.store / "hubfs.log"
        if not log_file.exists():
            return []
        return [line for line in log_file.read_text(errors="replace").splitlines()
                if " ERROR " in line or " WARNING " in line or "Traceback" in line]
