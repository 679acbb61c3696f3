"""A tiny HTTP file server on 127.0.0.1 for driving real ML hub clients in tests.

There is no internet where the tests run, so torch.hub and tensorflow_hub fetch from this
server instead.  It serves a fixed mapping of URL path -> bytes (or a file on disk) with
Content-Length and single-range ``Range`` support, and logs every request so tests can assert
what a client asked for (and that a warm cache asks for nothing).  Stdlib only.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from tests.clients.loopback import LoopbackServer

log = logging.getLogger(__name__)

Body = bytes | Path

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
_COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Request:
    """One logged request: enough to assert on what a client fetched."""

    method: str
    path: str  # the URL path, without the query string
    query: str
    headers: dict[str, str]
    status: int


class FileServer(LoopbackServer):
    thread_name = "file-server"

    """Serves ``files`` (URL path -> bytes | Path) on an ephemeral 127.0.0.1 port.

    Use as a context manager; ``url(path)`` builds absolute URLs, ``requests`` is the log.
    ``files`` may be changed while the server runs (a dict lookup per request).
    """

    def __init__(self, files: dict[str, Body] | None = None) -> None:
        super().__init__()
        self.files: dict[str, Body] = dict(files or {})
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def _make_httpd(self) -> ThreadingHTTPServer:
        return ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + "/" + path.lstrip("/")

    def add(self, path: str, body: Body) -> str:
        """Serve ``body`` at ``path``; returns its absolute URL."""
        self.files["/" + path.lstrip("/")] = body
        return self.url(path)

    def log_for(self, path: str) -> list[Request]:
        path = "/" + path.lstrip("/")
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:  # http.server's naming
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, send_body: bool) -> None:
            parts = urlsplit(self.path)
            body = server.files.get(parts.path)
            if body is None:
                self._finish(parts.path, parts.query, 404)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size = len(body) if isinstance(body, bytes) else body.stat().st_size
            start, end, status = 0, size, 200
            range_header = self.headers.get("Range")
            # A Range we do not understand (several ranges, other units) is ignored, as
            # RFC 9110 allows: the client gets the whole body with a 200.
            if range_header and _RANGE_RE.match(range_header.strip()):
                parsed = _parse_range(range_header, size)
                if parsed is None:
                    self._finish(parts.path, parts.query, 416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = parsed
                status = 206
            self._finish(parts.path, parts.query, status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if send_body:
                self._write_body(body, start, end)

        def _write_body(self, body: Body, start: int, end: int) -> None:
            try:
                if isinstance(body, bytes):
                    self.wfile.write(body[start:end])
                    return
                with body.open("rb") as f:
                    f.seek(start)
                    remaining = end - start
                    while remaining > 0:
                        chunk = f.read(min(_COPY_CHUNK_BYTES, remaining))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        remaining -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                log.debug("client went away during %s", self.path)

        def _finish(self, path: str, query: str, status: int) -> None:
            server._record(Request(self.command, path, query, dict(self.headers.items()), status))

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse one ``bytes=a-b`` range into a half-open [start, end), or None if unsatisfiable."""
    m = _RANGE_RE.match(header.strip())
    if m is None:
        raise ValueError(f"not a single byte range: {header!r}")
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            return None
        return max(0, size - n), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= end:
        return None
    return start, end
