"""A progress bar for long work (import, verify, gc, bench), shown only on a terminal.

Small on purpose: one line on stderr, redrawn at most ``REDRAW_PER_S`` times a second, with
rate and ETA. Off a terminal (CI, pipes) it prints nothing, so logs stay clean.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Self, TextIO

REDRAW_PER_S = 8
BAR_WIDTH = 28


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    def __init__(self, label: str, total: int, unit: str = "bytes",
                 stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def advance(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            now = time.monotonic()
            if self.enabled and now - self._last_draw >= 1 / REDRAW_PER_S:
                self._last_draw = now
                self._draw(now)

    def _fmt(self, n: float) -> str:
        return human_bytes(n) if self.unit == "bytes" else f"{n:.0f} {self.unit}"

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(frac * BAR_WIDTH)
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0
        line = (f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac:6.1%} "
                f"{self._fmt(self.done)}/{self._fmt(self.total)} {self._fmt(rate)}/s "
                f"ETA {eta:4.0f}s")
        self.stream.write(line)
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
