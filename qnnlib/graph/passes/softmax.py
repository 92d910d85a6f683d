"""Softmax over an axis of size 1: a constant 1 that onnxruntime's fused kernel gets wrong."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnnlib.graph.edit import replace_nodes
from qnnlib.graph.index import GraphIndex, attribute
from qnnlib.graph.names import NameAllocator
from qnnlib.graph.passes.opset import default_opset

#: From this opset Softmax normalises along ``axis`` alone (default -1); before, over ``[axis:]``.
SINGLE_AXIS_OPSET = 13


def constant_softmax(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``Softmax(x)`` over a statically size-1 axis as ``x * 0 + 1``.

    Its value is ``exp(x - x) / exp(x - x) = 1`` for finite ``x`` and NaN otherwise, which
    ``x * 0 + 1`` keeps. onnxruntime fuses ``DequantizeLinear -> Softmax -> QuantizeLinear`` into
    QLinearSoftmax even when the Softmax is meant to stay float, and that kernel (1.31) returns 0 on
    a size-1 axis; the rewritten pair quantises exactly (0 and 1 are on every grid qnnlib gives them).
    """
    index = GraphIndex(model)
    opset = default_opset(model)
    names = NameAllocator(model)
    rewritten: dict[int, list[onnx.NodeProto]] = {}
    zero = one = ""
    for node in index.nodes:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or not _over_one_value(node, index, opset):
            continue
        if not zero:
            zero, one = names.fresh("softmax_zero"), names.fresh("softmax_one")
            model.graph.initializer.extend([numpy_helper.from_array(np.array(0.0, np.float32), zero),
                                            numpy_helper.from_array(np.array(1.0, np.float32), one)])
        product = names.fresh(f"{node.output[0]}_times_zero")
        rewritten[id(node)] = [
            helper.make_node("Mul", [node.input[0], zero], [product], name=names.fresh(f"{node.name}_times_zero")),
            helper.make_node("Add", [product, one], [node.output[0]], name=node.name),
        ]
    if not rewritten:
        return []
    replace_nodes(model, [new for n in model.graph.node for new in rewritten.get(id(n), [n])])
    return [f"rewrote {len(rewritten)} Softmax over an axis of size 1 (always 1) as x * 0 + 1"]


def _over_one_value(node: onnx.NodeProto, index: GraphIndex, opset: int) -> bool:
    """Whether the Softmax normalises over exactly one value, by the static shape of its float32 input."""
    shape = index.shape(node.input[0])
    if not shape or index.elem_type(node.input[0]) != onnx.TensorProto.FLOAT:
        return False
    rank = len(shape)
    axis = int(attribute(node, "axis", -1 if opset >= SINGLE_AXIS_OPSET else 1)) % rank
    reduced = shape[axis:axis + 1] if opset >= SINGLE_AXIS_OPSET else shape[axis:]
    return all(isinstance(d, int) and d > 0 for d in reduced) and math.prod(reduced) == 1  # type: ignore[arg-type]
