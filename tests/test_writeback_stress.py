"""Every client's cache pattern under concurrency: write a temp file, close, rename, open, read.

Several writer processes loop write -> close -> rename -> open -> read on one mount with
``--ingest-step-mib 1``, sizes from 0 to 24 MiB clustered around the ingest step. Each renamed
name goes down a pipe to a reader in another process, which opens it at once and checks every
byte, then re-opens it a few times to check its size, head and tail (each open races the
commit that the close started). The content is derived from the seed and size in the name, so a reader needs nothing else.
A wrong read is a file that opens but whose size or bytes differ: a client loading a truncated
model. The run is bounded in time and iterations; the store must verify clean afterwards.

The workers run this file as a script (``python test_writeback_stress.py writer|reader``).
``HUBFS_STRESS_S`` (default 40) and ``HUBFS_STRESS_WRITERS`` (default 4) tune a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
STEP_MIB = 1
MAX_BYTES = 24 * MIB
KEEP_FILES = 8  # each writer deletes its files older than this: bounded disk use
SAFETENSORS_LEN = struct.Struct("<Q")
PROBES = 3  # quick re-opens by the reader after its full read of each file
PROBE_BYTES = 4096


# -- content, derived from the name alone
def file_name(writer: int, iteration: int, seed: int, size: int) -> str:
    return f"w{writer}-{iteration:05d}-s{seed}-n{size}.bin"


def parse_name(name: str) -> tuple[int, int]:
    """(seed, size) from a name made by ``file_name``."""
    parts = name.removesuffix(".bin").split("-")
    return int(parts[2][1:]), int(parts[3][1:])


def content(seed: int, size: int) -> bytes:
    """Random bytes; an odd seed starts them with a safetensors header of one U8 tensor, so
    the ingest also meets files whose chunking follows tensor boundaries."""
    import numpy as np

    body = np.random.default_rng(seed).bytes(size)
    if seed % 2 == 0 or size < 256:
        return body
    header = b'{"t":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}'
    n = size - SAFETENSORS_LEN.size - len(header % (size, size))  # digits never shrink it
    text = (header % (n, n)).ljust(size - SAFETENSORS_LEN.size - n)
    head = SAFETENSORS_LEN.pack(len(text)) + text
    return head + body[len(head):]


def pick_size(rng: random.Random) -> int:
    """0-24 MiB, most around the 1 MiB ingest step (a front ingest starts at each step)."""
    roll = rng.random()
    if roll < 0.12:
        return rng.choice([0, 1, rng.randrange(2, 64 * 1024)])
    if roll < 0.62:
        return max(0, MIB + rng.choice([0, -1, 1, rng.randrange(-256 * 1024, 256 * 1024)]))
    if roll < 0.85:
        return rng.randrange(2, 5) * MIB + rng.randrange(-64 * 1024, 64 * 1024)
    if roll < 0.96:
        return rng.randrange(4 * MIB, 12 * MIB)
    return rng.randrange(12 * MIB, MAX_BYTES + 1)


def check(path: Path, expected: bytes | None = None) -> dict[str, Any] | None:
    """Open and read ``path`` at once; None when its bytes are right, else what was wrong.
    A file already deleted by its writer raises FileNotFoundError."""
    seed, size = parse_name(path.name)
    with open(path, "rb") as f:
        st_size = os.fstat(f.fileno()).st_size
        got = f.read()
    expected = content(seed, size) if expected is None else expected
    if st_size == size and got == expected:
        return None
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                 min(len(got), size))
    return {"name": path.name, "expected": size, "st_size": st_size, "read": len(got),
            "first_wrong_byte": first}


def probe(path: Path, expected: bytes) -> dict[str, Any] | None:
    """A quick open: size, first and last 4 KiB. Each open races the file's commit again,
    which is where a stale size or stale content shows."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st_size = os.fstat(fd).st_size
        head = os.pread(fd, PROBE_BYTES, 0)
        tail_at = max(len(expected) - PROBE_BYTES, 0)
        tail = os.pread(fd, PROBE_BYTES, tail_at)
    finally:
        os.close(fd)
    if (st_size == len(expected) and head == expected[:PROBE_BYTES]
            and tail == expected[tail_at:]):
        return None
    return {"name": path.name, "expected": len(expected), "st_size": st_size,
            "read": len(head), "first_wrong_byte": -1, "probe": True}


# -- the worker processes
def writer(directory: Path, ident: int, deadline: float, max_iterations: int,
           announce_fd: int) -> dict[str, Any]:
    rng = random.Random(ident * 7919 + int(time.time()))
    done: list[Path] = []
    wrong: list[dict[str, Any]] = []
    nbytes = 0
    iteration = 0
    for iteration in range(max_iterations):
        if time.monotonic() > deadline:
            break
        seed, size = rng.randrange(1 << 30), pick_size(rng)
        data = content(seed, size)
        tmp = directory / f"w{ident}-{iteration:05d}.incomplete"
        piece = rng.choice([64 * 1024, 256 * 1024, MIB, len(data) or 1])
        with open(tmp, "wb") as f:
            f.writelines(data[start:start + piece] for start in range(0, len(data), piece))
        final = directory / file_name(ident, iteration, seed, size)
        os.rename(tmp, final)
        os.write(announce_fd, final.name.encode() + b"\n")
        problem = check(final)
        if problem is not None:
            wrong.append({**problem, "by": f"writer {ident}"})
        nbytes += size
        done.append(final)
        if len(done) > KEEP_FILES:
            done.pop(0).unlink()
    return {"round_trips": iteration, "bytes": nbytes, "wrong": wrong}


def reader(directory: Path, announce_fd: int) -> dict[str, Any]:
    checked = gone = 0
    wrong: list[dict[str, Any]] = []
    with os.fdopen(announce_fd, "rb") as announcements:
        for line in announcements:  # until every writer has closed its end
            path = directory / line.strip().decode()
            expected = content(*parse_name(path.name))
            try:
                problems = [check(path, expected)]
                problems += [probe(path, expected) for _ in range(PROBES)]
            except FileNotFoundError:
                gone += 1
                continue
            checked += 1
            wrong += [{**p, "by": "reader"} for p in problems if p is not None]
    return {"checked": checked, "gone": gone, "wrong": wrong}


def run_stress(directory: Path, seconds: float, writers: int, max_iterations: int
               ) -> dict[str, Any]:
    """The writers and the reader as child processes; their summaries merged."""
    read_end, write_end = os.pipe()
    script = [sys.executable, os.path.abspath(__file__)]
    common = ["--dir", str(directory)]
    reader_proc = subprocess.Popen([*script, "reader", *common, "--fd", str(read_end)],
                                   pass_fds=[read_end], stdout=subprocess.PIPE)
    writer_procs = [subprocess.Popen(
        [*script, "writer", *common, "--fd", str(write_end), "--id", str(k),
         "--seconds", str(seconds), "--max-iterations", str(max_iterations)],
        pass_fds=[write_end], stdout=subprocess.PIPE) for k in range(writers)]
    os.close(read_end)
    os.close(write_end)
    summaries = [json.loads(p.communicate(timeout=seconds + 300)[0]) for p in writer_procs]
    read_summary = json.loads(reader_proc.communicate(timeout=300)[0])
    codes = [p.returncode for p in [*writer_procs, reader_proc]]
    assert codes == [0] * len(codes), f"a worker failed: exit codes {codes}"
    return {
        "round_trips": sum(s["round_trips"] for s in summaries),
        "bytes": sum(s["bytes"] for s in summaries),
        "reader_checked": read_summary["checked"],
        "reader_gone": read_summary["gone"],
        "wrong": [w for s in [*summaries, read_summary] for w in s["wrong"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["writer", "reader"])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--max-iterations", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.role == "writer":
        result = writer(args.dir, args.id, time.monotonic() + args.seconds, args.max_iterations,
                        args.fd)
    else:
        result = reader(args.dir, args.fd)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# Below the script's entry point: the worker processes need neither pytest nor the tests package.
import pytest

from hubfs.store import Store
from tests.conftest import mount_store, unmount_and_check


@pytest.mark.mount
@pytest.mark.slow
@pytest.mark.parametrize("writes", ["kernel", "daemon"])
def test_close_rename_open_read_never_sees_a_partial_file(
        tmp_path: Path, request: pytest.FixtureRequest, writes: str) -> None:
    """Kernel: new files written by passthrough into staging; daemon (--checked-reads, as on
    a non-root mount): every write through the daemon, fronts ingested every MiB."""
    store = tmp_path / "store"
    Store.init(store)
    mounted = mount_store(store, tmp_path / "mnt", "--ingest-step-mib", str(STEP_MIB),
                          *(["--checked-reads"] if writes == "daemon" else []))
    try:
        seconds = float(os.environ.get("HUBFS_STRESS_S", "15"))
        writers = int(os.environ.get("HUBFS_STRESS_WRITERS", "4"))
        result = run_stress(mounted.path, seconds, writers, max_iterations=1500)
    finally:
        unmount_and_check(mounted, request)
    print(f"{result['round_trips']} round trips, {result['bytes'] / 1e6:.0f} MB, reader "
          f"checked {result['reader_checked']} ({result['reader_gone']} already deleted)")
    assert result["round_trips"] >= 50, "too few round trips to mean anything"
    # the reader probes every file several times; it falls behind fast writers, and files it
    # reaches too late are gone: it must still have checked a good share of them
    assert result["reader_checked"] >= min(100, result["round_trips"] // 4)
    assert not result["wrong"], (f"{len(result['wrong'])} wrong reads in "
                                 f"{result['round_trips'] + result['reader_checked']}: "
                                 f"{result['wrong'][:5]}")
