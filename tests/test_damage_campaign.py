"""A damage campaign on a stopped store: flips and truncations of data.mdb and of packs.

Each seed copies an imported store (the import took a snapshot), damages it one way, then runs
``verify``, ``ls``, ``cat`` and ``verify --repair`` as a user would. No command may die of a
signal, hang, or show a traceback; a failure is one ``hubfs: error:`` line that names
``hubfs verify --repair``. After the repair, every file whose chunks all still have an intact record in
the packs (computed here by checking every record) must read back byte-identical, and no file
may ever read back other bytes.

The suite runs ``CAMPAIGN_SEEDS`` seeds (marked slow); ``HUBFS_DAMAGE_SEEDS=200`` runs the full
campaign by hand (200 seeds took ~820 s on the loaded 2-core machine).
"""

from __future__ import annotations

import os
import random
import shutil
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from hubfs import namespace
from hubfs.chunking import ChunkerParams
from hubfs.packs import PackFiles
from hubfs.store import Store
from hubfs.verify import VerifyReport, check_files
from tests.test_damage import LMDB_PAGE_BYTES, Outcome, import_files, run_cli, tree_files

pytestmark = pytest.mark.slow

CAMPAIGN_SEEDS = int(os.environ.get("HUBFS_DAMAGE_SEEDS", "3"))  # ~30 s here
# Seeds of the full campaign that once failed, run every time: 36 (the live index reads back
# but a write into it fails), 71 (a flipped file type), 161 (an undecodable inode key).
REGRESSION_SEEDS = (36, 71, 161)
# HUBFS_DAMAGE_SEED_LIST=3,161 re-runs chosen seeds of a full campaign
SEEDS = ([int(s) for s in os.environ["HUBFS_DAMAGE_SEED_LIST"].split(",")]
         if os.environ.get("HUBFS_DAMAGE_SEED_LIST")
         else sorted({*range(CAMPAIGN_SEEDS), *REGRESSION_SEEDS}))
PARALLEL = 3
KINDS = ("mdb flips", "mdb heavy flips", "mdb truncation", "pack flips", "pack truncation")
BAD_KINDS = ("hang", "traceback", "messy")


@dataclass(frozen=True)
class SeedOutcome:
    seed: int
    kind: str
    before: tuple[Outcome, ...]  # verify, ls, cat
    repair: Outcome
    after: Outcome  # verify after the repair
    restorable: int
    identical: int
    wrong: tuple[str, ...]  # files that read back other bytes, or restorable ones that failed

    def row(self) -> str:
        outcomes = (*self.before, self.repair, self.after)
        cells = " ".join(f"{o.kind:9s}" for o in outcomes)
        lines = " | ".join(dict.fromkeys(o.line for o in outcomes if not names_the_fix(o)))
        return (f"seed {self.seed:4d} {self.kind:16s} {cells} restorable {self.restorable} "
                f"identical {self.identical} {' '.join(self.wrong)[:120]} {lines[:300]}")


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes],
                                                                dict[str, list[bytes]]]:
    root = tmp_path_factory.mktemp("campaign")
    files = tree_files(11)
    store = root / "store"
    import_files(store, root / "src", files)
    chunks: dict[str, list[bytes]] = {}
    with Store(store, readonly=True) as opened, opened.read() as txn:
        for path in files:
            inode = namespace.get(txn, namespace.resolve(txn, path))
            assert stat.S_ISREG(inode.mode)
            table = txn.content(inode.content_id)
            chunks[path] = list(table.chunk_ids) if table else []
    return store, files, chunks


def damage(store: Path, seed: int) -> str:
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    mdb = store / "index" / "data.mdb"
    packs = sorted(store.glob("packs/*.pack"))
    if kind.startswith("mdb") and "flips" in kind:
        data = bytearray(mdb.read_bytes())
        for _ in range(64 if "heavy" in kind else rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        mdb.write_bytes(data)
    elif kind == "mdb truncation":
        pages = mdb.stat().st_size // LMDB_PAGE_BYTES
        os.truncate(mdb, rng.randrange(pages) * LMDB_PAGE_BYTES + rng.choice([0, 0, 17]))
    elif kind == "pack flips":
        pack = rng.choice(packs)
        data = bytearray(pack.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        pack.write_bytes(data)
    else:
        pack = rng.choice(packs)
        os.truncate(pack, rng.randrange(pack.stat().st_size))
    return kind


def intact_chunks(store: Path) -> set[bytes]:
    """Chunk ids with at least one intact record or object chunk, every byte checked (no
    index needed; the test stores use the default chunking)."""
    packs = PackFiles(store / "packs")
    try:
        intact = check_files(packs, ChunkerParams(), VerifyReport(), False)
        return {rec.chunk_id for rec in intact.records.values()}
    finally:
        packs.close()


def names_the_fix(outcome: Outcome) -> bool:
    """A failure caused by damage names the command that deals with it."""
    return outcome.kind not in ("error", "problems") or "hubfs verify --repair" in outcome.line


def run_seed(imported: tuple[Path, dict[str, bytes], dict[str, list[bytes]]], work: Path,
             seed: int) -> SeedOutcome:
    pristine, files, chunks = imported
    store = work / f"seed{seed}"
    shutil.copytree(pristine, store, symlinks=True)
    try:
        kind = damage(store, seed)
        before = (run_cli("verify", str(store)), run_cli("ls", str(store), "/models"),
                  run_cli("cat", str(store), "/models/b.bin"))
        repair = run_cli("verify", "--repair", str(store))
        after = run_cli("verify", str(store))
        intact = intact_chunks(store)
        restorable = [p for p in files if all(c in intact for c in chunks[p])]
        wrong = []
        identical = 0
        for path, data in files.items():
            import subprocess
            import sys

            cat = subprocess.run([sys.executable, "-m", "hubfs.cli", "cat", str(store), path],
                                 capture_output=True, timeout=60, check=False)
            if cat.returncode == 0 and cat.stdout != data:
                wrong.append(f"{path}:other-bytes")
            elif cat.returncode == 0:
                identical += 1
            elif path in restorable:
                wrong.append(f"{path}:not-restored")
            if cat.returncode < 0 or b"Traceback" in cat.stderr:
                wrong.append(f"{path}:cat-crashed")
        return SeedOutcome(seed, kind, before, repair, after, len(restorable), identical,
                           tuple(wrong))
    finally:
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="module")
def campaign(imported: tuple[Path, dict[str, bytes], dict[str, list[bytes]]],
             tmp_path_factory: pytest.TempPathFactory) -> list[SeedOutcome]:
    work = tmp_path_factory.mktemp("campaign-seeds")
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda s: run_seed(imported, work, s), SEEDS))
    print(f"\ndamage campaign, {len(results)} seeds: verify, ls, cat, verify --repair, verify")
    for result in results:
        print(result.row())
    tally = Counter((r.kind, r.repair.kind, r.after.kind) for r in results)
    for (kind, repaired, after), n in sorted(tally.items()):
        print(f"  {kind:16s} repair {repaired:9s} then verify {after:9s} x{n}")
    return results


def test_no_command_dies_or_shows_a_traceback(campaign: list[SeedOutcome]) -> None:
    bad = [r.row() for r in campaign for o in (*r.before, r.repair, r.after)
           if o.kind in BAD_KINDS or o.kind.startswith("signal")]
    assert not bad, "\n".join(bad)


def test_every_failure_is_one_line_naming_repair(campaign: list[SeedOutcome]) -> None:
    bad = [r.row() for r in campaign for o in (*r.before, r.repair, r.after)
           if not names_the_fix(o)]
    assert not bad, "\n".join(bad)


def test_repair_restores_every_restorable_file_byte_identical(
        campaign: list[SeedOutcome]) -> None:
    bad = [r.row() for r in campaign if r.wrong or r.identical < r.restorable]
    assert not bad, "\n".join(bad)


def test_index_damage_is_fully_repaired(campaign: list[SeedOutcome]) -> None:
    """Damage to data.mdb alone: the snapshot and the packs bring back a clean store."""
    bad = [r.row() for r in campaign if r.kind.startswith("mdb")
           and (r.repair.kind, r.after.kind) != ("ok", "ok")]
    assert not bad, "\n".join(bad)
