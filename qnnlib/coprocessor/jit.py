"""Compiled loops for the coprocessor's hottest kernels, when numba is installed (the ``fast`` extra).

numpy runs each of these kernels as several passes over whole arrays, some of them with short
inner loops; here each is one loop nest, compiled by numba on first use (and cached on disk). Each
function computes exactly what its numpy counterpart computes, with the same float32 and float64
operations in the same order, so outputs are bit-identical with or without numba (tested):

* :func:`depthwise`: ``acc[n, c, p] = sum_k (x - z_x)[n, c, window(p, k)] * w[c, k]``, exact in
  float32 (every partial sum is an integer below ``2**24``, so the order and any fused multiply-add
  change nothing); :func:`qnnlib.coprocessor.kernels.depthwise_accumulate` without numba.
* :func:`patches`: a convolution's patch matrix (im2col), centred into float32 in the same pass.
* :class:`Requantize`: ``y = rint(clip(f32(f64(acc) + bias) * m[c], q_min - z, q_max - z)) + z``,
  onnxruntime's requantisation (:mod:`qnnlib.coprocessor.policy`, ``ort-exact``) with its int32
  bias add, per output channel.
* :func:`lookup`: ``y = table[x]`` (``x + 128`` for int8).

:func:`active` says whether kernels compiled now use them: numba is importable and
:data:`ENABLED` is set (``InferenceSession(..., jit=False)`` clears it while compiling, with :func:`enabled`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np

try:
    import numba
except ImportError:  # the fast extra is not installed: numpy kernels only
    numba = None  # type: ignore[assignment]

#: Whether kernels compiled in this context may use the compiled loops.
ENABLED: ContextVar[bool] = ContextVar("qnnlib_coprocessor_jit", default=True)
#: Output widths at or below which a depthwise layer runs with channels innermost (measured faster).
CHANNELS_LAST_WIDTH = 16

_F = TypeVar("_F", bound=Callable[..., Any])


def available() -> bool:
    """Whether numba is installed."""
    return numba is not None


def active() -> bool:
    """Whether kernels compiled now use the compiled loops: numba is installed and :data:`ENABLED` is set."""
    return numba is not None and ENABLED.get()


@contextmanager
def enabled(flag: bool) -> Iterator[None]:
    """Within the block, kernels compiled use the compiled loops only if ``flag`` (and numba is installed)."""
    token = ENABLED.set(flag)
    try:
        yield
    finally:
        ENABLED.reset(token)


def _compiled(fn: _F) -> _F:
    """``fn`` compiled by numba (no Python objects, GIL released, cached on disk); ``fn`` itself without numba."""
    if numba is None:
        return fn
    try:
        return cast(_F, numba.njit(cache=True, nogil=True)(fn))
    except RuntimeError:  # numba finds no writable cache directory: compile in each process instead
        return cast(_F, numba.njit(nogil=True)(fn))


@_compiled
def _depthwise_planes(x: np.ndarray, zero: float, w: np.ndarray, geometry: tuple[int, ...],
                      extent: tuple[int, int]) -> np.ndarray:  # pragma: no cover - compiled
    sh, sw, dh, dw, top, left, oh, ow = geometry
    rows, columns = extent
    n, c, h, width = x.shape
    kh, kw = w.shape[1], w.shape[2]
    # the padded, centred plane split by column phase: plane[q % sw, y, q // sw] holds column q, so
    # every tap reads a contiguous run of columns whatever the stride
    plane = np.zeros((sw, rows, (columns + sw - 1) // sw), np.float32)
    out = np.zeros((n, c, oh, ow), np.float32)
    for b in range(n):
        for ch in range(c):
            for phase in range(sw):
                first = (phase - left) % sw  # the first input column of this phase
                start = (first + left) // sw
                for iy in range(h):
                    target = plane[phase, iy + top]
                    source = x[b, ch, iy]
                    for k in range(max(0, (width - first + sw - 1) // sw)):
                        target[start + k] = np.float32(source[first + k * sw]) - np.float32(zero)
            for oy in range(oh):  # one output row at a time: it stays in the first-level cache
                line = out[b, ch, oy]
                for ky in range(kh):
                    for kx in range(kw):
                        weight = w[ch, ky, kx]
                        q = kx * dw
                        # a slice indexed from 0: no negative-index check in the loop, so it vectorises
                        source = plane[q % sw, oy * sh + ky * dh, q // sw:q // sw + ow]
                        for ox in range(ow):
                            line[ox] += source[ox] * weight
    return out


@_compiled
def _depthwise_channels_last(x: np.ndarray, zero: float, w: np.ndarray, geometry: tuple[int, ...],
                             extent: tuple[int, int]) -> np.ndarray:  # pragma: no cover - compiled
    sh, sw, dh, dw, top, left, oh, ow = geometry
    n, c, h, width = x.shape
    kh, kw = w.shape[0], w.shape[1]
    plane = np.zeros((extent[0], extent[1], c), np.float32)
    acc = np.zeros((oh, ow, c), np.float32)
    out = np.empty((n, c, oh, ow), np.float32)
    for b in range(n):
        for ch in range(c):
            for iy in range(h):
                for ix in range(width):
                    plane[iy + top, ix + left, ch] = np.float32(x[b, ch, iy, ix]) - np.float32(zero)
        acc[:] = 0
        for oy in range(oh):
            for ox in range(ow):
                cell = acc[oy, ox]
                for ky in range(kh):
                    for kx in range(kw):
                        source = plane[oy * sh + ky * dh, ox * sw + kx * dw]
                        weights = w[ky, kx]
                        for ch in range(c):
                            cell[ch] += source[ch] * weights[ch]
        for ch in range(c):
            for oy in range(oh):
                for ox in range(ow):
                    out[b, ch, oy, ox] = acc[oy, ox, ch]
    return out


def _geometry(strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int],
              out: Sequence[int]) -> tuple[int, ...]:
    """A 2-D window's geometry as the compiled loops take it: strides, dilations, top and left pads, output dims."""
    return tuple(int(v) for v in (*strides, *dilations, *pads[:2], *out))


def depthwise(x: np.ndarray, x_zero: int, weights: np.ndarray, weights_last: np.ndarray, *,
              strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int],
              out: Sequence[int]) -> np.ndarray:
    """A 2-D depthwise layer's accumulator (N, C, positions) float32 (module docstring).

    ``weights`` (C, kh, kw) and ``weights_last`` (kh, kw, C) float32 centred weights; ``pads`` ONNX's
    ``[top, left, bottom, right]`` (the end padding is implied by ``out``, the output's dims).
    Narrow outputs run with channels innermost, wide ones plane by plane.
    """
    fn, w = (_depthwise_channels_last, weights_last) if out[1] <= CHANNELS_LAST_WIDTH else (_depthwise_planes, weights)
    geometry = _geometry(strides, dilations, pads, out)
    # the padded input's extent: what the last window reads, and at least the input after its begin padding
    extent = tuple(max((out[i] - 1) * strides[i] + (weights.shape[1 + i] - 1) * dilations[i] + 1,
                       x.shape[2 + i] + pads[i]) for i in range(2))
    acc = fn(x, float(x_zero), w, geometry, extent)
    return np.asarray(acc).reshape(x.shape[0], weights.shape[0], -1)


@_compiled
def _requantize(acc: np.ndarray, bias: np.ndarray, factor: np.ndarray, bounds: tuple[float, float, float],
                out: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    n, c, p = acc.shape
    lo, hi, z = np.float32(bounds[0]), np.float32(bounds[1]), np.float32(bounds[2])
    for b in range(n):
        for ch in range(c):
            m, add = factor[ch], bias[ch]
            source, target = acc[b, ch], out[b, ch]
            for i in range(p):
                v = np.float32(np.float64(source[i]) + add) * m
                v = min(max(v, lo), hi)
                target[i] = np.rint(v) + z
    return out


@_compiled
def _patches(x: np.ndarray, centre: float, fill: float, geometry: tuple[int, ...],
             out: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    sh, sw, dh, dw, top, left, oh, ow = geometry
    n, c, h, width = x.shape
    kh, kw = out.shape[2], out.shape[3]
    centre32 = np.float32(centre)
    for b in range(n):
        for ch in range(c):
            for ky in range(kh):
                for kx in range(kw):
                    shift = kx * dw - left  # input column of output column ox: ox * sw + shift
                    low = min(ow, max(0, -((shift) // sw)))  # first ox reading inside the input
                    high = max(low, min(ow, (width - 1 - shift) // sw + 1))
                    for oy in range(oh):
                        target = out[b, ch, ky, kx, oy]
                        iy = oy * sh + ky * dh - top
                        if iy < 0 or iy >= h:
                            target[:] = fill
                            continue
                        target[:low] = fill
                        target[high:] = fill
                        row = x[b, ch, iy]
                        if sw == 1:
                            dense = row[low + shift:high + shift]
                            for i in range(high - low):
                                target[low + i] = np.float32(dense[i]) - centre32
                        else:
                            strided = row[low * sw + shift:(high - 1) * sw + shift + 1:sw]
                            for i in range(high - low):
                                target[low + i] = np.float32(strided[i]) - centre32
    return out


def patches(x: np.ndarray, x_zero: int, kernel: Sequence[int], *, strides: Sequence[int],
            dilations: Sequence[int], pads: Sequence[int], out: Sequence[int], centred: bool) -> np.ndarray:
    """A 2-D convolution's patches of ``x`` (N, C, H, W): (N, C, kh * kw, positions), as ``kernels.im2col``.

    ``centred``: float32 ``x - z_x``, padding 0; else ``x`` itself, padding ``z_x`` (im2col's values).
    """
    geometry = _geometry(strides, dilations, pads, out)
    result = np.empty((x.shape[0], x.shape[1], *kernel, *out), np.float32 if centred else x.dtype)
    _patches(x, float(x_zero) if centred else 0.0, 0.0 if centred else float(x_zero), geometry, result)
    return result.reshape(x.shape[0], x.shape[1], int(kernel[0]) * int(kernel[1]), -1)


@dataclass(frozen=True)
class Requantize:
    """One layer's :func:`_requantize`, its per-channel bias, factor and bounds prepared once (module docstring)."""

    bias: np.ndarray
    factor: np.ndarray
    low: float
    high: float
    zero_point: int
    dtype: np.dtype

    @classmethod
    def compile(cls, bias: np.ndarray | None, factor: np.ndarray, channels: int, zero_point: int,
                dtype: np.dtype) -> Requantize:
        """From an int32 ``bias`` (or None), the factor ``m`` (one, or one per channel) and the output's grid."""
        info = np.iinfo(dtype)
        add = np.zeros(channels) if bias is None else bias.astype(np.float64).reshape(channels)
        m = np.broadcast_to(np.asarray(factor, np.float32).reshape(-1), (channels,)).copy()
        return cls(add, m, float(info.min - zero_point), float(info.max - zero_point), zero_point, np.dtype(dtype))

    def __call__(self, acc: np.ndarray) -> np.ndarray:
        """``acc`` (N, C, P), float32 or float64, on the output's integer grid."""
        out = np.empty(acc.shape, self.dtype)
        bounds = (self.low, self.high, float(self.zero_point))
        return np.asarray(_requantize(np.ascontiguousarray(acc), self.bias, self.factor, bounds, out))


@_compiled
def _lookup(table: np.ndarray, x: np.ndarray, offset: int, out: np.ndarray) -> np.ndarray:  # pragma: no cover
    for i in range(x.size):
        out[i] = table[np.int32(x[i]) + offset]
    return out


def lookup(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``table[x]`` for a uint8 ``x``, ``table[x + 128]`` for an int8 one."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, table.dtype)
    return np.asarray(_lookup(table, flat, 128 if x.dtype == np.int8 else 0, out)).reshape(x.shape)
