"""Compute float16 models in float32 inside, keeping their float16 interface."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qnnlib.graph.edit import rename_reads, rename_writes, replace_nodes
from qnnlib.graph.index import subgraphs
from qnnlib.graph.names import NameAllocator

log = logging.getLogger(__name__)


def float16_to_float32(model: onnx.ModelProto) -> list[str]:
    """Compute in float32 inside: convert float16 weights, tensors and casts; keep the interface.

    A float16 graph input ``x`` gets ``Cast(to=float)`` into ``x_float32`` that the graph reads
    instead; a float16 graph output ``y`` is produced by ``Cast(to=float16)`` from ``y_float32``.
    """
    graph = model.graph
    fp16 = TensorProto.FLOAT16
    interface = list(graph.input) + list(graph.output)
    if not (any(t.data_type == fp16 for t in graph.initializer)
            or any(v.type.tensor_type.elem_type == fp16 for v in interface)):
        return []
    names = NameAllocator(model)
    _float16_constants_to_float32(model)
    head = _cast_float16_inputs(model, names)
    tail = _cast_float16_outputs(model, names)
    replace_nodes(model, head + list(graph.node) + tail)
    del graph.value_info[:]
    if any(True for node in graph.node for _ in subgraphs(node)):
        log.warning("the model has subgraphs; float16 inside them is left as it is")
    return ["converted float16 weights and tensors to float32 inside; inputs and outputs stay float16"]


def _float16_constants_to_float32(model: onnx.ModelProto) -> None:
    """Initializers, tensor attributes, and Cast/dtype targets of float16 become float32."""
    fp16 = TensorProto.FLOAT16

    def widened(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)

    for t in model.graph.initializer:
        if t.data_type == fp16:
            t.CopyFrom(widened(t))
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16:
                attr.t.CopyFrom(widened(attr.t))
            elif attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == fp16:
                attr.i = TensorProto.FLOAT


def _cast_float16_inputs(model: onnx.ModelProto, names: NameAllocator) -> list[onnx.NodeProto]:
    """A Cast to float32 after every float16 graph input; the graph reads the cast instead."""
    casts = []
    for inp in model.graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = names.fresh(f"{inp.name}_float32")
            rename_reads(model, inp.name, inner)
            casts.append(helper.make_node("Cast", [inp.name], [inner], to=TensorProto.FLOAT,
                                          name=names.fresh(f"{inp.name}_to_float32")))
    return casts


def _cast_float16_outputs(model: onnx.ModelProto, names: NameAllocator) -> list[onnx.NodeProto]:
    """A Cast to float16 before every float16 graph output, which the graph now writes as float32."""
    casts = []
    for out in model.graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = names.fresh(f"{out.name}_float32")
            rename_reads(model, out.name, inner)
            rename_writes(model, out.name, inner)
            casts.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT16,
                                          name=names.fresh(f"{out.name}_to_float16")))
    return casts
