"""Affine quantisation as pure functions.

Conventions (DESIGN.md section 3):

* ``r = s * (q - z)`` and ``q = clip(rint(r / s) + z, qmin, qmax)``; ``np.rint`` rounds half to
  even, as onnxruntime does.
* Scales are float32, zero points integers; zero is always exactly representable.
* Weights are symmetric (``z = 0``) over a restricted range ``[-qmax, qmax]``: ``qmax = 127`` uses all
  of int8; :data:`OVERFLOW_SAFE_QMAX` keeps x86 integer kernels from saturating.
"""

from __future__ import annotations

import math

import numpy as np

from qnnlib.numerics.qtypes import INT32, QType

#: Scales below this are replaced by 1.0: the tensor is (numerically) constant zero.
MIN_SCALE = float(np.finfo(np.float32).tiny)

#: Largest weight magnitude at which x86 u8 x s8 kernels cannot saturate. Without VNNI they add two
#: adjacent products in int16 (``vpmaddubsw``): ``255 * 127 * 2 = 64770`` overflows 32767, while
#: ``255 * 63 * 2 = 32130`` does not. Weights stay int8 in storage; they use 7 bits of range.
OVERFLOW_SAFE_QMAX = 63
#: Largest ``|q0| + |q1|`` of a same-sign int8 weight pair that those kernels cannot saturate with any
#: uint8 input pair: ``255 * 128 = 32640 <= 32767``.
SAFE_PAIR_SUM = 128


def power_of_two_at_least(x: np.ndarray | float) -> np.ndarray:
    """``2**ceil(log2 x)`` elementwise for ``x > 0``, exact in float32 (from ``x = f * 2**e``, ``f`` in [0.5, 1))."""
    f, e = np.frexp(np.asarray(x, np.float32))
    return np.ldexp(np.float32(1.0), e - (f == 0.5)).astype(np.float32)


def activation_qparams(lo: float, hi: float, qt: QType, *, symmetric: bool = False,
                       power_of_two: bool = False) -> tuple[np.float32, int]:
    """Scale and zero point that map ``[min(lo, 0), max(hi, 0)]`` onto ``[qmin, qmax]``.

    Asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = clip(rint(qmin - lo / s), qmin, qmax)``.
    Symmetric (signed types only): ``s = max(|lo|, |hi|) / qmax``, ``z = 0``.
    ``power_of_two``: ``s`` rounded up to ``2**ceil(log2 s)`` (the range still fits; a step up to twice
    as coarse), ``z`` computed from that ``s``.

    A range of width zero (a tensor that was constantly 0) represents 0 at any scale, but the scale
    still sets the bias step ``s * s_w`` of every layer reading it; it is taken as ``[0, 1]``, a fine
    step with no risk of int32 bias overflow, rather than onnxruntime's ``s = 1``.
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"range bounds must be finite, got [{lo}, {hi}]")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < MIN_SCALE:
        lo, hi = 0.0, 1.0
    if symmetric:
        if not qt.signed:
            raise ValueError(f"symmetric quantisation needs a signed type, got {qt.name}")
        amax = max(-lo, hi)
        scale = np.float32(amax / qt.qmax)
        return (np.float32(power_of_two_at_least(scale)) if power_of_two else scale), 0
    scale = np.float32((hi - lo) / (qt.qmax - qt.qmin))
    if power_of_two:
        scale = np.float32(power_of_two_at_least(scale))
    zero_point = int(np.clip(np.rint(qt.qmin - np.float32(lo) / scale), qt.qmin, qt.qmax))
    return scale, zero_point


def representable_range(scale: float, zero_point: int, qt: QType) -> tuple[float, float]:
    """The real interval ``[s * (qmin - z), s * (qmax - z)]`` that (scale, zero point) can express."""
    return float(scale) * (qt.qmin - zero_point), float(scale) * (qt.qmax - zero_point)


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Reshape a per-channel parameter so that it broadcasts along ``axis`` of an ndim tensor."""
    if axis is None or np.ndim(param) == 0:
        return param
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(param, shape)


def quantize(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, qt: QType,
             axis: int | None = None) -> np.ndarray:
    """``q = clip(rint(x / s) + z, qmin, qmax)``, computed in float32 like onnxruntime."""
    s = _broadcast(np.asarray(scale, np.float32), np.ndim(x), axis)
    z = _broadcast(np.asarray(zero_point, np.float32), np.ndim(x), axis)
    q = np.rint(np.asarray(x, np.float32) / s) + z
    return np.clip(q, qt.qmin, qt.qmax).astype(qt.np_dtype)


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int,
               axis: int | None = None) -> np.ndarray:
    """``r = s * (q - z)`` in float32."""
    s = _broadcast(np.asarray(scale, np.float32), np.ndim(q), axis)
    z = _broadcast(np.asarray(zero_point, np.int64), np.ndim(q), axis)
    return ((np.asarray(q, np.int64) - z).astype(np.float32) * s).astype(np.float32)


def fake_quantize(x: np.ndarray, scale: float, zero_point: int, qt: QType) -> np.ndarray:
    """``dequantize(quantize(x))``: the value the quantised model sees instead of ``x``."""
    return dequantize(quantize(x, scale, zero_point, qt), scale, zero_point)


def weight_scales(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Symmetric per-channel scales ``s[c] = max|w[c]| / qmax`` (per tensor when axis is None).

    A channel whose weights are all zero gets ``s = 1``; :func:`bias_safe_scales` may refine it.
    """
    w = np.asarray(w, np.float32)
    if axis is None:
        amax = np.max(np.abs(w), initial=0.0).reshape(1)
    else:
        axis = axis % w.ndim
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=reduce_axes, initial=0.0)
    scales = (amax / np.float32(qmax)).astype(np.float32)
    scales[scales < MIN_SCALE] = 1.0
    return scales


def _channel_rows(w: np.ndarray, axis: int | None) -> np.ndarray:
    """``w`` as (channels, values per channel) along ``axis``; one row when ``axis`` is None."""
    return w.reshape(1, -1) if axis is None else np.moveaxis(w, axis % w.ndim, 0).reshape(w.shape[axis], -1)


def _channel_error(rows: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """Per row, ``sum (w - s * clip(rint(w / s), -qmax, qmax))^2``: the squared error of symmetric rounding.

    Computed in one buffer (the searches call it dozens of times per weight); ``s * q - w`` squares
    to the same float32 values as ``w - s * q``.
    """
    s = scales[:, None]
    t = np.divide(rows, s)
    np.rint(t, out=t)
    np.clip(t, -qmax, qmax, out=t)
    t *= s
    t -= rows
    np.square(t, out=t)
    return np.sum(t, axis=1)


def weight_error(w: np.ndarray, scales: np.ndarray, axis: int | None, qmax: int) -> float:
    """The relative squared error of symmetric weight quantisation: ``|w - s q|^2 / |w|^2`` (0 for zero weights)."""
    rows = _channel_rows(np.asarray(w, np.float32), axis)
    flat = rows.reshape(-1)
    power = float(np.dot(flat, flat))
    if power == 0.0:
        return 0.0
    errors = _channel_error(rows, np.asarray(scales, np.float32).reshape(-1), qmax)
    return float(np.sum(errors, dtype=np.float64)) / power


def is_power_of_two(x: float) -> bool:
    """Whether ``x`` is ``2**k`` for an integer ``k`` (``x = 0.5 * 2**e`` exactly)."""
    return x > 0 and math.frexp(x)[0] == 0.5


#: Clipping ratios tried by :func:`mse_weight_scales`.
CLIP_RATIOS = tuple(np.linspace(0.5, 1.0, 26))


def mse_weight_scales(w: np.ndarray, axis: int | None, qmax: int,
                      ratios: tuple[float, ...] = CLIP_RATIOS) -> np.ndarray:
    """Per channel, ``s[c] = r * max|w[c]| / qmax`` with the ratio ``r`` of least squared error.

    The error of a channel is ``sum (w - s * clip(rint(w / s), -qmax, qmax))^2``; ``r = 1`` (no
    clipping) is among the candidates, so no channel gets worse than :func:`weight_scales`.
    """
    w = np.asarray(w, np.float32)
    rows = _channel_rows(w, axis)
    amax = np.max(np.abs(rows), axis=1)
    best = weight_scales(w, axis, qmax)
    best_err = np.full(len(amax), np.inf)
    for ratio in sorted(ratios, reverse=True):
        scales = (np.float32(ratio) * amax / np.float32(qmax)).astype(np.float32)
        scales[scales < MIN_SCALE] = 1.0
        err = _channel_error(rows, scales, qmax)
        better = err < best_err
        best[better], best_err[better] = scales[better], err[better]
    return best


def power_of_two_weight_scales(w: np.ndarray, axis: int | None, qmax: int, scales: np.ndarray, *,
                               minimum: np.ndarray | None = None) -> np.ndarray:
    """Per channel, ``2**ceil(log2 s[c])`` or half of it, whichever has the smaller squared error.

    The error is that of :func:`mse_weight_scales`; the larger power keeps the channel's range
    ``qmax * s[c]``, the smaller one clips it but halves the step. ``minimum``: the half is not taken
    where it would fall below ``minimum[c]`` (:func:`pair_safe_scales`).
    """
    rows = _channel_rows(np.asarray(w, np.float32), axis)
    up = power_of_two_at_least(np.asarray(scales, np.float32).reshape(-1))
    best, best_err = up, np.full(len(up), np.inf)
    half = (up / 2).astype(np.float32)
    if minimum is not None:
        half = np.where(half >= np.asarray(minimum, np.float32).reshape(-1), half, up)
    for candidate in (up, half):
        err = _channel_error(rows, candidate, qmax)
        better = err < best_err
        best = np.where(better, candidate, best).astype(np.float32)
        best_err = np.where(better, err, best_err)
    return best


def pair_safe_scales(rows: np.ndarray, scales: np.ndarray, qmax: int) -> np.ndarray:
    """Raise the scales of channels whose int8 weight pairs could saturate x86 AVX2 kernels.

    ``rows``: the weights as (channels, K), K in the order onnxruntime reduces over; its pairs are
    ``(2i, 2i + 1)`` along K. A channel whose largest same-sign pair ``S[c] = max(|w0| + |w1|)``
    quantises to more than :data:`SAFE_PAIR_SUM` at ``s[c]`` gets ``s[c] = S[c] / (SAFE_PAIR_SUM - 1)``:
    the two roundings add at most 1, so the pair stays within :data:`SAFE_PAIR_SUM`. Other channels
    keep their scale. One scale (per tensor) covers every row.
    """
    rows = np.asarray(rows, np.float32)
    scales = np.asarray(scales, np.float32).reshape(-1)
    even = rows.shape[1] - rows.shape[1] % 2
    pairs = rows[:, :even].reshape(len(rows), -1, 2)
    if len(scales) != len(rows):  # one scale: every row's pairs compete for it
        pairs = pairs.reshape(1, -1, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    same_sign = first * second > 0
    largest = np.where(same_sign, np.abs(first) + np.abs(second), 0.0).max(axis=1, initial=0.0)
    s = scales[:, None]
    q0 = np.minimum(np.abs(np.rint(first / s)), qmax)
    q1 = np.minimum(np.abs(np.rint(second / s)), qmax)
    risky = np.where(same_sign, q0 + q1, 0).max(axis=1, initial=0) > SAFE_PAIR_SUM
    safe = np.where(risky, largest / np.float32(SAFE_PAIR_SUM - 1), 0.0).astype(np.float32)
    return np.maximum(scales, safe).astype(np.float32)


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int | None, qt: QType, qmax: int) -> np.ndarray:
    """Symmetric weight quantisation ``q = clip(rint(w / s[c]), -qmax, qmax)``, stored in ``qt``."""
    q = quantize(w, scales if axis is not None else scales.reshape(()), 0, qt, axis)
    return np.clip(q, -qmax, qmax).astype(qt.np_dtype)


def bias_scales(input_scale: np.float32, w_scales: np.ndarray) -> np.ndarray:
    """Bias scale ``s_b[c] = f32(s_in * s_w[c])``, the scale an integer kernel accumulates in."""
    return (np.float32(input_scale) * np.asarray(w_scales, np.float32)).astype(np.float32)


def standalone_bias_scales(b: np.ndarray) -> np.ndarray:
    """Per-channel int32 scales ``s[c] = |b[c]| / 2**30`` (1 where ``b[c] = 0``): a bias kept to 30 bits.

    For layers that do not run on an integer kernel, whose bias need not share ``s_in * s_w``.
    """
    scales = (np.abs(np.asarray(b, np.float64)).reshape(-1) / 2.0**30).astype(np.float32)
    scales[scales < MIN_SCALE] = 1.0
    return scales


def quantize_bias(b: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, int]:
    """``q = clip(rint(b / s_b), int32 range)``; returns q and the number of clamped elements."""
    ratio = np.rint(np.asarray(b, np.float64) / np.asarray(scales, np.float64))
    clamped = int(np.count_nonzero((ratio < INT32.qmin) | (ratio > INT32.qmax)))
    return np.clip(ratio, INT32.qmin, INT32.qmax).astype(np.int32), clamped


def bias_safe_scales(w_scales: np.ndarray, w: np.ndarray, axis: int, bias: np.ndarray | None,
                     input_scale: np.float32) -> np.ndarray:
    """Raise weight scales so that every bias is representable in int32 at ``s_in * s_w``.

    A channel whose bias would overflow, ``|b| / (s_in * s_w) > 2**31 - 1`` (a near-dead channel: tiny
    weights, a large bias), gets ``s_w = |b| / (s_in * 2**30)``. Its weights are then coarser, but
    their whole contribution is below the bias by the same factor, while a clamped bias is an error
    of the bias's own size. An all-zero channel's scale is free (every weight is 0), so it gets that
    scale too rather than 1, which would quantise its bias at step ``s_in``.
    """
    if bias is None:
        return w_scales
    axis = axis % w.ndim
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    zero_channel = np.max(np.abs(w), axis=reduce_axes, initial=0.0) == 0
    b = np.abs(np.asarray(bias, np.float64)).reshape(-1)
    overflow = b / (float(input_scale) * np.asarray(w_scales, np.float64)) > INT32.qmax
    if not (zero_channel.any() or overflow.any()):
        return w_scales
    out = w_scales.copy()
    wanted = b / (float(input_scale) * 2.0**30)
    pick = (zero_channel | overflow) & (wanted > MIN_SCALE)
    out[pick] = wanted[pick].astype(np.float32)
    return out
