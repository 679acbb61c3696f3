"""A small in-place update of a big stored file: 4 KiB written into 1 GiB, then close.

What a program using hubfs as its whole cache does all the time (a sqlite page, a pip cache
entry, an index file rewritten in place). Issue 9 asks that it cost what was written, not what
the file holds: under 50 ms from open to close.

Per repeat, on the mount and on a native file of the same size on the same disk:

* ``write+close``: ``open(O_WRONLY)``, ``pwrite`` 4 KiB at a random 4 KiB-aligned offset,
  ``close``: what the program waits for;
* ``write+fsync+close``: the same with ``fsync`` before the close (the program asks for it
  to be durable);
* ``stored``, mount only: from ``open`` until the store's index holds the new content, seen
  from outside the daemon as a read-only ``Store(...).stats()`` whose ``unreferenced_bytes``
  or ``unique_bytes`` changed (the old chunk around the write lost its last reference and a new
  one took its place). That is when the update is in the index and no longer only in staging;
  polled every ``--poll-s``, so it is accurate to about that.

The 4 KiB written back is checked through the mount after each repeat, and at the end the
store is unmounted (timed) and verified.

    PYTHONPATH=$PWD .venv/bin/python bench/inplace.py --size-mib 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    MIB,
    HubfsMount,
    Measurement,
    filesystem_of,
    machine_facts,
    syncfs,
    write_result,
)

from hubfs.store import Store

log = logging.getLogger("bench.inplace")
WRITE_BYTES = 4096
TARGET_CLOSE_S = 0.050  # issue 9: under 50 ms


def index_marks(store: Path) -> tuple[int, int, int]:
    """(files, unique bytes, unreferenced bytes) as the index holds them now."""
    with Store(store, readonly=True) as opened:
        stats = opened.stats()
    return stats["files"], stats["unique_bytes"], stats["unreferenced_bytes"]


def wait_until(pred: Any, timeout_s: float, poll_s: float) -> float | None:
    """Seconds until ``pred()`` is true (None at ``timeout_s``)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if pred():
            return time.perf_counter() - start
        time.sleep(poll_s)
    return None


def write_file(path: Path, size: int, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.writelines(rng.bytes(64 * MIB) for _ in range(size // (64 * MIB)))
        f.write(rng.bytes(size % (64 * MIB)))


def update(path: Path, offset: int, data: bytes, fsync: bool) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--poll-s", type=float, default=0.02)
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="longest wait for one update to be stored")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hubfs-bench-inplace"))
    parser.add_argument("--mount-args", default="")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = args.size_mib * MIB
    work: Path = args.workdir
    native = work / "native"
    shutil.rmtree(native, ignore_errors=True)
    native.mkdir(parents=True)
    rng = random.Random(0)
    times: dict[str, list[float]] = {}
    misses: dict[str, int] = {}
    checks_failed = 0

    def add(name: str, seconds: float | None) -> None:
        if seconds is None:
            misses[name] = misses.get(name, 0) + 1
        else:
            times.setdefault(name, []).append(seconds)

    mount = HubfsMount(work / "store", work / "mnt", *args.mount_args.split())
    with mount:
        log.info("writing %d MiB natively and through the mount ...", args.size_mib)
        write_file(native / "big.bin", size, seed=1)
        syncfs(native)  # else the first native fsync below flushes the whole file
        start = time.perf_counter()
        write_file(mount.path / "big.bin", size, seed=1)
        first_close_s = time.perf_counter() - start
        first_stored_s = wait_until(lambda: index_marks(mount.store)[0:2] == (1, size),
                                    args.timeout_s, 0.2)
        log.info("first write: close after %.1f s, stored %.1f s later", first_close_s,
                 first_stored_s or float("nan"))
        for rep in range(args.repeats):
            for fsync in (False, True):
                label = "write+fsync+close" if fsync else "write+close"
                offset = rng.randrange(size // WRITE_BYTES) * WRITE_BYTES
                data = os.urandom(WRITE_BYTES)
                add(f"{label} native", update(native / "big.bin", offset, data, fsync))
                before = index_marks(mount.store)
                start = time.perf_counter()
                add(f"{label} hubfs", update(mount.path / "big.bin", offset, data, fsync))

                def changed(before: tuple[int, int, int] = before) -> bool:
                    now = index_marks(mount.store)
                    return now[1] != before[1] or now[2] != before[2]

                stored = wait_until(changed, args.timeout_s, args.poll_s)
                add(f"{label}, stored hubfs",
                    None if stored is None else time.perf_counter() - start)
                with open(mount.path / "big.bin", "rb") as f:
                    f.seek(offset)
                    if f.read(WRITE_BYTES) != data:
                        checks_failed += 1
                        log.error("the 4 KiB written at %d do not read back", offset)
                log.info("repeat %d %-18s close %.3f s (native %.4f s), stored %s", rep, label,
                         times[f"{label} hubfs"][-1], times[f"{label} native"][-1],
                         "never" if stored is None else f"{time.perf_counter() - start:.2f} s")
    verify = mount.verify()
    problems = mount.log_problems()
    shutil.rmtree(native, ignore_errors=True)

    measurements = [Measurement(name, WRITE_BYTES, secs, {"not_stored_in_time": misses.get(
        name, 0)}) for name, secs in times.items()]
    rows: list[dict[str, Any]] = []
    by = {m.name: m for m in measurements}
    for label in ("write+close", "write+fsync+close"):
        for suffix, native_name in (("", f"{label} native"), (", stored", f"{label} native")):
            name = f"{label}{suffix}"
            hub = by.get(f"{name} hubfs")
            nat = by[native_name]
            rows.append({"name": name, "unit": "updates", "ops": 1,
                         "native_s": round(nat.median_s, 6),
                         "hubfs_s": None if hub is None else round(hub.median_s, 6),
                         "native_per_s": round(1 / nat.median_s, 1),
                         "hubfs_per_s": None if hub is None else round(1 / hub.median_s, 2),
                         "ratio": None if hub is None else round(hub.median_s / nat.median_s, 1),
                         "target_ratio": None,
                         "target_s": TARGET_CLOSE_S if not suffix and label == "write+close"
                         else None})
    fs_type = filesystem_of(work)["type"]
    print(f"\n4 KiB into a {args.size_mib} MiB file; native on {fs_type} (same disk); "
          f"median of {args.repeats}")
    for row in rows:
        hub = "never" if row["hubfs_s"] is None else f"{row['hubfs_s'] * 1000:9.1f} ms"
        target = f"  (target < {row['target_s'] * 1000:.0f} ms)" if row["target_s"] else ""
        print(f"{row['name']:26s} hubfs {hub}  native {row['native_s'] * 1000:7.2f} ms{target}")
    print(f"first write of the file: close {first_close_s:.1f} s, stored "
          f"{first_stored_s if first_stored_s is not None else float('nan'):.1f} s later; "
          f"hubfs umount {mount.umount_s or 0:.1f} s; verify: "
          f"{'clean' if verify['ok'] else 'PROBLEMS ' + ' | '.join(verify['output'])}; "
          f"read-back failures: {checks_failed}; daemon log problems: {len(problems)}")
    extra = {"versus_native": rows, "native_filesystem": fs_type, "size_bytes": size,
             "first_write_close_s": round(first_close_s, 3),
             "first_write_stored_s": first_stored_s, "umount_s": mount.umount_s,
             "verify": verify, "read_back_failures": checks_failed,
             "daemon_log_problems": problems[:20]}
    path = write_result("inplace", measurements, machine_facts(work), extra, args.json)
    print(f"results: {path}")
    subprocess.run([sys.executable, str(Path(__file__).with_name("plot.py")), str(path),
                    "-o", str(path.with_suffix(".png"))], check=False)
    return 0 if verify["ok"] and not checks_failed else 1


if __name__ == "__main__":
    sys.exit(main())
