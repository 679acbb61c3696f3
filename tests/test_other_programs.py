"""What else lives in ~/.cache works on the mount too: databases, git, archives, pip.

hubfs is a general POSIX filesystem that happens to deduplicate; these programs exercise what
the hub clients do not: in-place rewrites in the middle of files, fcntl locks and fsync
(sqlite), many small files and renames (git), hard links and symlinks inside archives (tar).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import tarfile
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import Mounted, run_hubfs

pytestmark = pytest.mark.mount


def test_sqlite_database(mounted: Mounted) -> None:
    db = mounted.path / "cache.sqlite"
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)")
        for i in range(200):
            conn.execute("INSERT INTO kv VALUES (?, ?)", (i, bytes([i % 256]) * 3000))
            if i % 50 == 0:
                conn.commit()
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE kv SET v = ? WHERE k % 7 = 0", (b"x" * 5000,))
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*), sum(length(v)) FROM kv").fetchone() == (
            200, 29 * 5000 + 171 * 3000)


def test_git_repository(mounted: Mounted) -> None:
    repo = mounted.path / "repo"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "HOME": str(mounted.path), "PATH": "/usr/bin:/bin"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, env=env,
                              capture_output=True, text=True).stdout

    repo.mkdir()
    git("init", "-q")
    for i in range(30):
        (repo / f"f{i}.txt").write_text(f"line {i}\n" * (i + 1))
    git("add", ".")
    git("commit", "-qm", "first")
    (repo / "f3.txt").write_text("changed\n")
    git("commit", "-qam", "second")
    git("gc", "-q")
    assert git("fsck", "--strict") == ""
    assert git("log", "--format=%s").split() == ["second", "first"]


def test_tar_round_trip_with_links(mounted: Mounted, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.bin").write_bytes(bytes(range(256)) * 4000)
    (src / "b").hardlink_to(src / "d" / "a.bin")
    (src / "l").symlink_to("d/a.bin")
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="src")
    with tarfile.open(archive) as tar:
        tar.extractall(mounted.path, filter="tar")
    out = mounted.path / "src"
    assert (out / "b").read_bytes() == (src / "d" / "a.bin").read_bytes()
    assert (out / "b").stat().st_ino == (out / "d" / "a.bin").stat().st_ino
    assert (out / "l").readlink() == Path("d/a.bin")


def test_pip_cache(mounted: Mounted, tmp_path: Path) -> None:
    """pip's wheel cache (wheels it builds from sdists land in ~/.cache/pip) on the mount."""
    root = tmp_path / "hubfs_probe-1.0"
    (root / "hubfs_probe").mkdir(parents=True)
    (root / "hubfs_probe" / "__init__.py").write_text("VALUE = 42\n")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "hubfs-probe"\nversion = "1.0"\n')
    (root / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: hubfs-probe\nVersion: 1.0\n")
    sdist = tmp_path / "hubfs_probe-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    cache = mounted.path / "pip"
    for n in range(2):  # the second install takes the wheel from the cache on the mount
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                        "--no-deps", "--cache-dir", str(cache), "--target",
                        str(tmp_path / f"target{n}"), str(sdist)], check=True,
                       capture_output=True)
        assert (tmp_path / f"target{n}" / "hubfs_probe" / "__init__.py").exists()
    wheels = list(cache.rglob("*.whl"))
    assert wheels, "pip cached no wheel"
    assert run_hubfs("ls", str(mounted.store), "/pip", check=False).returncode == 0
