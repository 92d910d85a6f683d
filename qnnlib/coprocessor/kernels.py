"""Integer kernels of the coprocessor stand-in: exact integer products of numpy arrays.

Each kernel is compiled once per node from its constant weights (:class:`ExactProduct`,
:class:`PairSaturation`) and then applied to every input. Accumulation is exact: a float32 GEMM
holds every partial sum exactly while it stays below ``2**24``, whatever the summation order. The
compile step splits the reduction axis into chunks for which ``max|x - z_x| * max_m sum_k |w_mk|
<= 2**24`` holds for any input the zero point allows; each chunk is a float32 GEMM and the chunks
add up in float64 (exact below ``2**53``). numpy's int32 matmul is about 30x slower (DESIGN.md
section 9).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The largest integer every float32 partial sum holds exactly.
FLOAT32_EXACT = 2**24
#: int16 bounds of x86's ``vpmaddubsw``, which adds two uint8 x int8 products with saturation.
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


@dataclass(frozen=True)
class ExactProduct:
    """``w @ x`` for integer-valued ``w`` (..., M, K) and any ``x`` with ``|x| <= x_max``, exactly.

    ``chunks``: ranges of K each a float32 GEMM; one chunk gives a float32 result, several a
    float64 sum of float32 GEMMs.
    """

    weights: np.ndarray
    chunks: tuple[tuple[int, int], ...]

    @classmethod
    def compile(cls, w: np.ndarray, x_max: float) -> ExactProduct:
        """Split K so that ``x_max * max_m sum_{k in chunk} |w_mk| <= 2**24`` in every chunk."""
        magnitudes = np.abs(w.astype(np.float64)).reshape(-1, w.shape[-1])
        chunks: list[tuple[int, int]] = []
        start, k = 0, w.shape[-1]
        while start < k:
            partial = np.cumsum(magnitudes[:, start:], axis=1).max(axis=0) * max(x_max, 1.0)
            length = max(1, int(np.searchsorted(partial, FLOAT32_EXACT, side="right")))
            chunks.append((start, start + length))
            start += length
        return cls(w.astype(np.float32), tuple(chunks))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``weights @ x`` for ``x`` (..., K, P): float32 (one chunk) or float64 (several)."""
        x = x.astype(np.float32, copy=False)
        if len(self.chunks) == 1:
            return np.matmul(self.weights, x)
        total = np.zeros(np.broadcast_shapes((*self.weights.shape[:-1], 1), (*x.shape[:-2], 1, x.shape[-1])))
        for start, stop in self.chunks:
            total += np.matmul(self.weights[..., start:stop], x[..., start:stop, :])
        return total


@dataclass(frozen=True)
class PairSaturation:
    """What onnxruntime's AVX2 uint8 x int8 kernels change by adding product pairs in a saturating int16.

    The reduction runs over pairs ``j`` of (uint8 input, int8 weight) products; ``vpmaddubsw`` adds
    each pair in int16 with saturation: ``sat16(a0 w0 + a1 w1)`` in place of ``a0 w0 + a1 w1``.
    With ``a >= 0`` a pair can only saturate when its weights share a sign and
    ``255 * (|w0| + |w1|) > 32767`` (*risky* pairs, found at compile time) and the input pair is
    large: ``(a0 + a1) * max(|w0|, |w1|) > 32767``, i.e. ``a0 + a1 > threshold[j]``. At run time only
    those input positions are multiplied out.

    ``rows``, ``w0``, ``w1``: the risky (output row, weights) of each pair ``j``, grouped by ``j``
    from ``starts[j]`` to ``starts[j + 1]``; ``threshold``: shaped like the pair axes.
    """

    threshold: np.ndarray
    starts: np.ndarray
    rows: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    @classmethod
    def compile(cls, w0: np.ndarray, w1: np.ndarray) -> PairSaturation | None:
        """From the weights of each pair, (M, *pair axes) int8 each; None when no pair is risky."""
        a, b = w0.astype(np.int32), w1.astype(np.int32)
        risky = (a * b >= 0) & (255 * (np.abs(a) + np.abs(b)) > INT16_MAX)
        if not risky.any():
            return None
        pair_shape = w0.shape[1:]
        flat_risky = risky.reshape(len(w0), -1)
        js, rows = np.nonzero(flat_risky.T)  # grouped by pair j
        a_flat, b_flat = a.reshape(len(w0), -1), b.reshape(len(w0), -1)
        largest = np.where(flat_risky, np.maximum(np.abs(a_flat), np.abs(b_flat)), 1).max(axis=0)
        threshold = np.where(flat_risky.any(axis=0), INT16_MAX // largest, 2 * 255)
        starts = np.searchsorted(js, np.arange(flat_risky.shape[1] + 1))
        return cls(threshold.reshape(pair_shape).astype(np.int16), starts, rows,
                   a_flat[rows, js], b_flat[rows, js])

    def add_to(self, acc: np.ndarray, a0: np.ndarray, a1: np.ndarray) -> None:
        """``acc[n, m, p] += sum_j sat16(pair) - pair`` for input pairs ``a0``, ``a1``: (N, *pair axes, P) uint8."""
        total = a0.astype(np.int16) + a1
        candidates = np.nonzero(total > self.threshold[..., None])
        if candidates[0].size == 0:
            return
        n, p = candidates[0], candidates[-1]
        j = np.ravel_multi_index(candidates[1:-1], self.threshold.shape)
        x0, x1 = a0[candidates].astype(np.int32), a1[candidates].astype(np.int32)
        counts = self.starts[j + 1] - self.starts[j]
        which = np.repeat(np.arange(j.size), counts)
        first_of_each = np.repeat(np.cumsum(counts) - counts, counts)
        offsets = np.arange(which.size) - first_of_each + np.repeat(self.starts[j], counts)
        product = x0[which] * self.w0[offsets] + x1[which] * self.w1[offsets]
        correction = np.clip(product, INT16_MIN, INT16_MAX) - product
        hit = np.nonzero(correction)[0]
        if hit.size:
            np.add.at(acc, (n[which[hit]], self.rows[offsets[hit]], p[which[hit]]), correction[hit])


@functools.cache
def pairs_saturate() -> bool:
    """Whether onnxruntime's uint8 x int8 kernels on this CPU add product pairs in a saturating int16.

    x86 with AVX2 and without VNNI does (``vpmaddubsw``); VNNI (``vpdpbusd``) and other CPUs
    accumulate exactly. Read from ``/proc/cpuinfo``; False where it cannot be read.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and not any(f in flags for f in ("avx512_vnni", "avx_vnni"))


def pair_axes(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The first and second members of each pair ``(2i, 2i + 1)`` along ``axis``.

    An odd last member is left out: alone it cannot saturate.
    """
    size = values.shape[axis] - values.shape[axis] % 2
    first = [slice(None)] * values.ndim
    second = [slice(None)] * values.ndim
    first[axis], second[axis] = slice(0, size, 2), slice(1, size, 2)
    return values[tuple(first)], values[tuple(second)]


def output_size(size: int, kernel: int, stride: int, dilation: int, pads: tuple[int, int], *,
                ceil: bool = False) -> int:
    """Positions of a sliding window: ``floor((size + pads - dilation (kernel - 1) - 1) / stride) + 1``.

    With ``ceil`` the division rounds up, and the last window must still start inside the input or
    its begin padding.
    """
    pad_begin, pad_end = pads
    span = size + pad_begin + pad_end - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    return out - 1 if ceil and (out - 1) * stride >= size + pad_begin else out


def output_dims(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                pads: Sequence[int], *, ceil: bool = False) -> tuple[int, ...]:
    """A sliding window's output dims over ``spatial``: :func:`output_size` per axis (ONNX's ``pads`` order)."""
    rank = len(kernel)
    return tuple(output_size(spatial[i], kernel[i], strides[i], dilations[i], (pads[i], pads[i + rank]), ceil=ceil)
                 for i in range(rank))


def sliding_windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                    pads: Sequence[int], *, fill: Any = 0, ceil: bool = False
                    ) -> tuple[list[tuple[tuple[int, ...], np.ndarray]], tuple[int, ...]]:
    """For each kernel offset, the strided view of ``x`` (N, C, *spatial) it reads at every output position.

    ``x`` is padded with ``fill``; ``pads`` is ONNX's ``[begin_0, ..., begin_k, end_0, ..., end_k]``,
    and with ``ceil`` (pooling's ``ceil_mode``) the end padding grows to what the last window reads.
    Returns the (offsets, view) pairs and the output's spatial dims.
    """
    rank = len(kernel)
    spatial = x.shape[2:]
    out = output_dims(spatial, kernel, strides, dilations, pads, ceil=ceil)
    end = [max(pads[i + rank], (out[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - spatial[i] - pads[i])
           for i in range(rank)]
    padded = np.pad(x, [(0, 0), (0, 0), *zip(pads[:rank], end, strict=True)], constant_values=fill) \
        if any(pads[:rank]) or any(end) else x
    views = []
    for offsets in np.ndindex(*kernel):
        index = tuple(slice(offsets[i] * dilations[i], offsets[i] * dilations[i] + strides[i] * (out[i] - 1) + 1,
                            strides[i]) for i in range(rank))
        key = (slice(None), slice(None), *index)
        views.append((offsets, padded[key]))
    return views, out


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
           pads: Sequence[int], *, pad_value: int = 0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Patches of ``x`` (N, C, *spatial) padded with ``pad_value``: shape (N, C, prod(kernel), positions), out dims.

    ``pads`` is ONNX's ``[begin_0, ..., begin_k, end_0, ..., end_k]``. A 1x1 kernel with unit
    strides and no padding is a reshape, not a copy.
    """
    n, c = x.shape[:2]
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads):
        return x.reshape(n, c, 1, -1), tuple(x.shape[2:])
    views, out = sliding_windows(x, kernel, strides, dilations, pads, fill=pad_value)
    cols = np.empty((n, c, *kernel, *out), x.dtype)
    for offsets, view in views:
        key: tuple[slice | int, ...] = (slice(None), slice(None), *(int(o) for o in offsets))
        cols[key] = view
    return cols.reshape(n, c, int(np.prod(kernel)), -1), out


def depthwise_accumulate(x: np.ndarray, x_zero: int, weights: np.ndarray, *, strides: Sequence[int],
                         dilations: Sequence[int], pads: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """``sum_k (x - z_x)[shifted by k] * w[c, k]`` of a depthwise convolution: (N, C, positions) float32, out dims.

    ``weights`` (C, *kernel) are centred. Each kernel offset adds one strided view of the padded,
    centred input times a per-channel weight: no patch matrix. Exact in float32: every partial sum
    is at most ``prod(kernel) * 255 * 255``, far below ``2**24`` for the kernels networks use.
    """
    kernel = weights.shape[1:]
    n, c = x.shape[:2]
    centred = x.astype(np.float32)
    if x_zero:
        centred -= np.float32(x_zero)
    views, out = sliding_windows(centred, kernel, strides, dilations, pads)
    acc = np.zeros((n, c, *out), np.float32)
    term = np.empty_like(acc)
    per_kernel_offset = weights.reshape(c, -1).T.reshape(-1, 1, c, *([1] * len(kernel)))  # (kk, 1, C, 1...)
    for k, (_, view) in enumerate(views):
        np.multiply(view, per_kernel_offset[k], out=term)
        acc += term
    return acc.reshape(n, c, -1), out
