"""Rewrite a QDQ model into integer operators, each with its requantisation as multiplier and shift.

A layer in the QDQ model is ``DequantizeLinear(s) -> op -> QuantizeLinear`` with 8-bit integer
tensors on both sides. This module replaces such a pattern by one integer operator reading the
integer tensors directly:

==========================  ==========================================================
float op                     integer operator
==========================  ==========================================================
Conv (weights, int32 bias)   QLinearConv
MatMul (constant weights)    QLinearMatMul
Gemm (int32 bias)            com.microsoft QGemm (float output when no QuantizeLinear follows)
Add, Mul                     com.microsoft QLinearAdd, QLinearMul
GlobalAveragePool            com.microsoft QLinearGlobalAveragePool
AveragePool                  com.microsoft QLinearAveragePool
Concat                       com.microsoft QLinearConcat
MaxPool, Reshape, Transpose,  the same op on the integer tensor (input and output share scale and
Flatten, (Un)Squeeze, Gather  zero point: a tied group); MaxPool from opset 12; Gather on an
                              integer table (an embedding)
==========================  ==========================================================

What it does not match (4- and 16-bit tensors, ops outside the table, a float op whose output is
read by anything but one QuantizeLinear) stays as it was, so the model keeps computing the same
function; :attr:`IntegerModel.kept` names those compute nodes.

Each integer operator's requantisation, the real factor ``m`` taking its int32 accumulator to the
output's integer grid, is also given as a fixed-point pair that a device without floating point
uses, ``m ~= M * 2**-shift`` with ``2**30 <= M < 2**31`` (:func:`fixed_point`):

* QLinearConv, QLinearMatMul, QGemm: ``m[c] = s_x * s_w[c] / s_y`` per output channel (times
  Gemm's ``alpha``; a QGemm with float output: ``s_x * s_w[c] * alpha``, the dequantisation factor);
* QLinearAdd, QLinearMul: ``s_a / s_y`` and ``s_b / s_y`` (Add), ``s_a * s_b / s_y`` (Mul);
* QLinearGlobalAveragePool, QLinearAveragePool: ``s_x / s_y`` (the division by the pooled positions
  is the device's); QLinearConcat: ``s_i / s_y`` per input ``i``.

They are written as JSON into the model's ``metadata_props`` under :data:`METADATA_KEY`, keyed by
node name, because ONNX operators have no attribute for them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from qnnlib.graph.edit import drop_stale_value_info, drop_unused_initializers, ensure_opset, replace_nodes
from qnnlib.graph.index import GraphIndex, attribute, node_reads
from qnnlib.graph.names import NameAllocator
from qnnlib.graph.passes.opset import default_opset
from qnnlib.numerics.affine import is_power_of_two

#: The metadata key holding every integer operator's requantisation (JSON).
METADATA_KEY = "qnnlib.requantization"
#: onnxruntime's contrib domain (QLinearAdd, QLinearMul, QLinearGlobalAveragePool).
MS_DOMAIN = "com.microsoft"
#: MaxPool takes 8-bit integer tensors from this opset on.
INTEGER_MAXPOOL_OPSET = 12
#: Ops that only move values: on an integer tensor whose input and output share scale and zero point
#: they run as they are, and their output keeps the input's type.
MOVES = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather")
#: Integer element types an integer operator takes.
EIGHT_BIT = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)


@dataclass(frozen=True)
class IntegerModel:
    """The integer-operator model, each operator's requantisation, and the compute nodes left as they were."""

    model: onnx.ModelProto
    requantization: dict[str, dict[str, list[float] | list[int]]]
    kept: tuple[str, ...]

    @property
    def needs_multiplier(self) -> tuple[str, ...]:
        """Integer operators with a requantisation factor that is not a power of two (a shift alone cannot do it).

        Empty for a model quantised with ``QuantConfig(power_of_two_scales=True)``, except for average
        pooling whose input and output scales are not both powers of two.
        """
        return tuple(name for name, entry in self.requantization.items()
                     if any(v != 0 and not is_power_of_two(v)  # a zero factor needs no multiplier
                            for k, reals in entry.items() if k.endswith("_real") for v in reals))


def fixed_point(m: float) -> tuple[int, int]:
    """``(M, shift)`` with ``m ~= M * 2**-shift`` and ``2**30 <= M < 2**31`` (``(0, 0)`` for ``m = 0``).

    From ``m = f * 2**e`` with ``f`` in ``[0.5, 1)``: ``M = rint(f * 2**31)``, ``shift = 31 - e``; a
    ``M`` rounded up to ``2**31`` is halved. The relative error is at most ``2**-31``.
    """
    if m <= 0 or not math.isfinite(m):
        return 0, 0
    f, e = math.frexp(m)
    multiplier = int(np.rint(f * 2.0**31))
    shift = 31 - e
    if multiplier == 2**31:
        multiplier //= 2
        shift -= 1
    return multiplier, shift


@dataclass(frozen=True)
class _Quantized:
    """An integer tensor with its scale and zero point (tensor names), as a DequantizeLinear reads them."""

    value: str
    scale: str
    zero_point: str
    axis: int | None


class _Rewriter:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = GraphIndex(model)
        self.names = NameAllocator(model)
        self.requantization: dict[str, dict[str, list[float] | list[int]]] = {}
        self.replaced: dict[int, onnx.NodeProto] = {}
        self.opset = default_opset(model)
        self.removed: set[int] = set()

    def const(self, name: str) -> np.ndarray | None:
        return self.index.constant(name) if name and self.index.is_constant(name) else None

    def integer_type(self, tensor: str) -> int | None:
        """The element type of an integer tensor: a constant's, a QuantizeLinear output's (its zero point's)."""
        value = self.const(tensor)
        if value is not None:
            return int(helper.np_dtype_to_tensor_dtype(value.dtype))
        producer = self.index.producer(tensor)
        if producer is not None and producer.op_type == "QuantizeLinear" and len(producer.input) > 2:
            zero = self.const(producer.input[2])
            if zero is not None:
                return int(helper.np_dtype_to_tensor_dtype(zero.dtype))
        return self.index.elem_type(tensor)

    def dequantized(self, tensor: str) -> _Quantized | None:
        """The 8-bit integer tensor behind ``tensor`` when a standard DequantizeLinear writes it."""
        dq = self.index.producer(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) < 3:
            return None
        if self.integer_type(dq.input[0]) not in EIGHT_BIT:
            return None
        return _Quantized(dq.input[0], dq.input[1], dq.input[2], attribute(dq, "axis", None))

    def requantized(self, node: onnx.NodeProto) -> tuple[onnx.NodeProto, _Quantized] | None:
        """The single 8-bit QuantizeLinear reading ``node``'s output, and its output."""
        if len(node.output) != 1 or self.index.is_graph_output(node.output[0]):
            return None
        readers = self.index.consumers(node.output[0])
        if len(readers) != 1:
            return None
        q = readers[0]
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.input) < 3:
            return None
        if self.integer_type(q.output[0]) not in EIGHT_BIT or attribute(q, "axis", None) not in (None, 1):
            return None
        zero = self.const(q.input[2])
        scale = self.const(q.input[1])
        if zero is None or scale is None or scale.size != 1:
            return None
        return q, _Quantized(q.output[0], q.input[1], q.input[2], None)

    def scale(self, name: str) -> np.ndarray:
        value = self.const(name)
        assert value is not None
        return value.astype(np.float64).reshape(-1)

    def replace(self, node: onnx.NodeProto, q: onnx.NodeProto | None, new: onnx.NodeProto,
                factors: dict[str, np.ndarray]) -> None:
        self.replaced[id(node)] = new
        if q is not None:
            self.removed.add(id(q))
        entry: dict[str, list[float] | list[int]] = {}
        for key, m in factors.items():
            reals = [float(v) for v in np.asarray(m, np.float64).reshape(-1)]
            pairs = [fixed_point(v) for v in reals]
            entry[f"{key}_real"] = reals
            entry[f"{key}_multiplier"] = [p[0] for p in pairs]
            entry[f"{key}_shift"] = [p[1] for p in pairs]
        self.requantization[new.name] = entry

    def new_node(self, op: str, inputs: list[str], output: str, like: onnx.NodeProto, *,
                 domain: str = "") -> onnx.NodeProto:
        """Node ``op`` writing ``output``, named after and carrying the attributes of the float node ``like``."""
        node = helper.make_node(op, inputs, [output], name=self.names.fresh(f"{like.name or output}_{op}"),
                                domain=domain)
        node.attribute.extend(like.attribute)
        return node

    # -- one method per operator -----------------------------------------------------------------
    def conv(self, node: onnx.NodeProto) -> bool:
        x, w = self.dequantized(node.input[0]), self.dequantized(node.input[1])
        bias = self.const_bias(node, 2)
        found = self.requantized(node)
        if x is None or w is None or found is None or bias is None or self.const(w.value) is None:
            return False
        q, y = found
        inputs = [x.value, x.scale, x.zero_point, w.value, w.scale, w.zero_point, y.scale, y.zero_point]
        if bias:
            inputs.append(bias)
        new = self.new_node("QLinearConv", inputs, y.value, node)
        self.replace(node, q, new, {"output": self.scale(x.scale) * self.scale(w.scale) / self.scale(y.scale)})
        return True

    def const_bias(self, node: onnx.NodeProto, at: int) -> str | None:
        """The int32 bias behind input ``at``: its name; ``""`` when there is none; None when not takeable.

        Takeable: a constant int32 tensor read by a DequantizeLinear with zero point 0.
        """
        if len(node.input) <= at or not node.input[at]:
            return ""
        dq = self.index.producer(node.input[at])
        if dq is None or dq.op_type != "DequantizeLinear" or self.integer_type(dq.input[0]) != onnx.TensorProto.INT32:
            return None
        zero = self.const(dq.input[2]) if len(dq.input) > 2 else np.zeros(1)
        if self.const(dq.input[0]) is None or zero is None or np.any(zero != 0):
            return None
        return dq.input[0]

    def matmul(self, node: onnx.NodeProto) -> bool:
        a, b = self.dequantized(node.input[0]), self.dequantized(node.input[1])
        found = self.requantized(node)
        if a is None or b is None or found is None or self.const(b.value) is None:
            return False
        q, y = found
        new = self.new_node("QLinearMatMul", [a.value, a.scale, a.zero_point, b.value, b.scale, b.zero_point,
                                              y.scale, y.zero_point], y.value, node)
        self.replace(node, q, new, {"output": self.scale(a.scale) * self.scale(b.scale) / self.scale(y.scale)})
        return True

    def gemm(self, node: onnx.NodeProto) -> bool:
        """Gemm -> com.microsoft QGemm; with no QuantizeLinear after it the output stays float (a last layer)."""
        a, b = self.dequantized(node.input[0]), self.dequantized(node.input[1])
        bias = self.const_bias(node, 2)
        if a is None or b is None or bias is None or self.const(b.value) is None or self.scale(a.scale).size != 1:
            return False
        inputs = [a.value, a.scale, a.zero_point, b.value, b.scale, b.zero_point, bias]
        found = self.requantized(node)
        real = self.scale(a.scale) * self.scale(b.scale) * float(attribute(node, "alpha", 1.0))
        if found is not None:
            q, y = found
            new = self.new_node("QGemm", [*inputs, y.scale, y.zero_point], y.value, node, domain=MS_DOMAIN)
            self.replace(node, q, new, {"output": real / self.scale(y.scale)})
        else:
            new = self.new_node("QGemm", inputs, node.output[0], node, domain=MS_DOMAIN)
            self.replace(node, None, new, {"float_output": real})
        return True

    def binary(self, node: onnx.NodeProto) -> bool:
        a, b = self.dequantized(node.input[0]), self.dequantized(node.input[1])
        found = self.requantized(node)
        if a is None or b is None or found is None or a.axis is not None or b.axis is not None:
            return False
        if self.scale(a.scale).size != 1 or self.scale(b.scale).size != 1:
            return False
        q, y = found
        new = self.new_node(f"QLinear{node.op_type}", [a.value, a.scale, a.zero_point, b.value, b.scale, b.zero_point,
                                                       y.scale, y.zero_point], y.value, node, domain=MS_DOMAIN)
        sa, sb, sy = self.scale(a.scale), self.scale(b.scale), self.scale(y.scale)
        factors = {"a": sa / sy, "b": sb / sy} if node.op_type == "Add" else {"output": sa * sb / sy}
        self.replace(node, q, new, factors)
        return True

    def same_grid(self, a: _Quantized, b: _Quantized) -> bool:
        """Whether two integer tensors share scale and zero point (values, not only names)."""
        sa, sb, za, zb = (self.const(n) for n in (a.scale, b.scale, a.zero_point, b.zero_point))
        if sa is None or sb is None or za is None or zb is None:
            return False
        return bool(sa.shape == sb.shape and np.array_equal(sa, sb) and za.dtype == zb.dtype and np.array_equal(za, zb))

    def move(self, node: onnx.NodeProto) -> bool:
        """A node that only moves values (MaxPool, Reshape, Transpose, ...) runs on the integer tensor itself."""
        x = self.dequantized(node.input[0])
        found = self.requantized(node)
        rest = [self.index.producer(t) for t in node.input[1:] if t]
        if x is None or found is None or any(p is not None and p.op_type == "DequantizeLinear" for p in rest):
            return False
        q, y = found
        if not self.same_grid(x, y) or (node.op_type == "MaxPool" and self.opset < INTEGER_MAXPOOL_OPSET):
            return False
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[0] = x.value
        new.output[0] = y.value
        new.name = self.names.fresh(f"{node.name or y.value}_integer")
        self.replaced[id(node)] = new
        self.removed.add(id(q))
        return True

    def pool(self, node: onnx.NodeProto) -> bool:
        """AveragePool and GlobalAveragePool -> com.microsoft QLinearAveragePool / QLinearGlobalAveragePool (NCHW)."""
        x = self.dequantized(node.input[0])
        found = self.requantized(node)
        if x is None or found is None or self.scale(x.scale).size != 1:
            return False
        q, y = found
        new = self.new_node(f"QLinear{node.op_type}", [x.value, x.scale, x.zero_point, y.scale, y.zero_point],
                            y.value, node, domain=MS_DOMAIN)
        new.attribute.append(helper.make_attribute("channels_last", 0))
        self.replace(node, q, new, {"output": self.scale(x.scale) / self.scale(y.scale)})
        return True

    def concat(self, node: onnx.NodeProto) -> bool:
        parts = [self.dequantized(t) for t in node.input]
        found = self.requantized(node)
        if found is None or any(p is None or self.scale(p.scale).size != 1 for p in parts):
            return False
        q, y = found
        inputs = [y.scale, y.zero_point]
        for p in parts:
            assert p is not None
            inputs += [p.value, p.scale, p.zero_point]
        new = self.new_node("QLinearConcat", inputs, y.value, node, domain=MS_DOMAIN)
        self.replace(node, q, new, {f"input{i}": self.scale(p.scale) / self.scale(y.scale)
                                    for i, p in enumerate(parts) if p is not None})
        return True



#: Float compute ops an integer operator can take over, and the rewriter method that does.
_RULES = {"Conv": _Rewriter.conv, "MatMul": _Rewriter.matmul, "Gemm": _Rewriter.gemm, "Add": _Rewriter.binary,
          "Mul": _Rewriter.binary, "GlobalAveragePool": _Rewriter.pool, "AveragePool": _Rewriter.pool,
          "Concat": _Rewriter.concat, **dict.fromkeys(MOVES, _Rewriter.move)}
#: Nodes that only move or requantise values: not reported as kept compute.
_PLUMBING = {"QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
             "Identity", "Shape", "Gather", "Slice", "Concat", "Split", "Constant"}


def to_integer(qdq: onnx.ModelProto) -> IntegerModel:
    """The integer-operator model of ``qdq`` (not changed); see the module docstring."""
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    rewriter = _Rewriter(out)
    kept: list[str] = []
    for node in rewriter.index.nodes:
        rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is not None and rule(rewriter, node):
            continue
        if node.op_type not in _PLUMBING:
            kept.append(node.name or node.output[0])
    nodes = [rewriter.replaced.get(id(n), n) for n in rewriter.index.nodes if id(n) not in rewriter.removed]
    replace_nodes(out, _live(out, nodes))
    drop_unused_initializers(out)
    drop_stale_value_info(out)  # the float tensors between a removed layer and its QuantizeLinear
    if any(n.domain == MS_DOMAIN for n in out.graph.node):
        ensure_opset(out, MS_DOMAIN)
    requantization = dict(sorted(rewriter.requantization.items()))
    for prop in list(out.metadata_props):
        if prop.key == METADATA_KEY:
            out.metadata_props.remove(prop)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(requantization, sort_keys=True))
    return IntegerModel(out, requantization, tuple(kept))


def _live(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` without the DequantizeLinear nodes nothing reads any more (repeated to a fixed point).

    A read inside an If, Loop or Scan body counts.
    """
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {name for n in nodes for name in node_reads(n)} | outputs
        keep = [n for n in nodes if n.op_type != "DequantizeLinear" or any(o in read for o in n.output)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep
