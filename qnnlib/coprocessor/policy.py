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
from collections.abc import Callable

import numpy as np

from qnnlib.emit.integer import fixed_point

#: The policies :class:`qnnlib.coprocessor.InferenceSession` takes.
POLICIES = ("ort-exact", "q31", "pot")


def scale_factor(s_x: np.ndarray | float, s_w: np.ndarray | float, s_y: np.ndarray | float) -> np.ndarray:
    """``f32(f32(s_x * s_w) / s_y)``: the factor onnxruntime multiplies a float32 accumulator by."""
    prod = np.asarray(s_x, np.float32) * np.asarray(s_w, np.float32)
    return (prod.astype(np.float32) / np.asarray(s_y, np.float32)).astype(np.float32)


def requantize(acc: np.ndarray, m: np.ndarray, zero_point: int, dtype: np.dtype, policy: str) -> np.ndarray:
    """``acc`` (exact integer values, any float or int array) to ``dtype`` by ``policy`` (module docstring).

    ``m`` broadcasts against ``acc`` (a scalar, or per channel shaped for axis 1).
    """
    info = np.iinfo(dtype)
    if policy == "ort-exact":
        scaled = acc.astype(np.float32) * np.asarray(m, np.float32)
        clipped = np.clip(scaled, np.float32(info.min - zero_point), np.float32(info.max - zero_point))
        return (np.rint(clipped) + np.float32(zero_point)).astype(dtype)
    if policy == "q31":
        return _shifted(acc, np.asarray(m, np.float64), zero_point, dtype, pair=fixed_point)
    if policy == "pot":
        return _shifted(acc, np.asarray(m, np.float64), zero_point, dtype, pair=_power_of_two)
    raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")


def _power_of_two(m: float) -> tuple[int, int]:
    """``(1, k)`` with ``2**-k`` the power of two nearest ``m`` in log2 (``(0, 0)`` for ``m <= 0``)."""
    if m <= 0 or not math.isfinite(m):
        return 0, 0
    return 1, -round(math.log2(m))


def _shifted(acc: np.ndarray, m: np.ndarray, zero_point: int, dtype: np.dtype, *,
             pair: Callable[[float], tuple[int, int]]) -> np.ndarray:
    """``clip(round_half_up(acc * M >> shift) + z)`` with ``(M, shift) = pair(m)`` per factor."""
    info = np.iinfo(dtype)
    values = np.asarray(acc)
    flat = m.reshape(-1)
    pairs = [pair(float(v)) for v in flat]
    mult = np.array([p[0] for p in pairs], np.int64).reshape(m.shape)
    shift = np.array([p[1] for p in pairs], np.int64).reshape(m.shape)
    product = np.rint(values).astype(np.int64) * mult
    right = np.maximum(shift, 0)
    rounding = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    shifted = np.where(shift >= 0, (product + rounding) >> right, product << np.maximum(-shift, 0))
    return np.clip(shifted + zero_point, info.min, info.max).astype(dtype)
