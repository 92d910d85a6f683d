"""Constants: Constant nodes become initializers; constant subgraphs are folded."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnnlib.graph.edit import drop_unused_initializers, replace_nodes
from qnnlib.graph.index import GraphIndex, attribute, subgraphs
from qnnlib.graph.passes.opset import default_opset

log = logging.getLogger(__name__)

#: Constant folding never creates an initializer larger than this many bytes.
FOLD_MAX_BYTES = 1 << 26
#: Ops never folded: random generators, and ops whose value the graph should keep visible.
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}




def constants_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Turn Constant nodes of the main graph into initializers (their output names are kept)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            value = _constant_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                moved += 1
                continue
        keep.append(node)
    if moved:
        replace_nodes(model, keep)
    return [f"turned {moved} Constant nodes into initializers"] if moved else []


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), np.int64)
    return None  # sparse or string constants stay as nodes


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace nodes whose inputs are all initializers, and Shape of static shapes, by initializers.

    Returns how many nodes were folded. A node whose evaluation fails, or whose result would exceed
    :data:`FOLD_MAX_BYTES`, is left as it is.
    """
    graph = model.graph
    index = GraphIndex(model)
    constants: dict[str, np.ndarray] = {}
    outputs = set(index.graph_outputs)
    opset = default_opset(model)
    folded: set[int] = set()
    for node in index.nodes:
        if not _foldable(node) or any(o in outputs for o in node.output):
            continue
        if node.op_type == "Shape":
            results = _static_shape(node, index)
        else:
            feeds = {n: constants[n] if n in constants else index.constant(n) for n in node.input
                     if n and (n in constants or index.is_constant(n))}
            complete = bool(node.input) and all(not n or n in feeds for n in node.input)
            results = _evaluate(node, feeds, opset) if complete else None
        if results is None or sum(r.nbytes for r in results) > FOLD_MAX_BYTES:
            continue
        constants.update(zip([o for o in node.output if o], results, strict=False))
        folded.add(id(node))
    if not folded:
        return 0
    used = {n for node in index.nodes if id(node) not in folded for n in node.input} | outputs
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items() if name in used)
    replace_nodes(model, (n for n in graph.node if id(n) not in folded))
    drop_unused_initializers(model)
    del graph.value_info[:]
    return len(folded)


def _foldable(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type not in _NO_FOLD and not any(True for _ in subgraphs(node))


def _static_shape(node: onnx.NodeProto, index: GraphIndex) -> list[np.ndarray] | None:
    """The output of ``Shape`` when its input's shape is fully static (honouring start and end)."""
    shape = index.shape(node.input[0])
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    start = int(attribute(node, "start", 0))
    end = attribute(node, "end", None)
    return [np.array(list(shape)[start:None if end is None else int(end)], np.int64)]


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """Run one node on constant inputs with onnx's reference evaluator; None if it cannot."""
    from onnx.reference import ReferenceEvaluator

    declared = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for n, v in feeds.items()]
    graph = helper.make_graph([node], "fold", declared, [onnx.ValueInfoProto(name=o) for o in node.output if o])
    try:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]
    except Exception:
        return None
