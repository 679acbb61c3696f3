"""The real torch.hub and tensorflow_hub clients, run in subprocesses against a local server.

Each test lets a client's own cache write path run for real — torch's ``*.partial`` + rename and
zipball extract + directory rename, TF Hub's lock file + temp directory + rename — and then
checks the layout it left. The cache root is the ``cache_root`` fixture, a temp dir here; the
real-mount suite overrides it with a hubfs mount and reruns the same scenarios.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import tf_hub, torch_hub
from tests.clients.file_server import FileServer
from tests.clients.run import ClientError, client_env, client_result, run_client

pytestmark = pytest.mark.clients

log = logging.getLogger(__name__)

CLIENT_TIMEOUT_S = 180.0
TORCH_PYTHON_ENV = "HUBFS_TORCH_PYTHON"
# Names the clients use only while writing; none may survive a finished download.
_TEMP_MARKERS = (".partial", ".tmp", ".lock")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def torch_python() -> str:
    python = os.environ.get(TORCH_PYTHON_ENV, sys.executable)
    try:
        run_client(python, "import torch.hub", {}, CLIENT_TIMEOUT_S)
    except (ClientError, OSError) as e:
        pytest.skip(f"torch is not importable by {python} (set {TORCH_PYTHON_ENV}): {e}")
    return python


@pytest.fixture(scope="session")
def tf_python() -> str:
    python = tf_hub.tf_python()
    if not python.exists():
        pytest.skip(
            f"no TensorFlow venv at {python}: set {tf_hub.TF_PYTHON_ENV} or run "
            f"'python3 -m venv .venv-tf && .venv-tf/bin/pip install tensorflow-cpu tensorflow-hub'"
        )
    return str(python)


@pytest.fixture(scope="session")
def tf_module_tarball(tf_python: str, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tf_hub.make_module_tarball(tf_python, tmp_path_factory.mktemp("tf_module"))


# -- helpers ----------------------------------------------------------------------------------


def tree(root: Path) -> set[str]:
    """Every path under ``root``, relative, directories with a trailing slash."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out.update(f"{(rel / d).as_posix()}/" for d in dirnames)
        out.update((rel / f).as_posix() for f in filenames)
    return out


def assert_no_temp_leftovers(root: Path) -> None:
    leftovers = sorted(p for p in tree(root) if any(m in p for m in _TEMP_MARKERS))
    assert not leftovers, f"temporary names left behind: {leftovers}"


def torch_env(cache_root: Path) -> dict[str, str]:
    return client_env(cache_root)


def tf_env(cache_root: Path) -> dict[str, str]:
    return client_env(cache_root, tf_hub.TF_QUIET_ENV)


# -- the server itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "status", "body"),
    [
        (None, 200, b"0123456789"),
        ("bytes=2-5", 206, b"2345"),
        ("bytes=7-", 206, b"789"),
        ("bytes=-3", 206, b"789"),
        ("bytes=8-100", 206, b"89"),
        ("bytes=0-1,4-5", 200, b"0123456789"),  # multi-range: ignored, whole body
    ],
)
def test_file_server_ranges(
    tmp_path: Path, range_header: str | None, status: int, body: bytes
) -> None:
    on_disk = tmp_path / "digits"
    on_disk.write_bytes(b"0123456789")
    with FileServer({"/mem": b"0123456789", "/disk": on_disk}) as srv:
        for path in ("/mem", "/disk"):
            req = urllib.request.Request(srv.url(path))
            if range_header:
                req.add_header("Range", range_header)
            with urllib.request.urlopen(req) as resp:
                assert (resp.status, resp.read()) == (status, body)
                assert resp.headers["Content-Length"] == str(len(body))
        assert [r.status for r in srv.requests] == [status, status]


def test_file_server_404_and_416() -> None:
    with FileServer({"/a": b"abc"}) as srv:
        for path, headers, code in (("/nope", {}, 404), ("/a", {"Range": "bytes=5-"}, 416)):
            req = urllib.request.Request(srv.url(path), headers=headers)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req)
            assert e.value.code == code


# -- torch.hub --------------------------------------------------------------------------------


def test_download_url_to_file(torch_python: str, server: FileServer, cache_root: Path) -> None:
    ckpt = torch_hub.make_checkpoint()
    url = server.add(f"/weights/{ckpt.file_name}", ckpt.data)
    dst = cache_root / "downloads" / ckpt.file_name
    dst.parent.mkdir()

    out = run_client(
        torch_python,
        torch_hub.download_code(url, str(dst), hash_prefix=ckpt.sha256[:16]),
        torch_env(cache_root),
        CLIENT_TIMEOUT_S,
    )

    assert client_result(out) == {"size": len(ckpt.data)}
    assert dst.read_bytes() == ckpt.data
    assert tree(cache_root) == {"downloads/", f"downloads/{ckpt.file_name}"}
    (request,) = server.log_for(f"/weights/{ckpt.file_name}")
    assert request.method == "GET" and request.status == 200
    assert request.headers.get("User-Agent") == "torch.hub"


def test_download_with_bad_hash_leaves_nothing(
    torch_python: str, server: FileServer, cache_root: Path
) -> None:
    ckpt = torch_hub.make_checkpoint()
    corrupt = ckpt.data[:-1] + bytes([ckpt.data[-1] ^ 0xFF])
    url = server.add(f"/weights/{ckpt.file_name}", corrupt)
    dst = cache_root / "downloads" / ckpt.file_name
    dst.parent.mkdir()

    with pytest.raises(ClientError, match="invalid hash value"):
        run_client(
            torch_python,
            torch_hub.download_code(url, str(dst), hash_prefix=ckpt.sha256[:16]),
            torch_env(cache_root),
            CLIENT_TIMEOUT_S,
        )

    # torch removes its .partial in a finally: clause when the hash does not match.
    assert tree(cache_root) == {"downloads/"}


def test_load_state_dict_from_url_checks_hash_and_caches(
    torch_python: str, server: FileServer, cache_root: Path
) -> None:
    ckpt = torch_hub.make_checkpoint()
    url = server.add(f"/models/{ckpt.file_name}", ckpt.data)
    code = torch_hub.load_state_dict_code(url, check_hash=True)

    result = client_result(run_client(torch_python, code, torch_env(cache_root), CLIENT_TIMEOUT_S))

    cached = cache_root / "torch" / "hub" / "checkpoints" / ckpt.file_name
    assert result["hub_dir"] == str(cache_root / "torch" / "hub")
    assert result["path"] == str(cached)
    assert result["keys"] == ["fc.bias", "fc.weight"]
    assert result["value_sum"] == pytest.approx(ckpt.value_sum)
    assert cached.read_bytes() == ckpt.data
    assert tree(cache_root) == {
        "torch/",
        "torch/hub/",
        "torch/hub/checkpoints/",
        f"torch/hub/checkpoints/{ckpt.file_name}",
    }
    assert len(server.log_for(f"/models/{ckpt.file_name}")) == 1

    # A second process finds the file by name and does not ask the server again.
    again = client_result(run_client(torch_python, code, torch_env(cache_root), CLIENT_TIMEOUT_S))
    assert again["value_sum"] == pytest.approx(ckpt.value_sum)
    assert len(server.log_for(f"/models/{ckpt.file_name}")) == 1


def test_torch_load_mmap_of_cached_checkpoint(
    torch_python: str, server: FileServer, cache_root: Path
) -> None:
    # 1 MiB of extra floats, so the mapping spans many pages.
    ckpt = torch_hub.make_checkpoint(stem="bigger", extra_numel=256 * 1024)
    url = server.add(f"/models/{ckpt.file_name}", ckpt.data)
    env = torch_env(cache_root)
    loaded = client_result(
        run_client(torch_python, torch_hub.load_state_dict_code(url), env, CLIENT_TIMEOUT_S)
    )

    mapped = client_result(
        run_client(torch_python, torch_hub.mmap_load_code(loaded["path"]), env, CLIENT_TIMEOUT_S)
    )

    assert mapped["keys"] == ["extra", "fc.bias", "fc.weight"]
    assert mapped["value_sum"] == pytest.approx(ckpt.value_sum)
    assert Path(loaded["path"]).read_bytes() == ckpt.data
    assert_no_temp_leftovers(cache_root)


def test_hub_load_of_github_zipball(
    torch_python: str, server: FileServer, cache_root: Path
) -> None:
    ckpt = torch_hub.make_checkpoint()
    weights_url = server.add(f"/releases/{ckpt.file_name}", ckpt.data)
    repo = torch_hub.make_hubconf_repo(weights_url=weights_url)
    server.add(repo.url_path, repo.zip_bytes)
    code = torch_hub.hub_load_code(server.base_url, repo, pretrained=True)

    result = client_result(run_client(torch_python, code, torch_env(cache_root), CLIENT_TIMEOUT_S))

    hub = cache_root / "torch" / "hub"
    assert result["hub_dir"] == str(hub)
    assert result["type"] == "TinyNet"
    assert result["value_sum"] == pytest.approx(ckpt.value_sum)
    # x = ones: each output is its weight row's sum plus its bias.
    assert result["output"] == [pytest.approx([6.5, 21.5, 39.0])]

    repo_dir = hub / repo.cache_dir_name
    assert sorted(os.listdir(hub)) == sorted(["checkpoints", "trusted_list", repo.cache_dir_name])
    assert (hub / "trusted_list").read_text().splitlines() == [f"{repo.owner}_{repo.name}"]
    assert os.listdir(hub / "checkpoints") == [ckpt.file_name]
    repo_files = {p for p in tree(repo_dir) if "__pycache__" not in p}
    assert repo_files == {
        "README.md",
        "hubconf.py",
        "tinynet/",
        "tinynet/__init__.py",
        "tinynet/model.py",
    }
    # Importing hubconf compiled it (and the package) into the cached repo.
    assert any(p.startswith("__pycache__/hubconf.") for p in tree(repo_dir))
    assert not (hub / repo.top_dir).exists(), "extracted zipball dir was not renamed"
    assert_no_temp_leftovers(cache_root)
    assert [r.status for r in server.log_for(repo.url_path)] == [200]
    assert len(server.log_for(f"/releases/{ckpt.file_name}")) == 1

    # Warm cache: "Using cache found in ..." and no request at all.
    n_requests = len(server.requests)
    proc_out = run_client(torch_python, code, torch_env(cache_root), CLIENT_TIMEOUT_S)
    assert client_result(proc_out)["value_sum"] == pytest.approx(ckpt.value_sum)
    assert len(server.requests) == n_requests


# -- tensorflow_hub ---------------------------------------------------------------------------

TF_INPUT = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 2.0, 3.0]]
TF_MODULE_FILES = [
    "fingerprint.pb",
    "saved_model.pb",
    "variables/variables.data-00000-of-00001",
    "variables/variables.index",
]


# (path served, suffix of the handle): the handle forms TF Hub resolves by downloading
TF_HANDLES = [
    ("/tf/affine/1.tar.gz", ""),  # a .tar.gz URL
    ("/google/affine/1", ""),  # a tfhub.dev-style URL
    ("/tf/other/1.tar.gz", "?tf-hub-format=compressed"),  # a URL with the format query
]


def test_tf_hub_resolve_and_load(
    tf_python: str,
    tf_module_tarball: bytes,
    server: FileServer,
    cache_root: Path,
) -> None:
    """Each handle form, resolved and loaded by one TF process (TF's import takes seconds),
    then again from the warm cache by another."""
    handles = [server.add(path, tf_module_tarball) + suffix for path, suffix in TF_HANDLES]
    code = tf_hub.resolve_and_load_code(handles, TF_INPUT)

    results = client_result(run_client(tf_python, code, tf_env(cache_root), CLIENT_TIMEOUT_S))

    modules = cache_root / "tfhub_modules"
    names = [tf_hub.module_dir_name(handle) for handle in handles]
    expected = tf_hub.expected_output(TF_INPUT)
    for handle, module, result in zip(handles, names, results, strict=True):
        assert result["path"] == str(modules / module)
        assert result["files"] == TF_MODULE_FILES
        assert result["output"] == [pytest.approx(row) for row in expected]
        assert result["signature"] == [pytest.approx(row) for row in expected]
        descriptor = (modules / f"{module}.descriptor.txt").read_text()
        assert descriptor.startswith(f"Module: {handle}\n")
        assert "variables/" in tree(modules / module)
    # The locks and the temp dirs are gone; each descriptor stays beside its module.
    assert sorted(os.listdir(modules)) == sorted(
        n for module in names for n in (module, f"{module}.descriptor.txt"))
    assert_no_temp_leftovers(cache_root)
    # One download each, of the handle's path with the format query TF Hub always appends.
    for path, _suffix in TF_HANDLES:
        (request,) = server.log_for(path)
        assert request.status == 200
        assert request.query.endswith("tf-hub-format=compressed")

    # Warm cache: a non-empty module dir is a hit, no request is made.
    again = client_result(run_client(tf_python, code, tf_env(cache_root), CLIENT_TIMEOUT_S))
    assert [r["path"] for r in again] == [r["path"] for r in results]
    assert all(len(server.log_for(path)) == 1 for path, _suffix in TF_HANDLES)
