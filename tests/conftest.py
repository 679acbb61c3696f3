"""Shared fixtures: a fresh store per test, a consistency check after it, no stray warnings.

As in s3ql's test suite, a test fails when the code under test logs a WARNING it did not
expect (mark expected ones with ``@pytest.mark.allow_warnings``), and every test that used the
``store`` fixture ends with ``verify`` coming back clean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubfs.store import Store
from hubfs.verify import verify


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_warnings: the test expects WARNING log records")
    config.addinivalue_line("markers", "damaged_store: the test leaves the store damaged on "
                            "purpose, so the fixture skips its final verify")


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
