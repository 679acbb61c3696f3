"""Crash safety: kill -9 the mount daemon mid-work, remount, and check nothing acknowledged is lost.

A writer process runs several threads, each in its own directory of the mount, doing what the
hub clients do: write a file to a temp name (sometimes with fsync), close it, rename it into
place; sometimes unlink an older one. After each operation *returns*, the thread appends it to
a journal outside the mount and fsyncs that. At a random moment the daemon is killed with
SIGKILL. After remounting, every journaled file must be there with its bytes; only the one
operation a thread had in flight may have gone either way. ``verify`` must be clean every round,
and after a final ``gc`` no unreferenced byte may remain in the packs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubfs.staging import SIDECAR_SUFFIX, Staging
from hubfs.store import Store
from hubfs.verify import verify
from tests.conftest import mount_store, run_hubfs

pytestmark = [pytest.mark.mount, pytest.mark.slow]

ROUNDS = 6
THREADS = 3

WRITER = r'''
import hashlib, json, os, random, sys, threading
mnt, journal_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])

def work(k):
    rng = random.Random(seed * 100 + k)
    d = os.path.join(mnt, f"w{k}")
    os.makedirs(d, exist_ok=True)
    jfd = os.open(os.path.join(journal_dir, f"j{k}"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    def log(entry):
        os.write(jfd, (json.dumps(entry) + "\n").encode())
        os.fsync(jfd)
    n = 0
    try:
        while True:
            n += 1
            name = f"f{seed}-{n}"
            if n > 3 and rng.random() < 0.25:
                victims = sorted(os.listdir(d))
                victims = [v for v in victims if not v.endswith(".incomplete")]
                if victims:
                    v = rng.choice(victims)
                    log({"begin": "rm", "path": v})
                    os.unlink(os.path.join(d, v))
                    log({"end": "rm", "path": v})
                    continue
            size = rng.choice([0, 100, 70_000, 1_500_000, 6_000_000])
            data = rng.randbytes(size // 2) * 2
            tmp = os.path.join(d, name + ".incomplete")
            log({"begin": "put", "path": name, "sha": hashlib.sha256(data).hexdigest()})
            with open(tmp, "wb") as f:
                for i in range(0, len(data), 1 << 20):
                    f.write(data[i:i + (1 << 20)])
                if rng.random() < 0.5:
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, os.path.join(d, name))
            log({"end": "put", "path": name})
    except OSError:
        return  # the daemon is gone

threads = [threading.Thread(target=work, args=(k,)) for k in range(int(sys.argv[4]))]
for t in threads: t.start()
for t in threads: t.join()
'''


def expected_state(journal: Path) -> tuple[dict[str, str], set[str]]:
    """Files a thread's completed operations left (name -> sha256), and the names that
    operations cut short by a kill may or may not have touched."""
    files: dict[str, str] = {}
    pending: dict[str, dict] = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            entry = json.loads(line)
            if "begin" in entry:
                pending[entry["path"]] = entry  # unfinished ones stay uncertain for good
            elif entry["end"] == "put":
                files[entry["path"]] = pending.pop(entry["path"])["sha"]
            else:
                files.pop(entry["path"], None)
                pending.pop(entry["path"], None)
    uncertain = set()
    for path in pending:
        uncertain |= {path, path + ".incomplete"}
    return files, uncertain


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def daemon_pid(store: Path) -> int:
    return int((store / "lock").read_text())


def check_round(mnt: Path, journals: Path) -> int:
    checked = 0
    for k in range(THREADS):
        files, uncertain = expected_state(journals / f"j{k}")
        d = mnt / f"w{k}"
        present = set(os.listdir(d)) if d.exists() else set()
        for name, digest in files.items():
            if name in uncertain:
                continue
            assert name in present, f"w{k}/{name} was acknowledged but is gone"
            assert sha256(d / name) == digest, f"w{k}/{name} has other bytes"
            checked += 1
        stray = present - set(files) - uncertain
        stray = {s for s in stray if not s.endswith(".incomplete")}
        assert not stray, f"w{k}: files that no completed operation left: {stray}"
    return checked


@pytest.mark.allow_warnings  # recovery logs what it recovered, as a warning
@pytest.mark.parametrize("step_mib", [64, 1], ids=["whole-files", "fronts-stored-while-writing"])
def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path: Path, step_mib: int) -> None:
    store, mnt, journals = tmp_path / "store", tmp_path / "mnt", tmp_path / "journals"
    journals.mkdir()
    Store.init(store)
    rng = random.Random(7)
    checked = left = 0
    for round_no in range(ROUNDS):
        mount_store(store, mnt, "--ingest-step-mib", str(step_mib))
        try:
            checked += check_round(mnt, journals)  # what the previous round acknowledged
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt), str(journals),
                                       str(round_no + 1), str(THREADS)])
            time.sleep(rng.uniform(0.5, 2.5))
            os.kill(daemon_pid(store), signal.SIGKILL)
            writer.wait(timeout=60)
        finally:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, check=False)
        time.sleep(0.2)  # let the kernel release the dead daemon's lock
        with Store(store, readonly=True) as opened:
            report = verify(opened, progress=False)
        assert report.ok, f"round {round_no}: {report.problems} {report.damaged_files}"
        # files being written when the daemon died: the next mount must store or drop each
        left += len({Staging.inode_of(p.name) for p in (store / "staging").iterdir()
                     if not p.name.endswith(SIDECAR_SUFFIX)})
    mount_store(store, mnt)
    try:
        checked += check_round(mnt, journals)
        log = (store / "hubfs.log").read_text()
    finally:
        run_hubfs("umount", str(mnt))
    assert checked > 10, "the writers did too little to test anything"
    recovered = len(re.findall(r"recovered \d+ bytes written to inode", log))
    dropped = log.count("dropping staging file")
    assert left, "no kill caught a file being written: recovery went untested"
    assert recovered + dropped == left, (recovered, dropped, left)
    assert recovered, "every staging file a kill left was dropped, none recovered"
    run_hubfs("gc", "--full", str(store))
    with Store(store, readonly=True) as opened:
        stats = opened.stats()
        report = verify(opened, progress=False)
    assert report.ok, report.problems
    assert stats["unreferenced_bytes"] == 0
    # packs hold only live records now: stored chunk bytes plus per-record headers
    assert stats["pack_bytes"] <= stats["chunk_stored_bytes"] * 1.01 + 64 * 1024, stats
