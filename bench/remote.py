"""The object-store client next to plain GETs and PUTs on the same weed mini, as ratios.

A floor for the issue-11 benchmark (a cold read on node B through its mount vs a direct GET): what
``Remote.read_content`` (chunk table, BLAKE3 checks) and ``Remote.put_content`` (checks while
streaming, HEAD, conditional PUT) cost over boto3 alone. Each repeat runs every variant once,
interleaved, so a neighbour's load hits all of them alike; figures are medians.

    PYTHONPATH=$PWD .venv/bin/python bench/remote.py --size-mib 128 --repeats 7
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MB, MIB, Measurement, machine_facts, timed, write_result
from hubfs.remote import Remote, content_key
from tests.cluster_helpers import table_of
from tests.seaweed import BUCKET, Seaweed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--range-mib", type=int, default=4, help="size of each ranged read")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="chunk size of the content")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="hubfs-bench-remote-") as tmp:
        server = Seaweed(Path(tmp))
        server.start()
        try:
            os.environ.update(server.env())
            return run(server, args)
        finally:
            server.stop()


def one_repeat(raw: Any, data: bytes, cid: bytes, lengths: tuple[int, ...],
               ids: tuple[bytes, ...], step: int, rep: int) -> dict[str, float]:
    """Every variant once, on a fresh prefix (so put_content really uploads)."""
    remote = Remote(f"s3://{BUCKET}/bench-{rep}")
    key = remote.url.key(content_key(cid))
    out = {"put raw": timed(lambda: raw.put_object(Bucket=BUCKET, Key=f"raw-{rep}", Body=data)),
           "put_content": timed(lambda: remote.put_content(cid, lengths, ids,
                                                           lambda: io.BytesIO(data)))}
    offset = Remote(remote.url).content_table(cid).data_offset
    out["get whole raw"] = timed(lambda: raw.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def raw_ranges() -> None:
        for off in range(0, len(data), step):
            rng = f"bytes={offset + off}-{offset + off + step - 1}"
            raw.get_object(Bucket=BUCKET, Key=key, Range=rng)["Body"].read()

    def our_ranges() -> None:
        reader = Remote(remote.url)  # cold: the table is fetched too
        for off in range(0, len(data), step):
            reader.read_content(cid, off, step)

    out["get ranges raw"] = timed(raw_ranges)
    out["read_content ranges"] = timed(our_ranges)
    return out


def run(server: Seaweed, args: argparse.Namespace) -> int:
    data = os.urandom(args.size_mib * MIB)
    cid, lengths, ids = table_of(data, args.chunk_kib * 1024)
    raw: Any = server.client(timeout_s=60)
    step = args.range_mib * MIB
    names = ["put raw", "put_content", "get whole raw", "get ranges raw", "read_content ranges"]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name, secs in one_repeat(raw, data, cid, lengths, ids, step, rep).items():
            seconds[name].append(secs)
    results = [Measurement(n, len(data), s) for n, s in seconds.items()]
    by = {m.name: m for m in results}
    ratios = {
        "put_content / put raw": by["put raw"].median_s / by["put_content"].median_s,
        "read_content ranges / get ranges raw":
            by["get ranges raw"].median_s / by["read_content ranges"].median_s,
        "read_content ranges / get whole raw":
            by["get whole raw"].median_s / by["read_content ranges"].median_s,
    }
    for m in results:
        print(f"{m.name:22s} {m.mbps:8.0f} MB/s (median of {len(m.seconds)})")
    for name, ratio in ratios.items():
        print(f"{name:40s} {ratio:.2f}x")
    path = write_result("remote", results, machine_facts(),
                        {"ratios": {k: round(v, 3) for k, v in ratios.items()},
                         "size_bytes": len(data), "range_bytes": step,
                         "chunk_bytes": args.chunk_kib * 1024, "mb": MB})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
