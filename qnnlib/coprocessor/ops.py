"""The operators the coprocessor runs: one function per op type over numpy integer tensors.

Each takes the node's attributes, its input arrays (constants included, ``None`` for an empty
optional input) and the policy, and returns its output arrays. Formulas per op are in each
docstring; accumulation is exact (:mod:`qnnlib.coprocessor.kernels`), requantisation the policy's
(:mod:`qnnlib.coprocessor.policy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qnnlib.coprocessor.kernels import conv_accumulate, exact_matmul, pair_saturation, pairs_saturate
from qnnlib.coprocessor.policy import requantize, scale_factor

Arrays = Sequence[np.ndarray | None]
Kernel = Callable[[dict[str, Any], Arrays, str], list[np.ndarray]]


def _scalar(a: np.ndarray | None) -> Any:
    assert a is not None
    return a.reshape(-1)[0]


def _spatial_pads(attrs: dict[str, Any], x: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[int]:
    """ONNX pads, from ``pads`` or from ``auto_pad`` (SAME_UPPER / SAME_LOWER / VALID)."""
    rank = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * rank)))
    if auto == "VALID":
        return [0] * (2 * rank)
    begin, end = [], []
    for i in range(rank):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def qlinear_conv(attrs: dict[str, Any], ins: Arrays, policy: str) -> list[np.ndarray]:
    """``y = requant(sum (x - z_x)(w - z_w) + B, s_x * s_w[c] / s_y)``."""
    x, xs, xz, w, ws, wz, ys, yz = ins[:8]
    assert x is not None and w is not None and ws is not None and wz is not None and yz is not None
    bias = ins[8] if len(ins) > 8 else None
    kernel = list(w.shape[2:])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    pads = _spatial_pads(attrs, x, kernel, strides, dilations)
    acc = conv_accumulate(x, int(_scalar(xz)), w, wz, group=int(attrs.get("group", 1)), strides=strides,
                          dilations=dilations, pads=pads, saturate=policy == "ort-exact" and pairs_saturate())
    channel = (1, -1, *([1] * rank))
    if bias is not None:
        acc += bias.astype(np.float64).reshape(channel)
    m = scale_factor(_scalar(xs), ws.reshape(-1), _scalar(ys)).reshape(channel if ws.size > 1 else ())
    return [requantize(acc, m, int(_scalar(yz)), yz.dtype, policy)]


def qgemm(attrs: dict[str, Any], ins: Arrays, policy: str) -> list[np.ndarray]:
    """``y = requant(alpha * (A - z_a)(B - z_b) + C, s_a * s_b[n] / s_y)``.

    Without ``s_y`` the output is float: ``f32(acc + C) * f32(s_a * s_b[n]) * alpha``.
    """
    a, a_s, a_z, b, b_s, b_z = ins[:6]
    assert a is not None and b is not None and b_s is not None and b_z is not None
    c = ins[6] if len(ins) > 6 else None
    ys = ins[7] if len(ins) > 7 else None
    yz = ins[8] if len(ins) > 8 else None
    am = a.astype(np.int32) - np.int32(_scalar(a_z))
    bm = b.astype(np.int32) - b_z.astype(np.int32).reshape((1, -1) if int(attrs.get("transB", 0)) == 0 else (-1, 1))
    if int(attrs.get("transA", 0)):
        am = am.T
    if int(attrs.get("transB", 0)):
        bm = bm.T
    bound = float(np.abs(am).max(initial=0)) * float(np.abs(bm).sum(axis=0).max(initial=0))
    raw_a = a.T if int(attrs.get("transA", 0)) else a
    raw_b = b.T if int(attrs.get("transB", 0)) else b
    acc = exact_matmul(am, bm, bound) + _saturation(raw_a, raw_b, b_z, policy)
    alpha = float(attrs.get("alpha", 1.0))
    if c is not None and c.dtype == np.int32:
        acc = acc + c.astype(np.float64).reshape(1, -1)
    if ys is None:
        scale = (np.float32(_scalar(a_s)) * b_s.astype(np.float32).reshape(1, -1)).astype(np.float32)
        out = acc.astype(np.float32) * scale
        if alpha != 1.0:
            out = out * np.float32(alpha)
        if c is not None and c.dtype != np.int32:
            out = out + c.astype(np.float32)
        return [out.astype(np.float32)]
    assert yz is not None
    m = scale_factor(np.float32(alpha) * np.float32(_scalar(a_s)), b_s.reshape(-1), _scalar(ys)).reshape(1, -1)
    return [requantize(acc, m, int(_scalar(yz)), yz.dtype, policy)]


def qlinear_matmul(attrs: dict[str, Any], ins: Arrays, policy: str) -> list[np.ndarray]:
    """``y = requant((a - z_a) @ (b - z_b), s_a * s_b[n] / s_y)`` (batched like numpy's matmul)."""
    a, a_s, a_z, b, b_s, b_z, ys, yz = ins[:8]
    assert a is not None and b is not None and b_s is not None and b_z is not None and yz is not None
    am = a.astype(np.int32) - np.int32(_scalar(a_z))
    bm = b.astype(np.int32) - (b_z.astype(np.int32).reshape(-1) if b_z.size > 1 else np.int32(_scalar(b_z)))
    bound = float(np.abs(am).max(initial=0)) * float(np.abs(bm).sum(axis=-2).max(initial=0))
    acc = exact_matmul(am, bm, bound)
    if b.ndim == 2:
        acc = acc + _saturation(a, b, b_z, policy)
    m = scale_factor(_scalar(a_s), b_s.reshape(-1), _scalar(ys))
    return [requantize(acc, m if m.size > 1 else m.reshape(()), int(_scalar(yz)), yz.dtype, policy)]


def _saturation(a: np.ndarray, b: np.ndarray, b_zero: np.ndarray, policy: str) -> np.ndarray | float:
    """What onnxruntime's saturating uint8 x int8 GEMM adds to ``a @ b`` (0 when it does not saturate here).

    ``a``: (..., K) raw uint8; ``b``: (K, N) raw int8.
    """
    if policy != "ort-exact" or not pairs_saturate() or a.dtype != np.uint8 or b.dtype != np.int8 or np.any(b_zero):
        return 0.0
    return pair_saturation(a, b.T)


#: The op types the coprocessor claims, and their kernels.
KERNELS: dict[str, Kernel] = {
    "QLinearConv": qlinear_conv,
    "QGemm": qgemm,
    "QLinearMatMul": qlinear_matmul,
}
#: Inputs that must be constants for a claim (weights, scales, zero points), per op type.
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "QLinearConv": (1, 2, 3, 4, 5, 6, 7, 8),
    "QGemm": (1, 2, 3, 4, 5, 6, 7, 8),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
}
