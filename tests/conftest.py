"""Shared fixtures: a fresh store per test, a consistency check after it, no stray warnings.

As in s3ql's test suite, a test fails when the code under test logs a WARNING it did not
expect (mark expected ones with ``@pytest.mark.allow_warnings``), and every test that used the
``store`` fixture ends with ``verify`` coming back clean.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubfs.store import Store
from hubfs.verify import verify


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_warnings: the test expects WARNING log records")
    config.addinivalue_line("markers", "mount: the test mounts a real FUSE filesystem")
    config.addinivalue_line("markers", "damaged_store: the test leaves the store damaged on "
                            "purpose, so the fixture skips its final verify")
    # The layers: `pytest -m "not mount and not slow and not clients"` runs the engine alone
    # (no FUSE, no real clients) in under a minute; scripts/test runs everything.
    config.addinivalue_line("markers", "mount: the test mounts a store through FUSE")
    config.addinivalue_line("markers", "slow: the test takes more than a few seconds")
    config.addinivalue_line("markers", "clients: the test runs real huggingface_hub, torch "
                            "or TensorFlow clients")


# Fixtures that mount a store: a test that uses one is a `mount` test wherever it lives.
MOUNT_FIXTURES = {"mounted", "big_mount", "pristine_store", "index_sweep"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mount)


@pytest.fixture(autouse=True)
def no_unexpected_warnings(request: pytest.FixtureRequest,
                           caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO, logger="hubfs")
    yield
    if request.node.get_closest_marker("allow_warnings"):
        return
    bad = [r for r in caplog.get_records("call") if r.levelno >= logging.WARNING
           and r.name.startswith("hubfs")]
    assert not bad, "unexpected warnings: " + "; ".join(r.getMessage() for r in bad)


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    """The directory standing in for ``~/.cache`` in the client scenarios; the real-mount
    suite (test_clients_on_mount) overrides it with a hubfs mount."""
    root = tmp_path / "cache"
    root.mkdir()
    return root


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.init(path)
    return path


@pytest.fixture
def store(store_path: Path, request: pytest.FixtureRequest) -> Iterator[Store]:
    """A fresh writable store; after the test it must verify clean."""
    with Store(store_path) as opened:
        yield opened
    if request.node.get_closest_marker("damaged_store"):
        return
    with Store(store_path, readonly=True) as reopened:
        report = verify(reopened, progress=False)
    assert report.ok, f"verify found problems: {report.problems} {report.damaged_files}"


class Mounted:
    """A store mounted for real through ``hubfs mount`` (a background daemon)."""

    def __init__(self, store: Path, mountpoint: Path) -> None:
        self.store = store
        self.path = mountpoint

    def hubfs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_hubfs(*args, check=check)

    def log(self) -> str:
        log_file = self.store / "hubfs.log"
        return log_file.read_text() if log_file.exists() else ""

    def stats(self) -> dict:
        return json.loads(run_hubfs("stats", str(self.store), "--json").stdout)


def run_hubfs(*args: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "hubfs.cli", *args], capture_output=True,
                          text=True, check=check, timeout=600, **kwargs)  # type: ignore[call-overload]


def mount_store(store: Path, mountpoint: Path, *extra: str) -> Mounted:
    mountpoint.mkdir(exist_ok=True)
    run_hubfs("mount", str(store), str(mountpoint), *extra)
    return Mounted(store, mountpoint)


def unmount_and_check(mounted: Mounted, request: pytest.FixtureRequest) -> None:
    """Unmount, then the daemon log must be free of errors and the store must verify clean."""
    result = run_hubfs("umount", str(mounted.path), check=False)
    if result.returncode != 0:
        subprocess.run(["fusermount3", "-uz", str(mounted.path)], check=False)
        pytest.fail(f"umount failed: {result.stderr}")
    log_text = mounted.log()
    if not request.node.get_closest_marker("allow_warnings"):
        bad = [line for line in log_text.splitlines()
               if " ERROR " in line or " WARNING " in line or "Traceback" in line]
        assert not bad, "daemon logged problems:\n" + "\n".join(bad[:20])
    if request.node.get_closest_marker("damaged_store"):
        return
    with Store(mounted.store, readonly=True) as reopened:
        report = verify(reopened, progress=False)
    assert report.ok, f"verify found problems: {report.problems} {report.damaged_files}"


@pytest.fixture
def mounted(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mounted]:
    """A fresh store mounted at a temp dir; unmounted, log-checked and verified afterwards."""
    store = tmp_path / "store"
    Store.init(store)
    mnt = mount_store(store, tmp_path / "mnt")
    try:
        yield mnt
    finally:
        unmount_and_check(mnt, request)


# The cluster tests' object store (a real `weed mini`) and a fresh bucket prefix per test.
from tests.seaweed import remote_url, seaweed  # noqa: F401
