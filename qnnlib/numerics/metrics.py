"""Error metrics between a float reference and its quantised counterpart, streamable."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


def sqnr_of_error(error: float) -> float:
    """The SQNR in dB a relative error ``E`` (a noise-to-signal ratio) stands for: ``-10 log10(E)``, inf for none."""
    return math.inf if error <= 0 else -10.0 * math.log10(error)


def error_of_sqnr(sqnr: float) -> float:
    """The relative error ``E = 10^(-SQNR/10)`` an SQNR in dB stands for (:func:`sqnr_of_error` inverted), 0 for inf."""
    return 10.0 ** (-sqnr / 10.0)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB."""
    acc = ErrorAccumulator()
    acc.update(reference, test)
    return acc.sqnr_db


def cosine(reference: np.ndarray, test: np.ndarray) -> float:
    """Cosine similarity ``<ref, test> / (|ref| |test|)`` over all elements."""
    acc = ErrorAccumulator()
    acc.update(reference, test)
    return acc.cosine


@functools.lru_cache(maxsize=1024)
def reference_positions(size: int, count: int) -> np.ndarray:
    """``count`` evenly spread flat indices into a tensor of ``size`` elements (all when fewer).

    Fidelity figures compare float and quantised tensors on these positions only: both sides use
    the same deterministic subset, so memory and time stay bounded for large tensors. The result is
    cached and read-only.
    """
    positions = np.arange(size) if size <= count else np.linspace(0, size - 1, count).astype(np.int64)
    positions.setflags(write=False)
    return positions


@dataclass
class ErrorAccumulator:
    """Running sums that give SQNR, cosine and max absolute error over many batches.

    Memory is constant in the number of batches: only five scalars are kept.
    """

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    test_power: float = 0.0
    max_abs: float = 0.0
    count: int = 0

    def update(self, reference: np.ndarray, test: np.ndarray) -> None:
        """Add one batch; both arrays must have the same number of elements.

        Sums of products run in float32 BLAS per batch and accumulate across batches in float64.
        """
        r = np.asarray(reference, np.float32).reshape(-1)
        t = np.asarray(test, np.float32).reshape(-1)
        if r.shape != t.shape:
            raise ValueError(f"shape mismatch: reference {np.shape(reference)} vs test {np.shape(test)}")
        d = r - t
        self.signal += float(np.dot(r, r))
        self.noise += float(np.dot(d, d))
        self.dot += float(np.dot(r, t))
        self.test_power += float(np.dot(t, t))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
        self.count += r.size

    @property
    def sqnr_db(self) -> float:
        """``10 log10(signal / noise)``; +inf when there is no noise, -inf with no signal."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def cosine(self) -> float:
        """``dot / sqrt(signal * test_power)``; 1.0 when both are all zero."""
        denom = math.sqrt(self.signal * self.test_power)
        if denom == 0.0:
            return 1.0 if self.signal == self.test_power else 0.0
        return self.dot / denom
