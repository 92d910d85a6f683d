"""A streaming histogram whose memory is fixed however many batches it sees.

Bins lie on a grid anchored at zero: bin ``j`` covers ``[j * w, (j + 1) * w)`` with ``w`` a power of
two. When new data falls outside the bins held, the grid widens by doubling ``w``, which merges
bins ``2k`` and ``2k + 1`` into bin ``k`` exactly. No sample is kept, and the result does not depend
on how the data was split into batches except through the final bin width.
"""

from __future__ import annotations

import math

import numpy as np

from qnnlib.numerics import compiled

#: Narrowest bin: its reciprocal, by which values are scaled, must stay finite in float32.
MIN_WIDTH = 2.0**-100
#: Values the compiled scan of :func:`outside` tests at once before looking at them one by one.
OUTSIDE_BLOCK = 64


def outside(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The values of the flat float32 array ``x`` below ``lo`` or above ``hi``, in their order in ``x``.

    numpy needs two passes per side (a comparison, then the selection); with numba
    (:mod:`qnnlib.numerics.compiled`) one pass tests blocks of :data:`OUTSIDE_BLOCK` values and
    selects only in blocks that hold such a value, which are few when ``lo`` and ``hi`` are close to
    the extremes. Both give the same array. An infinite bound leaves that side out (numpy then
    makes one comparison pass instead of two).
    """
    if compiled.available():
        found = np.empty(x.size, np.float32)
        return found[:_outside(np.ascontiguousarray(x, np.float32), np.float32(lo), np.float32(hi), found)].copy()
    if lo == -math.inf:
        return x[x > hi]
    if hi == math.inf:
        return x[x < lo]
    return x[(x > hi) | (x < lo)]


@compiled.compiled
def _count(x: np.ndarray, scale: np.float32, start: int, weight: float,
           counts: np.ndarray) -> float:  # pragma: no cover - compiled
    """Add ``weight`` to bin ``clip(floor(x * scale) - start)`` of ``counts`` per value; return the zeros seen.

    The same float32 product and floor as numpy's path; counts hold integer multiples of ``weight``,
    exact in float64, so the order of the additions changes nothing.
    """
    last = counts.size - 1
    zeros = 0
    for i in range(x.size):
        k = np.intp(np.floor(x[i] * scale)) - start
        counts[min(max(k, 0), last)] += weight
        zeros += x[i] == 0
    return float(zeros)


@compiled.compiled
def _outside(x: np.ndarray, lo: np.float32, hi: np.float32, found: np.ndarray) -> int:  # pragma: no cover - compiled
    count = 0
    for start in range(0, x.size, OUTSIDE_BLOCK):
        end = min(start + OUTSIDE_BLOCK, x.size)
        hit = False
        for i in range(start, end):  # no branch: the compiler vectorises this test
            hit |= (x[i] > hi) | (x[i] < lo)
        if hit:
            for i in range(start, end):
                if x[i] > hi or x[i] < lo:
                    found[count] = x[i]
                    count += 1
    return count


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
        scale = np.float32(1.0 / self.width)
        if compiled.available():
            self.zeros += weight * _count(np.ascontiguousarray(x), scale, self.start, weight, self.counts)
            return
        scaled = x * scale
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
