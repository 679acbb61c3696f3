"""``hubfs bench``: read speed through a real mount against a native copy, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubfs import benchmark
from hubfs.errors import HubfsError

from .conftest import Mounted
from .engine_helpers import assert_user_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_safetensors(path: Path, mib: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal(mib << 18, dtype=np.float32)}, str(path))


@pytest.mark.mount
def test_bench_on_a_mount_writes_ratios_json_and_png(mounted: Mounted, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    pytest.importorskip("matplotlib")
    model = mounted.path / "model.safetensors"
    write_safetensors(model, 4)
    (mounted.path / "notes.txt").write_text("not a model\n")
    work = tmp_path / "work"
    work.mkdir()
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    # --evict-only: as root the test must not drop the page cache of the whole shared machine.
    proc = run_cli("bench", mounted.path, "--repeats", "1", "--random-reads", "64",
                   "--workdir", work, "--evict-only", "--json", out_json, "--plot", out_png,
                   check=True)
    doc = json.loads(out_json.read_text())
    ratios = doc["ratios"]
    for name in ("seq_cold", "seq_hot", "random_4k_cold", "safetensors_load_cold",
                 "safetensors_load_hot"):
        assert ratios[name] > 0, (name, ratios)
        assert f"\n{name} " in proc.stdout
    assert {f["kind"] for f in doc["files"]} == {"safetensors", "other"}
    assert doc["cache_drop"]["method"] == "fadvise", doc["cache_drop"]
    assert "cold runs: asked to evict only the measured files" in proc.stdout
    for row in doc["rows"]:
        assert row["native_mbps"] > 0 and row["hubfs_mbps"] > 0, row
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert list(work.iterdir()) == [], "the native copy was not removed"


def test_bench_outside_a_mount_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    assert_user_error(run_cli("bench", tmp_path / "f"), "not inside a hubfs mount", exitcode=2)


def test_bench_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['matplotlib'] = None; from hubfs.cli import main; "
            f"sys.exit(main(['bench', {str(tmp_path)!r}, '--plot', 'x.png']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"hubfs: error: {benchmark.PLOT_INSTALL_HINT}"]
    assert "pip install 'hubfs[bench]'" in proc.stderr


def test_native_copy_needs_room(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(HubfsError, match="free some space"):
        benchmark.plan_workdir(tmp_path, None, free)
    parent, notes = benchmark.plan_workdir(tmp_path / "x", tmp_path, 1 << 20)
    assert parent == tmp_path and notes == []


def test_files_are_recognised_by_content(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    write_safetensors(tmp_path / "blob1", 1)
    torch.save({"w": torch.zeros(10)}, tmp_path / "blob2")
    (tmp_path / "blob3").write_bytes(b"{}" * 100)
    (tmp_path / "link").symlink_to("blob1")
    files = benchmark.collect_files([tmp_path])
    assert {f.path.name: f.kind for f in files} == {
        "blob1": "safetensors", "blob2": "torch", "blob3": "other"}
