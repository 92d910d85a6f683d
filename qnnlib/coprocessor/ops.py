"""The operators the coprocessor runs: one function per op type over numpy integer tensors.

Each takes the node's attributes, its input arrays (constants included, ``None`` for an empty
optional input) and the policy, and returns its output arrays. Formulas per op are in each
docstring; accumulation is exact (:mod:`qnnlib.coprocessor.kernels`), requantisation the policy's
(:mod:`qnnlib.coprocessor.policy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from qnnlib.coprocessor import jit, lookup, pointwise
from qnnlib.coprocessor.kernels import (
    ExactProduct,
    PairSaturation,
    depthwise_accumulate,
    im2col,
    output_dims,
    pair_axes,
    pairs_saturate,
)
from qnnlib.coprocessor.pointwise import Arrays, Compiled
from qnnlib.coprocessor.policy import Requantizer, scale_factor
from qnnlib.emit.integer import EIGHT_BIT, MOVES

#: Compiles a node from its attributes, its constant inputs (None for what arrives at run time) and the policy.
Kernel = Callable[[dict[str, Any], Arrays, str], Compiled]


_scalar = pointwise.scalar


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


def _input_range(zero_point: np.ndarray) -> int:
    """The largest ``|x - z|`` an integer input with this zero point (and its dtype) can hold."""
    info = np.iinfo(zero_point.dtype)
    z = int(_scalar(zero_point))
    return max(z - int(info.min), int(info.max) - z)


def _saturates(x_zero: np.ndarray, w: np.ndarray, w_zero: np.ndarray, policy: str) -> bool:
    """Whether onnxruntime's kernel for this layer adds product pairs in a saturating int16 (kernels.PairSaturation)."""
    return (policy == "ort-exact" and pairs_saturate() and x_zero.dtype == np.uint8 and w.dtype == np.int8
            and not np.any(w_zero))


@dataclass(frozen=True)
class _Bias:
    """An int32 bias, shaped to broadcast; ``narrow`` is its float32 copy when every value is exact in float32."""

    wide: np.ndarray
    narrow: np.ndarray | None

    @classmethod
    def of(cls, bias: np.ndarray | None, shape: tuple[int, ...]) -> _Bias | None:
        if bias is None:
            return None
        wide = bias.astype(np.float64).reshape(shape)
        narrow = wide.astype(np.float32)
        return cls(wide, narrow if bool(np.all(narrow == wide)) else None)

    def add(self, acc: np.ndarray, policy: str) -> np.ndarray:
        """``acc + bias`` rounded as onnxruntime's ``f32(int32 sum)`` (ort-exact), else exact in float64.

        ``acc`` is a kernel's fresh accumulator: the sum is written into it where the type allows.
        """
        if acc.dtype == np.float32 and policy == "ort-exact" and self.narrow is not None:
            return np.add(acc, self.narrow, out=acc)  # exact in float32 both: rounded once, as f32(int32) is
        if acc.dtype == np.float64:
            return np.add(acc, self.wide, out=acc)
        return acc.astype(np.float64) + self.wide


def qlinear_conv(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """``y = requant(sum (x - z_x)(w - z_w) + B, s_x * s_w[c] / s_y)``, grouped, strided, dilated, padded.

    Padded positions hold ``z_x``, so they add nothing. With ``G`` groups of ``C_g`` input and
    ``M_g`` output channels, the product is one batched GEMM of (G, M_g, C_g * k) weights with
    (N, G, C_g * k, positions) patches (a depthwise layer, ``C_g = M_g = 1``: a sum over kernel
    offsets of shifted inputs times one weight per channel, :func:`depthwise_accumulate`).
    """
    _, xs, xz, w, ws, wz, ys, yz = consts[:8]
    assert xs is not None and xz is not None and w is not None and ws is not None and wz is not None
    assert ys is not None and yz is not None
    bias = consts[8] if len(consts) > 8 else None
    m_out, c_group = w.shape[:2]
    kernel = list(w.shape[2:])
    rank, kk = len(kernel), int(np.prod(kernel))
    group = int(attrs.get("group", 1))
    m_group = m_out // group
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    x_zero = int(_scalar(xz))
    centred = (w.astype(np.int32) - np.asarray(wz, np.int32).reshape(-1, *([1] * (w.ndim - 1))))
    depthwise = c_group == 1 and m_group == 1 and group > 1
    accumulate = _depthwise(centred.reshape(group, *kernel).astype(np.float32), x_zero, strides, dilations) \
        if depthwise else None
    gather = _patches(kernel, x_zero, strides, dilations)
    product = None if depthwise else ExactProduct.compile(centred.reshape(group, m_group, c_group * kk),
                                                          _input_range(xz))
    saturation = None
    if _saturates(xz, w, wz, policy) and not (c_group == 1 and m_group == 1):
        # onnxruntime's reduction runs over (kernel offset, input channel), channels fastest; its pairs
        # are neighbours in that order, so with an odd C_g they straddle two kernel offsets.
        dense = np.zeros((m_out, group, kk, c_group), np.int8)
        dense[np.arange(m_out), np.arange(m_out) // m_group] = np.swapaxes(w.reshape(m_out, c_group, kk), 1, 2)
        saturation = PairSaturation.compile(*pair_axes(dense.reshape(m_out, group, kk * c_group), 2))
    channel = (1, -1, 1)
    bias_col = _Bias.of(bias, channel)
    factor = scale_factor(_scalar(xs), ws.reshape(-1), _scalar(ys))
    requant = Requantizer.compile(factor.reshape(channel if ws.size > 1 else ()), int(_scalar(yz)), yz.dtype, policy)
    # onnxruntime's requantisation with its bias in one compiled loop, when the compiled loops are active
    fused = jit.Requantize.compile(bias, factor, m_out, requant.zero_point, requant.dtype) \
        if jit.active() and policy == "ort-exact" else None

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        n = x.shape[0]
        pads = _spatial_pads(attrs, x, kernel, strides, dilations)
        if accumulate is not None:
            acc, out = accumulate(x, pads)
        else:
            assert product is not None
            raw, patches, out = gather(x, pads, saturation is not None)  # (N, C, kk, P) each
            acc = product(patches.reshape(n, group, c_group * kk, -1)).reshape(n, m_out, -1)
        if saturation is not None:
            ordered = np.swapaxes(raw.reshape(n, group, c_group, kk, -1), 2, 3).reshape(n, group, kk * c_group, -1)
            saturation.add_to(acc.reshape(n, m_out, -1), *pair_axes(ordered, 2))
        if fused is not None:
            return [fused(acc.reshape(n, m_out, -1)).reshape(n, m_out, *out)]
        if bias_col is not None:
            acc = bias_col.add(acc, policy)
        return [requant(acc).reshape(n, m_out, *out)]

    return run


def _depthwise(weights: np.ndarray, x_zero: int, strides: Sequence[int], dilations: Sequence[int]
               ) -> Callable[[np.ndarray, list[int]], tuple[np.ndarray, tuple[int, ...]]]:
    """A depthwise layer's accumulator and output dims from its input and pads (centred ``weights`` (C, *kernel)).

    Compiled loops (:func:`qnnlib.coprocessor.jit.depthwise`) for a 2-D kernel when they are active,
    else :func:`depthwise_accumulate`: the same values.
    """
    kernel = weights.shape[1:]
    if not (jit.active() and len(kernel) == 2):
        return lambda x, pads: depthwise_accumulate(x, x_zero, weights, strides=strides, dilations=dilations,
                                                    pads=pads)
    channels_last = np.ascontiguousarray(np.moveaxis(weights, 0, -1))

    def compiled(x: np.ndarray, pads: list[int]) -> tuple[np.ndarray, tuple[int, ...]]:
        out = output_dims(x.shape[2:], kernel, strides, dilations, pads)
        return jit.depthwise(x, x_zero, weights, channels_last, strides=strides, dilations=dilations, pads=pads,
                             out=out), out

    return compiled


def _patches(kernel: Sequence[int], x_zero: int, strides: Sequence[int], dilations: Sequence[int]
             ) -> Callable[[np.ndarray, list[int], bool], tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
    """A convolution's patches: ``(raw, centred, out dims)`` from the input, its pads and whether ``raw`` is needed.

    ``raw`` is :func:`im2col` (padding ``z_x``; the input itself when not needed), ``centred`` the
    float32 ``raw - z_x``. Compiled loops
    (:func:`qnnlib.coprocessor.jit.patches`, one pass each) for a 2-D kernel when they are active.
    """
    if jit.active() and len(kernel) == 2:
        def compiled(x: np.ndarray, pads: list[int], need_raw: bool) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
            out = output_dims(x.shape[2:], kernel, strides, dilations, pads)
            geometry = {"strides": strides, "dilations": dilations, "pads": pads, "out": out}
            raw = jit.patches(x, x_zero, kernel, **geometry, centred=False) if need_raw else x
            return raw, jit.patches(x, x_zero, kernel, **geometry, centred=True), out

        return compiled

    def numpy_patches(x: np.ndarray, pads: list[int], need_raw: bool) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        raw, out = im2col(x, kernel, strides, dilations, pads, pad_value=x_zero)
        return raw, np.subtract(raw, np.float32(x_zero), dtype=np.float32), out  # one pass: cast and centre

    return numpy_patches


def _gemm_parts(b: np.ndarray, b_zero: np.ndarray, a_zero: np.ndarray, policy: str
                ) -> tuple[ExactProduct, PairSaturation | None]:
    """The exact product with constant ``b`` (K, N) and onnxruntime's saturation for it."""
    centred = b.astype(np.int32) - (b_zero.astype(np.int32).reshape(1, -1) if b_zero.size > 1 else int(_scalar(b_zero)))
    product = ExactProduct.compile(centred.T, _input_range(a_zero))
    saturation = PairSaturation.compile(*pair_axes(b.T, 1)) if _saturates(a_zero, b, b_zero, policy) else None
    return product, saturation


def _gemm_run(a: np.ndarray, a_zero: int, product: ExactProduct, saturation: PairSaturation | None) -> np.ndarray:
    """``(a - z_a) @ B`` exactly for ``a`` (R, K), with the saturation added: (R, N)."""
    centred = a.astype(np.float32)
    if a_zero:
        centred -= np.float32(a_zero)
    acc = product(centred.T).T
    if saturation is not None:
        first, second = pair_axes(a, 1)
        saturation.add_to(acc.T[None], first.T[None], second.T[None])
    return acc


def qgemm(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """``y = requant(alpha * (A - z_a)(B - z_b) + C, s_a * s_b[n] / s_y)``.

    Without ``s_y`` the output is float: ``f32(acc + C) * f32(s_a * s_b[n]) * alpha``.
    """
    _, a_s, a_z, b, b_s, b_z = consts[:6]
    assert a_s is not None and a_z is not None and b is not None and b_s is not None and b_z is not None
    c = consts[6] if len(consts) > 6 else None
    ys = consts[7] if len(consts) > 7 else None
    yz = consts[8] if len(consts) > 8 else None
    trans_a = bool(attrs.get("transA", 0))
    b_kn = b.T if int(attrs.get("transB", 0)) else b
    product, saturation = _gemm_parts(b_kn, b_z, a_z, policy)
    alpha = float(attrs.get("alpha", 1.0))
    a_zero = int(_scalar(a_z))
    int_bias = _Bias.of(c, (1, -1)) if c is not None and c.dtype == np.int32 else None
    if ys is None:
        scale = (np.float32(_scalar(a_s)) * b_s.astype(np.float32).reshape(1, -1)).astype(np.float32)

        def run_float(ins: Arrays) -> list[np.ndarray]:
            a = ins[0]
            assert a is not None
            acc = _gemm_run(a.T if trans_a else a, a_zero, product, saturation)
            if int_bias is not None:
                acc = int_bias.add(acc, "ort-exact")
            out = acc.astype(np.float32) * scale
            if alpha != 1.0:
                out = out * np.float32(alpha)
            if c is not None and c.dtype != np.int32:
                out = out + c.astype(np.float32)
            return [out.astype(np.float32)]

        return run_float
    assert yz is not None
    requant = Requantizer.compile(scale_factor(np.float32(alpha) * np.float32(_scalar(a_s)), b_s.reshape(-1),
                                               _scalar(ys)).reshape(1, -1), int(_scalar(yz)), yz.dtype, policy)

    def run(ins: Arrays) -> list[np.ndarray]:
        a = ins[0]
        assert a is not None
        acc = _gemm_run(a.T if trans_a else a, a_zero, product, saturation)
        return [requant(acc if int_bias is None else int_bias.add(acc, policy))]

    return run


def qlinear_matmul(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """``y = requant((a - z_a) @ (b - z_b), s_a * s_b[n] / s_y)`` for constant ``b`` (batched like numpy's matmul)."""
    _, a_s, a_z, b, b_s, b_z, ys, yz = consts[:8]
    assert a_s is not None and a_z is not None and b is not None and b_s is not None and b_z is not None
    assert ys is not None and yz is not None
    a_zero = int(_scalar(a_z))
    m = scale_factor(_scalar(a_s), b_s.reshape(-1), _scalar(ys))
    requant = Requantizer.compile(m if m.size > 1 else m.reshape(()), int(_scalar(yz)), yz.dtype, policy)
    if b.ndim == 2:
        product, saturation = _gemm_parts(b, b_z, a_z, policy)

        def run(ins: Arrays) -> list[np.ndarray]:
            a = ins[0]
            assert a is not None
            acc = _gemm_run(a.reshape(-1, a.shape[-1]), a_zero, product, saturation)
            return [requant(acc).reshape(*a.shape[:-1], -1)]

        return run
    centred_b = b.astype(np.int32) - (b_z.astype(np.int32).reshape(-1) if b_z.size > 1 else int(_scalar(b_z)))
    batched = ExactProduct.compile(np.swapaxes(centred_b, -1, -2), _input_range(a_z))

    def run_batched(ins: Arrays) -> list[np.ndarray]:
        a = ins[0]
        assert a is not None
        centred = a.astype(np.float32) - np.float32(a_zero)
        return [requant(np.swapaxes(batched(np.swapaxes(centred, -1, -2)), -1, -2))]

    return run_batched


#: The op types the coprocessor claims, and their compilers.
KERNELS: dict[str, Kernel] = {
    "QLinearConv": qlinear_conv,
    "QGemm": qgemm,
    "QLinearMatMul": qlinear_matmul,
    "QLinearAdd": pointwise.qlinear_add,
    "QLinearMul": pointwise.qlinear_mul,
    "QLinearConcat": pointwise.qlinear_concat,
    "QLinearGlobalAveragePool": pointwise.qlinear_global_average_pool,
    "QLinearAveragePool": pointwise.qlinear_average_pool,
    "QuantizeLinear": pointwise.quantize_linear,
    "DequantizeLinear": pointwise.dequantize_linear,
    "MaxPool": pointwise.max_pool,
    "Reshape": pointwise.reshape,
    "Transpose": pointwise.transpose,
    "Flatten": pointwise.flatten,
    "Squeeze": pointwise.squeeze,
    "Unsqueeze": pointwise.unsqueeze,
    lookup.OP_TYPE: lookup.lookup,
}
#: Ops that run on the coprocessor only when their (first) input is an 8-bit integer tensor.
ON_INTEGERS = (*MOVES, "DequantizeLinear")


#: Inputs that must be constants for a claim (weights, scales, zero points, shapes, axes), per op type.
_CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "QLinearConv": tuple(range(1, 9)), "QGemm": tuple(range(1, 9)), "QLinearMatMul": (1, 2, 3, 4, 5, 6, 7),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7),
    "QLinearGlobalAveragePool": (1, 2, 3, 4), "QLinearAveragePool": (1, 2, 3, 4),
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "Reshape": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    lookup.OP_TYPE: (1,),
}


def constant_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    """The inputs of ``node`` that must be constants for the coprocessor to claim it."""
    if node.op_type == "QLinearConcat":  # output scale and zero point, then (tensor, scale, zero point) per input
        return (0, 1, *[j for i in range(2, len(node.input), 3) for j in (i + 1, i + 2)])
    return _CONSTANT_INPUTS.get(node.op_type, ())


def refusal(node: onnx.NodeProto, attrs: dict[str, Any], constants: Mapping[str, np.ndarray],
            types: Mapping[str, int]) -> str | None:
    """Why the coprocessor cannot run ``node`` (None when it can)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx", "com.microsoft", lookup.DOMAIN) or op not in KERNELS:
        return f"no coprocessor kernel for {node.domain + '.' if node.domain else ''}{op}"
    missing = [node.input[i] for i in constant_inputs(node) if i < len(node.input) and node.input[i]
               and node.input[i] not in constants]
    first = types.get(node.input[0]) if node.input else None
    checks = [
        (bool(missing), f"inputs {missing} are not constants (weights, scales, zero points, shapes and axes must be)"),
        (op in ON_INTEGERS and first not in EIGHT_BIT, f"input {node.input[0]!r} is not an 8-bit integer tensor"),
        (op == "QuantizeLinear" and (len(node.input) < 3 or not node.input[2] or first != onnx.TensorProto.FLOAT),
         "only float32 to 8-bit QuantizeLinear with a zero point runs on the coprocessor"),
        ("block_size" in attrs, "blocked (de)quantisation does not run on the coprocessor"),
        (op != "QLinearConv" and str(attrs.get("auto_pad", b"NOTSET"), "ascii") not in ("NOTSET", ""),
         "auto_pad is not supported by the coprocessor's pooling"),
        (bool(attrs.get("channels_last", 0)), "channels_last layout is not supported by the coprocessor"),
        (op == "MaxPool" and len([o for o in node.output if o]) > 1, "MaxPool's Indices output is not supported"),
    ]
    return next((why for failed, why in checks if failed), None)
