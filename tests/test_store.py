"""The engine end to end, without a mount: dedup figures, import/export round trips, damage.

Dedup is measured on a real model (all-MiniLM-L6-v2, 90.9 MB of safetensors) laid out as three
different caches, and on re-saved variants of its safetensors file, against plain CDC (the
same store with the safetensors sniffing switched off). Run with ``-s`` to see the figures;
they are also attached to the test report as properties.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hubfs import chunking, namespace
from hubfs.compression import Codec
from hubfs.errors import IntegrityError
from hubfs.importer import export_tree, import_tree
from hubfs.store import Store
from hubfs.tensor_layout import parse_layout
from hubfs.verify import verify

from .engine_helpers import (
    MODEL_DIR,
    MODEL_FILE,
    assert_user_error,
    chunk_locations,
    flip_byte,
    run_cli,
    safetensors_bytes,
    tree_bytes,
)

MB = 1e6


# -- dedup on the real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model as three caches would hold it, each a real copy of the bytes."""
    root = tmp_path_factory.mktemp("caches")
    files = sorted(p.relative_to(MODEL_DIR) for p in MODEL_DIR.rglob("*") if p.is_file())
    # Hugging Face hub: content-named blobs, a snapshot of relative symlinks into them
    hf = root / "huggingface" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    commit = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf"
    (hf / "refs").mkdir(parents=True)
    (hf / "refs" / "main").write_text(commit)
    (hf / "blobs").mkdir()
    for n, rel in enumerate(files):
        etag = f"{n:04d}" + "e" * 60
        shutil.copyfile(MODEL_DIR / rel, hf / "blobs" / etag)
        link = hf / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(hf / "blobs" / etag, link.parent))
    # torch hub / sentence-transformers: a plain directory per model
    torch = root / "torch" / "sentence_transformers" / "sentence-transformers_all-MiniLM-L6-v2"
    shutil.copytree(MODEL_DIR, torch)
    # a user's own copy, flattened into one directory under other names
    mine = root / "mine" / "minilm"
    mine.mkdir(parents=True)
    for rel in files:
        shutil.copyfile(MODEL_DIR / rel, mine / str(rel).replace("/", "__"))
    return {"hf": root / "huggingface", "torch": root / "torch", "mine": root / "mine"}


def test_three_caches_of_one_model_store_one_copy(store: Store, store_path: Path,
                                                  model_caches: dict[str, Path],
                                                  record_property: Callable) -> None:
    one_copy = tree_bytes(MODEL_DIR)
    new_bytes = {}
    for name, tree in model_caches.items():
        report = import_tree(store, tree, f"/{name}", progress=False)
        assert not report.errors
        new_bytes[name] = report.new_stored_bytes
    stats = store.stats()
    ratio = stats["stored_bytes"] / one_copy
    print(f"\n3 caches of all-MiniLM-L6-v2: logical {stats['logical_bytes'] / MB:.1f} MB, "
          f"one copy {one_copy / MB:.1f} MB, stored {stats['stored_bytes'] / MB:.1f} MB "
          f"({ratio:.3f}x one copy); new bytes per import: "
          + ", ".join(f"{k} {v / MB:.2f} MB" for k, v in new_bytes.items()))
    record_property("three_caches_stored_over_one_copy", round(ratio, 4))
    assert stats["logical_bytes"] >= 3 * one_copy
    assert stats["stored_bytes"] < 1.05 * one_copy
    assert new_bytes["torch"] == 0 and new_bytes["mine"] == 0
    # the CLI, in another process, reads the same figures from the store on disk
    proc = run_cli("stats", store_path, "--json", check=True)
    cli_stats = json.loads(proc.stdout)
    assert cli_stats["stored_bytes"] < 1.05 * one_copy
    for key in ("files", "logical_bytes", "unique_bytes", "chunks", "pack_bytes"):
        assert cli_stats[key] == stats[key], key
    # and the human-readable form runs too
    assert "dedup ratio" in run_cli("stats", store_path, check=True).stdout
    # every copy reads back as the model
    want = MODEL_FILE.read_bytes()
    for path in ("/hf/hub/models--sentence-transformers--all-MiniLM-L6-v2/blobs/",
                 ("/torch/sentence_transformers/sentence-transformers_all-MiniLM-L6-v2/"
                  "model.safetensors"), "/mine/minilm/model.safetensors"):
        if path.endswith("/"):
            with store.read() as txn:
                blobs = namespace.resolve(txn, path)
                sizes = {name: namespace.get(txn, ino).size
                         for _seq, name, ino in namespace.readdir(txn, blobs)}
            path += os.fsdecode(next(n for n, size in sizes.items() if size == len(want)))
        with store.read() as txn:
            inode = namespace.get(txn, namespace.resolve(txn, path))
        assert store.reader.read(inode.content_id, 0, inode.size) == want


def _new_bytes(store: Store, src: Path, dest: str) -> tuple[int, int]:
    """(new unique raw bytes, new stored bytes) that importing ``src`` cost."""
    before = store.stats()["unique_bytes"]
    report = import_tree(store, src, dest, progress=False)
    assert not report.errors
    return store.stats()["unique_bytes"] - before, report.new_stored_bytes


@pytest.mark.slow
def test_resaved_safetensors_dedupe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    record_property: Callable) -> None:
    """Re-saved variants of the model against the original: tensor cuts vs plain CDC."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(MODEL_FILE))
    variants = tmp_path / "variants"
    for name in ("original", "reordered", "new-metadata", "two-changed"):
        (variants / name).mkdir(parents=True)
    shutil.copyfile(MODEL_FILE, variants / "original" / "model.safetensors")
    # another order (safetensors' own writer always sorts, so write the file by hand)
    order = list(reversed(list(tensors.items())))
    (variants / "reordered" / "model.safetensors").write_bytes(
        safetensors_bytes(order, {"format": "pt"}))
    save_file(tensors, str(variants / "new-metadata" / "model.safetensors"),
              metadata={"format": "pt", "converted_by": "hubfs tests", "revision": "2"})
    changed = ["encoder.layer.2.intermediate.dense.weight", "encoder.layer.4.output.dense.weight"]
    edited = dict(tensors)
    for key in changed:
        edited[key] = tensors[key] + np.float32(1e-3)
    save_file(edited, str(variants / "two-changed" / "model.safetensors"),
              metadata={"format": "pt"})
    changed_bytes = sum(tensors[k].nbytes for k in changed)
    # the variants are what they claim to be
    for name in ("reordered", "new-metadata"):
        path = variants / name / "model.safetensors"
        again = load_file(str(path))
        assert again.keys() == tensors.keys()
        assert all(np.array_equal(again[k], tensors[k]) for k in tensors)
        assert path.read_bytes() != MODEL_FILE.read_bytes()
    layout = parse_layout((variants / "reordered" / "model.safetensors").read_bytes())
    original = parse_layout(MODEL_FILE.read_bytes())
    assert layout and original and layout[1].end - layout[1].start != \
        original[1].end - original[1].start  # the first tensor is another one

    figures: dict[str, dict[str, tuple[int, int]]] = {}
    for mode in ("tensor cuts", "plain CDC"):
        path = tmp_path / mode.replace(" ", "-")
        Store.init(path)
        with monkeypatch.context() as patch:
            if mode == "plain CDC":
                patch.setattr(chunking, "parse_layout", lambda *args, **kwargs: None)
            with Store(path) as store:
                import_tree(store, variants / "original", "/original", progress=False)
                figures[mode] = {name: _new_bytes(store, variants / name, f"/{name}")
                                 for name in ("reordered", "new-metadata", "two-changed")}
                report = verify(store, progress=False)
        assert report.ok, report.problems

    size = MODEL_FILE.stat().st_size
    lines = [(f"\nre-saved {MODEL_FILE.name} ({size / MB:.1f} MB) against the original; "
              f"two changed tensors hold {changed_bytes / MB:.2f} MB"),
             (f"{'variant':14s} {'mode':12s} {'new unique':>12s} {'new stored':>12s} "
              f"{'deduped':>8s}")]
    for mode, rows in figures.items():
        for name, (unique, stored) in rows.items():
            lines.append(f"{name:14s} {mode:12s} {unique / MB:9.3f} MB {stored / MB:9.3f} MB "
                         f"{1 - unique / size:8.2%}")
            record_property(f"{mode}/{name}/new_unique_bytes", unique)
            record_property(f"{mode}/{name}/new_stored_bytes", stored)
    print("\n".join(lines))

    cuts, plain = figures["tensor cuts"], figures["plain CDC"]
    for name in ("reordered", "new-metadata"):
        unique, stored = cuts[name]
        assert unique <= 0.05 * size, (name, unique)
        assert stored <= 0.05 * size, (name, stored)
    # the changed copy costs its two tensors and the header chunk, nothing more
    unique, stored = cuts["two-changed"]
    assert changed_bytes <= unique <= changed_bytes + 64 * 1024
    assert stored <= changed_bytes + 64 * 1024
    # and tensor cuts never do worse than plain CDC
    for name in cuts:
        assert cuts[name][0] <= plain[name][0], name


# -- import / export round trip ---------------------------------------------------------------

T0_NS = 1_600_000_000_123_456_789
LONG_NAME = b"n" * 255
ODD_NAMES = [LONG_NAME, b"latin1-\xe9t\xe9", b"\xff\xfe\xfd", "ünïcødé ✓".encode(),
             b"with space", b".hidden", b"-dash"]


def build_tree(src: Path) -> None:
    """A cache-like tree with every kind of entry and attribute the importer must keep."""
    rng = np.random.default_rng(11)
    s = os.fsencode(src)

    def j(*parts: bytes | str) -> bytes:
        return os.path.join(s, *(os.fsencode(p) for p in parts))

    def write(path: bytes, data: bytes, mode: int = 0o644) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    repo = j("hub", "models--org--model")
    blobs = {b"etag-weights": rng.bytes(700_000), b"etag-config": b'{"hidden": 384}\n' * 50,
             b"etag-empty": b""}
    for etag, data in blobs.items():
        write(os.path.join(repo, b"blobs", etag), data)
    snap = os.path.join(repo, b"snapshots", b"0123abcd")
    os.makedirs(os.path.join(snap, b"sub", b"deeper"))
    os.symlink(b"../../blobs/etag-weights", os.path.join(snap, b"model.safetensors"))
    os.symlink(b"../../../blobs/etag-config", os.path.join(snap, b"sub", b"config.json"))
    os.symlink(b"../../../../blobs/etag-empty", os.path.join(snap, b"sub", b"deeper", b"empty"))
    write(os.path.join(repo, b"refs", b"main"), b"0123abcd")
    os.makedirs(j("hub", ".locks", "models--org--model"))
    # dangling and absolute symlinks, and a symlink to a directory
    os.makedirs(j("links"))
    os.symlink(b"../nowhere/at/all", j("links", "dangling"))
    os.symlink(b"/nonexistent/absolute/target", j("links", "absolute"))
    os.symlink(b"../hub", j("links", "to-dir"))
    os.symlink(b"\xff-odd-target", j("links", "odd-target"))
    # hard links across directories: a multi-chunk file with three names, an empty one with two
    write(j("hard", "a", "one"), rng.bytes(2_500_000))
    os.makedirs(j("hard", "b"))
    os.makedirs(j("hard", "c", "d"))
    os.link(j("hard", "a", "one"), j("hard", "b", "two"))
    os.link(j("hard", "a", "one"), j("hard", "c", "d", "three"))
    write(j("hard", "empty1"), b"")
    os.makedirs(j("hard", "x"))
    os.link(j("hard", "empty1"), j("hard", "x", "empty2"))
    # modes, including set-id and sticky bits
    for name, mode in [("private", 0o600), ("exec", 0o755), ("setuid", 0o4755),
                       ("setgid", 0o2750), ("readonly", 0o444), ("nothing", 0o000),
                       ("all", 0o777)]:
        write(j("modes", name), name.encode() * 10, mode)
    for name, mode in [("sticky", 0o1777), ("setgid-dir", 0o2775), ("closed", 0o700),
                       ("readonly-dir", 0o555)]:
        os.makedirs(j("modes", name))
        write(j("modes", name, "inside"), b"x")
        os.chmod(j("modes", name), mode)
    # names: 255 bytes, not UTF-8, spaces, leading dots and dashes
    for odd in ODD_NAMES:
        write(os.path.join(j("names"), odd), odd)
    os.makedirs(os.path.join(j("names"), b"d" * 255))
    # owners other than root, on a file and on a symlink
    write(j("owners", "file"), b"owned")
    os.chown(j("owners", "file"), 1234, 5678)
    os.symlink(b"file", j("owners", "link"))
    os.chown(j("owners", "link"), 4321, 8765, follow_symlinks=False)
    # a long run of zeros (the same chunk many times), an empty file, a FIFO, an empty dir
    write(j("zeros"), bytes(9 * 1024 * 1024))
    write(j("empty"), b"")
    os.mkfifo(j("fifo"), 0o640)
    os.makedirs(j("empty-dir"))
    # distinct times on everything, directories last (adding entries touches them)
    entries = []
    for dirpath, dirnames, filenames in os.walk(s):
        entries += [os.path.join(dirpath, entry) for entry in dirnames + filenames]
    entries.sort(key=lambda p: (os.path.isdir(p) and not os.path.islink(p), -p.count(b"/")))
    for i, path in enumerate(entries):
        t = T0_NS + i * 1_000_000_007
        os.utime(path, ns=(t - 86_400_000_000_000, t), follow_symlinks=False)


def snapshot(root: Path) -> dict[bytes, os.stat_result]:
    r = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(r):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, r)] = os.lstat(path)
    return out


def link_groups(root: Path, snap: dict[bytes, os.stat_result]) -> set[frozenset[bytes]]:
    groups: dict[int, set[bytes]] = {}
    for rel, st in snap.items():
        if not stat.S_ISDIR(st.st_mode):
            groups.setdefault(st.st_ino, set()).add(rel)
    return {frozenset(g) for g in groups.values()}


def assert_same_tree(src: Path, src_snap: dict[bytes, os.stat_result], out: Path) -> None:
    """Same names, types, bytes, link targets, modes, owners, file times, hard-link groups."""
    out_snap = snapshot(out)
    assert set(out_snap) == set(src_snap)
    for rel, want in src_snap.items():
        got = out_snap[rel]
        assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(want.st_mode), rel
        assert got.st_mode == want.st_mode, (rel, oct(got.st_mode), oct(want.st_mode))
        assert (got.st_uid, got.st_gid) == (want.st_uid, want.st_gid), rel
        if stat.S_ISDIR(want.st_mode):
            continue  # directory times: see test_import_keeps_directory_mtimes
        assert got.st_nlink == want.st_nlink, rel
        assert got.st_mtime_ns == want.st_mtime_ns, rel
        if not stat.S_ISLNK(want.st_mode):
            # (os.walk follows symlinks to classify them, which moves their atime)
            assert got.st_atime_ns == want.st_atime_ns, rel
        assert got.st_size == want.st_size, rel
        if stat.S_ISLNK(want.st_mode):
            assert os.readlink(os.path.join(os.fsencode(out), rel)) == \
                os.readlink(os.path.join(os.fsencode(src), rel)), rel
        elif stat.S_ISREG(want.st_mode):
            with open(os.path.join(os.fsencode(out), rel), "rb") as a, \
                    open(os.path.join(os.fsencode(src), rel), "rb") as b:
                assert a.read() == b.read(), rel
    assert link_groups(out, out_snap) == link_groups(src, src_snap)


def test_round_trip_keeps_everything(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    before = snapshot(src)  # atimes as they were before the import read the files
    report = import_tree(store, src, "/rt", progress=False)
    assert not report.errors
    assert report.hardlinks == 3  # two.../three, and empty2
    assert report.symlinks == 8
    out = tmp_path / "out"
    files = export_tree(store, "/rt", out, progress=False)
    assert files == sum(1 for st in before.values() if stat.S_ISREG(st.st_mode))
    assert_same_tree(src, before, out)
    # snapshot symlinks resolve inside the export, as the HF cache layout needs
    snap = out / "hub" / "models--org--model" / "snapshots" / "0123abcd"
    assert (snap / "sub" / "config.json").read_bytes() == b'{"hidden": 384}\n' * 50
    assert (snap / "sub" / "deeper" / "empty").read_bytes() == b""
    assert (snap / "model.safetensors").stat().st_size == 700_000
    # hard links share one inode in the store too
    with store.read() as txn:
        inos = {namespace.resolve(txn, p) for p in ("/rt/hard/a/one", "/rt/hard/b/two",
                                                    "/rt/hard/c/d/three")}
        assert len(inos) == 1
        assert namespace.get(txn, inos.pop()).nlink == 3


def test_reimport_is_idempotent(store: Store, store_path: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    import_tree(store, src, "/rt", progress=False)
    before = snapshot(src)  # the first import's reads may have moved atimes (relatime)
    stats = store.stats()
    with store.read() as txn:
        inode_count = sum(1 for _ in txn.inodes())
    report = import_tree(store, src, "/rt", progress=False)
    assert not report.errors
    assert report.new_stored_bytes == 0
    again = store.stats()
    assert again["pack_bytes"] == stats["pack_bytes"]
    for key in ("files", "logical_bytes", "unique_bytes", "chunks", "unreferenced_bytes"):
        assert again[key] == stats[key], key
    with store.read() as txn:
        assert sum(1 for _ in txn.inodes()) == inode_count
    export_tree(store, "/rt", tmp_path / "out", progress=False)
    assert_same_tree(src, before, tmp_path / "out")


def test_reimport_of_a_changed_tree_replaces_content(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"old" * 100_000)
    (src / "g").write_bytes(b"stays")
    import_tree(store, src, "/", progress=False)
    (src / "d" / "f").write_bytes(b"new" * 100_000)
    import_tree(store, src, "/", progress=False)
    with store.read() as txn:
        inode = namespace.get(txn, namespace.resolve(txn, "/d/f"))
    assert store.reader.read(inode.content_id, 0, inode.size) == b"new" * 100_000
    assert store.stats()["files"] == 2
    # the old content lost its last reference (verify, in the fixture, checks the counts)
    assert store.stats()["unreferenced_bytes"] > 0


def test_import_keeps_directory_mtimes(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    before = snapshot(src)
    import_tree(store, src, "/rt", progress=False)
    export_tree(store, "/rt", tmp_path / "out", progress=False)
    after = snapshot(tmp_path / "out")
    wrong = [rel for rel, st in before.items() if stat.S_ISDIR(st.st_mode)
             and after[rel].st_mtime_ns != st.st_mtime_ns]
    assert not wrong, f"{len(wrong)} directories lost their mtime, e.g. {wrong[:3]}"


# -- integrity --------------------------------------------------------------------------------


def _damage_setup(store: Store, tmp_path: Path, kind: str) -> tuple[bytes, int]:
    """A tree whose ``victim`` has two more names (a hard link and an identical copy); one
    byte of one of its chunks is flipped. Returns the victim's bytes and the flipped offset."""
    rng = np.random.default_rng(5)
    if kind == "raw":
        victim = rng.bytes(3_000_000)
    else:
        victim = b"".join(b"line %d of a tokenizer file\n" % i for i in range(40_000))
    src = tmp_path / "src"
    for d in "abcde":
        (src / d).mkdir(parents=True)
    (src / "a" / "victim").write_bytes(victim)
    os.link(src / "a" / "victim", src / "b" / "victim-link")
    (src / "c" / "victim-copy").write_bytes(victim)
    (src / "d" / "bystander").write_bytes(rng.bytes(1_000_000))
    (src / "e" / "notes.txt").write_bytes(b"other text\n" * 5000)
    import_tree(store, src, "/t", progress=False)
    chunks = chunk_locations(store, "/t/a/victim")
    want = Codec.RAW if kind == "raw" else Codec.ZSTD
    candidates = [c for c in chunks if c[2].codec == want]
    assert candidates, [c[2].codec for c in chunks]
    _chunk_id, file_offset, loc = candidates[len(candidates) // 2]
    payload_offset = loc.stored_len // 2
    flip_byte(store.path, loc, payload_offset)
    flipped = file_offset + payload_offset if kind == "raw" else -1
    return victim, flipped


@pytest.mark.damaged_store
@pytest.mark.parametrize("kind", ["raw", "zstd"])
def test_flipped_byte_is_found_and_never_served(store: Store, store_path: Path, tmp_path: Path,
                                               kind: str) -> None:
    victim, flipped = _damage_setup(store, tmp_path, kind)
    damaged = ["/t/a/victim", "/t/b/victim-link", "/t/c/victim-copy"]

    report = verify(store, progress=False)
    assert not report.ok
    assert report.problems
    assert sorted(report.damaged_files) == damaged

    # reading: an error for every range that touches the bad block, right bytes elsewhere
    with store.read() as txn:
        inode = namespace.get(txn, namespace.resolve(txn, "/t/c/victim-copy"))
        other = namespace.get(txn, namespace.resolve(txn, "/t/d/bystander"))
    with pytest.raises(IntegrityError):
        store.reader.read(inode.content_id, 0, inode.size)
    step = 100_000
    errors = 0
    for offset in range(0, len(victim), step):
        try:
            got = store.reader.read(inode.content_id, offset, step)
        except IntegrityError:
            errors += 1
            continue
        assert got == victim[offset : offset + step], offset
        assert not offset <= flipped < offset + step
    assert errors
    # the undamaged files read fine
    assert len(store.reader.read(other.content_id, 0, other.size)) == 1_000_000

    # export refuses to write wrong bytes
    with pytest.raises(IntegrityError):
        export_tree(store, "/t", tmp_path / "out", progress=False)

    # the CLI: verify lists exactly the damaged paths and fails; cat fails cleanly
    proc = run_cli("verify", store_path)
    assert_user_error(proc, "damaged", exitcode=3)
    listed = sorted(line.removeprefix("damaged file: ") for line in proc.stdout.splitlines()
                    if line.startswith("damaged file: "))
    assert listed == damaged
    assert "problem: " in proc.stdout
    proc = run_cli("cat", store_path, "/t/a/victim")
    assert_user_error(proc, "damaged chunk", "hubfs verify", exitcode=3)
    proc = run_cli("cat", store_path, "/t/d/bystander")
    assert proc.returncode == 0 and len(proc.out) == 1_000_000


@pytest.mark.damaged_store
def test_missing_and_truncated_packs(tmp_path: Path) -> None:
    """Whole packs lost or cut short: verify names the files, reads fail, nothing else."""
    path = tmp_path / "store"
    Store.init(path, pack_target_bytes=200_000)  # one file per pack, roughly
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(9)
    for name in ("a", "b", "c", "d"):
        (src / name).write_bytes(rng.bytes(300_000))
    with Store(path) as store:
        import_tree(store, src, "/", progress=False)
        packs = {name: {loc.pack_id for _c, _o, loc in chunk_locations(store, f"/{name}")}
                 for name in "abcd"}
    assert len(set.union(*packs.values())) == 4, packs
    (pack_b,) = packs["b"]
    (pack_c,) = packs["c"]
    os.unlink(path / "packs" / f"{pack_b:08x}.pack")
    os.truncate(path / "packs" / f"{pack_c:08x}.pack", 1000)
    with Store(path, readonly=True) as store:
        report = verify(store, progress=False)
        assert sorted(report.damaged_files) == ["/b", "/c"]
        for name in ("b", "c"):
            with store.read() as txn:
                inode = namespace.get(txn, namespace.resolve(txn, f"/{name}"))
            with pytest.raises(IntegrityError):
                store.reader.read(inode.content_id, 0, inode.size)
        for name in ("a", "d"):
            with store.read() as txn:
                inode = namespace.get(txn, namespace.resolve(txn, f"/{name}"))
            assert store.reader.read(inode.content_id, 0, inode.size) == \
                (src / name).read_bytes()
    assert_user_error(run_cli("verify", path), exitcode=3)


@pytest.mark.damaged_store
def test_damaged_record_header_blames_only_its_own_files(store: Store, store_path: Path,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(10)
    for name in ("a", "b", "c"):
        (src / name).write_bytes(rng.bytes(300_000))
    import_tree(store, src, "/", progress=False)
    (_cid, _off, loc), = chunk_locations(store, "/a")
    pack = store_path / "packs" / f"{loc.pack_id:08x}.pack"
    with open(pack, "r+b") as f:  # one bit of a's record header (its chunk id field)
        f.seek(loc.offset + 20)
        byte = f.read(1)
        f.seek(loc.offset + 20)
        f.write(bytes([byte[0] ^ 1]))
    for name in ("b", "c"):  # their bytes are intact
        with store.read() as txn:
            inode = namespace.get(txn, namespace.resolve(txn, f"/{name}"))
        assert store.reader.read(inode.content_id, 0, inode.size) == (src / name).read_bytes()
    report = verify(store, progress=False)
    assert not report.ok
    assert report.damaged_files == ["/a"]


@pytest.mark.parametrize("policy", ["auto", "raw", "max"])
def test_small_chunks_many_packs(tmp_path: Path, policy: str) -> None:
    """Thousands of tiny chunks across dozens of sealed packs: round trip, verify, and any
    byte range reads back exactly (raw ranges inside checksum blocks, compressed chunks)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from hubfs.chunking import ChunkerParams

    path = tmp_path / "store"
    Store.init(path, compression_policy=policy,
               params=ChunkerParams(min_bytes=4096, avg_bytes=16384, max_bytes=65536),
               pack_target_bytes=256 * 1024)
    rng = np.random.default_rng(12)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    files = {
        "d/random": rng.bytes(900_000),  # below OBJECT_MIN_BYTES: in packs
        "d/random2": rng.bytes(900_000),
        "d/text": b"".join(b"token %d -> id %d\n" % (i, i * 31) for i in range(60_000)),
        "zeros": bytes(700_000),
        "mixed": rng.bytes(200_000) + bytes(300_000) + rng.bytes(100_001),
        "tiny": b"x",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    with Store(path) as store:
        import_tree(store, src, "/", progress=False)
        assert len(list((path / "packs").glob("*.pack"))) >= 6
        assert verify(store, progress=False).ok
        export_tree(store, "/", tmp_path / "out", progress=False)
        for name, data in files.items():
            assert (tmp_path / "out" / name).read_bytes() == data
        tables = {}
        with store.read() as txn:
            for name in files:
                inode = namespace.get(txn, namespace.resolve(txn, "/" + name))
                tables[name] = inode.content_id

        @settings(max_examples=60, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(st.sampled_from(sorted(files)), st.integers(0, 1_700_000),
               st.integers(0, 300_000))
        def reads_exactly(name: str, offset: int, size: int) -> None:
            data = files[name]
            assert store.reader.read(tables[name], offset, size) == data[offset : offset + size]

        reads_exactly()
