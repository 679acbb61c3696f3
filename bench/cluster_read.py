"""Issue 11's read benchmark: node B reads data only the bucket holds, through its mount, next
to a direct GET of the same object from the same weed mini; then B reads it again (warm) next to
a native file. Ratios are GET time / mount time (>= 1 would be as fast as a plain GET). "Warm"
is B's read after two more opens: the second open of a fetched file copies it into an object
(hubfs.materialise), after which the kernel serves it.

Each repeat A writes a new file of random bytes and both nodes sync, so B's read is cold every
time (B never held the bytes; the kernel never cached them). Figures are medians.

    PYTHONPATH=$PWD .venv/bin/python bench/cluster_read.py --size-mib 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MB,
    MIB,
    Measurement,
    copied_on_demand,
    hubfs_cli,
    machine_facts,
    timed,
    write_result,
)
from tests.seaweed import BUCKET, Seaweed

READ_BYTES = 1 << 20


def read_file(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_BYTES):
            n += len(chunk)
    return n


def cli(*args: str) -> str:
    done = hubfs_cli(*args)
    if done.returncode != 0:
        raise RuntimeError(f"hubfs {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hubfs-bench-cluster-") as tmp_name:
        tmp = Path(tmp_name)
        server = Seaweed(tmp / "weed")
        server.start()
        mounts: list[Path] = []
        try:
            os.environ.update(server.env())
            url = f"s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}"
            for name in ("a", "b"):
                store, mnt = tmp / f"store-{name}", tmp / f"mnt-{name}"
                mnt.mkdir()
                cli("init", str(store), "--remote", url, "--node", name)
                cli("mount", str(store), str(mnt))
                mounts.append(mnt)
            return run(server, mounts[0], mounts[1], tmp, args)
        finally:
            for mnt in mounts:
                if hubfs_cli("umount", str(mnt)).returncode != 0:
                    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
            server.stop()


def run(server: Seaweed, a: Path, b: Path, tmp: Path, args: argparse.Namespace) -> int:
    raw: Any = server.client(timeout_s=60)
    size = args.size_mib * MIB
    names = ["cold read on B", "GET whole object", "warm read on B", "native read"]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    native = tmp / "native.bin"
    for rep in range(args.repeats):
        data = os.urandom(size)
        (a / f"f{rep}.bin").write_bytes(data)
        native.write_bytes(data)
        cli("sync", str(a))
        cli("sync", str(b))
        seconds["cold read on B"].append(timed(lambda r=rep: read_file(b / f"f{r}.bin")))
        keys = [o for o in raw.list_objects_v2(Bucket=BUCKET)["Contents"]
                if o["Size"] > size]
        key = max(keys, key=lambda o: o["LastModified"])["Key"]
        seconds["GET whole object"].append(
            timed(lambda k=key: raw.get_object(Bucket=BUCKET, Key=k)["Body"].read()))
        copied_on_demand(b, b / f"f{rep}.bin")  # the kernel serves it from then on
        seconds["warm read on B"].append(timed(lambda r=rep: read_file(b / f"f{r}.bin")))
        seconds["native read"].append(timed(lambda: read_file(native)))
    results = [Measurement(n, size, s) for n, s in seconds.items()]
    by = {m.name: m for m in results}
    ratios = {
        "cold read on B vs GET": by["GET whole object"].median_s / by["cold read on B"].median_s,
        "warm read on B vs native": by["native read"].median_s / by["warm read on B"].median_s,
    }
    for m in results:
        print(f"{m.name:22s} {m.mbps:8.0f} MB/s (median of {len(m.seconds)})")
    for name, ratio in ratios.items():
        print(f"{name:30s} {ratio:.2f}x")
    path = write_result("cluster_read", results, machine_facts(),
                        {"ratios": {k: round(v, 3) for k, v in ratios.items()},
                         "size_bytes": size, "mb": MB})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
