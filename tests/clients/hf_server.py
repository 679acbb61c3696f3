"""A fake Hugging Face Hub on 127.0.0.1, so tests can drive the real ``huggingface_hub`` client.

There is no internet where the tests run, yet hubfs has to be tested under the client's own cache
writes: ``blobs/``, ``refs/``, ``snapshots/`` symlinks, ``.locks/``, ``.no_exist/``, ``trees/``
and temporary ``*.incomplete`` files renamed into place.  This server speaks just enough of the
Hub's HTTP protocol for ``hf_hub_download``, ``snapshot_download`` and ``HfApi.repo_info`` /
``list_repo_tree``, as huggingface_hub 2.x reads it.  Stdlib only.

What the client reads (huggingface_hub 2.4, ``file_download.get_hf_file_metadata``):

* ``HEAD {endpoint}/[datasets/|spaces/]{repo_id}/resolve/{revision}/{path}``; the revision is
  quoted with ``safe=""`` (``refs%2Fpr%2F1``), the path keeps its slashes.  Redirects to the same
  origin are followed; a redirect to another origin ends the HEAD and that 3xx response carries
  the metadata, as the Hub's redirects to its CDN do.
* ``X-Repo-Commit`` is required: the commit the revision resolved to (snapshot folder name).
* the blob's file name is ``X-Linked-Etag`` if present, else ``ETag``; ``W/`` and quotes are
  stripped.  The Hub sends a git blob sha1 for regular files and, for LFS files, the sha256 of the
  content in ``X-Linked-Etag`` (``ETag`` is then the sha1 of the LFS pointer).
* the expected size is ``X-Linked-Size``, else ``Content-Length`` unless the response is a redirect.
* the GET goes to the HEAD's ``Location`` (or the resolve URL); after a dropped connection the
  client retries with ``Range: bytes=N-`` and appends a 206 body (a 200 makes it start over).
* a 404 with ``X-Error-Code: EntryNotFound`` and ``X-Repo-Commit`` makes it write the
  ``.no_exist/{commit}/{path}`` marker; ``RevisionNotFound`` and ``RepoNotFound`` map to their
  own exceptions.
* ``snapshot_download`` calls ``GET /api/{models|datasets|spaces}/{repo_id}/revision/{revision}``
  (``sha``) and then ``GET /api/.../tree/{sha}?recursive=true`` (paged with a ``Link`` header),
  then one ``hf_hub_download`` per file at the commit sha.  No ``X-Xet-*`` header is ever sent,
  so the client stays on plain HTTP even with ``hf_xet`` installed.

LFS files are redirected to ``http://localhost:{port}/cdn/{sha256}``: a different origin than
``http://127.0.0.1:{port}`` (same socket), which is what makes the client treat it as a CDN.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import textwrap
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .loopback import LoopbackServer
from .run import RESULT_PREFIX, client_env, client_result, run_client

log = logging.getLogger(__name__)

Content = bytes | Path

# Files the client will name by sha256 (the Hub stores them in LFS): big ones, and weights by
# suffix as the Hub's default .gitattributes does.
LFS_MIN_BYTES = 1 << 20
LFS_SUFFIXES = frozenset(
    {
        *(".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".gguf"),
        *(".npz", ".parquet", ".arrow"),
    }
)
TREE_PAGE_ENTRIES = 1000  # the Hub's page size for non-expanded tree listings
LISTEN_BACKLOG = 64  # snapshot_download opens 8 connections at once; the default backlog is 5
_HASH_READ_BYTES = 4 << 20

_REPO_TYPE_BY_PLURAL = {
    "models": "model",
    "datasets": "dataset",
    "spaces": "space",
    "kernels": "kernel",
}
_URL_PREFIX_BY_TYPE = {"dataset": "datasets", "space": "spaces", "kernel": "kernels"}
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")

HF_CLIENT_TIMEOUT_S = 300.0
# Prepended to every client snippet: emit(value) hands a JSON value back to the test.
_SNIPPET_PRELUDE = f"""\
import json as _json

def emit(value):
    print({RESULT_PREFIX!r} + _json.dumps(value), flush=True)

"""


@dataclass(frozen=True)
class Blob:
    """One file's content as the Hub describes it."""

    size: int
    git_oid: str  # git blob sha1: of the content, or of the LFS pointer for LFS files
    sha256: str  # of the content
    lfs: bool
    source: Content = field(repr=False)  # bytes, or a file on disk streamed per request

    @property
    def etag(self) -> str:
        """What the client names the blob file in ``blobs/``."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores in place of an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        ).encode()


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: Mapping[str, Blob]
    date: str  # the Hub's format: 2024-01-31T12:00:00.000Z


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


@dataclass(frozen=True)
class Request:
    """One request as the server answered it (logged before any body is sent)."""

    method: str
    host: str  # the Host header: 127.0.0.1:PORT for the Hub, localhost:PORT for the CDN
    path: str  # percent-decoded, without the query string
    query: str
    headers: Mapping[str, str]
    status: int


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: sha1 over ``blob {size}\\0`` and the content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def files_from_dir(root: Path) -> dict[str, Path]:
    """Every file under ``root`` keyed by its ``/``-separated relative path, for ``add_commit``."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def is_lfs(path: str, size: int) -> bool:
    return size >= LFS_MIN_BYTES or Path(path).suffix.lower() in LFS_SUFFIXES


_path_hashes: dict[tuple[str, int, int], tuple[str, str]] = {}
_path_hashes_lock = threading.Lock()


def _hash_file(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file, streamed; memoised because tests reuse big files."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _path_hashes_lock:
        if key in _path_hashes:
            return _path_hashes[key]
    sha1 = hashlib.sha1(b"blob %d\0" % st.st_size)
    sha256 = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_READ_BYTES):
            sha1.update(chunk)
            sha256.update(chunk)
    hashes = (sha1.hexdigest(), sha256.hexdigest())
    with _path_hashes_lock:
        _path_hashes[key] = hashes
    return hashes


def make_blob(path_in_repo: str, content: Content) -> Blob:
    if isinstance(content, Path):
        size = content.stat().st_size
        content_oid, sha256 = _hash_file(content)
    else:
        size = len(content)
        content_oid, sha256 = git_blob_sha1(content), hashlib.sha256(content).hexdigest()
    lfs = is_lfs(path_in_repo, size)
    blob = Blob(size=size, git_oid=content_oid, sha256=sha256, lfs=lfs, source=content)
    if lfs:
        blob = Blob(size, git_blob_sha1(blob.pointer), sha256, True, content)
    return blob


class HubServer(LoopbackServer):
    thread_name = "hub-server"

    """A threaded fake Hub on 127.0.0.1 with an ephemeral port; use it as a context manager.

    Point the client at it with ``HF_ENDPOINT=server.url``.  Repos are created by their first
    ``add_commit``.  ``request_log`` lists every request answered, in order.
    """

    def __init__(self, *, lfs_via_cdn: bool = True) -> None:
        super().__init__()
        # lfs_via_cdn=False serves LFS files straight from /resolve (200 with X-Linked-* headers),
        # a path the Hub itself does not take but mirrors/proxies do.
        self.lfs_via_cdn = lfs_via_cdn
        self.request_log: list[Request] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._by_sha256: dict[str, Blob] = {}
        self._commit_counter = 0
        self._interrupt_after_bytes: int | None = None
        self._lock = threading.Lock()

    def _make_httpd(self) -> ThreadingHTTPServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub = self
        return httpd

    @property
    def url(self) -> str:
        """The Hub endpoint: what HF_ENDPOINT is set to."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        """Where LFS files are redirected: the same socket under a different origin."""
        return f"http://localhost:{self.port}"

    # -- content -----------------------------------------------------------------------------

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, Content],
        repo_type: str = "model",
        branch: str = "main",
    ) -> str:
        """Create a commit on ``branch`` whose tree is exactly ``files``; return its 40-hex sha.

        A later commit may share files with an earlier one (same bytes, same blob).  ``Path``
        values are hashed now and streamed from disk per request: do not change them afterwards.
        """
        if repo_type not in _REPO_TYPE_BY_PLURAL.values():
            raise ValueError(f"unknown repo type {repo_type!r}")
        blobs = {path.strip("/"): make_blob(path, content) for path, content in files.items()}
        with self._lock:
            repo = self._repos.setdefault(
                (repo_type, repo_id), _Repo(repo_type=repo_type, repo_id=repo_id)
            )
            parent = repo.branches.get(branch)
            self._commit_counter += 1
            identity: list[object] = [repo_type, repo_id, branch, parent, self._commit_counter]
            identity += sorted((p, b.git_oid) for p, b in blobs.items())
            sha = hashlib.sha1(json.dumps(identity).encode()).hexdigest()
            date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo.commits[sha] = Commit(sha=sha, parent=parent, files=blobs, date=date)
            repo.branches[branch] = sha
            for blob in blobs.values():
                if blob.lfs:
                    self._by_sha256[blob.sha256] = blob
        log.debug("commit %s on %s %s@%s: %d files", sha, repo_type, repo_id, branch, len(blobs))
        return sha

    def blob(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> Blob:
        """The blob at ``path`` in ``revision``: its ``etag`` is the client's blob file name."""
        with self._lock:
            commit = self._repos[(repo_type, repo_id)].resolve(revision)
            assert commit is not None, f"no revision {revision!r} in {repo_id}"
            return commit.files[path]

    def interrupt_next_get(self, after_bytes: int) -> None:
        """Drop the connection after ``after_bytes`` of the next file body longer than that.

        The client then resumes with a ``Range`` request, which is how its resume path is driven.
        """
        with self._lock:
            self._interrupt_after_bytes = after_bytes

    # -- used by the handler -----------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self.request_log.append(request)

    def _locate(
        self, repo_type: str, segments: list[str], markers: frozenset[str]
    ) -> tuple[_Repo, str | None, list[str]] | None:
        """Split ``ns/name/<marker>/rest`` (or ``name/<marker>/rest``) against the known repos."""
        with self._lock:
            for n in (2, 1):
                repo = self._repos.get((repo_type, "/".join(segments[:n])))
                if repo is None or len(segments) < n:
                    continue
                tail = segments[n:]
                if not tail:
                    return repo, None, []
                if tail[0] in markers:
                    return repo, tail[0], tail[1:]
        return None

    def _resolve(self, repo: _Repo, revision: str) -> Commit | None:
        with self._lock:
            return repo.resolve(revision)

    def _cdn_blob(self, sha256: str) -> Blob | None:
        with self._lock:
            return self._by_sha256.get(sha256)

    def _take_interrupt(self, body_bytes: int) -> int | None:
        with self._lock:
            after = self._interrupt_after_bytes
            if after is None or body_bytes <= after:
                return None
            self._interrupt_after_bytes = None
            return after


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length
    server: _HTTPServer

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def _not_allowed(self) -> None:
        self.close_connection = True  # any request body is left unread
        self._error(405, None, f"{self.command} is not supported by the fake hub", True)

    do_POST = do_PUT = do_PATCH = do_DELETE = _not_allowed

    # -- routing -----------------------------------------------------------------------------

    def _dispatch(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        # Split before unquoting: the client quotes a revision's own slashes (refs%2Fpr%2F1).
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        try:
            if segments[:1] == ["api"]:
                self._api(segments[1:], parse_qs(parts.query), send_body)
            elif segments[:1] == ["cdn"] and len(segments) == 2:
                self._cdn(segments[1], send_body)
            else:
                self._resolve(segments, send_body)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away during %s %s", self.command, self.path)
            self.close_connection = True

    def _resolve(self, segments: list[str], send_body: bool) -> None:
        repo_type = "model"
        if segments[:1] and segments[0] in _URL_PREFIX_BY_TYPE.values():
            repo_type = _REPO_TYPE_BY_PLURAL[segments[0]]
            segments = segments[1:]
        hub = self.server.hub
        found = hub._locate(repo_type, segments, frozenset({"resolve"}))
        if found is None or found[1] is None or len(found[2]) < 2:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return
        repo, _, (revision, *path_parts) = found
        commit = hub._resolve(repo, revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, send_body)
            return
        blob = commit.files.get("/".join(path_parts))
        if blob is None:
            headers = {"X-Repo-Commit": commit.sha}
            self._error(404, "EntryNotFound", "Entry not found", send_body, headers)
            return
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.git_oid}"'}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
            if hub.lfs_via_cdn:
                headers["Location"] = f"{hub.cdn_url}/cdn/{blob.sha256}"
                self._reply(302, headers, b"", send_body)
                return
        self._send_blob(blob, headers, send_body)

    def _cdn(self, sha256: str, send_body: bool) -> None:
        blob = self.server.hub._cdn_blob(sha256)
        if blob is None:
            self._error(404, None, "No such object", send_body)
            return
        self._send_blob(blob, {"ETag": f'"{sha256}"'}, send_body)

    def _api(self, segments: list[str], query: dict[str, list[str]], send_body: bool) -> None:
        repo_type = _REPO_TYPE_BY_PLURAL.get(segments[0]) if segments else None
        found = None
        if repo_type is not None:
            found = self.server.hub._locate(
                repo_type, segments[1:], frozenset({"revision", "tree"})
            )
        if found is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return
        repo, marker, tail = found
        revision = tail[0] if tail else "main"
        commit = self.server.hub._resolve(repo, revision)
        if commit is None or (marker is not None and not tail):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, send_body)
            return
        if marker == "tree":
            self._tree(repo, commit, "/".join(tail[1:]), query, send_body)
        else:
            blobs = _flag(query, "blobs")
            self._json(200, _repo_info(repo, commit, blobs), send_body)

    def _tree(
        self,
        repo: _Repo,
        commit: Commit,
        path_in_repo: str,
        query: dict[str, list[str]],
        send_body: bool,
    ) -> None:
        entries = _tree_entries(commit, path_in_repo.strip("/"), _flag(query, "recursive"))
        if entries is None:
            self._error(404, "EntryNotFound", "Entry not found", send_body)
            return
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor : cursor + TREE_PAGE_ENTRIES]
        headers = {}
        if cursor + TREE_PAGE_ENTRIES < len(entries):
            recursive = "true" if _flag(query, "recursive") else "false"
            next_query = f"recursive={recursive}&cursor={cursor + TREE_PAGE_ENTRIES}"
            next_url = f"{self.server.hub.url}{urlsplit(self.path).path}?{next_query}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(200, page, send_body, headers)

    # -- responses ---------------------------------------------------------------------------

    def _start(self, status: int, headers: Mapping[str, str]) -> None:
        parts = urlsplit(self.path)
        self.server.hub._record(
            Request(
                method=self.command,
                host=self.headers.get("Host", ""),
                path=unquote(parts.path),
                query=parts.query,
                headers=dict(self.headers.items()),
                status=status,
            )
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _reply(self, status: int, headers: Mapping[str, str], body: bytes, send_body: bool) -> None:
        self._start(status, {**headers, "Content-Length": str(len(body))})
        if send_body:
            self.wfile.write(body)

    def _json(
        self,
        status: int,
        payload: Any,
        send_body: bool,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload).encode()
        self._reply(
            status, {"Content-Type": "application/json", **(headers or {})}, body, send_body
        )

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        send_body: bool,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code is not None:
            extra["X-Error-Code"] = code
        self._json(status, {"error": message}, send_body, extra)

    def _send_blob(self, blob: Blob, headers: dict[str, str], send_body: bool) -> None:
        start, end, status = 0, blob.size, 200
        range_header = self.headers.get("Range")
        # A Range this server does not parse (several ranges, other units) is ignored, as
        # RFC 9110 allows: the whole body comes back with a 200.
        if range_header is not None and _RANGE_RE.match(range_header.strip()):
            parsed = _parse_range(range_header, blob.size)
            if parsed is None:
                self._reply(416, {"Content-Range": f"bytes */{blob.size}"}, b"", send_body)
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        headers.update(
            {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(end - start),
                "Accept-Ranges": "bytes",
            }
        )
        count = end - start
        if send_body and (cut := self.server.hub._take_interrupt(count)) is not None:
            log.debug("interrupting %s after %d of %d bytes", self.path, cut, count)
            count = cut
            self.close_connection = True
        self._start(status, headers)
        if not send_body or count == 0:
            return
        if isinstance(blob.source, bytes):
            self.wfile.write(blob.source[start : start + count])
        else:
            with blob.source.open("rb") as f:
                # sendfile: big weights go from page cache to socket without a Python copy.
                self.connection.sendfile(f, offset=start, count=count)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("true", "1")


def _repo_info(repo: _Repo, commit: Commit, blobs: bool) -> dict[str, Any]:
    """The JSON of ``/api/{type}s/{repo_id}/revision/{rev}``; ``blobs`` adds sizes and LFS info."""
    siblings: list[dict[str, Any]] = []
    for path, blob in sorted(commit.files.items()):
        sibling: dict[str, Any] = {"rfilename": path}
        if blobs:
            sibling.update(size=blob.size, blobId=blob.git_oid)
            if blob.lfs:
                sibling["lfs"] = {
                    "sha256": blob.sha256,
                    "size": blob.size,
                    "pointerSize": len(blob.pointer),
                }
        siblings.append(sibling)
    author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
    return {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": author,
        "sha": commit.sha,
        "lastModified": commit.date,
        "createdAt": commit.date,
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
    }


def _tree_entries(
    commit: Commit, path_in_repo: str, recursive: bool
) -> list[dict[str, Any]] | None:
    """Entries of ``/api/.../tree/{rev}/{path}``: None when ``path_in_repo`` is no directory."""
    prefix = f"{path_in_repo}/" if path_in_repo else ""
    files: dict[str, Blob] = {}
    dirs: set[str] = set()
    for path, blob in commit.files.items():
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :].split("/")
        for depth in range(1, len(rest)):
            if recursive or depth == 1:
                dirs.add(prefix + "/".join(rest[:depth]))
        if recursive or len(rest) == 1:
            files[path] = blob
    if prefix and not files and not dirs:
        return None
    entries: list[dict[str, Any]] = []
    for path in sorted(dirs):
        oid = hashlib.sha1(f"tree {commit.sha} {path}".encode()).hexdigest()
        entries.append({"type": "directory", "oid": oid, "size": 0, "path": path})
    for path, blob in sorted(files.items()):
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        entry["path"] = path
        entries.append(entry)
    return entries


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` range as a half-open [start, end), or None if unsatisfiable."""
    m = _RANGE_RE.match(header.strip())
    assert m is not None
    first, last = m.group(1), m.group(2)
    if first == "":
        if last == "" or int(last) == 0:
            return None
        return max(0, size - int(last)), size  # suffix range: the last N bytes
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= end:
        return None
    return start, end


# -- running the real client -----------------------------------------------------------------


def hf_hub_cache(cache_root: Path) -> Path:
    """Where the client keeps ``models--*`` and ``.locks`` when ``~/.cache`` is ``cache_root``."""
    return cache_root / "huggingface" / "hub"


def hf_env(cache_root: Path | str, endpoint: str, *, offline: bool = False) -> dict[str, str]:
    """Environment for a Hugging Face client whose cache is ``<cache_root>/huggingface``.

    ``HF_ENDPOINT`` stays set when offline, so a request the client should not make lands in
    the fake hub's log rather than failing somewhere else.
    """
    return client_env(
        cache_root,
        {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        },
    )


def run_hf_client(
    code: str,
    cache_root: Path | str,
    endpoint: str,
    *,
    offline: bool = False,
    python: str = sys.executable,
    timeout_s: float = HF_CLIENT_TIMEOUT_S,
    user: str | None = None,
    umask: int | None = None,
) -> Any:
    """Run ``code`` with the real huggingface_hub in a fresh process; return what it ``emit``ted.

    A fresh process per call because the client reads HF_ENDPOINT and HF_HUB_OFFLINE at import.
    """
    source = _SNIPPET_PRELUDE + textwrap.dedent(code)
    stdout = run_client(python, source, hf_env(cache_root, endpoint, offline=offline), timeout_s,
                        user=user, umask=umask)
    return client_result(stdout) if RESULT_PREFIX in stdout else None
