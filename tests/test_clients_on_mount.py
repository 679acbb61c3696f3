"""The huggingface_hub, torch.hub and TF Hub scenarios again, with their caches on a real hubfs mount.

The scenarios that write a cache (those taking ``cache_root``) are taken unchanged from
``test_hf_server`` and ``test_torch_tf_clients``, with the fixtures they use; only
``cache_root`` differs. Tests that never touch a cache are not taken again. The ``mounted``
fixture unmounts afterwards, fails on daemon errors and verifies the store, so each scenario
also proves the store consistent after the client's write path.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from _pytest.fixtures import getfixturemarker

from tests import test_hf_server, test_torch_tf_clients
from tests.conftest import Mounted

pytestmark = [pytest.mark.mount, pytest.mark.clients]


def _take_scenarios(module: object) -> None:
    """Put ``module``'s fixtures and its cache-writing tests in this module."""
    for name, obj in vars(module).items():
        if name == "cache_root" or name.startswith("_"):
            continue
        if getfixturemarker(obj) is not None or (
                name.startswith("test_") and callable(obj)
                and "cache_root" in inspect.signature(obj).parameters):
            globals()[name] = obj


_take_scenarios(test_hf_server)
_take_scenarios(test_torch_tf_clients)


@pytest.fixture
def cache_root(mounted: Mounted) -> Path:
    root = mounted.path / "cache"
    root.mkdir()
    return root


def test_same_model_in_two_cache_roots_is_stored_once(
    mounted: Mounted, model_files: dict[str, Path]
) -> None:
    """Two users' caches (two roots on one mount) download the same model: one stored copy."""
    from tests.clients.hf_server import HubServer, run_hf_client

    model_bytes = sum(p.stat().st_size for p in model_files.values())
    with HubServer() as hub:
        commit = hub.add_commit("org/minilm", model_files)
        for user in ("alice", "bob"):
            root = mounted.path / user
            root.mkdir()
            path = run_hf_client(
                """
                from huggingface_hub import snapshot_download
                from safetensors.torch import load_file
                path = snapshot_download("org/minilm", max_workers=8)
                emit([path, len(load_file(path + "/model.safetensors"))])
                """,
                root,
                hub.url,
            )
            assert path[0].endswith(commit) and path[1] > 50
    stats = mounted.stats()
    assert stats["logical_bytes"] >= 2 * model_bytes
    assert stats["stored_bytes"] < 1.05 * model_bytes, stats
