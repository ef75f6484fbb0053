"""The one-line progress bar that long commands (bench, quantize) draw on stderr."""
from __future__ import annotations

import sys
import time


class Bar:
    """A one-line progress bar on stderr (redrawn at most ten times a second); a finished
    bar (done == total) ends its line, so the next phase starts a bar of its own."""

    def __init__(self, enabled: bool, width: int = 24):
        self.enabled, self.width, self.start, self.last = enabled, width, time.perf_counter(), 0.0
        self.ended = False

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.ended:  # a new bar: its own clock
            self.start, self.ended = now, False
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        fill = done * self.width // max(total, 1)
        print(f"\r\033[K[{'#' * fill:<{self.width}}] {done}/{total} {label[:60]} {now - self.start:5.1f}s",
              end="" if done < total else "\n", file=sys.stderr, flush=True)
        self.ended = done >= total
