"""The client scenarios of test_clients_on_mount again, on a mount whose daemon serves every
byte: ``--checked-reads``, the read and write path of every mount without FUSE passthrough (a
non-root mount, an older kernel or libfuse, stock pyfuse3). test_objects checks that a non-root
mount does fall back to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.fixtures import getfixturemarker

from hubfs.store import Store
from tests import test_clients_on_mount
from tests.conftest import Mounted, mount_store, unmount_and_check

pytestmark = [pytest.mark.mount, pytest.mark.clients]

# The scenarios that load what they wrote (TF Hub's, which start TensorFlow, stay with the
# kernel-served module, to keep the suite's time down).
SCENARIOS = ("test_snapshot_download_two_commits_share_blobs",
             "test_offline_reload_makes_no_requests_and_loads_safetensors",
             "test_load_state_dict_from_url_checks_hash_and_caches",
             "test_torch_load_mmap_of_cached_checkpoint", "test_hub_load_of_github_zipball",
             "test_same_model_in_two_cache_roots_is_stored_once")
for _name, _obj in list(vars(test_clients_on_mount).items()):
    if _name in SCENARIOS or (_name != "cache_root" and getfixturemarker(_obj) is not None):
        globals()[_name] = _obj


@pytest.fixture
def daemon_mounted(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mounted]:
    store = tmp_path / "store"
    Store.init(store)
    mnt = mount_store(store, tmp_path / "mnt", "--checked-reads")
    try:
        yield mnt
    finally:
        unmount_and_check(mnt, request)


@pytest.fixture
def cache_root(daemon_mounted: Mounted) -> Path:
    root = daemon_mounted.path / "cache"
    root.mkdir()
    return root
