"""A tiny progress bar on stderr (tqdm is not a dependency).

On a terminal it redraws one line (``label |█████·····| 12/40 00:03<00:07``); elsewhere (CI logs,
pipes) it prints a plain line at every 10 % so that logs stay short.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True, width: int = 24):
        self.total, self.label, self.width = max(1, int(total)), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def set_label(self, label: str) -> None:
        self.label = label

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= 0.1 or self.done == self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line(now))
                self.stream.flush()
        else:
            decile = self.done * 10 // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self.line(now) + "\n")
                self.stream.flush()

    def line(self, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        elapsed = now - self.start
        filled = self.done * self.width // self.total
        bar = "█" * filled + "·" * (self.width - filled)
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return f"{self.label} |{bar}| {self.done}/{self.total} {_clock(elapsed)}<{_clock(eta)}"

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}"
