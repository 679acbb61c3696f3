"""``hubfs status``: a running mount answers while a file is being written and staged.

No time budget is asserted (timed unit tests are noise on a shared machine): the test shows that
status answers while the write is in flight, not after it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from hubfs.store import Store
from tests.conftest import mount_store, run_hubfs, unmount_and_check


def test_status_answers_while_a_large_write_is_ingested(tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    store = tmp_path / "store"
    Store.init(store)
    # --checked-reads: the daemon receives the writes and ingests them (as root the kernel
    # would write the file straight into staging, too fast to catch here)
    mounted = mount_store(store, tmp_path / "mnt", "--ingest-step-mib", "4", "--checked-reads")
    done = threading.Event()
    answered = threading.Event()  # two reports came while the file is open

    def write() -> None:
        block = os.urandom(1 << 20)
        with open(mounted.path / "big.bin", "wb") as f:
            f.writelines(block[i % 7 :] + block[: i % 7] for i in range(300))
            answered.wait(60)  # a fast disk writes 300 MB before the first status answers
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        reports = []
        while not done.is_set():
            report = json.loads(run_hubfs("status", str(mounted.path), "--json").stdout)
            assert isinstance(report, dict)
            reports.append(report)
            if len(reports) >= 2:
                answered.set()
        writer.join()
        assert any(r["staged_files"] == 1 and r["open_files"] == 1 for r in reports), reports
        assert all(r["pid"] == reports[0]["pid"] and r["free_bytes"] > 0 for r in reports)
        assert {"read_mode", "read_mode_why", "recent_errors", "ingests_running",
                "last_snapshot", "uptime_s"} <= set(reports[0])
        # the requests the daemon served, with their times: the writer's create among them
        created = reports[-1]["requests"]["create"]
        assert created["count"] == 1 and 0 < created["mean_ms"] <= created["max_ms"], created
        shown = run_hubfs("status", str(mounted.path)).stdout
        assert "requests served" in shown and "  create " in shown, shown
    finally:
        writer.join()
        unmount_and_check(mounted, request)


def test_status_of_a_plain_directory_says_what_to_do(tmp_path: Path) -> None:
    result = run_hubfs("status", str(tmp_path), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("hubfs: error: ") and "not a hubfs mount" in result.stderr
