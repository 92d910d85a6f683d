"""A streaming histogram whose memory is fixed however many batches it sees.

Bins lie on a grid anchored at zero: bin ``j`` covers ``[j * w, (j + 1) * w)`` with ``w`` a power of
two. When new data falls outside the bins held, the grid widens by doubling ``w``, which merges
bins ``2k`` and ``2k + 1`` into bin ``k`` exactly. No sample is kept, and the result does not depend
on how the data was split into batches except through the final bin width.
"""

from __future__ import annotations

import math

import numpy as np

#: Narrowest bin: its reciprocal, by which values are scaled, must stay finite in float32.
MIN_WIDTH = 2.0**-100


class StreamingHistogram:
    """Counts of values on a zero-anchored power-of-two grid of at most ``2 * bins`` bins."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, got {bins}")
        self.bins = bins
        self.capacity = 2 * bins
        self.width: float = 0.0
        self.start = 0
        self.counts = np.zeros(0, np.float64)
        self.zeros = 0.0

    @property
    def empty(self) -> bool:
        """Whether no value has been counted yet."""
        return self.width == 0.0

    def update(self, x: np.ndarray, lo: float | None = None, hi: float | None = None, weight: float = 1.0) -> None:
        """Count the finite float values ``x``, each ``weight`` times; ``lo``/``hi`` bound them.

        The bounds (the batch's min and max, when known) also fix the grid's extent, so a subset of a
        batch can be counted with the batch's own extremes; ``weight`` lets a subsample stand for the
        values it was drawn from.
        """
        x = np.asarray(x, np.float32).ravel()
        if x.size == 0:
            return
        lo = float(x.min()) if lo is None else lo
        hi = float(x.max()) if hi is None else hi
        if self.empty:
            span = hi - lo
            if span <= 0.0:
                span = max(abs(hi), 1e-30)
            self.width = max(2.0 ** math.ceil(math.log2(span / self.bins)), MIN_WIDTH)
            self.start = math.floor(lo / self.width)
            self.counts = np.zeros(math.floor(hi / self.width) - self.start + 1, np.float64)
        first = min(self.start, math.floor(lo / self.width))
        last = max(self.start + len(self.counts) - 1, math.floor(hi / self.width))
        while last - first + 1 > self.capacity:
            self._coarsen()
            first = min(self.start, math.floor(lo / self.width))
            last = max(self.start + len(self.counts) - 1, math.floor(hi / self.width))
        if first < self.start or last >= self.start + len(self.counts):
            grown = np.zeros(last - first + 1, np.float64)
            offset = self.start - first
            grown[offset:offset + len(self.counts)] = self.counts
            self.counts, self.start = grown, first
        # floor before subtracting the start: x / w - start can round up across a bin edge in float32
        scaled = x * np.float32(1.0 / self.width)
        np.floor(scaled, out=scaled)
        idx = scaled.astype(np.intp)
        idx -= self.start
        np.maximum(idx, 0, out=idx)
        np.minimum(idx, len(self.counts) - 1, out=idx)
        self.counts += weight * np.bincount(idx, minlength=len(self.counts))
        self.zeros += weight * float(np.count_nonzero(x == 0))

    def nonzero_counts(self) -> np.ndarray:
        """The counts without the exact zeros (taken from the bin ``[0, w)`` that holds them).

        Zero is exactly representable at any affine scale, so exact zeros (a Relu's output is mostly
        zeros) carry no quantisation error; left in, their spike in one bin decides where range
        searches clip.
        """
        counts = self.counts.copy()
        index = -self.start
        if 0 <= index < len(counts):
            counts[index] = max(counts[index] - self.zeros, 0.0)
        return counts

    def _coarsen(self) -> None:
        counts = self.counts
        if self.start % 2:
            counts = np.concatenate([[0], counts])
            self.start -= 1
        if len(counts) % 2:
            counts = np.concatenate([counts, [0]])
        self.counts = counts.reshape(-1, 2).sum(axis=1)
        self.start //= 2
        self.width *= 2.0

    def centers(self) -> np.ndarray:
        """The midpoint of every bin held, float64."""
        return (np.arange(len(self.counts), dtype=np.float64) + self.start + 0.5) * self.width

    def edges(self) -> np.ndarray:
        """The ``len(counts) + 1`` bin edges, float64."""
        return (np.arange(len(self.counts) + 1, dtype=np.float64) + self.start) * self.width
