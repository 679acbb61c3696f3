"""Metadata-heavy work through a hubfs mount against a plain directory on the same disk, in one run.

Real trees, made once from packages installed in this venv into uncompressed tarballs:

* ``packages``: whole package trees (default sympy, networkx, mypy: ~6,000 entries, ~110 MB),
  as pip or a ``datasets`` extraction would lay them down;
* ``small``: the first ``--small-entries`` entries of ``torch/include`` (C++ headers, a few KB
  each), the many-small-files case (torch.hub zip extraction, tokenizer trees).

For each tree, each phase runs on the native directory and then on the mount, one after the
other, so the ratio compares like with like on a shared machine:

* ``untar``: GNU ``tar -xf`` (creates/s: entries a second); ``syncfs`` right after is timed apart
  and added in ``untar+syncfs`` (a closed file on hubfs is already committed; on ext4 it is
  only in the page cache until then);
* ``read``: every file read back and hashed; the two trees must hash the same;
* ``rename``: every regular file renamed in place (``f`` -> ``f.renamed``; renames/s);
* ``rm -rf``: the whole tree (unlinks/s: entries a second).

Then ``hubfs umount`` (timed: it waits until everything is stored) and ``hubfs verify``.
Results go to ``bench/results/untar-<time>.json`` and a PNG next to it (``bench/plot.py``).

    PYTHONPATH=$PWD .venv/bin/python bench/untar.py              # ~2-4 minutes on current main
    PYTHONPATH=$PWD .venv/bin/python bench/untar.py --max-entries 1000 --trees small
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    CpuMeter,
    HubfsMount,
    Measurement,
    filesystem_of,
    machine_facts,
    syncfs,
    wait_quiet,
    write_result,
)

log = logging.getLogger("bench.untar")

SITE_PACKAGES = Path(next(p for p in sys.path if p.endswith("site-packages")))
DEFAULT_PACKAGES = ("sympy", "networkx", "mypy")
SMALL_SOURCE = "torch/include"
TARGET_RATIO = 3.0  # issue 9: untar and rm -rf within 3x native


@dataclass(frozen=True)
class Tree:
    name: str
    tarball: Path
    entries: int  # files, directories and symlinks
    files: int
    nbytes: int


def make_tarball(name: str, sources: list[Path], out: Path, max_entries: int) -> Tree:
    """An uncompressed tarball of ``sources`` (walked in sorted order, at most
    ``max_entries`` entries, 0 for all), made once and reused: the tree is the same every run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        members: list[tuple[Path, str]] = []
        for src in sources:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                here = Path(dirpath)
                members.append((here, str(here.relative_to(src.parent))))
                members += [(here / f, str((here / f).relative_to(src.parent)))
                            for f in sorted(filenames)]
        if max_entries:
            members = members[:max_entries]
        tmp = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for path, arcname in members:
                tar.add(path, arcname=arcname, recursive=False)
        os.replace(tmp, out)
    entries = files = nbytes = 0
    with tarfile.open(out) as tar:
        for member in tar:
            entries += 1
            if member.isfile():
                files += 1
                nbytes += member.size
    return Tree(name, out, entries, files, nbytes)


# -- the phases; each returns how many operations it made
def untar(tree: Tree, dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xf", str(tree.tarball), "-C", str(dest)], check=True,
                   timeout=PHASE_TIMEOUT_S[0])
    return tree.entries


def read_all(tree: Tree, dest: Path) -> int:
    digests = {}
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            with open(path, "rb", buffering=0) as f:
                digests[str(path.relative_to(dest))] = hashlib.md5(f.read()).hexdigest()
    DIGESTS[str(dest)] = digests
    return len(digests)


def rename_all(tree: Tree, dest: Path) -> int:
    deadline = time.monotonic() + PHASE_TIMEOUT_S[0]
    count = 0
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            os.rename(os.path.join(dirpath, name), os.path.join(dirpath, name + ".renamed"))
            count += 1
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired("rename", PHASE_TIMEOUT_S[0])
    return count


def rm_rf(tree: Tree, dest: Path) -> int:
    subprocess.run(["rm", "-rf", str(dest)], check=True, timeout=PHASE_TIMEOUT_S[0])
    return tree.entries


PHASE_TIMEOUT_S = [600.0]
DIGESTS: dict[str, dict[str, str]] = {}
# name, what one operation is, the function, whether a target ratio applies
PHASES: list[tuple[str, str, Callable[[Tree, Path], int], bool]] = [
    ("untar", "creates", untar, True),
    ("read", "files", read_all, False),
    ("rename", "renames", rename_all, False),
    ("rm -rf", "unlinks", rm_rf, True),
]


def run_phase(fn: Callable[[Tree, Path], int], tree: Tree, dest: Path
              ) -> tuple[float | None, int, CpuMeter]:
    """Seconds (None when it did not finish in time), operations, the CPU meter."""
    with CpuMeter() as meter:
        try:
            ops = fn(tree, dest)
        except subprocess.TimeoutExpired:
            ops = -1
    return (None if ops < 0 else meter.wall_s), ops, meter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hubfs-bench-untar"),
                        help="holds the tarballs, the native trees, the store and the mount "
                        "(one disk, so native and hubfs compare on the same filesystem)")
    parser.add_argument("--trees", default="packages,small", help="which trees, comma-separated")
    parser.add_argument("--packages", default=",".join(DEFAULT_PACKAGES),
                        help="site-packages directories of the 'packages' tree")
    parser.add_argument("--max-entries", type=int, default=0,
                        help="cap on the entries of the 'packages' tree (0: all; bounds the run)")
    parser.add_argument("--small-entries", type=int, default=4000,
                        help=f"entries of the 'small' tree (from {SMALL_SOURCE})")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--phase-timeout-s", type=float, default=600.0,
                        help="a phase still running after this long is stopped and reported")
    parser.add_argument("--settle-s", type=float, default=2.0,
                        help="wait up to this long for the machine to go quiet before a phase")
    parser.add_argument("--mount-args", default="", help="extra `hubfs mount` arguments")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    PHASE_TIMEOUT_S[0] = args.phase_timeout_s

    work: Path = args.workdir
    trees: list[Tree] = []
    for name in args.trees.split(","):
        if name == "packages":
            packages = args.packages.split(",")
            trees.append(make_tarball(
                name, [SITE_PACKAGES / p for p in packages],
                work / "trees" / f"packages-{'-'.join(packages)}-{args.max_entries}.tar",
                args.max_entries))
        elif name == "small":
            trees.append(make_tarball(name, [SITE_PACKAGES / SMALL_SOURCE],
                                      work / "trees" / f"small-{args.small_entries}.tar",
                                      args.small_entries))
        else:
            parser.error(f"unknown tree {name!r}")
    for tree in trees:
        log.info("tree %s: %d entries (%d files), %.1f MB", tree.name, tree.entries, tree.files,
                 tree.nbytes / 1e6)

    native_root = work / "native"
    shutil.rmtree(native_root, ignore_errors=True)
    native_root.mkdir(parents=True)
    timings: dict[tuple[str, str, str], list[float | None]] = {}
    meters: dict[tuple[str, str, str], list[CpuMeter]] = {}
    ops_of: dict[tuple[str, str], int] = {}
    syncs: dict[tuple[str, str], list[float]] = {}
    mismatches: list[str] = []
    mount = HubfsMount(work / "store", work / "mnt", *args.mount_args.split())
    with mount:
        for rep in range(args.repeats):
            for tree in trees:
                dests = {"native": native_root / f"{tree.name}-{rep}",
                         "hubfs": mount.path / f"{tree.name}-{rep}"}
                for phase, _, fn, _ in PHASES:
                    for target, dest in dests.items():
                        wait_quiet(args.settle_s)
                        seconds, ops, meter = run_phase(fn, tree, dest)
                        key = (tree.name, phase, target)
                        timings.setdefault(key, []).append(seconds)
                        meters.setdefault(key, []).append(meter)
                        ops_of[(tree.name, phase)] = max(ops, ops_of.get((tree.name, phase), 0))
                        shown = "did not finish" if seconds is None else f"{seconds:8.2f} s"
                        log.info("%-8s %-7s %-6s %s", tree.name, phase, target, shown)
                        if phase == "untar" and seconds is not None:
                            start = time.perf_counter()
                            syncfs(dest)
                            syncs.setdefault((tree.name, target), []).append(
                                time.perf_counter() - start)
                    if phase == "read":
                        a, b = (DIGESTS.get(str(d)) for d in dests.values())
                        if a != b:
                            bad = sorted(k for k in set(a or {}) | set(b or {})
                                         if (a or {}).get(k) != (b or {}).get(k))
                            mismatches += [f"{tree.name}: {k}" for k in bad]
                            log.error("%d files differ between native and hubfs: %s", len(bad),
                                      bad[:5])
    verify = mount.verify()
    log.info("hubfs umount %.2f s; hubfs verify %s (%.1f s)", mount.umount_s or 0,
             "clean" if verify["ok"] else "FOUND PROBLEMS", verify["seconds"])
    problems = mount.log_problems()

    measurements: list[Measurement] = []
    rows: list[dict[str, Any]] = []
    for tree in trees:
        for phase, unit, _, targeted in PHASES:
            ops = ops_of.get((tree.name, phase), 0)
            row: dict[str, Any] = {"name": f"{tree.name}: {phase}", "unit": unit, "ops": ops}
            for target in ("native", "hubfs"):
                secs = timings[(tree.name, phase, target)]
                done = [s for s in secs if s is not None]
                measurements.append(Measurement(
                    f"{tree.name}: {phase} {target}", tree.nbytes, done or [float("inf")],
                    {"ops": ops, "unit": unit, "unfinished_runs": len(secs) - len(done),
                     "timeout_s": args.phase_timeout_s}, meters[(tree.name, phase, target)]))
                median = measurements[-1].median_s if done else None
                row[f"{target}_s"] = None if median is None else round(median, 4)
                row[f"{target}_per_s"] = None if not median else round(ops / median, 1)
            row["ratio"] = (round(row["hubfs_s"] / row["native_s"], 2)
                            if row["hubfs_s"] and row["native_s"] else None)
            row["target_ratio"] = TARGET_RATIO if targeted else None
            rows.append(row)
            if phase == "untar":  # durable on both sides: ext4 only after its syncfs
                synced = {t: (row[f"{t}_s"] + max(syncs[(tree.name, t)])
                              if row[f"{t}_s"] and (tree.name, t) in syncs else None)
                          for t in ("native", "hubfs")}
                rows.append({"name": f"{tree.name}: untar+syncfs", "unit": unit, "ops": ops,
                             **{f"{t}_s": None if v is None else round(v, 4)
                                for t, v in synced.items()},
                             **{f"{t}_per_s": None if not v else round(ops / v, 1)
                                for t, v in synced.items()},
                             "ratio": (round(synced["hubfs"] / synced["native"], 2)
                                       if synced["hubfs"] and synced["native"] else None),
                             "target_ratio": None})
    fs_type = filesystem_of(work)["type"]
    print(f"\nnative: {native_root} on {fs_type}; hubfs: {mount.path}, store {mount.store} "
          f"(same disk)")
    print(f"{'phase':20s} {'ops':>6s} {'native s':>9s} {'hubfs s':>9s} {'native/s':>9s} "
          f"{'hubfs/s':>9s} {'ratio':>7s}")
    for row in rows:
        def fmt(v: float | None, spec: str) -> str:
            return "DNF" if v is None else format(v, spec)
        print(f"{row['name']:20s} {row['ops']:6d} {fmt(row['native_s'], '9.2f')} "
              f"{fmt(row['hubfs_s'], '9.2f')} {fmt(row['native_per_s'], '9.0f')} "
              f"{fmt(row['hubfs_per_s'], '9.0f')} {fmt(row['ratio'], '6.1f')}x"
              + (f"  (target <= {row['target_ratio']:.0f}x)" if row["target_ratio"] else ""))
    for (tree_name, target), secs in syncs.items():
        print(f"syncfs after untar, {tree_name} {target}: {max(secs):.2f} s")
    print(f"hubfs umount {mount.umount_s or 0:.2f} s; verify: "
          f"{'clean' if verify['ok'] else 'PROBLEMS ' + ' | '.join(verify['output'])}; "
          f"daemon log problems: {len(problems)}; content mismatches: {len(mismatches)}")
    extra = {
        "trees": [{"name": t.name, "tarball": str(t.tarball), "entries": t.entries,
                   "files": t.files, "bytes": t.nbytes} for t in trees],
        "versus_native": rows,
        "native_filesystem": fs_type,
        "syncfs_after_untar_s": {f"{k[0]} {k[1]}": [round(s, 3) for s in v]
                                 for k, v in syncs.items()},
        "umount_s": round(mount.umount_s or 0, 3),
        "umount_error": mount.umount_error,
        "verify": verify,
        "daemon_log_problems": problems[:20],
        "content_mismatches": mismatches[:50],
    }
    path = write_result("untar", measurements, machine_facts(work), extra, args.json)
    shutil.rmtree(native_root, ignore_errors=True)
    print(f"results: {path}")
    png = path.with_suffix(".png")
    subprocess.run([sys.executable, str(Path(__file__).with_name("plot.py")), str(path),
                    "-o", str(png)], check=False)
    ok = verify["ok"] and not mismatches and not mount.umount_error
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
