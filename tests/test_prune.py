"""``hubfs prune`` on a plain directory: which entries each library's cache is cut into, which go,
and that what is left is a cache the library still reads (``scan_cache_dir`` without warnings).

The layouts are written here the way each library writes them (names, symlinks, refs, locks);
the real clients writing and reading them through a mount are in test_prune_on_mount.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hubfs import prune
from hubfs.errors import HubfsError

from .engine_helpers import assert_user_error, run_cli

DAY_S = 86400.0
NOW_S = time.time()
C_OLD, C_NEW = "a" * 40, "b" * 40
TF_OLD, TF_NEW = "1" * 40, "2" * 40
DL = "d" * 64


def age(path: Path, days: float) -> None:
    """Set atime and mtime of ``path`` and everything below it ``days`` back."""
    when = NOW_S - days * DAY_S
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in reversed(paths):
        os.utime(p, (when, when), follow_symlinks=False)


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def make_caches(top: Path) -> dict[str, Path]:
    """An HF hub cache (a model with an old and a new revision sharing a blob, an old dataset
    repo), a torch hub, a TF Hub cache and a datasets cache; "old" things 60 days unused."""
    hub = top / "huggingface" / "hub"
    repo = hub / "models--org--model"
    shared, old_only, new_only = (write(repo / "blobs" / n, s) for n, s in
                                  (("shared", 3000), ("oldonly", 5000), ("newonly", 7000)))
    for commit, blobs in ((C_OLD, (shared, old_only)), (C_NEW, (shared, new_only))):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for blob in blobs:
            (snap / f"{blob.name}.bin").symlink_to(f"../../blobs/{blob.name}")
    write(repo / "refs" / "main", 0).write_text(C_NEW)
    write(repo / "refs" / "pr" / "1", 0).write_text(C_OLD)
    (repo / ".no_exist" / C_OLD).mkdir(parents=True)
    (repo / ".no_exist" / C_OLD / "missing.txt").touch()
    (hub / ".locks" / "models--org--model").mkdir(parents=True)
    data = hub / "datasets--org--data"
    write(data / "blobs" / "rows", 4000)
    (data / "snapshots" / C_OLD).mkdir(parents=True)
    (data / "snapshots" / C_OLD / "rows.parquet").symlink_to("../../blobs/rows")
    write(data / "refs" / "main", 0).write_text(C_OLD)
    (hub / ".locks" / "datasets--org--data").mkdir(parents=True)
    (hub / ".locks" / "datasets--org--data" / "rows.lock").touch()
    (hub / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    age(repo / "blobs" / "oldonly", 60)
    age(repo / "blobs" / "shared", 60)
    age(repo / "snapshots" / C_OLD, 60)
    age(data, 60)

    torch_hub = top / "torch" / "hub"
    write(torch_hub / "checkpoints" / "old-0123456789.pth", 6000)
    write(torch_hub / "checkpoints" / "new-9876543210.pth", 6000)
    write(torch_hub / "owner_repo_main" / "hubconf.py", 100)
    (torch_hub / "trusted_list").write_text("owner_repo\n")
    age(torch_hub / "checkpoints" / "old-0123456789.pth", 60)
    age(torch_hub / "owner_repo_main", 60)

    tf = top / "tfhub_modules"
    for module, days in ((TF_OLD, 60), (TF_NEW, 1)):
        write(tf / module / "saved_model.pb", 2000)
        write(tf / module / "variables" / "variables.index", 100)
        (tf / f"{module}.descriptor.txt").write_text(f"Module: http://x/{module}\n")
        age(tf / module, days)
        age(tf / f"{module}.descriptor.txt", days)
    (tf / f"{TF_OLD}.lock").write_text("stale lock")
    age(tf / f"{TF_OLD}.lock", 60)

    ds = top / "huggingface" / "datasets"
    write(ds / "downloads" / DL, 9000)
    (ds / "downloads" / f"{DL}.json").write_text("{}")
    (ds / "downloads" / f"{DL}.lock").touch()
    prepared = ds / "org___data" / "default" / "0.0.0" / ("e" * 16)
    write(prepared / "data-train.arrow", 8000)
    (prepared / "dataset_info.json").write_text("{}")
    lock = ds / ("_" + ds.as_posix().replace("/", "_") + "_org___data_default_0.0.0_"
                 + "e" * 16 + ".lock")
    lock.touch()
    for path in (ds / "downloads", ds / "org___data"):
        age(path, 60)
    return {"hub": hub, "repo": repo, "data": data, "torch": torch_hub, "tf": tf, "ds": ds,
            "prepared": prepared, "lock": lock}


def test_scan_cuts_each_library_into_entries(tmp_path: Path) -> None:
    make_caches(tmp_path)
    found = {(e.library, e.kind, e.name) for e in prune.scan(tmp_path)}
    assert found == {
        ("huggingface", "revision", f"models--org--model@{C_OLD[:10]} (pr/1)"),
        ("huggingface", "revision", f"models--org--model@{C_NEW[:10]} (main)"),
        ("huggingface", "revision", f"datasets--org--data@{C_OLD[:10]} (main)"),
        ("torch.hub", "checkpoint", "checkpoints/old-0123456789.pth"),
        ("torch.hub", "checkpoint", "checkpoints/new-9876543210.pth"),
        ("torch.hub", "repo", "owner_repo_main"),
        ("tfhub", "module", TF_OLD),
        ("tfhub", "module", TF_NEW),
        ("datasets", "download", f"downloads/{DL[:12]}"),
        ("datasets", "dataset", "org___data/default/0.0.0/" + "e" * 16),
    }


def test_prune_unused_for_removes_old_entries_whole(tmp_path: Path) -> None:
    hf = pytest.importorskip("huggingface_hub")
    paths = make_caches(tmp_path)
    entries = prune.scan(tmp_path)
    chosen = prune.select(entries, now_s=NOW_S, unused_for_s=30 * DAY_S)
    assert all("new" not in e.name and C_NEW[:10] not in e.name and e.name != TF_NEW
               for e in chosen)
    assert len(chosen) == 7
    plan = prune.plan_removals(entries, chosen)
    # oldonly 5000 + old snapshot; data repo 4000; torch 6000 + 100; tf 2100 + descriptor and
    # lock; datasets 9000 + 2 + 8000 + 2
    assert plan.frees_bytes >= 5000 + 4000 + 6100 + 2100 + 9002 + 8002
    prune.execute(plan)

    repo, hub = paths["repo"], paths["hub"]
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == ["newonly", "shared"]
    assert os.listdir(repo / "snapshots") == [C_NEW]
    assert os.listdir(repo / "refs") == ["main"] or sorted(os.listdir(repo / "refs")) == \
        ["main", "pr"]
    assert not (repo / "refs" / "pr" / "1").exists()
    assert not (repo / ".no_exist" / C_OLD).exists()
    assert not paths["data"].exists() and not (hub / ".locks" / "datasets--org--data").exists()
    info = hf.scan_cache_dir(hub)
    assert info.warnings == []
    assert [(r.repo_id, [v.commit_hash for v in r.revisions]) for r in info.repos] == \
        [("org/model", [C_NEW])]

    torch_hub = paths["torch"]
    assert sorted(os.listdir(torch_hub)) == ["checkpoints", "trusted_list"]
    assert os.listdir(torch_hub / "checkpoints") == ["new-9876543210.pth"]
    assert sorted(os.listdir(paths["tf"])) == [TF_NEW, f"{TF_NEW}.descriptor.txt"]
    ds = paths["ds"]
    assert os.listdir(ds / "downloads") == []
    assert not paths["prepared"].exists() and not paths["lock"].exists()
    # nothing is left in a trash directory
    assert prune.stale_trash(tmp_path) == []


def test_keep_size_keeps_the_most_recently_used(tmp_path: Path) -> None:
    make_caches(tmp_path)
    entries = prune.scan(tmp_path)
    newest = sorted(entries, key=lambda e: e.last_used_s, reverse=True)
    # Room for exactly the three newest entries (files shared between them count once).
    keys: dict[tuple[int, int], int] = {}
    for entry in newest[:3]:
        keys.update({f.key: f.size for f in entry.files.values()})
    chosen = prune.select(entries, now_s=NOW_S, keep_bytes=sum(keys.values()))
    assert {id(e) for e in chosen} == {id(e) for e in newest[3:]}
    assert prune.select(entries, now_s=NOW_S, keep_bytes=0) == newest
    assert prune.select(entries, now_s=NOW_S, keep_bytes=10**12) == []


def test_a_repo_losing_every_revision_goes_whole(tmp_path: Path) -> None:
    paths = make_caches(tmp_path)
    age(paths["repo"], 60)
    entries = prune.scan(tmp_path)
    chosen = [e for e in entries if e.name.startswith("models--")]
    plan = prune.plan_removals(entries, chosen)
    assert [r.path for r in plan.removals] == [paths["repo"],
                                               paths["hub"] / ".locks" / "models--org--model"]
    prune.execute(plan)
    assert not paths["repo"].exists()
    assert sorted(os.listdir(paths["hub"])) == [".locks", "CACHEDIR.TAG", "datasets--org--data"]


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * DAY_S), ("12h", 43200),
                                               ("2w", 14 * DAY_S), ("7", 7 * DAY_S)])
def test_durations(text: str, seconds: float) -> None:
    assert prune.parse_duration_s(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("500G", 500 * 10**9), ("200GiB", 200 << 30),
                                            ("1.5T", 1_500_000_000_000), ("10mb", 10**7)])
def test_sizes(text: str, size: int) -> None:
    assert prune.parse_size_bytes(text) == size


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(HubfsError):
        prune.parse_size_bytes("lots")
    assert_user_error(run_cli("prune", tmp_path, "--unused-for", "soon"), "not a duration",
                      exitcode=2)
    assert_user_error(run_cli("prune", tmp_path / "nope", "--keep-size", "1G"),
                      "not a directory", exitcode=2)


def test_cli_dry_run_changes_nothing_then_prunes(tmp_path: Path) -> None:
    make_caches(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    dry = run_cli("prune", tmp_path, "--unused-for", "30d", "--dry-run", check=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert "dry run: would remove 7 of 10 entries" in dry.stdout
    assert f"would remove tfhub module {TF_OLD}" in dry.stdout
    table = dry.stdout.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["cache", "library", "user", "remove", "keep", "frees"]
    assert any(line.split()[:5] == ["tfhub_modules", "tfhub", "root" if os.geteuid() == 0
                                    else line.split()[2], "1", "1"] for line in table)
    done = run_cli("prune", tmp_path, "--unused-for", "30d", check=True)
    assert "removed 7 of 10 entries" in done.stdout
    assert len(prune.scan(tmp_path)) == 3
