"""Damage at rest: bit rot in packs under a live mount, and in the index of a stopped store.

Pack damage: random bytes of chunk payloads (raw and compressed) are flipped while the store is
mounted. Reading a damaged file must fail with EIO and never hand out a wrong byte, whether the
read ends before the bad block, spans it, or starts after it; other files read on; the daemon
stays up and logs each damaged path once. After unmount ``hubfs verify`` fails and lists exactly
the files that hold a flipped chunk, computed here from the index. Record *header* damage leaves
every payload intact, so reads must keep returning the right bytes, and no later open of the
store may throw intact records away.

Index damage: random bytes of ``STORE/index/data.mdb`` are flipped, one seed per copy of a
stopped store (light seeds: 1-8 flips, half of them in LMDB page headers; heavy seeds: 64
flips). ``verify`` and ``ls`` run as child processes with a timeout, so a hang or a crash
inside LMDB shows as an outcome instead of taking the test run down; each seed's outcomes are
printed (run with ``-s``). They must be a clean result, a list of problems, or one
``hubfs: error:`` line; then ``verify --repair`` must bring back the last snapshot and
``verify`` and ``ls`` must come back clean. Targeted damage (one value rewritten through LMDB,
or data.mdb cut short) pins each kind of fault whatever the page layout.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest

from hubfs import namespace
from hubfs.compression import Codec
from hubfs.packs import CHECK_BLOCK_BYTES, PACK_HEADER, ChunkLocation, PackFiles, header_bytes
from hubfs.store import Store
from tests.conftest import Mounted, mount_store, run_hubfs, unmount_and_check

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
READ_BYTES = 1 << 20
RANDOM_READS = 150
# Buffered reads fail a whole page-cache folio; kernels 6.x give FUSE large folios (1 MiB
# measured on 6.18), naturally aligned, so a buffered read this far from bad bytes must work.
KERNEL_FOLIO_MAX_BYTES = 2 << 20
CLI_TIMEOUT_S = 60.0
CAT_TIMEOUT_S = 20.0  # cat of a 4 MB file takes well under a second
INDEX_SEEDS = range(8)  # 1 to INDEX_FLIPS_MAX flips each, half of them in page headers
INDEX_FLIPS_MAX = 8
HEAVY_SEEDS = range(1000, 1004)  # HEAVY_FLIPS flips each, anywhere
HEAVY_FLIPS = 64
LMDB_PAGE_BYTES = 4096
LMDB_PAGE_HEADER_BYTES = 16
PARALLEL_CLI = 3
# Every file of the test tree gets this mtime, so the index's layout is the same every run and
# an index-damage seed hits the same kind of page each time.
FIXED_MTIME_NS = 1_700_000_000 * 10**9


# -- a store with a known tree ----------------------------------------------------------------


def tree_files(seed: int) -> dict[str, bytes]:
    """Big random files (stored raw), one identical copy (deduplicated: a damaged chunk of the
    original damages both), compressible text (stored zstd), and small files."""
    rng = random.Random(seed)
    words = ["weight", "bias", "layer", "norm", "attention", "token", "embed", "head", "0.5",
             "config", "vocab", "merges", "{", "}", "\n"]

    def text(n_words: int) -> bytes:
        return " ".join(rng.choice(words) for _ in range(n_words)).encode()

    big_a = rng.randbytes(4_000_000)
    return {
        "/models/a.bin": big_a,
        "/models/a-copy.bin": big_a,
        "/models/b.bin": rng.randbytes(4_000_000),
        "/text/t0.txt": text(500_000),
        "/text/t1.txt": text(500_000),
        "/text/small.json": text(2_000),
        "/tiny": b"x",
    }


def import_files(store: Path, src: Path, files: dict[str, bytes]) -> None:
    """``hubfs init`` + ``hubfs import`` of ``files`` (the import takes an index snapshot)."""
    for rel, data in files.items():
        path = src / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for path in sorted(src.rglob("*"), reverse=True):
        os.utime(path, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS), follow_symlinks=False)
    Store.init(store)
    run_hubfs("import", str(store), str(src))


@dataclass(frozen=True)
class Placed:
    """One occurrence of a chunk in a file."""

    path: str
    file_offset: int
    chunk_id: bytes
    location: ChunkLocation


def placements(store: Path) -> list[Placed]:
    """Every chunk of every file, from the index (read-only: works while mounted)."""
    out = []
    with Store(store, readonly=True) as opened, opened.read() as txn:
        paths = namespace.paths(txn)
        for ino, inode in txn.inodes():
            if not stat.S_ISREG(inode.mode) or not inode.size:
                continue
            table = txn.content(inode.content_id)
            assert table is not None
            pos = 0
            for chunk_id, length in zip(table.chunk_ids, table.lengths):
                entry = txn.chunk(chunk_id)
                assert entry is not None
                for name in paths.get(ino, []):
                    out.append(Placed(os.fsdecode(name), pos, chunk_id, entry.location))
                pos += length
    return out


def pack_path(store: Path, pack_id: int) -> Path:
    """A pack's or an object's file, made writable (objects are read-only)."""
    path = PackFiles(store / "packs").path(pack_id)
    os.chmod(path, 0o600)
    return path


def flip(path: Path, offset: int, rng: random.Random) -> None:
    """XOR one byte with a random non-zero value, as bit rot would."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ rng.randrange(1, 256)]))


def daemon_pid(store: Path) -> int:
    return int((store / "lock").read_text().strip())


def assert_mount_answers(mounted: Mounted) -> None:
    """The daemon is alive and serves metadata, writes and reads."""
    os.kill(daemon_pid(mounted.store), 0)
    assert "models" in os.listdir(mounted.path)
    probe = mounted.path / "probe.txt"
    probe.write_bytes(b"still here\n" * 1000)
    assert probe.read_bytes() == b"still here\n" * 1000
    probe.unlink()


# -- reading through the mount ----------------------------------------------------------------


def near(lo: int, hi: int, bad: list[tuple[int, int]], slack: int) -> bool:
    """Whether file bytes [lo, hi) come within ``slack`` bytes of a bad range."""
    return any(lo < b_hi + slack and b_lo - slack < hi for b_lo, b_hi in bad)


def check_file_reads(path: Path, original: bytes, bad: list[tuple[int, int]],
                     rng: random.Random, direct: bool = False) -> int:
    """Read ``path`` sequentially and at random; every byte returned must be the original one.

    With ``direct`` (O_DIRECT) each read reaches the daemon as asked, so a read must fail
    exactly when it overlaps a ``bad`` range. Buffered reads go through the page cache, which
    fails a whole folio; reads more than a folio away from the bad ranges must succeed.
    Returns how many reads failed.
    """
    slack = 0 if direct else KERNEL_FOLIO_MAX_BYTES
    failures = 0
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        got = bytearray()
        error: OSError | None = None
        while True:
            try:
                piece = os.read(fd, READ_BYTES)
            except OSError as exc:
                error = exc
                break
            if not piece:
                break
            got += piece
        assert got == original[: len(got)], f"{path}: wrong bytes in a sequential read"
        if bad:
            first_bad = min(lo for lo, _hi in bad)
            assert error is not None and error.errno == errno.EIO, (path, error, len(got))
            failures += 1
            assert len(got) <= first_bad, f"{path}: read past the bad byte at {first_bad}"
            # the bytes before the bad block were handed out, up to the failing read's start
            assert len(got) > first_bad - READ_BYTES - slack, (path, len(got), first_bad)
            if direct:  # the daemon's granularity: right up to the bad range, right after it
                assert os.pread(fd, 1, first_bad - 1) == original[first_bad - 1 : first_bad]
                with pytest.raises(OSError) as raised:
                    os.pread(fd, 1, first_bad)
                assert raised.value.errno == errno.EIO
            for _lo, hi in bad:
                after = hi + slack
                if after < len(original) and not near(after, after + 65536, bad, slack):
                    assert os.pread(fd, 65536, after) == original[after : after + 65536]
        else:
            assert error is None and len(got) == len(original), (path, error, len(got))
        for _ in range(RANDOM_READS):
            offset = rng.randrange(len(original))
            size = rng.choice([1, 100, PAGE_BYTES, CHECK_BLOCK_BYTES, 300_000, READ_BYTES])
            if bad and rng.random() < 0.3:  # aim at the bad ranges, from just before them
                b_lo, _b_hi = rng.choice(bad)
                offset = max(0, b_lo - rng.randrange(3 * PAGE_BYTES))
            try:
                data = os.pread(fd, size, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                assert near(offset, offset + size, bad, slack), (path, offset, size)
                failures += 1
                continue
            assert data == original[offset : offset + len(data)], (path, offset, size)
            if not near(offset, offset + size, bad, slack):
                assert len(data) == min(size, len(original) - offset), (path, offset, size)
    finally:
        os.close(fd)
    return failures


def bad_ranges(victims: list[tuple[Placed, int]]) -> dict[str, list[tuple[int, int]]]:
    """File byte ranges that cannot be served, per path: the checksum block a flipped byte
    lies in for raw chunks, the whole chunk for compressed ones (it is decoded as a unit)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for placed, payload_offset in victims:
        loc = placed.location
        if loc.codec == Codec.RAW:
            block = payload_offset // CHECK_BLOCK_BYTES * CHECK_BLOCK_BYTES
            lo = placed.file_offset + block
            hi = placed.file_offset + min(block + CHECK_BLOCK_BYTES, loc.raw_len)
        else:
            lo, hi = placed.file_offset, placed.file_offset + loc.raw_len
        out.setdefault(placed.path, []).append((lo, hi))
    return out


def verify_listing(store: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = run_hubfs("verify", str(store), check=False)
    assert "Traceback" not in result.stderr, result.stderr
    listed = {line.removeprefix("damaged file: ") for line in result.stdout.splitlines()
              if line.startswith("damaged file: ")}
    return result, listed


# -- payload damage under a live mount --------------------------------------------------------


@pytest.mark.mount
@pytest.mark.allow_warnings  # the daemon logs each damaged file as an error
@pytest.mark.damaged_store
@pytest.mark.parametrize("seed", [1, 2])
def test_flipped_payload_bytes_give_eio_never_wrong_bytes(tmp_path: Path, seed: int,
                                                         request: pytest.FixtureRequest) -> None:
    rng = random.Random(seed)
    files = tree_files(seed)
    store = tmp_path / "store"
    import_files(store, tmp_path / "src", files)
    # Checked reads: objects are otherwise served by the kernel, which cannot check them
    # (verify and --checked-reads are what guard kernel-served bytes; see hubfs.objects).
    mounted = mount_store(store, tmp_path / "mnt", "--checked-reads")
    try:
        placed = placements(store)
        # one raw chunk and one compressed chunk, anywhere in the tree
        raw = sorted({(p.chunk_id, p.location) for p in placed if p.location.codec == Codec.RAW})
        packed = sorted({(p.chunk_id, p.location) for p in placed
                         if p.location.codec != Codec.RAW})
        assert raw and packed, "the tree should store both raw and compressed chunks"
        victims: list[tuple[Placed, int]] = []
        for chunk_id, loc in (rng.choice(raw), rng.choice(packed)):
            payload_offset = rng.randrange(loc.stored_len)
            flip(pack_path(store, loc.pack_id), loc.payload_offset + payload_offset, rng)
            victims += [(p, payload_offset) for p in placed if p.chunk_id == chunk_id]
        bad = bad_ranges(victims)
        damaged = set(bad)
        assert damaged < set(files), "some files must stay undamaged"

        for path in sorted(files):  # the damaged files twice: the second read is logged no more
            for direct in ((False, True) if path in damaged else (False,)):
                check_file_reads(mounted.path / path.lstrip("/"), files[path], bad.get(path, []),
                                 rng, direct)
        assert_mount_answers(mounted)
        log = mounted.log()
        for path in damaged:
            assert log.count(f"damaged data in {path} (inode") == 1, log
        assert "Traceback" not in log, log
    finally:
        unmount_and_check(mounted, request)
    result, listed = verify_listing(store)
    assert result.returncode == 3, result.stdout + result.stderr
    assert listed == damaged, result.stdout


# -- record header damage ---------------------------------------------------------------------


def header_victim(store: Path, rng: random.Random) -> tuple[Placed, list[Placed]]:
    """A record that is not its pack's last (so later records exist), and all placements."""
    placed = [p for p in placements(store) if not p.location.in_object]  # headers: packs
    by_offset = {p.location.offset: p for p in placed}
    last = max(by_offset)
    victim = by_offset[rng.choice(sorted(o for o in by_offset if o != last))]
    return victim, placed


def flip_header(store: Path, victim: Placed, rng: random.Random) -> None:
    loc = victim.location
    flip(pack_path(store, loc.pack_id), loc.offset + rng.randrange(header_bytes(len(loc.sums))),
         rng)


@pytest.mark.mount
@pytest.mark.allow_warnings
@pytest.mark.damaged_store
def test_flipped_record_header_under_mount_serves_only_right_bytes(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The payloads stay intact, so every file must read back exactly (or fail with EIO,
    never give other bytes); verify must fail and name at least the victim's files."""
    rng = random.Random(3)
    files = tree_files(3)
    store = tmp_path / "store"
    import_files(store, tmp_path / "src", files)
    mounted = mount_store(store, tmp_path / "mnt")
    try:
        victim, placed = header_victim(store, rng)
        flip_header(store, victim, rng)
        for path in sorted(files):
            check_file_reads(mounted.path / path.lstrip("/"), files[path], [], rng)
        assert_mount_answers(mounted)
    finally:
        unmount_and_check(mounted, request)
    result, listed = verify_listing(store)
    assert result.returncode == 3, result.stdout
    assert {p.path for p in placed if p.chunk_id == victim.chunk_id} <= listed


@pytest.mark.damaged_store
def test_flipped_record_header_verify_lists_exactly_its_files(tmp_path: Path) -> None:
    rng = random.Random(4)
    files = tree_files(4)
    store = tmp_path / "store"
    import_files(store, tmp_path / "src", files)
    victim, placed = header_victim(store, rng)
    flip_header(store, victim, rng)
    result, listed = verify_listing(store)
    assert result.returncode == 3
    assert listed == {p.path for p in placed if p.chunk_id == victim.chunk_id}, result.stdout


@pytest.mark.mount
@pytest.mark.allow_warnings
@pytest.mark.damaged_store
@pytest.mark.parametrize("where", [
    "record header",
    "last record header",
    "pack header",
])
def test_header_damage_is_not_trimmed_away_by_the_next_mount(
        tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """One flipped header byte in the newest pack, then a mount: every file whose bytes are
    intact must read back, and the pack must keep its size."""
    rng = random.Random(5)
    files = tree_files(5)
    store = tmp_path / "store"
    import_files(store, tmp_path / "src", files)
    victim, placed = header_victim(store, rng)
    if where == "last record header":
        victim = max(placed, key=lambda p: p.location.offset)
    pack = pack_path(store, victim.location.pack_id)
    size = pack.stat().st_size
    if where == "pack header":
        flip(pack, rng.randrange(PACK_HEADER.size), rng)
    else:  # the payload is intact: the victim's files read back too, the index knows where
        flip_header(store, victim, rng)
    mounted = mount_store(store, tmp_path / "mnt")
    try:
        lost = []
        for path in sorted(files):
            try:
                ok = (mounted.path / path.lstrip("/")).read_bytes() == files[path]
            except OSError:
                ok = False
            if not ok:
                lost.append(path)
    finally:
        unmount_and_check(mounted, request)
    assert pack.stat().st_size == size, f"the pack was cut from {size} to {pack.stat().st_size}"
    assert not lost, f"intact files lost after one flipped {where} byte: {lost}"


# -- index damage on a stopped store ----------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one CLI run did: ``ok``, ``problems`` (verify listed damage), ``error`` (one
    ``hubfs: error:`` line), or the failures ``traceback``, ``messy`` (several lines),
    ``hang`` and ``signal N``."""

    kind: str
    detail: str = ""
    line: str = ""  # the last line on stderr: the message a user reads


def run_cli(*args: str, timeout_s: float = CLI_TIMEOUT_S) -> Outcome:
    try:
        proc = subprocess.run([sys.executable, "-m", "hubfs.cli", *args], check=False,
                              capture_output=True, errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Outcome("hang", f"no exit after {timeout_s:.0f}s")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if proc.returncode < 0:
        return Outcome(f"signal {-proc.returncode}", last)
    if "Traceback" in proc.stderr:
        return Outcome("traceback", last)
    if proc.returncode == 0:
        return Outcome("ok")
    if len(lines) != 1 or not last.startswith("hubfs: error: "):
        return Outcome("messy", proc.stderr[-300:])
    if "problem: " in proc.stdout or "damaged file: " in proc.stdout:
        return Outcome("problems", proc.stdout.splitlines()[0], last)
    return Outcome("error", last, last)


@dataclass(frozen=True)
class SeedResult:
    seed: int
    flips: tuple[int, ...]  # offsets in data.mdb
    verify: Outcome
    ls_root: Outcome
    ls_dir: Outcome
    repair: Outcome
    verify_after: Outcome
    ls_after: Outcome

    def row(self) -> str:
        pages = ",".join(str(p) for p in sorted({o // LMDB_PAGE_BYTES for o in self.flips}))
        cells = [self.verify, self.ls_root, self.ls_dir, self.repair, self.verify_after,
                 self.ls_after]
        text = " ".join(f"{c.kind:10s}" for c in cells)
        details = " | ".join(dict.fromkeys(c.detail for c in cells if c.detail
                                           and c.kind not in ("ok", "problems")))
        return (f"seed {self.seed:4d} {len(self.flips):2d} flips, pages {pages[:24]:24s} {text} "
                f"{details[:160]}")


def damage_index(store: Path, seed: int) -> tuple[int, ...]:
    """Flip the bytes of ``seed`` in the store's data.mdb; returns their offsets."""
    rng = random.Random(seed)
    mdb = store / "index" / "data.mdb"
    data = bytearray(mdb.read_bytes())
    flips = []
    heavy = seed in HEAVY_SEEDS
    for _ in range(HEAVY_FLIPS if heavy else rng.randint(1, INDEX_FLIPS_MAX)):
        if heavy or rng.random() < 0.5:  # anywhere: mostly keys and values
            flips.append(rng.randrange(len(data)))
        else:  # a page header (page number, flags, free-space bounds): LMDB's own structure
            page = rng.randrange(len(data) // LMDB_PAGE_BYTES)
            flips.append(page * LMDB_PAGE_BYTES + rng.randrange(LMDB_PAGE_HEADER_BYTES))
    for offset in flips:
        data[offset] ^= rng.randrange(1, 256)
    mdb.write_bytes(data)
    return tuple(flips)


def damage_index_and_run(pristine: Path, work: Path, seed: int) -> SeedResult:
    store = work / f"seed{seed}"
    shutil.copytree(pristine, store, symlinks=True)
    flips = damage_index(store, seed)
    result = SeedResult(seed, flips, run_cli("verify", str(store)),
                        run_cli("ls", str(store), "/"), run_cli("ls", str(store), "/models"),
                        run_cli("verify", "--repair", str(store)),
                        run_cli("verify", str(store)), run_cli("ls", str(store), "/models"))
    shutil.rmtree(store)
    return result


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped store that went through import and a mount (each took a snapshot)."""
    root = tmp_path_factory.mktemp("pristine")
    store = root / "store"
    import_files(store, root / "src", tree_files(9))
    mnt = root / "mnt"
    mount_store(store, mnt)
    try:
        (mnt / "text" / "written.txt").write_bytes(b"written through the mount\n" * 100)
    finally:
        run_hubfs("umount", str(mnt))
    assert run_cli("verify", str(store)).kind == "ok"
    return store


@pytest.fixture(scope="module")
def index_sweep(pristine_store: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[list[SeedResult]]:
    work = tmp_path_factory.mktemp("index-damage")
    with ThreadPoolExecutor(PARALLEL_CLI) as pool:
        results = list(pool.map(lambda s: damage_index_and_run(pristine_store, work, s),
                                [*INDEX_SEEDS, *HEAVY_SEEDS]))
    print(f"\nindex damage, {len(results)} seeds: outcomes of verify, ls /, ls /models, "
          "then verify --repair, verify, ls /models")
    for result in results:
        print(result.row())
    yield results


@pytest.mark.slow
def test_index_damage_never_hangs_or_crashes_the_cli(index_sweep: list[SeedResult]) -> None:
    bad = [r.row() for r in index_sweep
           for o in (r.verify, r.ls_root, r.ls_dir, r.repair, r.verify_after, r.ls_after)
           if o.kind == "hang" or o.kind.startswith("signal")]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_index_damage_gives_one_line_errors(index_sweep: list[SeedResult]) -> None:
    bad = [r.row() for r in index_sweep for o in (r.verify, r.ls_root, r.ls_dir)
           if o.kind not in ("ok", "problems", "error")]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_index_damage_repair_restores_a_clean_store(index_sweep: list[SeedResult]) -> None:
    bad = [r.row() for r in index_sweep
           if (r.repair.kind, r.verify_after.kind, r.ls_after.kind) != ("ok", "ok", "ok")]
    assert not bad, "\n".join(bad)


# -- targeted index damage: the same faults, reproducible whatever the page layout ----------


def put_raw(store: Path, db: str, key: bytes, value: bytes) -> None:
    """Overwrite one index value behind hubfs's back."""
    env = lmdb.open(str(store / "index"), max_dbs=16, subdir=True)
    try:
        handle = env.open_db(db.encode(), create=False)
        with env.begin(write=True) as txn:
            assert txn.get(key, db=handle) is not None
            txn.put(key, value, db=handle)
    finally:
        env.close()


def get_raw(store: Path, db: str, key: bytes) -> bytes:
    env = lmdb.open(str(store / "index"), max_dbs=16, subdir=True, readonly=True)
    try:
        handle = env.open_db(db.encode(), create=False)
        with env.begin() as txn:
            value = txn.get(key, db=handle)
        assert value is not None, (db, key)
        return bytes(value)
    finally:
        env.close()


def file_ino(store: Path, path: str) -> int:
    with Store(store, readonly=True) as opened, opened.read() as txn:
        return namespace.resolve(txn, path)


DAMAGES = {
    # an inode value cut short: does not decode
    "truncated inode": lambda s: put_raw(s, "inodes", ino_key(s, "/models/a.bin"),
                                         get_raw(s, "inodes", ino_key(s, "/models/a.bin"))[:20]),
    # one bit of an inode's content id: decodes, points at nothing
    "inode content id": lambda s: put_raw(s, "inodes", ino_key(s, "/models/b.bin"),
                                          flip_last_bit(get_raw(s, "inodes",
                                                                ino_key(s, "/models/b.bin")))),
    # a readdir-order entry naming a file that is not in the directory
    "dirseq entry": lambda s: put_raw(s, "dirseq", first_key(s, "dirseq", ino_key(s, "/models")),
                                      b"no-such-name"),
    # one byte of the settings JSON
    "settings json": lambda s: put_raw(s, "meta", b"settings",
                                       get_raw(s, "meta", b"settings").replace(b":", b";", 1)),
    # the settings still parse, but a key lost a letter
    "settings key": lambda s: put_raw(s, "meta", b"settings",
                                      get_raw(s, "meta", b"settings").replace(b'"chunker"',
                                                                              b'"chunkes"')),
    # an inode's size field (bytes 21-28 of the value) claims 2**62 bytes
    "inode size": lambda s: put_raw(s, "inodes", ino_key(s, "/models/a.bin"),
                                    with_size(get_raw(s, "inodes", ino_key(s, "/models/a.bin")),
                                              2**62)),
    # the file lost its tail: pages the meta page points at lie past the end (an interrupted
    # copy or restore, a filesystem that lost the last blocks)
    "truncated data.mdb": lambda s: os.truncate(
        s / "index" / "data.mdb",
        (s / "index" / "data.mdb").stat().st_size // 2 // LMDB_PAGE_BYTES * LMDB_PAGE_BYTES),
}


def with_size(inode_value: bytes, size: int) -> bytes:
    return inode_value[:21] + size.to_bytes(8, "little") + inode_value[29:]


def first_key(store: Path, db: str, prefix: bytes) -> bytes:
    env = lmdb.open(str(store / "index"), max_dbs=16, subdir=True, readonly=True)
    try:
        handle = env.open_db(db.encode(), create=False)
        with env.begin() as txn, txn.cursor(db=handle) as cur:
            assert cur.set_range(prefix) and cur.key().startswith(prefix)
            return bytes(cur.key())
    finally:
        env.close()


def ino_key(store: Path, path: str) -> bytes:
    return file_ino(store, path).to_bytes(8, "big")


def flip_last_bit(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_targeted_index_damage_reported_then_repaired(tmp_path: Path, damage: str) -> None:
    store = tmp_path / "store"
    files = tree_files(6)
    import_files(store, tmp_path / "src", files)
    DAMAGES[damage](store)
    outcome = run_cli("verify", str(store))
    assert outcome.kind in ("problems", "error"), outcome
    outcome = run_cli("ls", str(store), "/models")
    assert outcome.kind in ("ok", "error"), outcome
    outcome = run_cli("cat", str(store), "/models/a.bin", timeout_s=CAT_TIMEOUT_S)
    assert outcome.kind in ("ok", "error"), outcome
    verify = subprocess.run([sys.executable, "-m", "hubfs.cli", "verify", str(store)],
                            check=False, capture_output=True, text=True, errors="replace",
                            timeout=CLI_TIMEOUT_S)
    if "problem: " in verify.stdout:  # damage that touches a file must name the file
        listed = {line.removeprefix("damaged file: ") for line in verify.stdout.splitlines()
                  if line.startswith("damaged file: ")}
        assert listed, verify.stdout
    repaired = run_cli("verify", "--repair", str(store))
    assert repaired.kind == "ok", repaired
    assert run_cli("verify", str(store)).kind == "ok"
    for directory in ("/", "/models", "/text"):
        assert run_cli("ls", str(store), directory).kind == "ok", directory
    export = tmp_path / "out"
    run_hubfs("export", str(store), "/", str(export))
    for path, data in files.items():
        assert (export / path.lstrip("/")).read_bytes() == data, path
