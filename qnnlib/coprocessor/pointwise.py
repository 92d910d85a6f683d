"""Coprocessor operators without weights: Add, Mul, Concat, pooling, (de)quantisation, moves.

Each is compiled like the products in :mod:`qnnlib.coprocessor.ops`: ``op(attrs, consts, policy)``
returns a function of the input arrays. Under ``ort-exact`` each follows onnxruntime's x86 kernel
(MLAS) operation by operation in float32, so its integers equal onnxruntime's; under ``q31`` and
``pot`` the integer accumulator is requantised by the policy (:class:`Requantizer`). Formulas are
in each docstring; ``f32(.)`` rounds to float32, ``rint`` rounds half to even.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qnnlib.coprocessor import jit
from qnnlib.coprocessor.kernels import sliding_windows
from qnnlib.coprocessor.policy import Requantizer, power_of_two

Arrays = Sequence[np.ndarray | None]
#: A node compiled for the coprocessor: its input arrays (constants included) to its outputs.
Compiled = Callable[[Arrays], list[np.ndarray]]
f32 = np.float32
#: Elements above which a binary op with a single-value operand runs as a table (:func:`_with_tables`).
TABULATE_ABOVE = 1024
#: The input types a table covers.
EIGHT_BIT = (np.dtype(np.uint8), np.dtype(np.int8))
#: Fractional bits of the integer accumulator of Add under q31 and pot (TFLite's choice).
ADD_FRACTION_BITS = 20


def scalar(a: np.ndarray | None) -> Any:
    """The single value of a scale or zero point."""
    assert a is not None
    return a.reshape(-1)[0]


def _clip_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(values, info.min, info.max).astype(dtype)


def _centred(x: np.ndarray, zero: Any) -> np.ndarray:
    return x.astype(np.int32) - np.int32(zero)


def qlinear_add(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """``C = A + B`` (numpy broadcasting).

    ort-exact, as MLAS's AVX2 kernel: ``rint(fma(a, r_a, fma(b, r_b, F)))``, clipped, with
    ``r_a = f32(s_a / s_c)``, ``r_b = f32(s_b / s_c)``, ``F = f32(z_c - fma(z_a, r_a, f32(r_b z_b)))``
    (the compiler contracts MLAS's ``r_a z_a + r_b z_b``) and ``fma`` rounding once; a one-element
    input is folded into ``F`` first: ``F + f32(b r_b)``.
    q31/pot: ``acc = (a - z_a) M_a + (b - z_b) M_b`` with ``M = r * 2**20`` (rounded; a power of two
    under pot) and ``acc * 2**-20`` requantised.
    """
    _, sa, za, _, sb, zb, sc, zc = consts[:8]
    assert zc is not None
    ratio_a, ratio_b = f32(f32(scalar(sa)) / f32(scalar(sc))), f32(f32(scalar(sb)) / f32(scalar(sc)))
    zero_a, zero_b, zero_c, dtype = int(scalar(za)), int(scalar(zb)), int(scalar(zc)), zc.dtype
    if policy == "ort-exact":
        fixed = f32(f32(zero_c) - _fma(np.asarray(zero_a, f32), ratio_a, f32(ratio_b * f32(zero_b))))

        def run(ins: Arrays) -> list[np.ndarray]:
            a, b = ins[0], ins[3]
            assert a is not None and b is not None
            if b.size == 1 or a.size == 1:
                one, r_one, many, r_many = (b, ratio_b, a, ratio_a) if b.size == 1 else (a, ratio_a, b, ratio_b)
                folded = f32(fixed + f32(f32(scalar(one)) * r_one))
                out = np.broadcast_to(_fma(many, r_many, folded), np.broadcast_shapes(a.shape, b.shape))
            else:
                out = _fma(a, ratio_a, _fma(b, ratio_b, fixed))
            return [_clip_to(np.rint(out), dtype)]

        return _with_tables(run)
    one = 2.0**ADD_FRACTION_BITS
    mult_a, mult_b = (_integer_factor(float(r), policy) * one for r in (ratio_a, ratio_b))
    requant = Requantizer.compile(np.asarray(1.0 / one), zero_c, dtype, policy)

    def run_integer(ins: Arrays) -> list[np.ndarray]:
        a, b = ins[0], ins[3]
        assert a is not None and b is not None
        acc = _centred(a, zero_a).astype(np.int64) * round(mult_a)
        acc += _centred(b, zero_b).astype(np.int64) * round(mult_b)
        return [requant(acc)]

    return _with_tables(run_integer)


def _with_tables(run: Compiled) -> Compiled:
    """``run`` of a binary op on 8-bit inputs 0 and 3, as a table lookup when one input holds a single value.

    Then the output is a function of the other input alone, which takes at most 256 values: ``run``
    evaluates it once on every value of that input's type, and each element is looked up,
    ``y = table[x]``. The same integers as ``run`` on the whole tensor, in one pass.
    """
    index = table_indexer()

    def run_tabulated(ins: Arrays) -> list[np.ndarray]:
        a, b = ins[0], ins[3]
        assert a is not None and b is not None
        many, position = (a, 0) if b.size == 1 else (b, 3)
        if min(a.size, b.size) != 1 or many.size <= TABULATE_ABOVE or many.dtype not in EIGHT_BIT:
            return run(ins)
        info = np.iinfo(many.dtype)
        probe = list(ins)
        # every value, with the input's rank: the op broadcasts it against the other input as it would the input
        probe[position] = np.arange(info.min, info.max + 1).astype(many.dtype).reshape(*[1] * (many.ndim - 1), -1)
        table = run(probe)[0].reshape(-1)
        return [index(table, many).reshape(np.broadcast_shapes(a.shape, b.shape))]

    return run_tabulated


def table_indexer() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``(table, x) -> table[x]`` for 8-bit ``x`` (``x + 128`` for int8): compiled loops when active now, else numpy."""
    return jit.lookup if jit.active() else _index


def _index(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    return table[x.astype(np.int32) + 128] if x.dtype == np.int8 else table[x]


def _fma(x: np.ndarray, r: np.float32, t: np.ndarray | np.float32) -> np.ndarray:
    """``f32(x * r + t)`` rounded once, as a fused multiply-add (the float64 sum is exact for 8-bit ``x``)."""
    return (x.astype(np.float64) * np.float64(r) + np.asarray(t, np.float64)).astype(f32)


def _integer_factor(r: float, policy: str) -> float:
    """``r`` as the device applies it: itself (q31) or the power of two nearest in log2 (pot's rounding)."""
    if policy != "pot" or r <= 0:
        return r
    multiplier, shift = power_of_two(r)
    return multiplier * 2.0**-shift


def qlinear_mul(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """``C = A * B``: ``(a - z_a)(b - z_b)`` requantised by ``f32(f32(s_a s_b) / s_c)``.

    Under ort-exact that is MLAS's ``rint(f32(product) * factor) + z_c``, clipped.
    """
    _, sa, za, _, sb, zb, sc, zc = consts[:8]
    assert zc is not None
    factor = f32(f32(f32(scalar(sa)) * f32(scalar(sb))) / f32(scalar(sc)))
    zero_a, zero_b = int(scalar(za)), int(scalar(zb))
    requant = Requantizer.compile(np.asarray(factor), int(scalar(zc)), zc.dtype, policy)

    def run(ins: Arrays) -> list[np.ndarray]:
        a, b = ins[0], ins[3]
        assert a is not None and b is not None
        return [requant(_centred(a, zero_a) * _centred(b, zero_b))]

    return _with_tables(run)


def qlinear_concat(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Concatenation; an input with other parameters than the output's is requantised first.

    ort-exact: a table over the 256 values, ``clip(rint(f32(f32(x - z_x) * s_x) / s_y) + z_y)``;
    q31/pot: ``(x - z_x)`` requantised by ``s_x / s_y``.
    """
    ys, yz = consts[0], consts[1]
    assert ys is not None and yz is not None
    axis = int(attrs["axis"])
    maps: list[Callable[[np.ndarray], np.ndarray] | None] = []
    y_scale, y_zero = f32(scalar(ys)), int(scalar(yz))
    for i in range(2, len(consts), 3):
        x_scale, x_zero = f32(scalar(consts[i + 1])), int(scalar(consts[i + 2]))
        if x_scale == y_scale and x_zero == y_zero:
            maps.append(None)
        elif policy == "ort-exact":
            x_dtype = np.dtype(first(consts[i + 2:]).dtype)
            maps.append(_dequantising_table(x_scale, x_zero, x_dtype, y_scale=y_scale, y_zero=y_zero, y_dtype=yz.dtype))
        else:
            requant = Requantizer.compile(np.asarray(x_scale / y_scale), y_zero, yz.dtype, policy)
            maps.append(_rescaler(x_zero, requant))

    def run(ins: Arrays) -> list[np.ndarray]:
        parts = []
        for i, convert in zip(range(2, len(ins), 3), maps, strict=True):
            x = ins[i]
            assert x is not None
            parts.append(x if convert is None else convert(x))
        return [np.concatenate(parts, axis=axis)]

    return run


def _dequantising_table(x_scale: np.float32, x_zero: int, x_dtype: np.dtype, *, y_scale: np.float32, y_zero: int,
                        y_dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """A lookup over every value ``v`` of ``x_dtype``: ``clip(rint(f32(f32(v - z_x) * s_x) / s_y) + z_y)``."""
    info = np.iinfo(x_dtype)
    values = np.arange(info.min, info.max + 1, dtype=np.int32)
    table = _clip_to(np.rint((values - x_zero).astype(f32) * x_scale / y_scale) + f32(y_zero), y_dtype)
    offset = -int(info.min)
    return lambda x: table[x.astype(np.int32) + offset] if offset else table[x]


def _rescaler(x_zero: int, requant: Requantizer) -> Callable[[np.ndarray], np.ndarray]:
    """``requant(x - z_x)``."""
    return lambda x: requant(_centred(x, x_zero))


def qlinear_global_average_pool(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Mean over the spatial axes (NCHW): ``acc = sum(x) - z_x * HW`` requantised by ``f32(s_x / f32(s_y * HW))``."""
    _, xs, xz, ys, yz = consts[:5]
    assert yz is not None
    x_zero = int(scalar(xz))
    compiled: dict[int, Requantizer] = {}

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        size = int(np.prod(x.shape[2:]))
        if size not in compiled:
            factor = f32(f32(scalar(xs)) / f32(f32(scalar(ys)) * f32(size)))
            compiled[size] = Requantizer.compile(np.asarray(factor), int(scalar(yz)), yz.dtype, policy)
        acc = x.reshape(*x.shape[:2], -1).sum(axis=-1, dtype=np.int64) - x_zero * size
        return [compiled[size](acc).reshape(*x.shape[:2], *([1] * (x.ndim - 2)))]

    return run


def _windows(x: np.ndarray, attrs: dict[str, Any], fill: Any) -> list[np.ndarray]:
    """The strided views of ``x`` (N, C, *spatial) at every kernel offset of a pooling window, padded with ``fill``."""
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    views, _ = sliding_windows(x, kernel, list(attrs.get("strides", [1] * rank)),
                               list(attrs.get("dilations", [1] * rank)), list(attrs.get("pads", [0] * (2 * rank))),
                               fill=fill, ceil=bool(attrs.get("ceil_mode", 0)))
    return [view for _, view in views]


def max_pool(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """MaxPool on an integer tensor: the largest value in each window (padding never wins)."""

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        views = _windows(x, attrs, np.iinfo(x.dtype).min)
        out = views[0].copy()
        for view in views[1:]:
            np.maximum(out, view, out=out)
        return [out]

    return run


def qlinear_average_pool(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """AveragePool (NCHW).

    ort-exact: values dequantised ``f32(s_x (x - z_x))``, summed in float32 in window order,
    divided by the count (the kernel size with ``count_include_pad``, else the positions inside),
    ``clip(rint(f32(f32(mean / s_y) + z_y)))``. q31/pot: ``sum(x - z_x)`` requantised by
    ``s_x / (s_y * count)``.
    """
    _, xs, xz, ys, yz = consts[:5]
    assert xs is not None and xz is not None and ys is not None and yz is not None
    x_scale, x_zero, y_scale, y_zero = f32(scalar(xs)), int(scalar(xz)), f32(scalar(ys)), int(scalar(yz))
    per_shape: dict[tuple[int, ...], tuple[np.ndarray, Requantizer | None]] = {}

    def prepared(spatial: tuple[int, ...]) -> tuple[np.ndarray, Requantizer | None]:
        """The count of input positions per window, and the q31/pot requantiser, for one input size."""
        if spatial not in per_shape:
            counts = np.asarray(np.prod(attrs["kernel_shape"]), np.int32) if attrs.get("count_include_pad", 0) \
                else sum(_windows(np.ones((1, 1, *spatial), np.int32), attrs, 0))
            factor = (x_scale / y_scale / np.asarray(counts, np.float64)).astype(f32)
            requant = None if policy == "ort-exact" else Requantizer.compile(factor, y_zero, yz.dtype, policy)
            per_shape[spatial] = (np.asarray(counts), requant)
        return per_shape[spatial]

    def run(ins: Arrays) -> list[np.ndarray]:
        x = first(ins)
        counts, requant = prepared(tuple(x.shape[2:]))
        if requant is None:
            views = _windows(f32(x_scale) * _centred(x, x_zero).astype(f32), attrs, f32(0.0))
            total = views[0].copy()
            for view in views[1:]:
                total += view
            return [_clip_to(np.rint(total / counts.astype(f32) / y_scale + f32(y_zero)), yz.dtype)]
        return [requant(np.sum(_windows(_centred(x, x_zero), attrs, 0), axis=0))]

    return run


def quantize_linear(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Float to integer at the coprocessor's border: ``clip(rint(x / s) + z)`` per tensor or along ``axis``.

    NaN becomes the type's minimum, as in onnxruntime.
    """
    scale, zero = consts[1], consts[2]
    assert scale is not None and zero is not None
    axis = int(attrs.get("axis", 1))

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        s, z = _along(scale, x.ndim, axis), _along(zero, x.ndim, axis)
        values = np.rint(x.astype(f32) / s.astype(f32)) + z.astype(f32)
        info = np.iinfo(zero.dtype)
        # fmax and fmin, not clip: they give qmin for NaN, as onnxruntime does
        return [np.fmin(np.fmax(values, f32(info.min)), f32(info.max)).astype(zero.dtype)]

    return run


def dequantize_linear(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Integer to float at the coprocessor's border: ``f32(x - z) * s`` per tensor or along ``axis``."""
    scale, zero = consts[1], consts[2]
    assert scale is not None
    axis = int(attrs.get("axis", 1))

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        centred = x.astype(np.int32)
        if zero is not None:
            centred -= _along(zero, x.ndim, axis).astype(np.int32)
        return [centred.astype(f32) * _along(scale, x.ndim, axis).astype(f32)]

    return run


def _along(values: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-tensor value as it is, a per-axis one shaped to broadcast along ``axis``."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return values.reshape(shape)


def first(ins: Arrays) -> np.ndarray:
    """The first input, which every operator here needs."""
    x = ins[0]
    assert x is not None
    return x


def reshape(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Reshape by a constant shape (``0`` copies the input's dimension unless ``allowzero``)."""
    target = consts[1]
    assert target is not None
    allow_zero = bool(attrs.get("allowzero", 0))

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        shape = [x.shape[i] if d == 0 and not allow_zero else int(d) for i, d in enumerate(target.tolist())]
        return [x.reshape(shape)]

    return run


def transpose(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Transpose by ``perm`` (reversed axes by default)."""
    perm = attrs.get("perm")
    return lambda ins: [np.ascontiguousarray(np.transpose(first(ins), perm))]


def flatten(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Flatten to 2-D at ``axis``."""
    axis = int(attrs.get("axis", 1))

    def run(ins: Arrays) -> list[np.ndarray]:
        x = ins[0]
        assert x is not None
        cut = axis if axis >= 0 else axis + x.ndim
        return [x.reshape(int(np.prod(x.shape[:cut])), -1)]

    return run


def squeeze(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Squeeze the constant ``axes`` (input from opset 13, attribute before; all unit axes without)."""
    axes = _axes(attrs, consts)
    return lambda ins: [np.squeeze(first(ins), axis=axes)]


def unsqueeze(attrs: dict[str, Any], consts: Arrays, policy: str) -> Compiled:
    """Unsqueeze at the constant ``axes``."""
    axes = _axes(attrs, consts)
    assert axes is not None
    return lambda ins: [np.expand_dims(first(ins), axis=axes)]


def _axes(attrs: dict[str, Any], consts: Arrays) -> tuple[int, ...] | None:
    if len(consts) > 1 and consts[1] is not None:
        return tuple(int(a) for a in consts[1].reshape(-1))
    return tuple(int(a) for a in attrs["axes"]) if "axes" in attrs else None
