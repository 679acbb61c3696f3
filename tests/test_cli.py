"""The command line on bad input: every failure is one clear line, an exit code, no traceback.

Runs ``python -m hubfs.cli`` in subprocesses. Covers stores that are missing, not stores, of a
future format or with a damaged marker; ``init`` over existing data; a second writer; an
unreadable source (as an unprivileged user: root reads everything); and a disk that fills up
during an import (a small tmpfs).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubfs import namespace
from hubfs.errors import FsError, StoreBusyError, StoreFormatError, StoreFullError
from hubfs.importer import import_tree
from hubfs.store import Store
from hubfs.verify import verify

from .engine_helpers import (
    MODEL_DIR,
    CliResult,
    assert_user_error,
    index_dump,
    run_cli,
)

NOBODY = 65534
is_root = os.geteuid() == 0


@pytest.fixture
def src(tmp_path: Path) -> Path:
    tree = tmp_path / "src"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(50_000))
    return tree


# -- the happy path, briefly ------------------------------------------------------------------


def test_cli_commands_work(store_path: Path, src: Path, tmp_path: Path) -> None:
    proc = run_cli("import", store_path, src, "--dest", "/x", check=True)
    assert "imported 2 files" in proc.stdout
    assert "a.txt" in run_cli("ls", store_path, "/x", check=True).stdout
    assert run_cli("cat", store_path, "/x/sub/b.bin", check=True).out == \
        (src / "sub" / "b.bin").read_bytes()
    assert "store is consistent" in run_cli("verify", store_path, check=True).stdout
    run_cli("export", store_path, "/x", tmp_path / "out", check=True)
    assert (tmp_path / "out" / "a.txt").read_text() == "alpha\n"
    assert json.loads(run_cli("stats", store_path, "--json", check=True).stdout)["files"] == 2


# -- stores that are not (readable) stores ----------------------------------------------------

READ_COMMANDS = [("ls",), ("cat", "/x"), ("stats",), ("verify",), ("export", "/", "OUT")]
ALL_COMMANDS = READ_COMMANDS + [("import", "SRC")]


def _args(cmd: tuple[str, ...], store: Path, tmp_path: Path, src: Path) -> list[str | Path]:
    name, *rest = cmd
    subst: dict[str, str | Path] = {"OUT": tmp_path / "out", "SRC": src}
    return [name, store, *(subst.get(r, r) for r in rest)]


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=lambda c: c[0])
def test_missing_store(cmd: tuple[str, ...], tmp_path: Path, src: Path) -> None:
    proc = run_cli(*_args(cmd, tmp_path / "no-such-store", tmp_path, src))
    assert_user_error(proc, "does not exist", "hubfs init", exitcode=2)


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=lambda c: c[0])
def test_directory_that_is_not_a_store(cmd: tuple[str, ...], tmp_path: Path, src: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file").write_text("x")
    proc = run_cli(*_args(cmd, plain, tmp_path, src))
    assert_user_error(proc, "is not a hubfs store", exitcode=2)
    assert sorted(p.name for p in plain.iterdir()) == ["file"]  # nothing written into it


def test_store_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert_user_error(run_cli("ls", tmp_path / "f"), exitcode=2)


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=lambda c: c[0])
def test_store_of_a_future_format(cmd: tuple[str, ...], store_path: Path, tmp_path: Path,
                                  src: Path) -> None:
    (store_path / "HUBFS").write_text('{"format": 99}\n')
    proc = run_cli(*_args(cmd, store_path, tmp_path, src))
    assert_user_error(proc, "format 99", "upgrade hubfs", exitcode=2)
    with pytest.raises(StoreFormatError):
        Store(store_path, readonly=True)
    (store_path / "HUBFS").write_text('{"format": 2}\n')  # so the fixture's checks can run


def test_store_of_an_old_format(store_path: Path) -> None:
    (store_path / "HUBFS").write_text('{"format": 0}\n')
    assert_user_error(run_cli("ls", store_path), "old format", exitcode=2)
    (store_path / "HUBFS").write_text('{"format": 2}\n')


@pytest.mark.parametrize("marker", [b"", b"garbage", b"\xff\xfe\x00", b'{"format": "one"}',
                                    b"[]", b"null", b"1", b'{"version": 1}', b'{"format": null}',
                                    b'{"format": 1'],
                         ids=["empty", "garbage", "binary", "string", "list", "null", "number",
                              "no-format", "format-null", "truncated"])
def test_damaged_marker(marker: bytes, store_path: Path, src: Path) -> None:
    (store_path / "HUBFS").write_bytes(marker)
    # one command per case (each is a process start); they share the marker check
    command = ("ls", "verify", "stats", "import")[len(marker) % 4]
    proc = run_cli(command, store_path, *([src] if command == "import" else []))
    assert_user_error(proc, "HUBFS is damaged", '{"format": 2}', exitcode=2)
    with pytest.raises(StoreFormatError, match="is damaged"):
        Store(store_path)
    (store_path / "HUBFS").write_text('{"format": 2}\n')


def test_marker_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "odd" / "HUBFS").mkdir(parents=True)
    assert_user_error(run_cli("ls", tmp_path / "odd"), exitcode=2)


def test_damaged_index(store_path: Path) -> None:
    data = store_path / "index" / "data.mdb"
    data.write_bytes(b"\0" * 8192)
    proc = run_cli("ls", store_path)
    assert_user_error(proc, "index", "damaged", "verify --repair", exitcode=3)


# -- init -------------------------------------------------------------------------------------


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious").write_text("keep me")
    assert_user_error(run_cli("init", target), "not an empty directory", exitcode=2)
    assert [p.name for p in target.iterdir()] == ["precious"]
    assert (target / "precious").read_text() == "keep me"


def test_init_refuses_an_existing_store_and_a_file(store_path: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("init", store_path), "already a hubfs store", exitcode=2)
    (tmp_path / "f").write_text("x")
    assert_user_error(run_cli("init", tmp_path / "f"), exitcode=2)


def test_init_into_an_empty_or_new_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run_cli("init", tmp_path / "empty", check=True)
    run_cli("init", tmp_path / "new" / "nested", "--compression", "raw", check=True)
    run_cli("verify", tmp_path / "new" / "nested", check=True)
    assert stat.S_IMODE((tmp_path / "new" / "nested").stat().st_mode) == 0o700


# -- other bad arguments ----------------------------------------------------------------------


@pytest.mark.slow
def test_bad_paths_inside_a_store(store_path: Path, src: Path, tmp_path: Path) -> None:
    run_cli("import", store_path, src, check=True)
    assert_user_error(run_cli("cat", store_path, "/missing"), "not in the store", exitcode=2)
    assert_user_error(run_cli("cat", store_path, "/sub"), "not a regular file", exitcode=2)
    assert_user_error(run_cli("cat", store_path, "/a.txt/x"), "not in the store", exitcode=2)
    assert_user_error(run_cli("ls", store_path, "/missing"), "not in the store", exitcode=2)
    assert_user_error(run_cli("export", store_path, "/missing", tmp_path / "o"), exitcode=2)
    (tmp_path / "exists").mkdir()
    assert_user_error(run_cli("export", store_path, "/", tmp_path / "exists"), "already exists",
                      exitcode=2)
    assert_user_error(run_cli("import", store_path, tmp_path / "nope"), "not a directory",
                      exitcode=2)
    assert_user_error(run_cli("import", store_path, src / "a.txt"), "not a directory",
                      exitcode=2)


@pytest.mark.parametrize("case", ["import-dest-is-a-file", "import-dest-name-too-long",
                                  "export-parent-missing", "init-where-nothing-can-be-made"])
def test_user_mistakes_that_escape_as_tracebacks(case: str, store_path: Path, src: Path,
                                                 tmp_path: Path) -> None:
    run_cli("import", store_path, src, check=True)
    if case == "import-dest-is-a-file":
        proc = run_cli("import", store_path, src, "--dest", "/a.txt")
    elif case == "import-dest-name-too-long":
        proc = run_cli("import", store_path, src, "--dest", "/" + "x" * 300)
    elif case == "export-parent-missing":
        proc = run_cli("export", store_path, "/", tmp_path / "no" / "such" / "out")
    else:
        proc = run_cli("init", "/proc/hubfs-store-here")
    assert_user_error(proc)


def test_ls_of_a_non_utf8_name_under_a_utf8_locale(store_path: Path, tmp_path: Path) -> None:
    tree = tmp_path / "odd"
    tree.mkdir()
    with open(os.path.join(os.fsencode(tree), b"caf\xe9"), "wb") as f:
        f.write(b"x")
    run_cli("import", store_path, tree, check=True)
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = run_cli("ls", store_path, "/", env=env)
    assert proc.returncode == 0, proc.stderr


def test_ls_of_a_non_utf8_name(store_path: Path, tmp_path: Path) -> None:
    """Under this machine's C.UTF-8 locale Python escapes surrogates, so names print."""
    tree = tmp_path / "odd"
    tree.mkdir()
    with open(os.path.join(os.fsencode(tree), b"caf\xe9"), "wb") as f:
        f.write(b"x")
    run_cli("import", store_path, tree, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_ALL")}
    env["LC_ALL"] = "C.UTF-8"
    proc = run_cli("ls", store_path, "/", env=env, check=True)
    assert b"caf\xe9" in proc.out
    assert run_cli("cat", store_path, b"/caf\xe9", check=True).out == b"x"


# -- the writer lock --------------------------------------------------------------------------


def test_second_writer_is_refused_while_readers_work(store: Store, store_path: Path,
                                                     src: Path) -> None:
    """The fixture's open store holds the lock, as a mount would."""
    proc = run_cli("import", store_path, src)
    error = assert_user_error(proc, "in use by another hubfs process", exitcode=4)
    assert f"pid {os.getpid()}" in error
    with pytest.raises(StoreBusyError):
        Store(store_path)
    # readers take no lock
    run_cli("ls", store_path, check=True)
    run_cli("stats", store_path, check=True)
    run_cli("verify", store_path, check=True)
    # the lock goes with the holder: a refused writer did not leave anything behind
    import_tree(store, src, "/", progress=False)
    assert store.stats()["files"] == 2


def test_lock_is_released_on_close(store_path: Path, src: Path) -> None:
    with Store(store_path):
        pass
    run_cli("import", store_path, src, check=True)
    with Store(store_path) as again:
        assert again.stats()["files"] == 2


# -- an unreadable source, as an unprivileged user --------------------------------------------


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory that uid 65534 owns and can reach (pytest's tmp dirs are root-only)."""
    if not is_root or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the import as an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="hubfs-test-nobody-", dir="/tmp"))
    try:
        os.chown(base, NOBODY, NOBODY)
        yield base
    finally:
        shutil.rmtree(base)


def _as_nobody(*args: str | os.PathLike[str], cwd: Path) -> CliResult:
    return run_cli(*args, prefix=["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                  "--clear-groups"], cwd=cwd,
                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"})


def test_unreadable_source_entries(nobody_dir: Path) -> None:
    src = nobody_dir / "src"
    (src / "ok" / "deep").mkdir(parents=True)
    (src / "ok" / "readable.txt").write_text("fine\n")
    (src / "ok" / "deep" / "weights.bin").write_bytes(os.urandom(300_000))
    (src / "secret.bin").write_bytes(b"you cannot read me")
    (src / "locked").mkdir()
    (src / "locked" / "inside.txt").write_text("hidden\n")
    (src / "z-after.txt").write_text("imported after the failures\n")
    for dirpath, dirnames, filenames in os.walk(nobody_dir):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.chown(name, NOBODY, NOBODY)
    os.chmod(src / "secret.bin", 0o000)
    os.chmod(src / "locked", 0o000)
    store = nobody_dir / "store"
    proc = _as_nobody("init", store, cwd=nobody_dir)
    assert proc.returncode == 0, proc.stderr

    proc = _as_nobody("import", store, src, cwd=nobody_dir)
    error = assert_user_error(proc, "2 entries could not be read", "run the import again",
                              exitcode=1, one_line=False)
    stderr = proc.stderr
    assert "secret.bin: Permission denied" in stderr
    assert "locked: Permission denied" in stderr
    assert "readable.txt" not in stderr and error

    # everything else is in the store, and the store is consistent
    with Store(store, readonly=True) as opened:
        report = verify(opened, progress=False)
        assert report.ok, report.problems
        with opened.read() as txn:
            for path, want in [("/ok/readable.txt", b"fine\n"),
                               ("/ok/deep/weights.bin", (src / "ok" / "deep" /
                                                         "weights.bin").read_bytes()),
                               ("/z-after.txt", b"imported after the failures\n")]:
                inode = namespace.get(txn, namespace.resolve(txn, path))
                assert opened.reader.read(inode.content_id, 0, inode.size) == want
                assert inode.uid == NOBODY
            with pytest.raises(FsError):
                namespace.resolve(txn, "/secret.bin")
            # the unreadable directory itself is there (its stat was readable), empty
            locked = namespace.resolve(txn, "/locked")
            assert list(namespace.readdir(txn, locked)) == []
    # the CLI agrees, as the same unprivileged user
    proc = _as_nobody("verify", store, cwd=nobody_dir)
    assert proc.returncode == 0, proc.stderr


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs, unmounted afterwards whatever happens."""
    if not is_root or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_full_disk_during_import(small_disk: Path, tmp_path: Path) -> None:
    store_path = small_disk / "store"
    Store.init(store_path)
    # a first import that fits: the small files of the model
    early = tmp_path / "early"
    early.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "README.md"):
        shutil.copyfile(MODEL_DIR / name, early / name)
    with Store(store_path) as store:
        import_tree(store, early, "/early", progress=False)
        before = index_dump(store)
    # then the 90 MB model into a 40 MB disk, through the CLI
    proc = run_cli("import", store_path, MODEL_DIR, "--dest", "/")
    assert_user_error(proc, "no space left", "nothing partial was kept", exitcode=1)
    with Store(store_path, readonly=True) as store:
        # the failed batch left no trace in the index
        assert index_dump(store) == before
        report = verify(store, progress=False)
        assert report.ok, report.problems
        with store.read() as txn:
            for name in ("config.json", "tokenizer.json", "vocab.txt", "README.md"):
                inode = namespace.get(txn, namespace.resolve(txn, f"/early/{name}"))
                assert store.reader.read(inode.content_id, 0, inode.size) == \
                    (MODEL_DIR / name).read_bytes()
    assert "store is consistent" in run_cli("verify", store_path, check=True).stdout


def test_full_disk_during_import_in_process(small_disk: Path, tmp_path: Path) -> None:
    """The same through the engine: StoreFullError; the open store stays consistent."""
    store_path = small_disk / "store"
    Store.init(store_path)
    with Store(store_path) as store:
        import_tree(store, MODEL_DIR / "1_Pooling", "/early", progress=False)
        before = index_dump(store)
        with pytest.raises(StoreFullError, match="no space left"):
            import_tree(store, MODEL_DIR, "/", progress=False)
        assert index_dump(store) == before
        assert verify(store, progress=False).ok
        with store.read() as txn:
            inode = namespace.get(txn, namespace.resolve(txn, "/early/config.json"))
        assert store.reader.read(inode.content_id, 0, inode.size) == \
            (MODEL_DIR / "1_Pooling" / "config.json").read_bytes()


def _fill(disk: Path) -> None:
    """Take every last byte of ``disk``."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_writable_open_of_a_store_on_a_full_disk(small_disk: Path, src: Path) -> None:
    store_path = small_disk / "store"
    run_cli("init", store_path, check=True)
    _fill(small_disk)
    proc = run_cli("import", store_path, src)
    assert_user_error(proc, "no space", exitcode=1)
