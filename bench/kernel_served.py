"""Kernel-served bytes (issue 10): a 1 GiB model through a root-run mount against native.

In one run, on one disk (WORKDIR holds the native files, the store and the mount point):

- **download**: the model written through the mount (write, close, and hubfs's commit done:
  the staging file has become its object) against native write + fsync of the same bytes;
- **copy on demand**: the second open of ``model.pt``, whose tensors are the safetensors
  file's chunks, starts making its object in the background (timed alone until done, before
  any read measurement);
- **reads** of the committed model: sequential cold and hot, random 4 KiB cold and hot,
  ``safetensors.torch.load_file`` and ``torch.load(mmap=True)`` cold and hot (every page
  touched), each alternating native and hubfs runs; a cold run starts after a drop of the
  page cache, a series of hot runs after a drop and a read(2) of both files, so that both are
  cached the same way (``hubfs.benchmark.cache_alike`` says why that matters);
- **three users**: on a fresh store, the model written by three users into their own trees;
  after the page cache is dropped, each reads their copy: how much the page cache grows
  (/proc/meminfo Cached), and the store's bytes on disk.

Prints hubfs/native time ratios against the issue's targets, and writes JSON and a PNG
(bench/plot.py) to bench/results/.

    .venv/bin/python bench/kernel_served.py [--size-mib 1024] [--workdir /var/tmp/hubfs-ks]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MIB,
    HubfsMount,
    copied_on_demand,
    hubfs_cli,
    make_weights,
    mount_status,
    write_result,
)
from hubfs.benchmark import (
    RANDOM_READ_BYTES,
    Measurement,
    cache_alike,
    drop_caches,
    load_safetensors,
    load_torch_mmap,
    machine_facts,
    measure_pair,
    read_random,
    read_sequential,
    warm,
)

# name -> the largest hubfs/native time ratio the issue accepts
TARGETS = {
    "download (write, close, stored)": 1 / 0.8,
    "sequential read cold": 1 / 0.95,
    "sequential read hot": 1 / 0.9,
    "random 4 KiB cold": 1 / 0.9,
    "random 4 KiB hot": 1 / 0.85,
    "safetensors load_file cold": 1.1,
    "safetensors load_file hot": 1.1,
    "torch.load(mmap) cold": 1.1,
    "torch.load(mmap) hot": 1.1,
}
# Hot random reads go over the offsets this many times: one pass of 4,000 reads takes ~8 ms,
# too short to time on a busy machine (ratios of 1.2-1.6 one pass, 1.1 over ten).
HOT_RANDOM_ROUNDS = 10
USERS = 3
PAGE_CACHE_TARGET_X = 1.1  # the page cache may grow by this much of one copy, for 3 users
STORED_TARGET_X = 1.05


def warmer(pair: tuple[Path, Path]) -> Callable[[str], None]:
    """``prepare`` of a hot run: read its own file (native or hubfs), so it is cached."""
    return lambda label: warm(pair[0] if label == "native" else pair[1])


def cached_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Cached line in /proc/meminfo")


def wait_stored(mnt: Path) -> None:
    """Until the daemon has committed every closed file."""
    while mount_status(mnt)["staged_files"]:
        time.sleep(0.01)


def copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        while block := f.read(8 * MIB):
            g.write(block)


def download(src: Path, native_dst: Path, mnt: Path, repeats: int) -> tuple[Measurement,
                                                                              Measurement]:
    """Write + fsync natively; write + close + commit through the mount (a new name each
    time, so every run stores a new file, as a download does)."""
    times: dict[str, list[float]] = {"native": [], "hubfs": []}
    for i in range(repeats):
        warm(src)
        start = time.perf_counter()
        with open(native_dst, "wb") as g, open(src, "rb") as f:
            while block := f.read(8 * MIB):
                g.write(block)
            os.fsync(g.fileno())
        times["native"].append(time.perf_counter() - start)
        native_dst.unlink()
        warm(src)
        target = mnt / f"download-{i}.safetensors"
        start = time.perf_counter()
        copy_file(src, target)
        wait_stored(mnt)
        times["hubfs"].append(time.perf_counter() - start)
        target.unlink()
    size = src.stat().st_size
    name = "download (write, close, stored)"
    return (Measurement(f"{name}/native", size, times["native"]),
            Measurement(f"{name}/hubfs", size, times["hubfs"]))


def three_users(src: Path, mnt: Path, store: Path) -> dict[str, float]:
    for user in range(USERS):
        home = mnt / f"user{user}" / ".cache" / "models"
        home.mkdir(parents=True, exist_ok=True)
        copy_file(src, home / "model.safetensors")
    wait_stored(mnt)
    size = src.stat().st_size
    drop_caches((store,))
    before = cached_bytes()
    for user in range(USERS):
        read_sequential(mnt / f"user{user}" / ".cache" / "models" / "model.safetensors")
    grown = cached_bytes() - before
    stats = json.loads(hubfs_cli("stats", str(store), "--json").stdout)
    return {"file_bytes": size, "page_cache_growth_bytes": grown,
            "page_cache_growth_x": round(grown / size, 3),
            "stored_bytes": stats["stored_bytes"],
            "stored_x_of_one_copy": round(stats["stored_bytes"] / size, 4),
            "objects": stats["objects"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hubfs-bench-ks"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-reads", type=int, default=4000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: passthrough needs a root-run mount, and cold runs drop the page "
              "cache", file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file

    work: Path = args.workdir
    native = work / "native"
    native.mkdir(parents=True, exist_ok=True)
    weights = native / "model.safetensors"
    if not weights.exists() or weights.stat().st_size < args.size_mib * MIB:
        make_weights(weights, args.size_mib)
    pt = native / "model.pt"
    if not pt.exists():
        torch.save(load_file(str(weights)), str(pt))
    size = weights.stat().st_size
    rng = random.Random(0)
    offsets = [rng.randrange(0, size - RANDOM_READ_BYTES) // 4096 * 4096
               for _ in range(args.random_reads)]

    measurements: list[Measurement] = []
    with HubfsMount(work / "store", work / "mnt") as mount:
        mnt, store = mount.path, mount.store
        mode = mount_status(mnt)
        print(f"read mode: {mode['read_mode']} ({mode['read_mode_why']})", file=sys.stderr)
        print("measuring the download ...", file=sys.stderr, flush=True)
        measurements += download(weights, native / "download.tmp", mnt, args.repeats)
        copy_file(weights, mnt / "model.safetensors")
        copy_file(pt, mnt / "model.pt")
        wait_stored(mnt)
        copy_on_demand_s = copied_on_demand(mnt, mnt / "model.pt")

        def cold(_label: str) -> None:
            drop_caches((native, store))

        plan: list[tuple[str, int, Callable[[Path], object], str]] = [
            ("sequential read cold", size, read_sequential, "model.safetensors"),
            ("sequential read hot", size, read_sequential, "model.safetensors"),
            ("random 4 KiB cold", len(offsets) * RANDOM_READ_BYTES,
             lambda p: read_random(p, offsets), "model.safetensors"),
            ("random 4 KiB hot", HOT_RANDOM_ROUNDS * len(offsets) * RANDOM_READ_BYTES,
             lambda p: read_random(p, offsets * HOT_RANDOM_ROUNDS), "model.safetensors"),
            ("safetensors load_file cold", size, load_safetensors, "model.safetensors"),
            ("safetensors load_file hot", size, load_safetensors, "model.safetensors"),
            ("torch.load(mmap) cold", size, load_torch_mmap, "model.pt"),
            ("torch.load(mmap) hot", size, load_torch_mmap, "model.pt"),
        ]
        for name, nbytes, fn, file in plan:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            pair = (native / file, mnt / file)
            if name.endswith("hot"):
                # both sides cached alike, by read(2) (hubfs.benchmark.cache_alike says why)
                measurements += measure_pair(name, nbytes, fn, [pair], args.repeats + 2,
                                             warmer(pair),
                                             begin=partial(cache_alike, pair, (native, store)))
            else:
                measurements += measure_pair(name, nbytes, fn, [pair], args.repeats, cold)
        served = mount_status(mnt)
    verify = mount.verify()
    print("measuring three users ...", file=sys.stderr, flush=True)
    with HubfsMount(work / "store-users", work / "mnt-users") as users_mount:
        users = three_users(weights, users_mount.path, users_mount.store)
    shutil.rmtree(work / "store-users", ignore_errors=True)

    rows = []
    by_name = {m.name: m for m in measurements}
    print(f"\n{'measurement':34s} {'native s':>9s} {'hubfs s':>9s} {'time x':>7s} "
          f"{'target':>7s}")
    for name, target in TARGETS.items():
        nat, hub = by_name[f"{name}/native"], by_name[f"{name}/hubfs"]
        ratio = hub.median_s / nat.median_s
        verdict = "PASS" if ratio <= target else "MISS"
        print(f"{name:34s} {nat.median_s:9.3f} {hub.median_s:9.3f} {ratio:7.2f} "
              f"{'<=' + format(target, '.2f'):>7s} {verdict}")
        rows.append({"name": name, "unit": "runs", "native_per_s": 1 / nat.median_s,
                     "hubfs_per_s": 1 / hub.median_s, "ratio": round(ratio, 3),
                     "target_ratio": round(target, 3), "pass": ratio <= target})
    print(f"\nthree users, one {size / 2**30:.2f} GiB model each: page cache grew by "
          f"{users['page_cache_growth_x']:.2f}x one copy (target <= {PAGE_CACHE_TARGET_X}); "
          f"stored {users['stored_x_of_one_copy']:.3f}x one copy (target <= "
          f"{STORED_TARGET_X}); {users['objects']} object(s)")
    print(f"model.pt's copy on demand (its second open): {copy_on_demand_s:.2f} s, "
          f"{served['materialised_bytes'] / 2**30:.2f} GiB materialised")
    print(f"verify after unmount: {'clean' if verify['ok'] else 'FAILED'}")
    extra = {"versus_native": rows, "native_filesystem": machine_facts(work).get("filesystem"),
             "three_users": users, "copy_on_demand_s": round(copy_on_demand_s, 3),
             "materialised_bytes": served["materialised_bytes"], "read_mode": served["read_mode"],
             "read_mode_why": served["read_mode_why"], "verify": verify,
             "daemon_log_problems": mount.log_problems()[:20], "size_mib": args.size_mib}
    path = write_result("kernel-served", measurements, machine_facts(work), extra, args.json)
    subprocess.run([sys.executable, str(Path(__file__).with_name("plot.py")), str(path), "-o",
                    str(path.with_suffix(".png"))], check=False)
    print(f"results: {path} (and .png)")
    shutil.rmtree(work / "store", ignore_errors=True)
    return 0 if verify["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
