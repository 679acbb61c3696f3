"""The huggingface_hub, torch.hub and TF Hub scenarios again, with their caches on a real hubfs mount.

The scenarios are imported unchanged from ``test_hf_server`` and ``test_torch_tf_clients``; only ``cache_root``
differs. The ``mounted`` fixture unmounts afterwards, fails on daemon errors and verifies the
store, so each scenario also proves the store consistent after the client's write path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Mounted
from tests.test_hf_server import *  # noqa: F403  (the scenarios to rerun)
from tests.test_torch_tf_clients import *  # noqa: F403


@pytest.fixture
def cache_root(mounted: Mounted) -> Path:
    root = mounted.path / "cache"
    root.mkdir()
    return root
