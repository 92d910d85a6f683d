"""Calibration methods: how an activation's clipping range is chosen from its statistics.

Each method is a frozen settings object; ``observer()`` gives a fresh stateful observer that
learns with ``update(x)`` and only then has ``range_``. Range choices from a histogram are pure
functions of ``(counts, centers, min, max, levels)``.

* :class:`MinMax`: the observed ``[min, max]``.
* :class:`Percentile`: the ``(100 - p)``-th and ``p``-th percentiles.
* :class:`Entropy`: the range whose quantised histogram is closest to the float one in KL divergence.
* :class:`MSE`: the range that minimises the expected squared quantisation error (clipping plus rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from qnnlib.calibration.histogram import StreamingHistogram

#: Histograms of larger batches count an evenly strided subsample of about this many values, plus
#: every value beyond the subsample's min and max; see HistogramObserver.update.
HISTOGRAM_VALUES_PER_BATCH = 1 << 12


class Observer(Protocol):
    """Learns a tensor's statistics batch by batch; ``min_`` and ``max_`` are the extremes seen."""

    min_: float
    max_: float

    def update(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Add one batch of finite values ``x`` (flat) whose min and max are ``lo`` and ``hi``."""

    @property
    def range_(self) -> tuple[float, float]:
        """The chosen clipping range ``(lo, hi)``."""

    def mse_range_at(self, levels: int, symmetric: bool) -> tuple[float, float]:
        """The range of least squared quantisation error at ``levels`` levels (min-max without a histogram)."""


class MinMaxObserver:
    """Running minimum and maximum."""

    def __init__(self) -> None:
        self.min_ = np.inf
        self.max_ = -np.inf

    def update(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Fold the batch's min and max into the running ones."""
        self.min_ = min(self.min_, lo)
        self.max_ = max(self.max_, hi)

    @property
    def seen(self) -> bool:
        """Whether any value was observed."""
        return bool(np.isfinite(self.min_))

    @property
    def range_(self) -> tuple[float, float]:
        """``(min, max)`` of everything seen; ``(0, 0)`` when nothing was."""
        if not self.seen:
            return 0.0, 0.0
        return self.min_, self.max_

    def mse_range_at(self, levels: int, symmetric: bool) -> tuple[float, float]:
        """Min-max: this observer keeps no histogram to price clipping with."""
        return self.range_


class HistogramObserver(MinMaxObserver):
    """Min, max and a streaming histogram; the range comes from the method's ``choose``."""

    def __init__(self, method: HistogramMethod, levels: int, symmetric: bool) -> None:
        super().__init__()
        self.method = method
        self.levels = levels
        self.symmetric = symmetric
        self.histogram = StreamingHistogram(method.bins)

    def update(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Update min and max with every value; the histogram with a subsample and the exact extremes.

        A batch of ``n > B`` values (``B`` = :data:`HISTOGRAM_VALUES_PER_BATCH`) is counted as an evenly
        strided subsample, each sampled value standing for ``stride`` values, plus every value beyond
        the subsample's own min and max, counted once. Rare large activations, which a subsample misses
        and which MSE and entropy must see to price clipping them, are so always counted.
        """
        self.min_ = min(self.min_, lo)
        self.max_ = max(self.max_, hi)
        n = x.size
        if n <= HISTOGRAM_VALUES_PER_BATCH:
            self.histogram.update(x, lo, hi)
            return
        stride = -(-n // HISTOGRAM_VALUES_PER_BATCH)
        sample = np.ascontiguousarray(x[::stride])
        s_lo, s_hi = float(sample.min()), float(sample.max())
        self.histogram.update(sample, lo, hi, weight=float(stride))
        if hi > s_hi:
            self.histogram.update(x[x > s_hi], lo, hi)
        if lo < s_lo:
            self.histogram.update(x[x < s_lo], lo, hi)

    @property
    def range_(self) -> tuple[float, float]:
        """The method's choice over the histogram, within ``[min, max]``."""
        if not self.seen:
            return 0.0, 0.0
        if self.min_ == self.max_:
            return self.min_, self.max_
        hist = self.histogram
        counts = hist.nonzero_counts() if self.method.exact_zeros_free else hist.counts
        if not counts.any():
            counts = hist.counts
        lo, hi = self.method.choose(counts, hist.centers(), self.min_, self.max_, levels=self.levels,
                                    symmetric=self.symmetric)
        return max(lo, self.min_), min(hi, self.max_)

    def mse_range_at(self, levels: int, symmetric: bool) -> tuple[float, float]:
        """:func:`mse_range` over this histogram (exact zeros left out) at ``levels`` levels."""
        if not self.seen or self.min_ == self.max_:
            return self.range_
        hist = self.histogram
        counts = hist.nonzero_counts()
        lo, hi = mse_range(counts if counts.any() else hist.counts, hist.centers(), self.min_, self.max_,
                           levels=levels, symmetric=symmetric, candidates=MSE.candidates)
        return max(lo, self.min_), min(hi, self.max_)


@dataclass(frozen=True)
class MinMax:
    """Clip at the observed minimum and maximum."""

    name = "minmax"

    def observer(self, levels: int, symmetric: bool = False) -> Observer:
        """A fresh :class:`MinMaxObserver`."""
        return MinMaxObserver()


@dataclass(frozen=True)
class _Histogram:
    bins: int = 2048
    #: Whether ``choose`` sees the histogram without exact zeros (they cost no error at any range).
    exact_zeros_free = False

    def __post_init__(self) -> None:
        if not isinstance(self.bins, int) or self.bins < 128:
            raise ValueError(f"bins must be an int >= 128, got {self.bins!r}")

    def observer(self, levels: int, symmetric: bool = False) -> Observer:
        """A fresh :class:`HistogramObserver` using this method."""
        return HistogramObserver(self, levels, symmetric)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Percentile(_Histogram):
    """Clip at the ``(100 - percentile)``-th and ``percentile``-th percentiles."""

    percentile: float = 99.999
    name = "percentile"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {self.percentile}")

    def choose(self, counts: np.ndarray, centers: np.ndarray, mn: float, mx: float, *, levels: int,
               symmetric: bool) -> tuple[float, float]:
        """Bin edges where the cumulative count crosses ``1 - p/100`` and ``p/100``."""
        return percentile_range(counts, centers, self.percentile)


@dataclass(frozen=True)
class Entropy(_Histogram):
    """Minimise the KL divergence between the float and the quantised histogram (TensorRT's method)."""

    candidates: int = 64
    name = "entropy"
    exact_zeros_free = True

    def choose(self, counts: np.ndarray, centers: np.ndarray, mn: float, mx: float, *, levels: int,
               symmetric: bool) -> tuple[float, float]:
        """Scale the observed range by the factor whose quantised histogram has the least KL divergence."""
        return entropy_range(counts, centers, mn, mx, levels=levels, symmetric=symmetric, candidates=self.candidates)


@dataclass(frozen=True)
class MSE(_Histogram):
    """Minimise the expected squared error of quantising the histogram (clipping plus rounding)."""

    candidates: int = 48
    name = "mse"
    exact_zeros_free = True

    def choose(self, counts: np.ndarray, centers: np.ndarray, mn: float, mx: float, *, levels: int,
               symmetric: bool) -> tuple[float, float]:
        """Search scaled ranges, then refine each end alone."""
        return mse_range(counts, centers, mn, mx, levels=levels, symmetric=symmetric, candidates=self.candidates)


HistogramMethod = Percentile | Entropy | MSE
CalibrationMethod = MinMax | Percentile | Entropy | MSE

METHODS: dict[str, type] = {"minmax": MinMax, "percentile": Percentile, "entropy": Entropy, "mse": MSE}


def method_from_name(name: str) -> CalibrationMethod:
    """The method with default settings for a name in :data:`METHODS`."""
    try:
        return METHODS[name]()
    except KeyError:
        raise ValueError(f"unknown calibration method {name!r}; choose one of {sorted(METHODS)}") from None


# -- pure range choices ---------------------------------------------------------------------------
def percentile_range(counts: np.ndarray, centers: np.ndarray, percentile: float) -> tuple[float, float]:
    """``(lo, hi)`` at the bins where the normalised cumulative count reaches ``1 - p`` and ``p``."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    cdf = np.cumsum(counts) / total
    width = centers[1] - centers[0] if len(centers) > 1 else 0.0
    p = percentile / 100.0
    hi_bin = int(np.searchsorted(cdf, p, side="left"))
    lo_bin = int(np.searchsorted(cdf, 1.0 - p, side="left"))
    hi_bin = min(hi_bin, len(centers) - 1)
    return float(centers[lo_bin] - width / 2), float(centers[hi_bin] + width / 2)


def _candidate_ranges(mn: float, mx: float, alphas: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = min(mn, 0.0), max(mx, 0.0)
    if symmetric:
        amax = max(-lo, hi)
        return -alphas * amax, alphas * amax
    return alphas * lo, alphas * hi


def quantization_error(counts: np.ndarray, centers: np.ndarray, lo: np.ndarray, hi: np.ndarray, *,
                       levels: int, symmetric: bool) -> np.ndarray:
    """Expected squared error ``sum_i n_i (c_i - dq(q(c_i)))^2`` for each candidate range ``[lo_k, hi_k]``.

    Asymmetric: ``s = (hi - lo) / (L - 1)``, ``z = rint(-lo / s)``, ``q = clip(rint(c / s) + z, 0, L - 1)``.
    Symmetric: ``s = hi / (L/2 - 1)``, ``q = clip(rint(c / s), -(L/2 - 1), L/2 - 1)``.
    """
    lo = np.asarray(lo, np.float64)[:, None]
    hi = np.asarray(hi, np.float64)[:, None]
    c = np.asarray(centers, np.float64)[None, :]
    # one (candidates, bins) buffer, updated in place: the low-bit analysis runs this for every tensor
    if symmetric:
        qmax = levels // 2 - 1
        scale = np.maximum(hi / qmax, 1e-30)
        t = np.divide(c, scale)
        np.rint(t, out=t)
        np.clip(t, -qmax, qmax, out=t)
    else:
        scale = np.maximum((hi - lo) / (levels - 1), 1e-30)
        zero = np.rint(-lo / scale)
        t = np.divide(c, scale)
        np.rint(t, out=t)
        t += zero
        np.clip(t, 0, levels - 1, out=t)
        t -= zero
    t *= scale
    t -= c  # deq - c: squares to the same values as c - deq
    np.square(t, out=t)
    t *= counts[None, :]
    return t.sum(axis=1)


def mse_range(counts: np.ndarray, centers: np.ndarray, mn: float, mx: float, *, levels: int, symmetric: bool,
              candidates: int = 100) -> tuple[float, float]:
    """The range of least :func:`quantization_error`: a scaled-range grid, then each end refined alone."""
    counts = counts.astype(np.float64)
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)
    los, his = _candidate_ranges(mn, mx, alphas, symmetric)
    err = quantization_error(counts, centers, los, his, levels=levels, symmetric=symmetric)
    best = int(np.argmin(err))
    lo, hi = float(los[best]), float(his[best])
    if symmetric:
        return lo, hi
    factors = np.linspace(0.5, 1.5, 41)
    his_r = np.minimum(hi * factors, max(mx, 0.0))
    err_hi = quantization_error(counts, centers, np.full_like(his_r, lo), his_r, levels=levels, symmetric=symmetric)
    hi = float(his_r[int(np.argmin(err_hi))])
    los_r = np.maximum(lo * factors, min(mn, 0.0))
    err_lo = quantization_error(counts, centers, los_r, np.full_like(los_r, hi), levels=levels, symmetric=symmetric)
    lo = float(los_r[int(np.argmin(err_lo))])
    return lo, hi


#: Probability given to quantised bins that hold no in-range mass, so KL stays finite.
KL_SMOOTHING = 1e-4


def kl_divergence(counts: np.ndarray, centers: np.ndarray, lo: float, hi: float, levels: int) -> float:
    """KL(P || Q) between the clipped float histogram P and its quantised version Q.

    P is the histogram restricted to ``[lo, hi]`` with the mass outside added to its edge bins.
    Q merges the in-range bins (without that outside mass) into ``levels`` buckets and spreads each
    bucket's mass evenly over its non-empty bins, so clipping costs divergence at the edges
    (TensorRT's method). Infinite when fewer than ``levels`` bins lie in the range.
    """
    inside = np.nonzero((centers >= lo) & (centers <= hi))[0]
    if len(inside) < levels:
        return np.inf
    first, last = inside[0], inside[-1]
    in_range = counts[first:last + 1].astype(np.float64)
    p = in_range.copy()
    p[0] += counts[:first].sum()
    p[-1] += counts[last + 1:].sum()
    bounds = np.linspace(0, len(p), levels + 1).astype(np.int64)
    bucket = np.repeat(np.arange(levels), np.diff(bounds))
    nonzero = p > 0
    mass = np.bincount(bucket, weights=in_range, minlength=levels)
    support = np.bincount(bucket, weights=nonzero.astype(np.float64), minlength=levels)
    q = np.where(nonzero, mass[bucket] / np.maximum(support[bucket], 1), 0.0)
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return np.inf
    pn, qn = p[nonzero] / p_sum, q[nonzero] / q_sum
    empty = qn == 0  # edge bins holding only clipped mass: smooth as TensorRT does
    if empty.any():
        qn = np.where(empty, KL_SMOOTHING, qn * (1 - KL_SMOOTHING * empty.sum()))
    return float(np.sum(pn * np.log(pn / qn)))


def entropy_range(counts: np.ndarray, centers: np.ndarray, mn: float, mx: float, *, levels: int, symmetric: bool,
                  candidates: int = 64) -> tuple[float, float]:
    """The scaled range ``alpha * [min, max]`` of least :func:`kl_divergence`; the full range if none fits."""
    alphas = np.linspace(1.0 / candidates, 1.0, candidates)
    los, his = _candidate_ranges(mn, mx, alphas, symmetric)
    divergences = [kl_divergence(counts, centers, float(lo), float(hi), levels)
                   for lo, hi in zip(los, his, strict=True)]
    best = int(np.argmin(divergences))
    if not np.isfinite(divergences[best]):
        return float(los[-1]), float(his[-1])
    return float(los[best]), float(his[best])
