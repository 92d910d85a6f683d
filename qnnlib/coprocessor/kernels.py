"""Integer kernels of the coprocessor stand-in: numpy functions of integer tensors.

Every kernel accumulates exactly in integers; the operators (:mod:`qnnlib.coprocessor.ops`) then
requantise by the policy (:mod:`qnnlib.coprocessor.policy`). Accumulation runs as a float32 GEMM where that
is exact, ``max|x - z_x| * max_c sum|w_c - z_w| <= 2**24`` (every partial sum is an integer below
``2**24``, which float32 holds exactly, whatever the summation order), and in float64 otherwise
(exact below ``2**53``); numpy's int32 matmul is about 30x slower (DESIGN.md section 9).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

#: The largest integer every float32 partial sum holds exactly.
FLOAT32_EXACT = 2**24


def exact_matmul(a: np.ndarray, b: np.ndarray, bound: float) -> np.ndarray:
    """``a @ b`` of integer-valued arrays, exactly: float32 when ``bound <= 2**24``, else float64."""
    dtype = np.float32 if bound <= FLOAT32_EXACT else np.float64
    return np.matmul(a.astype(dtype, copy=False), b.astype(dtype, copy=False)).astype(np.float64)


def im2col(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
           pads: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Patches of ``x`` (N, C, *spatial), zero-padded: shape (N, out positions, C * prod(kernel)), out dims.

    ``pads`` is ONNX's ``[begin_0, ..., begin_k, end_0, ..., end_k]``.
    """
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    rank = len(spatial)
    padded = np.pad(x, [(0, 0), (0, 0), *[(pads[i], pads[i + rank]) for i in range(rank)]])
    out = tuple((spatial[i] + pads[i] + pads[i + rank] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                for i in range(rank))
    cols = np.empty((n, c, *kernel, *out), x.dtype)
    for offsets in np.ndindex(*kernel):
        index = tuple(slice(offsets[i] * dilations[i], offsets[i] * dilations[i] + strides[i] * (out[i] - 1) + 1,
                            strides[i]) for i in range(rank))
        target = (slice(None), slice(None), *offsets)
        source = (slice(None), slice(None), *index)
        cols[target] = padded[source]
    # (N, C, k..., o...) -> (N, o..., C, k...)
    order = (0, *range(2 + rank, 2 + 2 * rank), 1, *range(2, 2 + rank))
    return cols.transpose(order).reshape(n, int(np.prod(out)), c * int(np.prod(kernel))), out


def conv_accumulate(x: np.ndarray, x_zero: int, w: np.ndarray, w_zero: np.ndarray, *, group: int,
                    strides: Sequence[int], dilations: Sequence[int], pads: Sequence[int],
                    saturate: bool = False) -> np.ndarray:
    """``sum (x - z_x)(w - z_w)`` of a grouped convolution, exactly, as float64 of shape (N, M, *out).

    Padding contributes nothing (padded positions hold ``z_x``, so ``x - z_x = 0`` there).
    ``saturate``: add what onnxruntime's AVX2 kernel changes (:func:`pair_saturation` over the raw
    uint8 input and int8 weights, channels innermost in each kernel position: its NHWC order), for a
    uint8 input, int8 weights with zero point 0, and not a depthwise convolution (whose kernel
    multiplies exactly).
    """
    xs = x.astype(np.int32) - np.int32(x_zero)
    ws = w.astype(np.int32) - np.asarray(w_zero, np.int32).reshape(-1, *([1] * (w.ndim - 1)))
    m, c_per_group = w.shape[:2]
    kernel = w.shape[2:]
    n = x.shape[0]
    per_group = m // group
    cols, out = im2col(xs, kernel, strides, dilations, pads)  # (N, P, C * k), C outermost: groups stay apart
    positions = cols.shape[1]
    by_group = cols.reshape(n * positions, group, -1).transpose(1, 0, 2)  # (G, N * P, c_per_group * k)
    wg = ws.reshape(group, per_group, -1)  # (G, per_group, c_per_group * k)
    bound = float(np.abs(cols).max(initial=0)) * float(np.abs(wg).sum(axis=2).max(initial=0))
    if per_group == 1 and group > 1:  # depthwise: one weight row per group, a product-sum beats G tiny GEMMs
        dtype = np.float32 if bound <= FLOAT32_EXACT else np.float64
        acc = np.einsum("gpk,gk->gp", by_group.astype(dtype), wg[:, 0, :].astype(dtype))[..., None].astype(np.float64)
    else:
        acc = exact_matmul(by_group, wg.transpose(0, 2, 1), bound)  # (G, N * P, per_group)
    if saturate and x.dtype == np.uint8 and w.dtype == np.int8 and c_per_group > 1 and not np.any(w_zero):
        spatial = int(np.prod(kernel))
        for g in range(group):
            raw = (by_group[g] + np.int32(x_zero)).reshape(n * positions, c_per_group, spatial).transpose(0, 2, 1)
            wraw = w[g * per_group:(g + 1) * per_group].reshape(per_group, c_per_group, spatial).transpose(0, 2, 1)
            raw, wraw = _even_channels(raw), _even_channels(wraw)
            acc[g] += pair_saturation(raw.reshape(n * positions, -1), wraw.reshape(per_group, -1))
    # (G, N * P, per_group) -> (N, G * per_group, *out)
    return acc.reshape(group, n, positions, per_group).transpose(1, 0, 3, 2).reshape(n, m, *out)


def _even_channels(x: np.ndarray) -> np.ndarray:
    """``x`` with a zero channel appended on the last axis when it has an odd number (pairs stay in one position)."""
    if x.shape[-1] % 2 == 0:
        return x
    return np.concatenate([x, np.zeros((*x.shape[:-1], 1), x.dtype)], axis=-1)


#: int16 bounds of x86's ``vpmaddubsw``, which adds two uint8 x int8 products with saturation.
INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1


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


def pair_saturation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What saturating each product pair in int16 changes in ``sum_k a[..., k] * b[m, k]``.

    ``a``: raw uint8 values (..., K); ``b``: int8 weights (M, K); K is taken in pairs
    ``(2j, 2j + 1)`` (an odd K padded with a zero). Returns (..., M) to add to the exact sum:
    ``sum_j sat16(a_2j b_2j + a_2j+1 b_2j+1) - (a_2j b_2j + a_2j+1 b_2j+1)``. Only weight pairs with
    ``255 * (|b_2j| + |b_2j+1|) > 32767`` can saturate, so only those are computed.
    """
    k = a.shape[-1]
    if k % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), a.dtype)], axis=-1)
        b = np.concatenate([b, np.zeros((b.shape[0], 1), b.dtype)], axis=-1)
    bp = b.astype(np.int32).reshape(b.shape[0], -1, 2)
    risky_m, risky_j = np.nonzero(255 * np.abs(bp).sum(axis=-1) > INT16_MAX)
    out = np.zeros((*a.shape[:-1], b.shape[0]), np.float64)
    if risky_m.size == 0:
        return out
    ap = a.reshape(*a.shape[:-1], -1, 2).astype(np.int32)
    for start in range(0, risky_m.size, 4096):  # bounded memory: (..., 4096) products at a time
        ms, js = risky_m[start:start + 4096], risky_j[start:start + 4096]
        p = ap[..., js, 0] * bp[ms, js, 0] + ap[..., js, 1] * bp[ms, js, 1]
        correction = (np.clip(p, INT16_MIN, INT16_MAX) - p).astype(np.float64)
        _scatter_add(out, correction, ms)
    return out


def _scatter_add(out: np.ndarray, values: np.ndarray, columns: np.ndarray) -> None:
    """``out[..., columns[r]] += values[..., r]`` for every r (repeated columns add up)."""
    flat_out = out.reshape(-1, out.shape[-1])
    flat_values = values.reshape(-1, values.shape[-1])
    order = np.argsort(columns, kind="stable")
    sorted_columns = columns[order]
    starts = np.flatnonzero(np.r_[True, sorted_columns[1:] != sorted_columns[:-1]])
    flat_out[:, sorted_columns[starts]] += np.add.reduceat(flat_values[:, order], starts, axis=1)
