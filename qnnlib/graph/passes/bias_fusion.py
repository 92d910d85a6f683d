"""Constant bias Adds join the layer before them: a Conv's bias, or MatMul + Add as a Gemm."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnnlib.graph.edit import drop_unused_initializers, replace_nodes
from qnnlib.graph.index import GraphIndex
from qnnlib.graph.names import NameAllocator


@dataclass(frozen=True)
class _BiasAdd:
    """``add`` reads the output ``data`` of ``layer`` (its only reader) and the constant ``const``."""

    layer: onnx.NodeProto
    add: onnx.NodeProto
    data: str
    const: str


def _bias_adds(index: GraphIndex, layer_type: str) -> Iterator[_BiasAdd]:
    """Every Add with a constant operand whose other operand is the sole-read output of a ``layer_type`` node."""
    taken: set[int] = set()
    for add in index.nodes:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for data, const in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
            layer = index.producer(data)
            if layer is None or layer.op_type != layer_type or id(layer) in taken or not index.is_constant(const):
                continue
            if len(index.uses(data)) != 1 or index.is_graph_output(data) or not index.is_constant(layer.input[1]):
                continue
            taken.add(id(layer))
            yield _BiasAdd(layer, add, data, const)
            break


def fold_conv_add(model: onnx.ModelProto) -> list[str]:
    """Fold ``Conv -> Add(c)`` into the Conv's bias when ``c`` is a constant per output channel.

    ``c`` may have shape ``(C,)`` broadcast as ``(1, C, 1, ..)``, ``(1, C, 1, ..)``, ``(C, 1, ..)`` or be a
    scalar; the new bias is ``b + c`` with ``b = 0`` when the Conv had none.
    """
    index = GraphIndex(model)
    names = NameAllocator(model)
    removed: set[int] = set()
    for match in _bias_adds(index, "Conv"):
        conv = match.layer
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if has_bias and not index.is_constant(conv.input[2]):
            continue
        channels = int(index.initializers[conv.input[1]].dims[0])
        rank = len(index.shape(match.data) or ()) or 4
        per_channel = _per_channel_vector(index.constant(match.const), channels, rank)
        if per_channel is None:
            continue
        bias = index.constant(conv.input[2]).astype(np.float32) if has_bias else np.zeros(channels, np.float32)
        name = names.fresh(f"{conv.name}_bias_addfolded")
        model.graph.initializer.append(numpy_helper.from_array((bias + per_channel).astype(np.float32), name))
        if has_bias:
            conv.input[2] = name
        else:
            conv.input.append(name)
        conv.output[0] = match.add.output[0]
        removed.add(id(match.add))
    if not removed:
        return []
    replace_nodes(model, (n for n in model.graph.node if id(n) not in removed))
    drop_unused_initializers(model)
    return [f"folded {len(removed)} constant Add nodes into their Conv's bias"]


def matmul_add_to_gemm(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``MatMul(A, B) -> Add(c)`` as ``Gemm(A, B, c)``.

    For constant 2-D ``B`` (K, N) and constant ``c`` of shape (N,), (1, N) or a scalar. ``A`` of
    rank > 2 with static leading dims is reshaped to (M, K) around the Gemm and back. onnxruntime
    would otherwise fuse the pair into a float Gemm before its QDQ fusions run.
    """
    index = GraphIndex(model)
    names = NameAllocator(model)
    removed: set[int] = set()
    around: dict[int, tuple[onnx.NodeProto, onnx.NodeProto]] = {}
    for match in _bias_adds(index, "MatMul"):
        mm = match.layer
        a_shape, b_shape = index.shape(mm.input[0]) or (), index.shape(mm.input[1]) or ()
        static_lead = all(isinstance(d, int) and d > 0 for d in a_shape[:-1])
        bias = _gemm_bias(index.constant(match.const), int(b_shape[-1])) if len(b_shape) == 2 else None  # type: ignore[arg-type]
        if bias is None or len(a_shape) < 2 or (len(a_shape) > 2 and not static_lead):
            continue
        bias_name = names.fresh(f"{mm.name}_bias")
        model.graph.initializer.append(numpy_helper.from_array(bias, bias_name))
        out = match.add.output[0]
        if len(a_shape) == 2:
            mm.CopyFrom(helper.make_node("Gemm", [mm.input[0], mm.input[1], bias_name], [out], name=mm.name))
        else:
            around[id(mm)] = _reshapes_around(model, names, mm, out, a_shape=a_shape, n=bias.size)
            mm.CopyFrom(helper.make_node("Gemm", [around[id(mm)][0].output[0], mm.input[1], bias_name],
                                         [around[id(mm)][1].input[0]], name=mm.name))
        removed.add(id(match.add))
    if not removed:
        return []
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if id(node) not in removed:
            before, after = around.get(id(node), (None, None))
            nodes.extend(n for n in (before, node, after) if n is not None)
    replace_nodes(model, nodes)
    drop_unused_initializers(model)
    return [f"rewrote {len(removed)} MatMul + bias Add pairs as Gemm"]


def _gemm_bias(value: np.ndarray, n: int) -> np.ndarray | None:
    """``value`` as a (n,) float32 bias if it is a scalar, (n,) or (1, n); else None."""
    value = value.astype(np.float32)
    if value.size == 1:
        return np.full(n, float(value.reshape(())), np.float32)
    return value.reshape(n) if value.shape in ((n,), (1, n)) else None


def _reshapes_around(model: onnx.ModelProto, names: NameAllocator, mm: onnx.NodeProto, out: str, *,
                     a_shape: tuple[int | str | None, ...], n: int) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """Reshape nodes taking the MatMul's A to (M, K) and the Gemm's result back to (..., N)."""
    flat_shape, out_shape = names.fresh(f"{mm.name}_2d_shape"), names.fresh(f"{mm.name}_nd_shape")
    lead = [int(d) for d in a_shape[:-1]]  # type: ignore[arg-type]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, a_shape[-1]], np.int64), flat_shape))
    model.graph.initializer.append(numpy_helper.from_array(np.array([*lead, n], np.int64), out_shape))
    flat_in, flat_out = names.fresh(f"{mm.input[0]}_2d"), names.fresh(f"{out}_2d")
    before = helper.make_node("Reshape", [mm.input[0], flat_shape], [flat_in], name=names.fresh(f"{mm.name}_to_2d"))
    after = helper.make_node("Reshape", [flat_out, out_shape], [out], name=names.fresh(f"{mm.name}_to_nd"))
    return before, after


def _per_channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a (channels,) vector if it broadcasts per channel onto an NC... tensor of ``rank``."""
    value = value.astype(np.float32)
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), np.float32)
    shape = list(value.shape)
    while len(shape) < rank:
        shape.insert(0, 1)
    if len(shape) != rank or shape[0] != 1 or shape[1] != channels or any(d != 1 for d in shape[2:]):
        return None
    return value.reshape(channels)
