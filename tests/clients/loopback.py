"""The life of a test HTTP server on 127.0.0.1: start on an ephemeral port, serve from a
daemon thread, stop. The file server and the fake Hub differ only in what they answer."""

from __future__ import annotations

import logging
import threading
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

SHUTDOWN_POLL_S = 0.05


class LoopbackServer:
    """Subclasses build their ``ThreadingHTTPServer`` in ``_make_httpd``."""

    thread_name = "loopback-server"

    def __init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _make_httpd(self) -> ThreadingHTTPServer:
        raise NotImplementedError

    def start(self) -> Self:
        httpd = self._make_httpd()
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever,
                                        kwargs={"poll_interval": SHUTDOWN_POLL_S},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        log.debug("%s on port %d", self.thread_name, self.port)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])
