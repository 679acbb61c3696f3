"""``hubfs prune`` on a real mount holding caches the real clients wrote, then the clients again.

huggingface_hub, torch.hub and TF Hub download into a hubfs mount from the local fake servers;
the ``datasets`` library is not installed here, so its cache is laid out by hand as it writes it.
Entries are aged with ``os.utime`` through the mount. After ``hubfs prune --unused-for 30d``:
``scan_cache_dir`` reports no warnings, the kept entries load offline (no request reaches a
server), ``hubfs gc`` gives the pruned bytes back, and the pruned ones download again cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import tf_hub, torch_hub
from tests.clients.file_server import FileServer
from tests.clients.hf_server import HubServer, hf_hub_cache, run_hf_client
from tests.clients.run import client_env, client_result, run_client
from tests.conftest import Mounted, mount_store
from tests.test_torch_tf_clients import (  # noqa: F401  (fixtures)
    CLIENT_TIMEOUT_S,
    tf_module_tarball,
    tf_python,
    torch_python,
)

DAY_S = 86400.0
MIB = 1 << 20
TF_INPUT = [[1.0, 0.0, 2.0]]


def age(path: Path, days: float) -> None:
    """atime and mtime ``days`` back, of ``path`` and everything below it (symlinks followed to
    files: a snapshot's blobs), through the mount."""
    when = time.time() - days * DAY_S
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in reversed(paths):
        if p.is_symlink() and p.is_dir():
            continue
        os.utime(p, (when, when))


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def servers() -> Iterator[tuple[HubServer, FileServer]]:
    with HubServer() as hub, FileServer() as files:
        yield hub, files


@pytest.mark.mount
def test_prune_on_a_mount_of_real_caches(
    mounted: Mounted, servers: tuple[HubServer, FileServer], torch_python: str,  # noqa: F811
    tf_python: str, tf_module_tarball: bytes,  # noqa: F811
) -> None:
    hf = pytest.importorskip("huggingface_hub")
    hub, files = servers
    cache = mounted.path / "cache"
    cache.mkdir()
    env = client_env(cache, tf_hub.TF_QUIET_ENV)
    old_weights, data_rows, keep_weights = os.urandom(4 * MIB), os.urandom(MIB), os.urandom(MIB)
    old_commit = hub.add_commit("org/old", {"model.safetensors": old_weights,
                                            "config.json": b'{"old": 1}'})
    keep_commit = hub.add_commit("org/keep", {"model.safetensors": keep_weights,
                                              "config.json": b'{"keep": 1}'})
    hub.add_commit("org/rows", {"rows.parquet": data_rows}, repo_type="dataset")
    download_all = """
        from huggingface_hub import snapshot_download
        emit([snapshot_download("org/old"), snapshot_download("org/keep"),
              snapshot_download("org/rows", repo_type="dataset")])
        """
    run_hf_client(download_all, cache, hub.url)

    old_ckpt = torch_hub.make_checkpoint(stem="oldnet")
    keep_ckpt = torch_hub.make_checkpoint(stem="keepnet", extra_numel=1000)
    old_url = files.add(f"/models/{old_ckpt.file_name}", old_ckpt.data)
    keep_url = files.add(f"/models/{keep_ckpt.file_name}", keep_ckpt.data)
    repo = torch_hub.make_hubconf_repo(weights_url=old_url)
    files.add(repo.url_path, repo.zip_bytes)
    run_client(torch_python, torch_hub.hub_load_code(files.base_url, repo), env,
               CLIENT_TIMEOUT_S)
    keep_code = torch_hub.load_state_dict_code(keep_url)
    run_client(torch_python, keep_code, env, CLIENT_TIMEOUT_S)

    old_handle = files.add("/tf/old/1.tar.gz", tf_module_tarball)
    keep_handle = files.add("/tf/keep/1.tar.gz", tf_module_tarball)
    # One TF process downloads both modules (TF's import alone takes seconds).
    run_client(tf_python, f"import tensorflow_hub as hub\nhub.resolve({old_handle!r})\n"
               f"hub.resolve({keep_handle!r})\n", env, CLIENT_TIMEOUT_S)

    # datasets (not installed here): a download with its .json and .lock, a prepared dataset
    # with its lock in the cache root, as datasets 2.x/3.x lay them out.
    ds = cache / "huggingface" / "datasets"
    download = hashlib.sha256(b"https://example.org/rows.csv").hexdigest()
    (ds / "downloads").mkdir(parents=True)
    (ds / "downloads" / download).write_bytes(os.urandom(MIB))
    (ds / "downloads" / f"{download}.json").write_text(json.dumps({"url": "x", "etag": None}))
    (ds / "downloads" / f"{download}.lock").touch()
    for config, days in (("old", 60.0), ("new", 0.0)):
        prepared = ds / "org___rows" / config / "0.0.0" / ("f" * 16)
        prepared.mkdir(parents=True)
        (prepared / "rows-train.arrow").write_bytes(os.urandom(64 << 10))
        (prepared / "dataset_info.json").write_text("{}")
        age(prepared, days)
    age(ds / "downloads", 60)

    hub_cache = hf_hub_cache(cache)
    torch_dir, tf_dir = cache / "torch" / "hub", cache / "tfhub_modules"
    old_module, keep_module = (tf_hub.module_dir_name(h) for h in (old_handle, keep_handle))
    for path in (hub_cache / "models--org--old", hub_cache / "datasets--org--rows",
                 torch_dir / "checkpoints" / old_ckpt.file_name, torch_dir / repo.cache_dir_name,
                 tf_dir / old_module, tf_dir / f"{old_module}.descriptor.txt"):
        age(path, 60)

    # Everything the clients wrote is stored before the figures are taken.
    mounted.hubfs("umount", str(mounted.path))
    mount_store(mounted.store, mounted.path)
    before = mounted.stats()

    tree_before = listing(cache)
    dry = mounted.hubfs("prune", str(cache), "--unused-for", "30d", "--dry-run")
    assert listing(cache) == tree_before
    assert "dry run: would remove 7 of 11 entries" in dry.stdout, dry.stdout
    done = mounted.hubfs("prune", str(cache), "--unused-for", "30d")
    assert "removed 7 of 11 entries" in done.stdout, done.stdout
    assert f"hubfs gc {mounted.store}" in done.stdout

    info = hf.scan_cache_dir(hub_cache)
    assert info.warnings == []
    assert [(r.repo_id, [v.commit_hash for v in r.revisions]) for r in info.repos] == \
        [("org/keep", [keep_commit])]
    assert sorted(os.listdir(torch_dir / "checkpoints")) == [keep_ckpt.file_name]
    assert repo.cache_dir_name not in os.listdir(torch_dir)
    assert sorted(os.listdir(tf_dir)) == [keep_module, f"{keep_module}.descriptor.txt"]
    assert [str(p.relative_to(ds)) for p in ds.rglob("dataset_info.json")] == \
        [f"org___rows/new/0.0.0/{'f' * 16}/dataset_info.json"]
    assert os.listdir(ds / "downloads") == []
    assert not any(".hubfs-prune-trash" in p for p in listing(cache))

    # hubfs gc gives back what was pruned: the random bytes of 4 + 1 MiB of HF blobs and 1 MiB
    # of a datasets download (plus smaller files).
    pruned = mounted.stats()
    assert pruned["unreferenced_bytes"] >= 6 * MIB, pruned
    mounted.hubfs("gc", str(mounted.store))
    after = mounted.stats()
    assert after["stored_bytes"] <= before["stored_bytes"] - 6 * MIB, (before, after)

    # Kept entries load offline: no request reaches either server.
    hub_requests, file_requests = len(hub.request_log), len(files.requests)
    loaded = run_hf_client("""
        from huggingface_hub import snapshot_download
        path = snapshot_download("org/keep")
        emit([path, open(path + "/model.safetensors", "rb").read().hex()[:64]])
        """, cache, hub.url, offline=True)
    assert loaded == [str(hub_cache / "models--org--keep" / "snapshots" / keep_commit),
                      keep_weights.hex()[:64]]
    result = client_result(run_client(torch_python, keep_code, env, CLIENT_TIMEOUT_S))
    assert result["value_sum"] == pytest.approx(keep_ckpt.value_sum)
    assert (len(hub.request_log), len(files.requests)) == (hub_requests, file_requests)

    # Pruned entries download again, cleanly.
    paths = run_hf_client(download_all, cache, hub.url)
    assert paths[0] == str(hub_cache / "models--org--old" / "snapshots" / old_commit)
    assert (Path(paths[0]) / "model.safetensors").read_bytes() == old_weights
    assert (Path(paths[2]) / "rows.parquet").read_bytes() == data_rows
    assert hf.scan_cache_dir(hub_cache).warnings == []
    again = client_result(run_client(torch_python, torch_hub.hub_load_code(files.base_url, repo),
                                     env, CLIENT_TIMEOUT_S))
    assert again["value_sum"] == pytest.approx(old_ckpt.value_sum)
    assert len(files.log_for(repo.url_path)) == 2
    assert len(files.log_for(f"/models/{old_ckpt.file_name}")) == 2
    # TF Hub last, in one process (TF's import takes seconds): the kept module loads from the
    # cache (its tarball is not asked for again), the pruned one downloads again.
    tf_kept, tf_again = client_result(run_client(
        tf_python, tf_hub.resolve_and_load_code([keep_handle, old_handle], TF_INPUT), env,
        CLIENT_TIMEOUT_S))
    assert tf_kept["output"] == [pytest.approx(r) for r in tf_hub.expected_output(TF_INPUT)]
    assert len(files.log_for("/tf/keep/1.tar.gz")) == 1
    assert tf_again["path"] == str(tf_dir / old_module)
    assert len(files.log_for("/tf/old/1.tar.gz")) == 2
