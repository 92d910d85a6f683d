"""Random valid ONNX graphs over the ops qnnlib handles, drawn with hypothesis.

:func:`graphs` draws a :class:`FuzzCase`: a float model of 1-14 nodes with a dynamic batch
dimension ``N``, built step by step from a pool of tensors whose shapes are tracked, so every
drawn node is valid. Ops: Conv (groups, depthwise, strides, dilations, padding, with and without
bias), MatMul (constant weights, and between two activations as in attention), Gemm, Add and Mul
(residuals between two branches, or a broadcast constant), Concat, MaxPool, AveragePool,
GlobalAveragePool, GlobalMaxPool, Reshape, Flatten, Transpose, Slice, Split, Resize, Pad (zeros),
DepthToSpace, SpaceToDepth, Gather (constant indices), Unsqueeze then Squeeze, Identity, Relu,
Clip, LeakyRelu, Sigmoid and Softmax; and Tanh and HardSigmoid, which qnnlib leaves float. A
tensor may be read by several nodes (fan-out); every tensor nobody reads is an output.
Weights have magnitudes uniform in ``[0.5, 1.5] / sqrt(fan_in)`` and random signs, drawn by a numpy
generator seeded from the draw, so a failing case shrinks and replays.

Used by ``tests/test_fuzz.py`` (a few hundred graphs) and ``benchmarks/fuzz_graphs.py`` (a longer run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

#: Opset of every drawn model.
OPSET = 13
#: Name of the dynamic batch dimension.
BATCH = "N"
#: Largest number of compute nodes drawn per graph.
MAX_STEPS = 14


@dataclass(frozen=True)
class FuzzCase:
    """A drawn float model and the shape of its inputs (batch dimension first, given per call)."""

    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]]
    ops: tuple[str, ...]

    def feeds(self, count: int, *, batch: int, seed: int) -> list[dict[str, np.ndarray]]:
        """``count`` feeds of standard normal values at batch size ``batch``."""
        rng = np.random.default_rng(seed)
        return [{name: rng.standard_normal((batch, *shape)).astype(np.float32)
                 for name, shape in self.input_shapes.items()} for _ in range(count)]


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # without the batch dimension


@dataclass
class _Graph:
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    pool: list[_Tensor] = field(default_factory=list)
    read: set[str] = field(default_factory=set)
    ops: list[str] = field(default_factory=list)

    def const(self, value: np.ndarray) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weights(self, shape: tuple[int, ...], fan_in: int) -> str:
        """Magnitudes uniform in [0.5, 1.5] / sqrt(fan_in), random signs: no channel is orders of magnitude
        below its neighbours (per-tensor activations cannot serve such a channel; that is not a bug)."""
        magnitude = self.rng.uniform(0.5, 1.5, shape) / np.sqrt(max(fan_in, 1))
        return self.const((magnitude * self.rng.choice([-1.0, 1.0], shape)).astype(np.float32))

    def node(self, op: str, inputs: list[str], shapes: list[tuple[int, ...]], **attrs: Any) -> list[_Tensor]:
        """Append ``op`` reading ``inputs`` and writing one tensor per entry of ``shapes``."""
        index = len(self.nodes)
        outputs = [_Tensor(f"t{index}_{k}", shape) for k, shape in enumerate(shapes)]
        self.nodes.append(helper.make_node(op, inputs, [t.name for t in outputs], name=f"{op}_{index}", **attrs))
        self.read.update(i for i in inputs if i)
        self.pool.extend(outputs)
        self.ops.append(op)
        return outputs


Draw = Callable[[st.SearchStrategy[Any]], Any]


def _conv(g: _Graph, x: _Tensor, draw: Draw) -> None:
    c, h, w = x.shape
    k = draw(st.sampled_from([1, 3] if min(h, w) >= 3 else [1]))
    dilation = draw(st.sampled_from([1, 2])) if k == 3 and min(h, w) >= 5 else 1
    stride = draw(st.sampled_from([1, 2]))
    pad = draw(st.sampled_from([0, dilation * (k // 2)]))
    depthwise = c > 1 and draw(st.booleans())
    out_c = c if depthwise else draw(st.integers(1, 8))
    group = c if depthwise else 1
    extent = dilation * (k - 1) + 1
    oh, ow = (h + 2 * pad - extent) // stride + 1, (w + 2 * pad - extent) // stride + 1
    if oh < 1 or ow < 1:
        return
    inputs = [x.name, g.weights((out_c, c // group, k, k), c // group * k * k)]
    if draw(st.booleans()):
        inputs.append(g.const((0.1 * g.rng.standard_normal(out_c)).astype(np.float32)))
    g.node("Conv", inputs, [(out_c, oh, ow)], kernel_shape=[k, k], strides=[stride, stride],
           pads=[pad] * 4, dilations=[dilation, dilation], group=group)


def _pool(g: _Graph, x: _Tensor, draw: Draw) -> None:
    c, h, w = x.shape
    op = draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"]))
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        g.node(op, [x.name], [(c, 1, 1)])
    elif min(h, w) >= 2:
        g.node(op, [x.name], [(c, (h - 2) // 2 + 1, (w - 2) // 2 + 1)], kernel_shape=[2, 2], strides=[2, 2])


def _activation(g: _Graph, x: _Tensor, draw: Draw) -> None:
    op = draw(st.sampled_from(["Relu", "Clip", "Sigmoid", "Softmax", "LeakyRelu", "Tanh", "HardSigmoid"]))
    if op == "Clip":
        g.node(op, [x.name, g.const(np.float32(0.0)), g.const(np.float32(6.0))], [x.shape])
    elif op == "Softmax":
        g.node(op, [x.name], [x.shape], axis=-1)
    elif op == "LeakyRelu":
        g.node(op, [x.name], [x.shape], alpha=0.1)
    else:
        g.node(op, [x.name], [x.shape])


def _binary(g: _Graph, x: _Tensor, draw: Draw) -> None:
    op = draw(st.sampled_from(["Add", "Mul"]))
    partners = [t for t in g.pool if t.shape == x.shape and t.name != x.name]
    if partners and draw(st.booleans()):
        other = draw(st.sampled_from(partners)).name
    else:  # a constant broadcast along the channels (rank 3 and 4) or the features (rank 1)
        shape = (x.shape[0],) + (1,) * (len(x.shape) - 1) if len(x.shape) > 1 else x.shape
        value = g.rng.uniform(0.5, 1.5, shape) * g.rng.choice([-1.0, 1.0], shape)
        other = g.const(value.astype(np.float32))
    g.node(op, [x.name, other], [x.shape])


def _concat(g: _Graph, x: _Tensor, draw: Draw) -> None:
    partners = [t for t in g.pool if len(t.shape) == len(x.shape) and t.shape[1:] == x.shape[1:]]
    other = draw(st.sampled_from(partners))
    g.node("Concat", [x.name, other.name], [(x.shape[0] + other.shape[0], *x.shape[1:])], axis=1)


def _transpose(g: _Graph, x: _Tensor, draw: Draw) -> None:
    perm = draw(st.sampled_from([(0, 1, 3, 2), (0, 2, 1, 3)] if len(x.shape) == 3 else [(0, 2, 1)]))
    g.node("Transpose", [x.name], [tuple(x.shape[p - 1] for p in perm[1:])], perm=list(perm))


def _reshape(g: _Graph, x: _Tensor, draw: Draw) -> None:
    size = int(np.prod(x.shape))
    if len(x.shape) == 3:
        target = draw(st.sampled_from(["flat", "rows", "flatten"]))
        if target == "flatten":
            g.node("Flatten", [x.name], [(size,)], axis=1)
            return
        shape = (size,) if target == "flat" else (x.shape[0], x.shape[1] * x.shape[2])
    elif len(x.shape) == 2:
        shape = (size,)
    else:
        shape = (size, 1, 1)
    g.node("Reshape", [x.name, g.const(np.array([0, *shape[:-1], -1], np.int64))], [shape])


def _slice(g: _Graph, x: _Tensor, draw: Draw) -> None:
    axis = draw(st.integers(1, len(x.shape)))
    length = x.shape[axis - 1]
    if length < 2:
        return
    start = draw(st.integers(0, length - 2))
    end = draw(st.integers(start + 1, length))
    shape = list(x.shape)
    shape[axis - 1] = end - start
    inputs = [x.name, *(g.const(np.array([v], np.int64)) for v in (start, end, axis))]
    g.node("Slice", inputs, [tuple(shape)])


def _split(g: _Graph, x: _Tensor, draw: Draw) -> None:
    c = x.shape[0]
    if c < 2:
        return
    first = draw(st.integers(1, c - 1))
    rest = (c - first, *x.shape[1:])
    g.node("Split", [x.name, g.const(np.array([first, c - first], np.int64))], [(first, *x.shape[1:]), rest], axis=1)


def _resize(g: _Graph, x: _Tensor, draw: Draw) -> None:
    c, h, w = x.shape
    if h * w > 64:
        return
    mode = draw(st.sampled_from(["nearest", "linear"]))
    scales = g.const(np.array([1, 1, 2, 2], np.float32))
    g.node("Resize", [x.name, "", scales], [(c, 2 * h, 2 * w)], mode=mode)


def _pad(g: _Graph, x: _Tensor, draw: Draw) -> None:
    c, h, w = x.shape
    top, left = draw(st.integers(0, 1)), draw(st.integers(0, 1))  # under a 2-wide pool: onnxruntime fuses Pad into it
    pads = g.const(np.array([0, 0, top, left, 0, 0, 1, 0], np.int64))
    g.node("Pad", [x.name, pads], [(c, h + top + 1, w + left)], mode="constant")


def _depth(g: _Graph, x: _Tensor, draw: Draw) -> None:
    c, h, w = x.shape
    if c % 4 == 0 and draw(st.booleans()):
        g.node("DepthToSpace", [x.name], [(c // 4, 2 * h, 2 * w)], blocksize=2, mode="DCR")
    elif h % 2 == 0 and w % 2 == 0:
        g.node("SpaceToDepth", [x.name], [(4 * c, h // 2, w // 2)], blocksize=2)


def _move(g: _Graph, x: _Tensor, draw: Draw) -> None:
    """Ops that only move values: Gather of constant indices along the channels, Unsqueeze then Squeeze, Identity."""
    op = draw(st.sampled_from(["Gather", "Unsqueeze", "Identity"]))
    if op == "Gather":
        picks = draw(st.lists(st.integers(0, x.shape[0] - 1), min_size=1, max_size=4))
        g.node(op, [x.name, g.const(np.array(picks, np.int64))], [(len(picks), *x.shape[1:])], axis=1)
    elif op == "Unsqueeze":
        wide = g.node(op, [x.name, g.const(np.array([1], np.int64))], [(1, *x.shape)])[0]
        g.pool.remove(wide)  # rank 4 has no steps: squeeze it straight back
        g.node("Squeeze", [wide.name, g.const(np.array([1], np.int64))], [x.shape])
    else:
        g.node(op, [x.name], [x.shape])


def _matmul(g: _Graph, x: _Tensor, draw: Draw) -> None:
    f = x.shape[-1]
    partners = [t for t in g.pool if len(x.shape) == 2 and t.shape == x.shape and t.name != x.name]
    if partners and draw(st.booleans()):  # attention-like: x @ y^T between two activations
        y = draw(st.sampled_from(partners))
        yt = g.node("Transpose", [y.name], [(f, x.shape[0])], perm=[0, 2, 1])[0]
        g.node("MatMul", [x.name, yt.name], [(x.shape[0], x.shape[0])])
        return
    k = draw(st.integers(1, 16))
    if len(x.shape) == 1 and draw(st.booleans()):
        inputs = [x.name, g.weights((k, f), f)]
        if draw(st.booleans()):
            inputs.append(g.const((0.1 * g.rng.standard_normal(k)).astype(np.float32)))
        g.node("Gemm", inputs, [(k,)], transB=1)
        return
    g.node("MatMul", [x.name, g.weights((f, k), f)], [(*x.shape[:-1], k)])


#: Steps by the rank of the tensor they read (batch excluded): 3 = NCHW, 2 = NTF, 1 = NF.
STEPS: dict[int, tuple[Callable[[_Graph, _Tensor, Draw], None], ...]] = {
    3: (_conv, _conv, _conv, _pool, _activation, _binary, _concat, _transpose, _reshape, _reshape, _slice,
        _split, _resize, _pad, _depth, _move),
    2: (_matmul, _matmul, _matmul, _activation, _binary, _concat, _transpose, _reshape, _slice, _move),
    1: (_matmul, _matmul, _matmul, _activation, _binary, _concat, _reshape),
}


@st.composite
def graphs(draw: Draw) -> FuzzCase:
    """A random valid float model (see the module docstring)."""
    g = _Graph(np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    shape = (draw(st.integers(1, 6)), draw(st.integers(3, 12)), draw(st.integers(3, 12)))
    names = ["x"] if draw(st.booleans()) else ["x", "y"]
    g.pool.extend(_Tensor(n, shape) for n in names)
    for _ in range(draw(st.integers(1, MAX_STEPS))):
        recent = g.pool[-3:] if draw(st.booleans()) else g.pool
        x = draw(st.sampled_from(recent))
        step = draw(st.sampled_from(STEPS[len(x.shape)]))
        step(g, x, draw)
    if not g.nodes:
        g.node("Relu", [g.pool[-1].name], [g.pool[-1].shape])
    for n in names:  # an input nobody reads would be dropped by onnxruntime: read it
        if n not in g.read:
            g.node("Relu", [n], [shape])
    outputs = [t for t in g.pool if t.name not in g.read and t.name not in names]
    graph = helper.make_graph(
        g.nodes, "fuzz",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, *shape]) for n in names],
        [helper.make_tensor_value_info(o.name, TensorProto.FLOAT, [BATCH, *o.shape]) for o in outputs],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return FuzzCase(model, dict.fromkeys(names, shape), tuple(g.ops))
