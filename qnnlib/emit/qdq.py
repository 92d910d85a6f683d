"""Write a plan as a QDQ model: QuantizeLinear/DequantizeLinear pairs onnxruntime fuses.

For a quantised activation ``t`` produced by node P:

* ``P -> t -> QuantizeLinear -> t_quantized``; every reader gets its own
  ``DequantizeLinear -> t_dequantized[_k]`` (onnxruntime needs one DQ per consumer to fuse);
* if ``t`` is a graph output or read by a subgraph, P writes ``t_prequant`` instead and a
  DequantizeLinear writes ``t`` itself, so the name the user sees is kept;
* a graph input that feeds only float ops is left alone for them;
* a Conv, ConvTranspose or Gemm that keeps float weights gets its DequantizeLinear per axis, the
  group's scale repeated: onnxruntime would otherwise quantise its weights itself
  (:func:`_float_weight_guard`).

Weights become int8 (int4, int16 where the plan lowers or raises them) initializers with
per-channel scales feeding a DequantizeLinear (``axis`` set); biases int32 initializers. 4- and
16-bit Q/DQ are the ONNX domain's from opset 21, onnxruntime's com.microsoft ones (same
semantics) below it. Dropped activations (Relu/Clip folded into their producer)
disappear and the producer writes their output. Nodes are written in an order that keeps the
graph topologically sorted, and every inserted name comes from one :class:`NameAllocator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qnnlib.graph.edit import drop_unused_initializers, ensure_opset, replace_nodes
from qnnlib.graph.index import GraphIndex, Use, attribute
from qnnlib.graph.names import NameAllocator
from qnnlib.graph.passes.opset import default_opset
from qnnlib.numerics import affine
from qnnlib.numerics.qtypes import FLOAT, precision_name, qtype
from qnnlib.plan import QuantPlan, WeightPlan
from qnnlib.version import __version__

#: QuantizeLinear/DequantizeLinear take 4- and 16-bit types in the ONNX domain from this opset on.
QDQ_16BIT_OPSET = 21
#: Below it, onnxruntime's contrib Q/DQ (same semantics) carry 4- and 16-bit types.
CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Emitted:
    """The QDQ model, and for each quantised activation the name of its integer (QuantizeLinear) tensor."""

    model: onnx.ModelProto
    quantized_names: dict[str, str]


class _Writer:
    """Collects inserted nodes and initializers around the original nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.opset = default_opset(model)
        self.uses_contrib_qdq = False
        self.names = NameAllocator(model)
        self.head: list[onnx.NodeProto] = []
        self.before: dict[int, list[onnx.NodeProto]] = {}
        self.after: dict[int, list[onnx.NodeProto]] = {}
        self.initializers: list[onnx.TensorProto] = []
        self.group_params: dict[int, tuple[str, str]] = {}

    def constant(self, base: str, value: np.ndarray, onnx_type: int | None = None) -> str:
        """A new initializer; ``onnx_type`` gives 4-bit types, which numpy cannot hold (values packed by onnx)."""
        name = self.names.fresh(base)
        if onnx_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            self.initializers.append(helper.make_tensor(name, onnx_type, value.shape, value.reshape(-1).tolist()))
        else:
            self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output_base: str, *, axis: int | None = None,
             output: str | None = None, wide: bool = False) -> onnx.NodeProto:
        """A node named after its output; ``wide`` Q/DQ (4- or 16-bit) go to com.microsoft below opset 21."""
        out = output if output is not None else self.names.fresh(output_base)
        domain = ""
        if wide and self.opset < QDQ_16BIT_OPSET:
            domain, self.uses_contrib_qdq = CONTRIB_DOMAIN, True
        node = helper.make_node(op, inputs, [out], name=self.names.fresh(f"{out}_{op}"), domain=domain)
        if axis is not None:
            node.attribute.append(helper.make_attribute("axis", axis))
        return node


def emit_qdq(model: onnx.ModelProto, plan: QuantPlan) -> Emitted:
    """A new QDQ model for ``plan``; ``model`` (the normalised float model) is not changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _drop_activations(out, plan.dropped_activations)
    index = GraphIndex(out)
    writer = _Writer(out)
    layers = {layer.node for layer in plan.layers}
    quantized_names: dict[str, str] = {}
    tensors = [m for g in plan.groups if g.params.qtype != FLOAT for m in g.members]
    copies = {t for t in tensors if _narrow_copy(index, plan, t)}  # before any reader is rewired
    for tensor in sorted(tensors, key=_order_key(index)):
        if tensor in copies:
            continue
        if index.is_constant(tensor):
            _emit_constant(index, writer, plan, tensor, layers)
        elif index.producer(tensor) is not None or tensor in index.graph_inputs:
            q_name = _emit_activation(index, writer, plan, tensor, layers)
            if q_name:
                quantized_names[tensor] = q_name
    _emit_weights(index, writer, plan)
    nodes: list[onnx.NodeProto] = list(writer.head)
    for node in index.nodes:
        nodes.extend(writer.before.get(id(node), ()))
        nodes.append(node)
        nodes.extend(writer.after.get(id(node), ()))
    replace_nodes(out, nodes)
    out.graph.initializer.extend(writer.initializers)
    drop_unused_initializers(out)
    if writer.uses_contrib_qdq:
        ensure_opset(out, CONTRIB_DOMAIN)
    _stamp(out)
    return Emitted(out, quantized_names)


def _order_key(index: GraphIndex) -> Callable[[str], tuple[int, str]]:
    rank: dict[str, int] = dict.fromkeys(index.graph_inputs, -1)
    for node in index.nodes:
        for name in node.output:
            rank.setdefault(name, index.position(node))
    return lambda t: (rank.get(t, -2), t)


def _drop_activations(model: onnx.ModelProto, dropped: tuple[str, ...]) -> None:
    """Remove each dropped Relu/Clip; its producer writes the activation's output instead.

    ``dropped`` is in graph order, so in a chain (Conv -> Relu -> Relu) the producer map, kept up to
    date as outputs move, hands the second activation's output to the Conv as well.
    """
    if not dropped:
        return
    by_name = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output if o}
    gone: set[int] = set()
    for name in dropped:
        act = by_name[name]
        producer = producers.pop(act.input[0], None)
        assert producer is not None, f"dropped activation {name!r} has no producer"
        for i, o in enumerate(producer.output):
            if o == act.input[0]:
                producer.output[i] = act.output[0]
        producers[act.output[0]] = producer
        gone.add(id(act))
    replace_nodes(model, (n for n in model.graph.node if id(n) not in gone))


def _narrow_copy(index: GraphIndex, plan: QuantPlan, tensor: str) -> bool:
    """Whether ``tensor`` is a 4-bit member written only from members of its group (MaxPool, Concat, Reshape).

    Its values already lie on the group's grid, so it needs no Q/DQ of its own; and onnxruntime
    1.31 rejects the graph its optimiser makes of ``DQ -> MaxPool -> Q`` at 4 bits (a MaxPool on
    uint4), so none is written. At 8 bits the pair stays: it keeps such ops on integer data. A
    Concat with an input of another group (a narrow input untied by :func:`qnnlib.prepare.retie`)
    requantises it, so its output keeps its Q/DQ.
    """
    group = plan.group_of(tensor)
    producer = index.producer(tensor)
    if group is None or producer is None or precision_name(group.params.qtype) != "int4":
        return False
    members = set(group.members)
    quantised = [t for t in producer.input if t and plan.group_of(t) is not None]
    return not index.is_graph_output(tensor) and bool(quantised) and all(t in members for t in quantised)


def _is_wide(plan: QuantPlan, tensor: str) -> bool:
    """Whether ``tensor``'s group is stored in a type that needs opset 21 Q/DQ (4 or 16 bits)."""
    return precision_name(plan.params(tensor).qtype) in ("int4", "int16")


def _qparams(writer: _Writer, plan: QuantPlan, tensor: str) -> tuple[str, str]:
    """The scale and zero-point initializers of ``tensor``'s tied group, written once per group."""
    group = plan.group_of(tensor)
    assert group is not None, f"{tensor!r} is not quantised"
    if group.id not in writer.group_params:
        params = group.params
        qt = qtype(params.qtype)
        scale = writer.constant(f"{tensor}_scale", np.array(params.scale, np.float32))
        zero = writer.constant(f"{tensor}_zero_point", np.array(params.zero_point, qt.np_dtype), qt.onnx_type)
        writer.group_params[group.id] = (scale, zero)
    return writer.group_params[group.id]


def _emit_activation(index: GraphIndex, writer: _Writer, plan: QuantPlan, tensor: str, layers: set[str]) -> str:
    producer = index.producer(tensor)
    produced_by_layer = producer is not None and producer.name in layers
    uses = [u for u in index.uses(tensor) if u.index >= 0]
    readers = [u for u in uses if produced_by_layer or u.node.name in layers]
    keep_name = produced_by_layer and (index.is_graph_output(tensor) or index.read_in_subgraph(tensor))
    if not readers and not keep_name:
        return ""
    scale, zero = _qparams(writer, plan, tensor)
    source = tensor
    if keep_name:
        assert producer is not None
        source = writer.names.fresh(f"{tensor}_prequant")
        for i, o in enumerate(producer.output):
            if o == tensor:
                producer.output[i] = source
        readers = uses  # every in-graph reader now reads a DequantizeLinear instead
    wide = _is_wide(plan, tensor)
    quant = writer.node("QuantizeLinear", [source, scale, zero], f"{tensor}_quantized", wide=wide)
    placed = writer.after.setdefault(id(producer), []) if producer is not None else writer.head
    placed.append(quant)
    q_name = quant.output[0]
    if keep_name:  # an If of constant condition is inlined by onnxruntime: see _float_weight_guard
        along = _static_axis(index, tensor) if index.read_in_subgraph(tensor) else None
        placed.append(_dequantize(writer, plan, tensor, q_name, along, wide=wide, output=tensor))
    for use in readers:
        dq = _dequantize(writer, plan, tensor, q_name, _float_weight_guard(index, plan, use, tensor), wide=wide)
        use.node.input[use.index] = dq.output[0]
        writer.before.setdefault(id(use.node), []).append(dq)
    return q_name


#: Ops whose float weights onnxruntime quantises itself when a DequantizeLinear feeds their input
#: and a QuantizeLinear reads their output (its WeightBiasQuantization transformer, level 1).
_SELF_QUANTISED = ("Conv", "ConvTranspose", "Gemm")


def _float_weight_guard(index: GraphIndex, plan: QuantPlan, use: Use, tensor: str) -> tuple[int, int] | None:
    """``(axis, size)`` for the DequantizeLinear of ``use`` when it must be per-axis; else None.

    onnxruntime (1.20 and later) rewrites ``DequantizeLinear -> Conv/ConvTranspose/Gemm with float32
    weights -> [Relu/Clip] -> QuantizeLinear`` by quantising the weights per tensor to int8 and the
    bias to int32, so a layer qnnlib keeps float (excluded, raised to float, an island) would run
    in int8 after all. The rewrite applies only when the DequantizeLinear's scale is a scalar: such
    a reader gets the group's scale and zero point repeated along an axis of static size above 1,
    which dequantises to the same values. None when the reader is not such a layer, or no axis of
    the tensor has a known size above 1 (a layer that reads one channel, of unknown spatial size).
    A tensor an If, Loop or Scan body reads gets the same treatment (:func:`_emit_activation`): onnxruntime
    inlines the branch of an If whose condition is constant, and the rewrite then reaches its layers.
    """
    node = use.node
    if use.index != 0 or node.op_type not in _SELF_QUANTISED or len(node.input) < 2:
        return None
    weight = node.input[1]
    if not index.is_constant(weight) or index.elem_type(weight) != onnx.TensorProto.FLOAT:
        return None
    if any(wp.node == node.name and wp.input_index == 1 for wp in plan.weights):
        return None
    channels = _input_channels(index, node)
    if channels > 1:
        return (0 if node.op_type == "Gemm" and attribute(node, "transA", 0) else 1), channels
    return _static_axis(index, tensor)


def _static_axis(index: GraphIndex, tensor: str) -> tuple[int, int] | None:
    """``(axis, size)`` of an axis of ``tensor`` whose inferred size is above 1, axis 1 first; else None."""
    shape = index.shape(tensor) or ()
    sizes = [(axis, dim) for axis, dim in enumerate(shape) if isinstance(dim, int) and dim > 1]
    sizes.sort(key=lambda pair: pair[0] != 1)
    return sizes[0] if sizes else None


def _input_channels(index: GraphIndex, node: onnx.NodeProto) -> int:
    """The size of the input's channel (Conv) or reduction (Gemm) axis, from the weight's shape."""
    weight = node.input[1]
    init = index.initializers.get(weight)  # its dims, not its data converted
    shape = tuple(init.dims) if init is not None else index.constant(weight).shape
    if node.op_type == "Conv":
        return int(shape[1]) * int(attribute(node, "group", 1))
    if node.op_type == "ConvTranspose":
        return int(shape[0])
    return int(shape[1] if attribute(node, "transB", 0) else shape[0])


def _dequantize(writer: _Writer, plan: QuantPlan, tensor: str, q_name: str, along: tuple[int, int] | None, *,
                wide: bool, output: str | None = None) -> onnx.NodeProto:
    """A DequantizeLinear of ``q_name`` at ``tensor``'s group parameters, repeated along ``(axis, size)`` if given."""
    if along is None:
        scale, zero = _qparams(writer, plan, tensor)
        axis = None
    else:
        scale, zero = _repeated_qparams(writer, plan, tensor, along[1])
        axis = along[0]
    return writer.node("DequantizeLinear", [q_name, scale, zero], f"{tensor}_dequantized", axis=axis, output=output,
                       wide=wide)


def _repeated_qparams(writer: _Writer, plan: QuantPlan, tensor: str, size: int) -> tuple[str, str]:
    """``tensor``'s group scale and zero point repeated ``size`` times, for a per-axis DequantizeLinear."""
    params = plan.params(tensor)
    qt = qtype(params.qtype)
    scale = writer.constant(f"{tensor}_scale_repeated", np.full(size, params.scale, np.float32))
    zero = writer.constant(f"{tensor}_zero_point_repeated", np.full(size, params.zero_point, qt.np_dtype),
                           qt.onnx_type)
    return scale, zero


def _emit_constant(index: GraphIndex, writer: _Writer, plan: QuantPlan, tensor: str, layers: set[str]) -> None:
    """A float constant read by a quantised op (e.g. Add's second input) becomes an integer initializer."""
    readers = [u for u in index.uses(tensor) if u.index >= 0 and u.node.name in layers]
    if not readers:
        return
    params = plan.params(tensor)
    qt = qtype(params.qtype)
    value = affine.quantize(index.constant(tensor), params.scale, params.zero_point, qt)
    q_name = writer.constant(f"{tensor}_quantized", value, qt.onnx_type)
    scale, zero = _qparams(writer, plan, tensor)
    for use in readers:
        dq = writer.node("DequantizeLinear", [q_name, scale, zero], f"{tensor}_dequantized",
                         wide=_is_wide(plan, tensor))
        use.node.input[use.index] = dq.output[0]
        writer.before.setdefault(id(use.node), []).append(dq)


def _emit_weights(index: GraphIndex, writer: _Writer, plan: QuantPlan) -> None:
    nodes = {n.name: n for n in index.nodes}
    cache: dict[tuple[str, str, bytes], tuple[str, str, str]] = {}
    for wp in plan.weights:
        node = nodes[wp.node]
        scales = np.asarray(wp.scales, np.float32)
        key = (wp.tensor, wp.kind, scales.tobytes() + str(wp.axis).encode() + str(wp.correction).encode())
        if key not in cache:
            cache[key] = _quantized_weight(index, writer, wp, scales)
        q_name, scale, zero = cache[key]
        axis = wp.axis if scales.size > 1 else None
        dq = writer.node("DequantizeLinear", [q_name, scale, zero], f"{wp.tensor}_dequantized", axis=axis,
                         wide=wp.kind == "weight" and precision_name(wp.qtype) in ("int4", "int16"))
        node.input[wp.input_index] = dq.output[0]
        writer.before.setdefault(id(node), []).append(dq)


def _quantized_weight(index: GraphIndex, writer: _Writer, wp: WeightPlan, scales: np.ndarray) -> tuple[str, str, str]:
    value = wp.corrected(index.constant(wp.tensor))
    if wp.kind == "bias":
        q, _ = affine.quantize_bias(value.reshape(-1), scales)
        zero_value = np.zeros(scales.shape, np.int32)
    else:
        qt = qtype(wp.qtype)
        axis = wp.axis if scales.size > 1 else None
        q = affine.quantize_weight(value, scales, axis, qt, wp.qmax)
        zero_value = np.zeros(scales.shape, qt.np_dtype)
    if scales.size == 1:
        scales, zero_value = scales.reshape(()), zero_value.reshape(())
    onnx_type = None if wp.kind == "bias" else qtype(wp.qtype).onnx_type
    q_name = writer.constant(f"{wp.tensor}_quantized", q, onnx_type)
    scale = writer.constant(f"{wp.tensor}_scale", scales)
    zero = writer.constant(f"{wp.tensor}_zero_point", zero_value, onnx_type)
    return q_name, scale, zero


def _stamp(model: onnx.ModelProto) -> None:
    """Record qnnlib's version in the model's metadata (replacing an older stamp)."""
    props = [p for p in model.metadata_props if p.key != "qnnlib.version"]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    model.metadata_props.add(key="qnnlib.version", value=__version__)
