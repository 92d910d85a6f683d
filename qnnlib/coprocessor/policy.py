"""Requantisation policies: how an exact integer accumulator becomes the next layer's integer input.

For an accumulator ``acc`` (int32, bias included), real factor ``m = s_x * s_w / s_y`` and output
zero point ``z``:

* ``ort-exact``: onnxruntime's x86 kernels (DESIGN.md section 3, measured bit-exact):
  ``m32 = f32(f32(s_x * s_w) / s_y)``; ``y = rint(clip(f32(acc) * m32, qmin - z, qmax - z)) + z``,
  with ``rint`` rounding half to even.
* ``q31``: as an NPU or DSP does it, integers only: ``m ~= M * 2**-shift`` with ``2**30 <= M < 2**31``
  (:func:`qnnlib.emit.integer.fixed_point`); ``y = clip(((acc * M) + 2**(shift - 1)) >> shift + z)``
  (round half up, in 64-bit integers).
* ``pot``: power-of-two factors, a shift only: ``m`` rounded to ``2**-k`` (nearest in log2);
  ``y = clip((acc + 2**(k - 1)) >> k + z)`` (a left shift when ``k < 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qnnlib.emit.integer import fixed_point

#: The policies :class:`qnnlib.coprocessor.InferenceSession` takes.
POLICIES = ("ort-exact", "q31", "pot")


def scale_factor(s_x: np.ndarray | float, s_w: np.ndarray | float, s_y: np.ndarray | float) -> np.ndarray:
    """``f32(f32(s_x * s_w) / s_y)``: the factor onnxruntime multiplies a float32 accumulator by."""
    prod = np.asarray(s_x, np.float32) * np.asarray(s_w, np.float32)
    return (prod.astype(np.float32) / np.asarray(s_y, np.float32)).astype(np.float32)


@dataclass(frozen=True)
class Requantizer:
    """One layer's requantisation by a policy (module docstring), its factors prepared once.

    ``m`` broadcasts against the accumulator (a scalar, or per channel shaped for its axis).
    """

    policy: str
    zero_point: int
    dtype: np.dtype
    factor: np.ndarray
    multiplier: np.ndarray
    shift: np.ndarray

    @classmethod
    def compile(cls, m: np.ndarray, zero_point: int, dtype: np.dtype, policy: str) -> Requantizer:
        """Prepare ``m``: float32 for ``ort-exact``, integer multiplier and shift for ``q31`` and ``pot``."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
        m = np.asarray(m)
        pair = power_of_two if policy == "pot" else fixed_point
        pairs = [pair(float(v)) for v in m.reshape(-1)] if policy != "ort-exact" else []
        multiplier = np.array([p[0] for p in pairs], np.int64).reshape(m.shape) if pairs else np.zeros(())
        shift = np.array([p[1] for p in pairs], np.int64).reshape(m.shape) if pairs else np.zeros(())
        return cls(policy, int(zero_point), np.dtype(dtype), m.astype(np.float32), multiplier, shift)

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        """``acc`` (exact integer values, float or int) on the output's integer grid."""
        info = np.iinfo(self.dtype)
        if self.policy == "ort-exact":
            scaled = np.multiply(acc, self.factor, dtype=np.float32)  # one pass: f32(acc) * m32
            np.clip(scaled, np.float32(info.min - self.zero_point), np.float32(info.max - self.zero_point), out=scaled)
            np.rint(scaled, out=scaled)
            scaled += np.float32(self.zero_point)
            return scaled.astype(self.dtype)
        product = np.rint(acc).astype(np.int64) * self.multiplier
        right = np.maximum(self.shift, 0)
        rounding = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
        shifted = np.where(self.shift >= 0, (product + rounding) >> right, product << np.maximum(-self.shift, 0))
        return np.clip(shifted + self.zero_point, info.min, info.max).astype(self.dtype)


def power_of_two(m: float) -> tuple[int, int]:
    """``(1, k)`` with ``2**-k`` the power of two nearest ``m`` in log2 (``(0, 0)`` for ``m <= 0``)."""
    if m <= 0 or not math.isfinite(m):
        return 0, 0
    return 1, -round(math.log2(m))
