"""A one-line progress bar on a terminal, silent anywhere else (notebook logs, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Seconds between two redraws.
REDRAW_SECONDS = 0.2
WIDTH = 30


class Progress:
    """``done / total`` as a bar on ``stream`` (stderr) when it is a terminal; ``enabled`` overrides that."""

    def __init__(self, total: int, label: str, *, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled if enabled is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self._drawn = 0.0
        self._start = time.perf_counter()
        self._longest = 0

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more done; redraw at most every :data:`REDRAW_SECONDS`."""
        self.done += steps
        now = time.perf_counter()
        if self.enabled and (now - self._drawn >= REDRAW_SECONDS or self.done >= self.total):
            self._drawn = now
            text = self.line(now - self._start)
            self._longest = max(self._longest, len(text))
            self.stream.write("\r" + text.ljust(self._longest))  # a shorter line covers the longer one
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        """The bar after ``elapsed`` seconds, with the time left while unfinished.

        Time left at the rate so far: ``elapsed * (total - done) / done``.
        """
        done = min(self.done, self.total)
        filled = WIDTH * done // self.total
        text = f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{self.total} {elapsed:.0f}s"
        if 0 < done < self.total:
            text += f", about {elapsed * (self.total - done) / done:.0f}s left"
        return text

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
