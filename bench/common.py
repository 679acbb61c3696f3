"""Shared parts of the developer benchmarks: test data, a page-cache probe, result files.

The measuring pieces (timing with repeats, CPU meters, cache control, machine facts) live in
``hubfs.benchmark``, which ``hubfs bench`` uses too; they are re-exported here. Every result file
carries the machine facts next to the raw numbers of each measurement (every repeat, not only
the median), so a figure can be checked and re-derived later. Sizes are decimal in rates
(MB/s = 10**6 bytes a second, as ``hubfs.progress`` prints them) and binary in data sizes
(``--size-mib``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hubfs.benchmark import (
    MB,
    MIB,
    CacheDrop,
    CpuMeter,
    Measurement,
    drop_caches,
    filesystem_of,
    machine_facts,
    settle,
    time_repeats,
    timed,
    tree_bytes,
    wait_quiet,
    warm,
)

__all__ = [
    "MB",
    "MIB",
    "CacheDrop",
    "CpuMeter",
    "Measurement",
    "drop_caches",
    "filesystem_of",
    "machine_facts",
    "make_weights",
    "page_cache_probe",
    "settle",
    "time_repeats",
    "timed",
    "tree_bytes",
    "wait_quiet",
    "warm",
    "write_result",
]

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


# -- page cache
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


def mount_status(mountpoint: Path) -> dict[str, Any]:
    """``hubfs status MNT --json``."""
    return json.loads(hubfs_cli("status", str(mountpoint), "--json").stdout)


def copied_on_demand(mountpoint: Path, path: Path) -> float:
    """Seconds from the second read-only open of ``path`` (an open and close each) until the
    copy on demand that open starts is done (hubfs.materialise: a content stored as chunk
    references is copied into an object at its second open, in the background), so that no
    read measured after it contains the copy."""
    for _ in range(2):
        start = time.perf_counter()
        os.close(os.open(path, os.O_RDONLY))
    while mount_status(mountpoint)["copies_under_way"]:
        time.sleep(0.01)
    return time.perf_counter() - start


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
