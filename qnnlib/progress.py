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

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more done; redraw at most every :data:`REDRAW_SECONDS`."""
        self.done += steps
        now = time.perf_counter()
        if self.enabled and (now - self._drawn >= REDRAW_SECONDS or self.done >= self.total):
            self._drawn = now
            filled = WIDTH * min(self.done, self.total) // self.total
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                              f"{self.done}/{self.total} {now - self._start:.0f}s")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
